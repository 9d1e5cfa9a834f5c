"""TRL's ``SFTTrainer`` for a model from :func:`~paca_core.prepare_model` (``pip install trl``).

SFTTrainer rewrites the forward of the model it is given (a fused LM head that computes per-token
log-probabilities in chunks) and expects a transformers ``PreTrainedModel`` laid out as one. Our
layers live *inside* that model — ``prepare_model`` adapts it in place — so :class:`PacaSFTTrainer`
hands SFTTrainer the inner transformers model and keeps the :class:`~paca_core.AdaptedModel` for
what only it knows: adapter-only checkpoints, resume, MEFT's host-memory state.

Data is TRL's: ``text``, ``prompt``/``completion`` (strings, or message lists: loss on the completion by TRL's
default ``completion_only_loss``), ``messages`` (loss on every token unless ``assistant_only_loss=True``), and
``packing=True`` (TRL's best-fit packing with per-example position ids). One difference: TRL's
``assistant_only_loss`` needs a chat template with ``{% generation %}`` markers, which most templates (SmolLM2's
among them) lack; for those PacaSFTTrainer marks the assistant turns itself, as ``paca train`` does (incremental
rendering, :mod:`paca_core.data.formats.chat`), and hands TRL the tokenized ``input_ids``/``labels``. A conversation
whose template cannot be marked that way is refused with the reason, never trained on whole.

Usage::

    model = prepare_model(AutoModelForCausalLM.from_pretrained(path), PaCAConfig(r=16))
    trainer = PacaSFTTrainer(model=model, args=SFTConfig(...), train_dataset=ds, processing_class=tokenizer)
    trainer.train()        # checkpoints hold adapter_model.safetensors + adapter_config.json
"""
from __future__ import annotations

import copy
import inspect
import logging
from typing import Any

from ..data.formats.base import DataError
from ..data.formats.chat import ChatTemplateError, ChatTokenizer, has_generation_markers
from ..data.formats.fields import FieldMap
from ..data.formats.records import ChatRecord, to_record
from ..model import AdaptedModel
from .transformers import PacaTrainerMixin, adapted_model

try:
    from trl import SFTTrainer
except ImportError as error:  # pragma: no cover - exercised only without trl
    raise ImportError(f"paca_core.integrations.trl needs TRL: pip install 'paca-hal[trl]' ({error}).") from None

logger = logging.getLogger(__name__)


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
        arguments = inspect.signature(SFTTrainer.__init__).bind(None, adapted.base_model, *args, **kwargs).arguments
        arguments.pop("self")
        extra = arguments.pop("kwargs", {})
        _mark_assistant_turns(arguments)
        super().__init__(**arguments, **extra)
        self._paca_init()


def _mark_assistant_turns(arguments: dict[str, Any]) -> None:
    """``assistant_only_loss=True`` on conversations whose chat template has no ``{% generation %}`` markers: tokenize
    them here (ids and assistant-only labels) and give TRL that, with its own ``assistant_only_loss`` turned off."""
    sft_args, tokenizer = arguments.get("args"), arguments.get("processing_class")
    train = arguments.get("train_dataset")
    if not getattr(sft_args, "assistant_only_loss", False) or tokenizer is None or train is None:
        return
    if has_generation_markers(tokenizer) or not _is_conversational(_first(train)):
        return  # TRL's own assistant mask works, or TRL refuses a dataset that is not conversational
    chat = ChatTokenizer(tokenizer)
    arguments["train_dataset"] = _tokenized(train, chat, "train_dataset")
    evaluation = arguments.get("eval_dataset")
    if isinstance(evaluation, dict):
        arguments["eval_dataset"] = {name: _tokenized(ds, chat, f"eval_dataset[{name!r}]") for name, ds in evaluation.items()}
    elif evaluation is not None:
        arguments["eval_dataset"] = _tokenized(evaluation, chat, "eval_dataset")
    arguments["args"] = copy.copy(sft_args)
    arguments["args"].assistant_only_loss = False  # the labels now carry the assistant-only mask
    logger.info("assistant_only_loss: the chat template has no {%% generation %%} markers, so paca-hal marked the assistant "
                "turns by rendering each conversation incrementally (paca_core.data.formats.chat).")


def _first(dataset) -> dict[str, Any]:
    return next(iter(dataset))


def _is_conversational(example: dict[str, Any]) -> bool:
    return isinstance(example.get("messages"), list) or (
        isinstance(example.get("prompt"), list) and isinstance(example.get("completion"), list))


def _tokenized(dataset, chat: ChatTokenizer, name: str):
    """``input_ids``/``labels`` columns for a conversational dataset (every other column dropped, as TRL drops them)."""
    fields, forms = FieldMap(), ("messages", "pair")

    def tokenize(example: dict[str, Any], index: int) -> dict[str, list[int]]:
        where = f"{name} row {index}"
        record = to_record(example, fields, where, forms)
        if not isinstance(record, ChatRecord):
            raise DataError(f"{where} is not a conversation ('messages', or 'prompt'/'completion' message lists), and "
                            "assistant_only_loss applies to conversations only.")
        try:
            input_ids, labels = chat.tokens(record.messages, record.trained_from)
        except ChatTemplateError as error:
            raise DataError(f"{where}: {error}.") from None
        return {"input_ids": input_ids, "labels": labels}

    columns = getattr(dataset, "column_names", None) or list(_first(dataset))
    return dataset.map(tokenize, with_indices=True, remove_columns=columns)
