"""PEFT's own PaCA format (``peft.tuners.paca``, peft >= 0.22), read and written, so adapters move both ways.

A PEFT PaCA folder holds ``adapter_config.json`` (``peft_type: PACA``, ``r``, ``paca_alpha``, ``target_modules``,
``paca_indices_pattern``, ...) and ``adapter_model.safetensors`` with ``base_model.model.<module>.paca_delta``
(out × k) and ``.paca_indices`` (k,) per layer. That is our own state under other names: PEFT's update of a layer is
``paca_alpha / r · delta`` in the columns ``paca_indices`` (``r`` of the config even where ``paca_indices_pattern``
gives a layer k ≠ r columns), exactly :class:`~paca_core.methods.paca.PaCAConfig`'s ``alpha / r`` with ``columns``.

Reading translates the folder into the document and tensors :mod:`paca_core.files.checkpoint` loads (so ``from_pretrained``,
``paca merge``, ``paca export-peft`` and ``paca train --adapter`` take it); what has no PaCA form here (several adapters
in one folder, ``modules_to_save``, another PEFT method) is refused in one line that names it. Writing gives a folder
``PeftModel.from_pretrained`` loads with no missing or unexpected keys. Torch-free at import.
"""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import CheckpointError, PacaConfigError

if TYPE_CHECKING:  # pragma: no cover
    import torch

logger = logging.getLogger(__name__)

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
#: PEFT strips the adapter name ("default") when saving; keys read ``base_model.model.<module path>.<tensor>``.
KEY_PREFIX = "base_model.model."
PACA_TENSORS = ("paca_delta", "paca_indices")


def is_peft_document(document: dict[str, Any]) -> bool:
    """Whether an adapter_config.json was written by PEFT (it names a ``peft_type``) rather than by paca-hal."""
    return "peft_type" in document and "configs" not in document


def other_adapters(directory: Path) -> list[str]:
    """Subfolders holding an adapter of their own: ``PeftModel.save_pretrained`` of a model with several adapters
    writes the first at the top and every other one in ``<folder>/<adapter name>/``."""
    try:
        return sorted(child.name for child in directory.iterdir() if (child / CONFIG_NAME).is_file())
    except OSError:
        return []


def translate_config(directory: Path, document: dict[str, Any]) -> dict[str, Any]:
    """A PEFT adapter_config.json as the document :func:`paca_core.files.checkpoint.read_adapter_config` returns.

    The modules and their shapes come from the safetensors header (no tensor is read): every adapted module with its
    ``out_features`` and number of columns; layers whose number differs from ``r`` get their saved columns in the
    config's ``columns`` (PEFT's ``paca_indices_pattern``) so they are built with the shapes they were trained with.
    """
    peft_type = str(document.get("peft_type"))
    if peft_type.upper() != "PACA":
        raise CheckpointError(
            f"{directory} is a PEFT {peft_type} adapter; paca-hal reads PEFT PaCA adapters (peft_type PACA) and its own: "
            "load this one with peft.PeftModel.from_pretrained."
        )
    others = other_adapters(directory)
    if others:
        raise CheckpointError(
            f"{directory} holds several PEFT adapters (one at its top, and {', '.join(repr(n) for n in others)} in "
            f"subfolders); pass the folder of one: {directory / others[0]}, or a copy of the top one's two files alone."
        )
    extra = document.get("modules_to_save")
    if extra:
        raise CheckpointError(
            f"{directory} also trains whole modules ({', '.join(map(str, extra))}: PEFT's modules_to_save), which a "
            "paca-hal PaCA adapter cannot hold; merge it with PEFT's merge_and_unload instead."
        )
    shapes = tensor_shapes(directory)
    layers = _layer_shapes(shapes, directory)
    r = document.get("r")
    alpha = document.get("paca_alpha", r)
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise CheckpointError(f"{directory / CONFIG_NAME} has r={r!r}; a PEFT PaCA config needs a positive integer r.")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or alpha <= 0:
        raise CheckpointError(f"{directory / CONFIG_NAME} has paca_alpha={alpha!r}; it must be a positive number.")
    targets = document.get("target_modules")
    names = sorted(layers)
    config = {
        "method": "paca",
        "r": r,
        "alpha": alpha,
        "seed": int(document.get("random_seed") or 0),
        # A list of names selects the same modules here (suffix match); anything else as the exact names saved.
        "target_modules": sorted(targets) if isinstance(targets, list) and targets else "|".join(re.escape(n) for n in names),
        "exclude_modules": [],
        # Columns load with the tensors; layers with another number of them are named up front, for their shapes.
        "columns": {re.escape(name): saved_columns(directory, name) for name, (_, k) in layers.items() if k != r},
    }
    return {
        "format": "peft",
        "method": "paca",
        "configs": [config],
        "base_model": document.get("base_model_name_or_path"),
        "modules": {name: {"config": 0, "out_features": out} for name, (out, _) in layers.items()},
        "peft_version": document.get("peft_version"),
    }


