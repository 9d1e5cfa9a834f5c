"""Streams, events and pinned memory: one API on every device (used by the MEFT offload transfers).

CPU runs the real host implementation; CUDA runs torch.cuda's when a GPU is present (skipped
otherwise). The HPU runtime is checked against a RECORDING STAND-IN for
``habana_frameworks.torch.hpu`` (the real module ships only in Intel's images): it records which
bridge calls the runtime makes, with the names and arguments of the bridge's streams.py/events.py.
"""
import sys
import time
import types

import pytest
import torch

import devices
from devices.hpu import HpuRuntime
from devices.runtime import HostEvent, HostStream


def _copy_on_side_stream(device: torch.device, host: torch.Tensor) -> torch.Tensor:
    """The transfer pattern the offload layer uses, written once for every device."""
    side = devices.new_stream(device)
    source = devices.pin_memory(host, device)
    with devices.stream_context(device, side):
        moved = source.to(device, non_blocking=True)
        ready = side.record_event()
    main = devices.current_stream(device)
    main.wait_event(ready)
    devices.record_stream(moved, main)
    return moved * 2


def test_cpu_transfer_pattern_and_host_objects():
    cpu = torch.device("cpu")
    host = torch.arange(12.0).reshape(3, 4)
    torch.testing.assert_close(_copy_on_side_stream(cpu, host), host * 2)
    assert isinstance(devices.new_stream(cpu), HostStream)
    assert isinstance(devices.current_stream(cpu), HostStream)
    assert devices.current_stream(cpu) is devices.current_stream("cpu")  # one default stream
    assert devices.pin_memory_supported(cpu) is False
    assert devices.pin_memory(host, cpu) is host
    with devices.stream_context(cpu, None) as entered:
        assert entered is None


def test_host_event_times_with_the_host_clock():
    start, end = devices.new_event("cpu", enable_timing=True), devices.new_event("cpu", enable_timing=True)
    assert isinstance(start, HostEvent) and start.query()
    start.record()
    time.sleep(0.02)
    end.record()
    assert 15.0 <= start.elapsed_time(end) < 2000.0
    stream = devices.new_stream("cpu")
    recorded = stream.record_event()
    assert recorded.query()
    stream.wait_stream(devices.current_stream("cpu"))
    stream.synchronize()


def test_host_event_errors_say_what_is_missing():
    untimed, timed = HostEvent(), HostEvent(enable_timing=True)
    with pytest.raises(RuntimeError, match="enable_timing"):
        untimed.elapsed_time(timed)
    with pytest.raises(RuntimeError, match="Record both"):
        timed.elapsed_time(HostEvent(enable_timing=True))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_streams_events_and_pinning():
    cuda = torch.device("cuda")
    host = torch.randn(256, 256)
    assert devices.pin_memory_supported(cuda)
    assert devices.pin_memory(host, cuda).is_pinned()
    assert isinstance(devices.new_stream(cuda), torch.cuda.Stream)
    result = _copy_on_side_stream(cuda, host)
    torch.testing.assert_close(result.cpu(), host * 2)
    start, end = devices.new_event(cuda, enable_timing=True), devices.new_event(cuda, enable_timing=True)
    start.record()
    (result @ result).sum()
    end.record()
    end.synchronize()
    assert start.elapsed_time(end) >= 0


class RecordingHabanaHpu(types.ModuleType):
    """Stand-in for ``habana_frameworks.torch.hpu``: records Stream/Event/stream/current_stream calls."""

    def __init__(self, calls):
        super().__init__("habana_frameworks.torch.hpu")
        self.calls = calls
        outer = self

        class Stream:
            def __init__(self, device=None, priority=0):
                outer.calls.append(("Stream", device, priority))

        class Event:
            def __init__(self, enable_timing=False):
                outer.calls.append(("Event", enable_timing))

        self.Stream, self.Event = Stream, Event
        self._current = Stream()
        calls.clear()

    def current_stream(self):
        self.calls.append(("current_stream",))
        return self._current

    def stream(self, stream):
        self.calls.append(("stream", stream))

        class _Context:
            def __enter__(self_inner):
                self.calls.append(("enter", stream))

            def __exit__(self_inner, *exc):
                self.calls.append(("exit", stream))

        return _Context()


@pytest.fixture
def hpu_with_stand_in(monkeypatch):
    calls: list = []
    stand_in = RecordingHabanaHpu(calls)
    monkeypatch.setitem(sys.modules, "habana_frameworks.torch.hpu", stand_in)
    runtime = HpuRuntime()
    runtime._core = types.SimpleNamespace(mark_step=lambda **kw: None)  # already "prepared"
    return runtime, calls


def test_hpu_runtime_uses_the_bridge_stream_api(hpu_with_stand_in):
    runtime, calls = hpu_with_stand_in
    side = runtime.new_stream(torch.device("hpu"))
    assert calls == [("Stream", None, 0)]  # one card per process: the bridge ignores the index
    event = runtime.new_event(enable_timing=True)
    current = runtime.current_stream()
    with runtime.stream_context(side):
        pass
    assert calls[1:] == [("Event", True), ("current_stream",), ("stream", side), ("enter", side), ("exit", side)]
    assert isinstance(event, sys.modules["habana_frameworks.torch.hpu"].Event) and current is not side


def test_hpu_pinning_follows_availability(hpu_with_stand_in, monkeypatch):
    runtime, _ = hpu_with_stand_in
    host = torch.ones(4)
    monkeypatch.setattr(runtime, "is_available", lambda: False)
    assert runtime.pin_memory_supported() is False and runtime.pin_memory(host) is host
    pinned_for = []
    monkeypatch.setattr(runtime, "is_available", lambda: True)
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self, device=None: pinned_for.append(device) or self)
    assert runtime.pin_memory_supported() is True
    runtime.pin_memory(host)
    assert pinned_for == [torch.device("hpu")]
