"""VeLoRA activation compression for inputs that are kept only for a weight gradient.

The GEMM and the input gradient are exact; the weight gradient uses the input rebuilt from G
coefficients per token (one per sub-token, on a fixed unit direction), so a layer keeps
``G`` numbers per token instead of ``d``.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from backends import Backend, get_backend

INIT_TYPES = ("batch_average_once", "batch_average", "ema")


class _CompressedInputLinear(torch.autograd.Function):
    """``F.linear(x, weight, bias)`` that saves compressed ``x`` for the weight gradient."""

    @staticmethod
    def forward(ctx, x, weight, bias, projection, num_groups: int, scale: float, backend: Backend):
        output = F.linear(x, weight, bias)
        coefficients = backend.compress(x, projection, num_groups)
        ctx.save_for_backward(coefficients, weight, projection)
        ctx.input_shape, ctx.input_dtype = x.shape, x.dtype
        ctx.scale, ctx.backend = scale, backend
        ctx.has_bias = bias is not None
        return output

    @staticmethod
    def backward(ctx, grad_output):
        coefficients, weight, projection = ctx.saved_tensors
        grad_2d = grad_output.reshape(-1, grad_output.shape[-1])
        grad_input = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_input = grad_2d.matmul(weight.to(grad_2d.dtype)).reshape(ctx.input_shape).to(ctx.input_dtype)
        if ctx.needs_input_grad[1]:
            rebuilt = ctx.backend.decompress(coefficients, projection, weight.shape[1]).to(grad_2d.dtype)
            grad_weight = ctx.backend.skinny_grad_fp32(grad_2d, rebuilt).mul_(ctx.scale).to(weight.dtype)
        if ctx.needs_input_grad[2] and ctx.has_bias:
            grad_bias = grad_2d.sum(0)
        return grad_input, grad_weight, grad_bias, None, None, None, None


class ActivationCompressor(nn.Module):
    """Holds VeLoRA's projection for one input width and applies the compressed linear."""

    def __init__(self, in_features: int, num_groups: int, scale: float, init_type: str, ema_decay: float, device=None):
        super().__init__()
        if init_type not in INIT_TYPES:
            raise ValueError(f"VeLoRA init_type must be one of {', '.join(INIT_TYPES)}, got {init_type!r}.")
        self.in_features, self.num_groups, self.scale = in_features, num_groups, float(scale)
        self.init_type, self.ema_decay = init_type, float(ema_decay)
        group_dim = -(-in_features // num_groups)
        self.register_buffer("velora_projection", torch.zeros(group_dim, dtype=torch.float32, device=device))
        self.register_buffer("velora_initialized", torch.zeros((), dtype=torch.bool, device=device))
        self._initialized = False  # Python mirror of the buffer: no host read in the step

    def _update_projection(self, x: torch.Tensor, backend: Backend) -> None:
        if self.init_type == "batch_average_once" and self._initialized:
            return
        with torch.no_grad():
            direction = _same_on_every_rank(backend.subtoken_mean_direction(x, self.num_groups))
            if self.init_type == "ema" and self._initialized:
                blended = self.ema_decay * self.velora_projection + (1 - self.ema_decay) * direction
                direction = blended / torch.linalg.vector_norm(blended).clamp_min(torch.finfo(torch.float32).tiny)
            self.velora_projection.copy_(direction)
            self.velora_initialized.fill_(True)
        self._initialized = True

    def sync_from_buffers(self) -> None:
        """After loading a checkpoint: take the saved projection as initialised."""
        self._initialized = bool(self.velora_initialized)

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        backend = get_backend(x.device)
        self._update_projection(x, backend)
        return _CompressedInputLinear.apply(x, weight, bias, self.velora_projection, self.num_groups, self.scale, backend)

    def extra_repr(self) -> str:
        return f"num_groups={self.num_groups}, scale={self.scale:g}, init_type={self.init_type}"


class CompressibleInput:
    """Mixin for layers whose input is kept only for a weight gradient, so VeLoRA can compress it.

    Layers set ``self.compressor = None`` in ``__init__`` (no class attribute here: it would shadow
    the submodule that ``nn.Module`` registers when a compressor is attached)."""

    def supports_compression(self) -> bool:
        return True

    def attach_compressor(self, compressor: ActivationCompressor) -> None:
        self.compressor = compressor

    def _compressor_state(self) -> dict[str, torch.Tensor]:
        if self.compressor is None:
            return {}
        return {"velora_projection": self.compressor.velora_projection, "velora_initialized": self.compressor.velora_initialized}

    @torch.no_grad()
    def _load_compressor_state(self, tensors: dict[str, torch.Tensor]) -> None:
        if self.compressor is not None:
            self.compressor.velora_projection.copy_(tensors["velora_projection"])
            self.compressor.velora_initialized.copy_(tensors["velora_initialized"])
            self.compressor.sync_from_buffers()


def _same_on_every_rank(direction: torch.Tensor) -> torch.Tensor:
    """Under torch.distributed, every rank's projection must be the same one (each rank sees only its
    share of the batch): average the ranks' unit directions and renormalise."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return direction
    summed = direction.clone()
    dist.all_reduce(summed)
    return summed / torch.linalg.vector_norm(summed).clamp_min(torch.finfo(torch.float32).tiny)
