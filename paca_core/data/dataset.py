"""Training data as fixed-length token rows, from the forms users keep it in:

* ``.txt`` — plain text, cut into blocks of ``--seq-len`` tokens;
* ``.jsonl`` with ``text``; ``prompt``/``response`` (or TRL's ``prompt``/``completion``); or ``messages``
  (OpenAI/TRL conversations, rendered with the tokenizer's chat template, loss on every assistant turn only);
* datasets on disk with the same fields: a ``save_to_disk`` folder (a DatasetDict's split by ``--data-split``),
  ``.parquet``, ``.arrow``, ``.csv`` (optional ``datasets`` library); other column names through ``--text-field`` /
  ``--field-map``.

Every row has the same length, so step shapes are static — what graph-compiled devices (HPU lazy mode, CUDA graphs,
torch.compile) need. Examples shorter than a row are padded, or with ``packing`` placed several to a row, kept apart
by per-example position ids (:mod:`paca_core.data.formats.packing`). The readers live in
:mod:`paca_core.data.formats`; this module is the entry point the trainer and ``paca train`` use.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

from .formats.base import IGNORE_INDEX, DataError
from .formats.fields import FieldMap, parse_field_map
from .formats.records import (
    SUPPORTED_SUFFIXES, ChatRecord, PairRecord, RecordSet, TextRecord, data_kind, read_records,
)

__all__ = [
    "IGNORE_INDEX", "DataError", "FieldMap", "SUPPORTED_SUFFIXES", "TokenizedData", "check_data_file", "inspect_data",
    "load_dataset", "parse_field_map", "prompt_response_ids", "split_held_out",
]

logger = logging.getLogger(__name__)


@dataclass
class TokenizedData:
    """Fixed-length rows: ``input_ids``, ``labels`` (-100 where no loss) and ``attention_mask`` (1 on data, 0 on
    padding), each (N, seq_len). Packed rows also carry ``position_ids`` (restarting at 0 for each example): the
    model is then given those instead of the attention mask, which would let the examples of a row see each other."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    attention_mask: torch.Tensor
    source: str
    position_ids: torch.Tensor | None = None
    #: How the rows were made, for the log and metrics.json: the record forms, the examples, the padding before packing.
    info: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def target_tokens(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())

    @property
    def packed(self) -> bool:
        return self.position_ids is not None

    @property
    def padding_share(self) -> float:
        """The share of the rows' tokens that are padding (what a step spends on no data)."""
        return 1.0 - float(self.attention_mask.sum()) / max(1, self.attention_mask.numel())

    def layout(self) -> dict[str, Any]:
        """What metrics.json records about the rows."""
        return {**self.info, "rows": len(self), "seq_len": int(self.input_ids.shape[1]), "packed": self.packed,
                "padding_share": round(self.padding_share, 6)}

    def subset(self, rows: torch.Tensor | slice) -> "TokenizedData":
        positions = self.position_ids[rows] if self.position_ids is not None else None
        return TokenizedData(self.input_ids[rows], self.labels[rows], self.attention_mask[rows], self.source, positions)

    def batches(self, batch_size: int, order: torch.Tensor, start: int = 0) -> Iterator[dict[str, torch.Tensor]]:
        """Full batches in ``order`` from batch number ``start`` (a partial last batch is dropped: static shapes).
        Packed rows give ``position_ids`` and no ``attention_mask``."""
        for first in range(start * batch_size, len(order) - batch_size + 1, batch_size):
            rows = order[first : first + batch_size]
            if self.position_ids is not None:
                yield {"input_ids": self.input_ids[rows], "labels": self.labels[rows], "position_ids": self.position_ids[rows]}
            else:
                yield {"input_ids": self.input_ids[rows], "labels": self.labels[rows], "attention_mask": self.attention_mask[rows]}


def _eos_id(tokenizer) -> int:
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError("The tokenizer has no end-of-sequence token; set tokenizer.eos_token before training.")
    return int(eos)


def _pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else _eos_id(tokenizer)


