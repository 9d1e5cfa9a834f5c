"""``paca train --config run.yaml``: the same keys as the flags, read before the flags, written back with the run.

A config file (YAML, or JSON) maps flag names to values: the argparse names (``seq_len``) or the flag spelling
(``seq-len``). Its values become the parser's defaults, so every flag given on the command line overrides the file.
A key that is no flag is an error naming it (and the closest flag); a value of the wrong type is an error naming
the key and what it takes. ``--overwrite``, ``--resume`` and ``--trust-checkpoint`` are refused in a file: they say
what to do with an existing ``--out`` *this* time, so they belong on the command line.

Each run writes its resolved flags to ``<out>/config.yaml`` (with its first write into the run folder, through
:class:`RecordingRunFolder`), local paths made absolute, so ``paca train --config runs/x/config.yaml`` repeats it;
into the same ``--out`` that still needs ``--overwrite`` (or ``--resume``) on the command line. Torch-free.
"""
from __future__ import annotations

import argparse
import datetime
import difflib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .._version import __version__
from ..errors import PacaConfigError
from ..files.outputs import OutputTarget, RunFolder

#: The file a run writes its resolved flags to, in its output folder.
CONFIG_NAME = "config.yaml"
#: Flags a config file may not set: what to do with an existing --out this time, and the file itself.
COMMAND_LINE_ONLY = {
    "overwrite": "it replaces an existing run",
    "resume": "it continues an existing run",
    "trust_checkpoint": "it vouches for a checkpoint",
    "config": "a config file does not name another",
}
#: Keys whose values are local paths: written absolute, since the file is read from wherever the next run starts.
PATH_KEYS = ("model", "data", "eval_data", "out", "logging_dir", "deepspeed")
#: Keys holding comma-separated names, which a file may also give as a list.
LIST_KEYS = ("report_to", "target_modules")
#: What argparse types take, in words (other types say it with an ``expects`` attribute).
_TYPE_WORDS = {int: "a whole number", float: "a number", None: "a string"}


def config_actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """The flags a config file may set, by argparse name (hidden and command-line-only ones left out)."""
    return {action.dest: action for action in parser._actions  # argparse has no public list of its actions
            if action.option_strings and action.help is not argparse.SUPPRESS and action.dest not in COMMAND_LINE_ONLY
            and action.dest != "help"}


def read_config_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The mapping in a ``.yaml``/``.yml``/``.json`` file; one line naming the file when it cannot be read."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise PacaConfigError(f"--config {path}: no such file; pass a .yaml or .json file of paca train flags "
                              f"(an earlier run writes one: <out>/{CONFIG_NAME}).")
    suffix = path.suffix.lower()
    if suffix not in (".yaml", ".yml", ".json"):
        raise PacaConfigError(f"--config {path}: a config file is .yaml, .yml or .json (got {suffix or 'no extension'}).")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise PacaConfigError(f"--config {path} cannot be read ({error}).") from None
    if suffix == ".json":
        try:
            document = json.loads(text)
        except json.JSONDecodeError as error:
            raise PacaConfigError(f"--config {path} is not valid JSON (line {error.lineno}: {error.msg}).") from None
    else:
        yaml = _yaml(f"--config {path}")
        try:
            document = yaml.safe_load(text)
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            where = f"line {mark.line + 1}: " if mark is not None else ""
            raise PacaConfigError(f"--config {path} is not valid YAML ({where}{getattr(error, 'problem', None) or error}).") from None
    if document is None:
        return {}
    if not isinstance(document, dict):
        raise PacaConfigError(f"--config {path}: the file must hold a mapping of flag names to values (got a {type(document).__name__}).")
    return document


