"""Records from local data, checked row by row without a tokenizer (so before any model loads).

Two sources: ``.jsonl`` files (read here, one JSON object a line) and datasets on disk — a folder written by
``datasets.Dataset.save_to_disk`` or ``DatasetDict.save_to_disk``, ``.parquet``, ``.arrow`` and ``.csv`` files —
read through the optional ``datasets`` library (``pip install 'paca-hal[data]'``), imported only here and only for
those. Nothing is downloaded: a hub dataset id is refused with what to do instead.

Every record becomes one of three forms:

* :class:`TextRecord` — ``text``: trained on every token;
* :class:`PairRecord` — ``prompt`` with ``response`` (or TRL's ``completion``), both strings: trained on the response;
* :class:`ChatRecord` — ``messages`` (OpenAI/TRL chat: ``role``/``content`` dicts), or TRL's conversational
  ``prompt``/``completion`` (two message lists): trained on the assistant turns (of the completion).

A record with ``messages`` is a conversation even if it also has ``text``; ``--text-field``/``--field-map`` name
other columns and, when given, restrict detection to the forms they name.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

from .base import DataError
from .fields import FieldMap

logger = logging.getLogger(__name__)

TEXT_SUFFIXES = (".txt",)
JSONL_SUFFIXES = (".jsonl",)
#: Files read through the ``datasets`` library (a ``save_to_disk`` folder is the fourth form).
DATASET_SUFFIXES = (".parquet", ".arrow", ".csv")
SUPPORTED_SUFFIXES = TEXT_SUFFIXES + JSONL_SUFFIXES + DATASET_SUFFIXES
#: The splits ``--eval-data`` takes from a DatasetDict folder, in this order.
HELD_OUT_SPLITS = ("validation", "test")
FORMATS_HINT = "a local .txt, .jsonl, .parquet, .arrow or .csv file, or a folder written by datasets' save_to_disk"


@dataclass(frozen=True)
class TextRecord:
    text: str


@dataclass(frozen=True)
class PairRecord:
    prompt: str
    response: str


@dataclass(frozen=True)
class ChatRecord:
    """A conversation; the assistant messages at ``trained_from`` or later are trained (0: every assistant turn)."""

    messages: list[dict[str, Any]]
    trained_from: int = 0


Record = TextRecord | PairRecord | ChatRecord
FORM_NAMES = {TextRecord: "text", PairRecord: "prompt/response", ChatRecord: "conversation"}


@dataclass
class RecordSet:
    """The records of one file or split, and how to name one of them in a message."""

    records: list[Record]
    source: str
    #: The line of each record (``.jsonl``); None for dataset rows, named by their index.
    line_numbers: list[int] | None = None

    def __len__(self) -> int:
        return len(self.records)

    def where(self, index: int) -> str:
        if self.line_numbers is not None:
            return f"{self.source}:{self.line_numbers[index]}"
        return f"{self.source} row {index}"

    def forms(self) -> dict[str, int]:
        """How many records of each form, e.g. ``{"conversation": 40}``."""
        return dict(Counter(FORM_NAMES[type(r)] for r in self.records))

    def chat_features(self) -> dict[str, str]:
        """What the conversations ask of a chat template, each with where it first appears: ``role:NAME`` for every
        role, ``tool_calls`` for an assistant turn that calls tools (checked against the template before loading)."""
        found: dict[str, str] = {}
        for index, record in enumerate(self.records):
            if isinstance(record, ChatRecord):
                for number, message in enumerate(record.messages):
                    found.setdefault(f"role:{message['role']}", f"{self.where(index)} message {number}")
                    if "tool_calls" in message:
                        found.setdefault("tool_calls", f"{self.where(index)} message {number}")
        return found


# --------------------------------------------------------------------------------------------
# where the data is


def data_kind(path: Path, flag: str) -> str:
    """``"txt"``, ``"jsonl"`` or ``"dataset"`` for a path that exists and is a format we read; else one line saying why."""
    if not path.exists():
        if _looks_like_hub_id(str(path)):
            raise DataError(
                f"{flag} {path} is not a local file or folder, and paca-hal never downloads datasets (this environment is "
                f"offline): on a machine with network run datasets.load_dataset({str(path)!r}).save_to_disk('FOLDER') and "
                f"pass {flag} FOLDER, or pass {FORMATS_HINT}.")
        raise DataError(f"{flag} {path} does not exist; pass {FORMATS_HINT}.")
    if path.is_dir():
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            return "dataset"
        raise DataError(f"{flag} {path} is a folder but not one written by datasets' save_to_disk (it has no state.json or "
                        "dataset_dict.json); pass the .jsonl/.parquet/.arrow/.csv file inside it, or save the dataset with "
                        "save_to_disk.")
    suffix = path.suffix.lower()
    if suffix not in SUPPORTED_SUFFIXES:
        raise DataError(f"{flag} {path}: unsupported data format {suffix or '(no extension)'!r}; use .txt (plain text), "
                        ".jsonl, .parquet, .arrow or .csv, or a folder written by datasets' save_to_disk.")
    return "txt" if suffix in TEXT_SUFFIXES else "jsonl" if suffix in JSONL_SUFFIXES else "dataset"


def _looks_like_hub_id(text: str) -> bool:
    """``owner/name`` with no extension, as the hub names datasets (``tatsu-lab/alpaca``), not a relative path."""
    if os.path.isabs(text) or text.startswith((".", "~")) or "\\" in text or text.count("/") != 1:
        return False
    owner, name = text.split("/")
    return bool(owner and name) and not Path(name).suffix


def read_records(path: str | Path, flag: str = "--data", *, split: str | None = "train",
                 fields: FieldMap | None = None) -> RecordSet:
    """Every record of a ``.jsonl`` file or a dataset on disk, checked: the bad line, row or missing column is named.

    ``split``: which split of a DatasetDict folder (``--data-split``); None takes the held-out split
    (``validation``, else ``test``), as ``--eval-data`` does."""
    path = Path(path)
    fields = fields or FieldMap()
    kind = data_kind(path, flag)
    if kind == "txt":
        raise DataError(f"{flag} {path} is plain text, not records.")
    if kind == "jsonl":
        return _read_jsonl(path, flag, fields)
    return _read_dataset(path, flag, split, fields)


# --------------------------------------------------------------------------------------------
# one row → one record


def _forms(fields: FieldMap) -> tuple[str, ...]:
    """The forms to look for, in order: all of them, or only those the flags named."""
    if not fields.explicit:
        return ("messages", "pair", "text")
    forms = []
    if "messages" in fields.explicit:
        forms.append("messages")
    if fields.explicit & {"prompt", "response", "completion"}:
        forms.append("pair")
    if "text" in fields.explicit:
        forms.append("text")
    return tuple(forms)


def to_record(row: Mapping[str, Any], fields: FieldMap, where: str, forms: tuple[str, ...] | None = None) -> Record:
    """The record one JSON object or dataset row holds (``where`` names it in the error)."""
    forms = forms if forms is not None else _forms(fields)
    col = fields.column
    if "messages" in forms and row.get(col("messages")) is not None:
        messages = _messages(row[col("messages")], where, fields.flag_for("messages"))
        return _chat(messages, 0, where)
    if "pair" in forms:
        prompt = row.get(col("prompt"))
        answer_name = "response" if row.get(col("response")) is not None else "completion"
        answer = row.get(col(answer_name))
        if prompt is not None and answer is not None:
            if isinstance(prompt, str) and isinstance(answer, str):
                return PairRecord(prompt, answer)
            if isinstance(prompt, list) and isinstance(answer, list):
                prompt_messages = _messages(prompt, where, fields.flag_for("prompt"))
                answer_messages = _messages(answer, where, fields.flag_for(answer_name))
                return _chat(prompt_messages + answer_messages, len(prompt_messages), where)
            raise DataError(f"{where}: {fields.flag_for('prompt')} and {fields.flag_for(answer_name)} must both be strings, or "
                            f"both lists of messages (got {_kind_of(prompt)} and {_kind_of(answer)}).")
    if "text" in forms and isinstance(row.get(col("text")), str):
        return TextRecord(row[col("text")])
    _refuse_unusable_values(row, fields, where, forms)
    wanted = []
    if "text" in forms:
        wanted.append(f"a {fields.flag_for('text')} string")
    if "pair" in forms:
        wanted.append(f"{fields.flag_for('prompt')} with {fields.flag_for('response')}/{fields.flag_for('completion')}")
    if "messages" in forms:
        wanted.append(f"a {fields.flag_for('messages')} list")
    listed = wanted[0] if len(wanted) == 1 else ", ".join(wanted[:-1]) + ", nor " + wanted[-1]
    raise DataError(f"{where} has neither {listed} (keys: {sorted(row)}); name your columns with --text-field or --field-map.")


def _kind_of(value: Any) -> str:
    """A value's type as a data file would say it: null, a list, a struct (object), a number."""
    if value is None:
        return "null"
    if isinstance(value, Mapping):
        return "a struct (object)"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, str):
        return "a string"
    return "a number" if isinstance(value, (int, float)) else f"a {type(value).__name__}"


