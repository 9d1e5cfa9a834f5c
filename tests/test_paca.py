"""PaCA layer and model: gradients against dense autograd, saved bytes, determinism, base-weight safety."""
import copy

import pytest
import torch
import torch.nn as nn

from paca_core import PaCAConfig, PaCALinear, TargetModuleError, prepare_model
from paca_core.errors import PacaConfigError
from paca_core.layers.partial_connection import _PartialConnectionLinear
from paca_core.memory.measure import count_saved_tensors

from .conftest import randomise_paca_deltas as _randomise_deltas
from .conftest import tiny_llama


def _dense_reference(paca_model):
    """A plain model with ΔW folded in and every weight trainable: the dense autograd reference."""
    dense = copy.deepcopy(paca_model).merge_and_unload()
    for p in dense.parameters():
        p.requires_grad_(True)
    return dense


@pytest.mark.parametrize("alpha", [None, 32.0])
def test_gradients_match_dense_autograd_float64(alpha):
    model = tiny_llama().double()
    paca = prepare_model(model, PaCAConfig(r=5, alpha=alpha, seed=11), device="cpu").double()
    _randomise_deltas(paca)
    dense = _dense_reference(paca)
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 128, (3, 9), generator=gen)
    embeds = dense.get_input_embeddings()(ids).detach()

    x_ours = embeds.clone().requires_grad_(True)
    paca(inputs_embeds=x_ours, labels=ids).loss.backward()
    x_ref = embeds.clone().requires_grad_(True)
    dense(inputs_embeds=x_ref, labels=ids).loss.backward()

    torch.testing.assert_close(x_ours.grad, x_ref.grad, rtol=1e-10, atol=1e-12)
    dense_modules = dict(dense.named_modules())
    for name, layer in paca.adapter_layers().items():
        full_grad = dense_modules[name].weight.grad
        expected = full_grad[:, layer.paca_indices] * layer.scaling
        torch.testing.assert_close(layer.paca_delta.grad, expected, rtol=1e-10, atol=1e-12, msg=name)


def test_gradients_bf16_within_bf16_tolerance():
    model = tiny_llama()
    paca = prepare_model(model, PaCAConfig(r=4), device="cpu")
    _randomise_deltas(paca)
    dense = _dense_reference(paca)
    paca_bf16 = copy.deepcopy(paca)
    paca_bf16.base_model.to(torch.bfloat16)
    for layer in paca_bf16.adapter_layers().values():  # keep the trainable delta in fp32, as prepare does
        layer.paca_delta.data = layer.paca_delta.data.float()
        layer.paca_original_columns = layer.paca_original_columns.to(torch.bfloat16)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    paca_bf16(input_ids=ids, labels=ids).loss.backward()
    dense(input_ids=ids, labels=ids).loss.backward()
    dense_modules = dict(dense.named_modules())
    for name, layer in paca_bf16.adapter_layers().items():
        assert layer.paca_delta.grad.dtype == torch.float32
        expected = dense_modules[name].weight.grad[:, layer.paca_indices] * layer.scaling
        scale = expected.abs().max().item() + 1e-6
        assert (layer.paca_delta.grad - expected).abs().max().item() <= 0.05 * scale, name


def test_autocast_bf16_gives_fp32_delta_grads():
    paca = prepare_model(tiny_llama(), PaCAConfig(r=4), device="cpu")
    _randomise_deltas(paca)
    dense = _dense_reference(paca)
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(2))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        paca(input_ids=ids, labels=ids).loss.backward()
    dense(input_ids=ids, labels=ids).loss.backward()
    dense_modules = dict(dense.named_modules())
    for name, layer in paca.adapter_layers().items():
        assert layer.paca_delta.grad.dtype == torch.float32
        expected = dense_modules[name].weight.grad[:, layer.paca_indices] * layer.scaling
        assert (layer.paca_delta.grad - expected).abs().max() <= 0.05 * (expected.abs().max() + 1e-6), name


def test_only_selected_columns_are_saved_for_backward():
    torch.manual_seed(0)
    linear = nn.Linear(64, 48, bias=True)
    layer = PaCALinear(linear, r=6, alpha=None, indices=torch.arange(0, 64, 11)[:6])
    x = torch.randn(4, 10, 64, requires_grad=True)
    with count_saved_tensors(layer) as report:
        out = layer(x)
    out.sum().backward()
    assert len(report.saved) == 1
    assert report.saved[0].shape == (4, 10, 6)
    assert report.activation_bytes == 4 * 10 * 6 * 4


