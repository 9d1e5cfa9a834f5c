"""Device profiles (devices/profiles.json + devices/profiles.py): data checks, the roofline, CPU calibration."""
from __future__ import annotations

import dataclasses
import json
import time
import tomllib
from pathlib import Path

import pytest
import torch

import devices
from devices.profiles import (
    SOURCE_PREFIXES,
    DeviceProfile,
    UnknownProfileError,
    calibrate_cpu,
    default_calibration_path,
    get_profile,
    load_profiles,
    save_calibration,
)

EXPECTED = {
    "a100-80g": "cuda",
    "a100-40g": "cuda",
    "h100-80g": "cuda",
    "h200": "cuda",
    "gaudi2": "hpu",
    "gaudi3": "hpu",
    "cpu": "cpu",
}
GIB = 2**30
PROFILES_JSON = Path(devices.__file__).parent / "profiles.json"


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    """An empty cache, so no real calibration on this machine leaks into a test."""
    monkeypatch.setenv("PACA_CACHE_DIR", str(tmp_path))
    return tmp_path


def test_every_profile_loads():
    profiles = load_profiles()
    assert set(profiles) == set(EXPECTED)
    for name, profile in profiles.items():
        assert isinstance(profile, DeviceProfile)
        assert profile.name == name
        assert profile.device_type == EXPECTED[name]
        assert profile.description
        assert {"bf16", "fp16", "fp32"} <= set(profile.matmul_flops)


def _numeric_leaves(entry, prefix=""):
    for key, value in entry.items():
        if key == "sources":
            continue
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            yield from _numeric_leaves(value, path + ".")
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            yield path


def test_every_numeric_field_has_a_labelled_source():
    # Walk the raw JSON (not the dataclass) so a number the loader ignored would still be caught.
    raw = json.loads(PROFILES_JSON.read_text(encoding="utf-8"))["profiles"]
    for name, entry in raw.items():
        leaves = list(_numeric_leaves(entry))
        assert "memory_bytes" in leaves and "matmul_flops.bf16" in leaves
        for path in leaves:
            source = entry["sources"].get(path, "")
            assert source.strip(), f"{name}.{path} has no source"
            assert source.startswith(SOURCE_PREFIXES), f"{name}.{path}: source not labelled: {source[:60]}"
    for profile in load_profiles().values():
        assert all(profile.sources[key] for key, _ in profile.numeric_fields())


def test_cpu_entry_says_it_is_uncalibrated():
    cpu = load_profiles()["cpu"]
    for key, _ in cpu.numeric_fields():
        assert cpu.sources[key].startswith("uncalibrated default"), key
        assert "--calibrate" in cpu.sources[key]


def test_dense_figures_not_sparse_and_fp32_not_tf32():
    profiles = load_profiles()
    ceilings = {"a100-80g": 3.2e14, "a100-40g": 3.2e14, "h100-80g": 1.0e15, "h200": 1.0e15, "gaudi3": 1.9e15}
    for name, ceiling in ceilings.items():
        assert profiles[name].matmul_throughput(torch.bfloat16) <= ceiling, name
    # PyTorch's default fp32 matmul does not use TF32: the plain FP32 (CUDA core) figure applies.
    assert profiles["a100-80g"].matmul_throughput(torch.float32) == pytest.approx(19.5e12)
    assert profiles["h100-80g"].matmul_throughput(torch.float32) == pytest.approx(67e12)
    assert profiles["a100-80g"].matmul_throughput(torch.float32, allow_tf32=True) == pytest.approx(156e12)
    # No tf32 figure: allow_tf32 changes nothing.
    gaudi2 = profiles["gaudi2"]
    assert gaudi2.matmul_throughput(torch.float32, allow_tf32=True) == gaudi2.matmul_throughput(torch.float32)
    for profile in profiles.values():
        if profile.device_type != "cpu":  # on a CPU without native bf16, fp32 is the fast one
            assert profile.matmul_throughput(torch.float32) < profile.matmul_throughput(torch.bfloat16), profile.name


def test_capacity_units_and_usable_bytes():
    profiles = load_profiles()
    # GB/GiB sanity: an "80 GB" part reports just under 80 GiB, not 80e9 bytes (74.5 GiB).
    for name in ("a100-80g", "h100-80g"):
        assert 78 * GIB < profiles[name].memory_bytes <= 80 * GIB, name
    assert 39 * GIB < profiles["a100-40g"].memory_bytes <= 40 * GIB
    assert 135 * GIB < profiles["h200"].memory_bytes <= 141 * GIB
    for profile in profiles.values():
        assert 0 < profile.usable_bytes() < profile.memory_bytes, profile.name
        assert isinstance(profile.usable_bytes(), int)


def _round_profile(**overrides) -> DeviceProfile:
    values = dict(
        name="toy",
        description="round numbers",
        device_type="cuda",
        memory_bytes=10 * GIB,
        usable_fraction=0.5,
        runtime_reserve_bytes=GIB,
        matmul_flops={"bf16": 1e12, "fp16": 1e12, "fp32": 1e11},
        vector_flops={"fp32": 1e10},
        memory_bandwidth=1e9,
        launch_overhead_s=1e-5,
        fuse_elementwise=False,
        fusion_rule="none",
        sources={
            key: "assumption: test"
            for key in (
                "memory_bytes", "usable_fraction", "runtime_reserve_bytes", "memory_bandwidth", "launch_overhead_s",
                "matmul_flops.bf16", "matmul_flops.fp16", "matmul_flops.fp32", "vector_flops.fp32",
            )
        },
    )
    values.update(overrides)
    return DeviceProfile(**values)


