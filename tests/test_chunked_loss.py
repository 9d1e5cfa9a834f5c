"""The chunked LM head + loss (paca_core/memory/chunked_loss.py) equals the full-logits path of HF's loss."""
from __future__ import annotations

import copy
import logging

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from paca_core import prepare_model
from paca_core.memory import chunked_loss
from paca_core.memory.chunked_loss import chunked_linear_cross_entropy, parse_loss_chunk_tokens
from paca_core.config import FullConfig, PaCAConfig
from paca_core.errors import PacaConfigError
from paca_core.memory.measure import count_saved_tensors

from .conftest import randomise_paca_deltas, tiny_llama


def reference_loss(hidden, weight, bias, labels):
    """HF's causal-LM loss on the full logits: shift by one, ignore -100, mean over the target tokens."""
    logits = F.linear(hidden, weight, bias)
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)


def make_case(batch=3, seq=7, hidden=8, vocab=50, bias=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(batch, seq, hidden, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(vocab, hidden, generator=gen, dtype=torch.float64, requires_grad=True)
    b = torch.randn(vocab, generator=gen, dtype=torch.float64, requires_grad=True) if bias else None
    labels = torch.randint(0, vocab, (batch, seq), generator=gen)
    return h, w, b, labels


def grads(loss, tensors):
    return torch.autograd.grad(loss, [t for t in tensors if t is not None])


LABEL_CASES = {
    "plain": lambda labels: labels,
    "ignored": lambda labels: labels.masked_fill(torch.rand(labels.shape, generator=torch.Generator().manual_seed(1)) < 0.3, -100),
    "prompt-masked": lambda labels: torch.cat([torch.full_like(labels[:, :3], -100), labels[:, 3:]], 1),
    "row-all-ignored": lambda labels: torch.cat([labels[:1], torch.full_like(labels[1:2], -100), labels[2:]], 0),
}


@pytest.mark.parametrize("case", sorted(LABEL_CASES))
@pytest.mark.parametrize("chunk", [1, 4, 5, 21, 1000])  # 21 tokens: 4 → last chunk of 1, 5 → of 1, 1000 → one chunk
@pytest.mark.parametrize("bias", [False, True])
def test_equals_full_logits_float64(case, chunk, bias):
    h, w, b, labels = make_case(bias=bias)
    labels = LABEL_CASES[case](labels)
    expected = reference_loss(h, w, b, labels)
    got = chunked_linear_cross_entropy(h, w, labels, bias=b, chunk_tokens=chunk)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    for g, e in zip(grads(got, (h, w, b)), grads(expected, (h, w, b))):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)


def test_frozen_head_saves_only_the_hidden_gradient():
    h, w, _, labels = make_case(batch=2, seq=64, hidden=8, vocab=500)
    w.requires_grad_(False)
    with count_saved_tensors(nn.Linear(1, 1)) as report:
        loss = chunked_linear_cross_entropy(h, w, labels, chunk_tokens=16)
    assert report.activation_bytes == h.numel() * h.element_size()  # grad_hidden only: no (tokens × vocab) tensor
    (g,) = torch.autograd.grad(loss, h)
    torch.testing.assert_close(g, torch.autograd.grad(reference_loss(h, w, None, labels), h)[0], rtol=1e-10, atol=1e-12)


def test_trainable_head_saves_hidden_and_weight_gradients():
    h, w, _, labels = make_case(batch=2, seq=64, hidden=8, vocab=500)
    with count_saved_tensors(nn.Linear(1, 1)) as report:
        chunked_linear_cross_entropy(h, w, labels, chunk_tokens=16)
    assert report.activation_bytes == (h.numel() + w.numel()) * 8


def test_all_ignored_batch_matches_hf_nan_loss_and_zero_gradients():
    h, w, _, labels = make_case()
    labels = torch.full_like(labels, -100)
    expected = reference_loss(h, w, None, labels)
    got = chunked_linear_cross_entropy(h, w, labels, chunk_tokens=4)
    assert torch.isnan(expected) and torch.isnan(got)  # HF's mean over zero tokens is nan; so is ours
    for g, e in zip(grads(got, (h, w)), grads(expected, (h, w))):
        assert torch.equal(g, e) and not g.any()  # and the gradients are zero, as HF's


def test_num_items_in_batch_and_grad_scale():
    h, w, _, labels = make_case()
    got = chunked_linear_cross_entropy(h, w, labels, chunk_tokens=4, num_items_in_batch=40)
    logits = F.linear(h, w)
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, 50), labels[:, 1:].reshape(-1), reduction="sum") / 40
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    for g, e in zip(grads(got * 0.25, (h, w)), grads(expected * 0.25, (h, w))):  # the incoming gradient scales
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)


