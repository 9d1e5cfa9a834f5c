"""`paca plan`: the step tracker, the traced step on fake tensors, layer reduction, the searches, FSDP
bytes per rank, the roofline with the fusion rule, and the CLI.

Every check compares the planner with something it does not compute itself: the same step on real
CPU tensors, the bench's exact accounting (`_counted_step`, `count_saved_tensors`), the CPU
allocator as torch's profiler reports it, the full-depth trace, brute force, or hand arithmetic.
Tiny LLaMA configs keep the whole file within about a minute on two busy cores.
"""
from __future__ import annotations

import json
import logging
import math
import re

import pytest
import torch

from devices.profiles import get_profile
from paca_core import extras
from paca_core.workloads.specs import parse_method_spec
from paca_core.plan.estimate import _fused, estimate_time
from paca_core.plan.planner import BYTE_KINDS, Measurement, MethodTracer, PlanSettings, per_rank_bytes, search_largest
from paca_core.plan.trace import build, trace_step
from paca_core.plan.tracker import OpRecord, StepTrace
from .conftest import tiny_llama_config

try:
    import peft  # noqa: F401

    HAVE_PEFT = True
except ImportError:
    HAVE_PEFT = False

needs_peft = pytest.mark.skipif(not HAVE_PEFT, reason="HF PEFT is not installed")
try:
    import bitsandbytes  # noqa: F401

    HAVE_BNB = True
except ImportError:
    HAVE_BNB = False
needs_bnb = pytest.mark.skipif(not HAVE_BNB, reason="bitsandbytes is not installed (pip install 'paca-hal[quant]')")

LORA_RANK = 4  # methods run at spec.rank(LORA_RANK, match_params=True), as the planner does
SEQ, BATCH = 16, 2
METHODS = ["paca", "lora", "lorafa", "velora", "paca+full+velora", "full", "floor", "peft-lora", "peft-lorafa", "qpaca",
           "peft-qlora", "peft-qlora-16bit", "peft-paca", "peft-qpaca"]
needs_peft_paca = pytest.mark.skipif(not HAVE_PEFT or not extras.peft_has_paca(), reason="the installed peft has no PaCA (peft >= 0.22)")


def _marks(method: str) -> list:
    return (([needs_peft] if method.startswith("peft-") else []) + ([needs_bnb] if method in ("qpaca", "peft-qlora", "peft-qlora-16bit", "peft-qpaca") else [])
            + ([needs_peft_paca] if method in ("peft-paca", "peft-qpaca") else []))


def _method_params():
    cases = [pytest.param(m, False, id=m, marks=_marks(m)) for m in METHODS]
    # Tied embeddings: one storage for the input embedding and the LM head (full trains it: its gradient and state too).
    return cases + [pytest.param("full", True, id="full-tied")]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny kernels: one intra-op thread is many times faster on a busy machine (bytes, FLOPs and kernels
    do not depend on it)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
    _RUNS.clear()  # the cached models (and their PaCA layers, which the global optimizer hook visits) go with the module


_RUNS: dict = {}


def _run(method: str, tied: bool = False, vocab: int = 128, seq: int = SEQ, batch: int = BATCH) -> dict:
    """The method's step traced on fake tensors and on real CPU tensors (cached for the tests below)."""
    key = (method, tied, vocab, seq, batch)
    if key not in _RUNS:
        spec = parse_method_spec(method)
        config = tiny_llama_config(tie_word_embeddings=tied, vocab_size=vocab)
        rank = spec.rank(LORA_RANK, True)
        run = {"spec": spec, "config": config, "rank": rank}
        for name, fake in (("fake", True), ("real", False)):
            traced = build(config, spec, rank, torch.float32, fake=fake, seed=0)
            trace, counts = trace_step(traced, seq, batch)
            run[name] = (traced, trace, counts)
        _RUNS[key] = run
    return _RUNS[key]


def _has_paca_layers(module) -> bool:
    from paca_core.layers import PaCALinear

    return any(isinstance(m, PaCALinear) for m in module.modules())


def _decoder_layers(module) -> int:
    return sum(1 for name, _ in module.named_modules() if re.search(r"layers\.\d+$", name))


def _summary(trace: StepTrace, counts: dict, skip_phases=()) -> dict:
    return {
        "peak_bytes": trace.peak_bytes,
        "baseline_bytes": trace.baseline_bytes,
        "end_bytes": trace.end_bytes,
        "peak_by_phase": {k: v for k, v in trace.peak_by_phase.items() if k not in skip_phases},
        "phases": sorted(trace.peak_by_phase),
        "saved_bytes": trace.saved_bytes,
        "saved_tensors": trace.saved_tensors,
        "kernels": trace.kernels,
        "flops": trace.flops,
        "bytes_moved": trace.bytes_moved,
        "counts": dict(counts),
    }


# --- 1. fake tensors trace exactly what real tensors do -----------------------------------------------
@pytest.mark.parametrize("method,tied", _method_params())
def test_fake_trace_equals_real_trace(method, tied):
    run = _run(method, tied)
    (fake_model, fake, fake_counts), (real_model, real, real_counts) = run["fake"], run["real"]
    assert fake_model.fake_mode is not None and real_model.fake_mode is None
    assert _summary(fake, fake_counts) == _summary(real, real_counts)
    # Op by op, not only in total (same ops, same phases, same FLOPs and bytes, same order).
    strip = lambda ops: [(o.name, o.phase, o.kind, o.flops, o.bytes_read, o.bytes_written, o.dtype) for o in ops]  # noqa: E731
    assert strip(fake.ops) == strip(real.ops)
    # Not vacuous: the step did something in every phase it has.
    assert fake.kernels > 100 and fake.flops > 0 and fake.saved_bytes > 0
    assert {"forward", "backward"} <= set(fake.peak_by_phase)
    if method != "floor":
        assert fake_counts["gradients"] > 0 and fake_counts["optimizer"] > 0 and "optimizer" in fake.peak_by_phase
    # The baseline is exactly the model's weights (parameters + buffers) and the optimizer state, and a
    # steady step gives back everything it allocated.
    assert fake.baseline_bytes == fake_counts["weights"] + fake_counts["optimizer"]
    assert fake.end_bytes == fake.baseline_bytes


