"""Gaudi-specific device paths: optimizer selection, fused clip norm, HPU graphs, and real-HPU runs.

Two kinds of tests live here:

* Tests that run everywhere check what the HPU runtime *asks of* the Habana bridge, against
  RECORDING STAND-INS installed into ``sys.modules`` for ``habana_frameworks.torch.hpex.*`` and
  ``habana_frameworks.torch.hpu`` (the real modules exist only in Intel's images). The stand-ins
  take the bridge's documented signatures (hpex/optimizers/FusedAdamW.py, normalization/FusedClipNorm.py,
  ``ModuleCacher(max_graphs=...)(model=..., inplace=True)``, ``wrap_in_hpu_graph``); they prove our
  calls, not Habana's kernels.
* Tests marked ``requires_hpu`` need a real Gaudi (and lazy mode where stated) and skip cleanly
  without one. They have not been run: no Gaudi was reachable when they were written.
"""
import os
import sys
import types

import pytest
import torch

import devices
import devices.registry as registry
from devices.cpu import CpuRuntime
from devices.hpu import HpuRuntime, lazy_mode_enabled
from paca_core import PaCAConfig, prepare_model
from paca_core.train.trainer import Trainer, TrainingArguments

from .conftest import SAMPLE_TEXT, tiny_llama

HPU_PRESENT = "hpu" in devices.available_device_types()
requires_hpu = [pytest.mark.hpu, pytest.mark.skipif(not HPU_PRESENT, reason="needs an Intel Gaudi (HPU) device")]
requires_lazy_hpu = requires_hpu + [
    pytest.mark.skipif(not lazy_mode_enabled(), reason="needs PT_HPU_LAZY_MODE=1 set before Python starts")
]


def _install(monkeypatch, name: str, **attributes) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__dict__.update(attributes)
    monkeypatch.setitem(sys.modules, name, module)
    return module


def _stand_in_runtime() -> HpuRuntime:
    runtime = HpuRuntime()
    runtime._core = types.SimpleNamespace(mark_step=lambda **kw: None)  # "prepared" without the bridge
    return runtime


# --- optimizer selection -------------------------------------------------------------------------


def test_cpu_adamw_is_torch_foreach_with_torch_defaults():
    params = [torch.nn.Parameter(torch.randn(3, 3))]
    optimizer = devices.make_adamw(params, "cpu", lr=1e-2, weight_decay=0.1)
    assert type(optimizer) is torch.optim.AdamW
    group = optimizer.param_groups[0]
    assert group["foreach"] is True and group["eps"] == 1e-8 and group["weight_decay"] == 0.1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_adamw_is_fused_and_matches_the_reference_step():
    torch.manual_seed(0)
    start = torch.randn(64, 64)
    grads = [torch.randn(64, 64) for _ in range(3)]
    results = []
    for device, make in (("cuda", devices.make_adamw), ("cpu", None)):
        param = torch.nn.Parameter(start.clone().to(device))
        optimizer = make([param], device, lr=1e-2, weight_decay=0.1) if make else torch.optim.AdamW([param], lr=1e-2, weight_decay=0.1)
        if make:
            assert optimizer.param_groups[0]["fused"] is True
        for grad in grads:
            param.grad = grad.to(device)
            optimizer.step()
        results.append(param.detach().cpu())
    torch.testing.assert_close(results[0], results[1], rtol=1e-5, atol=1e-6)


class RecordingFusedAdamW(torch.optim.Optimizer):
    """Stand-in for ``hpex.optimizers.FusedAdamW``: the bridge's signature (note eps=1e-6 default) and,
    like the real one, a ``torch.optim.Optimizer`` subclass; its step is plain SGD, enough to move weights."""

    created: list = []

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0, bias_correction=True):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, bias_correction=bias_correction))
        RecordingFusedAdamW.created.append(self)

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(p.grad, alpha=-group["lr"])


def test_hpu_adamw_is_habana_fused_with_explicit_eps_and_no_empty_groups(monkeypatch):
    _install(monkeypatch, "habana_frameworks.torch.hpex.optimizers", FusedAdamW=RecordingFusedAdamW)
    RecordingFusedAdamW.created.clear()
    weight = torch.nn.Parameter(torch.zeros(2))
    optimizer = _stand_in_runtime().make_adamw([{"params": [weight]}, {"params": []}], lr=0.5, weight_decay=0.01)
    assert RecordingFusedAdamW.created == [optimizer]
    assert len(optimizer.param_groups) == 1  # the empty group (which crashes FusedAdamW) was dropped
    group = optimizer.param_groups[0]
    assert group["eps"] == 1e-8 and group["lr"] == 0.5 and group["weight_decay"] == 0.01


