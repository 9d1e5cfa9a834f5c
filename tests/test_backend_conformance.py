"""One test body per primitive, run where a backend runs different code (cases: conftest.backend_cases).

Each test names the primitives it exercises (``@pytest.mark.primitives``); it runs on every registered
device present (CPU always) and, on CPU tensors, on every device backend that overrides one of them.
"""
import pytest
import torch
import torch.nn.functional as F

from backends import CudaBackend, HpuBackend, TorchBackend, get_backend, overridden_primitives

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _reference(x, weight, bias, indices, grad_output):
    """Dense float64 autograd: the full-weight gradient restricted to the chosen columns."""
    x64 = x.detach().double().requires_grad_(True)
    w64 = weight.detach().double().requires_grad_(True)
    b64 = bias.detach().double().requires_grad_(True) if bias is not None else None
    out = F.linear(x64, w64, b64)
    out.backward(grad_output.double())
    return out, x64.grad, w64.grad[:, indices], (b64.grad if b64 is not None else None)


@pytest.mark.primitives("skinny_grad_fp32")
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
@pytest.mark.parametrize("tokens", [1, 37, 300])
def test_skinny_grad_fp32_matches_float64(backend_and_device, dtype, tokens):
    backend, device = backend_and_device
    gen = torch.Generator().manual_seed(tokens)
    a = torch.randn(tokens, 6, generator=gen).to(device, dtype)
    b = torch.randn(tokens, 3, generator=gen).to(device, dtype)
    result = backend.skinny_grad_fp32(a, b)
    assert result.shape == (6, 3)
    assert result.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    tol = backend.tolerance(dtype)
    torch.testing.assert_close(result.double(), a.double().t() @ b.double(), rtol=tol.rtol, atol=tol.atol * tokens)


@pytest.mark.primitives("skinny_grad_fp32")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_skinny_grad_fp32_keeps_sums_half_precision_would_lose(backend_and_device, dtype):
    """4096 ones: a bf16 running sum stops at 256, an fp16 one at 2048; float32 accumulation is exact."""
    backend, device = backend_and_device
    ones = torch.ones(4096, 2, dtype=dtype, device=device)
    assert torch.equal(backend.skinny_grad_fp32(ones, ones).cpu(), torch.full((2, 2), 4096.0))


@pytest.mark.primitives("partial_connection_forward", "partial_connection_backward", "skinny_grad_fp32")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("shape", [(3, 5, 24), (7, 24), (2, 2, 3, 24)])
def test_partial_connection_matches_dense_autograd(backend_and_device, dtype, with_bias, shape):
    backend, device = backend_and_device
    gen = torch.Generator().manual_seed(1234)
    out_features, r = 16, 5
    x = torch.randn(*shape, generator=gen).to(device, dtype)
    weight = torch.randn(out_features, shape[-1], generator=gen).to(device, dtype)
    bias = torch.randn(out_features, generator=gen).to(device, dtype) if with_bias else None
    indices = torch.randperm(shape[-1], generator=gen)[:r].sort().values.to(device)
    grad_output = torch.randn(*shape[:-1], out_features, generator=gen).to(device, dtype)

    output, x_selected = backend.partial_connection_forward(x, weight, bias, indices)
    grads = backend.partial_connection_backward(grad_output, x_selected, weight, True, True, with_bias)
    ref_out, ref_dx, ref_dcols, ref_db = _reference(x, weight, bias, indices, grad_output)

    tol = backend.tolerance(dtype)
    assert x_selected.shape == (*shape[:-1], r) and x_selected.dtype == dtype
    torch.testing.assert_close(x_selected, x[..., indices])
    torch.testing.assert_close(output.double(), ref_out.detach(), rtol=tol.rtol, atol=tol.atol * shape[-1])
    torch.testing.assert_close(grads.input.double(), ref_dx, rtol=tol.rtol, atol=tol.atol * out_features)
    assert grads.delta.dtype == torch.float32  # accumulated and returned in fp32 for every input dtype here
    n_tokens = x.numel() // shape[-1]
    torch.testing.assert_close(grads.delta.double(), ref_dcols, rtol=tol.rtol, atol=tol.atol * n_tokens)
    if with_bias:
        torch.testing.assert_close(grads.bias.double(), ref_db, rtol=tol.rtol, atol=tol.atol * n_tokens)
    else:
        assert grads.bias is None


@pytest.mark.primitives("partial_connection_forward", "partial_connection_backward", "skinny_grad_fp32")
def test_backward_skips_unneeded_grads(backend_and_device):
    backend, device = backend_and_device
    x = torch.randn(4, 8, device=device)
    weight = torch.randn(6, 8, device=device)
    indices = torch.tensor([1, 5], device=device)
    _, x_sel = backend.partial_connection_forward(x, weight, None, indices)
    grads = backend.partial_connection_backward(torch.randn(4, 6, device=device), x_sel, weight, False, True, False)
    assert grads.input is None and grads.bias is None and grads.delta.shape == (6, 2)


@pytest.mark.primitives("write_adapted_columns")
@pytest.mark.parametrize("dtype", DTYPES)
def test_write_adapted_columns(backend_and_device, dtype):
    backend, device = backend_and_device
    gen = torch.Generator().manual_seed(7)
    weights, indices, originals, deltas, scalings = [], [], [], [], []
    for out_f, in_f, r, scale in [(6, 10, 3, 2.0), (4, 12, 12, 0.5)]:
        w = torch.randn(out_f, in_f, generator=gen).to(device, dtype)
        idx = torch.randperm(in_f, generator=gen)[:r].sort().values.to(device)
        weights.append(w)
        indices.append(idx)
        originals.append(w[:, idx].clone())
        deltas.append(torch.randn(out_f, r, generator=gen).to(device))
        scalings.append(scale)
    before = [w.clone() for w in weights]
    backend.write_adapted_columns(weights, indices, originals, deltas, scalings)
    for w, w0, idx, orig, delta, scale in zip(weights, before, indices, originals, deltas, scalings):
        expected = (orig.float() + scale * delta).to(dtype)  # rounded once
        assert torch.equal(w[:, idx], expected)
        untouched = torch.ones(w.shape[1], dtype=torch.bool, device=device)
        untouched[idx] = False
        assert torch.equal(w[:, untouched], w0[:, untouched])


