"""LoRA and LoRA-FA (LoRA with A frozen)."""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from ..base_config import MethodConfig, check_rank, field_default
from ..errors import PacaConfigError
from .registry import CommonOptions, Method, ScaledAboveDefaultRank, register_method

if TYPE_CHECKING:
    import torch
    import torch.nn as nn


@dataclass
class LoRAConfig(MethodConfig):
    """LoRA: ``y = W x + alpha/r · B A x`` with A (r × in) random, B (out × r) zero; both trained.

    ``alpha=None`` means ``alpha = r`` (scaling 1). ``dropout`` > 0 keeps a full-size mask per layer.
    """

    method: ClassVar[str] = "lora"
    r: int = 8
    alpha: float | None = None
    dropout: float = 0.0

    def check(self) -> None:
        check_rank(self)
        if not 0.0 <= self.dropout < 1.0:
            raise PacaConfigError(f"dropout must be in [0, 1), got {self.dropout!r}.")

    def create_layer(self, linear: nn.Linear, module_name: str) -> nn.Module:
        from ..layers.lora import LoRALinear

        return LoRALinear(linear, self.r, self.alpha, self.dropout, freeze_a=self.freeze_a, seed=self.seed, module_name=module_name)

    def offloaded_weight_problem(self, module: nn.Module) -> str | None:
        return None  # the base layer runs through accelerate's hook; A and B live on its execution device

    freeze_a: ClassVar[bool] = False


@dataclass
class LoRAFAConfig(LoRAConfig):
    """LoRA-FA: LoRA with A frozen at its random init; only B trains and only ``A x`` (rank r) is kept."""

    method: ClassVar[str] = "lorafa"
    freeze_a: ClassVar[bool] = True


def export_lora(layer) -> tuple[torch.Tensor, torch.Tensor]:
    """LoRA's own factors, the scaling folded into B."""
    import torch

    lora_a = layer.lora_A.detach().to("cpu", torch.float32).contiguous()
    return lora_a, (layer.lora_B.detach().to("cpu", torch.float32) * layer.scaling).contiguous()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--lora-dropout", type=float, default=field_default(LoRAConfig, "dropout"), help="lora/lorafa dropout (p > 0 keeps a full-size mask per layer)")


def _from_args(cls: type[LoRAConfig]):
    def from_args(args: argparse.Namespace, common: CommonOptions) -> LoRAConfig:
        return cls(r=common.rank, alpha=common.alpha, dropout=args.lora_dropout, **common.config_fields())

    return from_args


LORA = register_method(
    Method(
        name="lora",
        config=LoRAConfig,
        from_args=_from_args(LoRAConfig),
        add_arguments=add_arguments,
        options=("lora_dropout",),
        #: Chosen by the worst-share rule over three data sets (scripts/lr_sweep.py, docs/methods.md), lower
        #: above rank 8; lora+velora follows it (its primary method is lora).
        default_lr=ScaledAboveDefaultRank(5e-3, 8, power=0.5),
        default_rank=8,
        exclusive=True,
        export_lora=export_lora,
        bench_peers=("peft-lora", "peft-qlora", "peft-qlora-16bit"),
        summary="numerically equal to HF PEFT LoRA on the same weights",
    )
)
LORAFA = register_method(
    Method(
        name="lorafa",
        config=LoRAFAConfig,
        from_args=_from_args(LoRAFAConfig),
        options=("lora_dropout",),
        default_lr=ScaledAboveDefaultRank(5e-3, 8, power=0.5),  # the worst-share rule over three data sets (docs/methods.md)
        default_rank=8,
        exclusive=True,
        match_factor=2,  # B only: r·out per layer
        export_lora=export_lora,
        bench_peers=("peft-lorafa",),
        summary="LoRA with A frozen: only A·x (rank r) is saved",
    )
)
