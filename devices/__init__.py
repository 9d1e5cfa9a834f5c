"""devices: what hardware is there — detection, ``--device`` parsing, memory stats, graph modes, transfers.

The bottom layer: imports nothing from ``backends`` or ``paca_core``, and no vendor package at import time.
A device is one :class:`DeviceRuntime` subclass, made known by :func:`register_runtime`; the built-in
ones are registered at the end of this file, other distributions' through the ``paca_hal.devices``
entry-point group (:data:`ENTRY_POINT_GROUP`, read once when the registered runtimes are first read).
"""
from typing import Any

from .cpu import CpuRuntime
from .cuda import CudaRuntime
from .distributed import (
    device_mesh,
    host_process_group,
    init_distributed,
    launched_world_size,
    local_world_size,
    shutdown_distributed,
    world_size,
)
from .graph_modes import (
    add_graph_mode_argument,
    apply_graph_mode,
    compile_backend,
    graph_mode_choices,
    graph_mode_of,
    keeps_grad_buffers,
    resolve_graph_mode,
)
from .hpu import HpuRuntime
from .profiles import DeviceProfile, UnknownProfileError, calibrate_cpu, get_profile, load_profiles, save_calibration
from .registry import (
    ENTRY_POINT_GROUP,
    ENV_VAR,
    add_device_argument,
    auto_order,
    available_device_types,
    clip_grad_norm,
    current_stream,
    default_dtype,
    default_dtype_choice,
    device_choices,
    device_name,
    free_memory_bytes,
    load_entry_points,
    make_adamw,
    memory_stats,
    new_event,
    new_stream,
    pin_memory,
    pin_memory_supported,
    record_stream,
    register_runtime,
    registered_runtimes,
    reset_peak_memory_stats,
    resolve_device,
    runtime_for,
    shares_host_memory,
    step_boundary,
    stream_context,
    synchronize,
    unregister_runtime,
)
from .runtime import COMPILE, EAGER, DeviceRuntime, DeviceUnavailableError, DtypeChoice, GraphMode, InvalidDeviceError, MemoryStats
from .transfers import Transfer, copy_to_device, copy_to_host, host_tensor

__all__ = [
    "COMPILE",
    "DEVICE_CHOICES",
    "EAGER",
    "ENTRY_POINT_GROUP",
    "ENV_VAR",
    "GRAPH_MODES",
    "DeviceProfile",
    "DeviceRuntime",
    "DeviceUnavailableError",
    "DtypeChoice",
    "GraphMode",
    "InvalidDeviceError",
    "MemoryStats",
    "Transfer",
    "UnknownProfileError",
    "add_device_argument",
    "add_graph_mode_argument",
    "apply_graph_mode",
    "auto_order",
    "available_device_types",
    "calibrate_cpu",
    "clip_grad_norm",
    "compile_backend",
    "copy_to_device",
    "copy_to_host",
    "current_stream",
    "default_dtype",
    "default_dtype_choice",
    "device_choices",
    "device_mesh",
    "device_name",
    "free_memory_bytes",
    "get_profile",
    "graph_mode_choices",
    "graph_mode_of",
    "host_process_group",
    "host_tensor",
    "init_distributed",
    "shutdown_distributed",
    "keeps_grad_buffers",
    "launched_world_size",
    "local_world_size",
    "load_entry_points",
    "load_profiles",
    "make_adamw",
    "memory_stats",
    "new_event",
    "new_stream",
    "pin_memory",
    "pin_memory_supported",
    "record_stream",
    "register_runtime",
    "registered_runtimes",
    "reset_peak_memory_stats",
    "resolve_device",
    "resolve_graph_mode",
    "runtime_for",
    "save_calibration",
    "shares_host_memory",
    "step_boundary",
    "stream_context",
    "synchronize",
    "unregister_runtime",
    "world_size",
]


def __getattr__(name: str) -> Any:
    # Both follow the registered runtimes on every access (PEP 562), so a runtime registered later
    # appears in them; `from devices import DEVICE_CHOICES` takes the value at that moment.
    if name == "DEVICE_CHOICES":
        return device_choices()
    if name == "GRAPH_MODES":
        return graph_mode_choices()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# The built-in devices, registered like any other (registration order = the order --device lists them).
register_runtime(CpuRuntime())
register_runtime(CudaRuntime())
register_runtime(HpuRuntime())
