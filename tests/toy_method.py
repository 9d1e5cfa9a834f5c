"""A method defined outside paca_core, written by following docs/ARCHITECTURE.md, "Adding a method".

"toy" scales each output row of a frozen linear: ``y = (1 + s) ⊙ (W x) + b`` with ``s`` (out,)
trained, so ``ΔW = s[:, None] · W``. It registers itself with the public call on import.
"toyep" is the same method under another name, left unregistered here: tests/test_add_a_method.py
registers it through a (fake) ``paca_hal.methods`` entry point naming ``tests.toy_method:ENTRY_POINT_METHOD``.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn

import paca_core
from paca_core import LinearAdapterLayer, MethodConfig


# 1. The config: a dataclass with ``method`` and the method's fields.
@dataclass
class ToyConfig(MethodConfig):
    method: ClassVar[str] = "toy"
    init: float = 0.0

    def create_layer(self, linear: nn.Linear, module_name: str) -> nn.Module:
        return ToyLinear(linear, self.init, module_name=module_name)

    def offloaded_weight_problem(self, module: nn.Module) -> str | None:
        return None


# 2. The layer: a LinearAdapterLayer (AdapterLayer, its base, declares every member callers use).
class ToyLinear(LinearAdapterLayer):
    method = "toy"

    def __init__(self, base_layer: nn.Linear, init: float, module_name: str = ""):
        super().__init__(base_layer, module_name)
        base_layer.weight.requires_grad_(False)
        self.toy_scale = nn.Parameter(torch.full((self.out_features,), float(init), device=base_layer.weight.device))

    def adapter_state(self) -> dict[str, torch.Tensor]:
        return {"toy_scale": self.toy_scale}

    @torch.no_grad()
    def load_adapter_state(self, tensors: dict[str, torch.Tensor]) -> None:
        self.toy_scale.copy_(tensors["toy_scale"])

    def delta_weight(self) -> torch.Tensor:
        return self.toy_scale.detach().float()[:, None] * self.base_layer.weight.detach().float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.adapter_enabled:
            return self.base_layer(x)
        out = nn.functional.linear(x, self.base_layer.weight) * (1 + self.toy_scale.to(x.dtype))
        return out if self.base_layer.bias is None else out + self.base_layer.bias


# 3. Its flags and how they make a config.
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--toy-init", type=float, default=0.0, help="toy: initial output scale")


def from_args(args: argparse.Namespace, common: paca_core.CommonOptions) -> ToyConfig:
    return ToyConfig(init=args.toy_init, target_modules=common.target_modules, exclude_modules=common.exclude_modules, seed=common.seed)


# 4. Register it.
METHOD = paca_core.register_method(
    paca_core.Method(
        name="toy",
        config=ToyConfig,
        from_args=from_args,
        add_arguments=add_arguments,
        options=("toy_init",),
        default_rank=None,
        uses_rank=False,
        default_lr=1e-2,
        summary="scales each output row",
    )
)


@dataclass
class ToyEntryPointConfig(ToyConfig):
    method: ClassVar[str] = "toyep"


ENTRY_POINT_METHOD = paca_core.Method(
    name="toyep",
    config=ToyEntryPointConfig,
    from_args=lambda args, common: ToyEntryPointConfig(target_modules=common.target_modules, seed=common.seed),
    default_rank=None,
    uses_rank=False,
    default_lr=3e-3,
)
