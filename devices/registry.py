"""The registered device runtimes, and everything derived from them: ``--device`` parsing, ``auto``,
``DEVICE_CHOICES`` and the device-dispatching helpers (memory stats, streams, optimizers, ...).

A device is known here only through :func:`register_runtime`, called by the package (the built-in
runtimes), by the user's code, or for the runtimes other distributions declare in the
``paca_hal.devices`` entry-point group (read once, the first time the registered runtimes are read).
Nothing in this file names a device, and nothing here imports vendor software at import time.
"""
from __future__ import annotations

import argparse
import logging
import os
import re
import types
from typing import Any, ContextManager, Iterable

from ._torch import torch

from .runtime import DeviceRuntime, DeviceUnavailableError, DtypeChoice, InvalidDeviceError, MemoryStats

logger = logging.getLogger(__name__)

ENV_VAR = "PACA_DEVICE"
#: importlib.metadata entry-point group naming device runtimes defined in other distributions. Each entry
#: point (named after its device type) names a DeviceRuntime subclass or instance (registered when
#: loaded) or a module that registers its runtime on import.
ENTRY_POINT_GROUP = "paca_hal.devices"

#: name -> runtime, in registration order (the order ``DEVICE_CHOICES`` lists them).
_RUNTIMES: dict[str, DeviceRuntime] = {}
_SPEC = re.compile(r"^(?P<type>[a-z][a-z0-9_]*)(?::(?P<index>\d+))?$")
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
_entry_points_loaded = False
#: entry-point name -> why that plug-in failed to load (told when its device is asked for).
_BROKEN_ENTRY_POINTS: dict[str, str] = {}


def register_runtime(runtime: DeviceRuntime, *, replace: bool = False) -> DeviceRuntime:
    """Make ``runtime``'s device usable everywhere (``--device``, ``auto``, graph modes, backends).

    ``runtime.name`` must look like a device type (lower case, no index). Torch need not know it yet:
    a plug-in may create the type in ``prepare()``, so :func:`resolve_device` checks it then.
    Registering a name twice is an error unless ``replace`` is set. Returns ``runtime``.
    """
    if not isinstance(runtime, DeviceRuntime):
        raise TypeError(f"register_runtime takes a DeviceRuntime instance, got {type(runtime).__name__}.")
    name = runtime.name
    if name == "auto" or not _NAME.match(name or ""):
        raise ValueError(f"A device runtime needs a lower-case device type as its name, got {name!r}.")
    if name in _RUNTIMES and not replace:
        raise ValueError(f"A runtime for {name!r} is already registered; pass replace=True to swap it.")
    _RUNTIMES[name] = runtime
    _BROKEN_ENTRY_POINTS.pop(name, None)
    return runtime


def load_entry_points() -> None:
    """Register the runtimes other distributions declare in the ``paca_hal.devices`` group (once).

    Called by every function that reads the registered runtimes, so an installed plug-in's device
    works with ``--device NAME`` and no launcher. A plug-in that fails to load is logged as one
    warning naming its distribution and entry point (the other devices still work), and asking for
    its device raises :class:`InvalidDeviceError` with the same sentence.
    """
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True  # first: a plug-in that reads the registry while loading must not recurse
    from importlib.metadata import entry_points

    for entry_point in entry_points(group=ENTRY_POINT_GROUP):
        try:
            _register_entry_point(entry_point)
        except Exception as error:  # a broken plug-in must not break the other devices
            detail = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
            message = f"Device plug-in {_origin(entry_point)} failed to load: {detail}"
            _BROKEN_ENTRY_POINTS[entry_point.name] = message
            logger.warning("%s", message)


def _register_entry_point(entry_point: Any) -> None:
    loaded = entry_point.load()
    if isinstance(loaded, type) and issubclass(loaded, DeviceRuntime):
        loaded = loaded()
    if isinstance(loaded, DeviceRuntime):
        if _RUNTIMES.get(loaded.name) is not loaded:
            register_runtime(loaded)
    elif not isinstance(loaded, types.ModuleType):
        raise TypeError(
            f"it names a {type(loaded).__name__}; expected a DeviceRuntime subclass or instance, or a module that registers one"
        )


