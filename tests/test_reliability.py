"""Failure handling, one test per failure in docs/reliability.md: NaN/inf, out of memory, disk full
during a save, a killed process, bad configuration."""
import errno
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from paca_core import PaCAConfig, prepare_model
from paca_core.cli.dispatch import main
from paca_core.data.dataset import load_dataset, split_held_out
from paca_core.errors import NonFiniteLossError, TrainingOutOfMemoryError
from paca_core.train.trainer import STATE_NAME, Trainer, TrainingArguments
from paca_core.train.training_state import read_training_state


def _trainer(model_dir, text_file, out, steps=4, **overrides):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    torch.manual_seed(0)
    adapted = prepare_model(model, PaCAConfig(r=4), device="cpu")
    data, _ = split_held_out(load_dataset(text_file, tokenizer, 16), 0.1, 0)
    args = TrainingArguments(output_dir=str(out), max_steps=steps, batch_size=2, lr=1e-2, progress=False, log_every=1, **overrides)
    return Trainer(adapted, args, data, torch.device("cpu"))


def _poison_loss(trainer, bad_calls):
    """Make the model's loss NaN on the given forward calls (1-based)."""
    model = trainer.model
    original = model.forward
    calls = {"n": 0}

    def forward(*args, **kwargs):
        calls["n"] += 1
        output = original(*args, **kwargs)
        if calls["n"] in bad_calls:
            output.loss = output.loss * float("nan")
        return output

    model.forward = forward


def _deltas(trainer):
    return {n: layer.paca_delta.detach().clone() for n, layer in trainer.model.adapter_layers().items()}


def test_nan_loss_stops_with_the_last_good_state_saved(tiny_model_dir, sample_text_file, tmp_path):
    trainer = _trainer(tiny_model_dir, sample_text_file, tmp_path / "run")
    _poison_loss(trainer, {3})
    with pytest.raises(NonFiniteLossError, match="Step 3.*no update was applied.*--on-nan skip"):
        trainer.train()
    assert trainer.state.step == 2
    saved = read_training_state(tmp_path / "run" / "checkpoint")
    assert saved["trainer"]["step"] == 2
    assert all(torch.isfinite(d).all() for d in _deltas(trainer).values())


def test_nan_loss_skipped_when_asked_and_the_weights_stay_finite(tiny_model_dir, sample_text_file, tmp_path):
    trainer = _trainer(tiny_model_dir, sample_text_file, tmp_path / "run", on_nan="skip")
    _poison_loss(trainer, {2})
    trainer.train()
    assert trainer.state.step == 4 and trainer.state.skipped_steps == 1
    assert all(torch.isfinite(d).all() for d in _deltas(trainer).values())


def test_too_many_skips_in_a_row_stop_the_run(tiny_model_dir, sample_text_file, tmp_path):
    trainer = _trainer(tiny_model_dir, sample_text_file, tmp_path / "run", on_nan="skip", max_skipped_steps=2)
    _poison_loss(trainer, {2, 3})
    with pytest.raises(NonFiniteLossError, match="2 steps in a row"):
        trainer.train()


def test_out_of_memory_names_the_levers_and_saves_nothing(tiny_model_dir, sample_text_file, tmp_path):
    trainer = _trainer(tiny_model_dir, sample_text_file, tmp_path / "run")
    oom = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)

    def forward(*args, **kwargs):
        raise oom("CUDA out of memory. Tried to allocate 2.00 GiB")

    trainer.model.forward = forward
    with pytest.raises(TrainingOutOfMemoryError) as raised:
        trainer.train()
    for lever in ("--batch-size", "--seq-len", "--rank", "velora", "--offload-activations"):
        assert lever in str(raised.value)
    assert not (tmp_path / "run" / "checkpoint").exists()


def test_disk_full_during_save_keeps_the_previous_checkpoint(tiny_model_dir, sample_text_file, tmp_path, monkeypatch):
    trainer = _trainer(tiny_model_dir, sample_text_file, tmp_path / "run", steps=2)
    trainer.train()
    before = _deltas(trainer)
    trainer.args.max_steps = trainer.total_steps = 4
    import paca_core.train.trainer as trainer_module

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(trainer_module, "write_training_state", full_disk)
    with pytest.raises(OSError, match=r"disk full while writing .*checkpoint \(No space left on device\): about .* needed, .* free"):
        trainer.train()
    monkeypatch.undo()
    resumed = _trainer(tiny_model_dir, sample_text_file, tmp_path / "run", steps=4)
    resumed.resume_from(tmp_path / "run" / "checkpoint")
    assert resumed.state.step == 2
    for name, delta in _deltas(resumed).items():
        assert torch.equal(delta, before[name]), name
    leftovers = [p.name for p in (tmp_path / "run").iterdir() if p.name != "checkpoint"]
    assert leftovers == [], leftovers  # no half-written staging directory stays behind


@pytest.mark.slow
def test_killed_process_resumes_from_the_last_checkpoint(tiny_model_dir, sample_text_file, tmp_path):
    out = tmp_path / "run"
    flags = [
        sys.executable, "-m", "paca_core", "train", "--model", str(tiny_model_dir), "--data", str(sample_text_file),
        "--steps", "200", "--save-every", "2", "--seq-len", "16", "--batch-size", "2", "--sample-tokens", "0",
        "--no-progress", "--device", "cpu", "--out", str(out),
    ]
    process = subprocess.Popen(flags, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": os.getcwd()})
    state = out / "checkpoint" / STATE_NAME
    deadline = time.time() + 240
    while not state.exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.2)
    time.sleep(0.5)
    process.send_signal(signal.SIGKILL)  # no handler can run: like a machine crash
    process.wait()
    assert state.exists()
    saved_step = read_training_state(state.parent)["trainer"]["step"]
    assert saved_step >= 2
    resume = flags[3:]
    resume[resume.index("200")] = str(saved_step + 2)
    assert main(resume + ["--resume", str(out)]) == 0
    assert read_training_state(state.parent)["trainer"]["step"] == saved_step + 2


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--rank", "-1"], "r must be a positive integer"),
        (["--method", "dora"], "is not valid"),
        (["--method", "lora+lorafa"], "would adapt the same modules"),
        (["--method", "paca+lora"], "would adapt the same modules"),
        (["--method", "paca+full"], "--full-modules"),
        (["--lr", "-3"], "--lr must be a positive number"),
        (["--on-nan", "skip", "--batch-size", "0"], "--batch-size must be >= 1"),
        (["--method", "meft", "--meft-topk", "0"], "--meft-topk must be a positive integer"),
    ],
)
def test_bad_config_is_rejected_before_any_work(flags, message, tmp_path, caplog):
    # the model path does not exist: a config error must come first, before anything is loaded
    argv = ["train", "--model", str(tmp_path / "no-such-model"), "--device", "cpu", "--out", str(tmp_path / "o")] + flags
    with caplog.at_level("ERROR"):
        assert main(argv) == 2
    assert message in caplog.text
    assert "no-such-model" not in caplog.text