@needs_peft
@needs_bnb
def test_4bit_gemm_flops_are_counted():
    """bitsandbytes runs QLoRA's forward as one fused 4-bit GEMM op that torch's flop registry does not know;
    the tracker counts it as the GEMM it is, so PEFT QLoRA does exactly PEFT LoRA's FLOPs."""
    qlora, lora = _run("peft-qlora")["fake"][1], _run("peft-lora")["fake"][1]
    fused = [op for op in qlora.ops if op.name == "bitsandbytes.gemm_4bit"]
    assert fused and all(op.kind == "matmul" and op.flops > 0 for op in fused)
    assert qlora.flops == lora.flops


@pytest.mark.parametrize("entry", ["paca@gc", "lora@gc", "paca@all", pytest.param("peft-lora@gc", marks=[needs_peft]),
                                   pytest.param("peft-lora@chunked-loss", marks=[needs_peft])])
def test_fake_trace_equals_real_trace_with_levers(entry):
    """Levers too (paca bench's ``method@gc+chunked-loss+offload``): without a KV cache transformers checks with a
    host read whether rows pack several sequences; the plan answers as the real step does (not packed), so
    the fake trace takes the same causal attention path, op by op."""
    spec = parse_method_spec(entry)
    config = tiny_llama_config()
    runs = []
    for fake in (True, False):
        traced = build(config, spec, spec.rank(LORA_RANK, True), torch.float32, fake=fake, seed=0, loss_chunk_tokens=8)
        runs.append(trace_step(traced, SEQ, BATCH))
    (fake, fake_counts), (real, real_counts) = runs
    assert _summary(fake, fake_counts) == _summary(real, real_counts)
    strip = lambda ops: [(o.name, o.phase, o.kind, o.flops, o.bytes_read, o.bytes_written, o.dtype) for o in ops]  # noqa: E731
    assert strip(fake.ops) == strip(real.ops)


def test_paca_column_write_order_is_deterministic(monkeypatch):
    import paca_core.layers.partial_connection as partial_connection

    orders = []
    original = partial_connection.sync_layers

    def recording(layers):
        if len(layers) > 1:
            orders[-1].append([layer.module_name for layer in layers])
        return original(layers)

    monkeypatch.setattr(partial_connection, "sync_layers", recording)
    spec = parse_method_spec("paca")
    models = []
    for _ in range(2):  # both alive at once: different addresses
        orders.append([])
        models.append(build(tiny_llama_config(), spec, 8, torch.float32, fake=True))
        trace_step(models[-1], 4, 1)
    # The optimizer's parameter order, whatever the layers' addresses (a WeakSet's order would vary).
    assert orders[0] and orders[0] == orders[1]


# --- 2. what the planner predicts equals what the bench measures on real tensors ----------------------
@pytest.mark.parametrize("method,tied", _method_params())
def test_predicted_bytes_equal_bench_accounting(method, tied):
    from transformers import AutoModelForCausalLM

    from paca_core.bench.worker import _counted_step
    from paca_core.workloads.accounting import optimizer_state_bytes
    from paca_core.workloads.prepare import prepare

    run = _run(method, tied)
    _, fake, counts = run["fake"]
    # A fresh real model, set up by the bench, same seed; one counted step on the batch the planner traced.
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(run["config"])
    prepared = prepare(run["spec"], model, run["rank"], {}, torch.device("cpu"), lr=1e-4, place=False)
    prepared.module.train()
    # The planner counts optimizer state after its tiny first step; a fresh optimizer has none yet, and
    # `_counted_step` counts after its own step, i.e. once the state exists.
    assert optimizer_state_bytes(prepared.optimizer) == 0
    measured = _counted_step(prepared, torch.zeros((BATCH, SEQ), dtype=torch.long), torch.device("cpu"))
    predicted = {
        "saved_activation_bytes": fake.saved_bytes,  # count_saved_tensors around the forward, in _counted_step
        "parameter_bytes": counts["weights"],  # both: parameters + buffers, each storage once
        "gradient_bytes": counts["gradients"],
        "optimizer_state_bytes": counts["optimizer"],
        "host_table_bytes": counts["host"],
    }
    assert predicted == {k: measured[k] for k in predicted}
    if method != "floor":  # AdamW-style state: at least one moment per trainable element
        trainable_bytes = sum(p.numel() * p.element_size() for p in prepared.params)
        assert counts["gradients"] == trainable_bytes
        assert counts["optimizer"] >= trainable_bytes
    assert counts["trainable_params"] == sum(p.numel() for p in prepared.params)
    assert counts["total_params"] == sum(p.numel() for p in prepared.module.parameters())


# --- MEFT: worst-case row choices (paca_core/plan/standins.py), host memory kept apart -----------------
@pytest.mark.parametrize("method", ["meft", "paca+meft"])
def test_meft_plans_device_and_host_bytes_apart(method):
    from paca_core.workloads.accounting import host_tables, table_tensors

    run = _run(method)
    (fake_model, fake, fake_counts), (real_model, real, real_counts) = run["fake"], run["real"]
    # The same stand-in on real tensors traces the same step (value-dependent choices are fixed, not guessed).
    assert _summary(fake, fake_counts) == _summary(real, real_counts)
    tables = host_tables(real_model.prepared.module)
    assert tables
    host = {id(t.untyped_storage()): t.untyped_storage().nbytes() for table in tables for t in table_tensors(table)}
    assert any(table.exp_avg for table in tables)  # the rows' Adam moments, host memory too
    assert real_counts["host"] == sum(host.values()) > 0
    # Nothing of the host side is device memory: before the step only weights and optimizer state are live,
    # and the host's own work in the step (row selection, gradient sums, the row update) adds nothing.
    assert real.baseline_bytes == real_counts["weights"] + real_counts["optimizer"]
    assert real.end_bytes == real.baseline_bytes
    # What crosses to the device is there: each MEFT layer's (2, capacity + 1, d) row buffer is kept for backward.
    layer = next(m for m in real_model.prepared.module.modules() if hasattr(m, "table") and hasattr(m, "capacity"))
    tokens = BATCH * SEQ
    capacity = min(layer.capacity, tokens * layer.top_k)
    row_buffer = 2 * (capacity + 1) * layer.in_features * 4
    assert real.saved_bytes >= len(tables) * row_buffer
    assert real.saved_bytes > _run("floor")["fake"][1].saved_bytes + len(tables) * row_buffer // 2


