"""Rebuilding saved method configs: :func:`config_from_dict` (what checkpoints and adapters are read with) and
:data:`METHOD_CONFIGS`, both read live from the method registry.

It is also the stable public import path for the config classes (``from paca_core.config import PaCAConfig``, as
users and older adapters' code have it); each class lives with its method in ``paca_core/methods/<name>.py`` and the
shared base in :mod:`paca_core.base_config`, and the package itself imports them from there.
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import fields
from typing import Any

from .base_config import ALL_LINEAR, LLAMA_PROJECTIONS, MethodConfig, _check_rank, _check_targets, method_name, parse_targets
from .errors import PacaConfigError
from .methods import FullConfig, LoRAConfig, LoRAFAConfig, MEFTConfig, PaCAConfig, VeLoRAConfig, find_method, registered_methods

__all__ = [
    "ALL_LINEAR",
    "LLAMA_PROJECTIONS",
    "METHOD_CONFIGS",
    "FullConfig",
    "LoRAConfig",
    "LoRAFAConfig",
    "MEFTConfig",
    "MethodConfig",
    "PaCAConfig",
    "VeLoRAConfig",
    "config_from_dict",
    "method_name",
    "parse_targets",
    "_check_rank",
    "_check_targets",
]


class _MethodConfigs(Mapping):
    """``{method name: config class}`` read live from the method registry."""

    def __getitem__(self, name: str) -> type[MethodConfig]:
        method = find_method(name) if isinstance(name, str) else None
        if method is None or method.name != name:
            raise KeyError(name)
        return method.config

    def __iter__(self) -> Iterator[str]:
        return iter([m.name for m in registered_methods()])

    def __len__(self) -> int:
        return len(registered_methods())

    def __repr__(self) -> str:
        return repr({m.name: m.config for m in registered_methods()})


#: method name → config class; the CLI's ``--method`` and checkpoints use these names.
METHOD_CONFIGS: Mapping[str, type[MethodConfig]] = _MethodConfigs()


def config_from_dict(data: dict[str, Any]) -> MethodConfig:
    """Rebuild a config saved with :meth:`MethodConfig.to_dict` (unknown methods or fields are errors)."""
    data = dict(data)
    method = data.pop("method", None)
    if method not in METHOD_CONFIGS:
        raise PacaConfigError(f"Unknown method {method!r}; known methods: {', '.join(METHOD_CONFIGS)}.")
    cls = METHOD_CONFIGS[method]
    data = cls.upgrade_saved(data)
    known = {f.name for f in fields(cls) if f.init}
    unknown = sorted(set(data) - known)
    if unknown:
        raise PacaConfigError(f"Unknown {method} config fields {unknown}; known fields: {sorted(known)}.")
    return cls(**data)
