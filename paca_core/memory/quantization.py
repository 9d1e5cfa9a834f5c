"""4-bit quantized bases (bitsandbytes NF4/FP4) for QPaCA, and for QLoRA baselines built the same way.

bitsandbytes is an optional extra (``pip install 'paca-hal[quant]'``) and is imported only when a
function here needs it. Every weight is quantized on the device it lives on (or ``device``), with
bitsandbytes' own kernels for that device, so this module has no device-specific code.

The quantization is fixed apart from its kind: blocks of 64 weights, double quantization of the
block scales (QLoRA's default, ``compress_statistics=True``). A checkpoint therefore only has to
record the kind (``PaCAConfig.quantize``) to rebuild the same 4-bit base from the same weights.
"""
from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from typing import Iterable

import torch
import torch.nn as nn
from torch._subclasses.fake_tensor import is_fake

from backends import bitsandbytes_compat

from ..base_config import ALL_LINEAR, LLAMA_PROJECTIONS
from ..errors import PacaConfigError
from ..surgery.targets import find_targets, replace_module

logger = logging.getLogger(__name__)

#: Supported 4-bit data types: NormalFloat4 (QLoRA's choice) and bitsandbytes' 4-bit float.
QUANT_KINDS = ("nf4", "fp4")
#: Weights per quantization block (bitsandbytes' default for Linear4bit).
BLOCKSIZE = 64
#: Quantize the per-block scales again (saves ~0.37 bit per weight).
DOUBLE_QUANT = True


def import_bitsandbytes():
    """The bitsandbytes module, or an ImportError that says how to install it."""
    try:
        import bitsandbytes
    except ImportError as error:
        raise ImportError(
            "A 4-bit quantized base (QPaCA, --quantize nf4|fp4) needs the 'bitsandbytes' package: "
            "pip install 'paca-hal[quant]'  (or: pip install 'bitsandbytes>=0.45')."
        ) from error
    return bitsandbytes


def check_kind(kind: str) -> str:
    """``kind`` lower-cased, if it is a supported 4-bit type."""
    if not isinstance(kind, str) or kind.lower() not in QUANT_KINDS:
        raise PacaConfigError(f"quantize must be one of {', '.join(QUANT_KINDS)}, got {kind!r}.")
    return kind.lower()


def is_quantized_linear(module: nn.Module) -> bool:
    """True for a bitsandbytes 4-bit linear layer (never imports bitsandbytes: if nobody has, none exist)."""
    bnb = sys.modules.get("bitsandbytes")
    return bnb is not None and isinstance(module, bnb.nn.Linear4bit)


def quantized_kind(linear: nn.Module) -> str:
    """``"nf4"`` or ``"fp4"`` for a quantized 4-bit linear layer."""
    state = getattr(linear.weight, "quant_state", None)
    if state is None:
        raise ValueError(
            f"{type(linear).__name__} has no quantization state yet; bitsandbytes quantizes a weight when it is "
            "moved to a device (.to(device)). Build it with paca_core.memory.quantization.quantize_base."
        )
    return state.quant_type


def quantize_linear(
    linear: nn.Linear,
    kind: str,
    compute_dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    module_name: str = "",
) -> nn.Module:
    """A bitsandbytes ``Linear4bit`` holding ``linear``'s weight in 4 bits (bias kept as it is).

    Quantized on ``device`` (default: where the weight is); only the packed weight and its small
    quantization state stay alive afterwards. The layer keeps bitsandbytes' standard layout: its
    CPU-inference repacking (AVX512-BF16 CPUs, eval mode) is switched off, because a repacked weight
    has no backward and fails every other bitsandbytes function (``backends.bitsandbytes_compat``).
    """
    bnb = import_bitsandbytes()
    kind = check_kind(kind)
    weight = linear.weight.detach()
    device = torch.device(device) if device is not None else weight.device
    compute_dtype = compute_dtype or weight.dtype
    has_bias = linear.bias is not None
    if is_fake(weight):  # paca plan builds models on fake tensors: a byte- and shape-faithful stand-in
        from .fake_4bit import fake_linear4bit

        return fake_linear4bit(bnb, linear, kind, compute_dtype, BLOCKSIZE, DOUBLE_QUANT)
    quantized = bnb.nn.Linear4bit(
        linear.in_features,
        linear.out_features,
        bias=has_bias,
        compute_dtype=compute_dtype,
        compress_statistics=DOUBLE_QUANT,
        quant_type=kind,
        device="meta",  # no throw-away full-size init
    )
    quantized.weight = bnb.nn.Params4bit(
        weight, requires_grad=False, blocksize=BLOCKSIZE, compress_statistics=DOUBLE_QUANT, quant_type=kind, module=quantized
    ).to(device)  # bitsandbytes quantizes on the first move to a device
    if has_bias:
        quantized.bias = nn.Parameter(linear.bias.detach().to(device), requires_grad=False)
    quantized.train(linear.training)
    bitsandbytes_compat.keep_standard_layout(quantized)
    _warn_if_cpu_kernels_misread(linear, device, module_name)
    return quantized


