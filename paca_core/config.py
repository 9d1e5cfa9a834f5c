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


@dataclass
class PaCAConfig(MethodConfig):
    """Partial connection adaptation: train ``r`` fixed, randomly chosen input columns of each target linear.

    Args:
        r: columns trained per layer (the delta is ``(out_features, r)``).
        alpha: the update is ``alpha / r · delta``; ``None`` means ``alpha = r`` (scaling 1), so the
            learning rate is the per-weight step size.
        seed: per-layer column choices derive from this seed and the module name, so they are
            reproducible and different across layers.
    """

    method: ClassVar[str] = "paca"
    r: int = 8
    alpha: float | None = None

    def validate(self) -> None:
        super().validate()
        _check_rank(self)

    @property
    def scaling(self) -> float:
        return float(self.alpha if self.alpha is not None else self.r) / self.r

    def create_layer(self, linear: nn.Linear, module_name: str) -> nn.Module:
        from .indices import select_columns
        from .layers import PaCALinear

        indices = select_columns(linear.in_features, self.r, self.seed, module_name)
        return PaCALinear(linear, self.r, self.alpha, indices, module_name=module_name)


#: method name → config class; the CLI's ``--method`` and checkpoints use these names.
METHOD_CONFIGS: dict[str, type[MethodConfig]] = {"paca": PaCAConfig}


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
