"""PaCA (and QPaCA on a 4-bit base): train ``r`` fixed, randomly chosen input columns of each target linear."""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Sequence

from ..base_config import MethodConfig, check_rank, field_default
from ..errors import PacaConfigError
from .registry import CommonOptions, Method, ScaledAboveDefaultRank, register_method

if TYPE_CHECKING:
    import torch
    import torch.nn as nn


@dataclass
class PaCAConfig(MethodConfig):
    """Partial connection adaptation: train ``r`` fixed, randomly chosen input columns of each target linear.

    Args:
        r: columns trained per layer (the delta is ``(out_features, r)``).
        alpha: the update is ``alpha / r · delta``; ``None`` means ``alpha = r`` (scaling 1), so the
            learning rate is the per-weight step size.
        seed: per-layer column choices derive from this seed and the module name, so they are
            reproducible and different across layers.
        quantize: ``"nf4"`` or ``"fp4"`` for QPaCA: each target becomes a frozen bitsandbytes 4-bit
            layer and the delta is added beside it (needs ``paca-hal[quant]``). Targets that already
            are 4-bit layers (``quantization.quantize_base``) are used as they are and set this field,
            so checkpoints record the quantization and loading re-quantizes the base the same way.
        quantize_scope: with ``quantize``, which frozen linears are 4-bit: ``"base"`` (default) every linear but
            the output head, the targets included — QLoRA's convention (bitsandbytes' ``load_in_4bit``), so a 7B
            base is about 4 GB whatever the targets; ``"targets"`` only the PaCA targets, the rest stays in the
            model dtype. Modules other methods adapt (``paca+full``) are never quantized. Checkpoints saved before
            this field existed read as ``"targets"``, which is what they trained on. Unlike PEFT's
            ``prepare_model_for_kbit_training``, the layers left in 16 bits (norms, embeddings, head) are not
            upcast to fp32: they are frozen, and the trained columns and optimizer state are fp32 already.
    """

    method: ClassVar[str] = "paca"
    r: int = 8
    alpha: float | None = None
    quantize: str | None = None
    quantize_scope: str = "base"

    def check(self) -> None:
        check_rank(self)
        if self.quantize is not None:
            from ..quantization import check_kind

            self.quantize = check_kind(self.quantize)
        if self.quantize_scope not in ("base", "targets"):
            raise PacaConfigError(f"quantize_scope must be 'base' or 'targets', got {self.quantize_scope!r}.")

    @classmethod
    def upgrade_saved(cls, fields: dict) -> dict:
        """A QPaCA checkpoint from before ``quantize_scope`` quantized only its targets."""
        if fields.get("quantize") is not None and "quantize_scope" not in fields:
            return {**fields, "quantize_scope": "targets"}
        return fields

    def prepare_base(self, model: nn.Module, adapted: set[str]) -> None:
        """QPaCA on the whole base: every frozen linear but the head in 4 bits before the targets are wrapped. A base
        quantized by the caller (``quantization.quantize_base``) and no ``quantize`` asked: record what it is."""
        from ..quantization import is_quantized_linear, observed_scope, quantize_frozen_base

        if self.quantize is None:
            quantized = [m for m in model.modules() if is_quantized_linear(m)]
            if quantized:  # the targets' own kind is checked (and recorded) as each is wrapped
                self.quantize_scope = observed_scope(model, adapted)
            return
        if self.quantize_scope == "base":
            quantize_frozen_base(model, self.quantize, adapted)

    @property
    def scaling(self) -> float:
        return float(self.alpha if self.alpha is not None else self.r) / self.r

    def create_layer(self, linear: nn.Linear, module_name: str) -> nn.Module:
        from ..indices import select_columns
        from ..layers.partial_connection import PaCALinear
        from ..layers.quantized_partial_connection import QuantizedPaCALinear
        from ..quantization import is_quantized_linear, prepare_quantized_target

        indices = select_columns(linear.in_features, self.r, self.seed, module_name)
        if self.quantize is not None or is_quantized_linear(linear):
            linear = prepare_quantized_target(self, linear, module_name)
            return QuantizedPaCALinear(linear, self.r, self.alpha, indices, module_name=module_name)
        return PaCALinear(linear, self.r, self.alpha, indices, module_name=module_name)

    def offloaded_weight_problem(self, module: nn.Module) -> str | None:
        from ..quantization import is_quantized_linear

        if self.quantize is not None or is_quantized_linear(module):
            return "QPaCA quantizes the weight once and runs its 4-bit GEMM on it directly, so it must stay resident."
        return (
            "PaCA writes its trained columns into the weight in place, but accelerate reloads an offloaded weight "
            "from its offload copy for every forward, so the training would be lost."
        )