def quant_state_tensors(model: nn.Module) -> list[torch.Tensor]:
    """The tensors a 4-bit layer keeps beside its packed weight (block scales, their second-level
    scales and codebooks): part of the weights' memory, although they are neither parameters nor buffers."""
    tensors: list[torch.Tensor] = []
    for module in model.modules():
        if not is_quantized_linear(module):
            continue
        state = getattr(module.weight, "quant_state", None)
        while state is not None:
            tensors += [t for t in (state.absmax, state.code, getattr(state, "offset", None)) if isinstance(t, torch.Tensor)]
            state = getattr(state, "state2", None)
    return tensors


def _warn_if_cpu_kernels_misread(linear: nn.Linear, device: torch.device, module_name: str) -> None:
    """Say so when bitsandbytes' own AVX-512 CPU kernels will compute this layer with wrong block scales.

    QPaCA reads every layer correctly (``backends.bitsandbytes_compat.dequantize``); other users of the same
    4-bit base (PEFT QLoRA, ``Linear4bit.forward``) go through bitsandbytes' kernels.
    """
    if linear.in_features % BLOCKSIZE == 0 or not bitsandbytes_compat.own_kernels_misread_unaligned_rows(device):
        return
    logger.warning(
        "%s: in_features=%d is not a multiple of the 4-bit block size %d. On this CPU (AVX-512) bitsandbytes' "
        "own CPU kernels dequantize such a layer with the wrong block scales; QPaCA is not affected, but PEFT "
        "QLoRA or Linear4bit.forward on this base will compute wrong outputs here.",
        module_name or "a linear layer", linear.in_features, BLOCKSIZE,
    )


def quantize_base(
    model: nn.Module,
    kind: str,
    target_modules: list[str] | str = list(LLAMA_PROJECTIONS),
    compute_dtype: torch.dtype | None = None,
    exclude_modules: Iterable[str] = (),
    device: str | torch.device | None = None,
) -> nn.Module:
    """Swap the ``nn.Linear`` modules selected by ``target_modules`` for bitsandbytes 4-bit layers, in place.

    ``kind`` is ``"nf4"`` or ``"fp4"``; ``target_modules`` uses the same rules as the method configs
    (names, a regex, or ``"all-linear"``, which leaves the output head alone); ``compute_dtype``
    defaults to each weight's own dtype. Layers are quantized one at a time on ``device`` (default:
    where each weight is), so a full-precision copy of the model never has to fit on an accelerator.
    Returns ``model`` (marked ``is_loaded_in_4bit`` as transformers does). The layers keep
    bitsandbytes' standard layout on every CPU (see :func:`quantize_linear`), so training after an
    evaluation works; ``backends.bitsandbytes_compat.allow_cpu_repacking(layer)`` gives an inference-only layer
    back bitsandbytes' packed CPU path. Both QPaCA (``prepare_model(model, PaCAConfig(...))`` then wraps the 4-bit
    layers) and PEFT QLoRA (``peft.get_peft_model``) accept the result.
    """
    import_bitsandbytes()
    kind = check_kind(kind)
    targets = [(n, m) for n, m in find_targets(model, target_modules, exclude_modules) if not is_quantized_linear(m)]
    for name, linear in targets:
        replace_module(model, name, quantize_linear(linear, kind, compute_dtype, device, module_name=name))
    # The flag transformers sets for load_in_4bit models: PEFT then wraps these layers with its
    # bitsandbytes LoRA layers (QLoRA) instead of the generic ones.
    model.is_loaded_in_4bit = True
    logger.info("Quantized %d linear layers to %s", len(targets), kind)
    return model


