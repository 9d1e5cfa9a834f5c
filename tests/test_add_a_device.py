"""docs/ARCHITECTURE.md "How to add a device", followed literally from outside the package.

The device is ``mydev``, shipped as a user's pip package would ship it: a distribution (written into
``tmp_path``: its module, a profiles file and a ``.dist-info`` folder) that declares its runtime in the
``paca_hal.devices`` entry-point group. Nobody imports it or calls ``register_runtime``: a fresh Python
process with that folder on ``PYTHONPATH`` finds it through ``importlib.metadata`` and must then accept
``--device mydev``, resolve it, and put real tensors (and a module) on it.

``mydev`` is a real torch device type made without compiling anything: PyTorch's PrivateUse1 key,
renamed with ``torch.utils.rename_privateuse1_backend`` and given the few ``torch.library`` kernels a
tensor needs (``torch.utils.backend_registration._setup_privateuseone_for_python_backend``), its data
held by CPU tensors. The plug-in makes the type in its runtime's ``prepare()``, where a vendor import
would go. A process can rename PrivateUse1 once, so the recipe runs in its own process.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import devices
from devices import DeviceRuntime, MemoryStats
from devices import registry as device_registry

from .plugin_dist import write_distribution
from .test_training import _train_flags

REPO = Path(__file__).resolve().parents[1]
PYTHON_PRIVATEUSE1 = hasattr(torch._C, "_acc") and hasattr(
    torch.utils.backend_registration, "_setup_privateuseone_for_python_backend"
)

# Steps 1 and 2 of the recipe, as the plug-in's own package.
PLUGIN = '''
    """paca-mydev: a device plug-in for paca-hal (the recipe in docs/ARCHITECTURE.md, outside the package)."""
    import os
    import pathlib

    import torch

    import backends
    from devices import COMPILE, EAGER, DeviceRuntime, GraphMode, MemoryStats

    NAME = "mydev"
    LAZY = GraphMode("mydev-lazy", "deferred graphs", needs_lazy=True)
    GRAPHS = GraphMode("mydev-graphs", "captured mydev graphs", captured=True, keeps_grad_buffers=True)
    CAPTURED = []
    _allocated = [0]  # bytes of mydev tensors made since the last peak reset


    class MyDevTensor(torch.Tensor):
        """A mydev tensor: torch's PrivateUse1 wrapper around the CPU tensor that holds its data."""

        __torch_function__ = torch._C._disabled_torch_function_impl

        @staticmethod
        def __new__(cls, raw):
            tensor = torch._C._acc.create_empty_tensor(raw.shape, raw.dtype)
            tensor.__class__ = cls
            return tensor

        def __init__(self, raw):
            self.raw = raw
            _allocated[0] += raw.numel() * raw.element_size()


    def _empty(size, dtype):
        return MyDevTensor(torch.empty(tuple(size), dtype=dtype or torch.get_default_dtype()))


    def _make_device_type():
        """What a vendor import does: make 'mydev' a torch device type with its kernels (once)."""
        if torch._C._get_privateuse1_backend_name() == NAME:
            return
        from torch.utils.backend_registration import _setup_privateuseone_for_python_backend

        _setup_privateuseone_for_python_backend(NAME)

        @torch.library.impl("aten::empty.memory_format", "privateuseone")
        def empty(size, *, dtype=None, layout=None, device=None, pin_memory=None, memory_format=None):
            return _empty(size, dtype)

        @torch.library.impl("aten::empty_strided", "privateuseone")
        def empty_strided(size, stride, *, dtype=None, layout=None, device=None, pin_memory=None):
            return _empty(size, dtype)

        @torch.library.impl("aten::_copy_from", "privateuseone")
        def copy_from(src, dst, non_blocking=False):
            data = src.raw if src.device.type == NAME else src
            if dst.device.type == NAME:
                dst.raw = data.to(dst.raw.dtype).clone()
            else:
                dst.copy_(data)
            return dst

        @torch.library.impl("aten::detach", "privateuseone")
        def detach(tensor):
            return MyDevTensor(tensor.raw)


    class MyDevRuntime(DeviceRuntime):
        name = NAME
        auto_priority = 100  # preferred over every built-in device
        graph_modes = (EAGER, COMPILE, LAZY, GRAPHS)
        compile_backend = "mydev_compiler"
        default_dtype = torch.float16
        profiles_file = pathlib.Path(__file__).with_name("profiles.json")

        def is_available(self):
            return True

        def device_count(self):
            return 1

        def prepare(self):
            _make_device_type()

        def memory_stats(self, device):
            return MemoryStats(str(device), _allocated[0], _allocated[0], None, "mydev allocator")

        def reset_peak_memory_stats(self, device):
            _allocated[0] = 0

        def lazy_mode(self):
            return os.environ.get("MYDEV_LAZY") == "1"

        def lazy_mode_requirement(self, enabled):
            return f"MYDEV_LAZY={int(enabled)}"

        def capture_graphs(self, module, training, max_graphs=None):
            CAPTURED.append((training, max_graphs))
            return module


    class MyDevFastBackend(backends.TorchBackend):
        """An opt-in kernel set for mydev (PACA_BACKEND=mydev-fast); the default stays the portable one."""

        device_type = NAME
        name = "mydev-fast"


    backends.register_backend(MyDevFastBackend, default=False)
