"""The reference implementation of every primitive in plain PyTorch ops.

It runs on any device PyTorch supports, with static shapes and no host synchronisation, so it is
also what graph-compiled devices (HPU lazy mode, torch.compile) execute unless a backend overrides
it, and what ``get_backend`` gives a device type that has no backend of its own.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import Backend, PartialConnectionGrads, Tolerance
from .bitsandbytes_compat import dequantize as dequantize_4bit

#: Upper bound on the float32 temporary made when upcasting half-precision GEMM operands.
_FP32_CHUNK_BYTES = 64 * 2**20
#: Upper bound on the (tokens, k, d) row gathers of the sparse adapter, so big models never blow up.
_GATHER_CHUNK_BYTES = 64 * 2**20


class TorchBackend(Backend):
    """Portable primitives; subclasses override only what their device does faster."""

    name = "torch-portable"
    tolerances = {
        torch.float64: Tolerance(1e-10, 1e-10),
        torch.float32: Tolerance(1e-4, 1e-5),
        torch.bfloat16: Tolerance(2e-2, 2e-2),
        torch.float16: Tolerance(5e-3, 5e-3),
    }

    def skinny_grad_fp32(self, a, b):
        # Half-precision operands are upcast in row chunks so the float32 copy stays small; float32
        # and float64 operands are multiplied as they are (aᵀ·b: the GEMM dense autograd and PEFT run).
        if a.dtype not in (torch.float16, torch.bfloat16) and a.dtype == b.dtype:
            return a.t().mm(b)
        rows = a.shape[0]
        width = a.shape[1] + b.shape[1]
        chunk = max(1, min(rows, _FP32_CHUNK_BYTES // max(1, 4 * width)))
        # Upcast, the GEMM runs as (bᵀ·a)ᵀ: the same fp32 products and sums as aᵀ·b, but with the wide dimension
        # (a layer's out_features) as the GEMM's n and the narrow one (r) as its m, which took 0.6x the time of aᵀ·b
        # on this project's AVX-512 CPU for (256 x 1536)ᵀ·(256 x 16) (scripts/peft_paca_speed.py, docs/benchmarks.md
        # section 10). One chunk: a plain mm, no zero-filled accumulator.
        if chunk >= rows:
            return b.float().t().mm(a.float()).t().contiguous()
        out = torch.zeros(b.shape[1], a.shape[1], dtype=torch.float32, device=a.device)
        for start in range(0, rows, chunk):  # static trip count for a given shape: graph friendly
            out.addmm_(b[start : start + chunk].float().t(), a[start : start + chunk].float())
        return out.t().contiguous()

    def partial_connection_forward(self, x, weight, bias, indices):
        output = F.linear(x, weight, bias)
        return output, x.index_select(-1, indices)

    def partial_connection_backward(
        self, grad_output, x_selected, weight, need_input_grad, need_delta_grad, need_bias_grad
    ):
        grad_input = grad_output.matmul(weight) if need_input_grad else None
        grad_delta = None
        if need_delta_grad:
            grad_2d = grad_output.reshape(-1, grad_output.shape[-1])
            grad_delta = self.skinny_grad_fp32(grad_2d, x_selected.reshape(-1, x_selected.shape[-1]))
        grad_bias = grad_output.reshape(-1, grad_output.shape[-1]).sum(0) if need_bias_grad else None
        return PartialConnectionGrads(grad_input, grad_delta, grad_bias)

    @torch.no_grad()
    def write_adapted_columns(self, weights, indices, originals, deltas, scalings):
        for weight, idx, original, delta, scaling in zip(weights, indices, originals, deltas, scalings):
            compute = torch.promote_types(torch.promote_types(original.dtype, delta.dtype), torch.float32)
            adapted = original.to(compute).add(delta.to(compute), alpha=float(scaling))
            weight.index_copy_(1, idx, adapted.to(weight.dtype))

    # --- activation compression (VeLoRA) ---------------------------------------------------------
    @staticmethod
    def _subtokens(x: torch.Tensor, num_groups: int) -> torch.Tensor:
        group_dim = -(-x.shape[-1] // num_groups)
        padding = num_groups * group_dim - x.shape[-1]
        if padding:
            x = F.pad(x, (0, padding))
        return x.reshape(-1, num_groups, group_dim)

    def compress(self, x, projection, num_groups):
        return torch.matmul(self._subtokens(x, num_groups), projection.to(x.dtype))

    def decompress(self, coefficients, projection, in_features):
        rebuilt = coefficients.unsqueeze(-1) * projection.to(coefficients.dtype)
        return rebuilt.reshape(coefficients.shape[0], -1)[:, :in_features]

    def subtoken_mean_direction(self, x, num_groups):
        mean = self._subtokens(x.detach(), num_groups).reshape(-1, -(-x.shape[-1] // num_groups)).float().mean(0)
        # No host read (graph friendly): an all-zero mean falls back to the uniform direction.
        norm = torch.linalg.vector_norm(mean)
        uniform = torch.full_like(mean, mean.numel() ** -0.5)
        return torch.where(norm > 0, mean / norm.clamp_min(torch.finfo(torch.float32).tiny), uniform)

    # --- sparse host-memory adapter (MEFT) -------------------------------------------------------
    # Dense over the (small) row buffer instead of gathering (T, k, d) rows: every product is a GEMM
    # with the buffer (T × R × d), and each token's k rows enter through a (T, R) matrix that is zero
    # elsewhere. GEMMs beat row gathers by far on CPUs and on tensor cores; tokens are processed in
    # chunks so the (chunk, R) temporaries stay small.
    @staticmethod
    def _token_chunk(tokens: int, buffer_rows: int) -> int:
        return max(1, min(tokens, _GATHER_CHUNK_BYTES // max(1, 4 * buffer_rows)))

    def sparse_rows_forward(self, x, keys, values, slots, gates):
        tokens, k = slots.shape
        out = torch.empty_like(x)
        scores = torch.empty(tokens, k, dtype=x.dtype, device=x.device)
        chunk = self._token_chunk(tokens, keys.shape[0])
        for start in range(0, tokens, chunk):  # static trip count for a given shape
            end = min(tokens, start + chunk)
            rows = slots[start:end]
            part = (x[start:end] @ keys.t()).gather(1, rows)
            scores[start:end] = part
            weights = torch.relu(part) * gates[start:end].to(part.dtype)
            dense = torch.zeros(end - start, keys.shape[0], dtype=x.dtype, device=x.device).scatter_add_(1, rows, weights)
            out[start:end] = dense @ values
        return out, scores

    def sparse_rows_backward(self, grad_output, x, keys, values, slots, gates, scores):
        tokens, k = slots.shape
        buffer_rows = keys.shape[0]
        grad_x = torch.empty_like(x)
        grad_gates = torch.empty(tokens, k, dtype=torch.float32, device=x.device)
        grad_keys = torch.zeros(keys.shape, dtype=torch.float32, device=x.device)
        grad_values = torch.zeros(values.shape, dtype=torch.float32, device=x.device)
        keys32, values32 = keys.float(), values.float()
        chunk = self._token_chunk(tokens, buffer_rows)
        for start in range(0, tokens, chunk):
            end = min(tokens, start + chunk)
            rows = slots[start:end]
            g_out = grad_output[start:end].float()
            x32 = x[start:end].float()
            part_scores = scores[start:end].float()
            active = torch.relu(part_scores)
            gate = gates[start:end].float()
            g_weight = (g_out @ values32.t()).gather(1, rows)  # d out / d (gate · relu(score))
            grad_gates[start:end] = g_weight * active
            g_score = g_weight * gate * (part_scores > 0)
            zeros = torch.zeros(end - start, buffer_rows, dtype=torch.float32, device=x.device)
            g_dense = zeros.scatter_add(1, rows, g_score)
            grad_x[start:end] = (g_dense @ keys32).to(x.dtype)
            grad_keys.addmm_(g_dense.t(), x32)
            grad_values.addmm_(zeros.scatter_add_(1, rows, active * gate).t(), g_out)
        return grad_x, grad_keys, grad_values, grad_gates

    # --- partial connection on a 4-bit quantized base (QPaCA) ------------------------------------
    # bitsandbytes (an optional extra) is reached through backends.bitsandbytes_compat, which dequantizes the same,
    # correct weight on every kernel bitsandbytes may pick for the tensors' device.
    def quantized_partial_connection_forward(self, x, weight_4bit, quant_state, bias, delta, indices, scaling):
        if bias is not None:
            bias = bias.to(x.dtype)
        with torch.no_grad():  # a kernel: the caller's autograd.Function owns the backward
            output = F.linear(x, dequantize_4bit(weight_4bit, quant_state).to(x.dtype), bias)
        x_selected = x.index_select(-1, indices)
        if delta is not None:
            flat = output.view(-1, output.shape[-1])
            flat.addmm_(x_selected.reshape(-1, x_selected.shape[-1]), delta.to(x.dtype).t(), alpha=float(scaling))
        return output, x_selected

    def quantized_partial_connection_backward(
        self, grad_output, x_selected, weight_4bit, quant_state, delta, indices, scaling,
        need_input_grad, need_delta_grad, need_bias_grad,
    ):
        grad_input = grad_delta = grad_bias = None
        if need_input_grad:
            # The full-precision weight exists only for this GEMM (as in QLoRA's backward).
            grad_input = grad_output.matmul(dequantize_4bit(weight_4bit, quant_state).to(grad_output.dtype))
            skinny = grad_output.matmul(delta.to(grad_output.dtype))
            grad_input.index_add_(-1, indices, skinny, alpha=float(scaling))
        grad_2d = grad_output.reshape(-1, grad_output.shape[-1])
        if need_delta_grad:
            grad_delta = self.skinny_grad_fp32(grad_2d, x_selected.reshape(-1, x_selected.shape[-1])).mul_(float(scaling))
        if need_bias_grad:
            grad_bias = grad_2d.sum(0)
        return PartialConnectionGrads(grad_input, grad_delta, grad_bias)
