"""The per-device runtime interface: what a device type can tell and do, independent of kernels."""
from __future__ import annotations

import contextlib
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ContextManager, Iterable

from ._torch import TorchDtype, torch


class DeviceUnavailableError(RuntimeError):
    """Raised when a requested device cannot be used; the message says what to do."""


class InvalidDeviceError(ValueError):
    """Raised for a device string we cannot parse; the message lists the valid ones."""


@dataclass(frozen=True)
class MemoryStats:
    """Memory figures of one device, in bytes.

    ``peak_bytes`` is the high-water mark since the last reset: allocator peak on accelerators,
    the process's peak resident set size on CPU (which also counts Python and libraries).
    """

    device: str
    current_bytes: int
    peak_bytes: int
    total_bytes: int | None
    source: str

    def as_dict(self) -> dict:
        return {
            "device": self.device,
            "current_bytes": self.current_bytes,
            "peak_bytes": self.peak_bytes,
            "total_bytes": self.total_bytes,
            "source": self.source,
        }


@dataclass(frozen=True)
class GraphMode:
    """One way a device can execute the model; runtimes list the ones they support in ``graph_modes``.

    The flags say what :mod:`devices.graph_modes` must do with it, so that module never asks which
    device it is talking to.
    """

    name: str
    #: Shown in ``--graph-mode`` help.
    help: str = ""
    #: Traced with ``torch.compile(backend=runtime.compile_backend)``.
    compiled: bool = False
    #: Recorded once and replayed: applied by ``runtime.capture_graphs``.
    captured: bool = False
    #: Runs only while the device's lazy mode is on (``runtime.lazy_mode()``); other modes need it off.
    needs_lazy: bool = False
    #: Replays read and write gradient tensors by address: zero them in place, never free them.
    keeps_grad_buffers: bool = False


@dataclass(frozen=True)
class DtypeChoice:
    """The dtype a device trains in when the user does not choose (``--dtype auto``), and the sentence saying why
    (logged, and written to metrics.json as ``dtype_reason``)."""

    dtype: torch.dtype
    reason: str

    @property
    def name(self) -> str:
        """The ``--dtype`` spelling: ``bf16``, ``fp16``, ``fp32`` (else torch's name)."""
        full = str(self.dtype).replace("torch.", "")
        return {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}.get(full, full)


EAGER = GraphMode("eager", "op by op")
COMPILE = GraphMode("compile", "torch.compile", compiled=True)


