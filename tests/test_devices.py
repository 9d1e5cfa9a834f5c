import argparse
import subprocess
import sys

import pytest
import torch

import devices
from devices import DeviceUnavailableError, InvalidDeviceError, resolve_device


def test_cpu_and_auto_resolve():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("CPU") == torch.device("cpu")
    assert resolve_device("auto").type in ("cpu", "cuda", "hpu")


def test_env_var_used_when_no_spec(monkeypatch):
    monkeypatch.setenv("PACA_DEVICE", "cpu")
    assert resolve_device(None) == torch.device("cpu")
    monkeypatch.setenv("PACA_DEVICE", "bogus")
    with pytest.raises(InvalidDeviceError, match=r"PACA_DEVICE"):
        resolve_device(None)


@pytest.mark.parametrize("spec", ["tpu", "cuda:x", "gpu", "hpu:-1", "auto:0"])
def test_unknown_spec_lists_valid_choices(spec):
    with pytest.raises(InvalidDeviceError) as info:
        resolve_device(spec)
    assert "cpu" in str(info.value)


def test_cpu_index_out_of_range():
    with pytest.raises(InvalidDeviceError, match="single device"):
        resolve_device("cpu:1")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_cuda_missing_says_what_to_do():
    with pytest.raises(DeviceUnavailableError, match="--device cpu"):
        resolve_device("cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_index_out_of_range():
    with pytest.raises(DeviceUnavailableError, match="valid indices"):
        resolve_device(f"cuda:{torch.cuda.device_count()}")


def test_hpu_missing_says_what_to_do():
    if "hpu" in devices.available_device_types():
        pytest.skip("a Gaudi is present")
    with pytest.raises(DeviceUnavailableError, match="Intel Gaudi software not found"):
        resolve_device("hpu:0")


def test_add_device_argument_help_lists_choices():
    parser = devices.add_device_argument(argparse.ArgumentParser())
    assert parser.parse_args(["--device", "cpu"]).device == "cpu"
    help_text = parser.format_help()
    for choice in ("auto", "cpu", "cuda", "hpu"):
        assert choice in help_text


def test_cpu_memory_stats_and_reset():
    stats = devices.memory_stats("cpu")
    assert stats.peak_bytes >= stats.current_bytes > 0
    devices.reset_peak_memory_stats("cpu")
    block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
    grown = devices.memory_stats("cpu").peak_bytes
    del block
    assert grown >= stats.current_bytes


def test_import_does_not_touch_vendor_runtimes():
    code = (
        "import sys, devices, backends, paca_core\n"
        "devices.resolve_device('cpu')\n"
        "assert not any(m.startswith('habana_frameworks') for m in sys.modules), 'habana imported'\n"
        "import torch\n"
        "assert not torch.cuda.is_initialized(), 'CUDA initialised'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_graph_mode_validation():
    cpu = torch.device("cpu")
    assert devices.resolve_graph_mode(cpu, "auto") == "eager"
    assert devices.resolve_graph_mode(cpu, "compile") == "compile"
    with pytest.raises(DeviceUnavailableError, match="not available on cpu"):
        devices.resolve_graph_mode(cpu, "lazy")
    with pytest.raises(InvalidDeviceError):
        devices.resolve_graph_mode(cpu, "warp")