def _pack_blocks(token_ids: list[int], seq_len: int, source: str, info: dict[str, Any]) -> TokenizedData:
    blocks = len(token_ids) // seq_len
    if blocks == 0:
        raise DataError(f"{source} has {len(token_ids)} tokens, fewer than one block of --seq-len {seq_len}; use more text or a shorter --seq-len.")
    ids = torch.tensor(token_ids[: blocks * seq_len], dtype=torch.long).view(blocks, seq_len)
    return TokenizedData(ids, ids.clone(), torch.ones_like(ids), source, info=info)


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def prompt_response_ids(tokenizer, prompt: str, response: str) -> tuple[list[int], list[int]]:
    """Prompt tokens (no loss) and response tokens (loss), in the tokenizer's chat format when it has one."""
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": prompt}]
        prompt_text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        prompt_ids = _encode(tokenizer, prompt_text)
        return prompt_ids, _encode(tokenizer, response) + [_eos_id(tokenizer)]
    return _encode(tokenizer, prompt + "\n"), _encode(tokenizer, response) + [_eos_id(tokenizer)]


def _read_text(path: Path, flag: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        line = path.read_bytes()[: error.start].count(b"\n") + 1
        raise DataError(f"{flag} {path}:{line} is not UTF-8 text (byte {error.start}); save the file as UTF-8.") from None
    except OSError as error:
        raise DataError(f"{flag} {path} cannot be read ({error.strerror}).") from None


@dataclass
class DataSummary:
    """What preflight learnt about a data file or split without a tokenizer."""

    kind: str  # "txt", "jsonl" or "dataset"
    records: int
    forms: dict[str, int]
    #: What the conversations need of a chat template (``role:NAME``, ``tool_calls``), each with where it first appears.
    chat_features: dict[str, str] = field(default_factory=dict)


def inspect_data(path: str | Path, flag: str = "--data", *, split: str | None = "train", fields: FieldMap | None = None) -> DataSummary:
    """Everything about the data that needs no tokenizer: it exists, is readable, is not empty, is a format we read,
    and every line or row holds a record we can use (the columns the run names exist). The message names the file and
    the line, row or column, and this runs before any model loads. ``split``: as :func:`read_records`."""
    path = Path(path)
    kind = data_kind(path, flag)
    if kind == "txt":
        if not _read_text(path, flag).strip():
            raise DataError(f"{flag} {path} is empty.")
        return DataSummary(kind, 1, {"text": 1})
    records = read_records(path, flag, split=split, fields=fields)
    return DataSummary(kind, len(records), records.forms(), records.chat_features())


def check_data_file(path: str | Path, flag: str = "--data", *, split: str | None = "train", fields: FieldMap | None = None) -> int:
    """:func:`inspect_data`'s checks; returns the record count (``.txt``: 1)."""
    return inspect_data(path, flag, split=split, fields=fields).records


def load_dataset(path: str | Path, tokenizer, seq_len: int, *, split: str | None = "train", fields: FieldMap | None = None,
                 packing: bool = False) -> TokenizedData:
    """Tokenize local data into rows of ``seq_len`` tokens.

    ``split``: a DatasetDict folder's split (None: its held-out split). ``fields``: other column names.
    ``packing``: put several examples in a row, kept apart by position ids (plain text is already cut into full
    blocks; ``text`` records become examples of their own, cut at ``seq_len``, instead of one running text)."""
    path = Path(path)
    if seq_len < 2:
        raise DataError(f"--seq-len must be at least 2, got {seq_len}.")
    kind = data_kind(path, "data file")
    if kind == "txt":
        return _pack_blocks(_encode(tokenizer, _read_text(path, "data file")), seq_len, str(path), {"records": {"text": 1}})
    records = read_records(path, "data file", split=split, fields=fields)
    info: dict[str, Any] = {"records": records.forms()}
    if not packing and all(isinstance(r, TextRecord) for r in records.records):
        eos = _eos_id(tokenizer)
        ids: list[int] = []
        for record in records.records:
            ids += _encode(tokenizer, record.text) + [eos]
        return _pack_blocks(ids, seq_len, records.source, info)
    examples = _examples(records, tokenizer, seq_len, packing)
    info["examples"] = len(examples)
    if packing:
        return _packed(examples, seq_len, _pad_id(tokenizer), records.source, info)
    return _padded(examples, seq_len, _pad_id(tokenizer), records.source, info)


def _examples(records: RecordSet, tokenizer, seq_len: int, packing: bool) -> list[tuple[list[int], list[int]]]:
    """``(ids, labels)`` per example, at most ``seq_len`` long; labels are IGNORE_INDEX where no loss."""
    from .formats.chat import ChatTemplateError, ChatTokenizer

    chat = None
    examples: list[tuple[list[int], list[int]]] = []
    truncated = 0
    for index, record in enumerate(records.records):
        if isinstance(record, TextRecord) and packing:  # an example of its own; a long one in pieces, all trained
            ids = _encode(tokenizer, record.text) + [_eos_id(tokenizer)]
            examples += [(ids[i : i + seq_len], ids[i : i + seq_len]) for i in range(0, len(ids), seq_len) if len(ids[i : i + seq_len]) > 1]
            continue
        if isinstance(record, ChatRecord):
            chat = chat or ChatTokenizer(tokenizer)
            try:
                ids, labels = chat.tokens(record.messages, record.trained_from)
            except ChatTemplateError as error:
                raise DataError(f"{records.where(index)}: {error}.") from None
        elif isinstance(record, PairRecord):
            prompt_ids, response_ids = prompt_response_ids(tokenizer, record.prompt, record.response)
            ids, labels = prompt_ids + response_ids, [IGNORE_INDEX] * len(prompt_ids) + response_ids
        else:
            ids = _encode(tokenizer, record.text) + [_eos_id(tokenizer)]
            labels = list(ids)
        truncated += len(ids) > seq_len
        ids, labels = ids[:seq_len], labels[:seq_len]
        # Position 0 is never a target (nothing before it predicts it), so an example needs a label after it.
        if not isinstance(record, TextRecord) and all(label == IGNORE_INDEX for label in labels[1:]):
            raise DataError(f"{records.where(index)}: the prompt alone fills --seq-len {seq_len} (nothing left to train on); "
                            "raise --seq-len.")
        examples.append((ids, labels))
    if truncated:
        logger.warning("%d of %d records of %s were truncated to --seq-len %d", truncated, len(records), records.source, seq_len)
    return examples


def _padded(examples, seq_len: int, pad: int, source: str, info: dict[str, Any]) -> TokenizedData:
    rows = [ids + [pad] * (seq_len - len(ids)) for ids, _ in examples]
    labels = [label + [IGNORE_INDEX] * (seq_len - len(label)) for _, label in examples]
    masks = [[1] * len(ids) + [0] * (seq_len - len(ids)) for ids, _ in examples]
    return TokenizedData(torch.tensor(rows), torch.tensor(labels), torch.tensor(masks), source, info=info)


def _packed(examples, seq_len: int, pad: int, source: str, info: dict[str, Any]) -> TokenizedData:
    from .formats.packing import pack_examples

    input_ids, labels, attention_mask, position_ids = pack_examples(examples, seq_len, pad)
    data_tokens = sum(len(ids) for ids, _ in examples)
    info["padding_share_before_packing"] = round(1.0 - data_tokens / max(1, len(examples) * seq_len), 6)
    data = TokenizedData(input_ids, labels, attention_mask, source, position_ids, info)
    logger.info("Packing: %d examples of %s into %d rows of %d tokens; padding %.1f%% of the tokens before packing, %.1f%% after",
                len(examples), source, len(data), seq_len, 100 * info["padding_share_before_packing"], 100 * data.padding_share)
    return data


def split_held_out(data: TokenizedData, fraction: float, seed: int) -> tuple[TokenizedData, TokenizedData]:
    """Hold out examples for evaluation. Packed text keeps its tail (text the model never saw nearby);
    record data takes a seeded random subset (packed rows: whole rows, so every example stays on one side).
    At least one row goes to each side."""
    if not 0 < fraction < 1:
        raise DataError(f"--eval-fraction must be between 0 and 1, got {fraction}.")
    if len(data) < 2:
        raise DataError(f"{data.source} gives {len(data)} example(s); need at least 2 to hold one out. Use more data or a shorter --seq-len.")
    n_eval = min(len(data) - 1, max(1, round(len(data) * fraction)))
    running_text = data.position_ids is None and bool((data.attention_mask == 1).all())
    if running_text:
        order = torch.arange(len(data))
    else:
        order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
    train, held_out = data.subset(order[:-n_eval]), data.subset(order[-n_eval:])
    train.info = dict(data.info)
    return train, held_out
