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
import logging
from pathlib import Path
from typing import Any, Sequence

import torch

import devices

from ..base_config import MethodConfig
from ..model import AdaptedModel, prepare_model

logger = logging.getLogger(__name__)

INSTALL_HINT = (
    "optimum-habana is not installed: inside an Intel Gaudi PyTorch image run `pip install -e \".[gaudi]\"` "
    "(or `pip install optimum[habana]`); it needs the Gaudi software stack (habana_frameworks)."
)

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
    ``device`` overrides it. With neither, the model stays where it is and the GaudiTrainer places it. A lazy-mode request that contradicts ``PT_HPU_LAZY_MODE`` is an error,
    because the bridge reads the variable once at start-up and optimum-habana does not set it.
    """
    use_habana = bool(getattr(args, "use_habana", False))
    hpu = devices.runtime_for("hpu")
    if use_habana and getattr(args, "use_lazy_mode", False) and not hpu.lazy_mode():
        raise devices.DeviceUnavailableError(
            f"GaudiTrainingArguments(use_lazy_mode=True) needs {hpu.lazy_mode_requirement(True)}; "
            "or pass use_lazy_mode=False with torch_compile."
        )
    if device is None:
        device = "hpu" if use_habana else ("cpu" if args is not None else None)
    prepared = prepare_model(model, configs, device=device)
    if getattr(args, "gradient_checkpointing", False) and hasattr(prepared.base_model, "enable_input_require_grads"):
        # The frozen embeddings would otherwise cut the gradient path through checkpointed blocks.
        prepared.base_model.enable_input_require_grads()
    return prepared


def _adapted(model: torch.nn.Module) -> AdaptedModel | None:
    from .transformers import adapted_model

    return adapted_model(model)


def gaudi_trainer_class() -> type:
    """``optimum.habana.GaudiTrainer`` subclass that saves and resumes paca-hal adapters (built on first use)."""
    global _TRAINER_CLASS
    if _TRAINER_CLASS is not None:
        return _TRAINER_CLASS
    GaudiTrainer = _optimum_habana().GaudiTrainer
    from .transformers import PacaTrainerMixin

    class PacaGaudiTrainer(PacaTrainerMixin, GaudiTrainer):
        """GaudiTrainer for models from :func:`prepare_for_gaudi_trainer`: checkpoints carry the adapter."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._paca_init()

        def _save_extra(self, output_dir: Path) -> None:
            self.gaudi_config.save_pretrained(str(output_dir))

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