def _origin(entry_point: Any) -> str:
    """``entry point 'mydev' (mydev = pkg.mod:Runtime) of distribution paca-mydev 1.0``, for messages."""
    dist = getattr(entry_point, "dist", None)
    where = f"{entry_point.name!r} ({entry_point.name} = {entry_point.value})"
    if dist is None:
        return f"entry point {where}"
    return f"entry point {where} of distribution {dist.metadata['Name']} {dist.version}"


def unregister_runtime(name: str) -> DeviceRuntime:
    """Forget the runtime of device type ``name`` (tests, plug-ins); returns it."""
    try:
        return _RUNTIMES.pop(name)
    except KeyError:
        raise KeyError(f"No runtime is registered for {name!r}.") from None


def registered_runtimes() -> tuple[DeviceRuntime, ...]:
    """Every registered runtime (entry points included), in registration order."""
    load_entry_points()
    return tuple(_RUNTIMES.values())


def auto_order() -> tuple[str, ...]:
    """Device types ``auto`` tries, most preferred first (runtimes with an ``auto_priority``)."""
    ranked = [r for r in registered_runtimes() if r.auto_priority is not None]
    return tuple(r.name for r in sorted(ranked, key=lambda r: -r.auto_priority))


def device_choices() -> tuple[str, ...]:
    """What ``--device`` accepts: ``auto`` and every registered type (``type:N`` where indexed)."""
    choices = ["auto"]
    for runtime in registered_runtimes():
        choices += [runtime.name, f"{runtime.name}:N"] if runtime.indexed else [runtime.name]
    return tuple(choices)


def __getattr__(name: str) -> Any:
    # DEVICE_CHOICES is derived from the registered runtimes on every access (PEP 562), so a runtime
    # registered later shows up in it too.
    if name == "DEVICE_CHOICES":
        return device_choices()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _type_of(device: torch.device | str) -> str:
    if isinstance(device, torch.device):
        return device.type
    match = _SPEC.match(str(device).strip().lower())
    return match.group("type") if match else torch.device(device).type


def _lookup(device_type: str) -> DeviceRuntime | None:
    runtime = _RUNTIMES.get(device_type)
    if runtime is None and not _entry_points_loaded:
        load_entry_points()
        runtime = _RUNTIMES.get(device_type)
    return runtime


def runtime_for(device: torch.device | str) -> DeviceRuntime:
    """The runtime object of a device type; raises for types without a registered runtime."""
    device_type = _type_of(device)
    runtime = _lookup(device_type)
    if runtime is None:
        broken = _BROKEN_ENTRY_POINTS.get(device_type)
        raise InvalidDeviceError(
            (f"{broken}; " if broken else f"Device type {device_type!r} is not supported; ")
            + f"valid devices: {', '.join(device_choices())}."
        )
    return runtime


