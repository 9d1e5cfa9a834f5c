"""A method defined outside paca_core, written by following docs/ARCHITECTURE.md, "How to add a method".

"toy" adds a scaled random projection to a frozen linear: ``y = W x + b + s ⊙ (P x)``, with ``P`` (out × in)
a frozen random matrix and ``s`` (out,) trained from ``init``, so ``ΔW = s[:, None] · P``. Like VeRA, ``P`` is
not saved: loading draws it again from the layer's generator (the config's seed and the module name), so a
fresh process rebuilds exactly the same ``P`` (tests/test_add_a_method.py checks it in a new interpreter).
It registers itself with the public call on import.
"toyep" is the same method under another name, left unregistered here: tests/test_add_a_method.py
registers it through a (fake) ``paca_hal.methods`` entry point naming ``tests.toy_method:ENTRY_POINT_METHOD``.
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn

import paca_core
from paca_core import LinearAdapterLayer, MethodConfig, PacaConfigError, field_default


# 1. The config: a dataclass with ``method``, the method's fields and their own checks (``check``, no super()).
@dataclass
class ToyConfig(MethodConfig):
    method: ClassVar[str] = "toy"
    init: float = 0.0

    def check(self) -> None:
        if not math.isfinite(self.init):
            raise PacaConfigError(f"init must be a finite number, got {self.init!r}.")

    def create_layer(self, linear: nn.Linear, module_name: str) -> LinearAdapterLayer:
        return ToyLinear(linear, self.init, self.seed, module_name=module_name)

    def offloaded_weight_problem(self, module: nn.Module) -> str | None:
        return None


# 2. The layer: declares its tensors (placed beside the weight by the base class) and draws its random
#    one from its own generator; ``method`` and the checkpoint state come from the base class.
class ToyLinear(LinearAdapterLayer):
    def __init__(self, base_layer: nn.Linear, init: float, seed: int, module_name: str = ""):
        super().__init__(base_layer, module_name)
        base_layer.weight.requires_grad_(False)
        projection = torch.randn(self.out_features, self.in_features, generator=self.generator(seed)) / math.sqrt(self.in_features)
        self.add_adapter_buffer("toy_projection", projection, saved=False)  # frozen, rebuilt from the seed on load
        self.add_adapter_parameter("toy_scale", torch.full((self.out_features,), float(init)))  # trained, saved

    def delta_weight(self) -> torch.Tensor:
        return self.toy_scale.detach().float()[:, None] * self.toy_projection.float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        if not self.adapter_enabled:
            return out
        return out + nn.functional.linear(x, self.toy_projection.to(x.dtype)) * self.toy_scale.to(x.dtype)


# 3. Its flags (defaults read from the config) and how they make a config.
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--toy-init", type=float, default=field_default(ToyConfig, "init"), help="toy: initial output scale")


def from_args(args: argparse.Namespace, common: paca_core.CommonOptions) -> ToyConfig:
    return ToyConfig(init=args.toy_init, **common.config_fields())


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
        summary="a trained scale on a frozen random projection",
    )
)


@dataclass
class ToyEntryPointConfig(ToyConfig):
    method: ClassVar[str] = "toyep"


ENTRY_POINT_METHOD = paca_core.Method(
    name="toyep",
    config=ToyEntryPointConfig,
    from_args=lambda args, common: ToyEntryPointConfig(**common.config_fields()),
    default_rank=None,
    uses_rank=False,
    default_lr=3e-3,
)
