"""The registered device runtimes, and everything derived from them: ``--device`` parsing, ``auto``,
``DEVICE_CHOICES`` and the device-dispatching helpers (memory stats, streams, optimizers, ...).

A device is known here only through :func:`register_runtime`; nothing in this file names one.
Nothing here imports vendor software at import time.
"""
from __future__ import annotations

import argparse
import logging
import os
import re
from typing import Any, ContextManager, Iterable

import torch

from .runtime import DeviceRuntime, DeviceUnavailableError, InvalidDeviceError, MemoryStats

logger = logging.getLogger(__name__)

ENV_VAR = "PACA_DEVICE"

#: name -> runtime, in registration order (the order ``DEVICE_CHOICES`` lists them).
_RUNTIMES: dict[str, DeviceRuntime] = {}
_SPEC = re.compile(r"^(?P<type>[a-z][a-z0-9_]*)(?::(?P<index>\d+))?$")
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


def register_runtime(runtime: DeviceRuntime, *, replace: bool = False) -> DeviceRuntime:
    """Make ``runtime``'s device usable everywhere (``--device``, ``auto``, graph modes, backends).

    ``runtime.name`` must be a device type torch can parse; registering a name twice is an error
    unless ``replace`` is set. Returns ``runtime``.
    """
    name = runtime.name
    if name == "auto" or not _NAME.match(name or ""):
        raise ValueError(f"A device runtime needs a lower-case device type as its name, got {name!r}.")
    try:
        torch.device(name)
    except RuntimeError as error:
        raise ValueError(f"{name!r} is not a device type PyTorch knows ({error}).") from None
    if name in _RUNTIMES and not replace:
        raise ValueError(f"A runtime for {name!r} is already registered; pass replace=True to swap it.")
    _RUNTIMES[name] = runtime
    return runtime


def unregister_runtime(name: str) -> DeviceRuntime:
    """Forget the runtime of device type ``name`` (tests, plug-ins); returns it."""
    try:
        return _RUNTIMES.pop(name)
    except KeyError:
        raise KeyError(f"No runtime is registered for {name!r}.") from None


def registered_runtimes() -> tuple[DeviceRuntime, ...]:
    """Every registered runtime, in registration order."""
    return tuple(_RUNTIMES.values())


def auto_order() -> tuple[str, ...]:
    """Device types ``auto`` tries, most preferred first (runtimes with an ``auto_priority``)."""
    ranked = [r for r in _RUNTIMES.values() if r.auto_priority is not None]
    return tuple(r.name for r in sorted(ranked, key=lambda r: -r.auto_priority))


def device_choices() -> tuple[str, ...]:
    """What ``--device`` accepts: ``auto`` and every registered type (``type:N`` where indexed)."""
    choices = ["auto"]
    for runtime in _RUNTIMES.values():
        choices += [runtime.name, f"{runtime.name}:N"] if runtime.indexed else [runtime.name]
    return tuple(choices)


def __getattr__(name: str) -> Any:
    # DEVICE_CHOICES is derived from the registered runtimes on every access (PEP 562), so a runtime
    # registered later shows up in it too.
    if name == "DEVICE_CHOICES":
        return device_choices()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def runtime_for(device: torch.device | str) -> DeviceRuntime:
    """The runtime object of a device type; raises for types without a registered runtime."""
    device_type = device.type if isinstance(device, torch.device) else torch.device(device).type
    try:
        return _RUNTIMES[device_type]
    except KeyError:
        raise InvalidDeviceError(
            f"Device type {device_type!r} is not supported; valid devices: {', '.join(device_choices())}."
        ) from None


