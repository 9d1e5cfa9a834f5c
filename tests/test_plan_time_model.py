"""The planner's time model (issue 32): GEMM efficiency by shape, causal attention as fused kernels compute it, and
communication over ``--world-size`` ranks (paca_core/plan/efficiency.py, communication.py, estimate.py)."""
from __future__ import annotations

import dataclasses
import json
import math

from pathlib import Path

import pytest
import torch

import devices
from .conftest import tiny_llama_config
from devices.profiles import DeviceProfile, get_profile, load_profiles
from paca_core.plan.communication import (DDP_BUCKET_BYTES, collective_seconds, collectives, per_rank_bytes,
                                          step_communication)
from paca_core.plan.efficiency import causal_fraction, gemm_efficiency
from paca_core.plan.estimate import estimate_time, kernel_times
from paca_core.plan import planner
from paca_core.plan.planner import MethodTracer, PlanSettings
from paca_core.plan.trace import build, trace_step
from paca_core.plan.tracker import OpRecord
from paca_core.workloads.specs import parse_method_spec

CURVED = [name for name, profile in load_profiles().items() if profile.efficiency]


def _gemm(m: int, n: int, k: int, batch: int = 1, dtype=torch.bfloat16) -> OpRecord:
    flops = 2 * m * n * k * batch
    moved = 2 * batch * (m * k + k * n)
    return OpRecord("aten.mm", "forward", "matmul", flops, moved, 2 * batch * m * n, dtype, gemm=(m, n, k, batch))


# --- 1. the GEMM efficiency curve ---------------------------------------------------------------------
def test_every_accelerator_profile_has_a_curve_and_the_cpu_keeps_its_calibration():
    assert {"a100-80g", "a100-40g", "h100-80g", "h200", "gaudi2", "gaudi3"} <= set(CURVED)
    cpu = get_profile("cpu")
    assert not cpu.efficiency and not cpu.interconnect
    assert gemm_efficiency(cpu, 16, 16, 16) == 1.0  # the calibrated (measured) rate is used as it is
    op = _gemm(64, 64, 64, dtype=torch.float32)
    flops, compute, _ = kernel_times(op, cpu)
    assert flops == op.flops and compute == op.flops / cpu.matmul_throughput(torch.float32)


@pytest.mark.parametrize("name", CURVED)
def test_efficiency_is_monotone_and_bounded_by_the_measured_maximum(name):
    profile = get_profile(name)
    best = profile.efficiency["matmul_achievable"]
    tile = int(profile.efficiency["tile"])
    sizes = [tile * 2**i for i in range(7)]
    for fixed in (tile, 4096):
        for grow in range(3):  # m, n, then k grows while the others stay
            values = [gemm_efficiency(profile, *[size if axis == grow else fixed for axis in range(3)]) for size in sizes]
            assert values == sorted(values), (name, fixed, grow, values)
    batches = [gemm_efficiency(profile, tile, tile, 1024, batch) for batch in (1, 2, 8, 64)]
    assert batches == sorted(batches)
    reference = [int(profile.efficiency[f"matmul_reference_{axis}"]) for axis in "mnk"]
    assert gemm_efficiency(profile, *reference) == pytest.approx(best)
    assert all(0 < gemm_efficiency(profile, m, n, k) <= best for m in (8, 512, 65536) for n in (8, 512, 65536) for k in (8, 65536))
    assert gemm_efficiency(profile, 65536, 65536, 65536) == pytest.approx(best)  # large GEMMs reach the MAMF share
    assert gemm_efficiency(profile, 16, 16, 16) < 0.02 * best  # a tiny one is far from it


#: Measured bf16 GEMM throughput on an H100 SXM (TFLOPS, timing includes the launch), from XLA's cost-model table
#: (tensorflow/tensorflow third_party/xla/xla/service/gpu/model/matmul_interpolator_data.h, key sm_90, commit 372d578b):
#: (batch, m, n, k) -> TFLOPS. The curve's two fitted constants come from that table (docs/plan.md).
XLA_H100 = {(1, 4096, 4096, 4096): 783.3, (1, 2048, 2048, 2048): 632.0, (1, 512, 4096, 1024): 373.3,
            (1, 4096, 4096, 256): 392.2, (1, 256, 512, 4096): 91.7, (2, 256, 2048, 2048): 332.2,
            (4, 4096, 256, 2048): 588.7, (1, 256, 1024, 256): 22.7}


