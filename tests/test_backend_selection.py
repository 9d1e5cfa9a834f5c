"""Opt-in alternative backends: a device type may have several registered backends, picked by name
(``$PACA_BACKEND`` or ``backends.select_backend``); without a pick the default stays what it was."""
from __future__ import annotations

import pytest
import torch

import backends
from backends import CudaBackend, TorchBackend, get_backend, select_backend

CUDA = torch.device("cuda", 0)  # a torch.device is not resolved: no GPU needed to ask which backend serves it


class CpuAltBackend(TorchBackend):
    """An alternative kernel set for CPU tensors (the portable code, under another name)."""

    device_type = "cpu"
    name = "cpu-alt"


@pytest.fixture
def alternative(monkeypatch):
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    backends.register_backend(CpuAltBackend, default=False)
    select_backend(None)
    try:
        yield CpuAltBackend
    finally:
        backends.unregister_backend("cpu", "cpu-alt")
        select_backend(None)


def test_defaults_are_unchanged_until_picked(alternative):
    assert type(get_backend("cpu")) is TorchBackend and type(get_backend(CUDA)) is CudaBackend
    assert backends.backend_names("cpu") == ("torch-portable", "cpu-alt")
    assert backends.backend_names("cuda") == ("cuda", "torch-portable")
    assert CpuAltBackend in backends.registered_backends() and "cpu" not in backends.BACKEND_CLASSES


def test_python_api_picks_and_forgets(alternative):
    select_backend("cpu-alt")
    assert type(get_backend("cpu")) is CpuAltBackend
    assert type(get_backend(CUDA)) is CudaBackend  # cuda has no backend of that name: its default
    select_backend("torch-portable", "cuda")
    portable = get_backend(CUDA)
    assert type(portable) is TorchBackend and portable.device_type == "cuda"
    select_backend(None, "cuda")
    assert type(get_backend(CUDA)) is CudaBackend and type(get_backend("cpu")) is CpuAltBackend
    select_backend(None)
    assert type(get_backend("cpu")) is TorchBackend
    with pytest.raises(ValueError, match="No backend 'cpu-alt' for 'cuda'; it has: cuda, torch-portable"):
        select_backend("cpu-alt", "cuda")
    with pytest.raises(ValueError, match="No registered backend is called 'liger'.*cpu: cpu-alt.*cuda: cuda \\(default\\)"):
        select_backend("liger")


def test_environment_picks_by_name_or_per_device_type(alternative, monkeypatch):
    monkeypatch.setenv(backends.ENV_VAR, "cpu-alt")
    select_backend(None)  # forget cached instances: the variable is read when a type is first served
    assert type(get_backend("cpu")) is CpuAltBackend and type(get_backend(CUDA)) is CudaBackend

    monkeypatch.setenv(backends.ENV_VAR, "cpu=torch-portable, cuda=torch-portable")
    select_backend(None)
    assert type(get_backend("cpu")) is TorchBackend and type(get_backend(CUDA)) is TorchBackend

    select_backend("cpu-alt", "cpu")  # the Python API wins over the environment
    assert type(get_backend("cpu")) is CpuAltBackend

    monkeypatch.setenv(backends.ENV_VAR, "cuda=cpu-alt")
    select_backend(None)
    with pytest.raises(ValueError, match=r"\$PACA_BACKEND picks backend 'cpu-alt' for cuda, which has: cuda, torch-portable"):
        get_backend(CUDA)
    monkeypatch.setenv(backends.ENV_VAR, "liger")
    select_backend(None)
    with pytest.raises(ValueError, match=r"\$PACA_BACKEND names backend 'liger', which is not registered"):
        get_backend("cpu")


def test_registration_is_checked(alternative):
    class Clash(TorchBackend):
        device_type, name = "cuda", "cuda"

    class NoName(TorchBackend):
        device_type, name = "cpu", "torch-portable"

    with pytest.raises(ValueError, match="already has a backend called 'cuda'"):
        backends.register_backend(Clash, default=False)
    with pytest.raises(ValueError, match="already has a backend called 'cpu-alt'"):
        backends.register_backend(CpuAltBackend, default=False)
    with pytest.raises(ValueError, match="a name of its own"):
        backends.register_backend(NoName, default=False)