def test_hpu_adamw_falls_back_to_torch_without_hpex(monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "habana_frameworks.torch.hpex.optimizers", None)  # import raises ImportError
    optimizer = _stand_in_runtime().make_adamw([torch.nn.Parameter(torch.zeros(2))], lr=0.1)
    assert type(optimizer) is torch.optim.AdamW
    assert "FusedAdamW unavailable" in caplog.text


def test_paca_columns_follow_a_fused_optimizer_subclass(monkeypatch):
    """PaCA rewrites its columns from torch's global optimizer post-step hook; Habana's FusedAdamW is
    an ``Optimizer`` subclass, so its step must fire that hook too (checked with the stand-in)."""
    _install(monkeypatch, "habana_frameworks.torch.hpex.optimizers", FusedAdamW=RecordingFusedAdamW)
    paca = prepare_model(tiny_llama(), PaCAConfig(r=4), device="cpu")
    optimizer = _stand_in_runtime().make_adamw(paca.trainable_parameters(), lr=0.1)
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    paca(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    name, layer = next(iter(paca.adapter_layers().items()))
    assert layer.paca_delta.abs().sum() > 0
    with torch.no_grad():
        expected = layer.paca_original_columns.float() + layer.scaling * layer.paca_delta.float()
    torch.testing.assert_close(layer.base_layer.weight[:, layer.paca_indices].float(), expected)


# --- fused clip norm -----------------------------------------------------------------------------


def test_hpu_clip_norm_uses_fused_clip_norm_once_per_max_norm(monkeypatch):
    calls = []

    class RecordingFusedClipNorm:
        def __init__(self, parameters, max_norm):
            calls.append(("init", max_norm))

        def clip_norm(self, parameters):
            calls.append(("clip_norm", len(list(parameters))))
            return torch.tensor(1.0)

    _install(monkeypatch, "habana_frameworks.torch.hpex.normalization", FusedClipNorm=RecordingFusedClipNorm)
    runtime = _stand_in_runtime()
    params = [torch.nn.Parameter(torch.ones(2)) for _ in range(3)]
    for _ in range(2):
        runtime.clip_grad_norm(params, 1.0)
    assert calls == [("init", 1.0), ("clip_norm", 3), ("clip_norm", 3)]


def test_cpu_clip_grad_norm_clips():
    param = torch.nn.Parameter(torch.zeros(4))
    param.grad = torch.full((4,), 2.0)
    norm = devices.clip_grad_norm([param], 1.0, "cpu")
    assert float(norm) == pytest.approx(4.0)
    assert float(param.grad.norm()) == pytest.approx(1.0, rel=1e-4)


# --- HPU graphs ----------------------------------------------------------------------------------


@pytest.fixture
def recording_hthpu(monkeypatch):
    calls = []

    class ModuleCacher:
        def __init__(self, max_graphs=10):
            calls.append(("ModuleCacher", max_graphs))

        def __call__(self, model, inplace=True, **kwargs):
            calls.append(("cache", model, inplace))
            return model

    def wrap_in_hpu_graph(module, asynchronous=False, disable_tensor_cache=False, dry_run=False, max_graphs=None):
        calls.append(("wrap_in_hpu_graph", module, max_graphs))
        return module

    _install(monkeypatch, "habana_frameworks.torch.hpu", ModuleCacher=ModuleCacher, wrap_in_hpu_graph=wrap_in_hpu_graph)
    return calls


def test_hpu_graphs_training_and_inference_calls(monkeypatch, recording_hthpu):
    monkeypatch.setenv("PT_HPU_LAZY_MODE", "1")
    runtime, module = _stand_in_runtime(), torch.nn.Linear(2, 2)
    assert runtime.capture_graphs(module, training=True, max_graphs=4) is module
    assert runtime.capture_graphs(module, training=False) is module
    assert recording_hthpu == [("ModuleCacher", 4), ("cache", module, True), ("wrap_in_hpu_graph", module, None)]


def test_hpu_graphs_refused_outside_lazy_mode(monkeypatch, recording_hthpu):
    monkeypatch.setenv("PT_HPU_LAZY_MODE", "0")
    with pytest.raises(devices.DeviceUnavailableError, match="PT_HPU_LAZY_MODE=1"):
        _stand_in_runtime().capture_graphs(torch.nn.Linear(2, 2), training=True)
    with pytest.raises(devices.DeviceUnavailableError, match="PT_HPU_LAZY_MODE=1"):
        devices.resolve_graph_mode(torch.device("hpu"), "hpu-graphs")
    assert recording_hthpu == []


def test_graph_mode_properties():
    assert devices.keeps_grad_buffers("hpu-graphs")
    assert not any(devices.keeps_grad_buffers(m) for m in ("eager", "lazy", "compile", "cuda-graphs"))
    with pytest.raises(devices.DeviceUnavailableError, match="not available on cpu"):
        devices.apply_graph_mode(torch.nn.Linear(2, 2), torch.device("cpu"), "hpu-graphs")


class CpuWithCapturedGraphs(CpuRuntime):
    """CPU tensors; ``capture_graphs`` records the request and leaves the module as it is."""

    def capture_graphs(self, module, training, max_graphs=None):
        return module


@pytest.mark.parametrize("mode", ["eager", "hpu-graphs"])
def test_trainer_zeroes_grads_in_place_under_captured_graphs(monkeypatch, tiny_model_dir, tmp_path, mode):
    from paca_core.files.assets import load_model_and_tokenizer
    from paca_core.data.dataset import load_dataset, split_held_out

    monkeypatch.setitem(registry._RUNTIMES, "cpu", CpuWithCapturedGraphs())
    model, tokenizer = load_model_and_tokenizer(str(tiny_model_dir))
    paca = prepare_model(model, PaCAConfig(r=4), device="cpu")
    devices.apply_graph_mode(paca.base_model, torch.device("cpu"), mode)
    text = tmp_path / "t.txt"
    text.write_text(SAMPLE_TEXT)
    data, _ = split_held_out(load_dataset(text, tokenizer, 16), 0.1, 0)
    args = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=2, batch_size=2, progress=False)
    Trainer(paca, args, data, torch.device("cpu")).train()
    grads = [p.grad for p in paca.trainable_parameters()]
    if mode == "hpu-graphs":
        assert all(g is not None and not g.any() for g in grads)  # same buffers, zeroed in place
    else:
        assert all(g is None for g in grads)