def resolve_device(spec: str | torch.device | None = None) -> torch.device:
    """Turn ``auto`` or ``type[:N]`` (or ``$PACA_DEVICE`` when ``spec`` is None) into a usable device.

    ``auto`` takes the available runtime with the highest ``auto_priority`` (hpu, then cuda, then
    cpu for the built-in ones) that torch can use, and logs what it chose. Explicit requests for a
    missing device raise :class:`DeviceUnavailableError` with what to do, never fall back silently; so
    does a registered device torch cannot put tensors on (checked with torch's own API, after the
    runtime's ``prepare()``), instead of a torch assertion at the first ``model.to``.
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
            runtime = _RUNTIMES[candidate]
            if not runtime.is_available():
                continue
            try:
                device = _finish(runtime, None)
            except (DeviceUnavailableError, InvalidDeviceError) as error:  # e.g. torch cannot use it here
                logger.info("auto: skipping %s: %s", candidate, error)
                continue
            logger.info("Selected device %s (auto detect)", device)
            return device
        raise DeviceUnavailableError(f"'auto' found no available device among {', '.join(auto_order()) or 'none'}.")
    runtime = _lookup(device_type)
    if runtime is None:
        if device_type in _BROKEN_ENTRY_POINTS:
            raise InvalidDeviceError(f"{_BROKEN_ENTRY_POINTS[device_type]}; valid devices: {valid}.")
        if _torch_knows(device_type):
            raise InvalidDeviceError(
                f"PyTorch knows device type {device_type!r} (from {source}), but paca-hal has no runtime for it; "
                f"valid devices: {valid}. To add one, register a DeviceRuntime with devices.register_runtime or "
                f"a {ENTRY_POINT_GROUP!r} entry point (docs/ARCHITECTURE.md, 'How to add a device')."
            )
        raise InvalidDeviceError(f"Unknown device {spec!r} (from {source}); valid devices: {valid} (N is a device index).")
    return _finish(runtime, None if index is None else int(index))


def _torch_knows(device_type: str) -> bool:
    try:
        torch.device(device_type)
    except RuntimeError:
        return False
    return True


def _torch_device_module(device_type: str) -> Any:
    """``torch.<device_type>`` as torch itself finds it (``torch.get_device_module``), or None."""
    get_device_module = getattr(torch, "get_device_module", None)
    if get_device_module is None:  # older torch: the same lookup by hand
        return getattr(torch, device_type, None)
    try:
        return get_device_module(device_type)
    except RuntimeError:
        return None


def _check_torch_serves(runtime: DeviceRuntime) -> None:
    """Refuse, in one sentence, a registered device that torch cannot put tensors on in this process.

    Asked of torch itself after ``runtime.prepare()``: the type must parse (``torch.device``) and, where
    torch has a device module for it, that module's ``is_available()`` must hold. Without this, the
    first ``model.to(device)`` fails deep inside torch (``AssertionError: Torch not compiled with ...``).
    """
    name = runtime.name
    if not _torch_knows(name):
        raise InvalidDeviceError(
            f"PyTorch does not know device type {name!r}, although a paca-hal runtime is registered for it "
            f"({type(runtime).__module__}.{type(runtime).__qualname__}): the device's package must make the type "
            "(e.g. torch.utils.rename_privateuse1_backend) on import or in the runtime's prepare()."
        )
    module = _torch_device_module(name)
    is_available = getattr(module, "is_available", None)
    if not callable(is_available):
        return  # torch keeps no device module for this type: nothing more to ask it
    try:
        usable, detail = bool(is_available()), ""
    except Exception as error:  # a device module that cannot even answer cannot place tensors either
        usable, detail = False, f" ({type(error).__name__}: {error})"
    if not usable:
        raise DeviceUnavailableError(
            f"PyTorch cannot put tensors on {name!r} in this process: torch.{name}.is_available() is False{detail} "
            f"(this PyTorch build or the device's plug-in lacks it), although paca-hal's {name} runtime reports the device."
        )


def _finish(runtime: DeviceRuntime, index: int | None) -> torch.device:
    if not runtime.is_available():
        raise DeviceUnavailableError(runtime.unavailable_reason())
    runtime.prepare()
    _check_torch_serves(runtime)
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
    ranked = auto_order()  # loads the entry points
    names = list(ranked) + [name for name in _RUNTIMES if name not in ranked]
    return [name for name in names if _RUNTIMES[name].is_available()]


def default_dtype(device: torch.device | str) -> torch.dtype:
    """The dtype to train in on ``device`` when the user does not choose: bf16 on accelerators; on CPU bf16 where it
    multiplies bf16 natively (AVX512-BF16/AMX), else fp32. :func:`default_dtype_choice` also says why."""
    return default_dtype_choice(device).dtype


def default_dtype_choice(device: torch.device | str) -> DtypeChoice:
    """``--dtype auto`` on ``device``: the runtime's :meth:`~DeviceRuntime.preferred_dtype` (dtype and reason)."""
    return runtime_for(torch.device(device)).preferred_dtype()


def shares_host_memory(device: torch.device | str) -> bool:
    """Whether ``device``'s memory is host memory (CPU): copies there are free and peaks count the
    whole process. Device types without a registered runtime are taken to have their own memory."""
    runtime = _lookup(_type_of(device))
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
