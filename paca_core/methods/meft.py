"""MEFT: a large sparse adapter beside each feed-forward block, held with its Adam state in host memory."""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

from ..base_config import ALL_LINEAR, LazyClasses, MethodConfig, field_default, parse_targets
from ..errors import PacaConfigError
from .registry import CommonOptions, Method, register_method

if TYPE_CHECKING:
    import torch.nn as nn


@dataclass
class MEFTConfig(MethodConfig):
    """MEFT: a large sparse adapter beside each targeted feed-forward block, held in host memory.

    ``FFN(x) + Σ_j g_j · relu(x·K_j) · V_j`` over each token's ``top_k`` rows. K and V have
    ``num_rows`` rows (M) per block and stay in host memory with their Adam state; a router on the
    device sends each token to ``num_probe`` of ``num_experts`` groups of rows (default ≈ √M/2), the
    host scores only those rows, and at most ``rows_per_step`` distinct rows per forward (a fixed,
    padded buffer) cross to the device. The host applies Adam(W) to the rows used, with the learning
    rate, betas, eps and weight decay of the optimizer that owns the routers, when it steps.

    Args:
        target_modules: feed-forward modules (input and output of width d), e.g. ``"mlp"``.
        key_std: standard deviation of the random keys; ``None`` = 1/√d (scores of order 1 for
            normalised inputs). Values start at zero, so training starts from the base model.
    """

    method: ClassVar[str] = "meft"
    target_modules: list[str] | str = field(default_factory=lambda: ["mlp"])
    num_rows: int = 4096
    top_k: int = 32
    num_experts: int | None = None
    num_probe: int = 2
    rows_per_step: int = 2048
    key_std: float | None = None

    def check(self) -> None:
        if self.target_modules == ALL_LINEAR:
            raise PacaConfigError("MEFT targets feed-forward blocks, not linear layers: use target_modules=['mlp'].")
        for name in ("num_rows", "top_k", "num_probe", "rows_per_step"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise PacaConfigError(f"MEFT {name} must be a positive integer, got {value!r}.")
        experts = self.experts
        if not isinstance(experts, int) or experts < 1 or self.num_rows % experts:
            raise PacaConfigError(
                f"MEFT num_experts must be a positive divisor of num_rows={self.num_rows}, got {self.num_experts!r}."
            )
        if self.num_probe > experts:
            raise PacaConfigError(f"MEFT num_probe={self.num_probe} exceeds num_experts={experts}.")
        candidates = self.num_probe * (self.num_rows // experts)
        if self.top_k > candidates:
            raise PacaConfigError(
                f"MEFT top_k={self.top_k} exceeds the {candidates} rows a token can reach (num_probe × rows per expert); "
                "raise num_probe or num_rows, or lower top_k."
            )
        if self.key_std is not None and not self.key_std > 0:
            raise PacaConfigError(f"MEFT key_std must be positive or None, got {self.key_std!r}.")

    @property
    def experts(self) -> int:
        from ..layers.host_rows import default_num_experts

        return self.num_experts if self.num_experts is not None else default_num_experts(self.num_rows)

    def create_layer(self, module: nn.Module, module_name: str) -> nn.Module:
        from ..layers.sparse_adapter import ATTRIBUTE, SparseFFNAdapter
        from ..surgery.targets import feed_forward_width

        width = feed_forward_width(module, module_name)
        adapter = SparseFFNAdapter(
            module,
            width,
            num_rows=self.num_rows,
            top_k=self.top_k,
            num_experts=self.experts,
            num_probe=self.num_probe,
            capacity=min(self.rows_per_step, self.num_rows),
            key_std=self.key_std if self.key_std is not None else width**-0.5,
            seed=self.seed,
            module_name=module_name,
        )
        setattr(module, ATTRIBUTE, adapter)
        return adapter

    def offloaded_weight_problem(self, module: nn.Module) -> str | None:
        return None  # attaches beside the block: its router lives where accelerate runs the block



MEFTConfig.target_types = LazyClasses("torch.nn:Module")  # whole feed-forward blocks, not linears

def add_arguments(parser: argparse.ArgumentParser) -> None:
    def default(name: str):
        return field_default(MEFTConfig, name)

    parser.add_argument("--meft-modules", default=",".join(default("target_modules")), help="MEFT: feed-forward blocks that get a host-memory sparse adapter")
    parser.add_argument("--meft-rows", type=int, default=default("num_rows"), help="MEFT: key/value rows per block, held in host memory")
    parser.add_argument("--meft-topk", type=int, default=default("top_k"), help="MEFT: rows each token uses")
    parser.add_argument("--meft-experts", type=int, default=default("num_experts"), help="MEFT: router groups of rows (default about sqrt(rows)/2)")
    parser.add_argument("--meft-probe", type=int, default=default("num_probe"), help="MEFT: groups each token is routed to (only their rows are scored)")
    parser.add_argument("--meft-rows-per-step", type=int, default=default("rows_per_step"),
                        help="MEFT: distinct rows sent to the device per forward (fixed buffer)")


def from_args(args: argparse.Namespace, common: CommonOptions) -> MEFTConfig:
    return MEFTConfig(
        target_modules=parse_targets(args.meft_modules),
        num_rows=args.meft_rows,
        top_k=args.meft_topk,
        num_experts=args.meft_experts,
        num_probe=args.meft_probe,
        rows_per_step=args.meft_rows_per_step,
        seed=common.seed,
    )


METHOD = register_method(
    Method(
        name="meft",
        config=MEFTConfig,
        from_args=from_args,
        add_arguments=add_arguments,
        options=("meft_modules", "meft_rows", "meft_topk", "meft_experts", "meft_probe", "meft_rows_per_step"),
        field_flags={"target_modules": "--meft-modules", "num_rows": "--meft-rows", "top_k": "--meft-topk",
                     "num_experts": "--meft-experts", "num_probe": "--meft-probe", "rows_per_step": "--meft-rows-per-step"},
        default_lr=1e-3,
        default_rank=8,
        uses_rank=False,
        summary="a large sparse adapter beside each MLP, held with its Adam state in host memory",
    )
)
