"""The 4-bit layer of a model built on fake tensors (``paca plan``'s traces): bitsandbytes' own ``Linear4bit``
forward, autograd and quantize ops, with the packed weight in a plain parameter, because bitsandbytes'
``Params4bit`` (a tensor subclass) cannot wrap a fake tensor. :func:`paca_core.memory.quantization.quantize_linear` hands
a fake weight here; nothing else uses it.
"""
from __future__ import annotations

import functools

import torch
import torch.nn as nn



@functools.lru_cache(maxsize=None)
def _fake_linear4bit_class(bnb, BLOCKSIZE: int, DOUBLE_QUANT: bool) -> type:  # noqa: N803 - the quantizer's constants

    class FakeLinear4bit(bnb.nn.Linear4bit):
        """A ``Linear4bit`` whose packed weight is a plain parameter: bitsandbytes' ``Params4bit`` (a tensor
        subclass) cannot wrap a fake tensor. Everything else is bitsandbytes' own: its layer forward, its
        autograd, and its quantize/dequantize ops, whose registered fake kernels give the real shapes."""

        def __init__(self, linear: nn.Linear, kind: str, compute_dtype: torch.dtype):
            nn.Module.__init__(self)
            self.in_features, self.out_features = linear.in_features, linear.out_features
            _cache_blockwise_codebook(bnb)
            packed, state = bnb.functional.quantize_4bit(
                linear.weight.detach(), blocksize=BLOCKSIZE, compress_statistics=DOUBLE_QUANT, quant_type=kind
            )
            self.weight = nn.Parameter(packed, requires_grad=False)
            # The attributes bitsandbytes' Params4bit carries, which PEFT's QLoRA layers read.
            for key, value in (("quant_state", state), ("quant_type", kind), ("blocksize", BLOCKSIZE),
                               ("compress_statistics", DOUBLE_QUANT), ("quant_storage", torch.uint8), ("bnb_quantized", True)):
                setattr(self.weight, key, value)
            self.bias = nn.Parameter(linear.bias.detach(), requires_grad=False) if linear.bias is not None else None
            self.compute_dtype, self.compute_type_is_set = compute_dtype, True
            self.quant_state, self.quant_storage = state, torch.uint8
            self.support_avx512bf16_for_cpu = False

    return FakeLinear4bit


def _cache_blockwise_codebook(bnb) -> None:
    """bitsandbytes builds its 8-bit codebook (for the double-quantized scales) with a host read, which
    fake tensors cannot do; build it for real once, as bitsandbytes itself caches it (256 floats)."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    if "dynamic" not in bnb.functional.name2qmap:
        with unset_fake_temporarily():
            bnb.functional.name2qmap["dynamic"] = bnb.functional.create_dynamic_map().to("cpu")


def fake_linear4bit(bnb, linear: nn.Linear, kind: str, compute_dtype: torch.dtype, blocksize: int, double_quant: bool) -> nn.Module:
    """The 4-bit layer of a model built on fake tensors (``paca plan``): byte- and shape-faithful, no kernels run.
    ``bnb``, ``blocksize`` and ``double_quant``: the bitsandbytes module and settings the real layers use."""
    layer = _fake_linear4bit_class(bnb, blocksize, double_quant)(linear, kind, compute_dtype)
    layer.train(linear.training)
    return layer
