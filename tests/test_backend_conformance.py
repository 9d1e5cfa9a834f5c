"""One test body per primitive, run against every backend available here (see conftest.BACKEND_CASES)."""
import pytest
import torch
import torch.nn.functional as F

from backends import get_backend, matmul_t_fp32

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _reference(x, weight, bias, indices, grad_output):
    """Dense float64 autograd: the full-weight gradient restricted to the chosen columns."""
    x64 = x.detach().double().requires_grad_(True)
    w64 = weight.detach().double().requires_grad_(True)
    b64 = bias.detach().double().requires_grad_(True) if bias is not None else None
    out = F.linear(x64, w64, b64)
    out.backward(grad_output.double())
    return out, x64.grad, w64.grad[:, indices], (b64.grad if b64 is not None else None)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("shape", [(3, 5, 24), (7, 24), (2, 2, 3, 24)])
def test_partial_connection_matches_dense_autograd(backend_and_device, dtype, with_bias, shape):
    backend, device = backend_and_device
    if dtype == torch.float16 and device.type == "cpu" and backend.name == "hpu":
        pytest.skip("Gaudi does not use fp16 training")
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


def test_backward_skips_unneeded_grads(backend_and_device):
    backend, device = backend_and_device
    x = torch.randn(4, 8, device=device)
    weight = torch.randn(6, 8, device=device)
    indices = torch.tensor([1, 5], device=device)
    _, x_sel = backend.partial_connection_forward(x, weight, None, indices)
    grads = backend.partial_connection_backward(torch.randn(4, 6, device=device), x_sel, weight, False, True, False)
    assert grads.input is None and grads.bias is None and grads.delta.shape == (6, 2)


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


def test_fp32_accumulation_helper_handles_chunks(monkeypatch):
    import backends.portable as portable

    monkeypatch.setattr(portable, "_FP32_CHUNK_BYTES", 64)  # force many chunks
    a = torch.randn(37, 5, dtype=torch.bfloat16)
    b = torch.randn(37, 3, dtype=torch.bfloat16)
    expected = a.double().t() @ b.double()
    torch.testing.assert_close(matmul_t_fp32(a, b).double(), expected, rtol=1e-6, atol=1e-6)


def test_get_backend_registry():
    assert get_backend("cpu").device_type == "cpu"
    assert get_backend(torch.device("cpu")) is get_backend("cpu")
    with pytest.raises(ValueError, match="supported"):
        get_backend(torch.device("meta"))


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


def test_projection_of_all_zero_input_is_a_unit_vector(backend_and_device):
    backend, device = backend_and_device
    direction = backend.subtoken_mean_direction(torch.zeros(4, 12, device=device), 3)
    torch.testing.assert_close(direction.norm().cpu(), torch.tensor(1.0))
