"""Stand-ins that make a step traceable on fake tensors where the real code depends on values, or
where the traced CPU step cannot show what a device with its own memory does.

MEFT's host table picks each batch's rows from router scores (``unique``, ``bincount``, ``nonzero``):
shapes that depend on data. :class:`PlannedHostRows` replaces only those choices with the worst case
the layer allows — every one of the ``capacity`` buffer slots holds a distinct row, every selected row
gets an update — and marks the host's own work as host memory. What crosses to the device (the
``(2, capacity + 1, d)`` row buffer, the slot indices) and what the device computes keep their real
shapes and code paths, so the device bytes of a plan are those of a step whose row buffer is full.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from devices import Transfer

from ..layers.host_rows import HostRowTable, RowSelection
from ..memory.offload import ActivationOffload, _Offloaded
from .tracker import active_tracker, host_memory


@contextlib.contextmanager
def unpacked_sequences() -> Iterator[None]:
    """Plan rows as ``paca train`` feeds them: one sequence per row (positions 0..S-1), not packed.

    Without a KV cache (gradient checkpointing turns it off) transformers asks whether the rows pack
    several sequences (``find_packed_sequence_indices``) with a host read; on fake tensors it cannot
    read and assumes they may, which builds a full attention mask instead of the causal kernel. Here the
    same check's ops run and the answer is the real one for such rows: not packed."""
    try:
        from transformers import masking_utils
    except ImportError:  # transformers without masking_utils has no such check
        yield
        return
    original = getattr(masking_utils, "find_packed_sequence_indices", None)
    if original is None:
        yield
        return

    def planned(position_ids: torch.Tensor):
        from torch._subclasses.fake_tensor import is_fake

        packed = original(position_ids)
        if packed is not None and is_fake(packed):
            (packed[:, -1] == 0).all()  # the check the real step runs (its answer read on the host)
            return None
        return packed

    masking_utils.find_packed_sequence_indices = planned
    try:
        yield
    finally:
        masking_utils.find_packed_sequence_indices = original


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
        super().receive_gradients(rows, Transfer(host, nbytes=host.numel() * host.element_size()))

    def collect(self) -> None:
        with host_memory():
            super().collect()

    def touched_rows(self) -> torch.Tensor:
        return torch.arange(getattr(self, "_planned_rows", 0))

    def apply_update(self, lr: float, betas: tuple[float, float], eps: float, weight_decay: float) -> int:
        with host_memory():
            return super().apply_update(lr, betas, eps, weight_decay)


def plan_host_tables(tables) -> None:
    """Swap each MEFT host table of a model built for planning to :class:`PlannedHostRows` (in place)."""
    for table in tables:
        table.__class__ = PlannedHostRows


class PlannedActivationOffload(ActivationOffload):
    """Activation offload as it runs on a device with its own memory, for the trace.

    On the traced CPU step ``devices.copy_to_host`` moves nothing (host and device memory are one), so
    the real offload would keep everything. Here each tensor the real code would offload is copied into
    host memory (the tracker's :func:`host_memory`) and comes back as a new device tensor when backward
    fetches it; which tensors move, when, and the one-module-ahead prefetch are the real code's.
    Tensors it keeps on the device are counted as saved-for-backward (its hooks replace the tracker's)."""

    @staticmethod
    def _storage_key(tensor: torch.Tensor) -> int:
        return id(tensor.untyped_storage())  # fake tensors have no data pointers

    def _keep(self, tensor: torch.Tensor) -> torch.Tensor:
        tracker = active_tracker()
        if tracker is not None:
            tracker.note_saved(tensor)
        return super()._keep(tensor)

    def _to_host(self, tensor: torch.Tensor) -> Transfer:
        with host_memory():
            host = torch.empty_like(tensor)
            host.copy_(tensor)
        return Transfer(host, nbytes=host.numel() * host.element_size())

    def _handle(self, to_host: Transfer, device: torch.device, group) -> _Offloaded:
        return _PlannedOffloaded(to_host, device, group)


class _PlannedOffloaded(_Offloaded):
    """Brought back as a new device tensor (on CPU ``copy_to_device`` would hand back the host tensor)."""

    def prefetch(self) -> None:
        if self._to_device is None:
            host = self.to_host.wait()
            on_device = torch.empty_like(host)
            on_device.copy_(host)
            self._to_device = Transfer(on_device, nbytes=host.numel() * host.element_size())