def test_h100_curve_against_xla_measurements():
    profile = get_profile("h100-80g")
    for (batch, m, n, k), tflops in XLA_H100.items():
        _, compute, memory = kernel_times(_gemm(m, n, k, batch), profile)
        predicted = max(compute, memory) + profile.launch_overhead_s
        measured = 2 * batch * m * n * k / (tflops * 1e12)
        assert abs(math.log(predicted / measured)) < 0.15, ((batch, m, n, k), predicted, measured)
        # The plain roofline at the dense peak (the old model) is fast on every one of them.
        peak = max(2 * batch * m * n * k / profile.matmul_throughput(torch.bfloat16), memory) + profile.launch_overhead_s
        assert peak < measured


@pytest.mark.parametrize("name", CURVED)
def test_a_skinny_gemm_is_slower_than_a_square_one_of_the_same_flops(name):
    profile = get_profile(name)
    square, skinny = _gemm(1024, 1024, 1024), _gemm(2048, 16, 32768)
    assert square.flops == skinny.flops
    _, square_compute, square_memory = kernel_times(square, profile)
    _, skinny_compute, skinny_memory = kernel_times(skinny, profile)
    assert skinny_compute > 1.2 * square_compute  # 16 output tiles against 64: fewer compute units busy
    assert max(skinny_compute, skinny_memory) > 2 * max(square_compute, square_memory)  # and it moves 30x the bytes
    # Same FLOPs with a short reduction: slower than the square too.
    _, short_k, _ = kernel_times(_gemm(4096, 4096, 64), profile)
    assert short_k > square_compute


def test_gemms_without_a_recorded_shape_keep_the_plain_roofline():
    profile = get_profile("a100-80g")
    op = dataclasses.replace(_gemm(4096, 4096, 4096), gemm=None)
    _, compute, _ = kernel_times(op, profile)
    assert compute == pytest.approx(op.flops / profile.matmul_throughput(torch.bfloat16))


def test_profile_rejects_an_incomplete_or_impossible_time_model():
    raw = json.loads((Path(devices.__file__).parent / "profiles.json").read_text())["profiles"]
    entry = dict(raw["h100-80g"])
    broken = dict(entry, efficiency={k: v for k, v in entry["efficiency"].items() if k != "tile"})
    with pytest.raises(ValueError, match="lacks"):
        DeviceProfile.from_dict("broken", broken)
    impossible = dict(entry, interconnect=dict(entry["interconnect"], bus_efficiency=1.5))
    with pytest.raises(ValueError, match="share"):
        DeviceProfile.from_dict("broken", impossible)
    unsourced = dict(entry, sources={k: v for k, v in entry["sources"].items() if k != "efficiency.k_overhead"})
    with pytest.raises(ValueError, match="k_overhead"):
        DeviceProfile.from_dict("broken", unsourced)


# --- 2. causal attention --------------------------------------------------------------------------------
def test_causal_fraction_counts_the_blocks_a_fused_kernel_computes():
    assert causal_fraction(4096, 4096, causal=False) == 1.0
    assert causal_fraction(128, 128, causal=True) == 1.0  # one block: the diagonal one, computed whole
    assert causal_fraction(256, 256, causal=True) == pytest.approx(3 / 4)
    assert causal_fraction(2048, 2048, causal=True) == pytest.approx(17 / 32)
    fractions = [causal_fraction(s, s, causal=True) for s in (512, 2048, 8192, 65536)]
    assert fractions == sorted(fractions, reverse=True) and fractions[-1] == pytest.approx(0.5, abs=0.002)


def test_causal_sdpa_trace_is_charged_about_half_its_attention_flops():
    """The traced step's SDPA (forward and backward) carries its causal flag; the estimate charges the blocks on or
    below the diagonal at the attention kernel's share of the peak, everything else as before."""
    seq = 1024
    config = tiny_llama_config(max_position_embeddings=seq)
    traced = build(config, parse_method_spec("lora"), 8, torch.bfloat16, {})
    trace, _ = trace_step(traced, seq, 1)
    attention = [op for op in trace.ops if op.attention is not None]
    assert {op.phase for op in attention} == {"forward", "backward"}
    assert all(op.attention[4] and op.attention[1] == op.attention[2] == seq for op in attention)  # causal, full length
    assert all(op.gemm is not None for op in trace.ops if op.kind == "matmul" and op.attention is None)
    fraction = causal_fraction(seq, seq, causal=True)
    assert fraction == pytest.approx(9 / 16)
    attention_flops = sum(op.flops for op in attention)
    for name in ("h100-80g", "gaudi2"):
        profile = get_profile(name)
        estimate = estimate_time(trace, profile)
        assert estimate.charged_flops == pytest.approx(trace.flops - (1 - fraction) * attention_flops)
        for op in attention:
            charged, compute, _ = kernel_times(op, profile)
            assert charged == pytest.approx(op.flops * fraction)
            rate = profile.matmul_throughput(torch.bfloat16) * profile.efficiency["attention"]
            assert compute == pytest.approx(op.flops * fraction / rate)
    # Per-phase times add up to the step.
    estimate = estimate_time(trace, get_profile("a100-80g"))
    assert sum(estimate.phase_seconds.values()) == pytest.approx(estimate.step_seconds)
    assert sum(estimate.phase_kernels.values()) == estimate.kernels


