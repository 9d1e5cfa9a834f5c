"""QPaCA: PaCA on a frozen 4-bit (bitsandbytes NF4/FP4) linear layer.

A packed 4-bit weight cannot hold ``original + scaling·delta`` in r columns (the dense PaCA layer's
trick), and rewriting it would requantize. With a zero-initialised delta the adapted layer is
exactly ``W' = W_q + scaling·Δ·Sᵀ`` (``S`` selects the columns), so

    y = W_q·x + scaling·Δ·x[..., idx]

one 4-bit GEMM plus one skinny (tokens × r × out) GEMM. Backward keeps only ``x[..., idx]``: the
delta's gradient is ``scaling·grad_yᵀ·x[..., idx]`` and the input gradient goes through the 4-bit
weight plus the skinny ``scaling·grad_y·Δ`` in the selected columns. The base stays packed for the
whole run; a full-precision copy of a weight exists only transiently inside the backward GEMM (as in
QLoRA). Nothing has to be written back after optimizer steps, so there is no sync hook.
"""
from __future__ import annotations

import logging

import torch
import torch.nn as nn

from backends import Backend, bitsandbytes_compat, get_backend

from .indices import check_columns
from ..memory.quantization import dequantize_weight, is_quantized_linear, quantized_kind, requantize
from .base import LinearAdapterLayer
from .partial_connection import _autocast_dtype, check_rank_fits, init_partial_connection, partial_connection_delta

logger = logging.getLogger(__name__)


class _QuantizedPartialConnectionLinear(torch.autograd.Function):
    """y = x W_qᵀ + b + scaling · x[..., idx] Δᵀ; saves only x[..., idx] (and references to Δ, W_q)."""

    @staticmethod
    def forward(ctx, x, delta, bias, weight_4bit, quant_state, indices, scaling, backend: Backend, compute_dtype):
        if compute_dtype is not None:  # autocast: cast explicitly, run the GEMMs outside autocast
            x = x.to(compute_dtype)
        with torch.autocast(device_type=x.device.type, enabled=False):
            output, x_selected = backend.quantized_partial_connection_forward(
                x, weight_4bit, quant_state, bias, delta, indices, scaling
            )
        ctx.save_for_backward(x_selected, delta, indices)
        ctx.weight_4bit = weight_4bit  # a frozen parameter: referenced, never copied
        ctx.quant_state = quant_state
        ctx.scaling = scaling
        ctx.backend = backend
        ctx.has_bias = bias is not None
        ctx.compute_dtype = output.dtype
        return output

    @staticmethod
    def backward(ctx, grad_output):
        x_selected, delta, indices = ctx.saved_tensors
        need_x, need_delta, need_bias = ctx.needs_input_grad[:3]
        grads = ctx.backend.quantized_partial_connection_backward(
            grad_output.to(ctx.compute_dtype),
            x_selected,
            ctx.weight_4bit,
            ctx.quant_state,
            delta,
            indices,
            ctx.scaling,
            need_input_grad=need_x,
            need_delta_grad=need_delta,
            need_bias_grad=need_bias and ctx.has_bias,
        )
        grad_delta = grads.delta.to(delta.dtype) if grads.delta is not None else None
        return grads.input, grad_delta, grads.bias, None, None, None, None, None, None


