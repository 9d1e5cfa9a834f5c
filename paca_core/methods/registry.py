"""The method registry: one :class:`Method` per method, declared once, in the method's own module.

A method module (``paca_core/methods/paca.py``, or a user's own module) defines its config class and
layer, then calls :func:`register_method`. Everything that names methods reads this registry: the
``paca train`` flags and ``--method`` parsing (:mod:`paca_core.flags.train_options`), ``paca bench`` and
``paca plan`` entries (:mod:`paca_core.workloads.specs`) and the ``paca bench`` flags, checkpoints
(:func:`paca_core.config.config_from_dict`) and the PEFT export. Methods outside the package register
with :func:`register_method`, or through the ``paca_hal.methods`` entry-point group (loaded once, the
first time the registry is read).
"""
from __future__ import annotations

import argparse
import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from ..base_config import MethodConfig
from ..errors import PacaConfigError

logger = logging.getLogger(__name__)

#: importlib.metadata entry-point group that names methods defined in other distributions. Each entry
#: point names a :class:`Method` (registered when loaded) or a module that registers its methods.
ENTRY_POINT_GROUP = "paca_hal.methods"


@dataclass(frozen=True)
class CommonOptions:
    """The ``paca train`` flags every method may use, already parsed (what ``from_args`` gets beside ``args``)."""

    #: ``--rank`` (the method's ``default_rank`` without the flag; 8 for methods without a rank, which ignore it).
    rank: int
    #: ``--alpha`` (None: alpha = r).
    alpha: float | None
    #: ``--target-modules``, parsed (a list of names, a regex or ``"all-linear"``).
    target_modules: list[str] | str
    #: Modules other methods of the combination claim (``+full --full-modules``): leave them out.
    exclude_modules: list[str]
    #: ``--seed``: what the config's ``seed`` (and so every layer's random tensors) derives from.
    seed: int

    def config_fields(self) -> dict[str, Any]:
        """The :class:`~paca_core.base_config.MethodConfig` fields every config shares, from these flags:
        ``Config(my_field=args.my_flag, **common.config_fields())``."""
        return {"target_modules": self.target_modules, "exclude_modules": list(self.exclude_modules), "seed": self.seed}


@dataclass(frozen=True)
class Method:
    """Everything the package needs to know about one method.

    Args:
        name: the ``--method`` name, and ``config.method`` (what checkpoints record).
        config: its :class:`~paca_core.base_config.MethodConfig` subclass; ``config.create_layer``
            is the layer factory (``create_compressor`` for modifiers).
        from_args: ``(args, common) -> config`` from the parsed ``paca train`` flags. ``args`` always holds every
            registered method's flags (read them as ``args.<dest>``, no ``getattr`` default): a default is written
            once, on the config field, and the flag takes it from there (:func:`paca_core.base_config.field_default`).
        aliases: other ``--method`` names for it.
        alone: what ``--method NAME`` means when NAME is used alone (VeLoRA: ``("lora", "velora")``).
        add_arguments: adds the method's own ``paca train`` flags to a parser.
        options: the ``paca train`` options (argparse dests) those flags set; ``paca bench`` drops
            them for entries without this method.
        check_args: ``(args, names)`` validates the method's flags for the method combination
            ``names`` (called for every registered method, in it or not).
        claims_modules: ``args -> modules`` this method takes, which the other methods exclude.
        field_flags: the ``paca train`` flag that sets each config field (``{"num_groups": "--velora-groups"}``), so an
            error the config raises names the flag a user typed, not the field.
        bench_options: defaults ``paca bench`` gives the method's options when it is in an entry.
        bench_flags: which of ``options`` ``paca bench`` takes as flags too (the flags ``add_arguments``
            defines, with the same help), applied to every entry with this method and to its peers.
        default_rank: ``--rank`` without the flag; ``default_lr``: ``--lr`` without the flag (a number, or
            ``rank -> lr``).
        uses_rank: whether ``--rank`` means anything for it.
        leads: whether it can set the combination's rank and learning rate (False for methods that
            only ride along: VeLoRA, full fine-tuning of some modules).
        exclusive: it adapts the same linear layers as every other exclusive method, so two of
            them cannot be combined.
        match_factor: r multiplier that gives it about LoRA's trainable parameters at r (bench
            ``--match-params``).
        export_lora: ``layer -> (A, B)`` float32 CPU factors with ``B @ A == layer.delta_weight()``,
            where the method has an exact PEFT LoRA form; None where it has none.
        bench_peers: ``paca bench`` peers that stand for this method (``peft-lora`` for lora).
        four_bit_form: the ``paca bench`` / ``paca plan`` entry that runs this method on a frozen 4-bit
            bitsandbytes base (``qpaca`` for paca; ``paca plan --quantize`` plans the method in it): the
            base's target linears are quantized first, then the method is set up on them as usual.
        summary: one line for listings.
    """

    name: str
    config: type[MethodConfig]
    from_args: Callable[[argparse.Namespace, CommonOptions], MethodConfig]
    aliases: tuple[str, ...] = ()
    alone: tuple[str, ...] = ()
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None
    options: tuple[str, ...] = ()
    check_args: Callable[[argparse.Namespace, Sequence[str]], None] | None = None
    claims_modules: Callable[[argparse.Namespace], list[str] | str | None] | None = None
    bench_options: Mapping[str, Any] = field(default_factory=dict)
    field_flags: Mapping[str, str] = field(default_factory=dict)
    bench_flags: tuple[str, ...] = ()
    default_rank: int | None = 8
    default_lr: float | Callable[[int | None], float] = 1e-3
    uses_rank: bool = True
    leads: bool = True
    exclusive: bool = False
    match_factor: int = 1
    export_lora: Callable[[Any], tuple[Any, Any]] | None = None
    bench_peers: tuple[str, ...] = ()
    four_bit_form: str | None = None
    summary: str = ""

    def __post_init__(self) -> None:
        if not self.name or self.name != self.name.lower() or any(ch in self.name for ch in "+, "):
            raise PacaConfigError(f"Method name {self.name!r} must be lower case without '+', ',' or spaces.")
        if self.config.method != self.name:
            raise PacaConfigError(f"Method {self.name!r}: its config {self.config.__name__}.method is {self.config.method!r}.")
        unknown = [flag for flag in self.bench_flags if flag not in self.options]
        if unknown:
            raise PacaConfigError(f"Method {self.name!r}: bench_flags {unknown} are not among its options {list(self.options)}.")
        form = self.four_bit_form
        if form is not None and (not form or form != form.lower() or any(ch in form for ch in "+,@ ") or form == self.name):
            raise PacaConfigError(f"Method {self.name!r}: four_bit_form {form!r} must be another lower-case name without '+', ',', '@' or spaces.")


