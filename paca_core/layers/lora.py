"""LoRA and LoRA-FA: ``y = W x + scaling · B (A x)``; LoRA-FA freezes A so only ``A x`` (rank r) is kept.

With A frozen, autograd keeps nothing of size ``d`` for this layer: the base GEMM and the A GEMM
need ``x`` only for weight gradients that are not computed. Dropout (p > 0) brings a full-size
mask back, and activation checkpointing recomputes everything anyway; see docs/methods.md.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import LinearAdapterLayer
from .compression import ActivationCompressor, CompressibleInput


class LoRALinear(CompressibleInput, LinearAdapterLayer):
    """Frozen base linear plus ``lora_B @ lora_A`` (A: r × in, B: out × r; B starts at zero)."""

    def __init__(self, base_layer: nn.Linear, r: int, alpha: float | None, dropout: float, freeze_a: bool, seed: int, module_name: str = ""):
        super().__init__(base_layer, module_name)
        base_layer.weight.requires_grad_(False)
        self.r, self.alpha = r, float(alpha if alpha is not None else r)
        self.scaling = self.alpha / r
        lora_a = torch.empty(r, self.in_features, dtype=torch.float32)
        bound = 1.0 / math.sqrt(self.in_features)  # = kaiming_uniform_(a=sqrt(5)), as nn.Linear and PEFT
        lora_a.uniform_(-bound, bound, generator=self.generator(seed))
        # Declared: placed beside the weight (offloaded: where accelerate runs it); LoRA-FA's A saved but frozen.
        self.add_adapter_parameter("lora_A", lora_a, trainable=not freeze_a)
        self.add_adapter_parameter("lora_B", torch.zeros(self.out_features, r, dtype=torch.float32, device=self.adapter_device))
        self.freeze_a = freeze_a
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.compressor: ActivationCompressor | None = None

    def supports_compression(self) -> bool:
        """VeLoRA applies to A's input only when A is trained (a frozen A keeps no input anyway)."""
        return not self.freeze_a

    def adapter_state(self) -> dict[str, torch.Tensor]:
        return {**self.declared_state(), **self._compressor_state()}

    def load_adapter_state(self, tensors: dict[str, torch.Tensor]) -> None:
        super().load_adapter_state(tensors)
        self._load_compressor_state(tensors)

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B.detach().float() @ self.lora_A.detach().float()) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if not self.adapter_enabled or self.merged:
            return result
        dtype = result.dtype  # compute in the activation dtype; fp32 parameters receive fp32 grads
        hidden = self.dropout(x).to(dtype)
        lora_a = self.lora_A.to(dtype)
        if self.compressor is not None and self.training and torch.is_grad_enabled() and self.lora_A.requires_grad:
            after_a = self.compressor.linear(hidden, lora_a, None)
        else:
            after_a = F.linear(hidden, lora_a)
        return result + F.linear(after_a, self.lora_B.to(dtype)) * self.scaling

    def merge(self) -> None:
        """Fold ΔW into the base weight; forward is then the base layer alone."""
        if not self.merged:
            with torch.no_grad():
                weight = self.base_layer.weight
                weight.copy_((weight.float() + self.delta_weight().to(weight.device)).to(weight.dtype))
            self.merged = True

    def unmerge(self) -> None:
        if self.merged:
            with torch.no_grad():
                weight = self.base_layer.weight
                weight.copy_((weight.float() - self.delta_weight().to(weight.device)).to(weight.dtype))
            self.merged = False

    def unload(self, merge: bool) -> nn.Linear:
        if self.merged and not merge:
            self.unmerge()
        if self.merged and merge:
            return self.base_layer
        return super().unload(merge)

    def extra_repr(self) -> str:
        return f"method={self.method}, r={self.r}, scaling={self.scaling:g}, in={self.in_features}, out={self.out_features}"


class FullLinear(CompressibleInput, LinearAdapterLayer):
    """A linear trained in full (optionally with VeLoRA compressing its input).

    Used beside PaCA or LoRA for the modules a user wants fully trained. ΔW is not kept (it would
    double the layer's memory), so ``unload()`` without merge and ``disable_adapter()`` are refused.
    """

    def __init__(self, base_layer: nn.Linear, module_name: str = ""):
        super().__init__(base_layer, module_name)
        base_layer.weight.requires_grad_(True)
        self.compressor: ActivationCompressor | None = None

    def adapter_state(self) -> dict[str, torch.Tensor]:
        return {"weight": self.base_layer.weight, **self._compressor_state()}

    @torch.no_grad()
    def load_adapter_state(self, tensors: dict[str, torch.Tensor]) -> None:
        self.base_layer.weight.copy_(tensors["weight"])
        self._load_compressor_state(tensors)

    def set_adapter_enabled(self, enabled: bool) -> None:
        if not enabled:
            raise RuntimeError(
                f"{self.module_name} is fully trained; its pretrained weight is not kept, so the adapter cannot be disabled."
            )

    def unload(self, merge: bool) -> nn.Linear:
        if not merge:
            raise RuntimeError(f"{self.module_name} is fully trained; its pretrained weight is not kept (use merge_and_unload).")
        return self.base_layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.base_layer.weight
        if self.compressor is not None and self.training and torch.is_grad_enabled() and weight.requires_grad:
            return self.compressor.linear(x, weight, self.base_layer.bias)
        return self.base_layer(x)
