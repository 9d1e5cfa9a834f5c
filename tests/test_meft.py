"""MEFT: the host-memory sparse adapter against dense references, its host Adam, checkpoints, training."""
import copy

import pytest
import torch
import torch.nn as nn

from backends import get_backend
from paca_core import MEFTConfig, prepare_model
from paca_core.errors import PacaConfigError
from paca_core.layers.sparse_adapter import SparseFFNAdapter
from paca_core.memory.measure import count_saved_tensors

from .conftest import tiny_llama


class FeedForward(nn.Module):
    """A transformer MLP of width d (what MEFT attaches to)."""

    def __init__(self, width=12, hidden=20):
        super().__init__()
        self.hidden_size = width
        self.up = nn.Linear(width, hidden)
        self.down = nn.Linear(hidden, width)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


class Block(nn.Module):
    def __init__(self, width=12):
        super().__init__()
        self.mlp = FeedForward(width)

    def forward(self, x):
        return self.mlp(x)


def _adapted_block(dtype=torch.float64, seed=0, **meft):
    torch.manual_seed(seed)
    block = Block().to(dtype)
    model = prepare_model(block, MEFTConfig(**meft), device="cpu")
    adapter = model.adapter_layers()["mlp"]
    with torch.no_grad():  # nonzero values so every gradient is exercised
        adapter.table.values.copy_(torch.randn(adapter.table.values.shape, generator=torch.Generator().manual_seed(seed + 7)))
    return model, adapter


def _dense_reference(block_mlp, adapter, x, row_mask):
    """out = FFN(x) + Σ_j gate(t, expert(j)) · relu(x·K_j) · V_j over rows with row_mask[t, j], with dense
    float64 autograd over the whole K and V (the gradient rows outside the mask are zero)."""
    table = adapter.table
    keys = table.keys.double().clone().requires_grad_(True)
    values = table.values.double().clone().requires_grad_(True)
    router = adapter.router.weight.detach().double().clone().requires_grad_(True)
    x2d = x.reshape(-1, table.width)
    logits = x2d @ router.t()
    top_logits, experts = logits.topk(adapter.num_probe, dim=-1)
    gates = torch.softmax(top_logits, dim=-1)
    row_expert = torch.arange(table.num_rows) // table.rows_per_expert
    gate_of_row = _gate_per_row(gates, experts, row_expert)
    weights = torch.relu(x2d @ keys.t()) * gate_of_row * row_mask
    out = block_mlp(x) + (weights @ values).view(x.shape)
    return out, keys, values, router


def _gate_per_row(gates, experts, row_expert):
    per_expert = torch.zeros(gates.shape[0], int(row_expert.max()) + 1, dtype=gates.dtype).scatter(1, experts, gates)
    return per_expert[:, row_expert]


def _expected_rows(adapter, x):
    """Brute force: each token's top-k rows by gated score among its probed experts' rows."""
    table = adapter.table
    x2d = x.detach().reshape(-1, table.width).double()
    logits = x2d @ adapter.router.weight.detach().double().t()
    top_logits, experts = logits.topk(adapter.num_probe, dim=-1)
    gates = torch.softmax(top_logits, dim=-1)
    row_expert = torch.arange(table.num_rows) // table.rows_per_expert
    gate_of_row = _gate_per_row(gates, experts, row_expert)
    reachable = gate_of_row > 0
    gated = torch.where(reachable, (x2d @ table.keys.double().t()) * gate_of_row, torch.tensor(float("-inf"), dtype=torch.float64))
    best = gated.topk(adapter.top_k, dim=1).indices
    return torch.zeros_like(gated).scatter(1, best, 1.0)


