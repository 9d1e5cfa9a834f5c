"""VeLoRA: compress the inputs other methods keep only for a weight gradient (a modifier)."""
from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from ..base_config import ALL_LINEAR, MethodConfig, field_default
from ..errors import PacaConfigError
from .registry import CommonOptions, Method, register_method

if TYPE_CHECKING:
    import torch.nn as nn


logger = logging.getLogger(__name__)
#: Input widths already warned about (one warning per width, not per layer).
_WARNED_WIDTHS: set[int] = set()


@dataclass
class VeLoRAConfig(MethodConfig):
    """VeLoRA activation compression, applied to layers another method created where an input is kept
    only for a weight gradient (LoRA's A input, fully trained linears).

    Args:
        num_groups: sub-tokens per token (G); G numbers are kept per token instead of d. Default 32
            (sub-token size d/32, the paper's recommendation; PEFT defaults to 64).
        scale: multiplies the rebuilt input in backward.
        init_type: ``batch_average_once`` (projection = normalised mean sub-token of the first
            training batch, then fixed: the paper's default), ``batch_average`` (every batch, PEFT's
            default) or ``ema`` (running average with ``ema_decay``).
        target_modules: which adapted layers get compression; ``"all-linear"`` (default) = every
            adapted layer that supports it.
    """

    method: ClassVar[str] = "velora"
    modifier: ClassVar[bool] = True
    target_modules: list[str] | str = ALL_LINEAR
    num_groups: int = 32
    scale: float = 1.0
    init_type: str = "batch_average_once"
    ema_decay: float = 0.9

    def check(self) -> None:
        if not isinstance(self.num_groups, int) or self.num_groups < 1:
            raise PacaConfigError(f"num_groups must be a positive integer, got {self.num_groups!r}.")
        if not self.scale > 0:
            raise PacaConfigError(f"scale must be positive, got {self.scale!r}.")
        from ..layers.compression import INIT_TYPES

        if self.init_type not in INIT_TYPES:
            raise PacaConfigError(f"init_type must be one of {', '.join(INIT_TYPES)}, got {self.init_type!r}.")
        if not 0.0 <= self.ema_decay < 1.0:
            raise PacaConfigError(f"ema_decay must be in [0, 1), got {self.ema_decay!r}.")

    def create_compressor(self, layer: nn.Module) -> nn.Module:
        from ..layers.compression import ActivationCompressor

        if self.num_groups > layer.in_features and layer.in_features not in _WARNED_WIDTHS:
            _WARNED_WIDTHS.add(layer.in_features)
            logger.warning("VeLoRA num_groups %d (paca train --velora-groups) is larger than a layer's input width %d: every token "
                           "is zero-padded to %d groups, which keeps more than the plain input; use %d or fewer groups.",
                           self.num_groups, layer.in_features, self.num_groups, layer.in_features)
        # beside the layer's other adapter tensors (offloaded base: where accelerate runs it)
        return ActivationCompressor(layer.in_features, self.num_groups, self.scale, self.init_type, self.ema_decay, device=layer.adapter_device)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--velora-groups", type=int, default=field_default(VeLoRAConfig, "num_groups"),
                        help="VeLoRA sub-tokens per token (G numbers kept instead of d)")
    parser.add_argument("--velora-scale", type=float, default=field_default(VeLoRAConfig, "scale"), help="VeLoRA scale of the rebuilt input")
    parser.add_argument("--velora-init", default=field_default(VeLoRAConfig, "init_type"),
                        help="VeLoRA projection: batch_average_once, batch_average or ema")


def from_args(args: argparse.Namespace, common: CommonOptions) -> VeLoRAConfig:
    return VeLoRAConfig(num_groups=args.velora_groups, scale=args.velora_scale, init_type=args.velora_init, seed=common.seed)


METHOD = register_method(
    Method(
        name="velora",
        config=VeLoRAConfig,
        from_args=from_args,
        alone=("lora", "velora"),
        add_arguments=add_arguments,
        options=("velora_groups", "velora_scale", "velora_init"),
        field_flags={"num_groups": "--velora-groups", "scale": "--velora-scale", "init_type": "--velora-init"},
        bench_flags=("velora_groups",),  # for ours and PEFT's VeLoRA (peft-lora+velora) alike
        default_lr=2e-3,
        default_rank=8,
        leads=False,
        bench_peers=("peft-lora+velora",),
        summary="inputs kept only for a weight gradient stored as G sub-token projections",
    )
)
