"""optimum-habana integration: PaCA (and every other paca-hal method) inside a GaudiTrainer script.

An optimum-habana fine-tuning script changes two lines::

    model = prepare_for_gaudi_trainer(model, PaCAConfig(r=16), training_args)   # was: get_peft_model(model, lora_config)
    trainer = PacaGaudiTrainer(model=model, gaudi_config=gaudi_config, args=training_args, ...)   # was: GaudiTrainer(...)

Everything else (GaudiTrainingArguments with ``use_habana``/``use_lazy_mode``, GaudiConfig, HPU
graphs, FusedAdamW, HCCL) stays optimum-habana's. ``optimum.habana`` is imported only when these
functions run: the core never needs it (optimum-habana pins transformers 4.55.x; the core supports it).
Checkpoints hold our adapter files (``adapter_model.safetensors`` + ``adapter_config.json``), loadable
with :meth:`paca_core.PacaModel.from_pretrained`, and ``resume_from_checkpoint`` reloads them.
"""
from __future__ import annotations

import importlib
import inspect
import logging
import os
from pathlib import Path
from typing import Any, Sequence

import torch

import devices
from devices.hpu import lazy_mode_enabled

from ..checkpoint import load_adapter_tensors, read_adapter_tensors, write_adapter_files
from ..config import MethodConfig
from ..model import AdaptedModel, prepare_model

logger = logging.getLogger(__name__)

INSTALL_HINT = (
    "optimum-habana is not installed: inside an Intel Gaudi PyTorch image run `pip install -e \".[gaudi]\"` "
    "(or `pip install optimum[habana]`); it needs the Gaudi software stack (habana_frameworks)."
)
TRAINING_ARGS_NAME = "training_args.bin"  # transformers' name for the saved TrainingArguments

_TRAINER_CLASS: type | None = None


def _optimum_habana():
    try:
        return importlib.import_module("optimum.habana")
    except ImportError as error:
        raise ImportError(f"{INSTALL_HINT} ({error})") from error


def prepare_for_gaudi_trainer(
    model: torch.nn.Module,
    configs: MethodConfig | Sequence[MethodConfig],
    args: Any = None,
    device: str | torch.device | None = None,
) -> AdaptedModel:
    """Prepare ``model`` with paca-hal methods for a GaudiTrainer (replaces ``get_peft_model``).

    ``args`` (GaudiTrainingArguments) picks the device: ``hpu`` with ``use_habana``, else ``cpu``;
    ``device`` overrides it. A lazy-mode request that contradicts ``PT_HPU_LAZY_MODE`` is an error,
    because the bridge reads the variable once at start-up and optimum-habana does not set it.
    """
    use_habana = bool(getattr(args, "use_habana", False))
    if use_habana and getattr(args, "use_lazy_mode", False) and not lazy_mode_enabled():
        raise devices.DeviceUnavailableError(
            "GaudiTrainingArguments(use_lazy_mode=True) needs PT_HPU_LAZY_MODE=1 exported before Python starts "
            f"(it is {os.environ.get('PT_HPU_LAZY_MODE', 'unset')}); or pass use_lazy_mode=False with torch_compile."
        )
    if device is None:
        device = "hpu" if use_habana else ("cpu" if args is not None else None)
    prepared = prepare_model(model, configs, device=device)
    if getattr(args, "gradient_checkpointing", False) and hasattr(prepared.base_model, "enable_input_require_grads"):
        # The frozen embeddings would otherwise cut the gradient path through checkpointed blocks.
        prepared.base_model.enable_input_require_grads()
    return prepared


def _adapted(model: torch.nn.Module) -> AdaptedModel | None:
    """The AdaptedModel inside whatever wrappers the trainer added (DDP, HPU graphs), if any."""
    while model is not None and not isinstance(model, AdaptedModel):
        model = getattr(model, "module", None)
    return model


