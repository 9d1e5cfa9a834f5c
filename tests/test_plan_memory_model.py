"""`paca plan`'s device-memory model beyond live bytes: the allocator replay (paca_core/plan/allocator.py), the
runtime's fixed memory per profile (devices/profiles.json) and the 'fits' rule on the device total.

The CUDA cases are worked by hand from c10/cuda/CUDACachingAllocator.cpp's rules. No GPU is here, so the
model is never compared with the real allocator in these tests (scripts/validate_on_device.* does that on
hardware); what is checked is that the model does what the source says, and that the planner uses it."""
from __future__ import annotations

import dataclasses
import json
import re

import pytest
import torch

from devices.profiles import DeviceProfile, get_profile, load_profiles
from paca_core.plan.allocator import (
    AllocatorRule,
    CachingAllocator,
    DepthExtensionError,
    extend_depth,
    replay,
    replay_trace,
)
from paca_core.plan.planner import MethodTracer, PlanSettings, device_memory, per_rank_bytes, plan_records
from paca_core.plan.trace import build, trace_step
from paca_core.workloads.specs import parse_method_spec
from tests.conftest import tiny_llama_config

KIB, MIB, GIB = 1 << 10, 1 << 20, 1 << 30
CUDA = AllocatorRule.from_mapping(dict(get_profile("h100-80g").allocator))
POOL = AllocatorRule.from_mapping(dict(get_profile("gaudi2").allocator))


def _peaks(rule, *events, baseline=(), workspaces=()):
    """Replay ``events`` ((serial, +bytes) allocations, (serial, -bytes) frees) once as a step (no second pass
    matters for these: every case frees what it allocates or keeps it to the end)."""
    return replay(rule, list(events), list(baseline), workspaces=workspaces)


# --- PyTorch's caching allocator, by hand -----------------------------------------------------------------------
def test_the_profiles_carry_pytorchs_constants_with_sources():
    for name in ("a100-80g", "a100-40g", "h100-80g", "h200"):
        profile = get_profile(name)
        assert dict(profile.allocator) == {"rule": "cuda_caching", "min_block_bytes": 512, "small_size_bytes": MIB,
                                           "small_buffer_bytes": 2 * MIB, "min_large_alloc_bytes": 10 * MIB,
                                           "large_buffer_bytes": 20 * MIB, "round_large_bytes": 2 * MIB}
        for key in ("min_block_bytes", "small_size_bytes", "small_buffer_bytes", "min_large_alloc_bytes", "large_buffer_bytes",
                    "round_large_bytes"):
            assert "CUDACachingAllocator.cpp" in profile.sources[f"allocator.{key}"], key
    constants = {"kMinBlockSize": "min_block_bytes", "kSmallSize": "small_size_bytes", "kSmallBuffer": "small_buffer_bytes",
                 "kMinLargeAlloc": "min_large_alloc_bytes", "kLargeBuffer": "large_buffer_bytes", "kRoundLarge": "round_large_bytes"}
    for constant, key in constants.items():
        assert constant in get_profile("a100-80g").sources[f"allocator.{key}"]


def test_small_requests_round_to_512_bytes_and_share_a_2mib_segment():
    one = _peaks(CUDA, (1, 100))
    assert (one.live_peak, one.allocated_peak, one.reserved_peak) == (100, 512, 2 * MIB)
    # 1 MiB is still small; a thousand 1000-byte requests (1024 B blocks) fill less than one 2 MiB segment.
    assert _peaks(CUDA, (1, MIB)).reserved_peak == 2 * MIB
    many = _peaks(CUDA, *[(i, 1000) for i in range(1, 1001)])
    assert many.allocated_peak == 1000 * 1024 and many.reserved_peak == 2 * MIB
    assert _peaks(CUDA, *[(i, 1000) for i in range(1, 2050)]).reserved_peak == 4 * MIB  # 2049 blocks need a second segment


def test_a_3mib_request_takes_a_20mib_segment_that_later_requests_share():
    one = _peaks(CUDA, (1, 3 * MIB))
    assert (one.allocated_peak, one.reserved_peak) == (3 * MIB, 20 * MIB)  # split: the rest (17 MiB) stays cached
    five = _peaks(CUDA, *[(i, 3 * MIB) for i in range(1, 7)])  # six fit in 20 MiB (one block each, 2 MiB left)
    assert five.reserved_peak == 20 * MIB and five.allocated_peak == 18 * MIB
    assert _peaks(CUDA, *[(i, 3 * MIB) for i in range(1, 8)]).reserved_peak == 40 * MIB
    # Just above 1 MiB is a large-pool request too.
    assert _peaks(CUDA, (1, MIB + 1)).reserved_peak == 20 * MIB