def _refuse_unusable_values(row: Mapping[str, Any], fields: FieldMap, where: str, forms: tuple[str, ...]) -> None:
    """A column that is there with a value we cannot use (null, a list or a struct where a string belongs) is said as
    such, naming the column and what it holds, rather than reported as a missing column."""
    col = fields.column
    names = [n for form in forms for n in {"text": ("text",), "pair": ("prompt", "response", "completion"), "messages": ("messages",)}[form]]
    for name in names:
        if col(name) not in row:
            continue
        value = row[col(name)]
        if name == "messages" and isinstance(value, list):
            continue
        if name in ("prompt", "response", "completion") and isinstance(value, (str, list)):
            continue
        if name == "text" and isinstance(value, str):
            continue
        want = "a list of messages" if name == "messages" else "a string" if name == "text" else "a string or a list of messages"
        raise DataError(f"{where}: {fields.flag_for(name)} is {_kind_of(value)}, and it must be {want}; fix or drop that record.")


def _messages(value: Any, where: str, name: str) -> list[dict[str, Any]]:
    """A list of chat messages, each with a ``role`` and a ``content`` string (None-valued keys dropped: Arrow structs
    fill absent keys with null, which chat templates would read as present)."""
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: {name} must be a non-empty list of messages ({{'role': ..., 'content': ...}}).")
    messages = []
    for index, message in enumerate(value):
        if not isinstance(message, Mapping) or not isinstance(message.get("role"), str):
            raise DataError(f"{where}: message {index} of {name} has no 'role' string (got {message!r:.80}).")
        message = {key: item for key, item in message.items() if item is not None}
        if not isinstance(message.get("content"), str) and "tool_calls" not in message:
            raise DataError(f"{where}: message {index} of {name} ({message['role']}) has no 'content' string.")
        messages.append(message)
    return messages