# --- 3. the peak on real tensors, checked independently ------------------------------------------------
def _profiled_step_peak(traced) -> tuple[int, int]:
    """(peak, end) of the bytes the CPU allocator reports to torch's profiler during one more real step,
    counted from the step's start: an account that owes nothing to the tracker."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    from paca_core.plan.trace import phased_step

    ids = torch.zeros((BATCH, SEQ), dtype=torch.long)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        phased_step(traced.prepared, ids)
    sizes = []

    def walk(nodes):
        for node in nodes:
            if node.tag == _EventType.Allocation:
                sizes.append((node.start_time_ns, node.extra_fields.alloc_size))  # negative: a free
            walk(node.children)

    walk(prof.profiler.kineto_results.experimental_event_tree())
    assert sizes, "the profiler reported no allocations"
    live = peak = 0
    for _, size in sorted(sizes):
        live += size
        peak = max(peak, live)
    return peak, live


def test_paca_peak_on_real_tensors_independent_checks():
    run = _run("paca")
    traced, real, counts = run["real"]
    _, fake, _ = run["fake"]
    assert real.peak_bytes == fake.peak_bytes  # (and every other figure: test 1)
    # (a) The CPU allocator's own count (c10's profiled CPU allocator, seen through torch.profiler): the
    # step's high-water mark above what existed before it equals the tracker's peak above its baseline,
    # and the step frees all it allocates. Allocations a kernel made behind the dispatcher would show here.
    peak, end = _profiled_step_peak(traced)
    assert peak == real.peak_bytes - real.baseline_bytes
    assert end == 0
    # (b) Bounds from what must and may be live, on the tiny shape and one whose logits dominate.
    for vocab, seq in ((128, SEQ), (1024, 32)):
        _, trace, c = _run("paca", vocab=vocab, seq=seq)["real"]
        logits = BATCH * seq * vocab * 4  # fp32 (batch, seq, vocab)
        persistent = c["weights"] + c["optimizer"]
        # Lower: when backward starts, every saved tensor is alive beside the weights and optimizer state,
        # and the loss's backward allocates the gradient of the log-probabilities, one logits-sized tensor.
        assert trace.peak_bytes >= persistent + trace.saved_bytes + logits
        # Upper: beyond that, at most every gradient, and the loss backward's second logits-sized tensor
        # (log_softmax's input gradient is written while the log-prob gradient is still alive); every
        # other transient is far smaller than the saved activations already freed by then.
        assert trace.peak_bytes <= persistent + trace.saved_bytes + c["gradients"] + 2 * logits
        assert trace.peak_by_phase["backward"] == trace.peak_bytes


# --- 4. tracing 1 and 2 layers and extrapolating equals tracing the whole stack ------------------------
@pytest.mark.parametrize("method,gradient_checkpointing,offload", [
    ("paca", False, None),  # the fast tier's case; the rest take seconds each (pytest -m slow)
    *(pytest.param(*case, marks=pytest.mark.slow) for case in [
        ("paca", True, None), ("paca+full+velora", False, None), ("paca+full+velora", True, None),
        ("lora", False, None), ("full", True, None), ("paca", False, "decoder-layers"), ("paca", True, "decoder-layers"),
    ]),
], ids=lambda v: {False: "no-gc", True: "gc", None: "", "decoder-layers": "offload"}.get(v, v) if v in (False, True, None, "decoder-layers") else v)
def test_layer_reduction_is_exact(method, gradient_checkpointing, offload):
    config = tiny_llama_config(num_hidden_layers=5)
    profiles = [get_profile("gaudi2"), get_profile("h100-80g")]
    settings = PlanSettings(dtype=torch.float32, rank=LORA_RANK, gradient_checkpointing=gradient_checkpointing,
                            offload_activations=offload)
    tracer = MethodTracer(config, method, settings, profiles)
    seq = 512 if offload else SEQ  # tensors above the offload's 64 KiB threshold
    measured = tracer.measure(seq, BATCH)
    # Traced reduced: 1 and 2 layers; with offload 3 and 4 (backward holds up to three layers' tensors).
    assert [_decoder_layers(m.prepared.module) for m in tracer._build()] == ([3, 4] if offload else [1, 2])

    full = build(config, tracer.spec, tracer.rank, torch.float32, gradient_checkpointing=gradient_checkpointing,
                 offload_activations=offload)
    trace, counts = trace_step(full, seq, BATCH)
    expected = {"weights": counts["weights"], "gradients": counts["gradients"], "optimizer": counts["optimizer"],
                "saved_activations": trace.saved_bytes, "peak": trace.peak_bytes, "host": counts["host"]}
    assert set(expected) == set(BYTE_KINDS)
    assert measured.bytes == expected
    assert (measured.flops, measured.bytes_moved, measured.kernels) == (trace.flops, trace.bytes_moved, trace.kernels)
    assert tracer.counts == full.counts
    for profile in profiles:
        estimate = estimate_time(trace, profile)
        timing = measured.times[profile.name]
        assert timing["kernels"] == estimate.kernels
        for name in ("step_seconds", "compute_seconds", "memory_seconds", "launch_seconds"):
            assert math.isclose(timing[name], getattr(estimate, name), rel_tol=1e-6, abs_tol=1e-15), (profile.name, name)
        assert timing["bound"] == estimate.bound
    assert tracer.traces == 2
    assert tracer.measure(seq, BATCH) is measured and tracer.traces == 2  # cached


# --- 5. the searches -----------------------------------------------------------------------------------
def _brute(peak_at, budget: int, limit: int, step: int) -> int:
    if peak_at(limit) <= budget:
        return limit
    fits = [x for x in range(step, limit + 1, step) if peak_at(x) <= budget]
    return max(fits) if fits else 0


SHAPES = {
    "affine": (lambda x: 1000 + 37 * x, 1000),
    "convex": (lambda x: 500 + 3 * x + x * x // 7, 500),
    "step-like": (lambda x: 200 + 900 * math.ceil(x / 100), 200),
    "flat": (lambda x: 5000, 5000),
    "static-underestimated": (lambda x: 4000 + 11 * x, 0),
}


@pytest.mark.parametrize("shape", list(SHAPES))
def test_search_largest_matches_brute_force(shape):
    peak_at, static = SHAPES[shape]
    cases = 0
    for step in (1, 8, 64):
        for limit in (step, 7 * step, 64 * step, 500 * step, 1000):  # 1000: not a multiple of 64
            interesting = [step, 3 * step, 17 * step, limit // 3, limit - step, limit]
            budgets = {peak_at(x) + d for x in interesting if x >= step for d in (-1, 0, 1)} | {0, peak_at(limit) + 10**6}
            for start in (step, max(step, limit // 2), limit, 2 * limit):
                for budget in sorted(budgets):
                    probes = []

                    def probe(x):
                        assert step <= x <= limit and (x % step == 0 or x == limit), (x, step, limit)
                        probes.append(x)
                        return peak_at(x)

                    got = search_largest(probe, budget, start, limit, step, static)
                    assert got == _brute(peak_at, budget, limit, step), dict(step=step, limit=limit, start=start, budget=budget, probes=probes)
                    assert len(probes) == len(set(probes)), probes  # no point traced twice
                    cases += 1
    assert cases > 200


def test_search_largest_ends_and_probe_count():
    peak_at = lambda x: 10_000 + 100 * x  # noqa: E731
    # Nothing fits (not even the smallest step): 0. Everything fits: the limit.
    assert search_largest(peak_at, 10_000, 64, 4096, 64, 10_000) == 0
    assert search_largest(peak_at, peak_at(4096), 64, 4096, 64, 10_000) == 4096
    assert search_largest(peak_at, 10**12, 1, 16384, 1, 10_000) == 16384
    # Affine peaks: the first line through (0, static) lands on the answer; one more probe confirms it.
    for start in (1, 64, 1000, 4096, 8192):
        for answer in (1, 2, 63, 64, 65, 700, 4095):
            calls = []
            got = search_largest(lambda x: calls.append(x) or peak_at(x), peak_at(answer) + 50, start, 4096, 1, 10_000)
            assert got == answer
            assert len(calls) <= 4, (start, answer, calls)


# --- 6. FSDP: bytes per rank --------------------------------------------------------------------------
def test_per_rank_bytes_by_hand():
    m = Measurement(bytes={"weights": 1001, "gradients": 203, "optimizer": 2002, "saved_activations": 5000,
                           "peak": 9000, "host": 7}, flops=1, bytes_moved=1, kernels=1)
    one = per_rank_bytes(m, PlanSettings(), 100)
    assert one == dict(m.bytes, all_gather_buffers=0)
    for settings in (PlanSettings(world_size=4), PlanSettings(world_size=1, fsdp=True)):  # DDP, or one rank: as traced
        assert per_rank_bytes(m, settings, 100) == one
    sharded = per_rank_bytes(m, PlanSettings(world_size=4, fsdp=True), 100)
    # Without phase peaks the peak is taken as a forward one: weights and optimizer state shrink, gradients are not live.
    assert sharded == {"weights": 251, "gradients": 51, "optimizer": 501, "saved_activations": 5000, "host": 7,
                       "all_gather_buffers": 200, "peak": 9000 - (1001 - 251) - (2002 - 501) + 200}
    assert m.bytes["peak"] == 9000  # the measurement itself is not changed
    # Per phase: forward/backward lose the other ranks' weights and state; the optimizer step (all per
    # parameter: weights, gradients, state, the optimizer's temporaries on local shards) is divided by N.
    m.phase_peaks = {"forward": 5000, "backward": 8800, "optimizer": 9000}
    assert per_rank_bytes(m, PlanSettings(world_size=4, fsdp=True), 100)["peak"] == max(
        5000 - 750 - 1501, 8800 - 750 - 1501 - 152 + 100, 9000 // 4) + 200  # backward: one layer's gradient unsharded
    m.phase_peaks = {"forward": 3000, "backward": 3100, "optimizer": 40000}
    assert per_rank_bytes(m, PlanSettings(world_size=4, fsdp=True), 100)["peak"] == 10000 + 200


def test_per_rank_bytes_under_deepspeed_zero_stages():
    m = Measurement(bytes={"weights": 1001, "gradients": 203, "optimizer": 2002, "saved_activations": 5000,
                           "peak": 9000, "host": 7}, flops=1, bytes_moved=1, kernels=1)
    m.phase_peaks = {"forward": 5000, "backward": 8800, "optimizer": 9000}
    # ZeRO-3 partitions what FSDP2 shards: the same bytes per rank
    assert per_rank_bytes(m, PlanSettings(world_size=4, zero=3), 100) == per_rank_bytes(m, PlanSettings(world_size=4, fsdp=True), 100)
    one = per_rank_bytes(m, PlanSettings(), 100)
    zero1 = per_rank_bytes(m, PlanSettings(world_size=4, zero=1), 100)  # optimizer state only; no all-gathers
    assert zero1 == dict(one, optimizer=501, peak=max(5000 - 1501, 8800 - 1501, 9000 - 1501))
    zero2 = per_rank_bytes(m, PlanSettings(world_size=4, zero=2), 100)  # and gradients, reduce-scattered in backward
    assert zero2 == dict(one, optimizer=501, gradients=51, peak=max(5000 - 1501, 8800 - 1501 - 152 + 100, 9000 - 1501 - 152))
    assert per_rank_bytes(m, PlanSettings(world_size=1, zero=3), 100) == one  # one process: nothing to shard


def test_per_rank_bytes_on_a_traced_model():
    config = tiny_llama_config(num_hidden_layers=3)
    tracer = MethodTracer(config, "paca", PlanSettings(dtype=torch.float32, rank=LORA_RANK), [])
    m = tracer.measure(SEQ, BATCH)
    # One decoder layer's weights: its own parameters and buffers, as built (the 2-layer model's layers.0).
    two_layers = tracer._build()[1].prepared.module
    layer = next(mod for name, mod in two_layers.named_modules() if name.endswith("layers.0"))
    storages = {id(t.untyped_storage()): t.untyped_storage().nbytes() for t in list(layer.parameters()) + list(layer.buffers())}
    assert tracer.layer_weight_bytes() == sum(storages.values()) > 0
    per_rank = per_rank_bytes(m, PlanSettings(dtype=torch.float32, world_size=4, fsdp=True), tracer.layer_weight_bytes())
    for kind in ("weights", "gradients", "optimizer"):
        assert per_rank[kind] == math.ceil(m.bytes[kind] / 4)
    assert per_rank["all_gather_buffers"] == 2 * tracer.layer_weight_bytes()
    assert per_rank["saved_activations"] == m.bytes["saved_activations"]
    saved = {k: m.bytes[k] - per_rank[k] for k in ("weights", "gradients", "optimizer")}
    assert set(m.phase_peaks) >= {"forward", "backward", "optimizer"} and max(m.phase_peaks.values()) == m.bytes["peak"]
    in_flight = min(tracer.layer_weight_bytes(), m.bytes["gradients"])
    expected = {
        phase: math.ceil(peak / 4) if phase in ("optimizer", "column_write")
        else peak - saved["weights"] - saved["optimizer"] - (saved["gradients"] - in_flight if phase == "backward" else 0)
        for phase, peak in m.phase_peaks.items()}
    assert per_rank["peak"] == max(expected.values()) + per_rank["all_gather_buffers"]


# --- 7. the roofline and the fusion rule ---------------------------------------------------------------
def _op(name, phase, kind, flops, read, written, inputs, outputs):
    return OpRecord(name, phase, kind, flops, read, written, torch.bfloat16, tuple(inputs), tuple(outputs))


def _hand_trace() -> StepTrace:
    ops = [
        _op("aten.mm", "forward", "matmul", 2 * 4096**3, 2 * 4096 * 4096 * 2, 4096 * 4096 * 2, (1, 2), (3,)),
        _op("aten.mul", "forward", "elementwise", 4096, 8192 + 8192, 8192, (3, 4), (5,)),  # 4 external
        _op("aten.add", "forward", "elementwise", 4096, 8192 + 8192, 8192, (5, 3), (6,)),  # 5, 3 inside
        _op("aten.sigmoid_", "forward", "elementwise", 4096, 8192, 8192, (7,), (7,)),  # in place on external 7
        _op("aten.mul", "forward", "elementwise", 4096, 8192 + 8192, 8192, (7, 6), (4,)),  # 4 reused by an output
        _op("aten.mul", "backward", "elementwise", 4096, 8192 + 8192, 8192, (6, 8), (9,)),  # new phase: new run
        _op("aten.sum", "backward", "other", 0, 8192, 2, (9,), (10,)),
        _op("aten.neg", "backward", "elementwise", 4096, 8192, 8192, (9,), (11,)),
    ]
    return StepTrace(ops=ops)


def test_fused_merges_runs_and_counts_external_inputs_and_last_outputs():
    trace = _hand_trace()
    fused = _fused(trace.ops)
    assert [(o.name, o.phase) for o in fused] == [
        ("aten.mm", "forward"), ("fused_elementwise", "forward"), ("aten.mul", "backward"), ("aten.sum", "backward"),
        ("aten.neg", "backward")]
    run = fused[1]
    assert run.kind == "elementwise" and run.flops == 4 * 4096
    # External reads, each op's in proportion to its inputs: mul 3 (produced by the mm before the run: external)
    # and 4 -> all 16384; add reads 5 (mul's output) and 3 (the mm's output, outside the run) -> 8192;
    # sigmoid_ reads 7 in place, produced outside -> 8192; the last mul reads 7 (written by sigmoid_, earlier in
    # the run) and 6 (add's) -> 0. Id 4, read by the first mul, is reused by the last mul's output later in the
    # run: it was still read from memory.
    assert run.bytes_read == 16384 + 8192 + 8192 + 0
    assert run.bytes_written == 8192 and run.outputs == (4,)
    # Single elementwise ops pass through unchanged.
    assert fused[2] is trace.ops[5] and fused[4] is trace.ops[7]


def test_estimate_time_is_roofline_plus_launch_per_kernel():
    trace = _hand_trace()
    h100, gaudi2 = get_profile("h100-80g"), get_profile("gaudi2")
    assert not h100.fuse_elementwise and gaudi2.fuse_elementwise
    for profile, ops in ((h100, trace.ops), (gaudi2, _fused(trace.ops))):
        estimate = estimate_time(trace, profile)
        roofline = sum(profile.op_seconds(o.flops, o.bytes_moved, o.dtype, o.kind == "matmul") for o in ops)
        assert estimate.kernels == len(ops)
        assert math.isclose(estimate.launch_seconds, len(ops) * profile.launch_overhead_s, rel_tol=1e-12)
        assert math.isclose(estimate.step_seconds, roofline + len(ops) * profile.launch_overhead_s, rel_tol=1e-12)
        assert math.isclose(estimate.compute_seconds + estimate.memory_seconds, roofline, rel_tol=1e-12)
        assert estimate.compute_seconds > 0  # the 4096^3 bf16 matmul is compute-bound on both
    assert estimate_time(trace, h100).kernels == 8 and estimate_time(trace, gaudi2).kernels == 5
    # On a traced step: Gaudi's fusion launches fewer kernels than the same step eager on an H100.
    _, step, _ = _run("paca")["fake"]
    assert estimate_time(step, h100).kernels == step.kernels > estimate_time(step, gaudi2).kernels


# --- 8. the CLI ----------------------------------------------------------------------------------------
@pytest.fixture
def tiny_config_file(tmp_path):
    config = tiny_llama_config(max_position_embeddings=256)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config.to_dict()))
    return path


@pytest.mark.slow
def test_cli_plan_writes_records(tiny_config_file, tmp_path):
    from paca_core.cli.dispatch import main

    out = tmp_path / "plan"
    rc = main(["plan", "--model", str(tiny_config_file), "--methods", "paca,peft-lora" if HAVE_PEFT else "paca,lora",
               "--device-profile", "h100-80g,gaudi2", "--seq-len", "32,64", "--batch-size", "1", "--out", str(out)])
    assert rc == 0
    document = json.loads((out / "plan.json").read_text())
    assert (out / "plan.md").exists()
    records = document["records"]
    assert len(records) == 2 * 2 * 2
    fields = {"method", "device_profile", "dtype", "seq_len", "batch_size", "rank", "trainable_params", "bytes", "fits",
              "max_seq_len", "max_batch_size", "step_seconds", "tokens_per_second", "bound"}
    for r in records:
        assert fields <= set(r), fields - set(r)
        assert {"weights", "gradients", "optimizer", "saved_activations", "peak", "host"} <= set(r["bytes"])
        assert r["dtype"] == "bfloat16" and r["batch_size"] == 1 and r["seq_len"] in (32, 64)
        assert r["device_profile"] in ("h100-80g", "gaudi2")
        assert r["fits"] is True and r["trainable_params"] > 0
        assert 0 < r["max_seq_len"] <= 256 and r["max_batch_size"] >= 1
        assert r["bytes"]["peak"] >= r["bytes"]["weights"] + r["bytes"]["optimizer"] + r["bytes"]["saved_activations"]
        assert r["step_seconds"] > 0 and math.isclose(r["tokens_per_second"], r["seq_len"] / r["step_seconds"])
        assert r["bound"] in ("compute", "memory bandwidth", "launch overhead")
    assert {r["method"] for r in records} == ({"paca", "peft-lora"} if HAVE_PEFT else {"paca", "lora"})
    assert {r["rank"] for r in records if r["method"] == "paca"} == {16}  # 2 x LoRA's 8: matched parameters


@pytest.mark.parametrize("argv,needles", [
    (["--model", "no-such-shape"], ["no-such-shape", "llama-3.1-8b"]),
    (["--device-profile", "tpu-v9"], ["tpu-v9", "h100-80g", "gaudi2"]),
    (["--seq-len", "512"], ["512", "256"]),
    pytest.param(["--methods", "peft-lora+velora"], ["peft-lora+velora", "tensor values"], marks=[needs_peft]),
    pytest.param(["--methods", "qpaca", "--quantize", "fp4", "--device-profile", "gaudi2"], ["qpaca", "gaudi2", "fp4", "--quantize nf4"],
                 marks=[needs_bnb]),
    (["--fsdp"], ["--fsdp", "--world-size"]),
    (["--zero", "3"], ["--zero", "--world-size"]),
    (["--zero", "2", "--fsdp", "--world-size", "2"], ["--zero", "--fsdp", "choose one"]),
], ids=["unknown-shape", "unknown-profile", "seq-above-context", "peft-velora-host-read", "fp4-on-gaudi", "fsdp-without-world-size",
        "zero-without-world-size", "zero-with-fsdp"])
def test_cli_plan_bad_input(argv, needles, tiny_config_file, caplog):
    from paca_core.cli.dispatch import main
    from paca_core.plan.shapes import known_shapes

    args = {"--model": str(tiny_config_file), "--methods": "paca", "--device-profile": "h100-80g", "--seq-len": "64",
            "--batch-size": "1"}
    flags = []
    for i, item in enumerate(argv):
        if item.startswith("--") and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            args[item] = argv[i + 1]
        elif item.startswith("--"):
            flags.append(item)
    command = ["plan"] + [x for k, v in args.items() for x in (k, v)] + flags
    with caplog.at_level(logging.ERROR):
        assert main(command) == 2
    message = "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR)
    for needle in needles:
        assert needle in message, (needle, message)
    if argv[1:] == ["no-such-shape"]:
        assert all(name in message for name in known_shapes())


@needs_bnb
def test_cli_plan_quantize_plans_the_4bit_forms(tiny_config_file, tmp_path):
    """--quantize: paca is planned as QPaCA and peft-lora as PEFT QLoRA in the asked 4-bit type, methods without a
    4-bit form stay on the --dtype base, and the output says that the 4-bit matmul is a stand-in."""
    from paca_core.cli.dispatch import main

    methods = "paca,lora,peft-lora" if HAVE_PEFT else "paca,lora"
    out = tmp_path / "plan"
    assert main(["plan", "--model", str(tiny_config_file), "--methods", methods, "--quantize", "fp4", "--device-profile",
                 "a100-80g", "--seq-len", "64", "--batch-size", "1", "--no-search", "--workers", "1", "--out", str(out)]) == 0
    document = json.loads((out / "plan.json").read_text())
    by_method = {r["method"]: r for r in document["records"]}
    assert set(by_method) == ({"qpaca", "lora", "peft-qlora"} if HAVE_PEFT else {"qpaca", "lora"})
    assert by_method["qpaca"]["quantize"] == "fp4" and by_method["lora"]["quantize"] is None
    assert by_method["qpaca"]["notes"] and not by_method["lora"]["notes"]
    assert any("stand-in" in note for note in document["notes"]) and "stand-in" in (out / "plan.md").read_text()
    # The 4-bit base holds half a byte per projection weight (plus block scales): far less than bf16 LoRA's.
    assert by_method["qpaca"]["bytes"]["weights"] < by_method["lora"]["bytes"]["weights"]


@needs_bnb
def test_train_preflight_plans_a_quantized_base(tiny_config_file):
    """paca train --quantize nf4: the preflight traces QPaCA on fake tensors (the 4-bit stand-in) and plans less
    than the bf16 PaCA run at the same shape."""
    from paca_core.methods import PaCAConfig
    from paca_core.plan.preflight import planned_peak

    folder = tiny_config_file.parent
    plain = planned_peak(folder, "paca", [PaCAConfig(r=4, seed=0)], 32, 2, torch.float32)
    quantized = planned_peak(folder, "paca", [PaCAConfig(r=4, seed=0, quantize="nf4")], 32, 2, torch.float32)
    assert 0 < quantized < plain


def test_train_preflight_warns_before_loading_when_the_plan_does_not_fit(tiny_config_file, caplog):
    """`paca train --plan-check`: the user's configs traced from config.json alone; a warning naming the
    levers when the planned peak exceeds the device, an info line when it fits, under FSDP per rank."""
    from paca_core.methods import PaCAConfig
    from paca_core.plan.preflight import check_before_loading, planned_peak

    folder = tiny_config_file.parent  # a model folder with only config.json: no weights are read
    configs = [PaCAConfig(r=4, seed=0)]
    peak = planned_peak(folder, "paca", configs, 32, 2, torch.float32)
    with caplog.at_level(logging.INFO, logger="paca_core.plan.preflight"):
        fits = check_before_loading(folder, "paca", configs, 32, 2, torch.float32, device_bytes=peak)
        too_small = check_before_loading(folder, "paca", configs, 32, 2, torch.float32, device_bytes=peak - 1)
    assert fits.fits and not too_small.fits and too_small.peak_bytes == peak
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and all(word in warnings[0] for word in ("--rank", "--seq-len", "--batch-size", "checkpointing",
                                                                       "--offload-activations", "--quantize", "--fsdp"))
    # A bigger batch plans more; FSDP plans this rank's shards plus two layers of all-gather buffers (on this
    # tiny model the buffers outweigh the sharding); an unknown device size plans nothing.
    from paca_core.plan.planner import MethodTracer, PlanSettings
    from paca_core.plan.shapes import load_config

    assert planned_peak(folder, "paca", configs, 32, 4, torch.float32) > peak
    tracer = MethodTracer(load_config(str(folder)), "paca", PlanSettings(dtype=torch.float32), profiles=(), configs=configs)
    fsdp = PlanSettings(dtype=torch.float32, world_size=4, fsdp=True)
    assert planned_peak(folder, "paca", configs, 32, 2, torch.float32, world_size=4, fsdp=True) == \
        per_rank_bytes(tracer.measure(32, 2), fsdp, tracer.layer_weight_bytes())["peak"] != peak
    assert check_before_loading(folder, "paca", configs, 32, 2, torch.float32, device_bytes=None) is None


def test_planned_activation_offload_moves_saved_tensors_to_host():
    """--offload-activations in a plan: what the real offload would move is host memory (not device), it
    comes back in backward as device tensors; fake and real tensors trace the same step."""
    config = tiny_llama_config(num_hidden_layers=2, hidden_size=64, intermediate_size=128)
    spec = parse_method_spec("paca")
    runs = {}
    for offload in (None, "decoder-layers"):
        for fake in (True, False):
            traced = build(config, spec, 8, torch.float32, fake=fake, offload_activations=offload)
            runs[(offload, fake)] = trace_step(traced, 64, 2)
    for offload in (None, "decoder-layers"):
        (fake, fake_counts), (real, real_counts) = runs[(offload, True)], runs[(offload, False)]
        assert _summary(fake, fake_counts) == _summary(real, real_counts)
    plain, offloaded = runs[(None, True)][0], runs[("decoder-layers", True)][0]
    # Inside the decoder layers only tensors under the offload's size threshold stay on the device.
    assert offloaded.saved_bytes < plain.saved_bytes
    assert offloaded.peak_by_phase["forward"] < plain.peak_by_phase["forward"]
    assert offloaded.end_bytes == offloaded.baseline_bytes  # every host copy and device copy is released


def test_the_held_out_pass_is_planned_at_the_training_micro_batch_with_the_chunked_loss():
    """paca train evaluates after training with the optimizer state live: the plan (and so --seq-len auto and
    --plan-check) includes that pass as phase ``evaluate``; its kernels do not time the step. Its peak is the
    weights, optimizer state and one batch's forward, so it grows with the full logits only when the loss is not
    chunked."""
    config = tiny_llama_config(num_hidden_layers=2, vocab_size=4096)
    seq, batch = 64, 2
    logits = batch * seq * 4096 * 4
    chunked = MethodTracer(config, "paca", PlanSettings(dtype=torch.float32, rank=LORA_RANK, loss_chunk_tokens=16), []).measure(seq, batch)
    full = MethodTracer(config, "paca", PlanSettings(dtype=torch.float32, rank=LORA_RANK, loss_chunk_tokens=None), []).measure(seq, batch)
    for m in (chunked, full):
        assert "evaluate" in m.phase_peaks and m.bytes["peak"] >= m.phase_peaks["evaluate"] > m.bytes["weights"] + m.bytes["optimizer"]
    assert full.phase_peaks["evaluate"] - chunked.phase_peaks["evaluate"] >= logits  # the full fp32 logits, and only there
    traced = build(config, parse_method_spec("paca"), LORA_RANK, torch.float32, {}, loss_chunk_tokens=16)
    trace, _ = trace_step(traced, seq, batch)
    assert all(op.phase != "evaluate" for op in trace.ops)  # the step's time is the training step's alone


@pytest.mark.slow  # a full plan with searches of a 135M model; the fast tier runs plan --quantize end to end
def test_plan_labels_layout_budget_context_and_versions(tmp_path):
    """What the table and plan.json say: memory per rank with the layout named (N replicas without --fsdp/--zero), a
    longest sequence that is the context marked as such, --memory-budget used for 'fits', library versions recorded."""
    from paca_core.cli.dispatch import main
    from paca_core.plan.report import markdown_table

    assert PlanSettings(world_size=4).layout() == "4 replicas (DDP)"
    assert PlanSettings(world_size=4, fsdp=True).layout() == "FSDP2 over 4 ranks"
    assert PlanSettings(world_size=4, zero=2).layout() == "ZeRO-2 over 4 ranks"
    assert PlanSettings().layout() == "one process"
    out = tmp_path / "plan"
    argv = ["plan", "--model", "smollm2-135m", "--methods", "paca", "--device-profile", "h100-80g", "--seq-len", "512",
            "--batch-size", "1", "--workers", "1", "--out", str(out)]
    assert main(argv + ["--memory-budget", "64MiB"]) == 0
    document = json.loads((out / "plan.json").read_text())
    (tight,) = document["records"]
    assert tight["limit_bytes"] == 64 * 2**20 and tight["budget_source"].startswith("--memory-budget") and not tight["fits"]
    assert tight["usable_bytes"] < tight["limit_bytes"]  # less the regime's margin for untraced overhead
    for name in ("transformers", "peft", "bitsandbytes"):
        assert name in document["environment"]
    assert main(argv + ["--overwrite"]) == 0
    (roomy,) = json.loads((out / "plan.json").read_text())["records"]
    assert roomy["fits"] and roomy["max_seq_len"] == roomy["context"] == 8192 and roomy["max_seq_len_is_context"]
    table = markdown_table([roomy])
    assert "8192 (context)" in table and "GiB per rank (one process)" in table and "tokens/s: all ranks" in table


@needs_peft
@needs_bnb
def test_peft_qlora_is_planned_as_users_run_it():
    """transformers' load_in_4bit quantizes every linear but the head whatever LoRA targets, and PEFT's
    prepare_model_for_kbit_training upcasts what stays in 16 bits (norms, embeddings, head) to fp32."""
    config = tiny_llama_config(num_hidden_layers=2)
    few = build(config, parse_method_spec("peft-qlora"), LORA_RANK, torch.bfloat16, {"target_modules": "q_proj,v_proj"})
    every = build(config, parse_method_spec("peft-qlora"), LORA_RANK, torch.bfloat16, {})
    assert few.counts["weights"] == every.counts["weights"] - (every.counts["trainable_params"] - few.counts["trainable_params"]) * 4
    import bitsandbytes as bnb

    module = few.prepared.module
    assert sum(isinstance(m, bnb.nn.Linear4bit) for m in module.modules()) == 2 * 7  # every projection, not only q and v
    kept = {p.dtype for n, p in module.named_parameters() if not p.requires_grad and "norm" in n or "embed" in n}
    assert kept == {torch.float32}


@needs_peft
@needs_bnb
def test_peft_qlora_16bit_keeps_the_16_bit_layers_in_16_bits():
    """peft-qlora-16bit is QLoRA as programs run it that never call prepare_model_for_kbit_training (torchtune,
    LitGPT, LLaMA-Factory): the same 4-bit linears, but norms, embeddings and head stay in the model's dtype, so
    the frozen weights are smaller than peft-qlora's by those layers' upcast (2 more bytes per element)."""
    import bitsandbytes as bnb

    config = tiny_llama_config(num_hidden_layers=2)

    def sixteen_bit_layers(module: torch.nn.Module) -> dict[str, torch.dtype]:
        return {n: p.dtype for n, p in module.named_parameters() if any(k in n for k in ("norm", "embed", "lm_head"))}

    upcast = build(config, parse_method_spec("peft-qlora"), LORA_RANK, torch.bfloat16, {})
    kept = build(config, parse_method_spec("peft-qlora-16bit"), LORA_RANK, torch.bfloat16, {})
    upcast_layers, kept_layers = sixteen_bit_layers(upcast.prepared.module), sixteen_bit_layers(kept.prepared.module)
    assert upcast_layers.keys() == kept_layers.keys() and any("lm_head" in n for n in kept_layers)
    assert set(upcast_layers.values()) == {torch.float32} and set(kept_layers.values()) == {torch.bfloat16}
    assert sum(isinstance(m, bnb.nn.Linear4bit) for m in kept.prepared.module.modules()) == 2 * 7
    assert not any(p.requires_grad for n, p in kept.prepared.module.named_parameters() if "lora_" not in n)
    upcast_elements = sum(p.numel() for n, p in upcast.prepared.module.named_parameters() if n in upcast_layers)
    assert upcast.counts["weights"] - kept.counts["weights"] == 2 * upcast_elements
    assert kept.counts["trainable_params"] == upcast.counts["trainable_params"]


def test_peft_qlora_16bit_is_an_entry_of_bench_and_plan():
    """The variant is its own entry name in both CLIs (so the tables say which recipe ran), stands for lora,
    takes levers, and ``--quantize`` still plans peft-lora as PEFT's own recipe (upcast)."""
    import argparse

    from paca_core.bench.command import add_bench_parser
    from paca_core.plan.command import add_plan_parser
    from paca_core.plan.run import _quantized_methods
    from paca_core.workloads.peers import PEERS
    from paca_core.workloads.specs import parse_method_list

    plain, levered = parse_method_list("peft-qlora-16bit,peft-qlora-16bit@gc+chunked-loss")
    assert (plain.kind, plain.equivalent, plain.four_bit, plain.levers) == ("peft", "lora", True, ())
    assert (levered.method, levered.levers) == ("peft-qlora-16bit", ("gc", "chunked-loss"))
    assert PEERS["peft-qlora"].upcast and not PEERS["peft-qlora-16bit"].upcast
    assert _quantized_methods(["peft-lora"], "nf4") == ["peft-qlora"]
    for add in (add_bench_parser, add_plan_parser):
        parser = argparse.ArgumentParser()
        sub = parser.add_subparsers()
        add(sub)
        (command,) = sub.choices
        (methods,) = [action for action in sub.choices[command]._actions if action.dest == "methods"]
        assert "peft-qlora-16bit" in methods.help  # the listed entries (help text, not wrapped)
        assert parser.parse_args([command, "--methods", "peft-qlora-16bit"]).methods == "peft-qlora-16bit"
