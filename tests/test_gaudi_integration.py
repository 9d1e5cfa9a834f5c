"""The optimum-habana integration (paca_core/integrations/gaudi.py), tested without optimum-habana.

optimum-habana cannot be imported here (it needs Intel's habana_frameworks). A STAND-IN for the
``optimum.habana`` module is installed into ``sys.modules`` for each test:

* ``GaudiTrainer`` — the real ``transformers.Trainer`` plus optimum-habana's extra ``gaudi_config``
  argument, with the keyword names of optimum-habana's ``GaudiTrainer.__init__`` (checked against
  optimum/habana/transformers/trainer.py, main 1d8504c); it records the arguments it got;
* ``GaudiTrainingArguments`` — ``transformers.TrainingArguments`` plus ``use_habana``,
  ``use_lazy_mode`` (default True, as in optimum-habana) and ``gaudi_config_name``;
* ``GaudiConfig`` — records its keyword arguments and saves them as ``gaudi_config.json``.

So the real HF training loop runs on CPU through our subclass: checkpoints, resume and evaluation are
exercised for real; only the Gaudi-specific parts of optimum-habana are absent.
"""
import dataclasses
import importlib.util
import json
import sys
import types
from pathlib import Path

import pytest
import torch

pytest.importorskip("accelerate")
import transformers  # noqa: E402

import paca_core.integrations.gaudi as gaudi  # noqa: E402
from paca_core import PaCAConfig, PacaModel  # noqa: E402
from paca_core.files.checkpoint import read_adapter_tensors  # noqa: E402

from .conftest import tiny_llama  # noqa: E402


class StandInGaudiConfig:
    """Stand-in for optimum.habana.GaudiConfig (records kwargs; save_pretrained writes them)."""

    def __init__(self, **kwargs):
        self.kwargs = kwargs

    def save_pretrained(self, directory):
        Path(directory, "gaudi_config.json").write_text(json.dumps(self.kwargs))


@dataclasses.dataclass
class StandInGaudiTrainingArguments(transformers.TrainingArguments):
    """Stand-in for optimum.habana.GaudiTrainingArguments: the fields our integration reads."""

    use_habana: bool = False
    use_lazy_mode: bool = True
    gaudi_config_name: str | None = None


class StandInGaudiTrainer(transformers.Trainer):
    """Stand-in for optimum.habana.GaudiTrainer: HF's Trainer with the ``gaudi_config`` argument."""

    received: list = []

    def __init__(self, model=None, gaudi_config=None, args=None, data_collator=None, train_dataset=None,
                 eval_dataset=None, processing_class=None, model_init=None, compute_loss_func=None,
                 compute_metrics=None, callbacks=None, optimizers=(None, None), optimizer_cls_and_kwargs=None,
                 preprocess_logits_for_metrics=None):
        StandInGaudiTrainer.received.append({"model": model, "gaudi_config": gaudi_config, "args": args, "callbacks": callbacks})
        self.gaudi_config = gaudi_config
        super().__init__(model=model, args=args, data_collator=data_collator, train_dataset=train_dataset,
                         eval_dataset=eval_dataset, processing_class=processing_class, callbacks=callbacks)


class StandInPacaCallback(transformers.TrainerCallback):
    """Used only while paca_core/integrations/transformers.py (another change) is not in the tree."""


@pytest.fixture
def optimum_habana(monkeypatch):
    module = types.ModuleType("optimum.habana")
    module.GaudiTrainer, module.GaudiConfig = StandInGaudiTrainer, StandInGaudiConfig
    module.GaudiTrainingArguments = StandInGaudiTrainingArguments
    monkeypatch.setitem(sys.modules, "optimum.habana", module)
    if importlib.util.find_spec("paca_core.integrations.transformers") is None:
        monkeypatch.setitem(
            sys.modules, "paca_core.integrations.transformers", types.SimpleNamespace(PacaCallback=StandInPacaCallback)
        )
    monkeypatch.setattr(gaudi, "_TRAINER_CLASS", None)
    StandInGaudiTrainer.received.clear()
    return module


class _Rows(torch.utils.data.Dataset):
    def __init__(self, n=16, length=8):
        gen = torch.Generator().manual_seed(0)
        self.rows = [torch.randint(0, 128, (length,), generator=gen) for _ in range(n)]

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return {"input_ids": self.rows[i], "attention_mask": torch.ones_like(self.rows[i]), "labels": self.rows[i]}


def _args(tmp_path, **overrides):
    values = dict(output_dir=str(tmp_path / "out"), max_steps=4, per_device_train_batch_size=4, learning_rate=5e-3,
                  save_steps=2, logging_steps=1, report_to=[], use_cpu=True, use_lazy_mode=False, disable_tqdm=True)
    values.update(overrides)
    return StandInGaudiTrainingArguments(**values)


