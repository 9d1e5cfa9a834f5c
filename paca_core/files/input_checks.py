"""Checks of what a command reads, shared by every command, so an odd input is one clear line before any heavy work.

* Paths: every path flag and ``--config`` key has ``~`` expanded once, right after parsing (:func:`expand_user_paths`),
  so no part of a run reads ``$HOME/x`` while another writes a literal ``./~/x``.
* A model's ``config.json``: valid JSON, an object, and the shape fields a decoder needs, consistent with each other
  (:func:`check_model_config`), so a damaged folder is not blamed on its tokenizer, a config that names only its
  ``model_type`` does not plan transformers' default 7B shape, and a hidden size that is not a multiple of the heads
  is said before transformers raises inside model construction.
* Negative numbers as flag values (``--lr -1e-3``): argparse reads ``-1e-3`` as a flag, so :func:`accept_negative_numbers`
  lets a parser take any number that starts with ``-`` as a value (the range checks then say what is wrong with it).

Torch-free: the CLI calls these before anything heavy is imported.
"""
from __future__ import annotations

import argparse
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import PacaConfigError

#: Flags (argparse names) of every ``paca`` command whose values are local paths.
PATH_DESTS = ("model", "data", "eval_data", "out", "logging_dir", "deepspeed", "adapter", "resume", "config", "accuracy_model")

#: Shape fields a decoder's config.json must give itself (transformers' class defaults describe another model).
SHAPE_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")

#: Any number, negative or in exponent form: argparse's own pattern misses ``-1e-3`` and ``-.5e2``.
_NUMBER = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$|^-(inf|nan)$", re.IGNORECASE)


def expand_user_paths(args: argparse.Namespace) -> argparse.Namespace:
    """``~`` and ``~user`` expanded in every path flag, once (a quoted ``'~/x'`` or a config file's ``out: ~/x`` reaches
    us unexpanded; the shell expands only unquoted words). Relative paths stay relative."""
    for name in PATH_DESTS:
        value = getattr(args, name, None)
        if isinstance(value, (str, os.PathLike)) and os.fspath(value).startswith("~"):
            expanded = os.path.expanduser(os.fspath(value))
            setattr(args, name, type(value)(expanded) if isinstance(value, Path) else expanded)
    return args


def accept_negative_numbers(parser: argparse.ArgumentParser) -> None:
    """Let ``parser`` read ``-1e-3`` as a value rather than as an unknown flag (argparse's pattern is kept private,
    and has no exponent form), so ``--lr -1e-3`` reaches the check that says a learning rate must be positive."""
    parser._negative_number_matcher = _NUMBER  # noqa: SLF001 - argparse offers no public switch for this


def read_model_config(path: str | os.PathLike[str], flag: str = "--model") -> dict[str, Any]:
    """The fields of a model folder's ``config.json`` (or of a config.json path), checked; one line naming the file when
    it is missing, not JSON, not an object, or its shape is unusable."""
    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PacaConfigError(f"{flag} {path} has no config.json, so it is not a Hugging Face model folder: pass the folder "
                              "save_pretrained wrote.") from None
    except (OSError, UnicodeDecodeError) as error:
        raise PacaConfigError(f"{flag} {path}: {file} cannot be read ({getattr(error, 'strerror', None) or error}).") from None
    try:
        fields = json.loads(text)
    except json.JSONDecodeError as error:
        raise PacaConfigError(f"{flag} {path}: {file} is not valid JSON (line {error.lineno}: {error.msg}); the model folder "
                              "is damaged: restore config.json from the original download.") from None
    if not isinstance(fields, dict):
        raise PacaConfigError(f"{flag} {path}: {file} holds a JSON {type(fields).__name__}, not an object; restore config.json "
                              "from the original download.")
    check_model_config(fields, str(file))
    return fields


def check_model_config(fields: Mapping[str, Any], where: str) -> None:
    """A decoder's shape, from config.json's own fields: the shape fields present (under their own name or the one the
    model type's config class maps them to), positive whole numbers, and heads that divide the hidden size and are a
    multiple of the key/value heads. Configs that nest the text model (``text_config``) are checked there."""
    text_config = fields.get("text_config")
    if isinstance(text_config, Mapping):
        check_model_config({"model_type": fields.get("model_type"), **text_config}, f"{where} (text_config)")
        return
    aliases = _attribute_map(fields.get("model_type"))
    if aliases is None:
        return  # no or an unknown model_type: the config's loader says so, naming the type
    values: dict[str, Any] = {}
    missing = []
    for name in SHAPE_FIELDS + ("num_key_value_heads", "head_dim"):
        key = name if name in fields else aliases.get(name)
        if key is not None and key in fields and fields[key] is not None:
            values[name] = fields[key]
        elif name in SHAPE_FIELDS:
            missing.append(name)
    if missing:
        raise PacaConfigError(f"{where} does not give {', '.join(missing)}: transformers would fill in its own defaults (a "
                              "different model's shape); pass the model's full config.json.")
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise PacaConfigError(f"{where}: {name} is {value!r}; it must be a positive whole number. Restore config.json from "
                                  "the original download.")
    hidden, heads = values["hidden_size"], values["num_attention_heads"]
    if hidden % heads:  # transformers refuses it too (head_dim or not), from inside model construction
        raise PacaConfigError(f"{where}: hidden_size {hidden} is not a multiple of num_attention_heads {heads}; fix the two numbers "
                              "(or restore config.json from the original download).")
    kv_heads = values.get("num_key_value_heads", heads)
    if heads % kv_heads:
        raise PacaConfigError(f"{where}: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}, so the "
                              "key/value heads cannot be shared evenly; fix the two numbers.")


def _attribute_map(model_type: Any) -> dict[str, str] | None:
    """The model type's config class's names for the standard fields (GPT-2: ``n_embd`` for ``hidden_size``); None for
    a missing or unknown type."""
    if not isinstance(model_type, str):
        return None
    try:
        from transformers import CONFIG_MAPPING

        return dict(getattr(CONFIG_MAPPING[model_type], "attribute_map", {}) or {})
    except (ImportError, KeyError):
        return None


__all__ = ["PATH_DESTS", "SHAPE_FIELDS", "accept_negative_numbers", "check_model_config", "expand_user_paths", "read_model_config"]
