"""What every method config shares: the :class:`MethodConfig` base, target-module names and checks.

Low in the package: layers, surgery and placement may import it; it imports nothing of ours but
``errors``. Each method's own config class lives in its method module (``paca_core/methods/``).
"""
from __future__ import annotations

from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import TYPE_CHECKING, Any, ClassVar

from .errors import PacaConfigError

if TYPE_CHECKING:
    import torch.nn as nn


class LazyClasses:
    """A ``ClassVar`` tuple of classes named ``"module:Class"``, imported on first read: a config class (and the
    ``paca`` argument parser that lists the methods) must not import torch just to say it adapts ``nn.Linear``.
    A subclass may assign a plain tuple of classes instead."""

    def __init__(self, *paths: str):
        self.paths = paths
        self._classes: tuple[type, ...] | None = None

    def __get__(self, instance: object, owner: type) -> tuple[type, ...]:
        if self._classes is None:
            import importlib

            self._classes = tuple(getattr(importlib.import_module(module), name) for module, name in (p.split(":") for p in self.paths))
        return self._classes

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


def check_rank(config: Any) -> None:
    """``config.r`` a positive int, ``config.alpha`` None or a positive number."""
    if not isinstance(config.r, int) or isinstance(config.r, bool) or config.r < 1:
        raise PacaConfigError(f"r must be a positive integer, got {config.r!r}.")
    if config.alpha is not None and not (isinstance(config.alpha, (int, float)) and config.alpha > 0):
        raise PacaConfigError(f"alpha must be a positive number or None (= r), got {config.alpha!r}.")


_check_rank = check_rank  # the old private name


def parse_targets(text: str) -> list[str] | str:
    """A ``--target-modules``-style flag: comma-separated names, or a regex / ``all-linear`` as it is."""
    if text == ALL_LINEAR or any(ch in text for ch in "*()[]|\\^$"):
        return text
    return [t.strip() for t in text.split(",") if t.strip()]


@dataclass
class MethodConfig:
    """Fields every method shares. ``target_modules``: module names (suffix match, e.g. ``"q_proj"``),
    a list of them, a regular expression matched against full names, or ``"all-linear"`` (every
    ``nn.Linear`` except the output head). ``exclude_modules``: names never adapted."""

    method: ClassVar[str] = ""
    #: True for methods that modify layers other methods create (VeLoRA) instead of creating their own.
    modifier: ClassVar[bool] = False
    #: Module types this method's ``target_modules`` may select (set below the class: a dataclass reads its
    #: annotated class attributes while it is made, which would import them).
    target_types: ClassVar[tuple[type, ...]]
    target_modules: list[str] | str = field(default_factory=lambda: list(LLAMA_PROJECTIONS))
    exclude_modules: list[str] = field(default_factory=list)
    seed: int = 0

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check every field: the shared ones here, then each class's own :meth:`check`, base class first.

        Runs when a config is made (saved ones too) and again in ``prepare_model`` (fields may have changed).
        Method configs implement :meth:`check`, not this, so no subclass can skip a parent's checks by
        forgetting ``super()``. (A subclass that overrides ``validate`` and calls ``super().validate()``, the
        earlier recipe, still works.)"""
        self.target_modules = _check_targets(self.target_modules)
        if not isinstance(self.seed, int) or self.seed < 0:
            raise PacaConfigError(f"seed must be a non-negative integer, got {self.seed!r}.")
        for cls in reversed(type(self).__mro__):
            check = cls.__dict__.get("check")
            if callable(check):
                check(self)

    def check(self) -> None:
        """This class's own field checks (raise :class:`PacaConfigError`). :meth:`validate` calls the ``check`` of
        every class in the hierarchy, base first, after the shared fields: do not call ``super().check()``."""

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, **asdict(self)}

    @classmethod
    def upgrade_saved(cls, fields: dict[str, Any]) -> dict[str, Any]:
        """``fields`` as saved by an earlier release, with what that release meant filled in explicitly.

        Called by :func:`paca_core.config.config_from_dict` before the config is made. A field added later
        whose default changes behaviour (QPaCA's ``quantize_scope``) records here what an old checkpoint did, so
        it loads as it trained. Default: unchanged."""
        return fields

    def prepare_base(self, model: nn.Module, adapted: set[str]) -> None:
        """Change the frozen base before any layer is adapted (QPaCA: quantize every linear but the head).

        ``adapted``: names of the modules some method of this ``prepare_model`` call will adapt; leave those to
        :meth:`create_layer`. Runs after the model is frozen and placed. Default: nothing."""

    def create_layer(self, linear: nn.Linear, module_name: str) -> nn.Module:
        """The adapter layer that replaces ``linear`` (or attaches to it): an ``AdapterLayer`` (``prepare_model`` checks),
        which draws its random tensors from the config's ``seed`` through ``layer.generator(self.seed)``."""
        raise NotImplementedError

    def create_compressor(self, layer: nn.Module) -> nn.Module:
        """Modifiers (``modifier = True``): what they attach to each adapted layer they apply to."""
        raise NotImplementedError

    def offloaded_weight_problem(self, module: nn.Module) -> str | None:
        """Why this method cannot adapt ``module`` while accelerate offloads its weights (meta, loaded for each
        forward), or None when it can. Refuses by default: a method opts in once it is tested that way."""
        return f"{self.method} has not been made to work with offloaded weights."


MethodConfig.target_types = LazyClasses("torch.nn:Linear")


def field_default(cls: type, name: str) -> Any:
    """The default of dataclass field ``name`` of ``cls``: a method's ``paca train`` flag takes its default from
    here, so each default is written once, in the config class, and the flag, the CLI and the Python API agree."""
    for item in fields(cls):
        if item.name == name:
            if item.default is not MISSING:
                return item.default
            if item.default_factory is not MISSING:
                return item.default_factory()
            raise TypeError(f"{cls.__name__}.{name} has no default.")
    raise AttributeError(f"{cls.__name__} has no field {name!r}.")


def method_name(configs: list[MethodConfig]) -> str:
    """``"lora+velora"``-style name of a combination."""
    return "+".join(c.method for c in configs)
