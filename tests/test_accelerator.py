"""The accelerator tier: what only a real GPU or Gaudi can prove, run by ``paca doctor`` (``pytest -m accelerator``).

Every test takes ``device``: the device named by ``$PACA_TEST_DEVICE`` (the doctor sets it; ``cpu`` in its dry run,
where the same code runs on host tensors), else every registered accelerator runtime, skipped where absent, so CI
without a GPU skips the whole module cleanly. Covered here: each Backend primitive against the portable backend on
CPU (fp32/bf16/fp16); each method's forward and backward against dense autograd on the device (or, where a method
is not a dense weight update, against its own CPU reference); graph modes against eager; MEFT's host<->device rows,
activation offload and copy/compute overlap; the device's AdamW; checkpoint save/resume bit-exact; DDP with the
device's collectives on one device. The backend conformance suite's accelerator cases and the tests marked
``gpu``/``hpu`` elsewhere belong to the tier too (tests/conftest.py adds the marker).
"""
from __future__ import annotations

import copy
import importlib.util
import math
import os
import socket
import tempfile
import time

import pytest
import torch

import devices
from backends import TorchBackend, get_backend
from paca_core import LoRAConfig, LoRAFAConfig, MEFTConfig, PaCAConfig, VeLoRAConfig, prepare_model

from .conftest import tiny_llama

pytestmark = pytest.mark.accelerator

HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _device_params() -> list:
    chosen = os.environ.get("PACA_TEST_DEVICE")
    if chosen:
        return [pytest.param(chosen, id=chosen.replace(":", ""))]
    available = set(devices.available_device_types())
    return [pytest.param(r.name, id=r.name, marks=() if r.name in available else
                         pytest.mark.skip(reason=f"no {r.name} device here (the accelerator tier runs under paca doctor, or with PACA_TEST_DEVICE)"))
            for r in devices.registered_runtimes() if not r.shares_host_memory]


@pytest.fixture(params=_device_params())
def device(request) -> torch.device:
    return devices.resolve_device(request.param)


def _host_device(device: torch.device) -> bool:
    return devices.shares_host_memory(device)


def _relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    got, expected = got.detach().double().cpu(), expected.detach().double().cpu()
    return float((got - expected).abs().max() / expected.abs().max().clamp_min(1e-12))


# --- 1. every Backend primitive against the portable backend on CPU, fp32/bf16/fp16 ----------------------


def _primitive_outputs(backend, case: str, dtype: torch.dtype, device: torch.device,
                       compute: torch.dtype | None = None) -> tuple[list[torch.Tensor], int]:
    """The outputs of one group of primitives on ``device`` (inputs drawn on CPU, the same every call, rounded to
    ``dtype`` and computed in ``compute``, default ``dtype``), and the length of their longest reduction (it scales
    the absolute tolerance)."""
    gen = torch.Generator().manual_seed(11)
    compute = compute or dtype

    def t(*shape):
        return torch.randn(*shape, generator=gen).to(dtype).to(device, compute)

    if case == "skinny_grad_fp32":
        return [backend.skinny_grad_fp32(t(300, 6), t(300, 3))], 300
    if case == "partial_connection":
        x, weight, bias, grad = t(2, 7, 24), t(16, 24), t(16), t(2, 7, 16)
        indices = torch.randperm(24, generator=gen)[:5].sort().values.to(device)
        out, selected = backend.partial_connection_forward(x, weight, bias, indices)
        grads = backend.partial_connection_backward(grad, selected, weight, True, True, True)
        return [out, selected, grads.input, grads.delta, grads.bias], 24
    if case == "write_adapted_columns":
        weight, original = t(16, 24), t(16, 5)
        delta = torch.randn(16, 5, generator=gen).to(device)
        indices = torch.randperm(24, generator=gen)[:5].sort().values.to(device)
        backend.write_adapted_columns([weight], [indices], [original], [delta], [2.0])
        return [weight], 1
    if case == "velora":
        x = t(10, 24)
        projection = backend.subtoken_mean_direction(x, 4)
        coefficients = backend.compress(x, projection, 4)
        return [projection, coefficients, backend.decompress(coefficients, projection, 24)], 24
    if case == "sparse_rows":
        x, keys, values, grad = t(12, 8), t(6, 8), t(6, 8), t(12, 8)
        slots = torch.randint(0, 6, (12, 2), generator=gen).to(device)
        gates = torch.rand(12, 2, generator=gen).to(dtype).to(device, compute)
        out, scores = backend.sparse_rows_forward(x, keys, values, slots, gates)
        return [out, scores, *backend.sparse_rows_backward(grad, x, keys, values, slots, gates, scores)], 12
    if case == "quantized_partial_connection":
        import bitsandbytes.functional as bnbf

        weight = torch.randn(32, 64, generator=gen).to(torch.bfloat16)
        packed, state = bnbf.quantize_4bit(weight, blocksize=64, quant_type="nf4")
        packed, state = packed.to(device), state.to(device) or state
        x, delta, grad = t(3, 64), torch.randn(32, 4, generator=gen).to(device), t(3, 32)
        indices = torch.tensor([1, 9, 30, 50], device=device)
        out, selected = backend.quantized_partial_connection_forward(x, packed, state, None, delta, indices, 2.0)
        grads = backend.quantized_partial_connection_backward(grad, selected, packed, state, delta, indices, 2.0, True, True, False)
        return [out, selected, grads.input, grads.delta], 64
    raise AssertionError(case)


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("case", ["skinny_grad_fp32", "partial_connection", "write_adapted_columns", "velora", "sparse_rows",
                                  "quantized_partial_connection"])