class QuantizedPaCALinear(LinearAdapterLayer):
    """Wraps a frozen bitsandbytes ``Linear4bit`` (kept as ``base_layer``) with a trainable ``paca_delta`` (out, r).

    The delta (and so the optimizer state) is float32; the forward runs in the activation dtype.
    Checkpoints hold the delta and the column indices, exactly like :class:`PaCALinear`, so export
    to a PEFT LoRA adapter works unchanged (exact on the same 4-bit base).
    """

    shardable = False  # bitsandbytes 4-bit weights are not FSDP2 parameters
    quantized_base = True

    def __init__(
        self, base_layer: nn.Module, r: int, alpha: float | None, indices: torch.Tensor, module_name: str = "",
        scaling: float | None = None,
    ):
        if not is_quantized_linear(base_layer):
            raise TypeError(f"QuantizedPaCALinear wraps a bitsandbytes Linear4bit; {module_name or 'module'} is {type(base_layer).__name__}.")
        super().__init__(base_layer, module_name)
        self.quant_type = quantized_kind(base_layer)
        check_rank_fits(r, self.in_features, module_name)
        base_layer.weight.requires_grad_(False)
        bitsandbytes_compat.restore_standard_layout(base_layer, module_name)
        bitsandbytes_compat.keep_standard_layout(base_layer)  # its eval forward is ours; a repacked weight has no backward
        init_partial_connection(self, r, alpha, indices, scaling)

    # --- checkpoint state (declared: paca_delta, paca_indices) -------------------------------------
    @torch.no_grad()
    def load_adapter_state(self, tensors: dict[str, torch.Tensor]) -> None:
        indices = tensors["paca_indices"]
        check_columns(indices, self.in_features, self.module_name)
        self.paca_indices.copy_(indices)
        self.paca_delta.copy_(tensors["paca_delta"])

    # --- weights ------------------------------------------------------------------------------------
    def delta_weight(self) -> torch.Tensor:
        """ΔW (out, in) in float32: ``scaling·delta`` in the selected columns, zero elsewhere."""
        return partial_connection_delta(self, self.paca_delta.detach())

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """``deq(W_q) + ΔW`` in the base's original dtype: exactly the weight this layer computes with."""
        weight = dequantize_weight(self.base_layer)
        merged = weight.float().index_add_(1, self.paca_indices, self.paca_delta.detach() * self.scaling)
        return merged.to(weight.dtype)

    # --- forward ---------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bitsandbytes_compat.is_repacked(self.base_layer.weight.quant_state):  # someone ran the base layer on its own
            bitsandbytes_compat.restore_standard_layout(self.base_layer, self.module_name)
        weight = self.base_layer.weight
        delta = self.paca_delta if self.adapter_enabled else None
        backend = get_backend(x.device)
        bias = self.base_layer.bias
        tracked = torch.is_grad_enabled() and (x.requires_grad or (delta is not None and delta.requires_grad))
        if tracked and delta is None:  # adapter disabled, gradient to the input: bitsandbytes' own autograd
            return self.base_layer(x)
        if not tracked:
            compute_dtype = _autocast_dtype(x.device.type)
            x_in = x.to(compute_dtype) if compute_dtype is not None else x
            with torch.autocast(device_type=x.device.type, enabled=False):
                output, _ = backend.quantized_partial_connection_forward(
                    x_in, weight, weight.quant_state, bias, delta, self.paca_indices, self.scaling
                )
            return output
        return _QuantizedPartialConnectionLinear.apply(
            x,
            delta,
            bias,
            weight,
            weight.quant_state,
            self.paca_indices,
            self.scaling,
            backend,
            _autocast_dtype(x.device.type),
        )

    # --- merge -------------------------------------------------------------------------------------
    def unload(self, merge: bool) -> nn.Module:
        """Return the 4-bit base layer; with ``merge`` the delta is folded in and the weight requantized.

        Requantizing rounds ``deq(W_q) + ΔW`` to the 4-bit grid again, so outputs change a little; the
        error is logged and kept in ``self.merge_error``. Exact alternatives: keep the adapter (or
        export it as a PEFT LoRA adapter on the same 4-bit base), or
        :func:`paca_core.memory.quantization.merge_and_dequantize` for a full-precision merged model.
        """
        if merge:
            with torch.no_grad():
                self.merge_error = requantize(self.base_layer, self.merged_weight())
            logger.warning(
                "%s: merging into a %s base requantizes the weight, which changes outputs slightly "
                "(max |error| %.3g, relative %.3g of the merged weight). For an exact result keep the adapter, "
                "export it with `paca export-peft`, or merge to full precision (merge_and_dequantize).",
                self.module_name, self.quant_type, self.merge_error.max_abs, self.merge_error.relative,
            )
        bitsandbytes_compat.allow_cpu_repacking(self.base_layer)  # a plain bitsandbytes layer again: its own inference path
        return self.base_layer

    def extra_repr(self) -> str:
        return f"r={self.r}, scaling={self.scaling:g}, in={self.in_features}, out={self.out_features}, base={self.quant_type}"
