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

Under DeepSpeed (``TrainingArguments(deepspeed=...)``, ZeRO 1/2/3) the mixin adds what the engine
hides: those hooks run after each applied step with the model's own parameters (DeepSpeed steps flat
partitions), ZeRO-3 gathers each adapter layer's base weights for its forward, checkpoints hold the
gathered adapter and the whole AdamW state in paca-hal's safetensors format (``paca_optimizer/``:
resumable with any process count, never a pickle) instead of DeepSpeed's per-rank files, and
``resume_from_checkpoint`` loads the adapter before the engine partitions the model.

Usage: ``trainer = PacaTrainer(model=prepare_model(hf_model, PaCAConfig(r=16)), args=..., ...)``, or
mix :class:`PacaTrainerMixin` into your own Trainer subclass (``class T(PacaTrainerMixin, SFTTrainer)``)
and add ``PacaCallback()`` to its callbacks.
"""
from __future__ import annotations

import contextlib
import inspect
import logging
import weakref
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback

from .._version import __version__
from ..files.checkpoint import adapter_state, load_adapter_tensors, read_adapter_tensors, write_adapter_files
from ..errors import CheckpointError, PacaConfigError
from ..distributed.sharding import load_optimizer_state
from ..train.training_state import (
    check_host_state, read_host_state, read_legacy_pickle, read_training_state, write_host_state, write_training_state,
)
from ..model import AdaptedModel

logger = logging.getLogger(__name__)

TRAINING_ARGS_NAME = "training_args.bin"  # transformers' name for the saved TrainingArguments
HOST_STATE_NAME = "paca_host_optimizer.safetensors"  # MEFT's host-memory AdamW state, beside the adapter
LEGACY_HOST_STATE_NAME = "paca_host_optimizer.pt"  # the same as a torch.save pickle (paca-hal 0.1.0)
TRUST_HINT = "`trainer.train(resume_from_checkpoint=..., trust_checkpoint=True)`"
MODEL_CARD_NAME = "README.md"  # where transformers and TRL write the model card
LIBRARY_NAME = "paca-hal"
ZERO_OPTIMIZER_DIR = "paca_optimizer"  # under DeepSpeed: the whole AdamW state (safetensors + JSON), beside the adapter
OPTIMIZER_NAME = "optimizer.pt"  # transformers' name for the optimizer state without DeepSpeed
SCHEDULER_NAME = "scheduler.pt"  # transformers' name for the scheduler state (a weights-only torch.save)
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
                "launch without FSDP), or FSDP2 through `paca train --fsdp` / paca_core.distributed.sharding.shard_model."
            )
        if self._adapted() is not None and getattr(self, "is_deepspeed_enabled", False):
            self._paca_deepspeed_init(self._adapted())  # also for PacaSFTTrainer, which holds the inner model
        adapted = adapted_model(self.model)
        if adapted is not None:
            adapted.default_loss_chunking()  # the LM head + loss in chunks in training (paca_core/memory/chunked_loss.py)
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
        self._write_adapter(adapted, Path(output_dir if output_dir is not None else self.args.output_dir))

    def _write_adapter(self, adapted: AdaptedModel, output_dir: Path, tensors: dict | None = None) -> None:
        """The adapter files (``tensors``: already gathered, under ZeRO-3), the tokenizer and the arguments."""
        output_dir.mkdir(parents=True, exist_ok=True)
        write_adapter_files(adapted, output_dir, tensors=tensors)  # tensors are moved to the CPU first
        if getattr(self, "processing_class", None) is not None:
            self.processing_class.save_pretrained(str(output_dir))
        self._save_extra(output_dir)
        # A pickle, as transformers writes it, for users' reference. Neither transformers' resume path nor
        # paca-hal ever reads it back (unpickling it could run code): do not torch.load one you did not write.
        torch.save(self.args, output_dir / TRAINING_ARGS_NAME)
        logger.info("Saved paca-hal adapter (%s) to %s", adapted.method, output_dir)

    # --- DeepSpeed ---------------------------------------------------------------------------------
    def _paca_deepspeed_init(self, adapted: AdaptedModel) -> None:
        from ..distributed.zero import refuse_unsupported

        stage = int(self.accelerator.state.deepspeed_plugin.zero_stage)
        refuse_unsupported(adapted, stage)
        if stage == 3 and self.args.load_best_model_at_end:
            raise PacaConfigError(
                "load_best_model_at_end is not supported with paca-hal adapters under ZeRO-3 (the model is partitioned "
                "by then); set it to False and load the best checkpoint afterwards with PacaModel.from_pretrained."
            )
        if not any(isinstance(c, _ZeroStepCallback) for c in self.callback_handler.callbacks):
            self.add_callback(_ZeroStepCallback(self))

    def _paca_zero(self):
        """paca_core.distributed.zero's view of the DeepSpeed engine this trainer made; None before it exists or without DeepSpeed."""
        engine = getattr(self, "model_wrapped", None)
        if not getattr(self, "is_deepspeed_enabled", False) or not hasattr(engine, "zero_optimization_stage"):
            return None
        cached = getattr(self, "_paca_zero_view", None)
        if cached is None or cached.engine is not engine:
            from ..distributed.zero import ZeroEngine

            cached = self._paca_zero_view = ZeroEngine.around(engine, self._adapted())
        return cached

    def compute_loss(self, model, *args, **kwargs):
        if hasattr(model, "zero_optimization_stage"):  # the DeepSpeed engine: ZeRO-3 must know before its first forward
            self._paca_zero()
        return super().compute_loss(model, *args, **kwargs)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        adapted = self._adapted()
        if adapted is None or not getattr(self, "is_deepspeed_enabled", False):
            return super().save_model(output_dir, _internal_call)
        # The adapter only, gathered by every rank (ZeRO-3 partitions it) and written by one; not DeepSpeed's
        # whole-model state dict, which would copy the frozen base into every checkpoint.
        tensors = adapter_state(adapted)
        if self.args.should_save:
            self._write_adapter(adapted, Path(output_dir if output_dir is not None else self.args.output_dir), tensors)
        if self.args.push_to_hub and not _internal_call:
            self.push_to_hub(commit_message="Model save")

    def _save_optimizer_and_scheduler(self, output_dir):
        zero = self._paca_zero()
        if zero is None or self._adapted() is None:
            return super()._save_optimizer_and_scheduler(output_dir)
        state = zero.full_optimizer_state()  # a collective: every rank
        if not self.args.should_save:
            return
        directory = Path(output_dir) / ZERO_OPTIMIZER_DIR
        directory.mkdir(parents=True, exist_ok=True)
        write_training_state(directory, {"optimizer": state}, summary={"zero_stage": zero.stage, "world_size": zero.engine.world_size})
        if self.lr_scheduler is not None and not _is_deepspeed_scheduler(self.lr_scheduler):
            torch.save(self.lr_scheduler.state_dict(), Path(output_dir) / SCHEDULER_NAME)

    def _load_optimizer_and_scheduler(self, checkpoint):
        """Whole AdamW state written under DeepSpeed (``paca_optimizer/``) or without it (``optimizer.pt``), into
        DeepSpeed's partitions or a plain optimizer: a checkpoint resumes with any process count, either way."""
        zero = self._paca_zero()
        folder = Path(checkpoint) if checkpoint is not None else None
        ours = folder is not None and (folder / ZERO_OPTIMIZER_DIR).is_dir()
        if self._adapted() is None or folder is None or (zero is None and not ours):
            return super()._load_optimizer_and_scheduler(checkpoint)
        if ours:
            state = read_training_state(folder / ZERO_OPTIMIZER_DIR)["optimizer"]  # safetensors + JSON: runs no code
        elif (folder / OPTIMIZER_NAME).is_file():  # written without DeepSpeed: tensors and numbers only
            state = torch.load(folder / OPTIMIZER_NAME, map_location="cpu", weights_only=True)
        else:
            raise CheckpointError(f"{folder} has neither {ZERO_OPTIMIZER_DIR}/ nor {OPTIMIZER_NAME}: no optimizer state to resume.")
        from ..distributed.zero import align_saved_groups, align_scheduler_state

        saved_groups = state["param_groups"]
        if zero is not None:
            live_groups = zero.model_param_groups()  # the model's parameters, not DeepSpeed's flat partitions
            zero.load_optimizer_state_dict(state)
        else:
            live_groups = self.optimizer.param_groups
            state["param_groups"] = align_saved_groups(saved_groups, live_groups)
            load_optimizer_state(self.optimizer, state)  # FSDP/DDP/one process: re-sharded like the parameters
        scheduler = folder / SCHEDULER_NAME
        if scheduler.is_file() and self.lr_scheduler is not None and not _is_deepspeed_scheduler(self.lr_scheduler):
            saved = torch.load(scheduler, map_location="cpu", weights_only=True)
            self.lr_scheduler.load_state_dict(align_scheduler_state(saved, saved_groups, live_groups))
        logger.info("Restored the optimizer%s and scheduler from %s", f" (ZeRO-{zero.stage} partitions)" if zero else "", folder)

    def _paca_resume_under_deepspeed(self, resume, trust_checkpoint: bool):
        """Under DeepSpeed, a paca-hal checkpoint's adapter goes into the model before the engine partitions
        it; transformers' DeepSpeed-checkpoint loader is told to leave such a folder alone."""
        adapted = self._adapted()
        if resume in (None, False) or adapted is None or not getattr(self, "is_deepspeed_enabled", False):
            return contextlib.nullcontext()
        if resume is True:
            from transformers.trainer_utils import get_last_checkpoint

            resume = get_last_checkpoint(self.args.output_dir)
            if resume is None:
                return contextlib.nullcontext()  # transformers says there is none
        folder = Path(resume)
        if not _is_paca_checkpoint(folder):
            return contextlib.nullcontext()  # DeepSpeed's own checkpoint (global_step*): transformers loads it
        if self._paca_zero() is not None:
            raise PacaConfigError(
                "Resume a paca-hal checkpoint under DeepSpeed with a new trainer: this one's engine has already "
                "partitioned the model, and the adapter is loaded before that."
            )
        _load_paca_checkpoint(adapted, folder, trust_checkpoint)
        return _skipping_deepspeed_loader(folder)

    def _save_extra(self, output_dir: Path) -> None:
        """Subclasses save what their trainer adds (GaudiTrainer: the Gaudi config)."""

    def train(self, *args, trust_checkpoint: bool = False, **kwargs):
        """The base trainer's ``train``. ``trust_checkpoint=True``: you vouch for ``resume_from_checkpoint``, so
        paca-hal 0.1.0 host-state pickles that the restricted loader refuses may be unpickled in full."""
        self._paca_trust_checkpoint = trust_checkpoint
        resume = kwargs.get("resume_from_checkpoint", args[0] if args else None)
        try:
            with self._paca_resume_under_deepspeed(resume, trust_checkpoint):
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