def test_backend_primitive_matches_the_cpu_reference(device, case, dtype):
    if case == "quantized_partial_connection" and not HAS_BNB:
        pytest.skip("bitsandbytes is not installed (pip install 'paca-hal[quant]')")
    backend = get_backend(device)
    got, length = _primitive_outputs(backend, case, dtype, device)
    # The reference: the portable code on CPU, computing in fp32 from the same inputs rounded to ``dtype``.
    expected, _ = _primitive_outputs(TorchBackend(), case, dtype, torch.device("cpu"), compute=torch.float32)
    tol = backend.tolerance(dtype)
    assert len(got) == len(expected)
    for index, (g, e) in enumerate(zip(got, expected)):
        assert g.device.type == device.type and g.shape == e.shape, (case, index)
        error = float((g.detach().double().cpu() - e.double()).abs().max())
        allowed = tol.atol * math.sqrt(length) + tol.rtol * float(e.abs().max())
        assert error <= allowed, f"{case} output {index} in {dtype}: max error {error:.3g} > {allowed:.3g}"


# --- 2. each method's forward and backward against dense autograd on the device --------------------------

DENSE_METHODS = {
    "paca": lambda: PaCAConfig(r=4),
    "qpaca": lambda: PaCAConfig(r=4, quantize="nf4"),
    "lora": lambda: LoRAConfig(r=4),
    "lorafa": lambda: LoRAFAConfig(r=4),
}
#: Relative error allowed against dense fp32 autograd, by the dtype the base runs in.
DENSE_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 6e-2, torch.float16: 1e-2}


