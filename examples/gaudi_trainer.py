"""Fine-tune with PaCA under optimum-habana's GaudiTrainer: an ordinary optimum-habana script where
two lines differ (marked "paca-hal"). Not yet run on Gaudi hardware.

Inside an Intel Gaudi PyTorch image (vault.habana.ai/gaudi-docker/1.22.0/ubuntu22.04/habanalabs/pytorch-installer-2.7.1):

    pip install -e ".[gaudi]"
    PT_HPU_LAZY_MODE=1 python examples/gaudi_trainer.py --model /path/to/hf-model --data train.txt \\
        --output_dir runs/gaudi --use_habana --use_lazy_mode --bf16 --max_steps 200 --learning_rate 5e-3

Every GaudiTrainingArguments flag works (--use_hpu_graphs_for_training, --torch_compile with
PT_HPU_LAZY_MODE=0 and --use_lazy_mode False, --gaudi_config_name, ...). Checkpoints hold the paca-hal
adapter; load it with ``PacaModel.from_pretrained(base_model, "runs/gaudi")``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from optimum.habana import GaudiConfig, GaudiTrainingArguments  # noqa: F401  (GaudiConfig: see --gaudi_config_name)
from transformers import AutoModelForCausalLM, AutoTokenizer, HfArgumentParser

from paca_core import PaCAConfig
from paca_core.data.dataset import load_dataset
from paca_core.integrations.gaudi import PacaGaudiTrainer, prepare_for_gaudi_trainer


@dataclass
class ScriptArguments:
    model: str = field(metadata={"help": "local Hugging Face model folder"})
    data: str = field(metadata={"help": "local .txt or .jsonl ('text' or 'prompt'/'response')"})
    rank: int = field(default=16, metadata={"help": "PaCA: trained input columns per linear layer"})
    seq_len: int = field(default=512, metadata={"help": "tokens per example (fixed: one graph shape)"})


class _Examples(torch.utils.data.Dataset):
    """paca-hal's fixed-length tokenised data as the dict rows a HF Trainer expects."""

    def __init__(self, data):
        self.data = data

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        return {"input_ids": self.data.input_ids[i], "attention_mask": self.data.attention_mask[i], "labels": self.data.labels[i]}


def main() -> None:
    script_args, training_args = HfArgumentParser((ScriptArguments, GaudiTrainingArguments)).parse_args_into_dataclasses()
    training_args.dataloader_drop_last = True  # static shapes: no ragged last batch to compile a graph for
    tokenizer = AutoTokenizer.from_pretrained(script_args.model)
    model = AutoModelForCausalLM.from_pretrained(
        script_args.model, torch_dtype=torch.bfloat16 if training_args.bf16 else torch.float32
    )
    train_data = _Examples(load_dataset(script_args.data, tokenizer, script_args.seq_len))

    # paca-hal line 1 (was: model = get_peft_model(model, LoraConfig(...)))
    model = prepare_for_gaudi_trainer(model, PaCAConfig(r=script_args.rank, target_modules="all-linear"), training_args)
    # paca-hal line 2 (was: trainer = GaudiTrainer(...)); without gaudi_config: fused AdamW + fused clip norm
    trainer = PacaGaudiTrainer(model=model, args=training_args, train_dataset=train_data, processing_class=tokenizer)

    trainer.train()
    trainer.save_model()


if __name__ == "__main__":
    main()