def frozen_base_linears(model: nn.Module, adapted: Iterable[str]) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every ``nn.Linear`` of ``model`` no method adapts and that is not the output head,
    including those already in 4 bits: what a whole-base quantization covers beside the adapted targets."""
    adapted = set(adapted)
    return [(n, m) for n, m in find_targets(model, ALL_LINEAR) if n not in adapted]


def observed_scope(model: nn.Module, adapted: Iterable[str]) -> str:
    """``"base"`` when every frozen linear outside the adapted ones is already 4-bit, else ``"targets"``: the scope a
    model quantized before ``prepare_model`` records, so loading its checkpoint rebuilds the same base."""
    rest = frozen_base_linears(model, adapted)
    return "base" if rest and all(is_quantized_linear(m) for _, m in rest) else "targets"


def quantize_frozen_base(model: nn.Module, kind: str, adapted: Iterable[str]) -> int:
    """Quantize, in place, every full-precision linear that :func:`frozen_base_linears` lists (the adapted targets
    are left to their method, which quantizes them as it wraps them). Returns how many were quantized."""
    import_bitsandbytes()
    kind = check_kind(kind)
    todo = [(n, m) for n, m in frozen_base_linears(model, adapted) if not is_quantized_linear(m)]
    for name, linear in todo:
        replace_module(model, name, quantize_linear(linear, kind, module_name=name))
    if todo:
        model.is_loaded_in_4bit = True
        logger.info("Quantized %d frozen linear layers outside the adapted ones to %s (quantize_scope='base')", len(todo), kind)
    return len(todo)


def dequantize_weight(linear: nn.Module) -> torch.Tensor:
    """The full-precision weight a 4-bit layer represents (a new tensor in the original dtype).

    A weight bitsandbytes repacked for CPU inference is brought back to the standard layout first.
    """
    bitsandbytes_compat.restore_standard_layout(linear)
    return bitsandbytes_compat.dequantize(linear.weight.data, linear.weight.quant_state)


@dataclass
class RequantizationError:
    """How far requantizing moved a merged weight: ``max_abs`` and the relative Frobenius error."""

    max_abs: float
    relative: float


def requantize(linear: nn.Module, weight: torch.Tensor) -> RequantizationError:
    """Put ``weight`` (full precision) into the 4-bit layer ``linear`` in place, with its own kind and
    block settings; returns how much the rounding changed it."""
    bnb = import_bitsandbytes()
    bitsandbytes_compat.restore_standard_layout(linear)
    old = linear.weight
    state = old.quant_state
    linear.weight = bnb.nn.Params4bit(
        weight.detach().to(state.dtype),
        requires_grad=False,
        blocksize=state.blocksize,
        compress_statistics=state.nested,
        quant_type=state.quant_type,
        quant_storage=old.quant_storage,
        module=linear,
    ).to(weight.device)
    rounded = dequantize_weight(linear).float()
    target = weight.float()
    error = rounded - target
    return RequantizationError(
        max_abs=float(error.abs().max()), relative=float(error.norm() / target.norm().clamp_min(torch.finfo(torch.float32).tiny))
    )


def dequantize_linear(linear: nn.Module, weight: torch.Tensor | None = None) -> nn.Linear:
    """A plain ``nn.Linear`` with ``weight`` (default: the dequantized 4-bit weight) and the same bias."""
    weight = dequantize_weight(linear) if weight is None else weight
    dense = nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
    dense.weight = nn.Parameter(weight.detach(), requires_grad=False)
    if linear.bias is not None:
        dense.bias = nn.Parameter(linear.bias.detach().to(weight.dtype), requires_grad=False)
    return dense


def merge_and_dequantize(adapted_model) -> nn.Module:
    """The plain full-precision model that computes exactly what the QPaCA model computed.

    Each quantized PaCA layer becomes an ``nn.Linear`` with ``deq(W_q) + ΔW`` (no requantization,
    so no rounding beyond the weight dtype); other adapter layers are merged as usual, and any other
    4-bit layer is dequantized. This is what ``paca merge`` writes for a quantized adapter: a
    standard HF model that any tool can load.
    """
    base = adapted_model.base_model
    for name, layer in list(adapted_model.adapter_layers().items()):
        if layer.quantized_base:
            replace_module(base, name, dequantize_linear(layer.base_layer, layer.merged_weight()))
        else:
            replace_module(base, name, layer.unload(merge=True))
    for name, module in list(base.named_modules()):
        if is_quantized_linear(module):
            replace_module(base, name, dequantize_linear(module))
    return base


def is_quantized_model(adapted_model) -> bool:
    """True when any adapter layer of ``adapted_model`` sits on a 4-bit base."""
    return any(m.quantized_base for m in adapted_model.adapter_layers().values())


def prepare_quantized_target(config, linear: nn.Module, module_name: str) -> nn.Module:
    """The 4-bit layer a QPaCA layer wraps: ``linear`` quantized with ``config.quantize``, or ``linear``
    itself when it already is 4-bit (then ``config.quantize`` records its kind, for checkpoints)."""
    if not is_quantized_linear(linear):
        return quantize_linear(linear, config.quantize, module_name=module_name)
    bitsandbytes_compat.restore_standard_layout(linear, module_name)  # e.g. the user evaluated the 4-bit base first
    kind = quantized_kind(linear)
    if config.quantize is None:
        config.quantize = kind
    elif config.quantize != kind:
        raise PacaConfigError(
            f"{module_name} is already quantized as {kind}, but the PaCA config asks for quantize={config.quantize!r}; "
            f"use quantize={kind!r} (or None) or start from the full-precision model."
        )
    return linear
