"""PacaTrainer run used by tests/test_hf_trainer.py, alone or under torchrun (DDP over gloo on CPU).

usage: python hf_trainer_run.py OUT PER_DEVICE_BATCH
"""
import sys
from pathlib import Path

import torch
from transformers import TrainingArguments

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from paca_core import PaCAConfig, prepare_model  # noqa: E402
from paca_core.integrations.transformers import PacaTrainer  # noqa: E402
from tests.conftest import tiny_llama  # noqa: E402


class Rows(torch.utils.data.Dataset):
    def __init__(self, n=16, length=12):
        gen = torch.Generator().manual_seed(0)
        self.rows = [torch.randint(0, 100, (length,), generator=gen) for _ in range(n)]

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return {"input_ids": self.rows[i], "attention_mask": torch.ones_like(self.rows[i]), "labels": self.rows[i]}


def main(out: str, per_device_batch: int) -> None:
    model = prepare_model(tiny_llama(seed=0), PaCAConfig(r=4), device="cpu")
    args = TrainingArguments(
        output_dir=out, max_steps=3, per_device_train_batch_size=per_device_batch, learning_rate=1e-2, save_steps=3,
        report_to=[], use_cpu=True, seed=0, lr_scheduler_type="constant", data_seed=0,
    )
    PacaTrainer(model=model, args=args, train_dataset=Rows()).train()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