'''

PROFILES = {
    "version": 1,
    "profiles": {
        "mydev-x1": {
            "description": "one mydev card",
            "device_type": "mydev",
            "memory_bytes": 16 * 2**30,
            "usable_fraction": 0.9,
            "runtime_reserve_bytes": 2**28,
            "matmul_flops": {"bf16": 1e14, "fp16": 1e14, "fp32": 1e13},
            "memory_bandwidth": 1e12,
            "launch_overhead_s": 1e-5,
            "fuse_elementwise": False,
            "fusion_rule": "eager: one kernel per op",
            "sources": {
                key: "assumption: a made-up test device"
                for key in ("memory_bytes", "usable_fraction", "runtime_reserve_bytes", "matmul_flops.bf16",
                            "matmul_flops.fp16", "matmul_flops.fp32", "memory_bandwidth", "launch_overhead_s")
            },
        }
    },
}

# What a user's process does: no launcher, no import of the plug-in, no register_runtime call.
USER = '''
    import argparse
    import importlib.metadata
    import json
    import sys

    reads = []
    real_entry_points = importlib.metadata.entry_points

    def counting_entry_points(**selection):
        reads.append(selection.get("group"))
        return real_entry_points(**selection)

    importlib.metadata.entry_points = counting_entry_points  # counts reads of the real metadata

    import torch

    import backends
    import devices
    from paca_core.cli.dispatch import main
    from tests.conftest import backend_cases

    out = {}
    parser = devices.add_device_argument(argparse.ArgumentParser())
    out["help"] = " ".join(parser.format_help().split())
    device = devices.resolve_device(parser.parse_args(["--device", "mydev"]).device)
    out["device"], out["auto"] = str(device), str(devices.resolve_device("auto"))

    devices.reset_peak_memory_stats(device)
    tensor = torch.arange(6.0).reshape(2, 3).to(device)
    out["tensor"] = [str(tensor.device), tensor.to("cpu").tolist()]
    linear = torch.nn.Linear(3, 2).to(device)
    out["linear"] = [str(linear.weight.device), str(linear.bias.device)]
    out["memory"] = devices.memory_stats(device).as_dict()
    out["dtype"], out["host"] = str(devices.default_dtype(device)), devices.shares_host_memory(device)

    out["graph_modes"] = list(devices.GRAPH_MODES)
    out["graph_auto"] = devices.resolve_graph_mode(device, "auto")
    try:
        devices.resolve_graph_mode(device, "mydev-lazy")
    except devices.DeviceUnavailableError as error:
        out["lazy_refused"] = str(error)
    module = torch.nn.Linear(2, 2)
    compiled_with = []
    module.compile = lambda **options: compiled_with.append(options)
    devices.apply_graph_mode(module, device, "compile")
    devices.apply_graph_mode(module, device, "mydev-graphs", training=True, max_graphs=3)
    captured = sys.modules[type(devices.runtime_for(device)).__module__].CAPTURED  # loaded by the entry point
    out["graphs"] = [compiled_with, [list(c) for c in captured], devices.graph_mode_of(module),
                     devices.keeps_grad_buffers("mydev-graphs")]

    out["backend_names"] = list(backends.backend_names("mydev"))
    out["backend_from_env"] = type(backends.get_backend(tensor.device)).__name__
    backends.select_backend("torch-portable", "mydev")
    out["backend_selected"] = type(backends.get_backend(device)).__name__
    out["cases"] = [case.id for case in backend_cases(["skinny_grad_fp32"])]

    out["profiles"] = sorted(devices.load_profiles())
    out["plan"] = main(["plan", "--model", "smollm2-135m", "--methods", "lora", "--device-profile", "mydev-x1",
                        "--seq-len", "16", "--batch-size", "1", "--no-search", "--workers", "1"])

    devices.unregister_runtime("mydev")
    out["after_unregister"] = ["mydev" in devices.DEVICE_CHOICES, "mydev-graphs" in devices.GRAPH_MODES,
                               str(devices.resolve_device("auto"))]
    try:
        devices.resolve_device("mydev")
    except devices.InvalidDeviceError as error:
        out["unregistered_error"] = str(error)
    out["entry_point_reads"] = reads.count(devices.ENTRY_POINT_GROUP)
    print("RESULT " + json.dumps(out))
