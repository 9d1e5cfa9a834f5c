"""Hugging Face ``Trainer`` integration (and everything built on it: TRL's SFTTrainer, optimum-habana's
GaudiTrainer): train a model from :func:`~paca_core.prepare_model` with the trainer users already have.

What a plain ``Trainer`` would get wrong with an :class:`~paca_core.AdaptedModel`, and what fixes it:

* checkpoints: it would save the whole model's state dict; :class:`PacaTrainerMixin` writes our
  adapter files (``adapter_model.safetensors`` + ``adapter_config.json``, loadable with
  ``PacaModel.from_pretrained``) and reloads them on ``resume_from_checkpoint``;
* MEFT's host-memory rows and their AdamW state are not in any state dict: :class:`PacaCallback`
  saves that state into each checkpoint and the mixin restores it;
* the wrapper's ``forward(**kwargs)`` hides the model's argument names, so the trainer would drop
  every dataset column and compute no eval loss: the mixin reads them from the wrapped model.

Per-step synchronisation needs nothing from the trainer: PaCA's columns and MEFT's host update run
in a global optimizer post-step hook, whatever optimizer (or accelerate wrapper) the trainer uses.

Usage: ``trainer = PacaTrainer(model=prepare_model(hf_model, PaCAConfig(r=16)), args=..., ...)``, or
mix :class:`PacaTrainerMixin` into your own Trainer subclass (``class T(PacaTrainerMixin, SFTTrainer)``)
and add ``PacaCallback()`` to its callbacks.
"""
from __future__ import annotations

import inspect
import logging
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback

from .._version import __version__
from ..checkpoint import load_adapter_tensors, read_adapter_tensors, write_adapter_files
from ..training_state import check_host_state, read_host_state, read_legacy_pickle, write_host_state
from ..model import AdaptedModel

logger = logging.getLogger(__name__)

TRAINING_ARGS_NAME = "training_args.bin"  # transformers' name for the saved TrainingArguments
HOST_STATE_NAME = "paca_host_optimizer.safetensors"  # MEFT's host-memory AdamW state, beside the adapter
LEGACY_HOST_STATE_NAME = "paca_host_optimizer.pt"  # the same as a torch.save pickle (paca-hal 0.1.0)
TRUST_HINT = "`trainer.train(resume_from_checkpoint=..., trust_checkpoint=True)`"
MODEL_CARD_NAME = "README.md"  # where transformers and TRL write the model card
LIBRARY_NAME = "paca-hal"
MODEL_CARD_HEADING = "## paca-hal adapter"
MODEL_CARD_USAGE = MODEL_CARD_HEADING + """

Method: `{method}` (paca-hal {version}). The checkpoint holds only the adapter (`adapter_model.safetensors`,
`adapter_config.json`); load it onto the base model it was trained on:

```python
from paca_core import PacaModel

model = PacaModel.from_pretrained(base_model, "path/to/this/folder")
```
"""


def adapted_model(model: torch.nn.Module | None) -> AdaptedModel | None:
    """The AdaptedModel inside whatever wrappers a trainer added (DDP, HPU graphs, accelerate), if any."""
    while model is not None and not isinstance(model, AdaptedModel):
        model = getattr(model, "module", None)
    return model


class PacaCallback(TrainerCallback):
    """Saves what lives outside the model's parameters (MEFT's host rows' optimizer state) with every
    checkpoint; :class:`PacaTrainerMixin` loads it back on resume.

    ``adapted``: the AdaptedModel, for trainers that were handed its inner transformers model
    (:class:`~paca_core.integrations.trl.PacaSFTTrainer`).
    """

    def __init__(self, adapted: AdaptedModel | None = None):
        self.adapted = adapted

    def on_save(self, args, state, control, model=None, **kwargs):
        adapted = adapted_model(model) or self.adapted
        if adapted is None or not state.is_world_process_zero:
            return
        host_state = adapted.host_optimizer_state()
        if host_state:
            directory = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            write_host_state(directory / HOST_STATE_NAME, host_state)  # safetensors: loading it runs nothing


