"""Training data: local ``.txt`` (packed into fixed-length blocks) or ``.jsonl`` (``text`` or
``prompt``/``response`` records). Every example has the same length, so step shapes are static —
what graph-compiled devices (HPU lazy mode, CUDA graphs, torch.compile) need.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100


class DataError(ValueError):
    """The data file is missing, empty or malformed; the message names the file and line."""


@dataclass
class TokenizedData:
    """Fixed-length examples: ``input_ids``, ``labels`` (-100 where no loss) and ``attention_mask``, each (N, seq_len)."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    attention_mask: torch.Tensor
    source: str

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def target_tokens(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())

    def subset(self, rows: torch.Tensor | slice) -> "TokenizedData":
        return TokenizedData(self.input_ids[rows], self.labels[rows], self.attention_mask[rows], self.source)

    def batches(self, batch_size: int, order: torch.Tensor, start: int = 0) -> Iterator[dict[str, torch.Tensor]]:
        """Full batches in ``order`` from batch number ``start`` (a partial last batch is dropped: static shapes)."""
        for first in range(start * batch_size, len(order) - batch_size + 1, batch_size):
            rows = order[first : first + batch_size]
            yield {"input_ids": self.input_ids[rows], "labels": self.labels[rows], "attention_mask": self.attention_mask[rows]}


def _eos_id(tokenizer) -> int:
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError("The tokenizer has no end-of-sequence token; set tokenizer.eos_token before training.")
    return int(eos)


def _pack_blocks(token_ids: list[int], seq_len: int, source: str) -> TokenizedData:
    blocks = len(token_ids) // seq_len
    if blocks == 0:
        raise DataError(f"{source} has {len(token_ids)} tokens, fewer than one block of --seq-len {seq_len}; use more text or a shorter --seq-len.")
    ids = torch.tensor(token_ids[: blocks * seq_len], dtype=torch.long).view(blocks, seq_len)
    return TokenizedData(ids, ids.clone(), torch.ones_like(ids), source)


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


def _read_jsonl(path: Path) -> list[dict]:
    records: list[dict] = []
    try:
        _parse_jsonl_lines(path, records)
    except UnicodeDecodeError:
        number = len(records) + 1
        for number, raw in enumerate(path.read_bytes().split(b"\n"), 1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError:
                break
        raise DataError(f"{path}:{number} is not UTF-8 text; save the file as UTF-8.") from None
    except OSError as error:
        raise DataError(f"{path} cannot be read ({error.strerror}).") from None
    if not records:
        raise DataError(f"{path} has no records.")
    return records


def _parse_jsonl_lines(path: Path, records: list[dict]) -> None:
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(f"{path}:{number} is not valid JSON ({error.msg}).") from None
            if not isinstance(record, dict):
                raise DataError(f"{path}:{number} must be a JSON object with 'text' or 'prompt'/'response'.")
            has_text = isinstance(record.get("text"), str)
            has_pair = isinstance(record.get("prompt"), str) and isinstance(record.get("response"), str)
            if not (has_text or has_pair):
                raise DataError(
                    f"{path}:{number} has neither a 'text' string nor 'prompt' and 'response' strings (keys: {sorted(record)})."
                )
            records.append(record)


SUPPORTED_SUFFIXES = (".txt", ".jsonl")


def _read_text(path: Path, flag: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        line = path.read_bytes()[: error.start].count(b"\n") + 1
        raise DataError(f"{flag} {path}:{line} is not UTF-8 text (byte {error.start}); save the file as UTF-8.") from None
    except OSError as error:
        raise DataError(f"{flag} {path} cannot be read ({error.strerror}).") from None


def check_data_file(path: str | Path, flag: str = "--data") -> int:
    """Everything about a data file that needs no tokenizer: it exists, is readable, is not empty, is a format we
    read, and (``.jsonl``) every line parses into a record we can use. Returns its record count (``.txt``: 1).
    The message names the file and the line, and runs before any model loads."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{flag} {path} does not exist; pass a local .txt or .jsonl file.")
    if not path.is_file():
        raise DataError(f"{flag} {path} is a folder, not a data file; pass a local .txt or .jsonl file.")
    suffix = path.suffix.lower()
    if suffix not in SUPPORTED_SUFFIXES:
        raise DataError(f"{flag} {path}: unsupported data format {suffix or '(no extension)'!r}; use .txt (plain text) or .jsonl.")
    if suffix == ".txt":
        if not _read_text(path, flag).strip():
            raise DataError(f"{flag} {path} is empty.")
        return 1
    return len(_read_jsonl(path))


def load_dataset(path: str | Path, tokenizer, seq_len: int) -> TokenizedData:
    """Tokenize a local data file into fixed-length examples."""
    path = Path(path)
    if seq_len < 2:
        raise DataError(f"--seq-len must be at least 2, got {seq_len}.")
    if not path.is_file() or path.suffix.lower() not in SUPPORTED_SUFFIXES:
        check_data_file(path, "data file")  # raises the reason
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return _pack_blocks(_encode(tokenizer, _read_text(path, "data file")), seq_len, str(path))
    records = _read_jsonl(path)
    if all("text" in r and "prompt" not in r for r in records):
        eos = _eos_id(tokenizer)
        ids: list[int] = []
        for record in records:
            ids += _encode(tokenizer, record["text"]) + [eos]
        return _pack_blocks(ids, seq_len, str(path))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else _eos_id(tokenizer)
    rows, labels, masks, truncated = [], [], [], 0
    for number, record in enumerate(records, 1):
        if "prompt" in record:
            prompt_ids, response_ids = prompt_response_ids(tokenizer, record["prompt"], record["response"])
        else:
            prompt_ids, response_ids = [], _encode(tokenizer, record["text"]) + [_eos_id(tokenizer)]
        ids = (prompt_ids + response_ids)[:seq_len]
        label = ([IGNORE_INDEX] * len(prompt_ids) + response_ids)[:seq_len]
        truncated += len(prompt_ids) + len(response_ids) > seq_len
        if all(t == IGNORE_INDEX for t in label):
            raise DataError(f"{path} record {number}: the prompt alone fills --seq-len {seq_len}; raise --seq-len.")
        padding = seq_len - len(ids)
        rows.append(ids + [pad] * padding)
        labels.append(label + [IGNORE_INDEX] * padding)
        masks.append([1] * len(ids) + [0] * padding)
    if truncated:
        logger.warning("%d of %d records of %s were truncated to --seq-len %d", truncated, len(records), path, seq_len)
    return TokenizedData(torch.tensor(rows), torch.tensor(labels), torch.tensor(masks), str(path))


def split_held_out(data: TokenizedData, fraction: float, seed: int) -> tuple[TokenizedData, TokenizedData]:
    """Hold out examples for evaluation. Packed text keeps its tail (text the model never saw nearby);
    record data takes a seeded random subset. At least one example goes to each side."""
    if not 0 < fraction < 1:
        raise DataError(f"--eval-fraction must be between 0 and 1, got {fraction}.")
    if len(data) < 2:
        raise DataError(f"{data.source} gives {len(data)} example(s); need at least 2 to hold one out. Use more data or a shorter --seq-len.")
    n_eval = min(len(data) - 1, max(1, round(len(data) * fraction)))
    packed = bool((data.attention_mask == 1).all())
    if packed:
        order = torch.arange(len(data))
    else:
        order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
    return data.subset(order[:-n_eval]), data.subset(order[-n_eval:])
