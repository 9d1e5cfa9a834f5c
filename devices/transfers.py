"""Host <-> device copies that overlap compute (MEFT's rows, activation offload).

Written once on the runtime's stream, event and pinning facilities: each copy runs on a side
stream (one per runtime and device), ordered against the current stream by events. Where device
memory is host memory (``runtime.shares_host_memory``, CPU) nothing is copied and the copies are free.
"""
from __future__ import annotations

import weakref
from typing import Any, Callable, Sequence

from ._torch import torch

from .registry import runtime_for
from .runtime import DeviceRuntime

#: runtime -> {device: side stream for copies}; weak, so a replaced runtime takes its streams along.
_COPY_STREAMS: "weakref.WeakKeyDictionary[DeviceRuntime, dict[torch.device, Any]]" = weakref.WeakKeyDictionary()


class Transfer:
    """A copy in flight. ``wait()`` returns its destination once it may be used."""

    def __init__(self, result: torch.Tensor, wait_fn: Callable[[], None] | None = None, nbytes: int = 0):
        self._result = result
        self._wait_fn = wait_fn
        #: Bytes that crossed between host and device (0 when nothing was copied).
        self.nbytes = nbytes

    def wait(self) -> torch.Tensor:
        if self._wait_fn is not None:
            self._wait_fn()
            self._wait_fn = None
        return self._result


def _copy_stream(runtime: DeviceRuntime, device: torch.device) -> Any:
    streams = _COPY_STREAMS.setdefault(runtime, {})
    stream = streams.get(device)
    if stream is None:
        stream = streams[device] = runtime.new_stream(device)
    return stream


def host_tensor(shape: Sequence[int], dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """A zeroed host tensor that ``device`` copies from and to asynchronously (page-locked where the
    runtime supports it, so the copies can overlap compute)."""
    return runtime_for(torch.device(device)).pin_memory(torch.zeros(tuple(shape), dtype=dtype))


def copy_to_device(host: torch.Tensor, device: torch.device | str) -> Transfer:
    """Start copying ``host`` to ``device`` on the side stream; ``.wait()`` makes the current stream
    wait for the copy and returns the device tensor. Free (no copy, ``nbytes == 0``) where device
    memory is host memory."""
    device = torch.device(device)
    runtime = runtime_for(device)
    if runtime.shares_host_memory:
        return Transfer(host)
    main = runtime.current_stream(device)
    stream = _copy_stream(runtime, device)
    with runtime.stream_context(stream):
        moved = host.to(device, non_blocking=True)
        done = stream.record_event()

    def wait() -> None:
        main.wait_event(done)
        runtime.record_stream(moved, main)  # now used on the main stream: keep it alive for that work

    return Transfer(moved, wait, nbytes=host.numel() * host.element_size())


def copy_to_host(tensor: torch.Tensor, out: torch.Tensor | None = None) -> Transfer:
    """Start copying a device tensor into host memory (into ``out`` when given) after the work that
    produced it; ``.wait()`` blocks the host until the bytes are there and returns the host tensor.
    Where device memory is host memory, ``tensor`` itself is the result (or is copied into ``out``)."""
    device = tensor.device
    runtime = runtime_for(device)
    if runtime.shares_host_memory:
        if out is None:
            return Transfer(tensor)
        out.copy_(tensor)
        return Transfer(out)
    stream = _copy_stream(runtime, device)
    stream.wait_stream(runtime.current_stream(device))  # copy only what the current stream has produced
    if out is None:
        out = host_tensor(tensor.shape, tensor.dtype, device)
    with runtime.stream_context(stream):
        out.copy_(tensor, non_blocking=True)
        done = stream.record_event()
    runtime.record_stream(tensor, stream)  # the device memory stays alive until the copy ran
    return Transfer(out, done.synchronize, nbytes=tensor.numel() * tensor.element_size())