def test_above_10mib_a_segment_is_the_request_rounded_to_2mib():
    assert _peaks(CUDA, (1, 10 * MIB)).reserved_peak == 10 * MIB
    odd = _peaks(CUDA, (1, 11 * MIB + 1))
    # 12 MiB segment; the remainder (1 MiB - 512 B) is not more than kSmallSize, so the block keeps it: allocated
    # counts the whole block, as max_memory_allocated does.
    assert (odd.allocated_peak, odd.reserved_peak) == (12 * MIB, 12 * MIB)
    split = _peaks(CUDA, (1, 9 * MIB))  # below 10 MiB: a 20 MiB buffer, split (11 MiB rest > 1 MiB)
    assert (split.allocated_peak, split.reserved_peak) == (9 * MIB, 20 * MIB)


def test_freed_blocks_are_reused_by_best_fit_within_their_pool():
    again = _peaks(CUDA, (1, 12 * MIB), (1, -12 * MIB), (2, 12 * MIB))
    assert again.reserved_peak == 12 * MIB
    # Two cached blocks (12 and 16 MiB): an 11 MiB request takes the 12 MiB one, so a later 16 MiB fits too.
    best = _peaks(CUDA, (1, 12 * MIB), (2, 16 * MIB), (1, -12 * MIB), (2, -16 * MIB), (3, 11 * MIB), (4, 16 * MIB))
    assert best.reserved_peak == 28 * MIB
    # A small request never takes a large-pool block (separate pools).
    pools = _peaks(CUDA, (1, 12 * MIB), (1, -12 * MIB), (2, 4 * KIB))
    assert pools.reserved_peak == 12 * MIB + 2 * MIB


def test_fragmentation_reserves_more_than_is_ever_allocated():
    # 12 + 12 MiB, the first freed, then 14 MiB: it fits no cached block, so a third segment is taken.
    frag = _peaks(CUDA, (1, 12 * MIB), (2, 12 * MIB), (1, -12 * MIB), (3, 14 * MIB))
    assert frag.allocated_peak == 26 * MIB and frag.reserved_peak == 38 * MIB
    # Freed neighbours merge: two 3 MiB blocks of one 20 MiB segment, freed, leave one 20 MiB block for 15 MiB.
    merged = _peaks(CUDA, (1, 3 * MIB), (2, 3 * MIB), (1, -3 * MIB), (2, -3 * MIB), (3, 15 * MIB))
    assert merged.reserved_peak == 20 * MIB


def test_max_split_size_keeps_oversize_blocks_whole():
    limited = AllocatorRule.from_mapping({**dict(get_profile("h100-80g").allocator), "max_split_bytes": 64 * MIB})
    # A cached 100 MiB block does not serve a 12 MiB request (below max_split), nor a 70 MiB one (it is >= 70 + 20).
    assert _peaks(limited, (1, 100 * MIB), (1, -100 * MIB), (2, 12 * MIB)).reserved_peak == 112 * MIB
    assert _peaks(limited, (1, 100 * MIB), (1, -100 * MIB), (2, 70 * MIB)).reserved_peak == 170 * MIB
    assert _peaks(limited, (1, 100 * MIB), (1, -100 * MIB), (2, 90 * MIB)).reserved_peak == 100 * MIB
    # Without the option (the default) the 100 MiB block is split for the 12 MiB request.
    assert _peaks(CUDA, (1, 100 * MIB), (1, -100 * MIB), (2, 12 * MIB)).reserved_peak == 100 * MIB


def test_workspaces_are_allocations_of_the_same_allocator():
    h100, a100 = get_profile("h100-80g"), get_profile("a100-80g")
    assert h100.workspace_allocations() == [32 * MIB, 32 * MIB, MIB, MIB]  # sm_90 default, two threads
    assert a100.workspace_allocations() == [8_519_680, 8_519_680, MIB, MIB]  # ':4096:2:16:8'
    peaks = _peaks(CUDA, (1, 100), workspaces=a100.workspace_allocations())
    # The two 8.125 MiB workspaces share one 20 MiB buffer (below 10 MiB; the second is cut from the first's rest),
    # the two 1 MiB ones fill a 2 MiB small segment exactly, so the step's 100 bytes need another one.
    assert peaks.allocated_peak == 2 * 8_519_680 + 2 * MIB + 512 and peaks.reserved_peak == 20 * MIB + 2 * MIB + 2 * MIB


