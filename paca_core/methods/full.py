"""Full fine-tuning of some linears, usually beside another method (``paca+full+velora --full-modules down_proj``)."""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Sequence

from ..base_config import MethodConfig, parse_targets
from ..errors import PacaConfigError
from .registry import CommonOptions, Method, register_method

if TYPE_CHECKING:
    import torch.nn as nn


@dataclass
class FullConfig(MethodConfig):
    """Train the whole weight of the targeted linears (beside another method, e.g. with VeLoRA on them)."""

    method: ClassVar[str] = "full"

    def create_layer(self, linear: nn.Linear, module_name: str) -> nn.Module:
        from ..layers.lora import FullLinear

        return FullLinear(linear, module_name=module_name)

    def offloaded_weight_problem(self, module: nn.Module) -> str | None:
        return (
            "Full fine-tuning updates the weight itself, but accelerate reloads an offloaded weight from its offload "
            "copy for every forward, so the updates would be lost."
        )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--full-modules", default=None, help="with a '+full' method: modules trained in full (excluded from the other method)")


def _full_targets(args: argparse.Namespace) -> list[str] | str | None:
    text = args.full_modules
    return parse_targets(text) if text else None


def check_args(args: argparse.Namespace, names: Sequence[str]) -> None:
    if ("full" in names) != (_full_targets(args) is not None):
        raise PacaConfigError("--full-modules goes with a method that includes '+full' (e.g. paca+full+velora), and it needs it.")


def from_args(args: argparse.Namespace, common: CommonOptions) -> FullConfig:
    return FullConfig(target_modules=_full_targets(args), seed=common.seed)


METHOD = register_method(
    Method(
        name="full",
        config=FullConfig,
        from_args=from_args,
        add_arguments=add_arguments,
        options=("full_modules",),
        check_args=check_args,
        claims_modules=_full_targets,
        bench_options={"full_modules": "down_proj"},
        bench_flags=("full_modules",),
        default_lr=1e-4,
        default_rank=8,
        uses_rank=False,
        leads=False,
        bench_peers=("full",),
        summary="the whole weight of the modules named by --full-modules",
    )
)
