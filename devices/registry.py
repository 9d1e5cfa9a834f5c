"""Device detection and ``--device`` parsing. Nothing here imports vendor software at import time."""
from __future__ import annotations

import argparse
import logging
import os
import re
from typing import Any, ContextManager, Iterable

import torch

from .cpu import CpuRuntime
from .cuda import CudaRuntime
from .hpu import HpuRuntime
from .runtime import DeviceRuntime, DeviceUnavailableError, InvalidDeviceError, MemoryStats

logger = logging.getLogger(__name__)

ENV_VAR = "PACA_DEVICE"
#: Preference order for ``auto``.
AUTO_ORDER = ("hpu", "cuda", "cpu")
DEVICE_CHOICES = ("auto", "cpu", "cuda", "cuda:N", "hpu", "hpu:N")

_RUNTIMES: dict[str, DeviceRuntime] = {"cpu": CpuRuntime(), "cuda": CudaRuntime(), "hpu": HpuRuntime()}
_SPEC = re.compile(r"^(?P<type>auto|cpu|cuda|hpu)(?::(?P<index>\d+))?$")


def runtime_for(device: torch.device | str) -> DeviceRuntime:
    """The runtime object of a device type; raises for types we do not support."""
    device_type = torch.device(device).type if not isinstance(device, torch.device) else device.type
    try:
        return _RUNTIMES[device_type]
    except KeyError:
        raise InvalidDeviceError(
            f"Device type {device_type!r} is not supported; valid devices: {', '.join(DEVICE_CHOICES)}."
        ) from None


def resolve_device(spec: str | torch.device | None = None) -> torch.device:
    """Turn ``auto``/``cpu``/``cuda[:N]``/``hpu[:N]`` (or ``$PACA_DEVICE`` when ``spec`` is None) into a usable device.

    ``auto`` prefers hpu, then cuda, then cpu, and logs what it chose. Explicit requests for a
    missing device raise :class:`DeviceUnavailableError` with what to do, never fall back silently.
    """
    if isinstance(spec, torch.device):
        spec = str(spec)
    source = "argument"
    if spec is None or spec == "":
        spec, source = os.environ.get(ENV_VAR, "auto"), f"${ENV_VAR}" if ENV_VAR in os.environ else "default"
    text = spec.strip().lower()
    match = _SPEC.match(text)
    if match is None:
        raise InvalidDeviceError(
            f"Unknown device {spec!r} (from {source}); valid devices: {', '.join(DEVICE_CHOICES)} (N is a device index)."
        )
    device_type, index = match.group("type"), match.group("index")
    if device_type == "auto":
        if index is not None:
            raise InvalidDeviceError(f"'auto' takes no index (got {spec!r}); valid devices: {', '.join(DEVICE_CHOICES)}.")
        for candidate in AUTO_ORDER:
            if _RUNTIMES[candidate].is_available():
                device = _finish(candidate, None)
                logger.info("Selected device %s (auto detect)", device)
                return device
    return _finish(device_type, None if index is None else int(index))


def _finish(device_type: str, index: int | None) -> torch.device:
    runtime = _RUNTIMES[device_type]
    if not runtime.is_available():
        raise DeviceUnavailableError(runtime.unavailable_reason())
    runtime.prepare()
    if device_type == "cpu":
        if index not in (None, 0):
            raise InvalidDeviceError(f"cpu has a single device; use 'cpu' (got cpu:{index}).")
        return torch.device("cpu")
    count = runtime.device_count()
    if index is None:
        index = 0
    if index >= count:
        raise DeviceUnavailableError(
            f"{device_type}:{index} does not exist: this machine has {count} {device_type} device(s), "
            f"valid indices are 0..{count - 1}."
        )
    return torch.device(device_type, index)


def add_device_argument(parser: argparse.ArgumentParser, default: str | None = None) -> argparse.ArgumentParser:
    """Add ``--device`` to any argparse parser; parse the value later with :func:`resolve_device`."""
    parser.add_argument(
        "--device",
        default=default,
        metavar="DEVICE",
        help=(
            f"where to run: {', '.join(DEVICE_CHOICES)}. 'auto' prefers hpu, then cuda, then cpu. "
            f"Default: ${ENV_VAR} if set, else auto."
        ),
    )
    return parser


def memory_stats(device: torch.device | str) -> MemoryStats:
    """Current and peak memory of ``device`` in bytes, whatever its type."""
    device = torch.device(device)
    return runtime_for(device).memory_stats(device)


def reset_peak_memory_stats(device: torch.device | str) -> None:
    """Start a new peak-memory window on ``device``."""
    device = torch.device(device)
    runtime_for(device).reset_peak_memory_stats(device)


def synchronize(device: torch.device | str) -> None:
    """Wait until queued work on ``device`` is done (for timing)."""
    device = torch.device(device)
    runtime_for(device).synchronize(device)


def available_device_types() -> list[str]:
    """Device types usable in this process, in ``auto`` preference order."""
    return [name for name in AUTO_ORDER if _RUNTIMES[name].is_available()]


def default_dtype(device: torch.device | str) -> torch.dtype:
    """The dtype to train in on ``device`` when the user does not choose (bf16 on accelerators, fp32 on CPU)."""
    return runtime_for(torch.device(device)).default_dtype


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