def test_portable_skinny_grad_upcasts_in_chunks(monkeypatch):
    import backends.portable as portable

    monkeypatch.setattr(portable, "_FP32_CHUNK_BYTES", 64)  # force many chunks
    a = torch.randn(37, 5, dtype=torch.bfloat16)
    b = torch.randn(37, 3, dtype=torch.bfloat16)
    expected = a.double().t() @ b.double()
    torch.testing.assert_close(TorchBackend("cpu").skinny_grad_fp32(a, b).double(), expected, rtol=1e-6, atol=1e-6)


def test_cuda_skinny_grad_takes_the_fp32_output_gemm_where_torch_has_it(monkeypatch):
    """CudaBackend's fast path, checked without a GPU: meta tensors run the schema of
    ``torch.mm(..., out_dtype=float32)`` (shape and dtype rules); CPU has no such kernel, so the
    override falls back to the portable chunked upcast (and learns that once per device type)."""
    fallbacks = []
    portable = TorchBackend.skinny_grad_fp32
    monkeypatch.setattr(TorchBackend, "skinny_grad_fp32", lambda self, a, b: fallbacks.append(a.device.type) or portable(self, a, b))
    backend = CudaBackend()
    meta = backend.skinny_grad_fp32(torch.empty(64, 8, dtype=torch.bfloat16, device="meta"), torch.empty(64, 3, dtype=torch.bfloat16, device="meta"))
    assert meta.shape == (8, 3) and meta.dtype == torch.float32 and fallbacks == []
    a, b = torch.randn(64, 8, dtype=torch.bfloat16), torch.randn(64, 3, dtype=torch.bfloat16)
    for _ in range(2):
        torch.testing.assert_close(backend.skinny_grad_fp32(a, b), a.float().t() @ b.float(), rtol=1e-5, atol=1e-4)
    assert fallbacks == ["cpu", "cpu"]
    backend.skinny_grad_fp32(a.float(), b.float())  # fp32 operands: nothing to gain, the portable GEMM
    assert fallbacks == ["cpu", "cpu", "cpu"]


def test_overrides_are_what_the_backends_declare():
    assert overridden_primitives(CudaBackend) == ("skinny_grad_fp32",)
    assert overridden_primitives(HpuBackend) == ()  # tolerances only: runs the portable code
    assert overridden_primitives(TorchBackend) == ()


def test_get_backend_registry():
    assert get_backend("cpu").device_type == "cpu"
    assert get_backend(torch.device("cpu")) is get_backend("cpu")
    assert type(get_backend("cpu")) is TorchBackend
    assert type(get_backend(torch.device("hpu"))) is HpuBackend
    assert type(get_backend(torch.device("cuda", 1))) is CudaBackend
    with pytest.raises(ValueError, match="holds no data"):
        get_backend(torch.device("meta"))


@pytest.mark.parametrize("device_type", ["xpu", "mps"])
def test_device_types_without_a_backend_get_the_portable_one(device_type):
    backend = get_backend(torch.device(device_type))
    assert type(backend) is TorchBackend and backend.device_type == device_type
    assert get_backend(device_type) is backend  # no runtime here: the string is not resolved, just parsed


@pytest.mark.primitives("compress", "decompress", "subtoken_mean_direction")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("d, groups", [(32, 4), (30, 4), (7, 7)])
def test_compress_decompress_and_projection(backend_and_device, dtype, d, groups):
    backend, device = backend_and_device
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(3, 5, d, generator=gen).to(device, dtype)
    group_dim = -(-d // groups)
    padded = torch.nn.functional.pad(x.double(), (0, groups * group_dim - d)).reshape(-1, groups, group_dim)

    direction = backend.subtoken_mean_direction(x, groups)
    expected_direction = padded.reshape(-1, group_dim).mean(0)
    expected_direction = expected_direction / expected_direction.norm()
    tol = backend.tolerance(dtype)
    assert direction.dtype == torch.float32 and direction.shape == (group_dim,)
    torch.testing.assert_close(direction.double(), expected_direction, rtol=tol.rtol, atol=tol.atol)

    coefficients = backend.compress(x, direction, groups)
    assert coefficients.shape == (15, groups) and coefficients.dtype == dtype
    expected_coefficients = padded @ direction.double()
    torch.testing.assert_close(coefficients.double(), expected_coefficients, rtol=tol.rtol, atol=tol.atol * group_dim)

    rebuilt = backend.decompress(coefficients, direction, d)
    assert rebuilt.shape == (15, d)
    expected_rebuilt = (coefficients.double().unsqueeze(-1) * direction.double()).reshape(15, -1)[:, :d]
    torch.testing.assert_close(rebuilt.double(), expected_rebuilt, rtol=tol.rtol, atol=tol.atol)


@pytest.mark.primitives("subtoken_mean_direction")
def test_projection_of_all_zero_input_is_a_unit_vector(backend_and_device):
    backend, device = backend_and_device
    direction = backend.subtoken_mean_direction(torch.zeros(4, 12, device=device), 3)
    torch.testing.assert_close(direction.norm().cpu(), torch.tensor(1.0))
