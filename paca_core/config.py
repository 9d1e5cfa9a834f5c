"""Method configurations. One dataclass per method; all serialise to the checkpoint's JSON."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from .errors import PacaConfigError

LLAMA_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ALL_LINEAR = "all-linear"


@dataclass
class PaCAConfig:
    """Partial connection adaptation: train ``r`` fixed, randomly chosen input columns of each target linear.

    Args:
        r: columns trained per layer (the delta is ``(out_features, r)``).
        alpha: the update is ``alpha / r · delta``; ``None`` means ``alpha = r`` (scaling 1), so the
            learning rate is the per-weight step size.
        target_modules: module names (suffix match, e.g. ``"q_proj"``), a list of them, a regular
            expression string matched against full names, or ``"all-linear"`` (every ``nn.Linear``
            except the output head). Default: the seven LLaMA projections.
        exclude_modules: names (suffix match) never adapted.
        seed: per-layer column choices derive from this seed and the module name, so they are
            reproducible and different across layers.
    """

    r: int = 8
    alpha: float | None = None
    target_modules: list[str] | str = field(default_factory=lambda: list(LLAMA_PROJECTIONS))
    exclude_modules: list[str] = field(default_factory=list)
    seed: int = 0
    method: str = field(default="paca", init=False)

    def __post_init__(self) -> None:
        self.validate()

    @property
    def scaling(self) -> float:
        return float(self.alpha if self.alpha is not None else self.r) / self.r

    def validate(self) -> None:
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r < 1:
            raise PacaConfigError(f"r must be a positive integer (columns per layer), got {self.r!r}.")
        if self.alpha is not None and not (isinstance(self.alpha, (int, float)) and self.alpha > 0):
            raise PacaConfigError(f"alpha must be a positive number or None (= r), got {self.alpha!r}.")
        if isinstance(self.target_modules, (list, tuple)):
            if not self.target_modules or not all(isinstance(t, str) and t for t in self.target_modules):
                raise PacaConfigError("target_modules must be a non-empty list of module names, a regex, or 'all-linear'.")
            self.target_modules = list(self.target_modules)
        elif not isinstance(self.target_modules, str) or not self.target_modules:
            raise PacaConfigError("target_modules must be a non-empty list of module names, a regex, or 'all-linear'.")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise PacaConfigError(f"seed must be a non-negative integer, got {self.seed!r}.")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PaCAConfig":
        method = data.get("method", "paca")
        if method != "paca":
            raise PacaConfigError(f"This checkpoint was trained with method {method!r}, not 'paca'.")
        known = {f.name for f in fields(cls) if f.init}
        unknown = sorted(set(data) - known - {"method"})
        if unknown:
            raise PacaConfigError(f"Unknown PaCA config fields {unknown}; known fields: {sorted(known)}.")
        return cls(**{k: v for k, v in data.items() if k in known})
