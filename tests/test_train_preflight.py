"""``paca train`` refuses a bad run before anything heavy: each case provoked, with a check that no weights
loaded (``no_load``) and that the error is one line saying what to do."""
from __future__ import annotations

import json
import types

import pytest

from paca_core.cli.dispatch import main

from .conftest import refused_in_one_line as _refused


def _argv(model, data, out, *extra):
    return ["train", "--model", str(model), "--data", str(data), "--out", str(out), "--device", "cpu", "--steps", "2",
            "--seq-len", "16", "--batch-size", "2", "--sample-tokens", "0", "--no-progress", *extra]


@pytest.mark.parametrize("flags, message", [
    (["--seq-len", "0"], "--seq-len must be at least 2"),
    (["--eval-fraction", "1.5"], "--eval-fraction must be at least 0 and below 1"),
    (["--log-every", "0"], "--log-every must be at least 1"),
    (["--warmup-steps", "-1"], "--warmup-steps must be 0 or more"),
    (["--save-every", "-2"], "--save-every must be 0"),
    (["--lr", "1e38"], "far above any AdamW learning rate"),
    (["--lr", "nan"], "--lr must be a positive number"),
    (["--lr", "inf"], "--lr must be a positive number"),
    (["--weight-decay", "-1"], "--weight-decay must be 0 or more"),
    (["--velora-groups", "8"], "--velora-groups (velora)"),
    (["--meft-rows", "64"], "--meft-rows (meft)"),
    (["--method", "lora", "--quantize", "nf4"], "use it with --method paca"),
    (["--trust-checkpoint"], "--trust-checkpoint applies only with --resume"),
    (["--no-eval", "--eval-data", "x.txt"], "--eval-data with --no-eval"),
])
def test_bad_arguments_are_refused_before_loading(flags, message, tiny_model_dir, sample_text_file, tmp_path, no_load, caplog):
    line = _refused(_argv(tiny_model_dir, sample_text_file, tmp_path / "out", *flags), caplog)
    assert message in line, line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name, content, message", [
    ("missing.txt", None, "does not exist"),
    ("empty.txt", "", "is empty"),
    ("bad.jsonl", '{"text": "fine"}\n{"text": \n', "bad.jsonl:2 is not valid JSON"),
    ("keys.jsonl", '{"text": "fine"}\n{"question": "q"}\n', "keys.jsonl:2 has neither"),
    ("latin1.txt", b"caf\xe9 au lait", "is not UTF-8"),
    ("data.xml", "<a/>", "unsupported data format"),
])
def test_bad_data_files_are_named_before_loading(name, content, message, tiny_model_dir, tmp_path, no_load, caplog):
    data = tmp_path / name
    if isinstance(content, bytes):
        data.write_bytes(content)
    elif content is not None:
        data.write_text(content)
    line = _refused(_argv(tiny_model_dir, data, tmp_path / "out"), caplog)
    assert message in line and name in line, line


def test_a_bad_eval_data_file_is_named_before_loading(tiny_model_dir, sample_text_file, tmp_path, no_load, caplog):
    line = _refused(_argv(tiny_model_dir, sample_text_file, tmp_path / "out", "--eval-data", str(tmp_path / "nope.jsonl")), caplog)
    assert "--eval-data" in line and "nope.jsonl" in line


def test_seq_len_above_the_models_context_is_refused_before_loading(tiny_model_dir, sample_text_file, tmp_path, no_load, caplog):
    context = json.loads((tiny_model_dir / "config.json").read_text())["max_position_embeddings"]
    line = _refused(_argv(tiny_model_dir, sample_text_file, tmp_path / "out", "--seq-len", str(context * 2)), caplog)
    assert f"above this model's context ({context} tokens" in line