class DeviceRuntime(ABC):
    """One device type (cpu, cuda, hpu, ...): everything paca-hal needs to know about it, declared here.

    Register an instance with :func:`devices.register_runtime`; ``--device`` parsing and help,
    ``auto``, ``DEVICE_CHOICES``, graph modes and transfers all follow from these declarations (and
    ``backends.get_backend`` serves the type, with the portable backend unless one is registered).
    Implementations import vendor packages lazily (never at module import).
    """

    #: The torch device type this runtime serves. ``torch.device(name)`` must parse once :meth:`prepare`
    #: ran (a plug-in may make the type there, e.g. with ``torch.utils.rename_privateuse1_backend``);
    #: resolving the device checks it, and that torch can put tensors there.
    name: str = ""
    #: Preference of ``auto`` (highest available wins); None: ``auto`` never picks this device.
    auto_priority: int | None = None
    #: Whether specs take an index (``cuda:1``); a device without one accepts only ``name`` (or ``name:0``).
    indexed: bool = True
    #: Graph modes this device can run (see :class:`GraphMode`).
    graph_modes: tuple[GraphMode, ...] = (EAGER,)
    #: ``torch.compile`` backend for graph mode ``compile``.
    compile_backend: str = "inductor"
    #: The dtype models train in by default here (``--dtype auto``), where :meth:`preferred_dtype` is not overridden
    #: to decide from what the hardware can do (the CPU runtime does: bf16 only with native bf16 matmul).
    default_dtype: torch.dtype = TorchDtype("float32")
    #: torch.distributed backend for collectives between processes on this device type.
    distributed_backend: str = "gloo"

    #: True where "device memory" is host memory (CPU): no transfers, and peaks include the whole process.
    shares_host_memory: bool = False
    #: ``paca plan`` profiles of this device: a JSON document in ``devices/profiles.json``'s format (a path,
    #: or an ``importlib.resources`` file), whose profiles all have ``device_type == name``. None: the
    #: device has none beyond the shipped file's. Read only when profiles are asked for.
    profiles_file: Any = None

    def preferred_dtype(self) -> DtypeChoice:
        """What ``--dtype auto`` trains in on this device, and why. By default the declared :attr:`default_dtype`;
        a runtime whose answer depends on the hardware (CPU: native bf16 matmul or not) overrides this and decides
        once per process. Only the frozen base takes it: adapters and optimizer state stay fp32."""
        dtype = self.default_dtype
        return DtypeChoice(dtype, f"{DtypeChoice(dtype, '').name}: the {self.name} runtime's default")

    # --- graph modes --------------------------------------------------------------------------------

    def lazy_mode(self) -> bool | None:
        """Whether the device's lazy (deferred-graph) mode is on in this process; None: it has none."""
        return None

    def lazy_mode_requirement(self, enabled: bool) -> str:
        """What the user must set for lazy mode to be on (``enabled``) or off, for error messages."""
        return f"lazy mode {'on' if enabled else 'off'} on {self.name}"

    def default_graph_mode(self) -> str:
        """The mode ``--graph-mode auto`` picks: the first supported mode that the lazy setting allows."""
        lazy = bool(self.lazy_mode())
        for mode in self.graph_modes:
            if mode.needs_lazy == lazy:
                return mode.name
        return self.graph_modes[0].name

    def graph_mode_problem(self, mode: GraphMode) -> str | None:
        """Why ``mode`` cannot run in this process although the device supports it (None: it can)."""
        lazy = self.lazy_mode()
        if lazy is None or mode.needs_lazy == lazy:
            return None
        return f"Graph mode {mode.name!r} needs {self.lazy_mode_requirement(mode.needs_lazy)}."

    def device_name(self, device: torch.device) -> str:
        """A human-readable name of the device for reports."""
        return str(device)

    def describe(self, device: torch.device) -> dict[str, Any]:
        """What ``paca doctor`` reports about the device and the software that decides which kernels run: its
        name and torch's version here; a runtime adds its driver, toolkit and memory (CUDA, the Gaudi stack).
        Every value is plain JSON; a figure the runtime cannot read is None rather than an error."""
        return {"name": self.device_name(device), "torch": torch.__version__}

    def reserved_peak_bytes(self, device: torch.device) -> int | None:
        """The caching allocator's peak reserved bytes since the last :meth:`reset_peak_memory_stats` (what
        the driver sees taken, above the allocated peak); None where the device has no such figure."""
        return None

    def ddp_device_ids(self, device: torch.device) -> list[int] | None:
        """``device_ids`` for DistributedDataParallel (None: the module's own device)."""
        return None

    def rank_device(self, device: torch.device, local_rank: int) -> torch.device:
        """The device one process of a multi-process launch uses (``LOCAL_RANK`` = ``local_rank``)."""
        return device

    def prepare_distributed(self) -> None:
        """Whatever must happen before ``init_process_group`` (e.g. registering the backend)."""

    @abstractmethod
    def is_available(self) -> bool:
        """Whether the device type can be used in this process (never raises)."""

    @abstractmethod
    def device_count(self) -> int:
        """Number of devices of this type (0 when unavailable)."""

    def unavailable_reason(self) -> str:
        """A sentence telling the user why the device is missing and what to do."""
        return f"No {self.name} device is available."

    @abstractmethod
    def memory_stats(self, device: torch.device) -> MemoryStats:
        """Current and peak memory of ``device``."""

    def free_bytes(self, device: torch.device) -> int | None:
        """Bytes new allocations on ``device`` could still get now (what ``paca train --seq-len auto``
        plans against by default); None when the device cannot tell, so callers ask the user instead."""
        return None

    @abstractmethod
    def reset_peak_memory_stats(self, device: torch.device) -> None:
        """Start a new peak-memory window for ``device``."""

    def synchronize(self, device: torch.device) -> None:
        """Wait for all queued work on ``device``; a no-op on synchronous devices."""

    def step_boundary(self) -> None:
        """Mark the end of a graph segment (HPU lazy mode); a no-op elsewhere."""

    def prepare(self) -> None:
        """Import and initialise vendor software; called once when the device is resolved."""

    # --- streams and events: overlap host<->device copies with compute (MEFT offload) --------------
    # Synchronous devices (CPU) get HostStream/HostEvent: same methods as torch.cuda.Stream/Event,
    # nothing to wait for, so transfer code is written once with no device checks.

    def new_stream(self, device: torch.device | None = None) -> Any:
        """A new side stream on ``device`` (``None``: the current device)."""
        return HostStream()

    def current_stream(self, device: torch.device | None = None) -> Any:
        """The stream work is queued on now."""
        return _HOST_STREAM

    def stream_context(self, stream: Any) -> ContextManager:
        """``with runtime.stream_context(s):`` queues the enclosed work on ``s`` (``None``: no change)."""
        return contextlib.nullcontext(stream)

    def new_event(self, device: torch.device | None = None, enable_timing: bool = False) -> Any:
        """A new event (``record``, ``wait``, ``query``, ``synchronize``, ``elapsed_time``)."""
        return HostEvent(enable_timing=enable_timing)

    def record_stream(self, tensor: torch.Tensor, stream: Any) -> None:
        """Tell the caching allocator ``tensor`` is used on ``stream`` (so its memory is not reused early)."""

    def pin_memory_supported(self) -> bool:
        """Whether page-locked host memory exists for this device (fast, asynchronous host->device copies)."""
        return False

    def pin_memory(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` in page-locked host memory for this device, or ``tensor`` itself where none exists."""
        return tensor

    # --- optimizer step, gradient clipping, captured graphs ----------------------------------------

    def make_adamw(
        self,
        params: Iterable[Any],
        *,
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ) -> torch.optim.Optimizer:
        """AdamW in this device's fastest exact form; here torch's multi-tensor (``foreach``) kernel."""
        return torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, foreach=True)

    def clip_grad_norm(self, parameters: Iterable[torch.Tensor], max_norm: float) -> torch.Tensor:
        """Scale gradients so their global L2 norm is at most ``max_norm``; returns the norm before clipping."""
        return torch.nn.utils.clip_grad_norm_(list(parameters), max_norm)

    def capture_graphs(self, module: torch.nn.Module, training: bool, max_graphs: int | None = None) -> torch.nn.Module:
        """Record ``module``'s device work once and replay it (the runtime's ``captured`` graph mode)."""
        raise DeviceUnavailableError(f"Captured graphs are not available on {self.name}.")


class HostEvent:
    """Event of a synchronous device: work is finished when it is issued, so it is always complete.

    With ``enable_timing`` it keeps the host clock at ``record`` so ``elapsed_time`` (milliseconds)
    means the same as on CUDA and HPU.
    """

    def __init__(self, enable_timing: bool = False) -> None:
        self.enable_timing = enable_timing
        self._recorded_at: float | None = None

    def record(self, stream: Any = None) -> None:
        self._recorded_at = time.perf_counter()

    def wait(self, stream: Any = None) -> None:
        """Nothing queued can be pending on a synchronous device."""

    def query(self) -> bool:
        return True

    def synchronize(self) -> None:
        """Nothing queued can be pending on a synchronous device."""

    def elapsed_time(self, end_event: "HostEvent") -> float:
        if not (self.enable_timing and end_event.enable_timing):
            raise RuntimeError("Both events need enable_timing=True to measure elapsed time.")
        if self._recorded_at is None or end_event._recorded_at is None:
            raise RuntimeError("Record both events before asking for the elapsed time.")
        return (end_event._recorded_at - self._recorded_at) * 1000.0


class HostStream:
    """Stream of a synchronous device: work runs when issued, in program order."""

    def record_event(self, event: HostEvent | None = None) -> HostEvent:
        event = event if event is not None else HostEvent()
        event.record(self)
        return event

    def wait_event(self, event: HostEvent) -> None:
        event.wait(self)

    def wait_stream(self, stream: "HostStream") -> None:
        """Work issued earlier on any host stream is already done."""

    def query(self) -> bool:
        return True

    def synchronize(self) -> None:
        """Nothing queued can be pending on a synchronous device."""


_HOST_STREAM = HostStream()
