"""paca_core.train.steps: the one training step and evaluation every loop uses (Trainer, paca bench worker).

Regression: the bench worker freed gradients (zero_grad(set_to_none=True)) even under captured HPU
graphs, which hold gradient buffers by address; the Trainer zeroed them in place. Both now take
``set_to_none`` from ``devices.keeps_grad_buffers`` of the model's graph mode.
"""
from __future__ import annotations

import pytest
import torch

import devices
import devices.registry as registry
from paca_core import PaCAConfig, prepare_model
from paca_core.bench import worker
from paca_core.train.steps import evaluate, grads_to_none, train_step

from .conftest import tiny_llama
from .test_hpu_device import CpuWithCapturedGraphs


def _job(mode: str) -> dict:
    return {
        "mode": "speed", "method": "paca", "model": "tiny", "device": "cpu", "graph_mode": mode, "dtype": "fp32",
        "seed": 0, "rank": 4, "options": {}, "lr": 1e-3, "batch_size": 2, "seq_len": 8, "steps": 1,
    }


@pytest.mark.parametrize("mode", ["eager", "hpu-graphs"])
def test_bench_worker_zeroes_grads_in_place_under_captured_graphs(monkeypatch, mode):
    monkeypatch.setitem(registry._RUNTIMES, "cpu", CpuWithCapturedGraphs())
    monkeypatch.setattr(devices, "resolve_graph_mode", lambda device, requested: requested)  # hpu-graphs "on" cpu
    job = _job(mode)
    _, _, device, prepared, _ = worker._setup(job)
    assert devices.graph_mode_of(prepared.module) == mode
    assert prepared.set_to_none == (not devices.keeps_grad_buffers(mode))
    ids = worker._random_batch(prepared, job, device)
    worker._counted_step(prepared, ids, device)
    worker._step(prepared, ids, device)
    grads = [p.grad for p in prepared.params]
    if mode == "hpu-graphs":
        assert all(g is not None and not g.any() for g in grads)  # same buffers, zeroed in place
    else:
        assert all(g is None for g in grads)


def test_grads_to_none_follows_the_graph_mode(monkeypatch):
    monkeypatch.setitem(registry._RUNTIMES, "cpu", CpuWithCapturedGraphs())
    model = torch.nn.Linear(2, 2)
    assert grads_to_none(model)
    devices.apply_graph_mode(model, torch.device("cpu"), "hpu-graphs")
    assert not grads_to_none(model)


def test_train_step_accumulates_and_skips_as_told():
    torch.manual_seed(0)
    model = prepare_model(tiny_llama(seed=0), PaCAConfig(r=4))
    params = model.trainable_parameters()
    optimizer = torch.optim.SGD(params, lr=0.1)
    ids = torch.randint(0, 128, (4, 8), generator=torch.Generator().manual_seed(1))
    halves = [{"input_ids": ids[:2], "labels": ids[:2]}, {"input_ids": ids[2:], "labels": ids[2:]}]
    forward = lambda batch: model(**batch).loss  # noqa: E731
    skipped = train_step(forward, halves, optimizer, torch.device("cpu"), params=params, grad_accum=2, should_apply=lambda loss, norm: False)
    assert not skipped.applied and all(p.grad is not None for p in params)
    expected = (model(**halves[0]).loss + model(**halves[1]).loss).detach() / 2
    torch.testing.assert_close(skipped.loss, expected)
    optimizer.zero_grad()
    before = [p.detach().clone() for p in params]
    applied = train_step(forward, iter(halves), optimizer, torch.device("cpu"), params=params, grad_accum=2, max_grad_norm=1.0)
    assert applied.applied and applied.grad_norm is not None and all(p.grad is None for p in params)
    assert any(not torch.equal(a, b.detach()) for a, b in zip(before, params))


def test_evaluate_counts_only_target_tokens():
    from paca_core.data.dataset import TokenizedData

    model = tiny_llama(seed=0)
    ids = torch.randint(0, 128, (3, 8), generator=torch.Generator().manual_seed(2))
    labels = ids.clone()
    labels[:, :4] = -100
    data = TokenizedData(ids, labels, torch.ones_like(ids), "test")
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    expected = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 128), labels[:, 1:].reshape(-1), ignore_index=-100)
    assert evaluate(model, data, torch.device("cpu"), batch_size=2) == pytest.approx(float(expected), rel=1e-5)


def test_evaluate_through_the_chunked_head_equals_the_full_logits_and_never_builds_them(monkeypatch):
    """Evaluation runs inside the memory the training step was sized for: the training micro-batch, and the LM head
    and loss over chunks (no (tokens x vocab) tensor), with the same loss as the full logits."""
    from paca_core.data.dataset import TokenizedData

    model = tiny_llama(seed=1)
    paca = prepare_model(model, PaCAConfig(r=4), device="cpu")
    ids = torch.randint(0, 128, (5, 12), generator=torch.Generator().manual_seed(3))
    labels = ids.clone()
    labels[:, :3] = -100
    data = TokenizedData(ids, labels, torch.ones_like(ids), "test")
    full = evaluate(paca, data, torch.device("cpu"), batch_size=2)

    widest = []
    head = paca.base_model.get_output_embeddings()
    original = head.forward

    def spy(hidden):
        out = original(hidden)
        widest.append(out.shape[:-1].numel())
        return out

    monkeypatch.setattr(head, "forward", spy)
    paca.set_loss_chunk_tokens(4)
    chunked = evaluate(paca, data, torch.device("cpu"), batch_size=2)
    assert chunked == pytest.approx(full, rel=1e-5)
    assert not widest  # the chunked loss multiplies by the head's weight itself: the full-logits head never ran
