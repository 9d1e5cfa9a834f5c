"""devices: what hardware is there — detection, ``--device`` parsing, memory stats, graph modes.

The bottom layer: imports nothing from ``backends`` or ``paca_core``, and no vendor package at import time.
"""
from .graph_modes import GRAPH_MODES, add_graph_mode_argument, apply_graph_mode, compile_backend, resolve_graph_mode
from .registry import (
    DEVICE_CHOICES,
    ENV_VAR,
    add_device_argument,
    available_device_types,
    default_dtype,
    memory_stats,
    reset_peak_memory_stats,
    resolve_device,
    runtime_for,
    step_boundary,
    synchronize,
)
from .runtime import DeviceRuntime, DeviceUnavailableError, InvalidDeviceError, MemoryStats

__all__ = [
    "DEVICE_CHOICES",
    "ENV_VAR",
    "GRAPH_MODES",
    "DeviceRuntime",
    "DeviceUnavailableError",
    "InvalidDeviceError",
    "MemoryStats",
    "add_device_argument",
    "add_graph_mode_argument",
    "apply_graph_mode",
    "available_device_types",
    "compile_backend",
    "default_dtype",
    "memory_stats",
    "reset_peak_memory_stats",
    "resolve_device",
    "resolve_graph_mode",
    "runtime_for",
    "step_boundary",
    "synchronize",
]