def _compare(model, adapter, x, row_mask):
    x = x.clone().requires_grad_(True)
    out = model(x)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    adapter.table.collect()

    ref_x = x.detach().clone().requires_grad_(True)
    with model.disable_adapter():
        ref_out, keys, values, router = _dense_reference(model.base_model.mlp, adapter, ref_x, row_mask)
    ref_out.backward(grad_out)
    torch.testing.assert_close(out, ref_out, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(x.grad, ref_x.grad, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(adapter.router.weight.grad, router.grad, rtol=1e-5, atol=1e-6)
    # host gradient rows are float32 sums
    torch.testing.assert_close(adapter.table.grad_keys.double(), keys.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(adapter.table.grad_values.double(), values.grad, rtol=1e-5, atol=1e-5)
    touched = row_mask.bool().any(0)
    assert torch.equal(adapter.table.touched, touched | adapter.table.touched)  # every used row is marked


def test_without_sparsity_equals_dense_adapter():
    # every expert probed, every row used, room for all rows: the dense parallel adapter exactly
    model, adapter = _adapted_block(num_rows=24, num_experts=4, num_probe=4, top_k=24, rows_per_step=24)
    x = torch.randn(3, 5, 12, dtype=torch.float64)
    _compare(model, adapter, x, torch.ones(15, 24, dtype=torch.float64))


def test_with_sparsity_equals_dense_restricted_to_chosen_rows():
    model, adapter = _adapted_block(num_rows=64, num_experts=8, num_probe=2, top_k=5, rows_per_step=64)
    x = torch.randn(2, 7, 12, dtype=torch.float64)
    mask = _expected_rows(adapter, x)
    assert int(mask.sum()) == 14 * 5
    _compare(model, adapter, x, mask)
    # only rows some token chose have gradients, and only those will be updated
    assert torch.equal(adapter.table.touched, mask.bool().any(0))


def test_row_budget_keeps_most_used_rows_and_drops_the_rest_exactly():
    model, adapter = _adapted_block(num_rows=64, num_experts=8, num_probe=2, top_k=5, rows_per_step=10)
    x = torch.randn(2, 7, 12, dtype=torch.float64)
    chosen = _expected_rows(adapter, x)
    selection = adapter.table.select(
        *_routing_inputs(adapter, x), top_k=adapter.top_k, capacity=adapter.capacity
    )
    assert selection.rows.numel() == 10 and selection.dropped_rows == selection.selected_rows - 10
    uses = chosen.sum(0)
    kept_uses = uses[selection.rows]
    dropped = chosen.bool().any(0).clone()
    dropped[selection.rows] = False
    assert kept_uses.min() >= uses[dropped].max()  # the most used rows won the budget
    kept = torch.zeros(64, dtype=torch.float64)
    kept[selection.rows] = 1
    _compare(model, adapter, x, chosen * kept)


def _routing_inputs(adapter, x):
    x2d = x.reshape(-1, adapter.in_features)
    top_logits, experts = (x2d @ adapter.router.weight.detach().t()).topk(adapter.num_probe, dim=-1)
    return x2d.float(), experts, torch.softmax(top_logits.float(), dim=-1)


def test_device_side_shapes_are_static():
    """Whatever the data selects, the device sees (rows_per_step + 1, d) buffers and (T, k) slots."""
    model, adapter = _adapted_block(dtype=torch.float32, num_rows=64, num_experts=8, top_k=4, rows_per_step=16)
    shapes = set()
    original = get_backend("cpu").sparse_rows_forward

    def recording(x, keys, values, slots, gates):
        shapes.add((tuple(keys.shape), tuple(values.shape), tuple(slots.shape), tuple(gates.shape)))
        return original(x, keys, values, slots, gates)

    backend = get_backend("cpu")
    backend.sparse_rows_forward = recording
    try:
        for seed in range(4):
            model(torch.randn(2, 5, 12, generator=torch.Generator().manual_seed(seed)) * (seed + 1))
    finally:
        del backend.sparse_rows_forward
    assert shapes == {((17, 12), (17, 12), (10, 4), (10, 4))}


def test_host_adam_equals_torch_adamw_on_used_rows():
    # all rows used every step: the sparse host update must equal torch's AdamW on dense K and V
    model, adapter = _adapted_block(dtype=torch.float32, num_rows=16, num_experts=2, num_probe=2, top_k=16, rows_per_step=16)
    keys = nn.Parameter(adapter.table.keys.clone())
    values = nn.Parameter(adapter.table.values.clone())
    reference = torch.optim.AdamW([keys, values], lr=1e-2, betas=(0.8, 0.95), eps=1e-7, weight_decay=0.1)
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2, betas=(0.8, 0.95), eps=1e-7, weight_decay=0.1)
    for step in range(3):
        x = torch.randn(4, 12, generator=torch.Generator().manual_seed(step))
        model(x).pow(2).sum().backward()
        adapter.table.collect()
        keys.grad, values.grad = adapter.table.grad_keys.clone(), adapter.table.grad_values.clone()
        optimizer.step()
        optimizer.zero_grad()
        reference.step()
        torch.testing.assert_close(adapter.table.keys, keys.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(adapter.table.values, values.detach(), rtol=1e-5, atol=1e-6)
    assert adapter.table.grad_keys.abs().sum() == 0 and not adapter.table.touched.any()


def test_untouched_rows_and_their_state_never_change():
    model, adapter = _adapted_block(dtype=torch.float32, num_rows=64, num_experts=8, top_k=2, rows_per_step=64)
    before = adapter.table.keys.clone(), adapter.table.values.clone()
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2)
    x = torch.randn(3, 12)
    model(x).sum().backward()
    adapter.table.collect()
    used = adapter.table.touched.clone()
    optimizer.step()
    assert 0 < used.sum() < 64
    assert torch.equal(adapter.table.keys[~used], before[0][~used])
    assert torch.equal(adapter.table.values[~used], before[1][~used])
    assert not torch.equal(adapter.table.values[used], before[1][used])
    assert torch.equal(adapter.table.row_steps, used.long())


def test_saved_for_backward_is_inputs_scores_and_the_row_buffers():
    """Exact bytes MEFT adds for backward: its input, the router's top-p, the (T, k) slots, gates and
    scores, and the fixed row buffer — nothing of size M (the host table never reaches autograd)."""
    model, adapter = _adapted_block(dtype=torch.float32, num_rows=64, num_experts=8, top_k=4, rows_per_step=16)
    x = torch.randn(2, 5, 12, requires_grad=True)
    with model.disable_adapter(), count_saved_tensors(model) as base:
        model(x)
    with count_saved_tensors(model) as full:
        model(x)
    tokens, d, k, probe, buffer_rows = 10, 12, 4, 2, 17
    expected = (
        tokens * d * 4  # the block input (also the router's input)
        + tokens * probe * (8 + 4)  # router top-p indices and softmax gates
        + 2 * tokens * k * 8  # slots and expert positions (one int64 buffer)
        + 2 * buffer_rows * d * 4  # keys and values of the rows sent over (one buffer)
        + tokens * k * 4 * 2  # per-row gates and pre-activation scores
    )
    assert full.activation_bytes - base.activation_bytes == expected


def test_checkpoint_round_trip_unload_and_merge_refusal(tmp_path):
    model = prepare_model(tiny_llama(seed=0), MEFTConfig(num_rows=64, top_k=4, rows_per_step=32), device="cpu")
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2)
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    for _ in range(2):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    model.save_pretrained(tmp_path / "adapter")
    loaded = type(model).from_pretrained(tiny_llama(seed=0), tmp_path / "adapter", device="cpu")
    loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, logits)
        with loaded.disable_adapter():
            plain = loaded(input_ids=ids).logits
        torch.testing.assert_close(plain, tiny_llama(seed=0)(input_ids=ids).logits)
    with pytest.raises(PacaConfigError, match="cannot be folded"):
        loaded.merge_and_unload()
    base = loaded.unload()
    assert not any(isinstance(m, SparseFFNAdapter) for m in base.modules())
    with torch.no_grad():
        torch.testing.assert_close(base(input_ids=ids).logits, plain)