def resolve_device(spec: str | torch.device | None = None) -> torch.device:
    """Turn ``auto`` or ``type[:N]`` (or ``$PACA_DEVICE`` when ``spec`` is None) into a usable device.

    ``auto`` takes the available runtime with the highest ``auto_priority`` (hpu, then cuda, then
    cpu for the built-in ones) and logs what it chose. Explicit requests for a missing device raise
    :class:`DeviceUnavailableError` with what to do, never fall back silently.
    """
    if isinstance(spec, torch.device):
        spec = str(spec)
    source = "argument"
    if spec is None or spec == "":
        spec, source = os.environ.get(ENV_VAR, "auto"), f"${ENV_VAR}" if ENV_VAR in os.environ else "default"
    text = spec.strip().lower()
    valid = ", ".join(device_choices())
    match = _SPEC.match(text)
    if match is None:
        raise InvalidDeviceError(f"Unknown device {spec!r} (from {source}); valid devices: {valid} (N is a device index).")
    device_type, index = match.group("type"), match.group("index")
    if device_type == "auto":
        if index is not None:
            raise InvalidDeviceError(f"'auto' takes no index (got {spec!r}); valid devices: {valid}.")
        for candidate in auto_order():
            if _RUNTIMES[candidate].is_available():
                device = _finish(_RUNTIMES[candidate], None)
                logger.info("Selected device %s (auto detect)", device)
                return device
        raise DeviceUnavailableError(f"'auto' found no available device among {', '.join(auto_order()) or 'none'}.")
    runtime = _RUNTIMES.get(device_type)
    if runtime is None:
        if _torch_knows(device_type):
            raise InvalidDeviceError(
                f"PyTorch knows device type {device_type!r} (from {source}), but paca-hal has no runtime for it; "
                f"valid devices: {valid}. To add one, register a DeviceRuntime with devices.register_runtime "
                "(docs/ARCHITECTURE.md, 'How to add a device')."
            )
        raise InvalidDeviceError(f"Unknown device {spec!r} (from {source}); valid devices: {valid} (N is a device index).")
    return _finish(runtime, None if index is None else int(index))


def _torch_knows(device_type: str) -> bool:
    try:
        torch.device(device_type)
    except RuntimeError:
        return False
    return True


def _finish(runtime: DeviceRuntime, index: int | None) -> torch.device:
    if not runtime.is_available():
        raise DeviceUnavailableError(runtime.unavailable_reason())
    runtime.prepare()
    name = runtime.name
    if not runtime.indexed:
        if index not in (None, 0):
            raise InvalidDeviceError(f"{name} has a single device; use {name!r} (got {name}:{index}).")
        return torch.device(name)
    count = runtime.device_count()
    if index is None:
        index = 0
    if index >= count:
        raise DeviceUnavailableError(
            f"{name}:{index} does not exist: this machine has {count} {name} device(s), "
            f"valid indices are 0..{count - 1}."
        )
    return torch.device(name, index)


def add_device_argument(parser: argparse.ArgumentParser, default: str | None = None) -> argparse.ArgumentParser:
    """Add ``--device`` to any argparse parser; parse the value later with :func:`resolve_device`."""
    order = list(auto_order())
    prefers = order[0] if len(order) == 1 else ", then ".join(order)
    parser.add_argument(
        "--device",
        default=default,
        metavar="DEVICE",
        help=(
            f"where to run: {', '.join(device_choices())}. 'auto' prefers {prefers}. "
            f"Default: ${ENV_VAR} if set, else auto."
        ),
    )
    return parser


def memory_stats(device: torch.device | str) -> MemoryStats:
    """Current and peak memory of ``device`` in bytes, whatever its type."""
    device = torch.device(device)
    return runtime_for(device).memory_stats(device)


def free_memory_bytes(device: torch.device | str) -> int | None:
    """Bytes new allocations on ``device`` could still get now, whatever its type; None when unknown."""
    device = torch.device(device)
    return runtime_for(device).free_bytes(device)


def reset_peak_memory_stats(device: torch.device | str) -> None:
    """Start a new peak-memory window on ``device``."""
    device = torch.device(device)
    runtime_for(device).reset_peak_memory_stats(device)


def synchronize(device: torch.device | str) -> None:
    """Wait until queued work on ``device`` is done (for timing)."""
    device = torch.device(device)
    runtime_for(device).synchronize(device)


