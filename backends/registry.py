"""Which backend serves a device type: a registered device backend, else the portable one.

``register_backend(cls)`` makes ``cls`` serve ``cls.device_type``; every other device type torch
supports gets :class:`~backends.portable.TorchBackend`, so a device needs a backend file only when
it runs some primitive differently.
"""
from __future__ import annotations

import torch

import devices

from .base import Backend
from .portable import TorchBackend

#: device type -> backend class, for the device types that have their own (registered) backend.
BACKEND_CLASSES: dict[str, type[Backend]] = {}
_INSTANCES: dict[str, Backend] = {}
#: Device types whose tensors hold no data: nothing can be computed on them.
_NO_DATA = frozenset({"meta"})


def register_backend(backend_cls: type[Backend], *, replace: bool = False) -> type[Backend]:
    """Make ``backend_cls`` serve ``backend_cls.device_type`` (instead of the portable backend)."""
    device_type = backend_cls.device_type
    if not device_type:
        raise ValueError(f"{backend_cls.__name__} needs a device_type to be registered.")
    if device_type in BACKEND_CLASSES and not replace:
        raise ValueError(f"A backend for {device_type!r} is already registered; pass replace=True to swap it.")
    BACKEND_CLASSES[device_type] = backend_cls
    _INSTANCES.pop(device_type, None)
    return backend_cls


def unregister_backend(device_type: str) -> type[Backend]:
    """Let ``device_type`` fall back to the portable backend again; returns the class it had."""
    _INSTANCES.pop(device_type, None)
    return BACKEND_CLASSES.pop(device_type)


def overridden_primitives(backend_cls: type[Backend]) -> tuple[str, ...]:
    """The primitives ``backend_cls`` runs with its own code rather than :class:`TorchBackend`'s."""
    return tuple(
        sorted(name for name in Backend.__abstractmethods__ if getattr(backend_cls, name) is not getattr(TorchBackend, name))
    )


def get_backend(device: torch.device | str) -> Backend:
    """The backend serving ``device``'s type, one cached instance per type.

    A string naming a device with a runtime (``auto``, ``cuda:1``) is resolved first, so a missing
    device is explained; any other device type torch supports gets the portable backend.
    """
    if isinstance(device, str):
        device_type = device.split(":")[0].strip().lower()
        if device_type == "auto" or device_type in {r.name for r in devices.registered_runtimes()}:
            device = devices.resolve_device(device)
    device_type = torch.device(device).type
    backend = _INSTANCES.get(device_type)
    if backend is None:
        if device_type in _NO_DATA:
            raise ValueError(
                f"Device type {device_type!r} holds no data, so no backend computes on it; "
                "supported: every device type whose tensors hold data."
            )
        backend_cls = BACKEND_CLASSES.get(device_type)
        backend = backend_cls() if backend_cls is not None else TorchBackend(device_type)
        _INSTANCES[device_type] = backend
    return backend