def config_values(document: Mapping[Any, Any], parser: argparse.ArgumentParser, source: str) -> dict[str, Any]:
    """The file's keys as argparse names with values of the types the flags take; raises one line per first problem."""
    actions = config_actions(parser)
    values: dict[str, Any] = {}
    spelled: dict[str, str] = {}
    for key, value in document.items():
        name = str(key).lstrip("-").replace("-", "_")
        if name in COMMAND_LINE_ONLY:
            flag = "--" + name.replace("_", "-")
            raise PacaConfigError(f"{source}: {key!r} is a command-line flag only ({COMMAND_LINE_ONLY[name]}): drop it from the file "
                                  f"and pass {flag} when you run it.")
        if name not in actions:
            close = difflib.get_close_matches(name, list(actions), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise PacaConfigError(f"{source}: unknown key {key!r}{hint}; the keys are paca train's flags (paca train --help), "
                                  "as seq_len or seq-len.")
        if name in spelled:
            raise PacaConfigError(f"{source}: {spelled[name]!r} and {key!r} are the same flag; keep one of them.")
        spelled[name] = str(key)
        values[name] = coerce(actions[name], str(key), value, source)
    return values


def coerce(action: argparse.Action, key: str, value: Any, source: str) -> Any:
    """``value`` as the flag ``action`` would have parsed it, or one line naming the key and the type it takes."""
    expected = describe_type(action)

    def wrong(reason: str | None = None) -> PacaConfigError:
        got = f"got {value!r}" + ("" if value is None else f" ({type(value).__name__})")
        return PacaConfigError(f"{source}: {key}: expected {expected}, {got}" + (f": {reason}" if reason else "") + ".")

    if value is None:
        if action.default is None and action.nargs != 0:
            return None
        raise wrong()
    if action.nargs == 0:  # an on/off switch
        if isinstance(value, bool):
            return value
        raise wrong()
    if action.dest in LIST_KEYS and isinstance(value, list) and all(isinstance(v, str) for v in value):
        value = ",".join(value)
    kind = action.type
    if isinstance(value, bool) or isinstance(value, (list, dict)):
        raise wrong()
    if isinstance(value, (int, float)) and not isinstance(value, str):
        if kind is int or _takes_whole_numbers(kind):
            if isinstance(value, float):
                raise wrong()
            result: Any = value if kind is int else kind(str(value))
        elif kind is float:
            result = float(value)
        else:  # a string flag given a number (loss_chunk_tokens: 1024): the flag reads the same text
            value = str(value)
            result = value if kind is None else _convert(kind, value, wrong)
    elif isinstance(value, str):
        result = value if kind is None else _convert(kind, value, wrong)
    else:
        raise wrong()
    if action.choices is not None and result not in action.choices:
        raise wrong()
    return result


def _convert(kind, text: str, wrong):
    try:
        return kind(text)
    except (argparse.ArgumentTypeError, ValueError, TypeError) as error:
        raise wrong(str(error) if isinstance(error, argparse.ArgumentTypeError) else None) from None


def _takes_whole_numbers(kind) -> bool:
    return bool(getattr(kind, "whole_numbers", False))


def describe_type(action: argparse.Action) -> str:
    """What a flag takes, in words (for the type errors)."""
    if action.nargs == 0:
        return "true or false"
    if action.choices is not None:
        return "one of " + ", ".join(map(str, action.choices))
    words = getattr(action.type, "expects", None) or _TYPE_WORDS.get(action.type, "a string")
    return words + (" or null" if action.default is None else "")


def apply_config_file(parser: argparse.ArgumentParser, path: str | os.PathLike[str]) -> dict[str, Any]:
    """Make the file's values ``parser``'s defaults (so the command line overrides them); returns them."""
    values = config_values(read_config_file(path), parser, f"--config {path}")
    parser.set_defaults(**values)
    return values


def resolved_config(args: argparse.Namespace, parser: argparse.ArgumentParser) -> dict[str, Any]:
    """Every flag a config file may set, with this run's value, in ``--help``'s order; local paths absolute."""
    values = {}
    for name in config_actions(parser):
        if not hasattr(args, name):
            continue
        value = getattr(args, name)
        if name in PATH_KEYS and isinstance(value, str) and value != "default" and (name != "deepspeed" or os.path.exists(value)):
            value = os.path.abspath(os.path.expanduser(value))
        values[name] = value
    return values


def config_text(values: Mapping[str, Any], groups: list[tuple[str, list[str]]] | None = None) -> str:
    """``config.yaml``'s text: a header saying how to repeat the run, then ``key: value`` lines under group comments."""
    yaml = _yaml(f"writing {CONFIG_NAME}")
    written = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        f"# paca train's resolved flags (paca-hal {__version__}, {written}).",
        f"# Repeat the run:  paca train --config {os.path.join(str(values.get('out') or '<out>'), CONFIG_NAME)}",
        "# Flags on the command line override these values. `out` is this run's folder: a repeat into it needs",
        "# --overwrite (or --resume) on the command line; pass another --out to keep both.",
        "# `null`: the flag's own default (per method, per device).",
    ]
    placed: set[str] = set()
    for title, names in groups or []:
        present = [name for name in names if name in values]
        if not present:
            continue
        lines += ["", f"# {title}"]
        for name in present:
            lines.append(_yaml_line(yaml, name, values[name]))
            placed.add(name)
    rest = [name for name in values if name not in placed]
    if rest:
        lines.append("")
        lines += [_yaml_line(yaml, name, values[name]) for name in rest]
    return "\n".join(lines) + "\n"


def _yaml_line(yaml, name: str, value: Any) -> str:
    return yaml.safe_dump({name: value}, default_flow_style=False, sort_keys=False, allow_unicode=True, width=10**6).rstrip("\n")


def _yaml(purpose: str):
    try:
        import yaml
    except ImportError:
        raise PacaConfigError(f"{purpose} needs PyYAML, which is not installed: pip install pyyaml (or use a .json config).") from None
    return yaml


class RecordingRunFolder(RunFolder):
    """``paca train``'s run folder that writes ``config.yaml`` with the run's first entry, so the previous run (with
    ``--overwrite``) is still replaced at the first write and not before, and the folder's marker lists the file."""

    def __init__(self, target: OutputTarget, text: str | None):
        super().__init__(target)
        self._pending = text

    def claim(self, entry: str) -> Path:
        path = super().claim(entry)
        if self._pending is not None and entry != CONFIG_NAME:
            from ..files.atomic import write_bytes_atomic

            text, self._pending = self._pending, None
            write_bytes_atomic(super().claim(CONFIG_NAME), text.encode("utf-8"))
        return path

    def claim_fresh(self, entry: str) -> Path:
        """Claim a folder this run adds files to rather than replaces whole (a tracker's): with ``--overwrite`` the
        previous run's files there (those the preflight checked) are removed first, so the old run's curves do not mix
        with the new; a file a user added there is never among them."""
        fresh = entry in self._stale or (not self._claimed and self.target.previous and self.target.overwrite
                                         and entry in self.target.previous_entries)
        path = self.claim(entry)
        if fresh:
            self.remove_previous(entry)
        return path


__all__ = ["COMMAND_LINE_ONLY", "CONFIG_NAME", "RecordingRunFolder", "apply_config_file", "coerce", "config_actions", "config_text",
           "config_values", "describe_type", "read_config_file", "resolved_config"]
