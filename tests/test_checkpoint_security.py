"""Loading a checkpoint never runs code from it.

Resumable state is safetensors + JSON; paca-hal 0.1.0's ``trainer_state.pt`` (fixture:
tests/fixtures/legacy_checkpoint_0_1_0) is read with ``weights_only=True`` only, and refused unless the
user trusts it when that is not enough; planted pickles never execute, through the Trainer, the CLI or
the Hugging Face Trainer integration.
"""
import json
import logging
import pathlib
import pickle
import random
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from paca_core import MEFTConfig, PaCAConfig, prepare_model
from paca_core.cli.dispatch import main
from paca_core.data.dataset import TokenizedData
from paca_core.errors import CheckpointError
from paca_core.train.trainer import LEGACY_STATE_NAME, STATE_JSON, STATE_NAME, Trainer, TrainingArguments
from paca_core.train import training_state
from paca_core.train.training_state import decode_state, encode_state, read_legacy_pickle, read_training_state

from .conftest import tiny_llama

REPO = Path(__file__).resolve().parents[1]
LEGACY = REPO / "tests" / "fixtures" / "legacy_checkpoint_0_1_0"


class PlantedPayload:
    """Unpickling this touches ``path``: what a malicious checkpoint would do (with worse than touch)."""

    def __init__(self, path):
        self.path = pathlib.Path(path)

    def __reduce__(self):
        return (pathlib.Path.touch, (self.path,))


def _plant(path: Path, marker: Path, zipped: bool = True) -> None:
    """A trainer-state-shaped pickle that creates ``marker`` when unpickled without restrictions."""
    payload = {"optimizer": {}, "trainer": PlantedPayload(marker)}
    if zipped:
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload))


def _legacy_state() -> dict:
    return torch.load(LEGACY / LEGACY_STATE_NAME, map_location="cpu", weights_only=True)


def _copy_legacy(tmp_path: Path) -> Path:
    directory = tmp_path / "legacy"
    shutil.copytree(LEGACY, directory)
    return directory


def _needs_unpickling(state: dict) -> dict:
    """``state`` with one value the restricted loader refuses but which is harmless (a NumPy float)."""
    state["trainer"]["history"][0]["loss"] = np.float64(state["trainer"]["history"][0]["loss"])
    return state


# --- the tiny run the legacy fixture was written from (see its README) ---------------------------------------
def _fixture_trainer(out: Path, steps: int = 4) -> Trainer:
    ids = torch.randint(0, 128, (8, 8), generator=torch.Generator().manual_seed(5))
    data = TokenizedData(input_ids=ids, labels=ids.clone(), attention_mask=torch.ones_like(ids), source="random")
    model = prepare_model(tiny_llama(seed=0), PaCAConfig(r=2, target_modules=["q_proj"], seed=0), device="cpu")
    args = TrainingArguments(output_dir=str(out), max_steps=steps, batch_size=2, lr=1e-2, progress=False, log_every=1)
    return Trainer(model, args, data, torch.device("cpu"))