def _is_paca_checkpoint(folder: Path) -> bool:
    """A folder paca-hal's trainer wrote (adapter files, no DeepSpeed ``global_step*`` folder)."""
    return (folder / "adapter_config.json").is_file() and not any(folder.glob("global_step*"))


def _is_deepspeed_scheduler(scheduler) -> bool:
    """A scheduler DeepSpeed runs itself (a ``scheduler`` section in the user's config): its state is DeepSpeed's."""
    return type(scheduler).__name__ in ("DeepSpeedSchedulerWrapper", "DummyScheduler")


@contextlib.contextmanager
def _skipping_deepspeed_loader(folder: Path):
    """transformers resumes DeepSpeed runs only from DeepSpeed's per-rank checkpoint files, through
    ``transformers.trainer.deepspeed_load_checkpoint`` (no method to override). For the duration of one
    ``train`` call that name skips ``folder``, whose adapter is already loaded and whose optimizer state
    ``_load_optimizer_and_scheduler`` restores; every other folder goes to the original."""
    import transformers.trainer as trainer_module

    original = trainer_module.deepspeed_load_checkpoint

    def load(engine, checkpoint_path, *args, **kwargs):
        if Path(checkpoint_path).resolve() == folder.resolve():
            return None
        return original(engine, checkpoint_path, *args, **kwargs)

    trainer_module.deepspeed_load_checkpoint = load
    try:
        yield
    finally:
        trainer_module.deepspeed_load_checkpoint = original


class _ZeroStepCallback(TrainerCallback):
    """Under DeepSpeed: after each applied optimizer step, the global post-step hooks (PaCA's columns,
    MEFT's host update) with the model's own parameters (paca_core.distributed.zero.run_post_step_hooks)."""

    def __init__(self, trainer):
        self.trainer = weakref.proxy(trainer)

    def on_optimizer_step(self, args, state, control, **kwargs):
        zero = self.trainer._paca_zero()
        if zero is not None and zero.engine.was_step_applied():  # fp16 overflow: no step, nothing to write
            zero.after_step()


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
