"""The reference implementation of every primitive in plain PyTorch ops.

It runs on any device PyTorch supports, with static shapes and no host synchronisation, so it is
also what graph-compiled devices (HPU lazy mode, torch.compile) execute unless a backend overrides it.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from .base import Backend, PartialConnectionGrads, Tolerance

#: Upper bound on the float32 temporary made when upcasting half-precision GEMM operands.
_FP32_CHUNK_BYTES = 64 * 2**20


def matmul_t_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``aᵀ @ b`` for 2-D ``a`` (N, m) and ``b`` (N, k), accumulated and returned in at least float32.

    Half-precision operands are upcast in row chunks so the float32 copy stays small; float32 and
    float64 operands are multiplied as they are.
    """
    if a.dtype not in (torch.float16, torch.bfloat16) and a.dtype == b.dtype:
        return a.t().mm(b)
    rows = a.shape[0]
    width = a.shape[1] + b.shape[1]
    chunk = max(1, min(rows, _FP32_CHUNK_BYTES // max(1, 4 * width)))
    out = torch.zeros(a.shape[1], b.shape[1], dtype=torch.float32, device=a.device)
    for start in range(0, rows, chunk):  # static trip count for a given shape: graph friendly
        a_part = a[start : start + chunk].float()
        b_part = b[start : start + chunk].float()
        out.addmm_(a_part.t(), b_part)
    return out


class TorchBackend(Backend):
    """Portable primitives; subclasses override only what their device does faster."""

    name = "torch-portable"
    tolerances = {
        torch.float64: Tolerance(1e-10, 1e-10),
        torch.float32: Tolerance(1e-4, 1e-5),
        torch.bfloat16: Tolerance(2e-2, 2e-2),
        torch.float16: Tolerance(5e-3, 5e-3),
    }

    def partial_connection_forward(self, x, weight, bias, indices):
        output = F.linear(x, weight, bias)
        return output, x.index_select(-1, indices)

    def _delta_grad(self, grad_2d: torch.Tensor, x_selected_2d: torch.Tensor) -> torch.Tensor:
        return matmul_t_fp32(grad_2d, x_selected_2d)

    def partial_connection_backward(
        self, grad_output, x_selected, weight, need_input_grad, need_delta_grad, need_bias_grad
    ):
        grad_input = grad_output.matmul(weight) if need_input_grad else None
        grad_delta = None
        if need_delta_grad:
            grad_2d = grad_output.reshape(-1, grad_output.shape[-1])
            grad_delta = self._delta_grad(grad_2d, x_selected.reshape(-1, x_selected.shape[-1]))
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