@pytest.fixture
def finished_run(tiny_model_dir, sample_text_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("earlier") / "run"
    assert main(_argv(tiny_model_dir, sample_text_file, out, "--rank", "4")) == 0
    return out


@pytest.mark.parametrize("flags, message", [
    (["--resume", "MISSING"], "no such folder"),
    (["--resume", "RUN", "--method", "lora"], "method: checkpoint 'paca' vs now 'lora'"),
    (["--resume", "RUN", "--rank", "8"], "r: checkpoint 4 vs now 8"),
    (["--resume", "RUN", "--rank", "4", "--target-modules", "q_proj"], "target_modules"),
    (["--resume", "RUN", "--rank", "4", "--overwrite"], "pass one of them"),
])
def test_a_resume_that_cannot_work_is_refused_before_loading(flags, message, finished_run, tiny_model_dir, sample_text_file, tmp_path,
                                                            no_load, caplog):
    flags = [str(finished_run) if f == "RUN" else str(tmp_path / "missing") if f == "MISSING" else f for f in flags]
    line = _refused(_argv(tiny_model_dir, sample_text_file, finished_run, *flags), caplog)
    assert message in line, line


def test_a_resume_on_another_base_model_is_refused_before_loading(finished_run, tiny_model_dir, sample_text_file, tmp_path, no_load, caplog):
    import shutil

    other = tmp_path / "other-model"
    shutil.copytree(tiny_model_dir, other)
    config = json.loads((other / "config.json").read_text())
    config["rms_norm_eps"] = 1e-3  # another model of the same shapes
    (other / "config.json").write_text(json.dumps(config))
    line = _refused(_argv(other, sample_text_file, finished_run, "--resume", str(finished_run), "--rank", "4", "--steps", "3"), caplog)
    assert "another base model" in line


def test_a_resume_on_other_data_or_length_warns(finished_run, tiny_model_dir, sample_text_file, tmp_path, caplog):
    other = tmp_path / "other.txt"
    other.write_text(sample_text_file.read_text())
    with caplog.at_level("WARNING"):
        assert main(_argv(tiny_model_dir, other, finished_run, "--resume", str(finished_run), "--rank", "4", "--steps", "3",
                          "--seq-len", "12")) == 0
    warnings = " ".join(r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    assert "the checkpoint trained on" in warnings and "checkpoint trained at 16" in warnings


def test_the_run_is_described_before_the_model_loads(tiny_model_dir, sample_text_file, tmp_path, monkeypatch, capsys):
    import paca_core.files.assets as assets

    printed_before_load = []
    original = assets.load_model

    def load(*args, **kwargs):
        printed_before_load.append(capsys.readouterr().out)
        return original(*args, **kwargs)

    monkeypatch.setattr(assets, "load_model", load)
    assert main(_argv(tiny_model_dir, sample_text_file, tmp_path / "out", "--rank", "4", "--lr", "2e-3")) == 0
    text = printed_before_load[0]
    for expected in ("paca train: paca r=4", str(tiny_model_dir), "2 steps of 2 x 16 tokens", "lr 0.002", "cosine", "device    cpu",
                     str(tmp_path / "out")):
        assert expected in text, (expected, text)


def test_no_eval_skips_both_evaluations(tiny_model_dir, sample_text_file, tmp_path, monkeypatch):
    import paca_core.train.trainer as trainer

    def never(*args, **kwargs):
        raise AssertionError("evaluated")

    monkeypatch.setattr(trainer.Trainer, "evaluate", never)
    for flags in (["--no-eval"], ["--eval-fraction", "0"]):
        out = tmp_path / flags[0].strip("-")
        assert main(_argv(tiny_model_dir, sample_text_file, out, *flags)) == 0
        metrics = json.loads((out / "metrics.json").read_text())
        assert metrics["held_out_loss_before"] is None and metrics["held_out_loss_after"] is None


def test_a_truncated_weights_file_is_one_line(tiny_model_dir, sample_text_file, tmp_path, caplog):
    import shutil

    broken = tmp_path / "broken-model"
    shutil.copytree(tiny_model_dir, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    line = _refused(_argv(broken, sample_text_file, tmp_path / "out"), caplog)
    assert line.startswith(f"weights file {weights} is corrupt")


def _trainer_at(step, saved):
    return types.SimpleNamespace(state=types.SimpleNamespace(step=step), last_saved_step=saved, checkpoint_dir="runs/x/checkpoint")


def test_the_interrupt_message_never_points_at_a_checkpoint_that_does_not_exist():
    from paca_core.cli.train_command import _interrupted_message

    assert "resume with  paca train --resume runs/x/checkpoint" in _interrupted_message(_trainer_at(7, 7))
    assert "nothing saved since step 4" in _interrupted_message(_trainer_at(7, 4))
    message = _interrupted_message(_trainer_at(7, None))
    assert "nothing was saved" in message and "--resume" not in message


def test_ctrl_c_while_importing_is_not_a_traceback(monkeypatch, capsys):
    import paca_core.cli.dispatch as cli

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "build_parser", interrupted)
    assert cli.main(["train"]) == 130
    assert "Interrupted." in capsys.readouterr().err


@pytest.mark.parametrize("step, per_epoch, epochs", [(1, 24, 0.01), (24, 24, 1.0), (57, 12, 3.5), (228, 228, 1.0), (5, 1, 2.0)])
def test_an_epochs_resume_with_nothing_left_names_epochs_that_train_more(step, per_epoch, epochs):
    import math
    import re

    from paca_core.cli.train_preflight import check_resume_has_work_in_epochs
    from paca_core.errors import PacaConfigError

    args = types.SimpleNamespace(resume="runs/x", steps=0, epochs=epochs)
    with pytest.raises(PacaConfigError) as refused:
        check_resume_has_work_in_epochs(args, {"step": step}, per_epoch, 100)
    message = str(refused.value)
    assert "nothing to train" in message and "\n" not in message and f"--steps above {step}" in message
    suggested = float(re.search(r"e\.g\. --epochs ([0-9.e+-]+)\)", message).group(1))
    assert math.ceil(suggested * per_epoch) > step  # the example it gives does train more
    args.epochs = suggested
    check_resume_has_work_in_epochs(args, {"step": step}, per_epoch, 100)  # accepted
    args.steps = step + 1  # --steps sets the length: the steps rule (before the data is read) applies instead
    args.epochs = epochs
    check_resume_has_work_in_epochs(args, {"step": step}, per_epoch, 100)


def test_an_epochs_resume_with_steps_left_trains_them(tiny_model_dir, sample_text_file, tmp_path):
    out = tmp_path / "run"
    assert main(_argv(tiny_model_dir, sample_text_file, out, "--steps", "1")) == 0
    assert main(_argv(tiny_model_dir, sample_text_file, out, "--resume", str(out), "--steps", "0", "--epochs", "0.1")) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] > 1, metrics.get("steps")