def test_combines_with_paca_and_deepcopy_is_independent():
    from paca_core import PaCAConfig

    model = prepare_model(tiny_llama(seed=1), [PaCAConfig(r=4), MEFTConfig(num_rows=32, top_k=4)], device="cpu")
    names = set(model.adapter_layers())
    assert "model.layers.0.mlp" in names and "model.layers.0.mlp.gate_proj" in names
    twin = copy.deepcopy(model)
    optimizer = torch.optim.AdamW(twin.trainable_parameters(), lr=1e-2)
    ids = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(1))
    twin(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    original = model.adapter_layers()["model.layers.0.mlp"].table
    copied = twin.adapter_layers()["model.layers.0.mlp"].table
    assert original.values.abs().sum() == 0 and copied.values.abs().sum() > 0


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_rows": 0}, "num_rows"),
        ({"num_rows": 100, "num_experts": 7}, "divisor"),
        ({"num_rows": 64, "num_experts": 8, "top_k": 17, "num_probe": 2}, "rows a token can reach"),
        ({"num_probe": 100, "num_rows": 64, "num_experts": 8}, "num_probe"),
        ({"target_modules": "all-linear"}, "feed-forward"),
    ],
)
def test_bad_configs_are_rejected(kwargs, message):
    with pytest.raises(PacaConfigError, match=message):
        MEFTConfig(**kwargs)