def tensor_shapes(directory: Path) -> dict[str, tuple[int, ...]]:
    """``{key: shape}`` from the safetensors header alone (a PEFT ``.bin`` is refused: it would run pickle)."""
    from safetensors import SafetensorError, safe_open

    path = directory / WEIGHTS_NAME
    if not path.is_file():
        hint = " (its adapter_model.bin is a pickle, which paca-hal never loads: re-save it with PeftModel.save_pretrained, safetensors by default)" if (directory / "adapter_model.bin").is_file() else ""
        raise CheckpointError(f"{path} is missing{hint}.")
    try:
        with safe_open(str(path), framework="pt") as handle:
            return {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"{path} cannot be read ({error}); the adapter is corrupt or truncated.") from None


def saved_columns(directory: Path, name: str) -> list[int]:
    """One layer's saved ``paca_indices`` (a few ints; read alone, not the whole file)."""
    from safetensors import safe_open

    with safe_open(str(directory / WEIGHTS_NAME), framework="pt") as handle:
        return [int(i) for i in handle.get_tensor(f"{KEY_PREFIX}{name}.paca_indices").tolist()]


def _layer_shapes(shapes: dict[str, tuple[int, ...]], directory: Path) -> dict[str, tuple[int, int]]:
    """``{module: (out_features, columns)}`` from PEFT's keys, every key accounted for."""
    layers: dict[str, dict[str, tuple[int, ...]]] = {}
    unknown = []
    for key, shape in shapes.items():
        name, _, tensor = key.rpartition(".")
        if not key.startswith(KEY_PREFIX) or tensor not in PACA_TENSORS:
            unknown.append(key)
            continue
        layers.setdefault(name[len(KEY_PREFIX):], {})[tensor] = shape
    if unknown:
        raise CheckpointError(
            f"{directory / WEIGHTS_NAME} holds tensors that are not PaCA layers ({', '.join(unknown[:3])}); "
            "paca-hal cannot represent them: merge it with PEFT's merge_and_unload instead."
        )
    if not layers:
        raise CheckpointError(f"{directory / WEIGHTS_NAME} holds no PaCA layer.")
    found = {}
    for name, pair in layers.items():
        delta, indices = pair.get("paca_delta"), pair.get("paca_indices")
        if delta is None or indices is None or len(delta) != 2 or indices != (delta[1],):
            raise CheckpointError(
                f"{directory / WEIGHTS_NAME}: layer {name} has paca_delta {delta} and paca_indices {indices}; "
                "a PaCA layer needs both, (out, k) and (k,); the file is corrupt."
            )
        found[name] = (delta[0], delta[1])
    return found


def translate_tensors(tensors: dict[str, "torch.Tensor"]) -> dict[str, "torch.Tensor"]:
    """PEFT's keys as ours: ``base_model.model.<module>.paca_delta`` -> ``<module>.paca_delta``."""
    return {key[len(KEY_PREFIX):] if key.startswith(KEY_PREFIX) else key: value for key, value in tensors.items()}


# --- writing ----------------------------------------------------------------------------------------------------


def peft_paca_adapter(model: Any, base_model_name_or_path: str | None, target_modules) -> tuple[dict, Any]:
    """``(tensors, peft.PacaConfig)``: an ``AdaptedModel``'s PaCA layers as PEFT's PaCA, exactly (same columns and deltas, the
    same ``paca_alpha / r``). Layers trained on another number of columns than ``r`` are named in
    ``paca_indices_pattern`` so PEFT builds them with matching shapes."""
    from ..extras import require_peft_paca

    require_peft_paca("export-peft --format paca")
    import peft

    layers = model.adapter_layers()
    configs = {layer.config_index for layer in layers.values()}
    if len(configs) != 1:
        raise PacaConfigError("this adapter has PaCA layers from several configs; a PEFT PaCA adapter holds one: export each separately.")
    (config,) = [model.configs[i] for i in configs]
    tensors, pattern = {}, {}
    for name, layer in layers.items():
        indices = layer.paca_indices.detach().to("cpu").long().contiguous()
        tensors[f"{KEY_PREFIX}{name}.paca_delta"] = layer.paca_delta.detach().to("cpu").float().contiguous()
        tensors[f"{KEY_PREFIX}{name}.paca_indices"] = indices
        if layer.r != config.r:
            pattern[f"^{re.escape(name)}"] = indices.tolist()
    alpha = config.alpha if config.alpha is not None else config.r
    peft_config = peft.PacaConfig(
        r=config.r,
        paca_alpha=int(alpha) if float(alpha).is_integer() else alpha,
        target_modules=target_modules,
        random_seed=config.seed,
        paca_indices_pattern=pattern,
        task_type="CAUSAL_LM",
        base_model_name_or_path=base_model_name_or_path,
        inference_mode=True,  # what PeftModel.save_pretrained writes
    )
    if isinstance(peft_config.target_modules, set):  # peft turns lists into sets; keep the JSON deterministic
        peft_config.target_modules = sorted(peft_config.target_modules)
    return tensors, peft_config


def read_document(directory: Path) -> dict[str, Any]:
    """adapter_config.json as JSON (errors as one line)."""
    path = directory / CONFIG_NAME
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{path} is not valid JSON ({error}); the adapter is corrupt.") from None