_METHODS: dict[str, Method] = {}
_ALIASES: dict[str, str] = {}
_entry_points_loaded = False


def register_method(method: Method, replace: bool = False) -> Method:
    """Make ``method`` usable everywhere: ``prepare_model``, checkpoints, ``paca train --method`` and ``paca bench``.

    Registering a second method under a taken name (or alias) is an error unless ``replace``.
    """
    if not isinstance(method, Method):
        raise TypeError(f"register_method takes a paca_core.Method, got {type(method).__name__}.")
    names = (method.name, *method.aliases)
    for name in names:
        owner = _ALIASES.get(name, name if name in _METHODS else None)
        if owner is not None and owner != method.name and not replace:
            raise PacaConfigError(f"Method name {name!r} is already registered (by {owner!r}).")
    if method.name in _METHODS and not replace and _METHODS[method.name] is not method:
        raise PacaConfigError(f"Method {method.name!r} is already registered; pass replace=True to replace it.")
    old = _METHODS.get(method.name)
    if old is not None:
        for alias in old.aliases:
            _ALIASES.pop(alias, None)
    _METHODS[method.name] = method
    for alias in method.aliases:
        _ALIASES[alias] = method.name
    return method


def unregister_method(name: str) -> None:
    """Remove a registered method (tests, or a user replacing one of theirs)."""
    method = _METHODS.pop(name)
    for alias in method.aliases:
        _ALIASES.pop(alias, None)


def load_entry_points() -> None:
    """Import the methods other distributions declare in the ``paca_hal.methods`` group (once)."""
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    from importlib.metadata import entry_points

    for entry_point in entry_points(group=ENTRY_POINT_GROUP):
        try:
            loaded = entry_point.load()
        except Exception as error:  # a broken plug-in must not break the built-in methods
            logger.warning("Method entry point %r (%s) failed to load: %s", entry_point.name, entry_point.value, error)
            continue
        if isinstance(loaded, Method) and _METHODS.get(loaded.name) is not loaded:
            register_method(loaded)


def registered_methods() -> list[Method]:
    """Every registered method, built-ins first, in registration order."""
    load_entry_points()
    return list(_METHODS.values())


def external_method_modules() -> list[str]:
    """Modules that define the registered methods from outside paca_core (a fresh process, such as a
    ``paca bench`` worker, imports them to register the same methods)."""
    modules = []
    for method in registered_methods():
        module = method.config.__module__
        if module.split(".")[0] != "paca_core" and module != "__main__" and module not in modules:
            modules.append(module)
    return modules


def import_method_modules(modules: Sequence[str]) -> None:
    """Import modules that register methods (what :func:`external_method_modules` listed in another process)."""
    import importlib

    for module in modules:
        importlib.import_module(module)


def find_method(name: str) -> Method | None:
    name = name.strip().lower()
    key = _ALIASES.get(name, name)
    if key not in _METHODS:
        load_entry_points()
        key = _ALIASES.get(name, name)
    return _METHODS.get(key)


