"""TRL's ``SFTTrainer`` for a model from :func:`~paca_core.prepare_model` (``pip install trl``).

SFTTrainer rewrites the forward of the model it is given (a fused LM head that computes per-token
log-probabilities in chunks) and expects a transformers ``PreTrainedModel`` laid out as one. Our
layers live *inside* that model — ``prepare_model`` adapts it in place — so :class:`PacaSFTTrainer`
hands SFTTrainer the inner transformers model and keeps the :class:`~paca_core.AdaptedModel` for
what only it knows: adapter-only checkpoints, resume, MEFT's host-memory state.

Usage::

    model = prepare_model(AutoModelForCausalLM.from_pretrained(path), PaCAConfig(r=16))
    trainer = PacaSFTTrainer(model=model, args=SFTConfig(...), train_dataset=ds, processing_class=tokenizer)
    trainer.train()        # checkpoints hold adapter_model.safetensors + adapter_config.json
"""
from __future__ import annotations

from ..model import AdaptedModel
from .transformers import PacaTrainerMixin, adapted_model

try:
    from trl import SFTTrainer
except ImportError as error:  # pragma: no cover - exercised only without trl
    raise ImportError(f"paca_core.integrations.trl needs TRL: pip install 'paca-hal[trl]' ({error}).") from None


class PacaSFTTrainer(PacaTrainerMixin, SFTTrainer):
    """``trl.SFTTrainer`` that trains an AdaptedModel and checkpoints only its adapter."""

    def __init__(self, model: AdaptedModel, *args, **kwargs):
        adapted = adapted_model(model)
        if adapted is None:
            raise TypeError(
                f"PacaSFTTrainer trains a model prepared by paca_core.prepare_model; got {type(model).__name__}. "
                "Call prepare_model(model, PaCAConfig(...)) first (or use trl.SFTTrainer directly)."
            )
        if kwargs.get("peft_config") is not None:
            raise ValueError(
                "peft_config would add PEFT adapters on top of paca-hal's: the model is already prepared, so drop peft_config."
            )
        self._paca_model = adapted
        super().__init__(adapted.base_model, *args, **kwargs)
        self._paca_init()