def test_targeting_a_linear_layer_is_a_clear_error():
    with pytest.raises(Exception, match="feed-forward block"):
        prepare_model(tiny_llama(seed=0), MEFTConfig(target_modules=["down_proj"]), device="cpu")


def _meft_trainer(model_dir, text_file, out, steps):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from paca_core.data.dataset import load_dataset, split_held_out
    from paca_core.train.trainer import Trainer, TrainingArguments

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    torch.manual_seed(0)
    adapted = prepare_model(model, MEFTConfig(num_rows=64, top_k=4, rows_per_step=32), device="cpu")
    data, _ = split_held_out(load_dataset(text_file, tokenizer, 16), 0.1, 0)
    args = TrainingArguments(output_dir=str(out), max_steps=steps, batch_size=2, grad_accum=2, lr=1e-2, progress=False, log_every=1)
    return Trainer(adapted, args, data, torch.device("cpu"))


def test_trainer_resume_restores_host_adam_state(tmp_path, tiny_model_dir, sample_text_file):
    """Interrupted at step 3 and resumed equals 6 straight steps, bit for bit: the host rows' Adam
    state and step counts travel in the checkpoint."""
    straight = _meft_trainer(tiny_model_dir, sample_text_file, tmp_path / "a", steps=6)
    straight.train()
    interrupted = _meft_trainer(tiny_model_dir, sample_text_file, tmp_path / "b", steps=6)

    def stop_after_third(optimizer, args, kwargs):
        if interrupted.state.step == 2:
            interrupted._stop_requested = True

    interrupted.optimizer.register_step_post_hook(stop_after_third)
    with pytest.raises(KeyboardInterrupt):
        interrupted.train()
    resumed = _meft_trainer(tiny_model_dir, sample_text_file, tmp_path / "b", steps=6)
    resumed.resume_from(tmp_path / "b" / "checkpoint")
    resumed.train()
    for name, layer in straight.model.adapter_layers().items():
        other = resumed.model.adapter_layers()[name]
        assert layer.table.values.abs().sum() > 0
        assert torch.equal(layer.table.keys, other.table.keys), name
        assert torch.equal(layer.table.values, other.table.values), name
        assert torch.equal(layer.table.row_steps, other.table.row_steps), name
    assert resumed.state.history[-1]["loss"] == straight.state.history[-1]["loss"]