def gaudi_trainer_class() -> type:
    """``optimum.habana.GaudiTrainer`` subclass that saves and resumes paca-hal adapters (built on first use)."""
    global _TRAINER_CLASS
    if _TRAINER_CLASS is not None:
        return _TRAINER_CLASS
    GaudiTrainer = _optimum_habana().GaudiTrainer

    class PacaGaudiTrainer(GaudiTrainer):
        """GaudiTrainer for models from :func:`prepare_for_gaudi_trainer`: checkpoints carry the adapter."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            adapted = _adapted(self.model)
            if adapted is not None and self.args.label_names is None:
                # The wrapper's forward takes **kwargs; the labels are the wrapped model's.
                forward = inspect.signature(adapted.base_model.forward).parameters
                self.label_names = [name for name in ("labels",) if name in forward]
                self.can_return_loss = "return_loss" in forward or bool(self.label_names)

        def _set_signature_columns_if_needed(self):
            adapted = _adapted(self.model)
            if adapted is None or self._signature_columns is not None:
                return super()._set_signature_columns_if_needed()
            columns = list(inspect.signature(adapted.base_model.forward).parameters)
            self._signature_columns = list(dict.fromkeys(columns + ["label", "label_ids"] + list(self.label_names)))

        def _save(self, output_dir: str | None = None, state_dict=None):
            adapted = _adapted(self.model)
            if adapted is None:
                return super()._save(output_dir, state_dict)
            output_dir = Path(output_dir if output_dir is not None else self.args.output_dir)
            output_dir.mkdir(parents=True, exist_ok=True)
            write_adapter_files(adapted, output_dir)  # tensors are moved to the CPU first
            if self.processing_class is not None:
                self.processing_class.save_pretrained(str(output_dir))
            self.gaudi_config.save_pretrained(str(output_dir))
            torch.save(self.args, output_dir / TRAINING_ARGS_NAME)
            logger.info("Saved paca-hal adapter (%s) to %s", adapted.method, output_dir)

        def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
            adapted = _adapted(model if model is not None else self.model)
            if adapted is None:
                return super()._load_from_checkpoint(resume_from_checkpoint, model)
            load_adapter_tensors(adapted, read_adapter_tensors(resume_from_checkpoint), resume_from_checkpoint)
            logger.info("Loaded paca-hal adapter from %s", resume_from_checkpoint)

        def _load_best_model(self):
            adapted = _adapted(self.model)
            if adapted is None:
                return super()._load_best_model()
            best = self.state.best_model_checkpoint
            load_adapter_tensors(adapted, read_adapter_tensors(best), best)

    _TRAINER_CLASS = PacaGaudiTrainer
    return PacaGaudiTrainer


def PacaGaudiTrainer(model: torch.nn.Module, gaudi_config: Any = None, args: Any = None, **kwargs: Any):
    """A GaudiTrainer for a prepared model, with paca-hal's training callback added.

    Takes GaudiTrainer's arguments. Without ``gaudi_config`` and ``args.gaudi_config_name`` it uses
    ``GaudiConfig(use_fused_adam=True, use_fused_clip_norm=True)`` as optimum-habana's LoRA example does.
    """
    optimum_habana = _optimum_habana()
    if _adapted(model) is None:
        raise TypeError("PacaGaudiTrainer trains a model from prepare_for_gaudi_trainer(model, configs, args).")
    if gaudi_config is None and getattr(args, "gaudi_config_name", None) is None:
        gaudi_config = optimum_habana.GaudiConfig(use_fused_adam=True, use_fused_clip_norm=True)
    from .transformers import PacaCallback  # the HF-Trainer callback, shared with the plain transformers integration

    callbacks = list(kwargs.pop("callbacks", None) or [])
    if not any(isinstance(c, PacaCallback) or c is PacaCallback for c in callbacks):
        callbacks.append(PacaCallback())
    return gaudi_trainer_class()(model=model, gaudi_config=gaudi_config, args=args, callbacks=callbacks, **kwargs)