def _chat(messages: list[dict[str, Any]], trained_from: int, where: str) -> ChatRecord:
    if messages[0]["role"] == "assistant":
        raise DataError(f"{where}: the conversation starts with an assistant turn, so that turn has nothing to answer (its loss is "
                        "the reply given what came before); start it with a user or system message, or drop that turn.")
    if not any(m["role"] == "assistant" for m in messages[trained_from:]):
        part = "its completion" if trained_from else "it"
        raise DataError(f"{where}: {part} has no assistant message to train on (roles: "
                        f"{', '.join(m['role'] for m in messages[trained_from:])}).")
    return ChatRecord(messages, trained_from)


# --------------------------------------------------------------------------------------------
# .jsonl


def _read_jsonl(path: Path, flag: str, fields: FieldMap) -> RecordSet:
    records: list[Record] = []
    lines: list[int] = []
    try:
        with path.open(encoding="utf-8") as handle:
            for number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as error:
                    raise DataError(f"{path}:{number} is not valid JSON ({error.msg}).") from None
                if not isinstance(row, dict):
                    raise DataError(f"{path}:{number} must be a JSON object with 'text', 'prompt'/'response' or 'messages'.")
                records.append(to_record(row, fields, f"{path}:{number}"))
                lines.append(number)
    except UnicodeDecodeError:
        number = 1
        for number, raw in enumerate(path.read_bytes().split(b"\n"), 1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError:
                break
        raise DataError(f"{path}:{number} is not UTF-8 text; save the file as UTF-8.") from None
    except OSError as error:
        raise DataError(f"{flag} {path} cannot be read ({error.strerror}).") from None
    if not records:
        raise DataError(f"{path} has no records.")
    return RecordSet(records, str(path), lines)


# --------------------------------------------------------------------------------------------
# datasets on disk


def _import_datasets(flag: str, path: Path):
    from ...extras import MissingExtraError

    try:
        import datasets
    except ImportError:
        raise MissingExtraError(f"{flag} {path}: reading {path.suffix or 'a save_to_disk folder'} needs the optional 'datasets' "
                                "library: pip install 'paca-hal[data]'  (or: pip install datasets)") from None
    return datasets


@contextlib.contextmanager
def _quiet_progress(datasets) -> Iterator[None]:
    """No "Generating train split" bars: reading a local file is not a download."""
    was_disabled = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            datasets.enable_progress_bars()


def open_dataset(path: Path, flag: str, split: str | None):
    """The ``datasets.Dataset`` at ``path`` and its name for messages. Parquet and CSV are converted in a temporary
    folder and held in memory, so nothing is left in the Hugging Face cache; Arrow files and save_to_disk folders are
    memory-mapped where they are."""
    datasets = _import_datasets(flag, path)
    what = "a save_to_disk folder" if path.is_dir() else f"a .{path.suffix.lower()[1:]} file"
    if path.suffix.lower() == ".csv" and path.is_file():
        _check_csv(path, flag)  # the file and line named, not the datasets library's internal errors
    try:
        with _quiet_progress(datasets):
            if path.is_dir():
                loaded = datasets.load_from_disk(str(path))
            elif path.suffix.lower() == ".arrow":
                loaded = _read_arrow(datasets, path)
            else:
                reader = datasets.Dataset.from_parquet if path.suffix.lower() == ".parquet" else datasets.Dataset.from_csv
                with tempfile.TemporaryDirectory(prefix="paca-data-") as cache:
                    loaded = reader(str(path), cache_dir=cache, keep_in_memory=True)
    except DataError:
        raise
    except Exception as error:  # noqa: BLE001 - any reader failure is the file's problem, said in one line
        first = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
        raise DataError(f"{flag} {path} cannot be read as {what} ({type(error).__name__}: {first}).") from None
    if isinstance(loaded, datasets.DatasetDict):
        splits = list(loaded)
        if split is None:
            chosen = next((name for name in HELD_OUT_SPLITS if name in loaded), None)
            if chosen is None:
                raise DataError(f"{flag} {path} holds the splits {splits}, none named {' or '.join(HELD_OUT_SPLITS)}: save the "
                                "held-out split on its own (dataset['NAME'].save_to_disk(FOLDER)) and pass that folder.")
            split = chosen
        elif split not in loaded:
            raise DataError(f"{flag} {path} holds the splits {splits}, not {split!r}; choose one with --data-split.")
        return loaded[split], f"{path} (split {split})"
    return loaded, str(path)


#: The first bytes of an Arrow IPC *file* (random-access format); datasets writes the *stream* format.
ARROW_FILE_MAGIC = b"ARROW1"


def _read_arrow(datasets, path: Path):
    """An ``.arrow`` file in either Arrow IPC format: the stream format (what datasets writes) memory-mapped, or the
    file format (pyarrow's ``ipc.new_file``, feather v2) read into memory."""
    with open(path, "rb") as handle:
        head = handle.read(len(ARROW_FILE_MAGIC))
    if head != ARROW_FILE_MAGIC:
        return datasets.Dataset.from_file(str(path))
    import pyarrow.ipc

    with pyarrow.ipc.open_file(str(path)) as reader:
        return datasets.Dataset(reader.read_all())


def _check_csv(path: Path, flag: str) -> None:
    """A CSV file's structure, with Python's own reader: a header and at least one row, every row as wide as the
    header, quotes closed. The line is named."""
    import csv

    try:
        with path.open(encoding="utf-8", newline="") as handle:
            reader = csv.reader(handle, strict=True)
            header = next(reader, None)
            if header is None or not any(cell.strip() for cell in header):
                raise DataError(f"{flag} {path} is empty: a .csv file needs a header line naming its columns, then one row per record.")
            rows = 0
            for row in reader:
                if not row:
                    continue
                if len(row) != len(header):
                    raise DataError(f"{path}:{reader.line_num} has {len(row)} fields, and the header has {len(header)} "
                                    f"({', '.join(header)}); quote fields that hold commas.")
                rows += 1
    except csv.Error as error:
        raise DataError(f"{path}:{reader.line_num} is not valid CSV ({error}); close the quote or escape it as \"\".") from None
    except UnicodeDecodeError:
        raise DataError(f"{path} is not UTF-8 text; save the file as UTF-8.") from None
    if not rows:
        raise DataError(f"{flag} {path} has a header ({', '.join(header)}) and no rows.")


def _read_dataset(path: Path, flag: str, split: str | None, fields: FieldMap) -> RecordSet:
    dataset, source = open_dataset(path, flag, split)
    columns = list(dataset.column_names)
    col = fields.column
    for name in sorted(fields.explicit):
        if col(name) not in columns:
            raise DataError(f"{flag} {source} has no column {col(name)!r} (named for '{name}'); its columns: {columns}.")
    forms = []
    for form in _forms(fields):
        if form == "messages" and col("messages") in columns:
            forms.append(form)
        elif form == "pair" and col("prompt") in columns and (col("response") in columns or col("completion") in columns):
            forms.append(form)
        elif form == "text" and col("text") in columns:
            forms.append(form)
    if not forms:
        raise DataError(f"{flag} {source} has no column this run can train on: it needs {col('text')!r}, {col('prompt')!r} with "
                        f"{col('response')!r}/{col('completion')!r}, or {col('messages')!r}, and its columns are {columns}; name "
                        "yours with --text-field NAME or --field-map prompt=COLUMN,response=COLUMN.")
    if len(dataset) == 0:
        raise DataError(f"{flag} {source} has no rows.")
    names = {"messages": ("messages",), "pair": ("prompt", "response", "completion"), "text": ("text",)}
    wanted = [c for c in columns if c in {col(n) for form in forms for n in names[form]}]  # no other column is decoded
    records: list[Record] = []
    index = 0
    for batch in dataset.select_columns(wanted).iter(batch_size=1024):
        names = list(batch)
        for values in zip(*(batch[n] for n in names)):
            records.append(to_record(dict(zip(names, values)), fields, f"{source} row {index}", tuple(forms)))
            index += 1
    return RecordSet(records, source)

