"""``get_backend(device)``: the backend object for a device, created once per device type."""
from __future__ import annotations

import torch

from devices import resolve_device

from .base import Backend
from .cpu import CpuBackend
from .cuda import CudaBackend
from .hpu import HpuBackend

BACKEND_CLASSES: dict[str, type[Backend]] = {"cpu": CpuBackend, "cuda": CudaBackend, "hpu": HpuBackend}
_INSTANCES: dict[str, Backend] = {}


def get_backend(device: torch.device | str) -> Backend:
    """The backend serving ``device``'s type (cached). Raises with the supported types otherwise."""
    if isinstance(device, str) and device.split(":")[0] in ("auto", "cpu", "cuda", "hpu"):
        device = resolve_device(device)  # validates and explains a missing device
    device_type = device.type if isinstance(device, torch.device) else torch.device(device).type
    backend = _INSTANCES.get(device_type)
    if backend is None:
        try:
            backend = BACKEND_CLASSES[device_type]()
        except KeyError:
            raise ValueError(
                f"No paca-hal backend for device type {device_type!r}; supported: {', '.join(BACKEND_CLASSES)}."
            ) from None
        _INSTANCES[device_type] = backend
    return backend
