"""Method configurations: one dataclass per method, combinable in a list, serialised into checkpoints."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar

import torch.nn as nn

from .errors import PacaConfigError

LLAMA_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ALL_LINEAR = "all-linear"


def _check_targets(value: Any) -> list[str] | str:
    if isinstance(value, (list, tuple)):
        if not value or not all(isinstance(t, str) and t for t in value):
            raise PacaConfigError("target_modules must be a non-empty list of module names, a regex, or 'all-linear'.")
        return list(value)
    if not isinstance(value, str) or not value:
        raise PacaConfigError("target_modules must be a non-empty list of module names, a regex, or 'all-linear'.")
    return value


def _check_rank(config: Any) -> None:
    if not isinstance(config.r, int) or isinstance(config.r, bool) or config.r < 1:
        raise PacaConfigError(f"r must be a positive integer, got {config.r!r}.")
    if config.alpha is not None and not (isinstance(config.alpha, (int, float)) and config.alpha > 0):
        raise PacaConfigError(f"alpha must be a positive number or None (= r), got {config.alpha!r}.")


@dataclass
class MethodConfig:
    """Fields every method shares. ``target_modules``: module names (suffix match, e.g. ``"q_proj"``),
    a list of them, a regular expression matched against full names, or ``"all-linear"`` (every
    ``nn.Linear`` except the output head). ``exclude_modules``: names never adapted."""

    method: ClassVar[str] = ""
    #: True for methods that modify layers other methods create (VeLoRA) instead of creating their own.
    modifier: ClassVar[bool] = False
    #: Module types this method's ``target_modules`` may select.
    target_types: ClassVar[tuple[type, ...]] = (nn.Linear,)
    target_modules: list[str] | str = field(default_factory=lambda: list(LLAMA_PROJECTIONS))
    exclude_modules: list[str] = field(default_factory=list)
    seed: int = 0

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        self.target_modules = _check_targets(self.target_modules)
        if not isinstance(self.seed, int) or self.seed < 0:
            raise PacaConfigError(f"seed must be a non-negative integer, got {self.seed!r}.")

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, **asdict(self)}

    def create_layer(self, linear: nn.Linear, module_name: str) -> nn.Module:
        """The adapter layer that replaces ``linear``."""
        raise NotImplementedError

    def offloaded_weight_problem(self, module: nn.Module) -> str | None:
        """Why this method cannot adapt ``module`` while accelerate offloads its weights (meta, loaded for each
        forward), or None when it can. Refuses by default: a method opts in once it is tested that way."""
        return f"{self.method} has not been made to work with offloaded weights."


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
    """

    method: ClassVar[str] = "paca"
    r: int = 8
    alpha: float | None = None
    quantize: str | None = None

    def validate(self) -> None:
        super().validate()
        _check_rank(self)
        if self.quantize is not None:
            from .quantization import check_kind

            self.quantize = check_kind(self.quantize)

    @property
    def scaling(self) -> float:
        return float(self.alpha if self.alpha is not None else self.r) / self.r

    def create_layer(self, linear: nn.Linear, module_name: str) -> nn.Module:
        from .indices import select_columns
        from .layers import PaCALinear

        indices = select_columns(linear.in_features, self.r, self.seed, module_name)
        if self.quantize is not None or _is_quantized(linear):
            from .layers.quantized_partial_connection import QuantizedPaCALinear
            from .quantization import prepare_quantized_target

            linear = prepare_quantized_target(self, linear, module_name)
            return QuantizedPaCALinear(linear, self.r, self.alpha, indices, module_name=module_name)
        return PaCALinear(linear, self.r, self.alpha, indices, module_name=module_name)

    def offloaded_weight_problem(self, module: nn.Module) -> str | None:
        if self.quantize is not None or _is_quantized(module):
            return "QPaCA quantizes the weight once and runs its 4-bit GEMM on it directly, so it must stay resident."
        return (
            "PaCA writes its trained columns into the weight in place, but accelerate reloads an offloaded weight "
            "from its offload copy for every forward, so the training would be lost."
        )


def _is_quantized(linear: nn.Module) -> bool:
    from .quantization import is_quantized_linear

    return is_quantized_linear(linear)


@dataclass
class LoRAConfig(MethodConfig):
    """LoRA: ``y = W x + alpha/r · B A x`` with A (r × in) random, B (out × r) zero; both trained.

    ``alpha=None`` means ``alpha = r`` (scaling 1). ``dropout`` > 0 keeps a full-size mask per layer.
    """

    method: ClassVar[str] = "lora"
    r: int = 8
    alpha: float | None = None
    dropout: float = 0.0

    def validate(self) -> None:
        super().validate()
        _check_rank(self)
        if not 0.0 <= self.dropout < 1.0:
            raise PacaConfigError(f"dropout must be in [0, 1), got {self.dropout!r}.")

    def create_layer(self, linear: nn.Linear, module_name: str) -> nn.Module:
        from .layers.lora import LoRALinear

        return LoRALinear(linear, self.r, self.alpha, self.dropout, freeze_a=self.freeze_a, seed=self.seed, module_name=module_name)

    def offloaded_weight_problem(self, module: nn.Module) -> str | None:
        return None  # the base layer runs through accelerate's hook; A and B live on its execution device

    freeze_a: ClassVar[bool] = False