def test_bad_chunk_sizes():
    h, w, _, labels = make_case()
    for bad in (0, -3):
        with pytest.raises(PacaConfigError, match="positive number of tokens"):
            chunked_linear_cross_entropy(h, w, labels, chunk_tokens=bad)
    assert parse_loss_chunk_tokens("off") is None and parse_loss_chunk_tokens("256") == 256
    with pytest.raises(PacaConfigError, match="'off'"):
        parse_loss_chunk_tokens("0")
    with pytest.raises(PacaConfigError):
        parse_loss_chunk_tokens("many")
    with pytest.raises(PacaConfigError):
        prepare_model(tiny_llama(), PaCAConfig(r=2), device="cpu").set_loss_chunk_tokens(0)


def test_compiles_without_graph_breaks():
    h, w, _, labels = make_case()
    fn = torch.compile(lambda h, w: chunked_linear_cross_entropy(h, w, labels, chunk_tokens=4), backend="aot_eager", fullgraph=True)
    got = fn(h, w)
    torch.testing.assert_close(got, reference_loss(h, w, None, labels), rtol=1e-12, atol=1e-12)
    for g, e in zip(grads(got, (h, w)), grads(reference_loss(h, w, None, labels), (h, w))):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)


# --- through the whole model --------------------------------------------------------------------------

def _model_batch(seed=0, vocab=128):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (3, 9), generator=gen)
    labels = ids.clone()
    labels[:, :2] = -100  # prompt masked
    labels[1] = -100  # one row with no target
    labels[2, 5] = -100
    return ids, labels


def _trainable_grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("method", ["paca", "paca-trainable-head", "paca-tied"])
def test_model_loss_and_every_gradient_equal_the_ordinary_path(method):
    tied = method == "paca-tied"
    base = tiny_llama(seed=0, dtype=torch.float64, tie_word_embeddings=tied)
    chunked = prepare_model(base, PaCAConfig(r=4), device="cpu")
    randomise_paca_deltas(chunked)
    if method == "paca-trainable-head":
        chunked.base_model.lm_head.weight.requires_grad_(True)
    if tied:  # train the tied embedding too: the head's weight gradient must reach it
        chunked.base_model.model.embed_tokens.weight.requires_grad_(True)
        assert chunked.base_model.lm_head.weight is chunked.base_model.model.embed_tokens.weight
    ordinary = copy.deepcopy(chunked).set_loss_chunk_tokens(None)
    chunked.set_loss_chunk_tokens(5)  # 27 tokens: chunks of 5, the last of 2
    ids, labels = _model_batch()
    for model in (chunked, ordinary):
        model.train()
    out_c = chunked(input_ids=ids, labels=labels)
    out_o = ordinary(input_ids=ids, labels=labels)
    assert out_c.logits is None and out_o.logits is not None
    torch.testing.assert_close(out_c.loss.double(), out_o.loss.double(), rtol=1e-6, atol=1e-7)  # HF's loss upcasts to fp32 only
    # exact reference: the full logits in float64
    logits = out_o.logits
    exact = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))
    torch.testing.assert_close(out_c.loss, exact, rtol=1e-12, atol=1e-12)
    out_c.loss.backward()
    exact.backward()
    gc, go = _trainable_grads(chunked), _trainable_grads(ordinary)
    assert gc.keys() == go.keys() and len(gc) > 0
    if method == "paca-trainable-head":
        assert any("lm_head" in n for n in gc)
    if tied:
        assert any("embed_tokens" in n for n in gc)
    for name in gc:
        torch.testing.assert_close(gc[name], go[name], rtol=1e-9, atol=1e-12, msg=name)


