"""The per-device runtime interface: what a device type can tell and do, independent of kernels."""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch


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


class DeviceRuntime(ABC):
    """One device type (cpu, cuda, hpu). Implementations import vendor packages lazily."""

    type: str = ""
    #: Graph modes this device can run, first one is the default.
    graph_modes: tuple[str, ...] = ("eager",)
    #: The dtype models train in by default here (``--dtype auto``).
    default_dtype: torch.dtype = torch.float32

    @abstractmethod
    def is_available(self) -> bool:
        """Whether the device type can be used in this process (never raises)."""

    @abstractmethod
    def device_count(self) -> int:
        """Number of devices of this type (0 when unavailable)."""

    def unavailable_reason(self) -> str:
        """A sentence telling the user why the device is missing and what to do."""
        return f"No {self.type} device is available."

    @abstractmethod
    def memory_stats(self, device: torch.device) -> MemoryStats:
        """Current and peak memory of ``device``."""

    @abstractmethod
    def reset_peak_memory_stats(self, device: torch.device) -> None:
        """Start a new peak-memory window for ``device``."""

    def synchronize(self, device: torch.device) -> None:
        """Wait for all queued work on ``device``; a no-op on synchronous devices."""

    def step_boundary(self) -> None:
        """Mark the end of a graph segment (HPU lazy mode); a no-op elsewhere."""

    def prepare(self) -> None:
        """Import and initialise vendor software; called once when the device is resolved."""
