"""Export an adapter as a standard HF PEFT adapter: PEFT's PaCA (``--format paca``) or an exact LoRA (``--format lora``).

``paca``: PEFT >= 0.22's own PaCA format (:mod:`paca_core.files.peft_paca`), the same columns and deltas under PEFT's names;
for PEFT users who keep training or merging with PEFT. ``lora``: for servers and tools that read LoRA but not PaCA
(vLLM, TGI, any peft). PaCA's update of one layer is ``ΔW = scaling · delta · Sᵀ``, where ``S`` (in × r) selects the
columns ``paca_indices``. LoRA computes ``ΔW = (lora_alpha / r) · B · A``. With ``lora_alpha = r`` (LoRA scaling
exactly 1), ``B = scaling · delta`` (out × r) and ``A`` one-hot rows (``A[k, paca_indices[k]] = 1``) the two are the
same update, with no approximation.

Both forms apply to the *pretrained* base weights (as PEFT always does), not to a model that already has the deltas
merged in. Every layer is checked before anything is written: a part neither form can hold (fully trained modules,
MEFT's nonlinear branch, a weight shared with another module) is refused in one line naming it, with ``paca merge``
as what to do instead; a modifier that changes only what training keeps in memory (VeLoRA) changes no weight and
exports with the layers it rode on.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import save_file

from .peft_paca import peft_paca_adapter as paca_format_adapter
from .atomic import staging_for
from .checkpoint import _base_model_name
from ..errors import PacaConfigError
from ..methods import find_method, registered_methods

if TYPE_CHECKING:  # pragma: no cover
    from ..model import PacaModel

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


#: The formats ``export_peft`` writes: PEFT's PaCA (peft >= 0.22) and LoRA (every peft, vLLM, TGI).
FORMATS = ("paca", "lora")


def lora_factors(layer) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, B)`` in float32 on CPU with ``B @ A == layer.delta_weight()``, from the layer's method
    (its registered ``export_lora``: exact for PaCA, whose A is one-hot; LoRA's own factors, scaling in B)."""
    method = find_method(layer.method)
    if method is None or method.export_lora is None:
        exportable = ", ".join(m.name for m in registered_methods() if m.export_lora is not None)
        raise PacaConfigError(
            f"{layer.module_name} uses method {layer.method!r}, which has no LoRA form; export supports {exportable} "
            "(use `paca merge` for fully trained modules)."
        )
    return method.export_lora(layer)


def check_exportable(model: "PacaModel", format: str) -> None:
    """Refuse, in one line and before anything is written, an adapter ``format`` cannot reproduce exactly: the parts
    it cannot hold are named (their method and first modules), with what to do instead."""
    layers = model.adapter_layers()
    if not layers:
        raise PacaConfigError("This model has no adapter layers to export; prepare it with prepare_model first.")
    check_methods_exportable({name: layer.method for name, layer in layers.items()}, format)
    shared = tied_adapted_weights(model)
    if shared:
        raise PacaConfigError(
            f"{_names(list(shared))} share their weight with {_names(sorted(set(shared.values())))} (tied embeddings): "
            "training changed both, which an adapter on the one module cannot reproduce; use `paca merge`."
        )


def check_methods_exportable(methods: dict[str, str], format: str) -> None:
    """The part of :func:`check_exportable` an adapter's config alone answers (``{module: method}``), so ``paca
    export-peft`` refuses before loading any weights. Modifiers (VeLoRA) make no layers and change no weight."""
    if format not in FORMATS:
        raise PacaConfigError(f"format must be one of {', '.join(FORMATS)}, got {format!r}.")
    refused: dict[str, list[str]] = {}
    for name, method in methods.items():
        if not _has_form(method, format):
            refused.setdefault(method or "an unknown method", []).append(name)
    if refused:
        parts = "; ".join(f"{method} layers ({_names(names)})" for method, names in refused.items())
        other = "lora" if format == "paca" else "paca"
        instead = f"--format {other}, or " if all(_has_form(method, other) for method in refused) else ""
        raise PacaConfigError(
            f"a PEFT {'PaCA' if format == 'paca' else 'LoRA'} adapter cannot hold {parts}: use {instead}`paca merge` "
            "for the whole trained model."
        )


def _has_form(method: str, format: str) -> bool:
    """Whether a layer of ``method`` has an exact form in ``format``."""
    if format == "paca":
        return method == "paca"
    found = find_method(method)
    return found is not None and found.export_lora is not None


def _names(names: list[str]) -> str:
    return ", ".join(names[:2]) + (f" and {len(names) - 2} more" if len(names) > 2 else "")