def test_indices_deterministic_sorted_unique_and_per_layer():
    a = prepare_model(tiny_llama(seed=0), PaCAConfig(r=6, seed=42), device="cpu")
    b = prepare_model(tiny_llama(seed=1), PaCAConfig(r=6, seed=42), device="cpu")
    c = prepare_model(tiny_llama(seed=0), PaCAConfig(r=6, seed=43), device="cpu")
    idx_a = {n: l.paca_indices for n, l in a.adapter_layers().items()}
    idx_b = {n: l.paca_indices for n, l in b.adapter_layers().items()}
    idx_c = {n: l.paca_indices for n, l in c.adapter_layers().items()}
    assert all(torch.equal(idx_a[n], idx_b[n]) for n in idx_a)
    assert any(not torch.equal(idx_a[n], idx_c[n]) for n in idx_a)
    for idx in idx_a.values():
        assert torch.equal(idx, idx.sort().values) and idx.unique().numel() == idx.numel()
    q = [idx for n, idx in idx_a.items() if n.endswith("q_proj")]
    assert not torch.equal(q[0], q[1])  # same shape, different layer, different columns


@pytest.mark.parametrize(
    "optimizer_kwargs",
    [dict(kind="adamw"), dict(kind="adamw", foreach=True), dict(kind="adamw", fused=True), dict(kind="sgd", momentum=0.9)],
    ids=["adamw", "adamw-foreach", "adamw-fused", "sgd"],
)
def test_training_keeps_weight_in_sync_and_base_recoverable(optimizer_kwargs):
    model = tiny_llama()
    pristine = {n: p.detach().clone() for n, p in model.named_parameters()}
    paca = prepare_model(model, PaCAConfig(r=4), device="cpu")
    kwargs = dict(optimizer_kwargs)
    kind = kwargs.pop("kind")
    opt_cls = torch.optim.AdamW if kind == "adamw" else torch.optim.SGD
    optimizer = opt_cls(paca.trainable_parameters(), lr=1e-2, **kwargs)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        ids = torch.randint(0, 128, (2, 8), generator=gen)
        paca(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        for layer in paca.adapter_layers().values():  # columns rewritten by the optimizer hook
            expected = (layer.paca_original_columns + layer.scaling * layer.paca_delta).to(layer.base_layer.weight.dtype)
            assert torch.equal(layer.base_layer.weight[:, layer.paca_indices], expected)
    assert any(layer.paca_delta.abs().sum() > 0 for layer in paca.adapter_layers().values())

    # The prepared model's state_dict always carries the pretrained base weights.
    state = paca.base_model.state_dict()
    for name, value in pristine.items():
        key = name if name in state else name.replace(".weight", ".base_layer.weight")
        assert torch.equal(state[key], value), name

    with paca.disable_adapter():
        for name, layer in paca.adapter_layers().items():
            assert torch.equal(layer.base_layer.weight, pristine[name + ".weight"])
    base = paca.unload()
    for name, value in base.named_parameters():
        assert torch.equal(value, pristine[name]), name


def test_disabled_adapter_forward_equals_base_and_comes_back():
    model = tiny_llama()
    reference = copy.deepcopy(model)
    paca = prepare_model(model, PaCAConfig(r=4), device="cpu")
    _randomise_deltas(paca, scale=0.5)
    ids = torch.randint(0, 128, (2, 8))
    with torch.no_grad():
        adapted = paca(input_ids=ids).logits
        with paca.disable_adapter():
            torch.testing.assert_close(paca(input_ids=ids).logits, reference(input_ids=ids).logits, rtol=0, atol=0)
        torch.testing.assert_close(paca(input_ids=ids).logits, adapted, rtol=0, atol=0)
    assert not torch.allclose(adapted, reference(input_ids=ids).logits)


def test_in_place_delta_edit_is_picked_up_without_optimizer():
    paca = prepare_model(tiny_llama(), PaCAConfig(r=4), device="cpu")
    layer = next(iter(paca.adapter_layers().values()))
    with torch.no_grad():
        layer.paca_delta.add_(1.0)  # autograd-visible in-place edit bumps the version counter
    paca(input_ids=torch.randint(0, 128, (1, 4)))
    assert torch.equal(layer.base_layer.weight[:, layer.paca_indices], layer.paca_original_columns + 1.0)


def test_gradient_accumulation_and_checkpointing_match_plain_step():
    gen = torch.Generator().manual_seed(9)
    ids = torch.randint(0, 128, (4, 8), generator=gen)
    grads = []
    for use_checkpointing in (False, True):
        paca = prepare_model(tiny_llama(), PaCAConfig(r=4), device="cpu")
        _randomise_deltas(paca)
        if use_checkpointing:
            paca.base_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            paca.base_model.train()
            for half in (ids[:2], ids[2:]):  # accumulate over two micro-batches
                (paca(input_ids=half, labels=half).loss / 2).backward()
        else:
            paca.base_model.train()
            paca(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: l.paca_delta.grad.clone() for n, l in paca.adapter_layers().items()})
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-6)


