"""docs/ARCHITECTURE.md "How to add a device", followed literally, without editing any other file.

The toy device is ``xpu``: a type torch knows and this project has no runtime for. Its runtime is
declared here and registered with the one call; everything else must follow from that. No xpu
tensors are made (a CPU build of torch cannot); the portable backend it falls back to is run on CPU
tensors, which is the same code.
"""
import argparse

import pytest
import torch

import backends
import devices
from backends import TorchBackend
from devices import COMPILE, EAGER, DeviceRuntime, GraphMode, MemoryStats

from .conftest import backend_cases

TOY_LAZY = GraphMode("toy-lazy", "deferred graphs", needs_lazy=True)
TOY_GRAPHS = GraphMode("toy-graphs", "captured toy graphs", captured=True, keeps_grad_buffers=True)


class ToyRuntime(DeviceRuntime):
    """Step 1 of the recipe: one runtime class, all the device's facts declared on it."""

    name = "xpu"
    auto_priority = 100  # preferred over every built-in device
    graph_modes = (EAGER, COMPILE, TOY_LAZY, TOY_GRAPHS)
    compile_backend = "toy_compiler"
    default_dtype = torch.float16

    def __init__(self):
        self.lazy = False
        self.captured = []

    def is_available(self):
        return True

    def device_count(self):
        return 2

    def memory_stats(self, device):
        return MemoryStats(str(device), 1, 2, 3, "toy")

    def reset_peak_memory_stats(self, device):
        pass

    def lazy_mode(self):
        return self.lazy

    def lazy_mode_requirement(self, enabled):
        return f"TOY_LAZY={int(enabled)}"

    def capture_graphs(self, module, training, max_graphs=None):
        self.captured.append((module, training, max_graphs))
        return module


@pytest.fixture
def toy():
    runtime = devices.register_runtime(ToyRuntime())  # the one call
    try:
        yield runtime
    finally:
        devices.unregister_runtime("xpu")


def test_device_specs_auto_and_choices(toy):
    assert devices.resolve_device("xpu") == torch.device("xpu", 0)
    assert devices.resolve_device("XPU:1") == torch.device("xpu", 1)
    with pytest.raises(devices.DeviceUnavailableError, match="valid indices are 0..1"):
        devices.resolve_device("xpu:2")
    assert devices.resolve_device("auto") == torch.device("xpu", 0)
    assert devices.available_device_types()[0] == "xpu" and devices.auto_order()[0] == "xpu"
    assert devices.DEVICE_CHOICES[-2:] == ("xpu", "xpu:N")
    parser = devices.add_device_argument(argparse.ArgumentParser())
    assert parser.parse_args(["--device", "xpu:1"]).device == "xpu:1"
    help_text = " ".join(parser.format_help().split())
    assert "xpu, xpu:N" in help_text and "'auto' prefers xpu, then hpu, then cuda, then cpu" in help_text


def test_device_facts_come_from_the_runtime(toy):
    xpu = torch.device("xpu", 1)
    assert devices.memory_stats(xpu).source == "toy"
    assert devices.default_dtype(xpu) == torch.float16
    assert devices.runtime_for(xpu) is toy and not devices.shares_host_memory(xpu)


def test_graph_modes_follow_the_declarations(toy):
    xpu = torch.device("xpu", 0)
    assert {"toy-lazy", "toy-graphs"} <= set(devices.GRAPH_MODES)
    assert devices.resolve_graph_mode(xpu, "auto") == "eager"
    with pytest.raises(devices.DeviceUnavailableError, match="TOY_LAZY=1"):
        devices.resolve_graph_mode(xpu, "toy-lazy")
    toy.lazy = True
    assert devices.resolve_graph_mode(xpu, "auto") == "toy-lazy"
    with pytest.raises(devices.DeviceUnavailableError, match="TOY_LAZY=0"):
        devices.resolve_graph_mode(xpu, "compile")
    with pytest.raises(devices.DeviceUnavailableError, match="not available on xpu"):
        devices.resolve_graph_mode(xpu, "cuda-graphs")
    parser = devices.add_graph_mode_argument(argparse.ArgumentParser())
    assert parser.parse_args(["--graph-mode", "toy-graphs"]).graph_mode == "toy-graphs"
    assert "toy-lazy needs TOY_LAZY=1" in " ".join(parser.format_help().split())

    assert devices.compile_backend(xpu) == "toy_compiler"
    module = torch.nn.Linear(2, 2)
    compiled_with = []
    module.compile = lambda **options: compiled_with.append(options)
    devices.apply_graph_mode(module, xpu, "compile")
    assert compiled_with == [{"backend": "toy_compiler"}]
    devices.apply_graph_mode(module, xpu, "toy-graphs", training=True, max_graphs=3)
    assert toy.captured == [(module, True, 3)] and devices.graph_mode_of(module) == "toy-graphs"
    assert devices.keeps_grad_buffers("toy-graphs") and not devices.keeps_grad_buffers("toy-lazy")


def test_backend_falls_back_to_portable_then_takes_a_registered_override(toy):
    backend = backends.get_backend("xpu")
    assert type(backend) is TorchBackend and backend.device_type == "xpu"
    x, weight, idx = torch.randn(3, 8), torch.randn(4, 8), torch.tensor([1, 6])
    out, kept = backend.partial_connection_forward(x, weight, None, idx)  # portable code: device-agnostic
    torch.testing.assert_close(out, x @ weight.t())
    assert torch.equal(kept, x[:, idx])

    class ToyBackend(TorchBackend):  # step 2, only because it runs one primitive differently
        device_type = "xpu"
        name = "toy"

        def skinny_grad_fp32(self, a, b):
            return super().skinny_grad_fp32(a, b)

    backends.register_backend(ToyBackend)
    try:
        assert type(backends.get_backend(torch.device("xpu"))) is ToyBackend
        assert backends.overridden_primitives(ToyBackend) == ("skinny_grad_fp32",)
        # step 3: the conformance suite generates the cases itself
        ids = [case.id for case in backend_cases(["skinny_grad_fp32"])]
        assert "toy-kernels@cpu" in ids and "xpu" in ids
        assert "toy-kernels@cpu" not in [case.id for case in backend_cases(["compress"])]
    finally:
        backends.unregister_backend("xpu")
    assert type(backends.get_backend(torch.device("xpu"))) is TorchBackend


def test_unregistering_leaves_no_trace_and_explains(toy):
    devices.unregister_runtime("xpu")
    try:
        assert "xpu" not in devices.DEVICE_CHOICES and "toy-graphs" not in devices.GRAPH_MODES
        assert not devices.keeps_grad_buffers("toy-graphs")
        assert devices.resolve_device("auto").type != "xpu"
        with pytest.raises(devices.InvalidDeviceError, match="no runtime for it.*register_runtime"):
            devices.resolve_device("xpu")
    finally:
        devices.register_runtime(toy)  # the fixture unregisters it


def test_registration_is_checked():
    with pytest.raises(ValueError, match="already registered"):
        devices.register_runtime(devices.runtime_for("cpu").__class__())
    for bad in ("auto", "Xpu", "cuda:0", "warp"):
        runtime = ToyRuntime()
        runtime.name = bad
        with pytest.raises(ValueError):
            devices.register_runtime(runtime)
    assert "warp" not in devices.DEVICE_CHOICES