def test_eval_generation_and_no_labels_keep_logits():
    model = prepare_model(tiny_llama(seed=0), PaCAConfig(r=2), device="cpu").set_loss_chunk_tokens(4)
    ids, labels = _model_batch()
    model.eval()
    out = model(input_ids=ids, labels=labels)
    assert out.logits is not None and out.logits.shape == (3, 9, 128)
    model.train()
    assert model(input_ids=ids).logits.shape == (3, 9, 128)
    with torch.no_grad():
        assert model(input_ids=ids, labels=labels).logits is not None
    generated = model.generate(input_ids=ids[:1, :4], max_new_tokens=2, do_sample=False)
    assert generated.shape == (1, 6)


def test_positional_input_ids_and_num_items_in_batch():
    model = prepare_model(tiny_llama(seed=0, dtype=torch.float64), PaCAConfig(r=2), device="cpu").set_loss_chunk_tokens(4)
    reference = copy.deepcopy(model).set_loss_chunk_tokens(None)
    ids, labels = _model_batch()
    got = model(ids, labels=labels, num_items_in_batch=7).loss
    expected = reference(ids, labels=labels, num_items_in_batch=7).loss
    torch.testing.assert_close(got.double(), expected.double(), rtol=1e-6, atol=1e-7)


class _CustomHead(nn.Module):
    def __init__(self, linear):
        super().__init__()
        self.linear = linear

    def forward(self, x):
        return self.linear(x)


def test_a_head_that_is_not_a_plain_linear_falls_back_with_one_info_line(caplog):
    base = tiny_llama(seed=0)
    base.lm_head = _CustomHead(base.lm_head)
    model = prepare_model(base, PaCAConfig(r=2), device="cpu").set_loss_chunk_tokens(4)
    ids, labels = _model_batch()
    chunked_loss._logged.clear()
    with caplog.at_level(logging.INFO, logger="paca_core.memory.chunked_loss"):
        out = model(input_ids=ids, labels=labels)
        model(input_ids=ids, labels=labels)
    assert out.logits is not None  # the ordinary path ran
    lines = [r for r in caplog.records if "Chunked LM loss off" in r.getMessage()]
    assert len(lines) == 1 and "_CustomHead" in lines[0].getMessage()
    expected = F.cross_entropy(out.logits[:, :-1].reshape(-1, 128), labels[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, expected)


def test_an_adapted_head_falls_back_to_the_ordinary_path():
    """FullConfig on lm_head makes the head an adapter layer, not a plain Linear: the ordinary path, same loss."""
    model = prepare_model(tiny_llama(seed=0, dtype=torch.float64), FullConfig(target_modules=["q_proj", "lm_head"]), device="cpu")
    model.set_loss_chunk_tokens(4)
    ids, labels = _model_batch()
    out = model(input_ids=ids, labels=labels)
    assert out.logits is not None
    expected = F.cross_entropy(out.logits[:, :-1].reshape(-1, 128), labels[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss.double(), expected, rtol=1e-6, atol=1e-7)


def test_off_by_default_for_a_model_used_directly_on_in_the_trainers():
    model = prepare_model(tiny_llama(seed=0), PaCAConfig(r=2), device="cpu")
    assert model.loss_chunk_tokens is None  # a training forward with labels returns logits, as before
    ids, labels = _model_batch()
    assert model(input_ids=ids, labels=labels).logits is not None
    assert model.default_loss_chunking().loss_chunk_tokens == chunked_loss.DEFAULT_LOSS_CHUNK_TOKENS
    assert model.set_loss_chunk_tokens(None).default_loss_chunking().loss_chunk_tokens is None  # a choice stays


def test_paca_trainer_trains_on_the_chunked_loss(tmp_path, monkeypatch):
    from transformers import TrainingArguments

    from paca_core import model as model_module
    from paca_core.integrations.transformers import PacaTrainer

    from .scripts.hf_trainer_run import Rows

    calls = []
    original = model_module.chunked_causal_lm_forward
    monkeypatch.setattr(model_module, "chunked_causal_lm_forward", lambda *a, **k: calls.append(k.get("num_items_in_batch")) or original(*a, **k))
    model = prepare_model(tiny_llama(seed=0), PaCAConfig(r=2), device="cpu")
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=4, report_to=[], use_cpu=True,
                             save_strategy="no")
    trainer = PacaTrainer(model=model, args=args, train_dataset=Rows())
    assert model.loss_chunk_tokens == chunked_loss.DEFAULT_LOSS_CHUNK_TOKENS
    trainer.train()
    assert calls  # the training forward took the chunked path
