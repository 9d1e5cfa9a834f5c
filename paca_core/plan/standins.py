"""Stand-ins that make a step traceable on fake tensors where the real code depends on values.

MEFT's host table picks each batch's rows from router scores (``unique``, ``bincount``, ``nonzero``):
shapes that depend on data. :class:`PlannedHostRows` replaces only those choices with the worst case
the layer allows — every one of the ``capacity`` buffer slots holds a distinct row, every selected row
gets an update — and marks the host's own work as host memory. What crosses to the device (the
``(2, capacity + 1, d)`` row buffer, the slot indices) and what the device computes keep their real
shapes and code paths, so the device bytes of a plan are those of a step whose row buffer is full.
"""
from __future__ import annotations

import torch

from ..layers.host_rows import HostRowTable, RowSelection
from .tracker import host_memory


class PlannedHostRows(HostRowTable):
    """A :class:`HostRowTable` whose data-dependent choices are fixed at the worst case (see module doc)."""

    def select(self, x: torch.Tensor, experts: torch.Tensor, gates: torch.Tensor, top_k: int, capacity: int) -> RowSelection:
        with host_memory():
            tokens = experts.shape[0]
            rows = torch.arange(capacity)
            slots = (torch.arange(tokens * top_k) % capacity).view(tokens, top_k)
            positions = torch.zeros(tokens, top_k, dtype=torch.int64)
            self._planned_rows = capacity
            return RowSelection(rows, slots, positions, capacity, 0)

    def gather(self, selection: RowSelection, capacity: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        with host_memory():
            host = super().gather(selection, capacity, dtype, device)
        on_device = torch.empty_like(host)  # the device copy of the buffer (one on a device with its own memory)
        on_device.copy_(host)
        return on_device

    def receive_gradients(self, rows: torch.Tensor, transfer) -> None:
        """The gradient buffer lands in host memory (on a device with its own memory the device copy is
        freed once the copy is done; on the traced CPU step the copy would be the device tensor itself)."""
        arriving = transfer.wait()
        with host_memory():
            host = torch.empty_like(arriving)
            host.copy_(arriving)
        super().receive_gradients(rows, _Arrived(host))

    def collect(self) -> None:
        with host_memory():
            super().collect()

    def touched_rows(self) -> torch.Tensor:
        return torch.arange(getattr(self, "_planned_rows", 0))

    def apply_update(self, lr: float, betas: tuple[float, float], eps: float, weight_decay: float) -> int:
        with host_memory():
            return super().apply_update(lr, betas, eps, weight_decay)


class _Arrived:
    """A finished device-to-host copy (what ``Transfer.wait()`` gives once the bytes are on the host)."""

    def __init__(self, tensor: torch.Tensor):
        self.tensor, self.nbytes = tensor, tensor.numel() * tensor.element_size()

    def wait(self) -> torch.Tensor:
        return self.tensor


def plan_host_tables(tables) -> None:
    """Swap each MEFT host table of a model built for planning to :class:`PlannedHostRows` (in place)."""
    for table in tables:
        table.__class__ = PlannedHostRows