def _randomise_adapters(model, seed: int = 3) -> None:
    """Non-zero deltas and B matrices (zero ones would make the checks vacuous), drawn on CPU."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and ("paca_delta" in name or "lora_B" in name):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    model.sync_adapters()


def _ids(device, batch=2, length=16, seed=0):
    return torch.randint(0, 128, (batch, length), generator=torch.Generator().manual_seed(seed)).to(device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("method", list(DENSE_METHODS))
def test_method_forward_and_backward_match_dense_autograd(device, method, dtype):
    if method == "qpaca" and not HAS_BNB:
        pytest.skip("QPaCA needs bitsandbytes (pip install 'paca-hal[quant]')")
    if method == "qpaca" and dtype == torch.float32:
        pytest.skip("QPaCA runs on a bf16/fp16 compute dtype")
    from paca_core.memory.quantization import merge_and_dequantize

    adapted = prepare_model(tiny_llama(seed=0, dtype=dtype), DENSE_METHODS[method](), device=device)
    _randomise_adapters(adapted)
    merged = merge_and_dequantize(copy.deepcopy(adapted)) if method == "qpaca" else copy.deepcopy(adapted).merge_and_unload()
    dense = merged.float()
    dense_modules = dict(dense.named_modules())
    layers = adapted.adapter_layers()
    for name in layers:
        dense_modules[name].weight.requires_grad_(True)
    ids = _ids(device)
    loss = adapted(input_ids=ids, labels=ids).loss
    loss.backward()
    dense_loss = dense(input_ids=ids, labels=ids).loss
    dense_loss.backward()
    tol = DENSE_TOLERANCE[dtype]
    loss, dense_loss = float(loss.detach()), float(dense_loss.detach())
    assert abs(loss - dense_loss) <= tol * abs(dense_loss), (loss, dense_loss)
    checked = 0
    for name, layer in layers.items():
        weight_grad = dense_modules[name].weight.grad.float()
        if method in ("paca", "qpaca"):
            pairs = [(layer.paca_delta.grad, weight_grad[:, layer.paca_indices] * layer.scaling)]
        else:
            a, b = layer.lora_A.detach().float(), layer.lora_B.detach().float()
            pairs = [(layer.lora_B.grad, layer.scaling * weight_grad @ a.t())]
            if layer.lora_A.requires_grad:
                pairs.append((layer.lora_A.grad, layer.scaling * b.t() @ weight_grad))
            else:
                assert layer.lora_A.grad is None, name  # LoRA-FA: A frozen
        for got, expected in pairs:
            assert got is not None and got.device.type == device.type and got.dtype == torch.float32, name
            assert _relative_error(got, expected) <= tol, f"{name}: {_relative_error(got, expected):.3g}"
            checked += 1
    assert checked >= len(layers)


REFERENCE_METHODS = {
    "lora+velora": lambda: [LoRAConfig(r=4), VeLoRAConfig(num_groups=4)],
    "meft": lambda: MEFTConfig(num_rows=64, top_k=4, rows_per_step=32),
    "paca+meft": lambda: [PaCAConfig(r=4), MEFTConfig(num_rows=64, top_k=4, rows_per_step=32)],
}


def _loss_and_grads(model, ids):
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    for layer in model.adapter_layers().values():
        if getattr(layer, "table", None) is not None:
            layer.table.collect()  # MEFT's row gradients come home
    grads = {n: p.grad.detach().float().cpu() for n, p in model.named_parameters() if p.grad is not None}
    for name, layer in model.adapter_layers().items():
        if getattr(layer, "table", None) is not None:
            grads[f"{name}.grad_keys"] = layer.table.grad_keys.detach().float().cpu()
            grads[f"{name}.grad_values"] = layer.table.grad_values.detach().float().cpu()
    return float(loss), grads


@pytest.mark.parametrize("method", list(REFERENCE_METHODS))
def test_method_on_the_device_matches_its_cpu_reference(device, method):
    """VeLoRA (a compressed input in backward) and MEFT (host rows) are not dense weight updates; their CPU tests
    check them against their own references, and here the device run must match the CPU run."""
    dtype = torch.float32

    def build(where):
        torch.manual_seed(0)
        model = prepare_model(tiny_llama(seed=0, dtype=dtype), REFERENCE_METHODS[method](), device=where)
        _randomise_adapters(model)
        model.train()
        return model

    ids = _ids("cpu")
    expected_loss, expected = _loss_and_grads(build("cpu"), ids)
    on_device = build(device)
    loss, got = _loss_and_grads(on_device, ids.to(device))
    assert abs(loss - expected_loss) <= 1e-4 * abs(expected_loss)
    assert got.keys() == expected.keys() and got
    for name in expected:
        assert _relative_error(got[name], expected[name]) <= 1e-3 or float(expected[name].abs().max()) == 0, name
    if "meft" in method:
        traffic = on_device.host_traffic()
        assert traffic["selected_rows"] > 0
        if _host_device(device):
            assert traffic["copied_to_device_bytes"] == 0  # nothing crosses where device memory is host memory
        else:  # the rows went to the device and their gradients came back
            assert traffic["copied_to_device_bytes"] > 0 and traffic["copied_to_host_bytes"] > 0, traffic


# --- 3. graph modes against eager ----------------------------------------------------------------------


def _train_losses(device, graph_mode: str, steps: int = 3) -> list[float]:
    from paca_core.train.steps import grads_to_none, train_step

    dtype = devices.default_dtype(device)
    model = prepare_model(tiny_llama(seed=0, dtype=dtype), PaCAConfig(r=4), device=device)
    _randomise_adapters(model)
    model.train()
    devices.apply_graph_mode(model, device, graph_mode)
    params = model.trainable_parameters()
    optimizer = devices.make_adamw(params, device, lr=1e-2, eps=1e-8)
    losses = []
    for step in range(steps):
        ids = _ids(device, seed=step)
        result = train_step(lambda b: model(input_ids=b, labels=b).loss, [ids], optimizer, device, params=params,
                            set_to_none=grads_to_none(model))
        losses.append(float(result.loss))
    return losses


@pytest.mark.slow  # compiling takes tens of seconds: the full tier (paca doctor without --quick) runs it
@pytest.mark.parametrize("mode", [m for m in devices.graph_mode_choices() if m not in ("auto", "eager")])
def test_graph_mode_trains_like_eager(device, mode):
    try:
        devices.resolve_graph_mode(device, mode)
    except (devices.DeviceUnavailableError, devices.InvalidDeviceError) as error:
        pytest.skip(str(error))
    eager_mode = "eager" if "eager" in [m.name for m in devices.runtime_for(device).graph_modes] else devices.default_graph_mode(device)
    try:
        devices.resolve_graph_mode(device, eager_mode)
    except devices.DeviceUnavailableError:  # HPU lazy mode fixed at start: its default (lazy) is the baseline
        eager_mode = devices.default_graph_mode(device)
    expected = _train_losses(device, eager_mode)
    got = _train_losses(device, mode)
    tolerance = 1e-4 if devices.default_dtype(device) == torch.float32 else 3e-2
    for step, (g, e) in enumerate(zip(got, expected)):
        assert abs(g - e) <= tolerance * abs(e), (step, got, expected)


# --- 4. host<->device transfers: activation offload and copy/compute overlap --------------------------


def test_activation_offload_is_exact_and_moves_bytes(device):
    from paca_core.memory.offload import offload_activations

    model = prepare_model(tiny_llama(seed=0), LoRAConfig(r=4), device=device)
    _randomise_adapters(model)
    ids = _ids(device)
    expected_loss, expected = _loss_and_grads(model, ids)
    model.zero_grad(set_to_none=True)
    handle = offload_activations(model, "decoder-layers", min_bytes=1)
    loss, got = _loss_and_grads(model, ids)
    handle.remove()
    assert loss == expected_loss
    for name in expected:
        assert torch.equal(got[name], expected[name]), name
    if _host_device(device):
        assert handle.stats.offloaded_bytes == 0  # a pass-through where activations already live in host memory
    else:
        assert handle.stats.offloaded_bytes > 0 and handle.stats.offloaded_bytes == handle.stats.reloaded_bytes


def test_host_to_device_copies_overlap_compute(device):
    """A copy on the transfer stream runs while the compute stream multiplies: together they take clearly less
    than one after the other. Needs a device with its own memory whose streams run concurrently (CUDA; HPU work
    runs in program order whatever the stream, so there is nothing to overlap)."""
    if _host_device(device) or device.type != "cuda":
        pytest.skip(f"{device.type}: no concurrent copy and compute streams to overlap")
    host = devices.host_tensor((64 << 20,), torch.float32, device)  # 256 MiB, pinned
    a = torch.randn(4096, 4096, device=device, dtype=torch.bfloat16)

    def timed(fn) -> float:
        devices.synchronize(device)
        started = time.perf_counter()
        fn()
        devices.synchronize(device)
        return time.perf_counter() - started

    copy_s = min(timed(lambda: devices.copy_to_device(host, device).wait()) for _ in range(3))
    gemm_s = min(timed(lambda: a @ a) for _ in range(3))
    repeats = max(1, round(copy_s / gemm_s))

    def compute():
        for _ in range(repeats):
            a @ a

    compute_s = min(timed(compute) for _ in range(3))

    def both():
        transfer = devices.copy_to_device(host, device)
        compute()
        transfer.wait()

    together = min(timed(both) for _ in range(3))
    assert together < 0.85 * (copy_s + compute_s), (together, copy_s, compute_s)


# --- 5. the device's AdamW ------------------------------------------------------------------------------


def test_device_adamw_matches_torch_adamw_on_cpu(device):
    torch.manual_seed(0)
    start = torch.randn(64, 64)
    grads = [torch.randn(64, 64) for _ in range(3)]
    param = torch.nn.Parameter(start.clone().to(device))
    optimizer = devices.make_adamw([param], device, lr=1e-2, weight_decay=0.1, eps=1e-8)
    if device.type == "cuda":
        assert optimizer.param_groups[0]["fused"] is True
    reference = torch.nn.Parameter(start.clone())
    expected = torch.optim.AdamW([reference], lr=1e-2, weight_decay=0.1, eps=1e-8)
    for grad in grads:
        param.grad, reference.grad = grad.to(device), grad.clone()
        optimizer.step()
        expected.step()
        devices.step_boundary(device)
    torch.testing.assert_close(param.detach().cpu(), reference.detach(), rtol=1e-5, atol=1e-6)


# --- 6. checkpoint save and resume, bit-exact on the device ---------------------------------------------


def _trainer(device, out, steps):
    from paca_core.data.dataset import TokenizedData
    from paca_core.train.trainer import Trainer, TrainingArguments

    ids = torch.randint(0, 128, (16, 16), generator=torch.Generator().manual_seed(5))
    data = TokenizedData(ids, ids.clone(), torch.ones_like(ids), source="random")
    model = prepare_model(tiny_llama(seed=0, dtype=devices.default_dtype(device)), PaCAConfig(r=4, seed=1), device=device)
    args = TrainingArguments(output_dir=str(out), max_steps=steps, batch_size=2, lr=1e-2, warmup_steps=1, progress=False, log_every=1)
    return Trainer(model, args, data, device)


def test_checkpoint_resume_is_bit_exact(device, tmp_path):
    straight = _trainer(device, tmp_path / "a", steps=4)
    straight.train()
    interrupted = _trainer(device, tmp_path / "b", steps=4)

    def stop_after_the_second_step(optimizer, args, kwargs):
        if interrupted.state.step == 1:  # Ctrl-C arrives while the second step runs: it finishes, is saved, the run stops
            interrupted._stop_requested = True

    interrupted.optimizer.register_step_post_hook(stop_after_the_second_step)
    with pytest.raises(KeyboardInterrupt):
        interrupted.train()
    resumed = _trainer(device, tmp_path / "b", steps=4)
    resumed.resume_from(tmp_path / "b" / "checkpoint")
    assert resumed.state.step == 2
    resumed.train()
    expected = {n: layer.paca_delta for n, layer in straight.model.adapter_layers().items()}
    for name, layer in resumed.model.adapter_layers().items():
        assert layer.paca_delta.device.type == device.type
        assert torch.equal(layer.paca_delta, expected[name]), name
    assert resumed.state.history[-1]["loss"] == straight.state.history[-1]["loss"]


# --- 7. DDP on one device with the device's collectives (NCCL, HCCL; gloo on CPU) -----------------------


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _ddp_worker(rank: int, device_text: str, port: int, result_file: str) -> None:
    import torch.distributed as dist

    device = devices.resolve_device(device_text)
    runtime = devices.runtime_for(device)
    runtime.prepare_distributed()
    dist.init_process_group(runtime.distributed_backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        single = prepare_model(tiny_llama(seed=0), PaCAConfig(r=4), device=device)
        _randomise_adapters(single)
        replica = copy.deepcopy(single)
        ddp = torch.nn.parallel.DistributedDataParallel(replica, device_ids=runtime.ddp_device_ids(device))
        ids = _ids(device)
        single(input_ids=ids, labels=ids).loss.backward()
        ddp(input_ids=ids, labels=ids).loss.backward()
        devices.synchronize(device)
        result = {"backend": dist.get_backend(),
                  "grads": {n: (p.grad.cpu(), q.grad.cpu()) for (n, p), (_, q) in zip(single.named_parameters(), replica.named_parameters())
                            if p.grad is not None}}
        torch.save(result, result_file)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # launches a process
def test_ddp_on_one_device_uses_its_collectives_and_changes_nothing(device, tmp_path):
    import torch.multiprocessing as mp

    result_file = str(tmp_path / "ddp.pt")
    mp.start_processes(_ddp_worker, args=(str(device), _free_port(), result_file), nprocs=1, join=True, start_method="spawn")
    result = torch.load(result_file, weights_only=False)
    assert result["backend"] == devices.runtime_for(device).distributed_backend
    assert result["grads"]
    for name, (alone, under_ddp) in result["grads"].items():  # the all-reduce over one rank averages nothing away
        assert torch.equal(alone, under_ddp), name
