"""PacaTrainer under DeepSpeed ZeRO, used by tests/test_hf_trainer_deepspeed.py: one process without
DeepSpeed, or ``torchrun --nproc-per-node 2`` (gloo) with ``TrainingArguments(deepspeed=...)``.

For each METHOD (comma-separated) writes OUT/METHOD/final-rank<R>.pt: the adapter tensors, every base
weight and MEFT's host rows, whole (gathered under ZeRO-3), after training; the adapter to
OUT/METHOD/final; checkpoints to OUT/METHOD/checkpoint-<step> every SAVE steps. RESUME may contain
``{method}``.

usage: python hf_deepspeed_run.py OUT PER_DEVICE_BATCH METHODS STAGE STEPS SAVE [RESUME]
       STAGE: 0 (no DeepSpeed), 1, 2 or 3
"""
import os
import sys
from pathlib import Path

import torch
from transformers import TrainingArguments

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from paca_core import LoRAConfig, MEFTConfig, PaCAConfig, prepare_model  # noqa: E402
from paca_core.integrations.transformers import PacaTrainer  # noqa: E402
from paca_core.distributed.sharding import full_tensor  # noqa: E402
from tests.conftest import tiny_llama  # noqa: E402
from tests.scripts.hf_trainer_run import Rows  # noqa: E402

CONFIGS = {
    "paca": lambda: PaCAConfig(r=4),
    "lora": lambda: LoRAConfig(r=4),
    "meft": lambda: MEFTConfig(num_rows=64, top_k=4, rows_per_step=64),  # no row dropped: 1 and 2 processes agree
}  # and "sft": PaCA through PacaSFTTrainer (TRL)


def deepspeed_config(stage: int) -> dict | None:
    """HF's "auto" fields, as users' configs have them; ZeRO-3 partitions every weight of the tiny model."""
    if stage == 0:
        return None
    zero = {"stage": stage}
    if stage == 3:
        zero["stage3_param_persistence_threshold"] = 0
    return {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
            "gradient_clipping": "auto", "zero_optimization": zero}


def snapshot(model) -> dict[str, torch.Tensor]:
    """Adapter tensors, every base weight and MEFT's host rows, whole (a collective under ZeRO-3)."""
    from paca_core.distributed.zero import full_parameter

    out = {}
    for name, layer in model.adapter_layers().items():
        for key, tensor in layer.adapter_state().items():
            out[f"adapter.{name}.{key}"] = full_tensor(full_parameter(tensor)).detach().clone()
        table = getattr(layer, "table", None)
        if table is not None:
            out[f"host.{name}.values"] = table.values.clone()
    for name, parameter in model.base_model.named_parameters():
        out[f"base.{name}"] = full_tensor(full_parameter(parameter)).detach().clone()
    return out


def use_gloo_for_deepspeed() -> None:
    """CPU only: accelerate picks DeepSpeed's backend from the accelerator it finds (nccl, hccl, ...) and,
    finding none here, would run each process alone. Its process state, made first with gloo, is the one
    TrainingArguments then uses (``accelerator_config={"use_configured_state": True}``)."""
    from accelerate import PartialState

    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    try:
        PartialState(backend="gloo")
    finally:
        del os.environ["ACCELERATE_USE_DEEPSPEED"]


def run(out: str, per_device_batch: int, method: str, stage: int, steps: int, save: int, resume: str | None) -> None:
    settings = dict(
        output_dir=out, max_steps=steps, per_device_train_batch_size=per_device_batch, learning_rate=1e-2,
        save_steps=save, report_to=[], use_cpu=stage == 0, seed=0, lr_scheduler_type="linear", warmup_steps=1,
        data_seed=0, logging_steps=1, deepspeed=deepspeed_config(stage), max_grad_norm=1.0, bf16=False,
        accelerator_config={"use_configured_state": True} if stage else None,
    )
    if method == "sft":  # PaCA through TRL's SFTTrainer (which is handed the inner transformers model)
        import datasets
        import trl

        from paca_core.integrations.trl import PacaSFTTrainer
        from tests.conftest import SAMPLE_TEXT, build_tiny_tokenizer

        tokenizer = build_tiny_tokenizer(Path(out) / f"tokenizer-rank{os.environ.get('RANK', '0')}")
        base = tiny_llama(seed=0, vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        model = prepare_model(base, PaCAConfig(r=4))
        lines = [line for line in SAMPLE_TEXT.splitlines() if line.strip()]
        trainer = PacaSFTTrainer(model=model, args=trl.SFTConfig(**settings, max_length=32),
                                 train_dataset=datasets.Dataset.from_dict({"text": lines}), processing_class=tokenizer)
    else:
        model = prepare_model(tiny_llama(seed=0), CONFIGS[method]())
        trainer = PacaTrainer(model=model, args=TrainingArguments(**settings), train_dataset=Rows())
    trainer.train(resume_from_checkpoint=resume)
    trainer.save_model(f"{out}/final")
    state = snapshot(model)
    rank = int(os.environ.get("RANK", "0"))
    torch.save(state, f"{out}/final-rank{rank}.pt")


def main(out: str, per_device_batch: int, methods: str, stage: int, steps: int, save: int, resume: str | None) -> None:
    if stage:
        use_gloo_for_deepspeed()
    for method in methods.split(","):
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state()  # one Accelerator (with its DeepSpeed plugin) per trainer; the process state stays
        run(f"{out}/{method}", per_device_batch, method, stage, steps, save, resume and resume.replace("{method}", method))


if __name__ == "__main__":
    a = sys.argv[1:]
    main(a[0], int(a[1]), a[2], int(a[3]), int(a[4]), int(a[5]), a[6] if len(a) > 6 else None)
