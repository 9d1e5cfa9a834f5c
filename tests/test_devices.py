import argparse
import os
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


@pytest.mark.gpu
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


MiB = 2**20


def test_cpu_memory_stats_and_reset():
    stats = devices.memory_stats("cpu")
    assert stats.peak_bytes >= stats.current_bytes > 0
    if stats.source != "/proc/self/status VmRSS/VmHWM":
        pytest.skip(f"the peak cannot be reset here ({stats.source})")
    # Blocks this large are mmap-ed by the allocator: fresh pages in, unmapped (out of the RSS) when freed.
    spike = torch.ones(128 * MiB // 4)
    del spike
    before = devices.memory_stats("cpu")
    assert before.peak_bytes >= before.current_bytes + 96 * MiB  # the freed spike still counts in the peak
    devices.reset_peak_memory_stats("cpu")
    after = devices.memory_stats("cpu")
    assert after.peak_bytes <= before.peak_bytes - 96 * MiB  # ... until the reset forgets it
    block = torch.ones(64 * MiB // 4)  # 64 MiB, touched
    grown = devices.memory_stats("cpu").peak_bytes
    del block
    assert grown >= after.current_bytes + 48 * MiB  # the new window sees most of the block


def test_import_does_not_touch_vendor_runtimes():
    code = (
        "import sys, devices, backends, paca_core\n"
        "devices.resolve_device('cpu')\n"
        "assert not any(m.startswith('habana_frameworks') for m in sys.modules), 'habana imported'\n"
        "import torch\n"
        "assert not torch.cuda.is_initialized(), 'CUDA initialised'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.skipif(devices.hpu.gaudi_device_possible(), reason="this machine has a Gaudi device node")
def test_auto_does_not_import_the_gaudi_bridge_without_a_gaudi(tmp_path):
    """Gaudi software installed (a stand-in that fails loudly on import), no Gaudi device node: ``auto``
    and the device listing must not import it, and asking for hpu says what is missing."""
    for package in ("habana_frameworks", "habana_frameworks/torch"):
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text("raise RuntimeError('habana_frameworks was imported')\n")
    code = (
        "import sys, devices\n"
        "assert devices.resolve_device('auto').type != 'hpu'\n"
        "assert 'hpu' not in devices.available_device_types()\n"
        "assert not any(m.startswith('habana_frameworks') for m in sys.modules), 'habana imported'\n"
        "try:\n"
        "    devices.resolve_device('hpu')\n"
        "except devices.DeviceUnavailableError as error:\n"
        "    assert 'no Gaudi device node' in str(error), error\n"
        "else:\n"
        "    raise AssertionError('hpu resolved without a Gaudi')\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


def test_graph_mode_validation():
    cpu = torch.device("cpu")
    assert devices.resolve_graph_mode(cpu, "auto") == "eager"
    assert devices.resolve_graph_mode(cpu, "compile") == "compile"
    with pytest.raises(DeviceUnavailableError, match="not available on cpu"):
        devices.resolve_graph_mode(cpu, "lazy")
    with pytest.raises(InvalidDeviceError):
        devices.resolve_graph_mode(cpu, "warp")
