"""Which backend serves a device type: the one the user picked by name, else the device's registered
default, else the portable one.

``register_backend(cls)`` makes ``cls`` serve ``cls.device_type`` by default (what every device gets
without asking). ``register_backend(cls, default=False)`` registers an opt-in alternative for the same
device type — another kernel set, as Liger-Kernel ships per vendor — served only when picked by name:
``PACA_BACKEND=<name>`` in the environment, or :func:`select_backend` in Python. Every other device type
torch supports gets :class:`~backends.portable.TorchBackend`, which is also selectable everywhere by its
name (``torch-portable``), so a device needs a backend file only when it runs some primitive differently.
"""
from __future__ import annotations

import logging
import os

import torch

import devices

from .base import Backend
from .portable import TorchBackend

logger = logging.getLogger(__name__)

#: Picks backends by name: ``NAME`` (every device type that has a backend of that name) and/or
#: ``DEVICE_TYPE=NAME`` entries, comma-separated. Read when a device type's backend is first served.
ENV_VAR = "PACA_BACKEND"

#: device type -> the backend class serving it by default (device types with a registered default).
BACKEND_CLASSES: dict[str, type[Backend]] = {}
#: device type -> name -> opt-in backend class (``register_backend(cls, default=False)``).
_ALTERNATIVES: dict[str, dict[str, type[Backend]]] = {}
#: :func:`select_backend`'s choices: device type (None: every type) -> backend name.
_SELECTED: dict[str | None, str] = {}
_INSTANCES: dict[str, Backend] = {}
#: Device types whose tensors hold no data: nothing can be computed on them.
_NO_DATA = frozenset({"meta"})


def register_backend(backend_cls: type[Backend], *, replace: bool = False, default: bool = True) -> type[Backend]:
    """Register ``backend_cls`` for ``backend_cls.device_type`` under ``backend_cls.name``.

    ``default=True`` (the usual case): it serves that device type unless the user picks another.
    ``default=False``: an opt-in alternative, served only when picked by name (``$PACA_BACKEND`` or
    :func:`select_backend`); the device's default is unchanged. Returns ``backend_cls``.
    """
    device_type, name = backend_cls.device_type, backend_cls.name
    if not device_type:
        raise ValueError(f"{backend_cls.__name__} needs a device_type to be registered.")
    if not name or name == TorchBackend.name or "," in name or "=" in name:
        raise ValueError(f"{backend_cls.__name__} needs a name of its own (not {TorchBackend.name!r}, no ',' or '='), got {name!r}.")
    alternatives = _ALTERNATIVES.setdefault(device_type, {})
    current = BACKEND_CLASSES.get(device_type)
    if default:
        if current is not None and not replace:
            raise ValueError(f"A backend for {device_type!r} is already registered; pass replace=True to swap it.")
        if name in alternatives and not replace:
            raise ValueError(f"{device_type!r} already has an alternative backend called {name!r}.")
        alternatives.pop(name, None)
        BACKEND_CLASSES[device_type] = backend_cls
    else:
        taken = name in alternatives or (current is not None and current.name == name)
        if taken and not replace:
            raise ValueError(f"{device_type!r} already has a backend called {name!r}; pass replace=True to swap it.")
        if current is not None and current.name == name:
            del BACKEND_CLASSES[device_type]
        alternatives[name] = backend_cls
    _INSTANCES.pop(device_type, None)
    return backend_cls


def unregister_backend(device_type: str, name: str | None = None) -> type[Backend]:
    """Remove ``device_type``'s default backend (``name`` None: the type falls back to the portable
    one again) or its backend called ``name``; returns the class it had."""
    _INSTANCES.pop(device_type, None)
    default = BACKEND_CLASSES.get(device_type)
    if name is None or (default is not None and default.name == name):
        return BACKEND_CLASSES.pop(device_type)
    return _ALTERNATIVES.get(device_type, {}).pop(name)


def backend_names(device_type: str) -> tuple[str, ...]:
    """The backend names that can serve ``device_type``, its default first (``torch-portable`` always)."""
    default = BACKEND_CLASSES.get(device_type)
    names = [default.name] if default is not None else [TorchBackend.name]
    names += [name for name in _ALTERNATIVES.get(device_type, {}) if name not in names]
    if TorchBackend.name not in names:
        names.append(TorchBackend.name)
    return tuple(names)


def registered_backends() -> tuple[type[Backend], ...]:
    """Every registered backend class, defaults and opt-in alternatives (for the conformance suite)."""
    classes = list(BACKEND_CLASSES.values())
    for alternatives in _ALTERNATIVES.values():
        classes += [cls for cls in alternatives.values() if cls not in classes]
    return tuple(classes)


