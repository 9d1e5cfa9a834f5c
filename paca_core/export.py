"""Export a PaCA adapter as a standard HF PEFT LoRA adapter (exact, same rank).

PaCA's update of one layer is ``ΔW = scaling · delta · Sᵀ``, where ``S`` (in × r) selects the
columns ``paca_indices``. LoRA computes ``ΔW = (lora_alpha / r) · B · A``. With ``lora_alpha = r``
(LoRA scaling exactly 1), ``B = scaling · delta`` (out × r) and ``A`` one-hot rows
(``A[k, paca_indices[k]] = 1``) the two are the same update, with no approximation: any tool that
reads PEFT adapters (``PeftModel.from_pretrained``, vLLM, TGI, ``merge_and_unload``) can then serve
a PaCA-trained model without paca-hal installed.

The exported adapter applies to the *pretrained* base weights (as PEFT always does), not to a
model that already has the PaCA deltas merged in.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import save_file

from .atomic import staging_for
from .checkpoint import _base_model_name
from .methods import find_method, registered_methods

if TYPE_CHECKING:  # pragma: no cover
    from .model import PacaModel

logger = logging.getLogger(__name__)

PEFT_WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_CONFIG_NAME = "adapter_config.json"
#: PEFT strips the adapter name ("default") when saving, so saved keys read
#: ``base_model.model.<module path>.lora_A.weight`` (checked against peft 0.21.2).
PEFT_KEY_PREFIX = "base_model.model."


def _import_peft():
    """peft is optional for paca-hal; only exporting needs it (for its LoraConfig schema)."""
    try:
        import peft
    except ImportError as error:
        raise ImportError(
            "Exporting a PaCA adapter as a PEFT LoRA adapter needs the 'peft' package: pip install 'paca-hal[peft]'"
        ) from error
    return peft


def lora_factors(layer) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, B)`` in float32 on CPU with ``B @ A == layer.delta_weight()``, from the layer's method
    (its registered ``export_lora``: exact for PaCA, whose A is one-hot; LoRA's own factors, scaling in B)."""
    method = find_method(layer.method)
    if method is None or method.export_lora is None:
        exportable = ", ".join(m.name for m in registered_methods() if m.export_lora is not None)
        raise ValueError(
            f"{layer.module_name} uses method {layer.method!r}, which has no LoRA form; export supports {exportable} "
            "(use `paca merge` for fully trained modules)."
        )
    return method.export_lora(layer)


def peft_target_modules(paca_model: "PacaModel") -> list[str] | str:
    """A PEFT ``target_modules`` that selects exactly the adapted modules of the base model.

    Leaf names (``["q_proj", ...]``) are the readable, conventional form, but PEFT matches them as
    suffixes of every module name; when that would also catch modules PaCA left alone (a regex or
    ``exclude_modules`` adapting only some layers), a regex of the escaped full names is used, which
    PEFT ``fullmatch``-es against each name.
    """
    adapted = set(paca_model.adapter_layers())
    leaves = sorted({name.rsplit(".", 1)[-1] for name in adapted})
    suffix_matched = {
        name
        for name, _ in paca_model.base_model.named_modules()
        if name and any(name == leaf or name.endswith("." + leaf) for leaf in leaves)
    }
    if suffix_matched == adapted:
        return leaves
    logger.info("Leaf names %s would also adapt %d unadapted modules; exporting a full-name regex.",
                leaves, len(suffix_matched - adapted))
    return "|".join(re.escape(name) for name in sorted(adapted))


def peft_lora_adapter(paca_model: "PacaModel", base_model_name_or_path: str | None = None):
    """``(tensors, peft.LoraConfig)`` of ``paca_model``'s adapter as an exact rank-r PEFT LoRA adapter, in memory."""
    peft = _import_peft()
    layers = paca_model.adapter_layers()
    if not layers:
        raise ValueError("This model has no adapter layers to export; prepare it with prepare_model first.")
    ranks = {layer.r for layer in layers.values()}
    if len(ranks) != 1:
        raise ValueError(f"All adapter layers must share one r to export as a single LoRA config; found {sorted(ranks)}.")
    (r,) = ranks

    tensors: dict[str, torch.Tensor] = {}
    for name, layer in layers.items():
        lora_a, lora_b = lora_factors(layer)
        tensors[f"{PEFT_KEY_PREFIX}{name}.lora_A.weight"] = lora_a
        tensors[f"{PEFT_KEY_PREFIX}{name}.lora_B.weight"] = lora_b

    if base_model_name_or_path is None:
        base_model_name_or_path = _base_model_name(paca_model.base_model)
    config = peft.LoraConfig(
        r=r,
        lora_alpha=r,  # LoRA scaling alpha/r == 1: PaCA's scaling is folded into lora_B
        target_modules=peft_target_modules(paca_model),
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
        base_model_name_or_path=base_model_name_or_path,
        inference_mode=True,  # what PeftModel.save_pretrained writes
    )
    if isinstance(config.target_modules, set):  # peft turns lists into sets; keep the JSON deterministic
        config.target_modules = sorted(config.target_modules)
    return tensors, config


def write_peft_lora(directory: Path, tensors: dict[str, torch.Tensor], config) -> None:
    """The two files of a PEFT LoRA adapter, into an existing (staging) folder."""
    save_file(tensors, str(Path(directory) / PEFT_WEIGHTS_NAME), metadata={"format": "pt"})
    config.save_pretrained(str(directory))


def export_peft_lora(
    paca_model: "PacaModel", directory: str | Path, base_model_name_or_path: str | None = None
) -> Path:
    """Write ``paca_model``'s adapter to ``directory`` as an exact rank-r PEFT LoRA adapter, atomically.

    Load it with ``peft.PeftModel.from_pretrained(base_model, directory)`` on the pretrained base
    model. ``base_model_name_or_path`` defaults to the wrapped model's ``config._name_or_path``. Other files in
    ``directory`` are left alone (as ``PeftModel.save_pretrained`` does); ``paca export-peft`` is stricter.
    """
    directory = Path(directory)
    tensors, config = peft_lora_adapter(paca_model, base_model_name_or_path)
    with staging_for(directory, (PEFT_WEIGHTS_NAME, PEFT_CONFIG_NAME)) as staging:
        write_peft_lora(staging, tensors, config)
    logger.info("Exported %d PaCA layers (r=%d) as a PEFT LoRA adapter to %s", len(tensors) // 2, config.r, directory)
    return directory
