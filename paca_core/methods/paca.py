"""PaCA (and QPaCA on a 4-bit base): train ``r`` fixed, randomly chosen input columns of each target linear."""
from __future__ import annotations

import argparse
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar, Sequence

from ..base_config import MethodConfig, check_rank, field_default
from ..errors import PacaConfigError
from .registry import CommonOptions, Method, ScaledAboveDefaultRank, register_method

if TYPE_CHECKING:
    import torch
    import torch.nn as nn


@dataclass
class PaCAConfig(MethodConfig):
    r"""Partial connection adaptation: train ``r`` fixed, randomly chosen input columns of each target linear.

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
        columns: the input columns some layers train instead of ``r`` drawn ones, as PEFT's
            ``paca_indices_pattern``: ``{name or regex: [column, ...]}``, a key matching a module whose name ends
            with it (``"layers.0.self_attn.q_proj"``, or ``r"layers\.\d+\.mlp\.down_proj"``). Such a layer may
            train another number of columns; its scaling stays ``alpha / r`` with this config's ``r``, as in PEFT,
            so an adapter read from PEFT gives PEFT's outputs.
    """

    method: ClassVar[str] = "paca"
    r: int = 8
    alpha: float | None = None
    quantize: str | None = None
    quantize_scope: str = "base"
    columns: dict[str, list[int]] = field(default_factory=dict)

    def check(self) -> None:
        check_rank(self)
        self.columns = check_given_columns(self.columns)
        if self.quantize is not None:
            from ..memory.quantization import check_kind

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
        from ..memory.quantization import is_quantized_linear, observed_scope, quantize_frozen_base

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
        import torch

        from ..layers.indices import check_columns, select_columns
        from ..layers.partial_connection import PaCALinear
        from ..layers.quantized_partial_connection import QuantizedPaCALinear
        from ..memory.quantization import is_quantized_linear, prepare_quantized_target

        given = given_columns(self.columns, module_name)
        if given is None:
            indices = select_columns(linear.in_features, self.r, self.seed, module_name)
        else:
            indices = torch.tensor(sorted(given), dtype=torch.long)
            check_columns(indices, linear.in_features, module_name)
        r = int(indices.numel())
        if self.quantize is not None or is_quantized_linear(linear):
            linear = prepare_quantized_target(self, linear, module_name)
            return QuantizedPaCALinear(linear, r, self.alpha, indices, module_name=module_name, scaling=self.scaling)
        return PaCALinear(linear, r, self.alpha, indices, module_name=module_name, scaling=self.scaling)

    def offloaded_weight_problem(self, module: nn.Module) -> str | None:
        from ..memory.quantization import is_quantized_linear

        if self.quantize is not None or is_quantized_linear(module):
            return "QPaCA quantizes the weight once and runs its 4-bit GEMM on it directly, so it must stay resident."
        return (
            "PaCA writes its trained columns into the weight in place, but accelerate reloads an offloaded weight "
            "from its offload copy for every forward, so the training would be lost."
        )


def check_given_columns(columns: object) -> dict[str, list[int]]:
    """``PaCAConfig.columns`` checked as far as it can be without the model: names to unique non-negative ints
    (each key a valid regex); the upper bound (a layer's ``in_features``) is checked as the layer is made."""
    if columns is None:
        return {}
    if not isinstance(columns, dict):
        raise PacaConfigError(f"columns must map module names (or regexes) to lists of column indices, got {type(columns).__name__}.")
    checked = {}
    for key, given in columns.items():
        if not isinstance(key, str) or not key:
            raise PacaConfigError(f"columns: every key must be a module name or a regex, got {key!r}.")
        try:
            re.compile(key)
        except re.error as error:
            raise PacaConfigError(f"columns: {key!r} is not a valid regex ({error}).") from None
        if not isinstance(given, (list, tuple)) or not given or not all(isinstance(i, int) and not isinstance(i, bool) for i in given):
            raise PacaConfigError(f"columns[{key!r}] must be a non-empty list of column indices (ints), got {given!r}.")
        if min(given) < 0 or len(set(given)) != len(given):
            raise PacaConfigError(f"columns[{key!r}] must hold distinct non-negative column indices, got {list(given)[:8]}.")
        checked[key] = [int(i) for i in given]
    return checked


def given_columns(columns: dict[str, list[int]], module_name: str) -> list[int] | None:
    """The columns ``columns`` gives ``module_name`` (the first key matching the end of its name, as PEFT's
    ``paca_indices_pattern`` matches), or None: the layer draws ``r`` from the seed."""
    for key, given in columns.items():
        if re.match(rf"(.*\.)?({key})$", module_name):
            return given
    return None


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
            "paca_core.memory.quantization.quantize_base(model, 'nf4')."
        )
    from ..memory.quantization import import_bitsandbytes

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
        #: PEFT's own PaCA (peft >= 0.22), on the model dtype and on the same 4-bit base as qpaca.
        bench_peers=("peft-paca", "peft-qpaca"),
        four_bit_form="qpaca",
        summary="r fixed random input columns of each frozen linear",
    )
)