# --- 3. communication -----------------------------------------------------------------------------------
def test_ring_collective_cost_inside_and_across_nodes():
    links = get_profile("h100-80g").interconnect
    payload = 1 << 30
    bus = links["intra_node_bandwidth"] * links["bus_efficiency"]
    assert collective_seconds("all_reduce", payload, 1, links) == 0.0
    assert collective_seconds("all_reduce", payload, 8, links) == pytest.approx(2 * 7 / 8 * payload / bus + links["intra_node_latency_s"])
    assert collective_seconds("all_gather", payload, 4, links) == pytest.approx(3 / 4 * payload / bus + links["intra_node_latency_s"])
    # 16 ranks: two nodes, hierarchical; each device sends its 1/8 share over its own (slower) inter-node port.
    inter = links["inter_node_bandwidth"] * links["bus_efficiency"]
    expected = max(2 * 7 / 8 * payload / bus, 2 * 1 / 2 * payload / 8 / inter) + links["inter_node_latency_s"]
    assert collective_seconds("all_reduce", payload, 16, links) == pytest.approx(expected)
    assert collective_seconds("all_reduce", payload, 16, links) > collective_seconds("all_reduce", payload, 8, links)


@pytest.fixture(scope="module")
def tiny_plans():
    """One traced step of a tiny model, recorded on one process, as 4 and 16 DDP replicas, FSDP2 over 4 and ZeRO-2
    over 4 (h100-80g). The trace does not depend on the layout; the record (bytes per rank, time) does."""
    config = tiny_llama_config(max_position_embeddings=256)
    profile = get_profile("h100-80g")
    tracer = MethodTracer(config, "lora", PlanSettings(dtype=torch.bfloat16, rank=8), [profile])
    measured = tracer.measure(128, 2)
    plans = {}
    for label, extra in (("one", {}), ("ddp", {"world_size": 4}), ("fsdp", {"world_size": 4, "fsdp": True}),
                         ("zero2", {"world_size": 4, "zero": 2}), ("ddp16", {"world_size": 16})):
        settings = PlanSettings(dtype=torch.bfloat16, rank=8, **extra)
        per_rank = planner.per_rank_bytes(measured, settings, tracer.layer_weight_bytes())
        plans[label] = planner.record("tiny", tracer, profile, settings, 128, 2, per_rank, True, None, None, measured,
                                      measured.times[profile.name])
    return plans


def test_one_process_has_no_communication(tiny_plans):
    one = tiny_plans["one"]
    assert one["communication"] is None and one["time_breakdown"]["communication_exposed_seconds"] == 0
    assert one["step_seconds"] == pytest.approx(one["time_breakdown"]["compute_seconds_per_rank"])
    assert one["step_seconds"] == pytest.approx(sum(one["time_breakdown"][k] for k in ("compute_seconds", "memory_seconds", "launch_seconds")))


def test_ddp_all_reduces_every_trainable_gradient(tiny_plans):
    for label, n in (("ddp", 4), ("ddp16", 16)):
        ddp = tiny_plans[label]
        grads = ddp["bytes"]["gradients"]
        assert grads > 0 and ddp["layout"] == f"{n} replicas (DDP)"
        comm = ddp["communication"]
        assert comm["bytes_per_rank"] == pytest.approx(2 * (n - 1) / n * grads)
        assert [c["kind"] for c in comm["collectives"]] == ["all_reduce"] * len(comm["collectives"])
        assert 0 <= comm["exposed_seconds"] <= comm["seconds"]
        assert ddp["step_seconds"] == pytest.approx(ddp["time_breakdown"]["compute_seconds_per_rank"] + comm["exposed_seconds"])
        assert ddp["tokens_per_second"] == pytest.approx(n * 128 * 2 / ddp["step_seconds"])
    assert tiny_plans["ddp16"]["communication"]["nodes"] == 2 and tiny_plans["ddp"]["communication"]["nodes"] == 1
    # Bucketing: a 60 MiB gradient is three all-reduces (25 + 25 + 10 MiB).
    settings = PlanSettings(world_size=2)
    (group,) = collectives(settings, 60 * 2**20, 10**9, 10**8, 4, 10**7).values()
    assert [(c.payload, c.calls) for c in group] == [(DDP_BUCKET_BYTES, 2), (10 * 2**20, 1)]


