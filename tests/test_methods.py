"""LoRA, LoRA-FA, VeLoRA and combinations: exact against PEFT / dense references, saved bytes by formula."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from backends import get_backend
from paca_core import AdaptedModel, prepare_model
from paca_core.config import FullConfig, LoRAConfig, LoRAFAConfig, PaCAConfig, VeLoRAConfig
from paca_core.errors import PacaConfigError
from paca_core.layers.lora import LoRALinear
from paca_core.memory.measure import count_saved_tensors

from .conftest import tiny_llama

peft = pytest.importorskip("peft")

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _randomise_b(model, seed=4):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.adapter_layers().values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=gen) * 0.1)


def _peft_twin(base, ours, velora=None, alpha=8):
    """A PEFT LoRA model on a copy of ``base`` with our A/B copied in."""
    config = peft.LoraConfig(r=4, lora_alpha=alpha, target_modules=PROJECTIONS, lora_dropout=0.0, velora_config=velora)
    twin = peft.get_peft_model(copy.deepcopy(base), config)
    modules = dict(twin.base_model.model.named_modules())
    with torch.no_grad():
        for name, layer in ours.adapter_layers().items():
            modules[name].lora_A["default"].weight.copy_(layer.lora_A)
            modules[name].lora_B["default"].weight.copy_(layer.lora_B)
    return twin, modules


def _grads(ours, modules, ids):
    return ours(input_ids=ids, labels=ids), {n: (l.lora_A.grad, l.lora_B.grad) for n, l in ours.adapter_layers().items()}


def test_lora_equals_peft_lora_forward_and_grads():
    base = tiny_llama()
    ours = prepare_model(copy.deepcopy(base), LoRAConfig(r=4, alpha=8), device="cpu")
    _randomise_b(ours)
    twin, modules = _peft_twin(base, ours)
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    ours_out = ours(input_ids=ids, labels=ids)
    twin_out = twin(input_ids=ids, labels=ids)
    torch.testing.assert_close(ours_out.logits, twin_out.logits, rtol=1e-6, atol=1e-6)
    ours_out.loss.backward()
    twin_out.loss.backward()
    for name, layer in ours.adapter_layers().items():
        torch.testing.assert_close(layer.lora_A.grad, modules[name].lora_A["default"].weight.grad, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(layer.lora_B.grad, modules[name].lora_B["default"].weight.grad, rtol=1e-5, atol=1e-7)


def test_lorafa_b_grad_equals_peft_and_a_is_frozen():
    base = tiny_llama()
    ours = prepare_model(copy.deepcopy(base), LoRAFAConfig(r=4, alpha=8), device="cpu")
    _randomise_b(ours)
    twin, modules = _peft_twin(base, ours)
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    ours(input_ids=ids, labels=ids).loss.backward()
    twin(input_ids=ids, labels=ids).loss.backward()
    for name, layer in ours.adapter_layers().items():
        assert not layer.lora_A.requires_grad and layer.lora_A.grad is None
        torch.testing.assert_close(layer.lora_B.grad, modules[name].lora_B["default"].weight.grad, rtol=1e-5, atol=1e-7)
    trainable, _ = ours.parameter_counts()
    assert trainable == sum(l.lora_B.numel() for l in ours.adapter_layers().values())


def _saved_activation_bytes(layer, x):
    """(activation tensors, bytes) kept for backward, via the library's own accounting."""
    with count_saved_tensors(layer) as report:
        out = layer(x)
    out.sum().backward()
    return report.saved, report.activation_bytes


def test_lorafa_saves_only_rank_r_activation():
    torch.manual_seed(0)
    tokens, d, out, r = 3 * 10, 64, 48, 4
    layer = LoRALinear(nn.Linear(d, out), r=r, alpha=None, dropout=0.0, freeze_a=True, seed=0, module_name="x")
    x = torch.randn(3, 10, d, requires_grad=True)
    activations, nbytes = _saved_activation_bytes(layer, x)
    assert not any(t.shape[-1] == d and t.numel() >= tokens * d for t in activations)
    assert nbytes == tokens * r * 4  # A·x only, fp32