'''


def _install_plugin(root: Path) -> Path:
    return write_distribution(
        root,
        "paca-mydev",
        {"paca_hal.devices": {"mydev": "paca_mydev:MyDevRuntime"}},
        {"paca_mydev/__init__.py": PLUGIN, "paca_mydev/profiles.json": json.dumps(PROFILES, indent=1)},
    )


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    """What a user's process observes with the plug-in installed (one process: PrivateUse1 renames once)."""
    if not PYTHON_PRIVATEUSE1:
        pytest.skip(f"torch {torch.__version__} has no Python PrivateUse1 backend (torch._C._acc)")
    site = _install_plugin(tmp_path_factory.mktemp("site-packages"))
    script = site / "user.py"
    script.write_text(textwrap.dedent(USER), encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(REPO)]), "PACA_BACKEND": "mydev-fast"}
    env.pop("PACA_DEVICE", None)
    done = subprocess.run([sys.executable, str(script)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stdout[-3000:] + done.stderr[-5000:]
    return {**json.loads(lines[-1][len("RESULT "):]), "stdout": done.stdout, "stderr": done.stderr}


def test_device_is_selected_with_device_and_holds_real_tensors(recipe):
    assert "auto, cpu, cuda, cuda:N, hpu, hpu:N, mydev, mydev:N" in recipe["help"]
    assert "'auto' prefers mydev, then hpu, then cuda, then cpu" in recipe["help"]
    assert recipe["device"] == "mydev:0" and recipe["auto"] == "mydev:0"
    assert recipe["tensor"] == ["mydev:0", [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]]  # the bytes went there and back
    assert recipe["linear"] == ["mydev:0", "mydev:0"]
    memory = recipe["memory"]
    assert memory["source"] == "mydev allocator" and memory["peak_bytes"] >= 6 * 4 + 6 * 4 + 2 * 4
    assert recipe["dtype"] == "torch.float16" and recipe["host"] is False
    assert recipe["entry_point_reads"] == 1  # read lazily, once, however often the registry is read


def test_graph_modes_follow_the_declarations(recipe):
    assert {"mydev-lazy", "mydev-graphs"} <= set(recipe["graph_modes"])
    assert recipe["graph_auto"] == "eager"
    assert "MYDEV_LAZY=1" in recipe["lazy_refused"]
    compiled_with, captured, mode, keeps = recipe["graphs"]
    assert compiled_with == [{"backend": "mydev_compiler"}] and captured == [[True, 3]]
    assert mode == "mydev-graphs" and keeps is True


def test_opt_in_backend_is_picked_by_name(recipe):
    assert recipe["backend_names"] == ["torch-portable", "mydev-fast"]  # default first: the portable one
    assert recipe["backend_from_env"] == "MyDevFastBackend"  # PACA_BACKEND=mydev-fast
    assert recipe["backend_selected"] == "TorchBackend"  # backends.select_backend wins over the env
    assert "mydev" in recipe["cases"]  # step 3: the conformance suite has the device's case


def test_plan_uses_the_runtime_profiles(recipe):
    assert "mydev-x1" in recipe["profiles"] and "h100-80g" in recipe["profiles"]
    assert recipe["plan"] == 0
    assert "| mydev-x1 | lora | 16 × 1 |" in recipe["stdout"]


def test_unregistering_leaves_no_trace_and_explains(recipe):
    assert recipe["after_unregister"] == [False, False, "cpu"]
    assert "PyTorch knows device type 'mydev'" in recipe["unregistered_error"]
    assert "paca_hal.devices" in recipe["unregistered_error"]


# --- errors, in this process (nothing here renames PrivateUse1) --------------------------------------


class ClaimsAvailable(DeviceRuntime):
    """A runtime that says its device is there, whatever torch can do."""

    auto_priority = 1000

    def __init__(self, name: str) -> None:
        self.name = name

    def is_available(self) -> bool:
        return True

    def device_count(self) -> int:
        return 1

    def memory_stats(self, device: torch.device) -> MemoryStats:
        return MemoryStats(str(device), 0, 0, None, "none")

    def reset_peak_memory_stats(self, device: torch.device) -> None:
        pass


@pytest.mark.skipif(torch.xpu.is_available(), reason="this PyTorch has a usable XPU")
def test_a_device_torch_cannot_use_is_refused_in_one_line_not_at_model_to():
    devices.register_runtime(ClaimsAvailable("xpu"))
    try:
        with pytest.raises(devices.DeviceUnavailableError, match=r"torch.xpu.is_available\(\) is False") as info:
            devices.resolve_device("xpu")
        assert "\n" not in str(info.value)
        assert devices.resolve_device("auto").type != "xpu"  # auto passes over it
    finally:
        devices.unregister_runtime("xpu")


def test_a_device_type_torch_does_not_know_is_refused_when_resolved():
    devices.register_runtime(ClaimsAvailable("warp"))  # a plug-in may make the type in prepare(): allowed
    try:
        assert "warp" in devices.DEVICE_CHOICES
        with pytest.raises(devices.InvalidDeviceError, match="PyTorch does not know device type 'warp'"):
            devices.resolve_device("warp")
        assert devices.resolve_device("auto").type != "warp"
    finally:
        devices.unregister_runtime("warp")
    assert "warp" not in devices.DEVICE_CHOICES


def test_registration_is_checked():
    with pytest.raises(ValueError, match="already registered"):
        devices.register_runtime(devices.runtime_for("cpu").__class__())
    for bad in ("auto", "Xpu", "cuda:0", ""):
        with pytest.raises(ValueError):
            devices.register_runtime(ClaimsAvailable(bad))
    with pytest.raises(TypeError):
        devices.register_runtime(ClaimsAvailable)
    assert "Xpu" not in devices.DEVICE_CHOICES


@pytest.fixture
def broken_plugin(tmp_path, monkeypatch):
    """An installed distribution whose device entry point cannot load (its vendor package is missing)."""
    write_distribution(
        tmp_path,
        "paca-brokendev",
        {"paca_hal.devices": {"brokendev": "paca_brokendev:BrokenRuntime"}},
        {"paca_brokendev.py": "import vendor_package_that_is_not_installed\n"},
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(device_registry, "_entry_points_loaded", False)
    monkeypatch.setattr(device_registry, "_BROKEN_ENTRY_POINTS", {})


def test_a_broken_plugin_is_one_clear_error(broken_plugin, caplog, tiny_model_dir, sample_text_file, tmp_path):
    from paca_core.cli.dispatch import main

    caplog.set_level("WARNING", logger="devices.registry")
    assert "brokendev" not in devices.DEVICE_CHOICES and devices.resolve_device("cpu").type == "cpu"
    warnings = [r for r in caplog.records if r.name == "devices.registry"]
    assert len(warnings) == 1 and warnings[0].exc_info is None
    said = warnings[0].getMessage()
    assert "paca-brokendev 0.1" in said and "brokendev = paca_brokendev:BrokenRuntime" in said
    assert "ModuleNotFoundError" in said and "vendor_package_that_is_not_installed" in said
    with pytest.raises(devices.InvalidDeviceError) as info:
        devices.resolve_device("brokendev")
    assert str(info.value).startswith(said) and "\n" not in str(info.value)

    caplog.clear()
    code = main(_train_flags(tiny_model_dir, sample_text_file, tmp_path / "run", 1, "--device", "brokendev"))
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert code == 2 and len(errors) == 1 and errors[0].exc_info is None
    assert "paca-brokendev 0.1" in errors[0].getMessage()
