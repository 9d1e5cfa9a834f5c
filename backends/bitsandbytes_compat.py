"""bitsandbytes 4-bit weights, read the same way on every CPU kernel bitsandbytes may pick. A compatibility layer
over bitsandbytes, not a :class:`~backends.base.Backend`: the backends and QPaCA call it.

bitsandbytes is an optional extra, imported here only when a function runs. Two behaviours of its
CPU backend (0.49–0.50.x) depend on which instructions the CPU has, and this module makes both
invisible to QPaCA:

* **Dequantization.** A 4-bit weight is quantized in blocks of ``blocksize`` consecutive values of
  the *flattened* (out, in) matrix. bitsandbytes' AVX-512 dequantization kernel instead looks the
  block scale up per row (``absmax[row * (in // blocksize) + col // blocksize]``), which is right
  only when ``in_features`` is a multiple of ``blocksize``; otherwise every row reads the scales of
  the first rows. Its scalar kernel (CPUs without AVX-512F) indexes the flat blocks and is right.
  :func:`dequantize` asks for the flat tensor when the rows do not align with the blocks, so both
  kernels compute the same, correct weight.
* **CPU inference repacking.** On CPUs with AVX512-BF16, ``Linear4bit.forward`` in eval mode with an
  input that does not require grad rewrites the weight *in place* into a CPU-only layout (bf16 block
  scales, no double quantization) for its fused inference kernel. Everything else in bitsandbytes
  (dequantization, training matmuls) then fails on that weight. :func:`keep_standard_layout` stops
  that for layers QPaCA owns, and :func:`restore_standard_layout` brings a repacked weight back with
  bitsandbytes' own inverse conversion.
"""
from __future__ import annotations

import functools
import logging
import math

import torch

logger = logging.getLogger(__name__)

#: The attribute bitsandbytes' ``Linear4bit`` reads to decide whether to repack for CPU inference.
_REPACK_SWITCH = "support_avx512bf16_for_cpu"


def is_repacked(quant_state) -> bool:
    """True when bitsandbytes has rewritten this weight into its CPU-inference layout."""
    return bool(getattr(quant_state, "packing_format_for_cpu", False))


def dequantize(weight: torch.Tensor, quant_state) -> torch.Tensor:
    """The full-precision weight (``quant_state.shape``, ``quant_state.dtype``) of a 4-bit tensor.

    Correct on every bitsandbytes CPU kernel (see the module docstring) and on every other device.
    """
    import bitsandbytes.functional as bnbf

    if is_repacked(quant_state):
        raise ValueError(
            "This 4-bit weight is in bitsandbytes' CPU-inference layout; call "
            "backends.bitsandbytes_compat.restore_standard_layout(linear) first."
        )
    shape = tuple(quant_state.shape)
    if shape[-1] % quant_state.blocksize == 0:
        return bnbf.dequantize_4bit(weight, quant_state)
    absmax = quant_state.absmax
    if quant_state.nested:
        absmax = bnbf.dequantize_blockwise(quant_state.absmax, quant_state.state2) + quant_state.offset
    flat = torch.ops.bitsandbytes.dequantize_4bit.default(
        weight.reshape(-1, 1), absmax.float(), quant_state.blocksize, quant_state.quant_type,
        [math.prod(shape)], quant_state.dtype,
    )
    return flat.reshape(shape)


def keep_standard_layout(linear: torch.nn.Module) -> bool | None:
    """Stop bitsandbytes from repacking ``linear``'s weight for CPU inference; returns the previous
    setting (None where this bitsandbytes version has no such repacking)."""
    if not hasattr(linear, _REPACK_SWITCH):
        return None
    previous = bool(getattr(linear, _REPACK_SWITCH))
    setattr(linear, _REPACK_SWITCH, False)
    return previous


def allow_cpu_repacking(linear: torch.nn.Module) -> None:
    """Give ``linear`` back bitsandbytes' own choice (its fast CPU inference path where the CPU has one)."""
    if hasattr(linear, _REPACK_SWITCH):
        setattr(linear, _REPACK_SWITCH, cpu_has_avx512bf16())


def restore_standard_layout(linear: torch.nn.Module, name: str = "") -> bool:
    """Bring a weight that bitsandbytes repacked for CPU inference back to the standard 4-bit layout,
    in place, with bitsandbytes' inverse conversion. Returns True when something was converted.

    The 4-bit codes come back exactly. The block scales do not: the repacking had already rounded
    them to bfloat16 (and dropped their double quantization, which the inverse redoes), so the
    weight can differ from the never-repacked one by that rounding — a warning says so.
    """
    weight = linear.weight
    state = getattr(weight, "quant_state", None)
    if not is_repacked(state):
        return False
    import bitsandbytes.functional as bnbf

    inverse = getattr(bnbf, "_convert_weight_packed_for_cpu_inverse", None)
    if inverse is None:  # every bitsandbytes that repacks ships the inverse; be clear if one ever does not
        raise RuntimeError(
            f"{name or 'A 4-bit layer'} was repacked by bitsandbytes for CPU inference and this bitsandbytes "
            f"({_version()}) has no inverse conversion; install bitsandbytes>=0.49 or keep the layer in train mode."
        )
    weight.data, state = inverse(weight.data, state)
    weight.quant_state = state
    if hasattr(linear, "quant_state"):
        linear.quant_state = state
    logger.warning(
        "%s: bitsandbytes had repacked this 4-bit weight for CPU inference (eval-mode forward without grad on a "
        "CPU with AVX512-BF16); restored the standard layout. The repacking rounded its block scales to "
        "bfloat16, so results can differ slightly from the weight as first quantized.",
        name or type(linear).__name__,
    )
    return True


def own_kernels_misread_unaligned_rows(device: torch.device) -> bool:
    """True where bitsandbytes' own dequantization (its ``Linear4bit.forward``, PEFT QLoRA) reads the block
    scales of a layer whose ``in_features`` is not a multiple of the block size per row: its AVX-512 CPU kernel."""
    return torch.device(device).type == "cpu" and cpu_has_avx512f()


@functools.lru_cache(maxsize=None)
def cpu_has_avx512bf16() -> bool:
    """bitsandbytes' own answer: does this CPU run its packed AVX512-BF16 inference path?"""
    import bitsandbytes.functional as bnbf

    probe = getattr(bnbf, "has_avx512bf16", None)
    return bool(probe()) if probe is not None else False


@functools.lru_cache(maxsize=None)
def cpu_has_avx512f() -> bool:
    """Does bitsandbytes' native CPU library take its AVX-512 kernels on this CPU?"""
    import bitsandbytes.functional as bnbf

    try:
        return bool(bnbf.lib.has_avx512f_cpu())
    except (AttributeError, RuntimeError, OSError):
        return False


def _version() -> str:
    import bitsandbytes

    return getattr(bitsandbytes, "__version__", "unknown version")