@pytest.mark.parametrize("num_groups, d", [(4, 64), (5, 24)])  # 24 is padded to 25 for G=5
def test_velora_saves_g_coefficients_per_token(num_groups, d):
    torch.manual_seed(0)
    tokens, out, r = 2 * 7, 16, 4
    layer = LoRALinear(nn.Linear(d, out), r=r, alpha=None, dropout=0.0, freeze_a=False, seed=0, module_name="x")
    layer.attach_compressor(VeLoRAConfig(num_groups=num_groups).create_compressor(layer))
    layer.train()
    x = torch.randn(2, 7, d, requires_grad=True)
    activations, nbytes = _saved_activation_bytes(layer, x)
    assert not any(t.shape[-1] == d for t in activations)
    # G coefficients per token (instead of d) + the rank-r input of B, both fp32 here.
    assert nbytes == tokens * (num_groups + r) * 4


def test_velora_grad_equals_grad_with_rebuilt_input():
    torch.manual_seed(0)
    d, out, r, groups = 24, 12, 4, 6
    layer = LoRALinear(nn.Linear(d, out), r=r, alpha=8.0, dropout=0.0, freeze_a=False, seed=3, module_name="x").double()
    with torch.no_grad():
        layer.lora_B.normal_()
    layer.attach_compressor(VeLoRAConfig(num_groups=groups, scale=0.7).create_compressor(layer))
    layer.compressor.double()
    layer.train()
    x = torch.randn(5, d, dtype=torch.float64, requires_grad=True)
    layer(x).square().sum().backward()

    backend = get_backend("cpu")
    projection = layer.compressor.velora_projection
    rebuilt = backend.decompress(backend.compress(x.detach(), projection, groups), projection, d) * 0.7
    a = layer.lora_A.detach().clone().requires_grad_(True)
    b = layer.lora_B.detach().clone().requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    base_out = layer.base_layer(x_ref)
    # Exact forward with x; A's weight gradient sees the rebuilt input (straight-through on x).
    after_a = F.linear(x_ref, a.detach()) + (F.linear(rebuilt, a) - F.linear(rebuilt, a).detach())
    (base_out + F.linear(after_a, b) * layer.scaling).square().sum().backward()
    torch.testing.assert_close(layer.lora_A.grad, a.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(layer.lora_B.grad, b.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-10, atol=1e-12)  # input gradient stays exact


@pytest.mark.parametrize("num_groups", [4, 5])
def test_lora_velora_equals_peft_velora(num_groups):
    base = tiny_llama()
    ours = prepare_model(
        copy.deepcopy(base),
        [LoRAConfig(r=4, alpha=8), VeLoRAConfig(num_groups=num_groups, scale=0.5, init_type="batch_average_once")],
        device="cpu",
    )
    _randomise_b(ours)
    velora = peft.tuners.lora.config.VeloraConfig(num_groups=num_groups, scale=0.5, init_type="batch_average_once")
    twin, modules = _peft_twin(base, ours, velora=velora)
    ours.train()
    twin.train()
    gen = torch.Generator().manual_seed(2)
    for step in range(2):  # the second batch uses the projection fixed by the first
        ids = torch.randint(0, 128, (2, 9), generator=gen)
        ours.zero_grad()
        twin.zero_grad()
        ours(input_ids=ids, labels=ids).loss.backward()
        twin(input_ids=ids, labels=ids).loss.backward()
        for name, layer in ours.adapter_layers().items():
            peft_layer = modules[name]
            torch.testing.assert_close(layer.compressor.velora_projection, peft_layer.lora_velora_embed["default"].float(), rtol=1e-6, atol=1e-7)
            torch.testing.assert_close(layer.lora_A.grad, peft_layer.lora_A["default"].weight.grad, rtol=1e-4, atol=1e-7)
            torch.testing.assert_close(layer.lora_B.grad, peft_layer.lora_B["default"].weight.grad, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("init_type", ["batch_average_once", "batch_average", "ema"])
def test_velora_projection_init_types(init_type):
    layer = LoRALinear(nn.Linear(16, 8), r=2, alpha=None, dropout=0.0, freeze_a=False, seed=0, module_name="x")
    layer.attach_compressor(VeLoRAConfig(num_groups=4, init_type=init_type, ema_decay=0.5).create_compressor(layer))
    layer.train()
    layer(torch.randn(3, 16) + 2.0).sum().backward()
    first = layer.compressor.velora_projection.clone()
    assert torch.isclose(first.norm(), torch.tensor(1.0))
    layer(torch.randn(3, 16) - 5.0 * torch.arange(16.0)).sum().backward()
    second = layer.compressor.velora_projection
    if init_type == "batch_average_once":
        assert torch.equal(first, second)
    else:
        assert not torch.allclose(first, second)
        assert torch.isclose(second.norm(), torch.tensor(1.0))


def test_full_plus_velora_beside_paca():
    model = prepare_model(
        tiny_llama(),
        [PaCAConfig(r=4, exclude_modules=["down_proj"]), FullConfig(target_modules=["down_proj"]), VeLoRAConfig(num_groups=4)],
        device="cpu",
    )
    layers = model.adapter_layers()
    full = [l for n, l in layers.items() if n.endswith("down_proj")]
    assert all(l.method == "full" and l.compressor is not None and l.base_layer.weight.requires_grad for l in full)
    assert all(getattr(l, "compressor", None) is None for n, l in layers.items() if not n.endswith("down_proj"))
    model.train()
    ids = torch.randint(0, 128, (2, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(l.base_layer.weight.grad is not None for l in full)
    with pytest.raises(RuntimeError, match="cannot be disabled"):
        with model.disable_adapter():
            pass


def test_bad_combinations_are_rejected():
    with pytest.raises(PacaConfigError, match="only modifies layers"):
        prepare_model(tiny_llama(), VeLoRAConfig(), device="cpu")
    with pytest.raises(PacaConfigError, match="none of the adapted layers"):
        prepare_model(tiny_llama(), [PaCAConfig(r=2), VeLoRAConfig()], device="cpu")
    with pytest.raises(PacaConfigError, match="targeted by both"):
        prepare_model(tiny_llama(), [PaCAConfig(r=2), LoRAConfig(r=2)], device="cpu")
    with pytest.raises(PacaConfigError, match="init_type"):
        VeLoRAConfig(init_type="svd")
    with pytest.raises(PacaConfigError, match="dropout"):
        LoRAConfig(dropout=1.5)


@pytest.mark.parametrize(
    "configs",
    [[LoRAConfig(r=4)], [LoRAFAConfig(r=4)], [LoRAConfig(r=4), VeLoRAConfig(num_groups=4)]],
    ids=["lora", "lorafa", "lora+velora"],
)
def test_save_load_merge_roundtrip(configs, tmp_path):
    model = prepare_model(tiny_llama(), configs, device="cpu")
    model.train()
    ids = torch.randint(0, 128, (2, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    torch.optim.AdamW(model.trainable_parameters(), lr=1e-2).step()
    model.save_pretrained(tmp_path / "adapter")
    loaded = AdaptedModel.from_pretrained(tiny_llama(), tmp_path / "adapter", device="cpu", is_trainable=True)
    assert loaded.method == model.method
    assert [p.shape for p in loaded.trainable_parameters()] == [p.shape for p in model.trainable_parameters()]
    model.eval()
    loaded.eval()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        torch.testing.assert_close(loaded(input_ids=ids).logits, expected, rtol=0, atol=0)
        merged = loaded.merge_and_unload()
        torch.testing.assert_close(merged(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)


def test_two_configs_of_one_method_round_trip(tmp_path):
    configs = [PaCAConfig(r=4, target_modules=["q_proj", "k_proj"]), PaCAConfig(r=2, target_modules=["down_proj"], seed=5)]
    model = prepare_model(tiny_llama(), configs, device="cpu")
    model.save_pretrained(tmp_path / "adapter")
    loaded = AdaptedModel.from_pretrained(tiny_llama(), tmp_path / "adapter", device="cpu")
    ranks = {n.split(".")[-1]: l.r for n, l in loaded.adapter_layers().items()}
    assert ranks == {"q_proj": 4, "k_proj": 4, "down_proj": 2}
    for name, layer in model.adapter_layers().items():
        assert torch.equal(layer.paca_indices, loaded.adapter_layers()[name].paca_indices)
