"""Adapter layers, one file per method (``base.AdapterLayer`` is what they all offer), and the per-layer seeds and
PaCA's columns (:mod:`.indices`).

May import backends, devices, errors, base_config, surgery, distributed and memory; not methods, train, files or cli.
The names below load on first use, so importing one module of the package does not import every layer.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_LAZY = {
    **dict.fromkeys(("AdapterLayer", "LinearAdapterLayer"), "paca_core.layers.base"),
    **dict.fromkeys(("PaCALinear", "register_optimizer_sync_hook", "sync_layers"), "paca_core.layers.partial_connection"),
}

if TYPE_CHECKING:  # pragma: no cover
    from .base import AdapterLayer, LinearAdapterLayer
    from .partial_connection import PaCALinear, register_optimizer_sync_hook, sync_layers


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'paca_core.layers' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


__all__ = sorted(_LAZY)