def test_rule_validation():
    with pytest.raises(ValueError, match="missing constants"):
        AllocatorRule.from_mapping({"rule": "cuda_caching", "min_block_bytes": 512})
    with pytest.raises(ValueError, match="not one of"):
        AllocatorRule.from_mapping({"rule": "buddy"})
    assert AllocatorRule.from_mapping(None).kind == "exact"
    assert CachingAllocator(CUDA.constants).segment_size(10 * MIB - 1) == 20 * MIB


# --- Gaudi's pool and the CPU -------------------------------------------------------------------------------------
def test_hpu_pool_reserves_its_high_water_mark():
    first = _peaks(POOL, (1, 100))  # below 256 B: the small-allocation region (2 MiB, carved at creation)
    assert (first.allocated_peak, first.reserved_peak) == (128, 2 * MIB)
    frag = _peaks(POOL, (1, 12 * MIB), (2, 12 * MIB), (1, -12 * MIB), (3, 14 * MIB))
    assert frag.reserved_peak == 2 * MIB + 38 * MIB  # 14 MiB does not fit the 12 MiB hole: the pool grows past it
    reuse = _peaks(POOL, (1, 12 * MIB), (2, 12 * MIB), (1, -12 * MIB), (3, 11 * MIB))
    # 11 MiB takes the 12 MiB hole; not split (12 < 2 x 11, the rest < 128 MiB and 11 MiB >= ceil(0.9 x 12 MiB)).
    assert reuse.reserved_peak == 2 * MIB + 24 * MIB and reuse.allocated_peak == 24 * MIB


def test_cpu_reserves_exactly_what_it_allocates():
    cpu = load_profiles()["cpu"]
    assert dict(cpu.allocator) == {"rule": "exact"} and "posix_memalign" in cpu.sources["allocator"]
    peaks = _peaks(AllocatorRule.from_mapping(cpu.allocator), (1, 12 * MIB), (2, 12 * MIB), (1, -12 * MIB), (3, 14 * MIB))
    assert peaks.live_peak == peaks.allocated_peak == peaks.reserved_peak == 26 * MIB


# --- the traced step -------------------------------------------------------------------------------------------
def _trace(layers: int, method: str = "lora", seq: int = 64, batch: int = 2, **config):
    spec = parse_method_spec(method)
    model = build(tiny_llama_config(num_hidden_layers=layers, **config), spec, spec.rank(4, True), torch.float32)
    return trace_step(model, seq, batch)[0]


def test_the_tracker_records_each_storage_once_in_order():
    trace = _trace(2)
    assert trace.baseline_storages and trace.memory_events and trace.evaluation_events
    held = {serial: size for serial, size in trace.baseline_storages}
    live = peak = sum(held.values())
    for serial, size in trace.memory_events:
        if size > 0:
            assert serial not in held
            held[serial] = size
        else:
            assert held.pop(serial) == -size
        live += size
        peak = max(peak, live)
    assert peak == max(v for phase, v in trace.peak_by_phase.items() if phase != "evaluate")
    exact = replay_trace(trace, AllocatorRule.from_mapping(None))
    assert exact.live_peak == exact.reserved_peak == trace.peak_bytes  # the replay's live bytes are the tracker's


def test_depth_extension_equals_a_full_depth_trace():
    """Two traces one layer apart extend to any depth; the extension's live bytes equal a real deeper trace's
    exactly and its reserved peak matches (which of two equal storages a copy frees may differ)."""
    sizes = dict(hidden_size=256, intermediate_size=1024, vocab_size=4096, max_position_embeddings=512)
    one, two, five = (_trace(n, "lora", 256, 4, **sizes) for n in (1, 2, 5))
    deep = extend_depth(one, two, 3)
    for rule in (CUDA, POOL):
        extended, traced = replay_trace(deep, rule), replay_trace(five, rule)
        assert extended.live_peak == traced.live_peak and extended.allocated_peak == traced.allocated_peak
        assert abs(extended.reserved_peak - traced.reserved_peak) <= 0.01 * traced.reserved_peak
    assert len(deep.memory_events) == len(five.memory_events) and len(deep.baseline_storages) == len(five.baseline_storages)
    with pytest.raises(DepthExtensionError):
        extend_depth(two, _trace(2, "lora", 128, 4, **sizes), 1)  # another shape: not one repeated layer


