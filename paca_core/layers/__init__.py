"""Adapter layers, one file per method."""
from .partial_connection import PaCALinear, register_optimizer_sync_hook, sync_layers

__all__ = ["PaCALinear", "register_optimizer_sync_hook", "sync_layers"]