def test_two_line_integration_trains_saves_and_resumes(optimum_habana, tmp_path):
    args = _args(tmp_path)
    model = gaudi.prepare_for_gaudi_trainer(tiny_llama(), PaCAConfig(r=4), args)
    assert isinstance(model, PacaModel) and next(model.parameters()).device.type == "cpu"
    trainer = gaudi.PacaGaudiTrainer(model=model, args=args, train_dataset=_Rows(), eval_dataset=_Rows(4))

    received = StandInGaudiTrainer.received[0]
    assert received["gaudi_config"].kwargs == {"use_fused_adam": True, "use_fused_clip_norm": True}
    callback_type = sys.modules["paca_core.integrations.transformers"].PacaCallback
    assert sum(isinstance(c, callback_type) for c in received["callbacks"]) == 1
    assert trainer.label_names == ["labels"]

    trainer.train()
    checkpoint = Path(args.output_dir) / "checkpoint-2"
    for name in ("adapter_model.safetensors", "adapter_config.json", "gaudi_config.json", "training_args.bin"):
        assert (checkpoint / name).is_file(), name
    assert not (checkpoint / "model.safetensors").exists()  # the adapter, not a copy of the base model
    assert "eval_loss" in trainer.evaluate()  # labels found through the wrapped model's forward

    trainer.save_model()
    final = Path(args.output_dir)
    reloaded = PacaModel.from_pretrained(tiny_llama(), final)
    for (name, layer), (_, other) in zip(model.adapter_layers().items(), reloaded.adapter_layers().items()):
        assert layer.paca_delta.abs().sum() > 0, name
        torch.testing.assert_close(layer.paca_delta, other.paca_delta)

    # Resume from step 2 in a fresh process-like setting: the adapter comes back from the checkpoint.
    saved_at_2 = read_adapter_tensors(checkpoint)
    fresh = gaudi.prepare_for_gaudi_trainer(tiny_llama(), PaCAConfig(r=4), args)
    resumed = gaudi.PacaGaudiTrainer(model=fresh, args=args, train_dataset=_Rows())
    resumed._load_from_checkpoint(str(checkpoint))
    key = next(iter(saved_at_2))
    module_name, tensor_name = key.rsplit(".", 1)
    torch.testing.assert_close(getattr(fresh.adapter_layers()[module_name], tensor_name).detach(), saved_at_2[key])


def test_user_gaudi_config_and_callbacks_are_kept(optimum_habana, tmp_path):
    args = _args(tmp_path)
    config = StandInGaudiConfig(use_fused_adam=False)
    model = gaudi.prepare_for_gaudi_trainer(tiny_llama(), PaCAConfig(r=4), args)
    extra = transformers.TrainerCallback()
    gaudi.PacaGaudiTrainer(model=model, gaudi_config=config, args=args, callbacks=[extra], train_dataset=_Rows())
    received = StandInGaudiTrainer.received[0]
    assert received["gaudi_config"] is config and received["callbacks"][0] is extra and len(received["callbacks"]) == 2


def test_lazy_mode_request_must_match_the_environment(optimum_habana, monkeypatch, tmp_path):
    monkeypatch.setenv("PT_HPU_LAZY_MODE", "0")
    args = types.SimpleNamespace(use_habana=True, use_lazy_mode=True, gradient_checkpointing=False)
    with pytest.raises(gaudi.devices.DeviceUnavailableError, match="PT_HPU_LAZY_MODE=1"):
        gaudi.prepare_for_gaudi_trainer(tiny_llama(), PaCAConfig(r=4), args)


def test_hpu_requested_without_gaudi_says_what_to_do(optimum_habana, monkeypatch):
    if "hpu" in gaudi.devices.available_device_types():
        pytest.skip("a Gaudi is present")
    monkeypatch.setenv("PT_HPU_LAZY_MODE", "1")
    args = types.SimpleNamespace(use_habana=True, use_lazy_mode=True, gradient_checkpointing=False)
    with pytest.raises(gaudi.devices.DeviceUnavailableError, match="Intel Gaudi software not found"):
        gaudi.prepare_for_gaudi_trainer(tiny_llama(), PaCAConfig(r=4), args)


def test_trainer_refuses_an_unprepared_model(optimum_habana):
    with pytest.raises(TypeError, match="prepare_for_gaudi_trainer"):
        gaudi.PacaGaudiTrainer(model=tiny_llama(), args=None)


def test_missing_optimum_habana_gives_the_install_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "optimum.habana", None)
    monkeypatch.setattr(gaudi, "_TRAINER_CLASS", None)
    with pytest.raises(ImportError, match=r"pip install -e \"\.\[gaudi\]\""):
        gaudi.gaudi_trainer_class()


def test_core_import_does_not_need_optimum():
    import subprocess

    code = "import sys, paca_core, paca_core.integrations.gaudi; assert 'optimum.habana' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_example_script_runs_with_the_stand_in(optimum_habana, tiny_model_dir, sample_text_file, tmp_path, monkeypatch):
    import runpy

    out = tmp_path / "example"
    monkeypatch.setattr(sys, "argv", [
        "gaudi_trainer.py", "--model", str(tiny_model_dir), "--data", str(sample_text_file), "--rank", "4",
        "--seq_len", "16", "--output_dir", str(out), "--max_steps", "2", "--per_device_train_batch_size", "2",
        "--use_cpu", "--report_to", "none", "--disable_tqdm", "true",
    ])
    script = Path(__file__).resolve().parents[1] / "examples" / "gaudi_trainer.py"
    runpy.run_path(str(script), run_name="__main__")
    assert (out / "adapter_model.safetensors").is_file() and (out / "adapter_config.json").is_file()
    PacaModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)), out)