def test_fsdp_gathers_weights_twice_and_reduce_scatters_gradients(tiny_plans):
    fsdp, one = tiny_plans["fsdp"], tiny_plans["one"]
    comm = fsdp["communication"]
    n = 4
    weights_full, grads_full = one["bytes"]["weights"], one["bytes"]["gradients"]
    assert comm["bytes_per_rank"] == pytest.approx((n - 1) / n * (2 * weights_full + grads_full))
    assert comm["exposed_seconds"] >= 0 and comm["seconds"] > 0
    assert fsdp["step_seconds"] >= fsdp["time_breakdown"]["compute_seconds_per_rank"]
    kinds = {(c["kind"], c["overlaps"]) for c in comm["collectives"]}
    assert kinds == {("all_gather", "forward"), ("all_gather", "backward"), ("reduce_scatter", "backward")}
    # ZeRO-2: gradients reduce-scattered, updated parameters gathered, nothing overlapped.
    zero = tiny_plans["zero2"]["communication"]
    assert zero["bytes_per_rank"] == pytest.approx((n - 1) / n * 2 * grads_full)
    assert zero["exposed_seconds"] == pytest.approx(zero["seconds"])
    # A sharded optimizer: each rank runs 1/N of its roofline.
    assert tiny_plans["zero2"]["time_breakdown"]["compute_seconds_per_rank"] < one["step_seconds"]


def test_exposed_communication_follows_the_overlap_rule():
    profile = get_profile("a100-80g")
    settings = PlanSettings(world_size=8)
    gradient_bytes = 400 * 2**20
    timing = {"step_seconds": 1.0, "phase_seconds": {"forward": 0.3, "backward": 0.6, "optimizer": 0.1}, "phase_kernels": {}}
    slow = step_communication(settings, profile, timing, gradient_bytes, 10**10, 10**8, 32, 10**8)
    busy = step_communication(settings, profile, dict(timing, phase_seconds={"forward": 0.3, "backward": 1e-6}),
                              gradient_bytes, 10**10, 10**8, 32, 10**8)
    last_bucket = collective_seconds("all_reduce", DDP_BUCKET_BYTES, 8, profile.interconnect)
    assert slow["communication"]["exposed_seconds"] == pytest.approx(last_bucket)  # hidden under backward but the last
    total = busy["communication"]["seconds"]
    assert busy["communication"]["exposed_seconds"] == pytest.approx(total - 1e-6)  # nothing to hide under
    no_links = dataclasses.replace(profile, interconnect={},
                                   sources={k: v for k, v in profile.sources.items() if not k.startswith("interconnect.")})
    unknown = step_communication(settings, no_links, timing, gradient_bytes, 10**10, 10**8, 32, 10**8)
    assert unknown["communication"]["seconds"] is None and "not modelled" in unknown["communication"]["note"]


# --- 4. plan.json ---------------------------------------------------------------------------------------
def test_plan_json_records_the_time_model(tmp_path):
    from paca_core.cli.dispatch import main

    config = tmp_path / "config.json"
    config.write_text(json.dumps(tiny_llama_config(max_position_embeddings=256).to_dict()))
    out = tmp_path / "plan"
    argv = ["plan", "--model", str(config), "--methods", "lora", "--device-profile", "a100-80g", "--seq-len", "256",
            "--batch-size", "1", "--world-size", "2", "--fsdp", "--no-search", "--workers", "1", "--out", str(out)]
    assert main(argv) == 0
    (record,) = json.loads((out / "plan.json").read_text())["records"]
    comm = record["communication"]
    assert {"bytes_per_rank", "seconds", "exposed_seconds", "overlap_rule", "collectives", "nodes"} <= set(comm)
    assert comm["bytes_per_rank"] > 0 and comm["seconds"] > 0 and comm["exposed_seconds"] >= 0
    breakdown = record["time_breakdown"]
    assert {"compute_seconds_per_rank", "communication_exposed_seconds", "charged_flops", "phase_seconds"} <= set(breakdown)
    assert breakdown["charged_flops"] < record["flops"]  # causal attention: the masked blocks are not charged
    assert record["step_seconds"] == pytest.approx(breakdown["compute_seconds_per_rank"] + comm["exposed_seconds"])
