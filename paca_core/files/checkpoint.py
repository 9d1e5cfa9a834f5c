"""Adapter checkpoints: ``adapter_model.safetensors`` + ``adapter_config.json``, written atomically."""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .peft_paca import is_peft_document, translate_config, translate_tensors
from .._version import __version__
from .atomic import staging_for
from ..base_config import MethodConfig, method_name
from ..config import config_from_dict
from ..errors import CheckpointError, PacaConfigError
from ..distributed.sharding import full_tensor, shard_like
from ..surgery.targets import module_io

logger = logging.getLogger(__name__)

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
FORMAT_VERSION = 1


def _base_model_name(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    return getattr(config, "_name_or_path", None) or None


def adapter_state(adapted_model) -> dict[str, torch.Tensor]:
    """The tensors that define the adapter, keyed ``<module>.<tensor>`` (e.g. ``…q_proj.paca_delta``).

    Under FSDP and ZeRO-3 this gathers the shards: every process must call it (in the same order).
    """
    state = {}
    with torch.no_grad():
        for name, layer in adapted_model.adapter_layers().items():
            for key, tensor in layer.adapter_state().items():
                state[f"{name}.{key}"] = full_tensor(tensor).detach().to("cpu").contiguous()
    return state


def _config_index(adapted_model, layer) -> int:
    index = layer.config_index
    if index is None or not 0 <= index < len(adapted_model.configs):
        raise ValueError(f"Layer {layer.module_name} was not created by prepare_model; cannot tell which config made it.")
    return index


def write_adapter_files(
    adapted_model, directory: Path, extra_metadata: dict[str, Any] | None = None, tensors: dict[str, torch.Tensor] | None = None
) -> None:
    """Write the adapter's two files into an existing directory (callers make it atomic).

    ``tensors``: :func:`adapter_state` already gathered (FSDP: by every process, before only one writes).
    """
    layers = adapted_model.adapter_layers()
    document = {
        "format_version": FORMAT_VERSION,
        "library": "paca-hal",
        "library_version": __version__,
        "method": adapted_model.method,
        "configs": [config.to_dict() for config in adapted_model.configs],
        "base_model": _base_model_name(adapted_model.base_model),
        "modules": {
            n: {"config": _config_index(adapted_model, m), "in_features": m.in_features, "out_features": m.out_features}
            for n, m in layers.items()
        },
        **(extra_metadata or {}),
    }
    tensors = adapter_state(adapted_model) if tensors is None else tensors
    save_file(tensors, str(directory / WEIGHTS_NAME), metadata={"format": "pt", "library": "paca-hal"})
    (directory / CONFIG_NAME).write_text(json.dumps(document, indent=2, sort_keys=True))


def save_adapter(
    adapted_model, directory: str | Path, extra_metadata: dict[str, Any] | None = None, is_main_process: bool = True
) -> Path:
    """Write the adapter atomically; the previous checkpoint at ``directory`` survives any failure. Other files
    in ``directory`` are never deleted (as with PEFT's ``save_pretrained``).

    Under FSDP every process calls this (the shards are gathered) and only ``is_main_process`` writes.
    """
    directory = Path(directory)
    tensors = adapter_state(adapted_model)
    if not is_main_process:
        return directory
    with staging_for(directory, (WEIGHTS_NAME, CONFIG_NAME)) as staging:  # other files in the folder are left alone
        write_adapter_files(adapted_model, staging, extra_metadata, tensors=tensors)
    logger.info("Saved adapter (%d layers) to %s", len(adapted_model.adapter_layers()), directory)
    return directory


def read_adapter_config(directory: str | Path) -> dict[str, Any]:
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"Adapter directory {directory} does not exist (or is not a directory).")
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: {directory} is not a paca-hal adapter checkpoint.")
    try:
        document = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{path} is not valid JSON ({error}); the checkpoint is corrupt.") from None
    if not isinstance(document, dict):
        raise CheckpointError(f"{path} holds a JSON {type(document).__name__}, not an adapter config; the checkpoint is corrupt.")
    if is_peft_document(document):  # PEFT's own PaCA format, read as ours
        return translate_config(directory, document)
    for key in ("method", "configs", "modules"):
        if key not in document:
            raise CheckpointError(f"{path} has no '{key}' entry; the checkpoint is corrupt or not from paca-hal.")
    return document


def saved_module_methods(document: dict[str, Any]) -> dict[str, str]:
    """``{module: method}`` of a checkpoint's layers, from its config alone (modules whose config entry is unreadable
    say ``"?"``)."""
    configs = document.get("configs") or []
    methods = {}
    for name, entry in document.get("modules", {}).items():
        index = entry.get("config", 0) if isinstance(entry, dict) else None
        config = configs[index] if isinstance(index, int) and 0 <= index < len(configs) and isinstance(configs[index], dict) else {}
        methods[name] = str(config.get("method", "?"))
    return methods


def config_differences(saved: list[dict[str, Any]], current: list[dict[str, Any]]) -> list[str]:
    """``key: checkpoint X vs now Y`` for each method-config field that differs (the method first)."""
    saved_methods = [c.get("method") for c in saved]
    current_methods = [c.get("method") for c in current]
    if saved_methods != current_methods:
        return [f"method: checkpoint {'+'.join(map(str, saved_methods))!r} vs now {'+'.join(map(str, current_methods))!r}"]
    saved = [_as_current(entry) for entry in saved]
    return [f"{key}: checkpoint {s.get(key)!r} vs now {c.get(key)!r}" for s, c in zip(saved, current) for key in c if s.get(key) != c.get(key)]