def tied_adapted_weights(model: "PacaModel") -> dict[str, str]:
    """``{adapted module: another module}`` for layers that keep their update inside their base weight (PaCA's columns)
    where that weight is the same tensor as another module's parameter (a head tied to the embeddings): training
    changed both modules."""
    owners: dict[int, list[str]] = {}
    for module_name, module in model.base_model.named_modules(remove_duplicate=False):
        for param_name, param in module.named_parameters(recurse=False, remove_duplicate=False):
            owners.setdefault(param.data_ptr(), []).append(module_name)
    shared = {}
    for name, layer in model.adapter_layers().items():
        weight = layer.base_weight() if layer.writes_base_weight else None
        if weight is None or weight.data_ptr() == 0:
            continue
        others = [m for m in owners.get(weight.data_ptr(), []) if m != name and not m.startswith(name + ".")]
        if others:
            shared[name] = others[0]
    return shared


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
    check_exportable(paca_model, "lora")
    layers = paca_model.adapter_layers()
    ranks = {layer.r for layer in layers.values()}
    if len(ranks) != 1:
        raise PacaConfigError(
            f"All adapter layers must share one r to export as a single LoRA config; found {sorted(ranks)} "
            "(layers given their own columns): use --format paca, which keeps each layer's number."
        )
    (r,) = ranks

    tensors: dict[str, torch.Tensor] = {}
    for name, layer in layers.items():
        lora_a, lora_b = lora_factors(layer)
        check_exact(layer, lora_b @ lora_a)
        tensors[f"{PEFT_KEY_PREFIX}{name}.lora_A.weight"] = lora_a
        tensors[f"{PEFT_KEY_PREFIX}{name}.lora_B.weight"] = lora_b

    config = peft.LoraConfig(
        r=r,
        lora_alpha=r,  # LoRA scaling alpha/r == 1: PaCA's scaling is folded into lora_B
        target_modules=peft_target_modules(paca_model),
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
        base_model_name_or_path=_base_name(paca_model, base_model_name_or_path),
        inference_mode=True,  # what PeftModel.save_pretrained writes
    )
    if isinstance(config.target_modules, set):  # peft turns lists into sets; keep the JSON deterministic
        config.target_modules = sorted(config.target_modules)
    return tensors, config


def check_exact(layer, exported: torch.Tensor) -> None:
    """The exported ΔW must be the layer's own (cheap next to loading the model: one out × in product per layer)."""
    expected = layer.delta_weight().detach().to("cpu", torch.float32)
    if not torch.allclose(exported, expected, rtol=1e-5, atol=1e-7 * max(1.0, float(expected.abs().max()))):
        error = float((exported - expected).abs().max())
        raise PacaConfigError(
            f"the exported update of {layer.module_name} differs from the trained one (max error {error:.3g}); nothing "
            "was written: use `paca merge`, and report this as a bug."
        )


def peft_paca_adapter(paca_model: "PacaModel", base_model_name_or_path: str | None = None):
    """``(tensors, peft.PacaConfig)`` of ``paca_model``'s PaCA adapter in PEFT's own PaCA format (peft >= 0.22), in memory."""
    check_exportable(paca_model, "paca")
    return paca_format_adapter(paca_model, _base_name(paca_model, base_model_name_or_path), peft_target_modules(paca_model))


def peft_adapter(paca_model: "PacaModel", format: str = "lora", base_model_name_or_path: str | None = None):
    """``(tensors, config)`` of the adapter in ``format`` (``"paca"`` or ``"lora"``), checked, in memory."""
    check_exportable(paca_model, format)
    build = peft_paca_adapter if format == "paca" else peft_lora_adapter
    return build(paca_model, base_model_name_or_path)


def _base_name(paca_model: "PacaModel", given: str | None) -> str | None:
    return given if given is not None else _base_model_name(paca_model.base_model)


def write_peft_adapter(directory: Path, tensors: dict[str, torch.Tensor], config) -> None:
    """The two files of a PEFT adapter (either format), into an existing (staging) folder."""
    save_file(tensors, str(Path(directory) / PEFT_WEIGHTS_NAME), metadata={"format": "pt"})
    config.save_pretrained(str(directory))


write_peft_lora = write_peft_adapter  # the earlier name


def export_peft(
    paca_model: "PacaModel", directory: str | Path, format: str = "lora", base_model_name_or_path: str | None = None
) -> Path:
    """Write ``paca_model``'s adapter to ``directory`` as a PEFT adapter, atomically: ``format="paca"`` PEFT's own PaCA
    (peft >= 0.22), ``"lora"`` an exact rank-r LoRA (any peft, vLLM, TGI).

    Load it with ``peft.PeftModel.from_pretrained(base_model, directory)`` on the pretrained base model.
    ``base_model_name_or_path`` defaults to the wrapped model's ``config._name_or_path``. Other files in ``directory``
    are left alone (as ``PeftModel.save_pretrained`` does); ``paca export-peft`` is stricter.
    """
    directory = Path(directory)
    tensors, config = peft_adapter(paca_model, format, base_model_name_or_path)
    with staging_for(directory, (PEFT_WEIGHTS_NAME, PEFT_CONFIG_NAME)) as staging:
        write_peft_adapter(staging, tensors, config)
    logger.info("Exported %d layers (r=%d) as a PEFT %s adapter to %s", len(paca_model.adapter_layers()), config.r, format, directory)
    return directory


def export_peft_lora(
    paca_model: "PacaModel", directory: str | Path, base_model_name_or_path: str | None = None
) -> Path:
    """:func:`export_peft` with ``format="lora"`` (the name earlier releases had)."""
    return export_peft(paca_model, directory, "lora", base_model_name_or_path)