def available_device_types() -> list[str]:
    """Device types usable in this process: ``auto``'s candidates in its order, then the others."""
    ranked = auto_order()
    names = list(ranked) + [name for name in _RUNTIMES if name not in ranked]
    return [name for name in names if _RUNTIMES[name].is_available()]


def default_dtype(device: torch.device | str) -> torch.dtype:
    """The dtype to train in on ``device`` when the user does not choose (bf16 on accelerators, fp32 on CPU)."""
    return runtime_for(torch.device(device)).default_dtype


def shares_host_memory(device: torch.device | str) -> bool:
    """Whether ``device``'s memory is host memory (CPU): copies there are free and peaks count the
    whole process. Device types without a registered runtime are taken to have their own memory."""
    runtime = _RUNTIMES.get(torch.device(device).type)
    return bool(runtime is not None and runtime.shares_host_memory)


def step_boundary(device: torch.device | str) -> None:
    """End of a graph segment: flushes the HPU lazy graph (``mark_step``); a no-op on other devices."""
    runtime_for(torch.device(device)).step_boundary()


# --- streams, events, pinned memory: one API for copy/compute overlap on every device -------------


def new_stream(device: torch.device | str) -> Any:
    """A side stream on ``device`` (torch.cuda.Stream, the Habana Stream, or a no-op host stream on CPU)."""
    device = torch.device(device)
    return runtime_for(device).new_stream(device)


def current_stream(device: torch.device | str) -> Any:
    """The stream ``device``'s work is queued on now."""
    device = torch.device(device)
    return runtime_for(device).current_stream(device)


def stream_context(device: torch.device | str, stream: Any) -> ContextManager:
    """``with devices.stream_context(device, s):`` queues the enclosed work on ``s``."""
    return runtime_for(torch.device(device)).stream_context(stream)


def new_event(device: torch.device | str, enable_timing: bool = False) -> Any:
    """An event to order streams (``record``/``wait``) or time work (``elapsed_time`` in ms)."""
    device = torch.device(device)
    return runtime_for(device).new_event(device, enable_timing=enable_timing)


def record_stream(tensor: torch.Tensor, stream: Any) -> None:
    """Mark ``tensor`` (on its device) as used by ``stream`` so the allocator does not reuse it early."""
    runtime_for(tensor.device).record_stream(tensor, stream)


def pin_memory_supported(device: torch.device | str) -> bool:
    """Whether host tensors can be page-locked for ``device`` (False on CPU, where nothing is copied)."""
    return runtime_for(torch.device(device)).pin_memory_supported()


def pin_memory(tensor: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``tensor`` (on the host) page-locked for copies to ``device``; unchanged where that is not supported."""
    return runtime_for(torch.device(device)).pin_memory(tensor)


# --- optimizer and gradient clipping in each device's fused form ---------------------------------


def make_adamw(
    params: Iterable[Any],
    device: torch.device | str,
    *,
    lr: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
) -> torch.optim.Optimizer:
    """AdamW for parameters on ``device``: Habana's FusedAdamW on HPU when present, torch's fused
    kernel on CUDA, the multi-tensor one on CPU. Same arguments, same update rule everywhere
    (``eps`` is passed explicitly because FusedAdamW's default differs)."""
    return runtime_for(torch.device(device)).make_adamw(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)


def clip_grad_norm(parameters: Iterable[torch.Tensor], max_norm: float, device: torch.device | str) -> torch.Tensor:
    """Clip gradients to a global L2 norm of ``max_norm`` (Habana's FusedClipNorm on HPU); returns the norm."""
    return runtime_for(torch.device(device)).clip_grad_norm(parameters, max_norm)


def device_name(device: torch.device | str) -> str:
    """A human-readable device name for reports (e.g. "NVIDIA H100 80GB HBM3", "2-core CPU (x86_64)")."""
    return runtime_for(torch.device(device)).device_name(torch.device(device))
