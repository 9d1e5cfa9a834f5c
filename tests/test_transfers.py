"""Host <-> device transfers (devices/transfers.py) where they are not no-ops.

CPU shares host memory, so there its copies are free. A RECORDING STAND-IN runtime for a device with
its own memory replaces the CPU runtime here: tensors stay CPU tensors (so the copies run), while
every stream, event, pinning and ``record_stream`` call is logged. The tests check the protocol the
CUDA and HPU runtimes rely on — copy on a side stream, ordered by events, memory kept alive — and
that activation offload and MEFT give the same results through it. On a real GPU the same code runs
against torch.cuda (skipped without one).
"""
import contextlib

import pytest
import torch

import devices
from devices.cpu import CpuRuntime
from paca_core import LoRAConfig, MEFTConfig, prepare_model
from paca_core.memory.offload import offload_activations

from .conftest import tiny_llama


class RecordingEvent:
    def __init__(self, log, stream):
        self.log, self.stream = log, stream
        log.append(("record_event", stream.name))

    def synchronize(self):
        self.log.append(("event.synchronize", self.stream.name))


class RecordingStream:
    def __init__(self, log, name):
        self.log, self.name = log, name

    def record_event(self):
        return RecordingEvent(self.log, self)

    def wait_event(self, event):
        self.log.append(("wait_event", self.name, event.stream.name))

    def wait_stream(self, other):
        self.log.append(("wait_stream", self.name, other.name))


class SeparateMemoryRuntime(CpuRuntime):
    """A CPU runtime that claims its own device memory, and records what the transfers ask of it."""

    shares_host_memory = False

    def __init__(self):
        self.log = []
        self.main = RecordingStream(self.log, "main")
        self.side_streams = 0

    def new_stream(self, device=None):
        self.side_streams += 1
        self.log.append(("new_stream", str(device)))
        return RecordingStream(self.log, f"side{self.side_streams}")

    def current_stream(self, device=None):
        return self.main

    def stream_context(self, stream):
        @contextlib.contextmanager
        def context():
            self.log.append(("enter", stream.name))
            yield stream
            self.log.append(("exit", stream.name))

        return context()

    def record_stream(self, tensor, stream):
        self.log.append(("record_stream", stream.name, tuple(tensor.shape)))

    def pin_memory_supported(self):
        return True

    def pin_memory(self, tensor):
        self.log.append(("pin", tuple(tensor.shape)))
        return tensor


@pytest.fixture
def separate_memory():
    original = devices.runtime_for("cpu")
    runtime = devices.register_runtime(SeparateMemoryRuntime(), replace=True)
    try:
        yield runtime
    finally:
        devices.register_runtime(original, replace=True)


def test_host_tensor_is_zeroed_and_pinned_for_the_device(separate_memory):
    host = devices.host_tensor((3, 4), torch.bfloat16, "cpu")
    assert host.shape == (3, 4) and host.dtype == torch.bfloat16 and not host.any()
    assert separate_memory.log == [("pin", (3, 4))]


def test_copy_to_device_runs_on_a_side_stream_and_orders_the_main_stream_on_wait(separate_memory):
    log = separate_memory.log
    host = torch.arange(12.0).reshape(3, 4)
    transfer = devices.copy_to_device(host, "cpu")
    assert transfer.nbytes == 48
    assert log == [("new_stream", "cpu"), ("enter", "side1"), ("record_event", "side1"), ("exit", "side1")]
    moved = transfer.wait()
    assert log[4:] == [("wait_event", "main", "side1"), ("record_stream", "main", (3, 4))]
    assert torch.equal(moved, host)
    assert transfer.wait() is moved and len(log) == 6  # waiting twice orders nothing twice
    devices.copy_to_device(host, "cpu")
    assert separate_memory.side_streams == 1  # one copy stream per device, reused


def test_copy_to_host_waits_for_the_producer_and_keeps_device_memory_alive(separate_memory):
    log = separate_memory.log
    source = torch.randn(5, 2)
    transfer = devices.copy_to_host(source)
    assert log == [
        ("new_stream", "cpu"),
        ("wait_stream", "side1", "main"),  # copy only what the current stream has produced
        ("pin", (5, 2)),  # a fresh page-locked host buffer
        ("enter", "side1"),
        ("record_event", "side1"),
        ("exit", "side1"),
        ("record_stream", "side1", (5, 2)),  # the source stays allocated until the copy ran
    ]
    assert transfer.nbytes == 40
    result = transfer.wait()
    assert log[-1] == ("event.synchronize", "side1")
    assert result is not source and torch.equal(result, source)  # a real copy
    out = torch.empty(5, 2)
    assert devices.copy_to_host(source * 2, out=out).wait() is out and torch.equal(out, source * 2)


def test_a_device_sharing_host_memory_copies_nothing():
    host = devices.host_tensor((3, 4), torch.float32, "cpu")
    assert host.shape == (3, 4) and not host.any()
    moved = devices.copy_to_device(host, torch.device("cpu"))
    assert moved.wait() is host and moved.nbytes == 0
    out = torch.empty(3, 4)
    back = devices.copy_to_host(host + 1, out=out)
    assert back.wait() is out and back.nbytes == 0 and torch.equal(out, torch.ones(3, 4))


def _loss_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_activation_offload_through_real_transfers_is_exact(separate_memory):
    ids = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(0))
    model = prepare_model(tiny_llama(seed=0), LoRAConfig(r=4), device="cpu")
    reference = _loss_and_grads(model, ids)
    handle = offload_activations(model, "decoder-layers", min_bytes=1)
    loss, grads = _loss_and_grads(model, ids)
    assert handle.stats.offloaded_tensors > 0 and handle.stats.offloaded_bytes == handle.stats.reloaded_bytes
    assert {"wait_stream", "wait_event", "record_stream", "event.synchronize"} <= {entry[0] for entry in separate_memory.log}
    torch.testing.assert_close(loss, reference[0], rtol=0, atol=0)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, reference[1][name], rtol=0, atol=0, msg=name)


def test_meft_through_real_transfers_counts_bytes_and_matches(separate_memory):
    ids = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(1))
    config = MEFTConfig(num_rows=64, top_k=4, rows_per_step=32)
    crossing = prepare_model(tiny_llama(seed=0), config, device="cpu")
    loss = crossing(input_ids=ids, labels=ids).loss
    loss.backward()
    tables = [layer.table for layer in crossing.adapter_layers().values()]
    assert all(t.traffic["copied_to_device_bytes"] > 0 and t.traffic["copied_to_host_bytes"] > 0 for t in tables)
    devices.register_runtime(CpuRuntime(), replace=True)  # the same model on a device sharing host memory
    shared = prepare_model(tiny_llama(seed=0), config, device="cpu")
    torch.testing.assert_close(shared(input_ids=ids, labels=ids).loss, loss.detach(), rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_round_trip():
    host = devices.host_tensor((256, 64), torch.float32, "cuda")
    host.copy_(torch.randn(256, 64))
    assert host.is_pinned()
    to_device = devices.copy_to_device(host, "cuda")
    on_device = to_device.wait() * 2
    back = devices.copy_to_host(on_device)
    assert to_device.nbytes == back.nbytes == host.numel() * 4
    torch.testing.assert_close(back.wait(), host * 2)