# --- real Gaudi (skipped without one; not yet run on hardware) -----------------------------------


def _graph_compilations() -> int:
    from habana_frameworks.torch.hpu.metrics import metric_global

    return dict(metric_global("graph_compilation").stats())["TotalNumber"]


@pytest.mark.parametrize("marks", [pytest.param(None, marks=requires_lazy_hpu)])
def test_paca_training_on_hpu_lazy_mode_stops_compiling(marks, tiny_model_dir, tmp_path):
    """Same-shape steps must reuse the cached lazy graphs: no new compilations after warm-up."""
    from paca_core.files.assets import load_model_and_tokenizer
    from paca_core.data.dataset import load_dataset, split_held_out

    hpu = devices.resolve_device("hpu")
    model, tokenizer = load_model_and_tokenizer(str(tiny_model_dir))
    paca = prepare_model(model, PaCAConfig(r=4), device=hpu)
    text = tmp_path / "t.txt"
    text.write_text(SAMPLE_TEXT)
    data, _ = split_held_out(load_dataset(text, tokenizer, 16), 0.1, 0)
    warm = Trainer(paca, TrainingArguments(output_dir=str(tmp_path / "a"), max_steps=3, batch_size=2, progress=False), data, hpu)
    warm.train()
    assert type(warm.optimizer).__name__ == "FusedAdamW"
    before = _graph_compilations()
    more = Trainer(paca, TrainingArguments(output_dir=str(tmp_path / "b"), max_steps=3, batch_size=2, progress=False), data, hpu)
    more.optimizer.load_state_dict(warm.optimizer.state_dict())
    more.train()
    assert _graph_compilations() - before <= 2  # a fresh optimizer/scheduler object may add its own graphs once
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in more.state.history)
    stats = devices.memory_stats(hpu)
    assert stats.peak_bytes >= stats.current_bytes > 0 and stats.total_bytes


@pytest.mark.parametrize("marks", [pytest.param(None, marks=requires_hpu)])
def test_fused_adamw_on_hpu_matches_torch_adamw_on_cpu(marks):
    torch.manual_seed(0)
    start, grads = torch.randn(32, 32), [torch.randn(32, 32) for _ in range(3)]
    on_hpu = torch.nn.Parameter(start.clone().to("hpu"))
    on_cpu = torch.nn.Parameter(start.clone())
    fused = devices.make_adamw([on_hpu], "hpu", lr=1e-2, weight_decay=0.1)
    reference = torch.optim.AdamW([on_cpu], lr=1e-2, weight_decay=0.1)
    assert type(fused).__name__ == "FusedAdamW"
    for grad in grads:
        on_hpu.grad, on_cpu.grad = grad.to("hpu"), grad.clone()
        fused.step()
        reference.step()
        devices.step_boundary("hpu")
    torch.testing.assert_close(on_hpu.detach().cpu(), on_cpu.detach(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("marks", [pytest.param(None, marks=requires_hpu)])
def test_hpu_streams_and_memory_stats(marks):
    from .test_device_streams import _copy_on_side_stream

    hpu = devices.resolve_device("hpu")
    devices.reset_peak_memory_stats(hpu)
    host = torch.randn(512, 512)
    result = _copy_on_side_stream(hpu, host)
    devices.synchronize(hpu)
    torch.testing.assert_close(result.cpu(), host * 2)
    assert devices.memory_stats(hpu).peak_bytes >= host.numel() * 4
    assert os.environ.get("PT_HPU_LAZY_MODE") in (None, "0", "1")
