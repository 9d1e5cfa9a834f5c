"""Adapter layers, one file per method; ``base.AdapterLayer`` is what they all offer."""
from .base import AdapterLayer
from .partial_connection import PaCALinear, register_optimizer_sync_hook, sync_layers

__all__ = ["AdapterLayer", "PaCALinear", "register_optimizer_sync_hook", "sync_layers"]