def test_op_seconds_is_a_roofline():
    toy = _round_profile()
    assert toy.usable_bytes() == 4 * GIB
    # Compute-bound: 1e12 FLOP at 1e12 FLOP/s = 1 s; 1e6 bytes at 1e9 B/s = 1 ms.
    assert toy.op_seconds(1e12, 1e6, torch.bfloat16, matmul=True) == pytest.approx(1.0)
    assert toy.bound(1e12, 1e6, torch.bfloat16, matmul=True) == "compute"
    # Memory-bound: 1e9 bytes = 1 s dominates 1e3 FLOP.
    assert toy.op_seconds(1e3, 1e9, torch.bfloat16, matmul=True) == pytest.approx(1.0)
    assert toy.bound(1e3, 1e9, torch.bfloat16, matmul=True) == "memory"
    # Non-matrix ops use the vector figure (fp32 stands in for a missing bf16 one).
    assert toy.op_seconds(1e10, 0, torch.bfloat16, matmul=False) == pytest.approx(1.0)
    # Launch overhead is the caller's to add.
    assert toy.op_seconds(0, 0, torch.float32, matmul=False) == 0
    h100 = load_profiles()["h100-80g"]
    flops, moved = 2 * 4096**3, 3 * 4096 * 4096 * 2
    expected = max(flops / h100.matmul_throughput(torch.bfloat16), moved / h100.memory_bandwidth)
    assert h100.op_seconds(flops, moved, torch.bfloat16, matmul=True) == pytest.approx(expected)
    with pytest.raises(ValueError):
        toy.op_seconds(-1, 0, torch.float32, matmul=True)


def test_unknown_dtype_is_a_clear_error():
    h100 = load_profiles()["h100-80g"]
    for dtype in (torch.float64, torch.int8, "fp8"):
        with pytest.raises(ValueError, match="torch.bfloat16"):
            h100.matmul_throughput(dtype)
    sources = {k: v for k, v in _round_profile().sources.items() if k not in ("matmul_flops.fp16", "matmul_flops.fp32")}
    toy = _round_profile(matmul_flops={"bf16": 1e12}, sources=sources)
    with pytest.raises(ValueError, match="no fp16 matmul figure"):
        toy.matmul_throughput(torch.float16)


def test_missing_source_or_bad_value_rejected():
    good = _round_profile()
    sources = dict(good.sources)
    del sources["memory_bandwidth"]
    with pytest.raises(ValueError, match="memory_bandwidth has no source"):
        dataclasses.replace(good, sources=sources)
    with pytest.raises(ValueError, match="must be positive"):
        dataclasses.replace(good, memory_bandwidth=0)
    with pytest.raises(ValueError, match="unknown fields"):
        DeviceProfile.from_dict("x", {**good.to_dict(), "sparse_flops": 1})


def test_unknown_profile_lists_names():
    with pytest.raises(UnknownProfileError) as info:
        get_profile("tpu-v5")
    assert isinstance(info.value, ValueError)
    for name in EXPECTED:
        assert name in str(info.value)
    assert get_profile("H100-80G").name == "h100-80g"


def test_cpu_without_calibration_uses_defaults(cache_dir):
    assert not default_calibration_path().exists()
    assert default_calibration_path().parent == cache_dir
    assert get_profile("cpu") == load_profiles()["cpu"]


def test_calibrate_save_load_round_trip(cache_dir):
    start = time.perf_counter()
    measured = calibrate_cpu(seconds=0.3, threads=1)
    assert time.perf_counter() - start < 10
    assert measured.name == "cpu" and measured.device_type == "cpu"
    assert measured.matmul_throughput(torch.float32) > 0
    assert measured.matmul_throughput(torch.bfloat16) > 0
    assert measured.memory_bandwidth > 0 and measured.launch_overhead_s > 0
    assert measured.memory_bytes > 0 and 0 < measured.usable_bytes() < measured.memory_bytes
    assert "measured by calibrate_cpu" in measured.sources["matmul_flops.fp32"]
    assert "1 threads" in measured.sources["memory_bandwidth"]
    assert torch.get_num_threads() >= 1

    path = save_calibration(measured)
    assert path == default_calibration_path()
    assert [p.name for p in cache_dir.iterdir()] == [path.name]  # the temporary file is gone
    assert get_profile("cpu") == measured
    # An explicit path works too, and other profiles ignore the calibration.
    other = save_calibration(measured, cache_dir / "elsewhere.json")
    assert get_profile("cpu", calibrated_cache=other) == measured
    assert get_profile("h200") == load_profiles()["h200"]


def test_unreadable_calibration_falls_back(cache_dir, caplog):
    default_calibration_path().write_text("{not json", encoding="utf-8")
    with caplog.at_level("WARNING", logger="devices.profiles"):
        assert get_profile("cpu") == load_profiles()["cpu"]
    assert "ignoring CPU calibration" in caplog.text


def test_profiles_json_is_package_data():
    config = tomllib.loads((Path(devices.__file__).parent.parent / "pyproject.toml").read_text(encoding="utf-8"))
    assert "profiles.json" in config["tool"]["setuptools"]["package-data"]["devices"]