def test_merge_and_unload_matches_adapted_forward():
    paca = prepare_model(tiny_llama(), PaCAConfig(r=4, alpha=8.0), device="cpu")
    _randomise_deltas(paca)
    ids = torch.randint(0, 128, (2, 8))
    with torch.no_grad():
        adapted = paca(input_ids=ids).logits
        merged = paca.merge_and_unload()
        assert not any(isinstance(m, PaCALinear) for m in merged.modules())
        torch.testing.assert_close(merged(input_ids=ids).logits, adapted, rtol=1e-5, atol=1e-5)


def test_trainable_parameter_count():
    paca = prepare_model(tiny_llama(), PaCAConfig(r=4), device="cpu")
    trainable, _ = paca.parameter_counts()
    cfg = paca.base_model.config
    per_layer = 4 * (cfg.hidden_size * 2 + 2 * (cfg.hidden_size // 4 * 2) + cfg.intermediate_size * 2 + cfg.hidden_size)
    # q,o: out=hidden; k,v: out=kv heads*head_dim; gate,up: out=intermediate; down: out=hidden
    assert trainable == per_layer * cfg.num_hidden_layers


def test_errors_are_specific():
    with pytest.raises(ValueError, match="r=40 exceeds the input width"):
        prepare_model(tiny_llama(), PaCAConfig(r=40), device="cpu")
    with pytest.raises(TargetModuleError, match="q_proj"):
        prepare_model(tiny_llama(), PaCAConfig(target_modules=["query"]), device="cpu")
    with pytest.raises(TargetModuleError, match="not Linear"):
        prepare_model(tiny_llama(), PaCAConfig(target_modules=["mlp"]), device="cpu")
    with pytest.raises(PacaConfigError, match="positive integer"):
        PaCAConfig(r=0)
    with pytest.raises(PacaConfigError, match="alpha"):
        PaCAConfig(alpha=-1)
    frozen_check = PaCALinear(nn.Linear(8, 4), r=2, alpha=None, indices=torch.tensor([0, 3]))
    frozen_check.base_layer.weight.requires_grad_(True)
    with pytest.raises(RuntimeError, match="must stay frozen"):
        frozen_check(torch.randn(2, 8))


def test_all_linear_skips_output_head_and_regex_targets():
    paca = prepare_model(tiny_llama(), PaCAConfig(r=2, target_modules="all-linear"), device="cpu")
    names = list(paca.adapter_layers())
    assert len(names) == 14 and not any("lm_head" in n for n in names)
    paca = prepare_model(tiny_llama(), PaCAConfig(r=2, target_modules=r".*layers\.0\.mlp\.(up|down)_proj"), device="cpu")
    assert sorted(n.split(".")[-1] for n in paca.adapter_layers()) == ["down_proj", "up_proj"]


def test_float64_gradcheck_of_autograd_function():
    from backends import get_backend

    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(4, 6, dtype=torch.float64)
    delta = torch.zeros(4, 2, dtype=torch.float64, requires_grad=True)
    idx = torch.tensor([1, 4])

    def fn(x, delta):
        w = weight.clone()
        w[:, idx] = w[:, idx] + 2.0 * delta.detach()
        return _PartialConnectionLinear.apply(x, w, None, delta, idx, 2.0, get_backend("cpu"), None)

    assert torch.autograd.gradcheck(fn, (x, delta))


def test_deepcopy_keeps_each_copy_in_sync_with_its_own_optimizer():
    original = prepare_model(tiny_llama(), PaCAConfig(r=4), device="cpu")
    twin = copy.deepcopy(original)
    optimizer = torch.optim.AdamW(twin.trainable_parameters(), lr=1e-2, fused=True)
    ids = torch.randint(0, 128, (2, 8))
    twin(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    for layer in twin.adapter_layers().values():
        expected = layer.paca_original_columns + layer.scaling * layer.paca_delta
        assert torch.equal(layer.base_layer.weight[:, layer.paca_indices], expected)
    for layer in original.adapter_layers().values():  # untouched
        assert torch.equal(layer.base_layer.weight[:, layer.paca_indices], layer.paca_original_columns)