def _known_names() -> str:
    types = sorted(set(BACKEND_CLASSES) | {t for t, alternatives in _ALTERNATIVES.items() if alternatives})
    listed = []
    for t in types:
        names = [n + (" (default)" if i == 0 else "") for i, n in enumerate(backend_names(t)) if n != TorchBackend.name]
        listed.append(f"{t}: {', '.join(names)}")
    return "; ".join(listed + [f"every device type: {TorchBackend.name}"])


def select_backend(name: str | None, device_type: str | None = None) -> None:
    """Pick the backend called ``name`` for ``device_type`` (None: for every device type that has one
    of that name, as ``PACA_BACKEND=name`` does); a choice made here wins over ``$PACA_BACKEND``.

    ``name=None`` forgets the choice (for ``device_type``, or every choice when it is None too), so
    ``$PACA_BACKEND`` — read again — or the defaults serve. Takes effect for the next :func:`get_backend`.
    """
    if name is None:
        if device_type is None:
            _SELECTED.clear()
        else:
            _SELECTED.pop(device_type, None)
    else:
        name = name.strip()
        if device_type is not None and name not in backend_names(device_type):
            raise ValueError(f"No backend {name!r} for {device_type!r}; it has: {', '.join(backend_names(device_type))}.")
        if device_type is None and not _exists(name):
            raise ValueError(f"No registered backend is called {name!r}; registered: {_known_names()}.")
        _SELECTED[device_type] = name
    _INSTANCES.clear()


def _exists(name: str) -> bool:
    return name == TorchBackend.name or any(
        name in backend_names(t) for t in set(BACKEND_CLASSES) | set(_ALTERNATIVES)
    )


def _environment_choice(device_type: str) -> tuple[str | None, bool]:
    """``(name, for_this_type)`` from ``$PACA_BACKEND``; ``for_this_type``: a ``TYPE=NAME`` entry."""
    anywhere = None
    for entry in os.environ.get(ENV_VAR, "").split(","):
        kind, sep, value = entry.partition("=")
        if sep and kind.strip().lower() == device_type and value.strip():
            return value.strip(), True
        if not sep and entry.strip():
            anywhere = entry.strip()
    return anywhere, False


def _backend_class(device_type: str) -> type[Backend] | None:
    """The class to serve ``device_type`` with (None: the portable backend), after the user's choice."""
    default = BACKEND_CLASSES.get(device_type)
    if device_type in _SELECTED:
        name, for_this_type, source = _SELECTED[device_type], True, f"select_backend(..., {device_type!r})"
    elif None in _SELECTED:
        name, for_this_type, source = _SELECTED[None], False, "select_backend"
    else:
        name, for_this_type = _environment_choice(device_type)
        source = f"${ENV_VAR}"
    if name is None or (default is not None and name == default.name):
        return default
    if name == TorchBackend.name:
        chosen: type[Backend] | None = None
    elif name in _ALTERNATIVES.get(device_type, {}):
        chosen = _ALTERNATIVES[device_type][name]
    elif for_this_type:
        raise ValueError(f"{source} picks backend {name!r} for {device_type}, which has: {', '.join(backend_names(device_type))}.")
    elif not _exists(name):
        raise ValueError(f"{source} names backend {name!r}, which is not registered; registered: {_known_names()}.")
    else:
        return default  # the name belongs to another device type's backends
    logger.info("Backend for %s: %s (picked by %s; default %s)", device_type, name, source, backend_names(device_type)[0])
    return chosen


def overridden_primitives(backend_cls: type[Backend]) -> tuple[str, ...]:
    """The primitives ``backend_cls`` runs with its own code rather than :class:`TorchBackend`'s."""
    return tuple(
        sorted(name for name in Backend.__abstractmethods__ if getattr(backend_cls, name) is not getattr(TorchBackend, name))
    )


def get_backend(device: torch.device | str) -> Backend:
    """The backend serving ``device``'s type, one cached instance per type.

    A string naming a device with a runtime (``auto``, ``cuda:1``) is resolved first, so a missing
    device is explained; any other device type torch supports gets the portable backend. The user's
    pick (:func:`select_backend`, ``$PACA_BACKEND``) is applied when a type is first served.
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
        backend_cls = _backend_class(device_type)
        backend = backend_cls() if backend_cls is not None else TorchBackend(device_type)
        _INSTANCES[device_type] = backend
    return backend