def _as_current(entry: dict[str, Any]) -> dict[str, Any]:
    """A saved config as this release reads it (fields added since then filled in as the saving release meant
    them), so a field that did not exist yet is no difference; an entry that cannot be read is compared as saved."""
    try:
        return config_from_dict(entry).to_dict()
    except (PacaConfigError, TypeError):
        return entry


def read_configs(document: dict[str, Any], directory) -> list[MethodConfig]:
    try:
        return [config_from_dict(entry) for entry in document["configs"]]
    except (PacaConfigError, TypeError) as error:
        raise CheckpointError(f"Checkpoint {directory} has an invalid config: {error}") from None


def read_adapter_tensors(directory: str | Path, document: dict[str, Any] | None = None) -> dict[str, torch.Tensor]:
    """The adapter's tensors keyed as :func:`adapter_state` keys them (``document``: its config as
    :func:`read_adapter_config` read it; a PEFT PaCA folder's keys are translated)."""
    path = Path(directory) / WEIGHTS_NAME
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: the adapter weights were not saved or were deleted.")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"{path} cannot be read ({error}); the checkpoint is corrupt or truncated.") from None
    if document is not None and document.get("format") == "peft":
        return translate_tensors(tensors)
    return tensors


def plan_loading(model: nn.Module, directory: str | Path, method: str | None = None):
    """Read and check a checkpoint before anything changes: ``(configs, saved_targets, tensors)``.

    ``configs`` target exactly the saved modules (each with the config that made it, whatever the
    patterns match here); ``saved_targets`` are the patterns to restore once prepared. The caller
    prepares the model with ``configs`` and calls :func:`finish_loading` (``paca_core.model.load_adapter``).
    """
    document = read_adapter_config(directory)
    if method is not None and document["method"] != method:
        raise CheckpointError(
            f"Checkpoint {directory} was trained with method {document['method']!r}, but {method!r} was requested."
        )
    configs = read_configs(document, directory)
    if method_name(configs) != document["method"]:
        raise CheckpointError(
            f"Checkpoint {directory} says method {document['method']!r} but its configs are {method_name(configs)!r}; the file is corrupt."
        )
    tensors = read_adapter_tensors(directory, document)
    expected = document["modules"]
    check_model_fits(model, expected, directory)
    saved_targets = [config.target_modules for config in configs]
    for index, config in enumerate(configs):
        if config.modifier:
            continue  # modifiers apply to the layers above, with their saved targets
        names = [n for n, entry in expected.items() if entry.get("config", 0) == index]
        if not names:
            raise CheckpointError(f"Checkpoint {directory}: config {index} ({config.method}) adapts no module; the file is corrupt.")
        config.target_modules = "|".join(re.escape(n) for n in names)
        config.exclude_modules = []
    return configs, saved_targets, tensors


def finish_loading(adapted, saved_targets: list, tensors: dict[str, torch.Tensor], directory, is_trainable: bool) -> None:
    """Restore the saved target patterns, load the tensors, and set what trains."""
    for config, targets in zip(adapted.configs, saved_targets):
        config.target_modules = targets
    load_adapter_tensors(adapted, tensors, directory)
    for layer in adapted.adapter_layers().values():
        frozen = layer.frozen_adapter_parameters
        for key, tensor in layer.adapter_state().items():
            if isinstance(tensor, nn.Parameter):
                tensor.requires_grad_(is_trainable and key not in frozen)


def check_model_fits(model: nn.Module, expected: dict[str, dict[str, int]], directory) -> None:
    modules = dict(model.named_modules())
    missing = [n for n in expected if n not in modules]
    if missing:
        raise CheckpointError(
            f"Checkpoint {directory} adapts modules this model does not have: {', '.join(missing[:5])}"
            f"{' …' if len(missing) > 5 else ''} ({len(missing)} of {len(expected)}). Load it into the base model it was trained on."
        )
    for name, shape in expected.items():
        actual = module_io(modules[name])
        if "in_features" not in shape:  # a PEFT PaCA adapter records only what its tensors' shapes say
            if actual[1] != shape["out_features"]:
                raise CheckpointError(
                    f"Checkpoint {directory}: module {name} has {shape['out_features']} outputs in the adapter but "
                    f"{actual[1]} in this model; it was trained on a different base model."
                )
            continue
        if actual != (shape["in_features"], shape["out_features"]):
            raise CheckpointError(
                f"Checkpoint {directory}: module {name} is {shape['in_features']}→{shape['out_features']} in the "
                f"checkpoint but {actual[0]}→{actual[1]} in this model; it was trained on a different base model."
            )


@torch.no_grad()
def load_adapter_tensors(adapted_model, tensors: dict[str, torch.Tensor], directory) -> None:
    layers = adapted_model.adapter_layers()
    shapes = {f"{n}.{key}": shape for n, layer in layers.items() for key, shape in layer.adapter_state_shapes().items()}
    missing = sorted(set(shapes) - set(tensors))
    unexpected = sorted(set(tensors) - set(shapes))
    if missing or unexpected:
        raise CheckpointError(
            f"Checkpoint {directory} does not match its config: missing tensors {missing[:4]}, unexpected {unexpected[:4]}."
        )
    wrong = [f"{k} is {tuple(tensors[k].shape)}, expected {shape}" for k, shape in shapes.items() if tuple(tensors[k].shape) != shape]
    if wrong:
        raise CheckpointError(f"Checkpoint {directory}: {'; '.join(wrong[:3])}.")
    for name, layer in layers.items():
        prefix = name + "."
        current = layer.adapter_state()
        own = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix) and "." not in k[len(prefix):]}
        try:
            layer.load_adapter_state({k: shard_like(v, current[k]) for k, v in own.items()})  # FSDP: each rank its rows
        except ValueError as error:
            raise CheckpointError(f"Checkpoint {directory}: {error}") from None