# --- the planner: device total, fits, searches, plan.json ---------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_plan():
    config = tiny_llama_config(num_hidden_layers=3, hidden_size=64, intermediate_size=256, vocab_size=512,
                               max_position_embeddings=512)
    profiles = [get_profile("h100-80g"), get_profile("gaudi2"), get_profile("cpu")]
    return config, profiles


def test_device_total_is_reserved_plus_the_runtime_and_fits_at_the_boundary(tiny_plan):
    config, profiles = tiny_plan
    settings = PlanSettings(dtype=torch.float32)
    (record,) = plan_records(config, "tiny", ["lora"], profiles[:1], settings, [128], [2], search=False)
    b = record["bytes"]
    assert b["reserved_peak"] >= b["allocated_peak"] >= b["peak"]
    assert b["device_total"] == b["reserved_peak"] + sum(record["runtime_memory"].values()) == b["reserved_peak"] + b["runtime_fixed"]
    assert record["runtime_memory"] == {"cuda_context": 512 * MIB}
    # 'fits' keeps the regime's margin for untraced overhead below the limit (paca_core/plan/margin.py)
    assert record["limit_bytes"] == profiles[0].memory_bytes and record["fits"]
    fraction = record["margin"]["fraction"]
    assert 0 < fraction < 0.2 and record["usable_bytes"] == pytest.approx(record["limit_bytes"] * (1 - fraction), abs=1)
    for budget, fits in ((b["device_total"], True), (b["device_total"] - 1, False)):  # --margin 0: the budget itself
        (r,) = plan_records(config, "tiny", ["lora"], profiles[:1],
                            dataclasses.replace(settings, memory_budget=budget, margin=0.0), [128], [2], search=False)
        assert r["fits"] is fits and r["usable_bytes"] == r["limit_bytes"] == budget and r["budget_source"].startswith("--memory-budget")


@pytest.mark.slow
def test_searches_use_the_device_total_and_are_never_optimistic(tiny_plan):
    config, profiles = tiny_plan
    base = PlanSettings(dtype=torch.float32)
    (at_256,) = plan_records(config, "tiny", ["lora"], profiles[:1], base, [256], [2], search=False)
    # 256 x 2 does not fit; --margin 0: the searches against the budget itself
    settings = dataclasses.replace(base, memory_budget=at_256["bytes"]["device_total"] - 1, margin=0.0)
    (record,) = plan_records(config, "tiny", ["lora"], profiles[:1], settings, [64], [2])
    longest, largest = record["max_seq_len"], record["max_batch_size"]
    tracer = MethodTracer(config, "lora", settings, profiles[:1])

    def total(seq, batch):
        m = tracer.measure(seq, batch)
        return device_memory(m, per_rank_bytes(m, settings, tracer.layer_weight_bytes()), profiles[0], settings)["device_total"]

    assert 64 <= longest < 256 and total(longest, 2) <= settings.memory_budget < total(longest + 64, 2)
    assert total(64, largest) <= settings.memory_budget < total(64, largest + 1)


def test_the_runtime_memory_counts_collective_buffers_with_several_ranks(tiny_plan):
    config, profiles = tiny_plan
    h100, gaudi2 = profiles[:2]
    assert h100.runtime_fixed_bytes(1) == {"cuda_context": 512 * MIB}
    assert h100.runtime_fixed_bytes(8) == {"cuda_context": 512 * MIB, "collective_buffers": 4 * MIB * 16 * 2}
    assert gaudi2.runtime_fixed_bytes(8)["collective_buffers"] == 384 * MIB
    settings = PlanSettings(dtype=torch.float32, world_size=4, fsdp=True)
    (record,) = plan_records(config, "tiny", ["lora"], [h100], settings, [128], [2], search=False)
    b = record["bytes"]
    assert record["runtime_memory"]["collective_buffers"] == 128 * MIB
    assert b["device_total"] == b["reserved_peak"] + 640 * MIB
    # Per rank: the one-process replay's overhead on the per-rank live peak.
    tracer = MethodTracer(config, "lora", settings, [h100])
    m = tracer.measure(128, 2)
    assert b["reserved_peak"] - b["peak"] == m.device_allocations(h100)["reserved_peak"] - m.bytes["peak"]