def test_cli_trains_meft_and_loss_falls(tmp_path, tiny_model_dir, sample_text_file):
    import json

    from paca_core.cli.dispatch import main

    out = tmp_path / "run"
    flags = [
        "train", "--model", str(tiny_model_dir), "--data", str(sample_text_file), "--method", "meft", "--meft-rows", "128",
        "--meft-topk", "8", "--steps", "12", "--seq-len", "16", "--batch-size", "4", "--lr", "1e-2", "--sample-tokens", "0",
        "--no-progress", "--device", "cpu", "--out", str(out),
    ]
    assert main(flags) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["held_out_loss_after"] < metrics["held_out_loss_before"]


def _sparse_rows_reference(x, keys, values, slots, gates, grad_output):
    x64 = x.detach().double().requires_grad_(True)
    k64 = keys.detach().double().requires_grad_(True)
    v64 = values.detach().double().requires_grad_(True)
    g64 = gates.detach().double().requires_grad_(True)
    scores = torch.einsum("td,tkd->tk", x64, k64[slots])
    out = torch.einsum("tk,tkd->td", torch.relu(scores) * g64, v64[slots])
    out.backward(grad_output.double())
    return out, x64.grad, k64.grad, v64.grad, g64.grad


@pytest.mark.primitives("sparse_rows_forward", "sparse_rows_backward")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sparse_rows_primitive_conformance(backend_and_device, dtype):
    """Every backend's sparse-row kernels against float64 autograd (repeated slots included)."""
    backend, device = backend_and_device
    gen = torch.Generator().manual_seed(5)
    tokens, k, rows, d = 9, 3, 7, 16
    x = torch.randn(tokens, d, generator=gen).to(device, dtype)
    keys = torch.randn(rows, d, generator=gen).to(device, dtype)
    values = torch.randn(rows, d, generator=gen).to(device, dtype)
    slots = torch.randint(0, rows, (tokens, k), generator=gen).to(device)
    gates = torch.rand(tokens, k, generator=gen).to(device, dtype)
    grad_output = torch.randn(tokens, d, generator=gen).to(device, dtype)
    out, scores = backend.sparse_rows_forward(x, keys, values, slots, gates)
    grad_x, grad_keys, grad_values, grad_gates = backend.sparse_rows_backward(grad_output, x, keys, values, slots, gates, scores)
    ref = _sparse_rows_reference(x, keys, values, slots, gates, grad_output)
    tol = backend.tolerance(dtype)
    assert grad_keys.dtype == grad_values.dtype == torch.float32 and grad_keys.shape == (rows, d)
    for got, want, fan_in in zip((out, grad_x, grad_keys, grad_values, grad_gates), ref, (k * d, k * d, tokens * k, tokens * k, d)):
        torch.testing.assert_close(got.double(), want, rtol=tol.rtol, atol=tol.atol * fan_in)


def test_traffic_counts_buffer_bytes_against_the_selected_rows_minimum():
    model, adapter = _adapted_block(dtype=torch.float32, num_rows=64, num_experts=8, top_k=4, rows_per_step=16)
    model(torch.randn(2, 5, 12))
    traffic = adapter.table.traffic
    kept = min(traffic["selected_rows"], 16)
    assert traffic["row_buffer_bytes"] == 2 * (16 + 1) * 12 * 4
    assert traffic["minimum_row_bytes"] == 2 * kept * 12 * 4
    assert traffic["copied_to_device_bytes"] == 0  # host-only device: nothing actually crossed


@pytest.mark.slow
def test_compiled_model_matches_eager_and_still_sends_gradients_home():
    """torch.compile runs the device parts as graphs; the host round trip is excluded from them."""
    model = prepare_model(tiny_llama(seed=0), MEFTConfig(num_rows=64, top_k=4, rows_per_step=32), device="cpu")
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(3))
    reference = model(input_ids=ids).logits
    compiled = torch.compile(model.base_model, backend="aot_eager")
    logits = compiled(input_ids=ids).logits
    torch.testing.assert_close(logits, reference)
    logits.sum().backward()
    table = model.adapter_layers()["model.layers.0.mlp"].table
    table.collect()
    assert table.touched.any() and table.grad_values.abs().sum() > 0
