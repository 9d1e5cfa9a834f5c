"""PacaTrainer run used by tests/test_hf_trainer.py, alone or under torchrun (DDP over gloo on CPU).

The model is prepared without ``device=`` (placement is the Trainer's job, as in users' scripts), and
each process writes ``placement-rank<R>.json`` to OUT: every ``nn.Module.to`` call made while preparing
and while the Trainer was built, and which tensors changed identity or device in each phase.

usage: python hf_trainer_run.py OUT PER_DEVICE_BATCH
"""
import contextlib
import json
import os
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


@contextlib.contextmanager
def recorded_moves():
    """Record every ``nn.Module.to`` call (module type and arguments) made inside the block."""
    calls, original = [], torch.nn.Module.to

    def to(self, *args, **kwargs):
        calls.append([type(self).__name__, [str(a) for a in args], {k: str(v) for k, v in kwargs.items()}])
        return original(self, *args, **kwargs)

    torch.nn.Module.to = to
    try:
        yield calls
    finally:
        torch.nn.Module.to = original


def tensors(model: torch.nn.Module) -> dict[str, tuple[int, str]]:
    """(identity, device) of every parameter and buffer, by name without the wrapper's prefix."""
    named = [*model.named_parameters(), *model.named_buffers()]
    return {name.removeprefix("base_model.").replace(".base_layer", ""): (id(t), str(t.device)) for name, t in named}


def changed(before: dict, after: dict) -> list[str]:
    """Names present before whose tensor is a different object or on another device now."""
    return sorted(name for name, where in before.items() if after.get(name) != where)


def main(out: str, per_device_batch: int) -> None:
    base = tiny_llama(seed=0)
    before = tensors(base)
    with recorded_moves() as prepare_moves:
        model = prepare_model(base, PaCAConfig(r=4))  # no device=: the Trainer places the model
    prepared = tensors(model)
    args = TrainingArguments(
        output_dir=out, max_steps=3, per_device_train_batch_size=per_device_batch, learning_rate=1e-2, save_steps=3,
        report_to=[], use_cpu=True, seed=0, lr_scheduler_type="constant", data_seed=0,
    )
    with recorded_moves() as trainer_moves:
        trainer = PacaTrainer(model=model, args=args, train_dataset=Rows())
    placed = tensors(model)
    report = {
        "args_device": str(trainer.args.device),  # e.g. cpu:0 under DDP; tensors put there report cpu
        "rank_device": str(torch.empty(0, device=trainer.args.device).device),
        "prepare_moves": prepare_moves,
        "changed_by_prepare": changed(before, prepared),
        "adapter_devices": {n: [str(layer.paca_delta.device), str(layer.base_layer.weight.device)] for n, layer in model.adapter_layers().items()},
        "trainer_moves": trainer_moves,
        "changed_by_trainer": changed(prepared, placed),
        "devices_after_trainer": sorted({device for _, device in placed.values()}),
    }
    rank = int(os.environ.get("RANK", "0"))
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / f"placement-rank{rank}.json").write_text(json.dumps(report))
    trainer.train()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
