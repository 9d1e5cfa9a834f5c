"""Adapter checkpoints: ``adapter_model.safetensors`` + ``adapter_config.json``, written atomically."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ._version import __version__
from .atomic import atomic_directory
from .config import PaCAConfig
from .errors import CheckpointError, PacaConfigError

logger = logging.getLogger(__name__)

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
FORMAT_VERSION = 1


def _base_model_name(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    return getattr(config, "_name_or_path", None) or None


def adapter_state(paca_model) -> dict[str, torch.Tensor]:
    """The tensors that define the adapter, keyed ``<module>.paca_delta`` / ``<module>.paca_indices``."""
    state = {}
    for name, layer in paca_model.adapter_layers().items():
        state[f"{name}.paca_delta"] = layer.paca_delta.detach().to("cpu", torch.float32).contiguous()
        state[f"{name}.paca_indices"] = layer.paca_indices.detach().to("cpu", torch.int64).contiguous()
    return state


def write_adapter_files(paca_model, directory: Path, extra_metadata: dict[str, Any] | None = None) -> None:
    """Write the adapter's two files into an existing directory (callers make it atomic)."""
    layers = paca_model.adapter_layers()
    document = {
        "format_version": FORMAT_VERSION,
        "library": "paca-hal",
        "library_version": __version__,
        "method": paca_model.paca_config.method,
        "config": paca_model.paca_config.to_dict(),
        "base_model": _base_model_name(paca_model.base_model),
        "modules": {n: {"in_features": m.in_features, "out_features": m.out_features} for n, m in layers.items()},
        **(extra_metadata or {}),
    }
    save_file(adapter_state(paca_model), str(directory / WEIGHTS_NAME), metadata={"format": "pt", "library": "paca-hal"})
    (directory / CONFIG_NAME).write_text(json.dumps(document, indent=2, sort_keys=True))


def save_adapter(paca_model, directory: str | Path, extra_metadata: dict[str, Any] | None = None) -> Path:
    """Write the adapter atomically; the previous checkpoint at ``directory`` survives any failure."""
    directory = Path(directory)
    with atomic_directory(directory) as staging:
        write_adapter_files(paca_model, staging, extra_metadata)
    logger.info("Saved adapter (%d layers) to %s", len(paca_model.adapter_layers()), directory)
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
    for key in ("method", "config", "modules"):
        if key not in document:
            raise CheckpointError(f"{path} has no '{key}' entry; the checkpoint is corrupt or not from paca-hal.")
    return document


def read_adapter_tensors(directory: str | Path) -> dict[str, torch.Tensor]:
    path = Path(directory) / WEIGHTS_NAME
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: the adapter weights were not saved or were deleted.")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"{path} cannot be read ({error}); the checkpoint is corrupt or truncated.") from None


def load_adapter(model: nn.Module, directory: str | Path, device=None, is_trainable: bool = False, method: str = "paca"):
    """Prepare ``model`` as the checkpoint describes and load its deltas and indices (checked first)."""
    from .model import prepare_model  # local: model.py imports this module lazily too

    document = read_adapter_config(directory)
    if document["method"] != method:
        raise CheckpointError(
            f"Checkpoint {directory} was trained with method {document['method']!r}, but {method!r} was requested."
        )
    try:
        config = PaCAConfig.from_dict(document["config"])
    except (PacaConfigError, TypeError) as error:
        raise CheckpointError(f"Checkpoint {directory} has an invalid config: {error}") from None
    tensors = read_adapter_tensors(directory)
    expected = document["modules"]
    check_model_fits(model, expected, directory)
    # Prepare exactly the saved modules, whatever target_modules would match in this model.
    config.target_modules = "|".join(_regex_escape(n) for n in expected)
    config.exclude_modules = []
    paca_model = prepare_model(model, config, device=device)
    paca_model.paca_config.target_modules = document["config"]["target_modules"]
    load_adapter_tensors(paca_model, tensors, directory)
    for layer in paca_model.adapter_layers().values():
        layer.paca_delta.requires_grad_(is_trainable)
    return paca_model


def _regex_escape(name: str) -> str:
    import re

    return re.escape(name)


def check_model_fits(model: nn.Module, expected: dict[str, dict[str, int]], directory) -> None:
    modules = dict(model.named_modules())
    missing = [n for n in expected if n not in modules]
    if missing:
        raise CheckpointError(
            f"Checkpoint {directory} adapts modules this model does not have: {', '.join(missing[:5])}"
            f"{' …' if len(missing) > 5 else ''} ({len(missing)} of {len(expected)}). Load it into the base model it was trained on."
        )
    for name, shape in expected.items():
        module = modules[name]
        actual = (getattr(module, "in_features", None), getattr(module, "out_features", None))
        if actual != (shape["in_features"], shape["out_features"]):
            raise CheckpointError(
                f"Checkpoint {directory}: module {name} is {shape['in_features']}→{shape['out_features']} in the "
                f"checkpoint but {actual[0]}→{actual[1]} in this model; it was trained on a different base model."
            )


@torch.no_grad()
def load_adapter_tensors(paca_model, tensors: dict[str, torch.Tensor], directory) -> None:
    layers = paca_model.adapter_layers()
    expected_keys = {f"{n}.{s}" for n in layers for s in ("paca_delta", "paca_indices")}
    missing = sorted(expected_keys - set(tensors))
    unexpected = sorted(set(tensors) - expected_keys)
    if missing or unexpected:
        raise CheckpointError(
            f"Checkpoint {directory} does not match its config: missing tensors {missing[:4]}, unexpected {unexpected[:4]}."
        )
    for name, layer in layers.items():
        delta, indices = tensors[f"{name}.paca_delta"], tensors[f"{name}.paca_indices"]
        if tuple(delta.shape) != (layer.out_features, layer.r) or tuple(indices.shape) != (layer.r,):
            raise CheckpointError(
                f"Checkpoint {directory}: {name} has delta {tuple(delta.shape)} / indices {tuple(indices.shape)}, "
                f"expected ({layer.out_features}, {layer.r}) / ({layer.r},)."
            )
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= layer.in_features):
            raise CheckpointError(f"Checkpoint {directory}: {name} has column indices outside [0, {layer.in_features}).")
        if torch.unique(indices).numel() != indices.numel():
            raise CheckpointError(f"Checkpoint {directory}: {name} has repeated column indices; the file is corrupt.")
        layer.restore_original()
        layer.paca_indices.copy_(indices)
        layer.paca_original_columns = layer.base_layer.weight.detach().index_select(1, layer.paca_indices).clone()
        layer.paca_delta.copy_(delta)
        layer.apply_delta()
