"""Adapter layers, one file per method; ``base.AdapterLayer`` is what they all offer."""
from .base import AdapterLayer, LinearAdapterLayer
from .partial_connection import PaCALinear, register_optimizer_sync_hook, sync_layers

__all__ = ["AdapterLayer", "LinearAdapterLayer", "PaCALinear", "register_optimizer_sync_hook", "sync_layers"]