class PacaTrainerMixin:
    """Trainer overrides for a prepared model: adapter-only checkpoints, resume, and column names."""

    def _adapted(self, model: torch.nn.Module | None = None) -> AdaptedModel | None:
        """The AdaptedModel being trained: inside ``model`` (default: the trainer's), or the one a subclass
        handed over as ``self._paca_model`` when the trainer itself holds the inner transformers model."""
        return adapted_model(model if model is not None else self.model) or getattr(self, "_paca_model", None)

    def _paca_init(self) -> None:
        if getattr(self, "is_fsdp_enabled", False):
            raise NotImplementedError(
                "paca-hal adapters under the Hugging Face Trainer's own FSDP are not supported yet (its checkpoints "
                "gather a full model state dict, not our adapter). Use this trainer with DDP (torchrun/accelerate "
                "launch without FSDP), or FSDP2 through `paca train --fsdp` / paca_core.sharding.shard_model."
            )
        adapted = adapted_model(self.model)
        if adapted is not None:
            adapted.default_loss_chunking()  # the LM head + loss in chunks in training (paca_core/chunked_loss.py)
        if adapted is not None and self.args.label_names is None:
            forward = inspect.signature(adapted.base_model.forward).parameters
            self.label_names = [name for name in ("labels",) if name in forward]
            self.can_return_loss = "return_loss" in forward or bool(self.label_names)
        if not any(isinstance(c, PacaCallback) for c in self.callback_handler.callbacks):
            self.add_callback(PacaCallback(self._adapted()))

    def create_model_card(self, *args, **kwargs):
        """The card the trainer writes (``README.md`` in ``output_dir``, also pushed to the Hub), naming
        paca-hal and the method: the base trainer calls it a transformers model and says nothing of how to
        load an adapter-only checkpoint. Takes the base trainer's arguments (Trainer's, or TRL's)."""
        result = super().create_model_card(*args, **kwargs)
        adapted = self._adapted()
        if adapted is not None and self.is_world_process_zero():
            mark_model_card(Path(self.args.output_dir) / MODEL_CARD_NAME, adapted)
        return result

    def _set_signature_columns_if_needed(self):
        adapted = adapted_model(self.model)
        if adapted is None or self._signature_columns is not None:
            return super()._set_signature_columns_if_needed()
        columns = list(inspect.signature(adapted.base_model.forward).parameters)
        self._signature_columns = list(dict.fromkeys(columns + ["label", "label_ids"] + list(self.label_names)))

    def _save(self, output_dir: str | None = None, state_dict=None):
        adapted = self._adapted()
        if adapted is None:
            return super()._save(output_dir, state_dict)
        output_dir = Path(output_dir if output_dir is not None else self.args.output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        write_adapter_files(adapted, output_dir)  # tensors are moved to the CPU first
        if getattr(self, "processing_class", None) is not None:
            self.processing_class.save_pretrained(str(output_dir))
        self._save_extra(output_dir)
        # A pickle, as transformers writes it, for users' reference. Neither transformers' resume path nor
        # paca-hal ever reads it back (unpickling it could run code): do not torch.load one you did not write.
        torch.save(self.args, output_dir / TRAINING_ARGS_NAME)
        logger.info("Saved paca-hal adapter (%s) to %s", adapted.method, output_dir)

    def _save_extra(self, output_dir: Path) -> None:
        """Subclasses save what their trainer adds (GaudiTrainer: the Gaudi config)."""

    def train(self, *args, trust_checkpoint: bool = False, **kwargs):
        """The base trainer's ``train``. ``trust_checkpoint=True``: you vouch for ``resume_from_checkpoint``, so
        paca-hal 0.1.0 host-state pickles that the restricted loader refuses may be unpickled in full."""
        self._paca_trust_checkpoint = trust_checkpoint
        try:
            return super().train(*args, **kwargs)
        finally:
            self._paca_trust_checkpoint = False

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        adapted = self._adapted(model)
        if adapted is None:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        _load_paca_checkpoint(adapted, resume_from_checkpoint, getattr(self, "_paca_trust_checkpoint", False))

    def _load_best_model(self):
        adapted = self._adapted()
        if adapted is None:
            return super()._load_best_model()
        _load_paca_checkpoint(adapted, self.state.best_model_checkpoint, getattr(self, "_paca_trust_checkpoint", False))


def _load_paca_checkpoint(adapted: AdaptedModel, directory, trust_checkpoint: bool = False) -> None:
    """Adapter tensors and MEFT's host optimizer state; the host state is read (and vetted) first."""
    host_state = _read_host_state(Path(directory), trust_checkpoint)
    load_adapter_tensors(adapted, read_adapter_tensors(directory), directory)
    if host_state is not None:
        adapted.load_host_optimizer_state(host_state)
    logger.info("Loaded paca-hal adapter from %s", directory)


def _read_host_state(directory: Path, trust_checkpoint: bool) -> dict[str, dict[str, torch.Tensor]] | None:
    """The safetensors host state, or a 0.1.0 pickle read safely (refused unless trusted when that is not enough)."""
    if (directory / HOST_STATE_NAME).is_file():
        return read_host_state(directory / HOST_STATE_NAME)
    legacy = directory / LEGACY_HOST_STATE_NAME
    if legacy.is_file():
        return check_host_state(read_legacy_pickle(legacy, trust_checkpoint, TRUST_HINT), legacy)
    return None


def model_card_tags(adapted: AdaptedModel) -> list[str]:
    """``paca-hal`` and each method of the adapter (``lora+velora`` → ``lora``, ``velora``), for Hub search."""
    return [LIBRARY_NAME, *dict.fromkeys(adapted.method.split("+"))]


def mark_model_card(path: Path, adapted: AdaptedModel) -> None:
    """Rewrite the card at ``path``: ``library_name: paca-hal``, the method's tags, and how to load it."""
    from huggingface_hub import ModelCard

    if not path.is_file():
        return
    card = ModelCard.load(path)
    card.data.library_name = LIBRARY_NAME
    card.data.tags = list(dict.fromkeys(list(card.data.tags or []) + model_card_tags(adapted)))
    if MODEL_CARD_HEADING not in card.text:
        card.text = card.text.rstrip() + "\n\n" + MODEL_CARD_USAGE.format(method=adapted.method, version=__version__)
    card.save(path)


class PacaTrainer(PacaTrainerMixin, Trainer):
    """``transformers.Trainer`` for a model from :func:`~paca_core.prepare_model`."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._paca_init()