@dataclass
class LoRAFAConfig(LoRAConfig):
    """LoRA-FA: LoRA with A frozen at its random init; only B trains and only ``A x`` (rank r) is kept."""

    method: ClassVar[str] = "lorafa"
    freeze_a: ClassVar[bool] = True


@dataclass
class FullConfig(MethodConfig):
    """Train the whole weight of the targeted linears (beside another method, e.g. with VeLoRA on them)."""

    method: ClassVar[str] = "full"

    def create_layer(self, linear: nn.Linear, module_name: str) -> nn.Module:
        from .layers.lora import FullLinear

        return FullLinear(linear, module_name=module_name)

    def offloaded_weight_problem(self, module: nn.Module) -> str | None:
        return (
            "Full fine-tuning updates the weight itself, but accelerate reloads an offloaded weight from its offload "
            "copy for every forward, so the updates would be lost."
        )


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

    def validate(self) -> None:
        super().validate()
        from .layers.compression import INIT_TYPES

        if not isinstance(self.num_groups, int) or self.num_groups < 1:
            raise PacaConfigError(f"num_groups must be a positive integer, got {self.num_groups!r}.")
        if not self.scale > 0:
            raise PacaConfigError(f"scale must be positive, got {self.scale!r}.")
        if self.init_type not in INIT_TYPES:
            raise PacaConfigError(f"init_type must be one of {', '.join(INIT_TYPES)}, got {self.init_type!r}.")
        if not 0.0 <= self.ema_decay < 1.0:
            raise PacaConfigError(f"ema_decay must be in [0, 1), got {self.ema_decay!r}.")

    def create_compressor(self, layer: nn.Module) -> nn.Module:
        from .layers.compression import ActivationCompressor

        from .placement import adapter_device

        device = adapter_device(layer.base_layer, layer.module_name)  # offloaded base: where accelerate runs it
        return ActivationCompressor(layer.in_features, self.num_groups, self.scale, self.init_type, self.ema_decay, device=device)


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
    target_types: ClassVar[tuple[type, ...]] = (nn.Module,)
    target_modules: list[str] | str = field(default_factory=lambda: ["mlp"])
    num_rows: int = 4096
    top_k: int = 32
    num_experts: int | None = None
    num_probe: int = 2
    rows_per_step: int = 2048
    key_std: float | None = None

    def validate(self) -> None:
        super().validate()
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
        from .layers.host_rows import default_num_experts

        return self.num_experts if self.num_experts is not None else default_num_experts(self.num_rows)

    def create_layer(self, module: nn.Module, module_name: str) -> nn.Module:
        from .indices import layer_seed
        from .layers.sparse_adapter import ATTRIBUTE, SparseFFNAdapter
        from .surgery import feed_forward_width

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
            seed=layer_seed(self.seed, module_name),
            module_name=module_name,
        )
        setattr(module, ATTRIBUTE, adapter)
        return adapter

    def offloaded_weight_problem(self, module: nn.Module) -> str | None:
        return None  # attaches beside the block: its router lives where accelerate runs the block


#: method name → config class; the CLI's ``--method`` and checkpoints use these names.
METHOD_CONFIGS: dict[str, type[MethodConfig]] = {
    "paca": PaCAConfig,
    "lora": LoRAConfig,
    "lorafa": LoRAFAConfig,
    "full": FullConfig,
    "velora": VeLoRAConfig,
    "meft": MEFTConfig,
}


def config_from_dict(data: dict[str, Any]) -> MethodConfig:
    """Rebuild a config saved with :meth:`MethodConfig.to_dict` (unknown methods or fields are errors)."""
    data = dict(data)
    method = data.pop("method", None)
    if method not in METHOD_CONFIGS:
        raise PacaConfigError(f"Unknown method {method!r}; known methods: {', '.join(METHOD_CONFIGS)}.")
    cls = METHOD_CONFIGS[method]
    known = {f.name for f in fields(cls) if f.init}
    unknown = sorted(set(data) - known)
    if unknown:
        raise PacaConfigError(f"Unknown {method} config fields {unknown}; known fields: {sorted(known)}.")
    return cls(**data)


def method_name(configs: list[MethodConfig]) -> str:
    """``"lora+velora"``-style name of a combination."""
    return "+".join(c.method for c in configs)
