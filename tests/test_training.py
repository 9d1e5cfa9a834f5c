"""The main job on a tiny model: CLI, checkpoints, resume, Ctrl-C, merge, bad inputs."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from paca_core import CheckpointError, PaCAConfig, PacaModel, prepare_model
from paca_core.cli.dispatch import main
from paca_core.data.dataset import IGNORE_INDEX, DataError, load_dataset, split_held_out
from paca_core.train.trainer import STATE_NAME, Trainer, TrainingArguments
from paca_core.train.training_state import read_training_state


REPO = Path(__file__).resolve().parents[1]


def _load(tiny_model_dir):
    from paca_core.files.assets import load_model_and_tokenizer

    return load_model_and_tokenizer(str(tiny_model_dir))


def _train_flags(tiny_model_dir, data, out, steps=4, *extra):
    return [
        "train", "--device", "cpu", "--model", str(tiny_model_dir), "--data", str(data), "--out", str(out),
        "--steps", str(steps), "--seq-len", "16", "--batch-size", "2", "--rank", "4", "--lr", "1e-2",
        "--warmup-steps", "0", "--log-every", "1", "--sample-tokens", "4", "--no-progress", *extra,
    ]


def test_cli_train_writes_adapter_metrics_and_learns(tiny_model_dir, sample_text_file, tmp_path):
    out = tmp_path / "run"
    assert main(_train_flags(tiny_model_dir, sample_text_file, out, 12)) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 12 and metrics["device"] == "cpu"
    assert metrics["held_out_loss_after"] < metrics["held_out_loss_before"]  # repetitive text: must learn
    assert metrics["sample_before"] is not None and metrics["sample_after"] is not None
    assert len(metrics["history"]) == 12 and all(r["tokens_per_s"] > 0 for r in metrics["history"])
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert (out / "checkpoint" / STATE_NAME).is_file()

    # The saved adapter reproduces the trained model's outputs in a fresh process-like load.
    model, _ = _load(tiny_model_dir)
    loaded = PacaModel.from_pretrained(model, out / "adapter", device="cpu")
    saved_config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert saved_config["method"] == "paca" and saved_config["configs"][0]["r"] == 4 and "library_version" in saved_config
    assert all(not p.requires_grad for p in loaded.parameters())
    assert any(layer.paca_delta.abs().sum() > 0 for layer in loaded.adapter_layers().values())


def test_jsonl_prompt_response_masks_prompt(tiny_model_dir, tmp_path):
    _, tokenizer = _load(tiny_model_dir)
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": "what is the", "response": "answer is fair"}) for _ in range(8)) + "\n")
    data = load_dataset(path, tokenizer, seq_len=12)
    assert data.input_ids.shape == (8, 12)
    first = data.labels[0]
    prompt_len = len(tokenizer("what is the\n", add_special_tokens=False)["input_ids"])
    assert (first[:prompt_len] == IGNORE_INDEX).all() and (first[prompt_len] != IGNORE_INDEX)
    assert data.attention_mask[0].sum() < 12  # padded
    out = tmp_path / "run"
    assert main(_train_flags(tiny_model_dir, path, out, 2)) == 0


@pytest.mark.parametrize(
    "content, suffix, message",
    [
        ('{"text": "ok"}\nnot json\n', ".jsonl", r":2 is not valid JSON"),
        ('{"question": "x"}\n', ".jsonl", r"neither a 'text'"),
        ("<a/>", ".xml", "unsupported data format"),
        ("short", ".txt", "fewer than one block"),
    ],
)
def test_bad_data_gets_specific_errors(tiny_model_dir, tmp_path, content, suffix, message):
    _, tokenizer = _load(tiny_model_dir)
    path = tmp_path / f"data{suffix}"
    path.write_text(content)
    with pytest.raises(DataError, match=message):
        load_dataset(path, tokenizer, seq_len=16)
    with pytest.raises(DataError, match="does not exist"):
        load_dataset(tmp_path / "missing.txt", tokenizer, seq_len=16)


def _trainer(tiny_model_dir, text_file, out, steps):
    model, tokenizer = _load(tiny_model_dir)
    torch.manual_seed(0)
    paca = prepare_model(model, PaCAConfig(r=4, seed=1), device="cpu")
    data, _ = split_held_out(load_dataset(text_file, tokenizer, 16), 0.1, 0)
    args = TrainingArguments(output_dir=str(out), max_steps=steps, batch_size=2, grad_accum=2, lr=1e-2, warmup_steps=2, progress=False, log_every=1)
    return Trainer(paca, args, data, torch.device("cpu"))


def test_resume_after_interrupt_gives_identical_weights(tiny_model_dir, sample_text_file, tmp_path):
    straight = _trainer(tiny_model_dir, sample_text_file, tmp_path / "a", steps=6)
    straight.train()

    interrupted = _trainer(tiny_model_dir, sample_text_file, tmp_path / "b", steps=6)

    def interrupt_during_third_step(optimizer, args, kwargs):
        if interrupted.state.step == 2:  # Ctrl-C arrives while the third step runs
            interrupted._stop_requested = True

    interrupted.optimizer.register_step_post_hook(interrupt_during_third_step)
    with pytest.raises(KeyboardInterrupt):
        interrupted.train()
    assert interrupted.state.step == 3

    resumed = _trainer(tiny_model_dir, sample_text_file, tmp_path / "b", steps=6)
    resumed.resume_from(tmp_path / "b" / "checkpoint")
    assert resumed.state.step == 3
    resumed.train()
    expected = {n: l.paca_delta for n, l in straight.model.adapter_layers().items()}
    for name, layer in resumed.model.adapter_layers().items():
        assert torch.equal(layer.paca_delta, expected[name]), name
    assert resumed.state.history[-1]["loss"] == straight.state.history[-1]["loss"]


@pytest.mark.slow
def test_sigint_saves_checkpoint_and_exits_130(tiny_model_dir, sample_text_file, tmp_path):
    out = tmp_path / "run"
    flags = _train_flags(tiny_model_dir, sample_text_file, out, 100000)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen([sys.executable, "-m", "paca_core", *flags], cwd=REPO, env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    lines = []
    for line in process.stderr:  # wait until training has started
        lines.append(line)
        if "Held-out loss before" in line or time.time() > deadline:
            break
    time.sleep(1.0)
    process.send_signal(signal.SIGINT)
    _, rest = process.communicate(timeout=120)
    assert process.returncode == 130, "".join(lines) + rest
    assert "checkpoint saved" in rest
    state = read_training_state(out / "checkpoint")
    assert state["trainer"]["step"] >= 1


def test_interrupted_save_keeps_previous_checkpoint(tiny_model_dir, sample_text_file, tmp_path, monkeypatch):
    trainer = _trainer(tiny_model_dir, sample_text_file, tmp_path / "c", steps=2)
    trainer.train()
    before = (trainer.checkpoint_dir / "adapter_model.safetensors").read_bytes()
    import paca_core.train.trainer as trainer_module

    def broken_save(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(trainer_module, "write_training_state", broken_save)
    with pytest.raises(OSError):
        trainer.save_checkpoint()
    assert (trainer.checkpoint_dir / "adapter_model.safetensors").read_bytes() == before
    assert (trainer.checkpoint_dir / STATE_NAME).is_file()
    assert not [p for p in trainer.checkpoint_dir.parent.iterdir() if p.name.startswith(".checkpoint")]


def _saved_adapter(tiny_model_dir, tmp_path):
    model, _ = _load(tiny_model_dir)
    paca = prepare_model(model, PaCAConfig(r=4), device="cpu")
    return paca.save_pretrained(tmp_path / "adapter")


def test_bad_checkpoints_name_the_problem(tiny_model_dir, tmp_path):
    adapter = _saved_adapter(tiny_model_dir, tmp_path)

    def load_into(model=None, directory=adapter):
        if model is None:
            model, _ = _load(tiny_model_dir)
        return PacaModel.from_pretrained(model, directory, device="cpu")

    from .conftest import tiny_llama

    with pytest.raises(CheckpointError, match=r"is \d+→\d+ in the checkpoint but \d+→48 in this model; it was trained on a different base model"):
        load_into(tiny_llama(hidden_size=48, intermediate_size=64, vocab_size=59))
    with pytest.raises(CheckpointError, match="does not exist"):
        load_into(directory=tmp_path / "nowhere")

    config_path = adapter / "adapter_config.json"
    good_config = config_path.read_text()
    config = json.loads(good_config)
    config["method"] = "lora"
    config_path.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="says method 'lora' but its configs are 'paca'"):
        load_into()
    config["method"] = "dora"
    config["configs"][0]["method"] = "dora"
    config_path.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="Unknown method 'dora'"):
        load_into()
    config_path.write_text("{ not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_into()
    config_path.write_text(good_config)

    weights = adapter / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_into()
    weights.unlink()
    with pytest.raises(CheckpointError, match="adapter_model.safetensors is missing"):
        load_into()


def test_resume_refuses_a_different_config(tiny_model_dir, sample_text_file, tmp_path):
    trainer = _trainer(tiny_model_dir, sample_text_file, tmp_path / "d", steps=1)
    trainer.train()
    model, _ = _load(tiny_model_dir)
    other = prepare_model(model, PaCAConfig(r=2, seed=1), device="cpu")
    other_trainer = Trainer(other, trainer.args, trainer.train_data, torch.device("cpu"))
    with pytest.raises(CheckpointError, match="r: checkpoint 4 vs now 2"):
        other_trainer.resume_from(tmp_path / "d")


def test_cli_merge_writes_plain_model_with_same_outputs(tiny_model_dir, sample_text_file, tmp_path):
    out = tmp_path / "run"
    assert main(_train_flags(tiny_model_dir, sample_text_file, out, 3)) == 0
    merged_dir = tmp_path / "merged"
    assert main(["merge", "--adapter", str(out / "adapter"), "--model", str(tiny_model_dir), "--out", str(merged_dir)]) == 0
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(merged_dir)
    model, _ = _load(tiny_model_dir)
    adapted = PacaModel.from_pretrained(model, out / "adapter", device="cpu")
    ids = torch.randint(0, 50, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, adapted(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_cli_rejects_bad_values_before_loading(tmp_path, caplog):
    assert main(["train", "--rank", "0", "--out", str(tmp_path)]) == 2
    assert "positive integer" in caplog.text
    assert main(["train", "--device", "tpu", "--out", str(tmp_path)]) == 2
    assert "valid devices" in caplog.text
    assert main(["train", "--model", "meta-llama/Llama-3-8B", "--device", "cpu", "--out", str(tmp_path)]) == 2


def test_cli_export_peft_loads_in_peft_with_same_outputs(tiny_model_dir, sample_text_file, tmp_path):
    peft = pytest.importorskip("peft")
    out = tmp_path / "run"
    assert main(_train_flags(tiny_model_dir, sample_text_file, out, 3)) == 0
    lora_dir = tmp_path / "lora"
    assert main(["export-peft", "--adapter", str(out / "adapter"), "--model", str(tiny_model_dir), "--out", str(lora_dir)]) == 0
    base, _ = _load(tiny_model_dir)
    peft_model = peft.PeftModel.from_pretrained(base, lora_dir)
    model, _ = _load(tiny_model_dir)
    adapted = PacaModel.from_pretrained(model, out / "adapter", device="cpu")
    ids = torch.randint(0, 50, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(peft_model(input_ids=ids).logits, adapted(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["lora", "lorafa", "velora", "lora+velora", "paca+full+velora"])
def test_cli_trains_every_method(tiny_model_dir, sample_text_file, tmp_path, method):
    out = tmp_path / method
    extra = ["--method", method, "--sample-tokens", "0"] + (["--velora-groups", "4"] if "velora" in method else [])
    if "full" in method:
        extra += ["--full-modules", "down_proj"]
    assert main(_train_flags(tiny_model_dir, sample_text_file, out, 3, *extra)) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    expected = "lora+velora" if method == "velora" else method
    assert metrics["method"] == expected
    model, _ = _load(tiny_model_dir)
    loaded = PacaModel.from_pretrained(model, out / "adapter", device="cpu")
    assert loaded.method == expected


def test_cli_rejects_bad_method_combinations(tmp_path, caplog):
    assert main(["train", "--method", "dora", "--out", str(tmp_path)]) == 2
    assert "is not valid" in caplog.text
    assert main(["train", "--method", "paca+full", "--out", str(tmp_path)]) == 2
    assert "--full-modules" in caplog.text


def test_cli_defaults_are_parameter_matched_per_method():
    from paca_core.cli.dispatch import build_configs, build_parser
    from paca_core.flags.train_options import default_lr_for as _default_lr

    def configs_for(*flags):
        return build_configs(build_parser().parse_args(["train", *flags]))

    paca = configs_for("--method", "paca")
    lora = configs_for("--method", "lora+velora")
    assert paca[0].r == 16 and lora[0].r == 8 and lora[1].method == "velora"
    assert _default_lr(paca) == 5e-3 and _default_lr(lora) == 5e-3  # docs/methods.md: scripts/lr_sweep.py's rule
    # Above the default rank the lr shrinks: PaCA as 16/r (at r=64, 5e-3 fell off a cliff on one data set),
    # LoRA as sqrt(8/r) (its best lr fell 2.5x from r=8 to r=32); below it, it stays.
    assert _default_lr(configs_for("--method", "paca", "--rank", "64")) == pytest.approx(1.25e-3)
    assert _default_lr(configs_for("--method", "lora", "--rank", "32")) == pytest.approx(2.5e-3)
    assert _default_lr(configs_for("--method", "lorafa")) == 5e-3  # chosen by the same rule (docs/methods.md)
    assert _default_lr(configs_for("--method", "paca", "--rank", "4")) == 5e-3
    assert configs_for("--method", "lorafa", "--rank", "4")[0].r == 4
    assert configs_for("--method", "paca+full+velora", "--full-modules", "down_proj")[0].exclude_modules == ["down_proj"]
