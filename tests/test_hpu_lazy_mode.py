"""HPU lazy-mode step boundaries, checked without Gaudi hardware.

A RECORDING STAND-IN replaces ``habana_frameworks.torch.core`` (the real module exists only in
Intel's images): it records ``mark_step`` calls. The training loop then runs on CPU tensors with the
real HPU runtime's ``step_boundary`` wired to that stand-in, and the test checks that the lazy graph
is cut after backward and after the optimizer step — where Intel's docs and optimum-habana's
GaudiTrainer put them. Tests that need a real HPU are in the conformance suite and skip without one.
"""
import pytest
import torch

import devices.registry as registry
from devices.cpu import CpuRuntime
from devices.hpu import HpuRuntime
from paca_core import PaCAConfig, prepare_model
from paca_core.data.dataset import load_dataset, split_held_out
from paca_core.train.trainer import Trainer, TrainingArguments

from .conftest import SAMPLE_TEXT


class RecordingHabanaCore:
    """Stand-in for ``habana_frameworks.torch.core``: records instead of compiling graphs."""

    def __init__(self, events):
        self.events = events

    def mark_step(self, device_str: str = "", sync: bool = False):
        self.events.append("mark_step")


class CpuTensorsWithHpuBoundaries(CpuRuntime):
    """CPU memory/sync, HPU step boundaries (backed by the recording stand-in)."""

    def __init__(self, events):
        self.hpu = HpuRuntime()
        self.hpu._core = RecordingHabanaCore(events)

    def step_boundary(self):
        self.hpu.step_boundary()


@pytest.mark.parametrize("grad_accum", [1, 3])
def test_mark_step_after_backward_and_after_optimizer_step(monkeypatch, tiny_model_dir, tmp_path, grad_accum):
    from paca_core.files.assets import load_model_and_tokenizer

    events: list[str] = []
    monkeypatch.setitem(registry._RUNTIMES, "cpu", CpuTensorsWithHpuBoundaries(events))
    model, tokenizer = load_model_and_tokenizer(str(tiny_model_dir))
    paca = prepare_model(model, PaCAConfig(r=4), device="cpu")
    text = tmp_path / "t.txt"
    text.write_text(SAMPLE_TEXT)
    data, _ = split_held_out(load_dataset(text, tokenizer, 16), 0.1, 0)
    args = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=3, batch_size=2, grad_accum=grad_accum, progress=False)
    trainer = Trainer(paca, args, data, torch.device("cpu"))

    first_delta = next(iter(paca.adapter_layers().values())).paca_delta
    first_delta.register_post_accumulate_grad_hook(lambda p: events.append("backward"))
    trainer.optimizer.register_step_post_hook(lambda *a: events.append("optimizer.step"))
    trainer.train()

    expected_step = ["backward"] * grad_accum + ["mark_step", "optimizer.step", "mark_step"]
    assert events == expected_step * 3