def get_method(name: str) -> Method:
    """The method registered as ``name`` (or an alias of it)."""
    method = find_method(name)
    if method is None:
        raise PacaConfigError(f"Unknown method {name!r}; known methods: {', '.join(m.name for m in registered_methods())}.")
    return method


def method_help() -> str:
    """What ``--method`` accepts, from the registry."""
    names = []
    for method in registered_methods():
        text = method.name
        if method.alone:
            text += f" (= {'+'.join(method.alone)})"
        names.append(text)
    return f"{', '.join(names)}, or a combination joined by '+' (lora+velora, paca+full+velora, paca+meft)"


def parse_combination(text: str) -> list[Method]:
    """``"lora+velora"`` → its methods, checked: known, no repeats, at most one exclusive method."""
    parts = [p.strip().lower() for p in text.split("+") if p.strip()]
    if len(parts) == 1:
        method = find_method(parts[0])
        if method is not None and method.alone:
            parts = list(method.alone)
    found = [find_method(p) for p in parts]
    names = [m.name for m in found if m is not None]
    if not parts or None in found or len(set(names)) != len(names):
        raise PacaConfigError(f"--method {text!r} is not valid; use {method_help()}.")
    exclusive = [m.name for m in found if m.exclusive]
    if len(exclusive) > 1:
        raise PacaConfigError(
            f"--method {text!r}: {' and '.join(exclusive)} would adapt the same modules; pick one "
            f"(combine one of them with {_or_list([m.name for m in registered_methods() if not m.exclusive])})."
        )
    return found


def _or_list(names: list[str]) -> str:
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


def primary_method(methods: Sequence[Method]) -> Method:
    """The method that sets a combination's default rank and learning rate."""
    return next((m for m in methods if m.leads), next((m for m in methods if not m.config.modifier), methods[0]))


def primary_name(parts: Sequence[str]) -> str:
    """:func:`primary_method` by names (``["lora", "velora"]`` → ``"lora"``)."""
    methods = [get_method(p) for p in parts]
    return primary_method(methods).name


def default_rank(method: str) -> int | None:
    """``--rank`` that ``paca train --method METHOD`` uses without the flag."""
    return primary_method(parse_combination(method)).default_rank


def default_lr(method: str, rank: int | None = None) -> float:
    """The learning rate ``paca train --method METHOD --rank RANK`` uses without --lr."""
    return learning_rate(primary_method(parse_combination(method)), rank)


class ScaledAboveDefaultRank:
    """A default lr that falls as ``(default_rank / r) ** power`` above the method's default rank (kept below it).

    With scaling alpha/r = 1 the update grows with r under Adam, and the best lr falls. PaCA trains
    columns of W directly, each moving along its own gradient, so its update adds up coherently over
    the r columns (power 1). LoRA's update ``B·A`` passes through a random A, so its r components add up
    like random vectors (power 1/2, rsLoRA's alpha/sqrt(r) argument). Measured in scripts/lr_sweep.py at
    4x the default rank: PaCA's best lr fell ~4x (r 16 -> 64), LoRA's ~2.5x (r 8 -> 32); the default-rank
    lr lost up to half of PaCA's best improvement there (docs/methods.md). Smaller ranks keep the
    default-rank lr (not measured)."""

    def __init__(self, lr_at_default_rank: float, default_rank: int, power: float = 1.0):
        self.lr_at_default_rank, self.default_rank, self.power = lr_at_default_rank, default_rank, power

    def __call__(self, rank: int | None) -> float:
        r = rank or self.default_rank
        return self.lr_at_default_rank * min(1.0, self.default_rank / r) ** self.power

    def __repr__(self) -> str:
        exponent = "" if self.power == 1 else f"^{self.power:g}"
        return f"{self.lr_at_default_rank:g} x min(1, {self.default_rank}/r){exponent}"


def learning_rate(method: Method, rank: int | None = None) -> float:
    """``method.default_lr`` at ``rank`` (its default rank when None)."""
    value = method.default_lr
    if callable(value):
        return float(value(rank if rank is not None else method.default_rank))
    return value


class RegistryView(Mapping):
    """A read-only ``{method name: value}`` mapping read live from the registry (``DEFAULT_LR`` and friends)."""

    def __init__(self, attribute: str):
        self._attribute = attribute

    def _items(self) -> dict[str, Any]:
        return {m.name: self._value(m) for m in registered_methods() if not m.config.modifier}

    def _value(self, method: Method) -> Any:
        return learning_rate(method) if self._attribute == "default_lr" else getattr(method, self._attribute)

    def __getitem__(self, key: str) -> Any:
        method = find_method(key)
        if method is None:
            raise KeyError(key)
        return self._value(method)

    def __iter__(self) -> Iterator[str]:
        return iter(self._items())

    def __len__(self) -> int:
        return len(self._items())

    def __repr__(self) -> str:
        return repr(self._items())