def _deltas(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {name: layer.paca_delta.detach().clone() for name, layer in trainer.model.adapter_layers().items()}


def _assert_state_restored(trainer: Trainer, saved: dict, checkpoint: Path) -> None:
    """Every part of ``saved`` (a 0.1.0 state) is what ``trainer`` now holds."""
    assert trainer.state.step == saved["trainer"]["step"] == 2
    assert trainer.state.history == saved["trainer"]["history"]
    optimizer = trainer.optimizer.state_dict()
    for index, entry in saved["optimizer"]["state"].items():
        for key, tensor in entry.items():
            assert torch.equal(optimizer["state"][index][key], tensor), (index, key)
    assert trainer.scheduler.state_dict()["last_epoch"] == saved["scheduler"]["last_epoch"]
    assert trainer.scheduler.get_last_lr() == saved["scheduler"]["_last_lr"]
    assert torch.equal(torch.get_rng_state(), saved["rng"]["torch"])
    assert random.getstate() == saved["rng"]["python"]
    adapter = load_file(str(checkpoint / "adapter_model.safetensors"))
    for name, delta in _deltas(trainer).items():
        assert torch.equal(delta, adapter[f"{name}.paca_delta"]), name


# --- the format ---------------------------------------------------------------------------------------------
def test_checkpoint_holds_only_safetensors_and_json(tmp_path):
    trainer = _fixture_trainer(tmp_path / "run", steps=2)
    trainer.train()
    checkpoint = trainer.checkpoint_dir
    assert sorted(p.name for p in checkpoint.iterdir()) == sorted(
        ["adapter_config.json", "adapter_model.safetensors", STATE_JSON, STATE_NAME]
    )
    document = json.loads((checkpoint / STATE_JSON).read_text())
    assert document["format_version"] == 2 and document["step"] == 2 and document["total_steps"] == 2
    python_rng = document["state"]["rng"]["python"]
    assert python_rng["version"] == 3 and len(python_rng["internal"]) == 625 and all(type(v) is int for v in python_rng["internal"])
    numpy_rng = document["state"]["rng"]["numpy"]
    assert numpy_rng["kind"] == "MT19937" and set(load_file(str(checkpoint / STATE_NAME))) >= {numpy_rng["keys"]["__tensor__"]}


def test_a_current_checkpoint_resumes_without_any_unpickling(tmp_path, monkeypatch):
    _fixture_trainer(tmp_path / "run", steps=2).train()

    def no_unpickling(*args, **kwargs):
        raise AssertionError("a current checkpoint must not be unpickled")

    monkeypatch.setattr(torch, "load", no_unpickling)
    monkeypatch.setattr(pickle, "load", no_unpickling)
    monkeypatch.setattr(pickle, "loads", no_unpickling)
    resumed = _fixture_trainer(tmp_path / "run", steps=4)
    resumed.resume_from(tmp_path / "run" / "checkpoint")
    assert resumed.state.step == 2


def test_state_encoding_round_trips_what_optimizers_and_rngs_hold():
    shared = torch.arange(6.0)
    state = {
        "state": {0: {"step": torch.tensor(3.0), "exp_avg": shared}, 1: {"exp_avg": shared[2:]}},  # int keys, shared storage
        "param_groups": [{"betas": (0.9, 0.999), "eps": 1e-8, "fused": None, "params": [0, 1], "nan": float("nan")}],
        "tricky": {"__tuple__": [1, 2]},  # looks like a tag: must come back as this dict
        "rng": {"python": training_state.python_rng_state()},
    }
    document, tensors = encode_state(state)
    decoded = decode_state(json.loads(json.dumps(document)), tensors)
    assert decoded["state"][0]["step"].item() == 3.0 and torch.equal(decoded["state"][1]["exp_avg"], shared[2:])
    assert list(decoded["state"]) == [0, 1] and decoded["param_groups"][0]["betas"] == (0.9, 0.999)
    assert decoded["param_groups"][0]["fused"] is None and decoded["param_groups"][0]["nan"] != decoded["param_groups"][0]["nan"]
    assert decoded["tricky"] == {"__tuple__": [1, 2]}
    assert decoded["rng"] == state["rng"]


@pytest.mark.parametrize("value", [{1, 2}, PlantedPayload("never"), np.zeros(2)], ids=["set", "object", "ndarray"])
def test_saving_refuses_what_would_need_unpickling(value):
    with pytest.raises(CheckpointError, match=r"trainer\.history\.0 is a .*tensors, numbers, strings"):
        encode_state({"trainer": {"history": [value]}})


def test_numpy_scalars_are_saved_as_plain_numbers():
    document, _ = encode_state({"loss": np.float32(0.5), "count": np.int64(3)})
    assert json.loads(json.dumps(document)) == {"loss": 0.5, "count": 3}
    assert type(document["loss"]) is float and type(document["count"]) is int


def test_rng_states_are_restored_from_plain_data():
    random.seed(1), np.random.seed(1)
    python_state, numpy_state = training_state.python_rng_state(), training_state.numpy_rng_state()
    expected = (random.random(), np.random.rand())
    random.seed(2), np.random.seed(2)
    training_state.restore_python_rng(json.loads(json.dumps(python_state)))
    training_state.restore_numpy_rng(numpy_state)
    assert (random.random(), np.random.rand()) == expected
    with pytest.raises(CheckpointError, match="Python RNG state is invalid"):
        training_state.restore_python_rng({"version": 3, "internal": ["os.system"], "gauss_next": None})


def test_a_tampered_state_file_is_reported_as_corrupt(tmp_path):
    _fixture_trainer(tmp_path / "run", steps=2).train()
    checkpoint = tmp_path / "run" / "checkpoint"
    document = json.loads((checkpoint / STATE_JSON).read_text())
    document["state"]["rng"]["torch"] = {"__tensor__": "missing"}
    (checkpoint / STATE_JSON).write_text(json.dumps(document))
    with pytest.raises(CheckpointError, match="'missing', which is not in trainer_state.safetensors"):
        _fixture_trainer(tmp_path / "run").resume_from(checkpoint)
    (checkpoint / STATE_NAME).write_bytes(b"not safetensors")
    with pytest.raises(CheckpointError, match="corrupt"):
        _fixture_trainer(tmp_path / "run").resume_from(checkpoint)


def _method_configs(name: str):
    from paca_core import LoRAConfig, LoRAFAConfig, VeLoRAConfig

    if name == "qpaca":
        pytest.importorskip("bitsandbytes")
    return {
        "paca": [PaCAConfig(r=2)],
        "lora": [LoRAConfig(r=2)],
        "lorafa": [LoRAFAConfig(r=2)],
        "lora+velora": [LoRAConfig(r=2), VeLoRAConfig(num_groups=4)],
        "meft": [MEFTConfig(num_rows=32, top_k=4)],
        "qpaca": [PaCAConfig(r=2, quantize="nf4")],
    }[name]


@pytest.mark.parametrize("method", ["paca", "lora", "lorafa", "lora+velora", "meft", "qpaca"])
def test_every_method_resumes_bit_exactly_from_safetensors_and_json(method, tmp_path):
    """Interrupted after step 2 of 4 and resumed from the new format equals 4 straight steps, bit for bit."""

    def trainer(out):
        ids = torch.randint(0, 128, (8, 8), generator=torch.Generator().manual_seed(5))
        data = TokenizedData(input_ids=ids, labels=ids.clone(), attention_mask=torch.ones_like(ids), source="random")
        model = prepare_model(tiny_llama(seed=0), _method_configs(method), device="cpu")
        args = TrainingArguments(output_dir=str(out), max_steps=4, batch_size=2, lr=1e-2, progress=False, log_every=1)
        return Trainer(model, args, data, torch.device("cpu"))

    def weights(t):
        state = {k: v.detach().clone() for k, v in t.model.state_dict().items() if v.dtype.is_floating_point}
        for name, layer_state in t.model.host_optimizer_state().items():  # MEFT: rows and moments in host memory
            state.update({f"{name}.host.{k}": v.clone() for k, v in layer_state.items()})
        return state

    straight = trainer(tmp_path / "a")
    straight.train()
    first = trainer(tmp_path / "b")

    def stop_after_second_step(optimizer, args, kwargs):
        if first.state.step == 1:
            first._stop_requested = True

    first.optimizer.register_step_post_hook(stop_after_second_step)
    with pytest.raises(KeyboardInterrupt):
        first.train()
    assert not (tmp_path / "b" / "checkpoint" / LEGACY_STATE_NAME).exists()
    resumed = trainer(tmp_path / "b")
    resumed.resume_from(tmp_path / "b" / "checkpoint")
    assert resumed.state.step == 2
    resumed.train()
    expected = weights(straight)
    got = weights(resumed)
    assert got.keys() == expected.keys()
    for key, tensor in expected.items():
        assert torch.equal(got[key], tensor), key
    assert [r["loss"] for r in resumed.state.history] == [r["loss"] for r in straight.state.history]


# --- paca-hal 0.1.0 checkpoints --------------------------------------------------------------------------------
@pytest.mark.skipif(not training_state.restricted_loader_is_sound(), reason="torch < 2.10 refuses 0.1.0 pickles unless trusted")
def test_legacy_checkpoint_resumes_with_the_restricted_loader_and_is_rewritten(tmp_path):
    """0.1.0 state is plain data: it loads under weights_only=True (torch >= 2.10) without the flag, restores
    everything, and continuing from it equals continuing from its safetensors + JSON rewrite."""
    legacy = _copy_legacy(tmp_path)
    resumed = _fixture_trainer(tmp_path / "a")
    resumed.resume_from(legacy)
    _assert_state_restored(resumed, _legacy_state(), legacy)

    rewritten = resumed.save_checkpoint(tmp_path / "rewritten")
    assert not (rewritten / LEGACY_STATE_NAME).exists() and (rewritten / STATE_NAME).is_file()
    resumed.train()
    again = _fixture_trainer(tmp_path / "b")
    again.resume_from(rewritten)
    again.train()
    expected = _deltas(resumed)
    for name, delta in _deltas(again).items():
        assert torch.equal(delta, expected[name]), name
    losses = [(r["step"], r["loss"], r["lr"]) for r in resumed.state.history]
    assert [(r["step"], r["loss"], r["lr"]) for r in again.state.history] == losses  # timings differ, nothing else


def test_legacy_checkpoint_is_refused_without_the_flag_where_the_restricted_loader_is_unsound(tmp_path, monkeypatch):
    """On torch < 2.10, weights_only=True has published bypasses: the fixture needs --trust-checkpoint there."""
    monkeypatch.setattr(training_state, "restricted_loader_is_sound", lambda: False)
    legacy = _copy_legacy(tmp_path)
    refused = _fixture_trainer(tmp_path / "a")
    untouched = _deltas(refused)
    with pytest.raises(CheckpointError, match=re.escape(f"`paca train --resume {legacy} --trust-checkpoint`")) as error:
        refused.resume_from(legacy)
    assert "CVE-2026-24747" in str(error.value)
    assert refused.state.step == 0 and all(torch.equal(d, untouched[n]) for n, d in _deltas(refused).items())  # nothing half-loaded

    trusted = _fixture_trainer(tmp_path / "b")
    trusted.resume_from(legacy, trust_checkpoint=True)
    _assert_state_restored(trusted, _legacy_state(), legacy)


def test_legacy_checkpoint_needing_unpickling_is_refused_unless_trusted(tmp_path):
    legacy = _copy_legacy(tmp_path)
    torch.save(_needs_unpickling(_legacy_state()), legacy / LEGACY_STATE_NAME)
    with pytest.raises(CheckpointError) as error:
        _fixture_trainer(tmp_path / "a").resume_from(legacy)
    message = str(error.value)
    assert "cannot be read safely" in message and f"`paca train --resume {legacy} --trust-checkpoint`" in message

    trusted = _fixture_trainer(tmp_path / "b")
    trusted.resume_from(legacy, trust_checkpoint=True)
    _assert_state_restored(trusted, _legacy_state(), legacy)


@pytest.mark.parametrize("zipped", [True, False], ids=["torch.save", "raw-pickle"])
def test_planted_trainer_state_is_refused_and_never_runs(tmp_path, zipped):
    legacy = _copy_legacy(tmp_path)
    marker = tmp_path / "pwned"
    _plant(legacy / LEGACY_STATE_NAME, marker, zipped)
    trainer = _fixture_trainer(tmp_path / "a")
    with pytest.raises(CheckpointError, match="cannot be read safely.*--trust-checkpoint" if zipped else "not a torch checkpoint archive"):
        trainer.resume_from(legacy)
    assert not marker.exists()
    if zipped:  # the payload is live: trusting the file really does unpickle it
        read_legacy_pickle(legacy / LEGACY_STATE_NAME, trusted=True, trust_hint="")
        assert marker.exists()


# --- the CLI -----------------------------------------------------------------------------------------------------
def _cli_flags(model_dir, data, out, steps):
    return [
        "train", "--device", "cpu", "--model", str(model_dir), "--data", str(data), "--out", str(out), "--steps", str(steps),
        "--seq-len", "16", "--batch-size", "2", "--rank", "4", "--lr", "1e-2", "--warmup-steps", "0",
        "--sample-tokens", "0", "--no-progress",
    ]


def _drop_current_state(checkpoint: Path) -> None:
    (checkpoint / STATE_NAME).unlink()
    (checkpoint / STATE_JSON).unlink()


def _in_legacy_layout(state: dict) -> dict:
    """A current state as 0.1.0 held it: Python's RNG as random.getstate()'s tuple, no NumPy RNG."""
    python = state["rng"]["python"]
    state["rng"] = {"torch": state["rng"]["torch"], "python": (python["version"], tuple(python["internal"]), python["gauss_next"])}
    return state


def test_cli_refuses_planted_and_untrusted_legacy_state_and_resumes_with_trust_checkpoint(
    tiny_model_dir, sample_text_file, tmp_path, caplog
):
    out = tmp_path / "run"
    assert main(_cli_flags(tiny_model_dir, sample_text_file, out, 2)) == 0
    checkpoint = out / "checkpoint"
    state = _in_legacy_layout(read_training_state(checkpoint))
    marker = tmp_path / "pwned"
    _drop_current_state(checkpoint)
    _plant(checkpoint / LEGACY_STATE_NAME, marker)
    with caplog.at_level(logging.ERROR):
        assert main(_cli_flags(tiny_model_dir, sample_text_file, out, 4) + ["--resume", str(out)]) == 2
    assert not marker.exists() and "--trust-checkpoint" in caplog.text and "cannot be read safely" in caplog.text

    torch.save(_needs_unpickling(state), checkpoint / LEGACY_STATE_NAME)
    caplog.clear()
    with caplog.at_level(logging.ERROR):
        assert main(_cli_flags(tiny_model_dir, sample_text_file, out, 4) + ["--resume", str(out)]) == 2
    assert f"paca train --resume {checkpoint} --trust-checkpoint" in caplog.text
    assert main(_cli_flags(tiny_model_dir, sample_text_file, out, 4) + ["--resume", str(out), "--trust-checkpoint"]) == 0
    assert read_training_state(checkpoint)["trainer"]["step"] == 4
    assert not (checkpoint / LEGACY_STATE_NAME).exists()  # the next save rewrote it as safetensors + JSON


# --- the Hugging Face Trainer integration ---------------------------------------------------------------------
class _Rows(torch.utils.data.Dataset):
    def __init__(self, n=16, length=12):
        gen = torch.Generator().manual_seed(0)
        self.rows = [torch.randint(0, 100, (length,), generator=gen) for _ in range(n)]

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return {"input_ids": self.rows[i], "attention_mask": torch.ones_like(self.rows[i]), "labels": self.rows[i]}


def _hf_trainer(out: Path, steps: int):
    from transformers import TrainingArguments as HFArguments

    from paca_core.integrations.transformers import PacaTrainer

    args = HFArguments(
        output_dir=str(out), max_steps=steps, per_device_train_batch_size=4, learning_rate=1e-2, save_steps=2,
        report_to=[], use_cpu=True, seed=0, lr_scheduler_type="constant",
    )
    model = prepare_model(tiny_llama(seed=0), MEFTConfig(num_rows=64, top_k=4), device="cpu")
    return PacaTrainer(model=model, args=args, train_dataset=_Rows()), model


@pytest.fixture
def meft_hf_checkpoint(tmp_path):
    from paca_core.integrations.transformers import HOST_STATE_NAME
    from paca_core.train.training_state import read_host_state

    trainer, _ = _hf_trainer(tmp_path / "run", steps=2)
    trainer.train()
    checkpoint = tmp_path / "run" / "checkpoint-2"
    assert HOST_STATE_NAME.endswith(".safetensors")
    return checkpoint, read_host_state(checkpoint / HOST_STATE_NAME)


def _to_legacy_host_state(checkpoint: Path, state) -> Path:
    from paca_core.integrations.transformers import HOST_STATE_NAME, LEGACY_HOST_STATE_NAME

    (checkpoint / HOST_STATE_NAME).unlink()
    torch.save(state, checkpoint / LEGACY_HOST_STATE_NAME)
    return checkpoint / LEGACY_HOST_STATE_NAME


def _record_host_state_loads(model) -> list:
    """What the trainer hands ``model.load_host_optimizer_state`` (the run then goes on training)."""
    loaded, original = [], model.load_host_optimizer_state

    def record(state):
        loaded.append({layer: {k: v.clone() for k, v in entries.items()} for layer, entries in state.items()})
        return original(state)

    model.load_host_optimizer_state = record
    return loaded


def _assert_same_host_state(got, expected) -> None:
    assert got.keys() == expected.keys()
    for layer, entries in expected.items():
        assert got[layer].keys() == entries.keys()
        for key, tensor in entries.items():
            assert torch.equal(got[layer][key], tensor), (layer, key)


def test_hf_trainer_refuses_a_planted_host_state(meft_hf_checkpoint, tmp_path):
    checkpoint, _ = meft_hf_checkpoint
    legacy = _to_legacy_host_state(checkpoint, {})
    marker = tmp_path / "pwned"
    _plant(legacy, marker)
    trainer, _ = _hf_trainer(tmp_path / "run", steps=2)
    with pytest.raises(CheckpointError, match=r"cannot be read safely.*trust_checkpoint=True"):
        trainer.train(resume_from_checkpoint=str(checkpoint))
    assert not marker.exists()


def test_hf_trainer_resumes_legacy_host_state_safely_or_with_trust(meft_hf_checkpoint, tmp_path, monkeypatch):
    checkpoint, host_state = meft_hf_checkpoint
    _to_legacy_host_state(checkpoint, host_state)
    if training_state.restricted_loader_is_sound():
        trainer, model = _hf_trainer(tmp_path / "safe", steps=3)
        loaded = _record_host_state_loads(model)
        trainer.train(resume_from_checkpoint=str(checkpoint))
        assert len(loaded) == 1
        _assert_same_host_state(loaded[0], host_state)

    monkeypatch.setattr(training_state, "restricted_loader_is_sound", lambda: False)
    trainer, model = _hf_trainer(tmp_path / "refused", steps=3)
    loaded = _record_host_state_loads(model)
    with pytest.raises(CheckpointError, match=re.escape("trainer.train(resume_from_checkpoint=..., trust_checkpoint=True)")):
        trainer.train(resume_from_checkpoint=str(checkpoint))
    assert loaded == []
    trainer, model = _hf_trainer(tmp_path / "trusted", steps=3)
    loaded = _record_host_state_loads(model)
    trainer.train(resume_from_checkpoint=str(checkpoint), trust_checkpoint=True)
    assert len(loaded) == 1
    _assert_same_host_state(loaded[0], host_state)


# --- the library as a whole -------------------------------------------------------------------------------------
def test_library_code_never_unpickles_without_restriction():
    pattern = re.compile(r"weights_only *= *False|pickle\.loads?\(|pickle\.Unpickler")
    hits = [
        f"{path.relative_to(REPO)}:{number}: {line.strip()}"
        for folder in ("devices", "backends", "paca_core")
        for path in sorted((REPO / folder).rglob("*.py"))
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert hits == []