def test_plan_json_and_table_report_allocated_reserved_and_device(tmp_path):
    from paca_core.cli.dispatch import main
    from paca_core.plan.report import markdown_table

    config = tiny_llama_config(num_hidden_layers=3)
    (tmp_path / "config.json").write_text(json.dumps(config.to_dict()))
    out = tmp_path / "plan"
    assert main(["plan", "--model", str(tmp_path / "config.json"), "--methods", "lora", "--device-profile", "a100-80g,gaudi2,cpu",
                 "--seq-len", "32", "--batch-size", "1", "--dtype", "fp32", "--no-search", "--workers", "1", "--out", str(out)]) == 0
    document = json.loads((out / "plan.json").read_text())
    records = {r["device_profile"]: r for r in document["records"]}
    for name, rule in (("a100-80g", "cuda_caching"), ("gaudi2", "hpu_pool"), ("cpu", "exact")):
        r = records[name]
        b = r["bytes"]
        assert r["allocator_rule"] == rule and set(b) >= {"peak", "allocated_peak", "reserved_peak", "runtime_fixed", "device_total"}
        assert b["device_total"] == b["reserved_peak"] + b["runtime_fixed"] <= r["usable_bytes"] and r["fits"]
        assert "margin" in r["budget_source"]
    assert records["cpu"]["bytes"]["reserved_peak"] == records["cpu"]["bytes"]["peak"]  # no caching on CPU
    assert records["a100-80g"]["bytes"]["reserved_peak"] > records["a100-80g"]["bytes"]["allocated_peak"]
    profile = document["profiles"]["a100-80g"]
    assert profile["memory_margin_fraction"] == 0.02 and profile["allocator"]["rule"] == "cuda_caching"
    table = markdown_table(document["records"])
    assert "| live peak GiB | allocated GiB | reserved GiB | device GiB |" in table and "GiB per rank" in table
    assert re.search(r"a100-80g: [\d.]+ GiB \(a100-80g memory less a [\d.]+% margin for untraced overhead", table), table


# --- the profile schema ------------------------------------------------------------------------------------------
def test_profile_memory_fields_are_sourced_and_the_older_form_still_loads():
    h100 = get_profile("h100-80g")
    for key in ("memory_margin_fraction", "runtime_memory.cuda_context", "allocator_workspaces.cublas",
                "allocator_workspace_copies", "collective_memory.buffer_bytes"):
        assert h100.sources[key].startswith(("primary", "secondary", "assumption")), key
    assert "CublasHandlePool.cpp" in h100.sources["allocator_workspaces.cublas"] and "NCCL_BUFFSIZE" in h100.sources[
        "collective_memory.buffer_bytes"]
    assert h100.memory_limit() == int(h100.memory_bytes * 0.98)
    assert h100.usable_bytes() == h100.memory_limit() - 512 * MIB
    # A plug-in's older profile (usable_fraction, runtime_reserve_bytes) keeps its meaning: no allocator model.
    older = {k: v for k, v in h100.to_dict().items() if k not in ("memory_margin_fraction", "runtime_memory", "allocator",
                                                                  "allocator_workspaces", "allocator_workspace_copies",
                                                                  "collective_memory")}
    older["sources"] = {k: v for k, v in h100.sources.items() if not k.startswith(("memory_margin", "runtime_memory", "allocator",
                                                                                   "collective"))}
    older.update(usable_fraction=0.9, runtime_reserve_bytes=GIB)
    older["sources"].update(usable_fraction="assumption: test", runtime_reserve_bytes="assumption: test")
    legacy = DeviceProfile.from_dict("old", older)
    assert legacy.memory_margin() == pytest.approx(0.1) and legacy.runtime_fixed_bytes() == {"runtime_reserve": GIB}
    assert abs(legacy.usable_bytes() - (int(h100.memory_bytes * 0.9) - GIB)) <= 1
    assert AllocatorRule.from_mapping(legacy.allocator).kind == "exact"
    with pytest.raises(ValueError, match="exactly one of them"):
        DeviceProfile.from_dict("both", {**older, "memory_margin_fraction": 0.02,
                                         "sources": {**older["sources"], "memory_margin_fraction": "assumption: x"}})
    with pytest.raises(ValueError, match="no source"):
        dataclasses.replace(h100, sources={k: v for k, v in h100.sources.items() if k != "runtime_memory.cuda_context"})