def export_lora(layer) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact LoRA factors: ``A`` one-hot rows selecting ``paca_indices``, ``B = scaling · delta``."""
    import torch

    indices = layer.paca_indices.detach().to("cpu", torch.long)
    lora_a = torch.zeros(layer.r, layer.in_features, dtype=torch.float32)
    lora_a[torch.arange(layer.r), indices] = 1.0
    lora_b = (layer.paca_delta.detach().to("cpu", torch.float32) * layer.scaling).contiguous()
    return lora_a, lora_b


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--quantize", default=field_default(PaCAConfig, "quantize"), choices=["nf4", "fp4"],
        help="QPaCA: hold the frozen base as bitsandbytes 4-bit weights (needs paca-hal[quant]; --method paca)",
    )
    parser.add_argument(
        "--quantize-scope", default=None, choices=["base", "targets"],
        help="with --quantize: 'base' = every linear but the output head in 4 bits, as QLoRA loads it (default); "
        "'targets' = only the PaCA targets (what checkpoints without a quantize_scope field did)",
    )


def check_args(args: argparse.Namespace, names: Sequence[str]) -> None:
    """--quantize is QPaCA: it needs a PaCA method and bitsandbytes (clear errors before anything loads)."""
    if args.quantize is None:
        if getattr(args, "quantize_scope", None) is not None:
            raise PacaConfigError("--quantize-scope says which layers --quantize puts in 4 bits; add --quantize nf4 (or fp4), or drop it.")
        return
    if "paca" not in names:
        raise PacaConfigError(
            "--quantize builds a 4-bit base for PaCA (QPaCA); use it with --method paca. For QLoRA use PEFT on "
            "paca_core.quantization.quantize_base(model, 'nf4')."
        )
    from ..quantization import import_bitsandbytes

    try:
        import_bitsandbytes()
    except ImportError as error:
        raise PacaConfigError(str(error)) from None


def from_args(args: argparse.Namespace, common: CommonOptions) -> PaCAConfig:
    scope = getattr(args, "quantize_scope", None) or field_default(PaCAConfig, "quantize_scope")
    return PaCAConfig(r=common.rank, alpha=common.alpha, quantize=args.quantize, quantize_scope=scope, **common.config_fields())


DEFAULT_RANK = 16
#: The lr at DEFAULT_RANK (scaling 1), chosen by the worst-share rule over three data sets
#: (paca_core.bench.lr_rule, scripts/lr_sweep.py; the table is in docs/methods.md); lower above it.
DEFAULT_LR = ScaledAboveDefaultRank(5e-3, DEFAULT_RANK)


METHOD = register_method(
    Method(
        name="paca",
        config=PaCAConfig,
        from_args=from_args,
        add_arguments=add_arguments,
        options=("quantize", "quantize_scope"),
        check_args=check_args,
        default_lr=DEFAULT_LR,
        #: r·out trainable per layer (LoRA: r·(in + out)): 16 matches LoRA at 8.
        default_rank=DEFAULT_RANK,
        exclusive=True,
        match_factor=2,
        export_lora=export_lora,
        four_bit_form="qpaca",
        summary="r fixed random input columns of each frozen linear",
    )
)
