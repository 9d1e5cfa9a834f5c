"""What fits and how fast: traced steps turned into per-device records, with the largest sequence
length and batch size searched by tracing.

A decoder stack repeats one layer, so every traced quantity (bytes by kind, the live-bytes peak, FLOPs,
bytes moved, kernels, the roofline time) is an affine function of the layer count once the stack has
one layer. The planner traces the real model at 1 and 2 layers and takes the line through them to
the model's layer count; tests/test_plan.py checks that this equals the full-depth trace exactly.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, Callable, Sequence

import torch

from ..errors import PacaConfigError
from ..workloads.specs import MethodSpec, parse_method_spec
from .allocator import AllocatorPeaks, AllocatorRule, DepthExtensionError, extend_depth, replay_trace
from .communication import step_communication
from .estimate import estimate_time
from .margin import Margin, margin_for, regime
from .shapes import context_length
from .trace import QUANTIZED_NOTE, TracedModel, build, trace_step

logger = logging.getLogger(__name__)

#: Layer counts traced; the line through them is exact for a homogeneous stack (tests/test_plan.py).
TRACED_LAYERS = (1, 2)
#: With activation offload, backward has up to three layers' tensors on the device at once (the one it
#: is finishing, the current one and the one prefetched), so the peak grows along one line only from
#: three layers on (tests/test_plan.py checks the 5-layer trace).
TRACED_LAYERS_OFFLOAD = (3, 4)
#: Granularity of the searched sequence length (tokens); batch sizes are searched one by one.
SEQ_STEP = 64
MAX_BATCH = 1 << 14
BYTE_KINDS = ("weights", "gradients", "optimizer", "saved_activations", "peak", "host")


@dataclass(frozen=True)
class PlanSettings:
    dtype: torch.dtype = torch.bfloat16
    rank: int = 8
    match_params: bool = True
    gradient_checkpointing: bool = False
    world_size: int = 1
    fsdp: bool = False
    #: DeepSpeed ZeRO stage over world_size ranks (0: none): 1 shards optimizer state, 2 also gradients,
    #: 3 also the weights (the bytes rule of FSDP2's full sharding).
    zero: int = 0
    options: tuple = ()  # (name, value) pairs for the method's paca train flags
    #: Our methods' LM head + loss in chunks of this many tokens, as paca train runs them (None: full logits).
    loss_chunk_tokens: int | None = None
    #: Modules whose saved activations go to host memory (paca train --offload-activations), or None.
    offload_activations: str | None = None
    #: The 4-bit type of entries on a 4-bit base (a method's ``four_bit_form``, peft-qlora): nf4 or fp4.
    quantize: str = "nf4"
    #: Bytes per process that must hold the step (``paca plan --memory-budget``); None: each profile's memory.
    memory_budget: int | None = None
    #: ``--margin``: the share of the limit fit decisions keep free; None: the regime's measured margin (:mod:`.margin`).
    margin: float | None = None

    def layout(self) -> str:
        """How the processes share the model, as the table says it."""
        n = self.world_size
        if n <= 1:
            return "one process"
        if self.fsdp:
            return f"FSDP2 over {n} ranks"
        if self.zero:
            return f"ZeRO-{self.zero} over {n} ranks"
        return f"{n} replicas (DDP)"


@dataclass
class Measurement:
    """One (seq_len, batch_size) of one method at full depth, with its time on each profile."""

    bytes: dict[str, int]
    flops: int
    bytes_moved: int
    kernels: int
    times: dict[str, dict] = field(default_factory=dict)
    #: The live-bytes high-water mark of each phase (forward, backward, optimizer, column_write).
    phase_peaks: dict[str, int] = field(default_factory=dict)
    #: Per profile: ``allocated_peak`` and ``reserved_peak`` of the step (one process, unsharded) through the
    #: profile's allocator model, library workspaces included; filled on demand by :meth:`device_allocations`.
    memory: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: What the allocator model replays: the traced allocation events (:class:`AllocationEvents`), or None.
    allocation_events: "AllocationEvents | None" = None

    def device_allocations(self, profile) -> dict[str, Any]:
        """``memory[profile.name]``, replayed the first time a profile asks (a search on one profile does not
        pay for the others'); see :func:`allocator_memory`."""
        if profile.name not in self.memory:
            if self.allocation_events is None:
                raise ValueError(f"no allocation events traced for {profile.name}: trace with the profile in MethodTracer")
            self.memory.update(self.allocation_events.memory([profile], self.bytes["peak"]))
        return self.memory[profile.name]


class AllocationEvents:
    """The allocation events of the traced depths, kept (without the op records) for the allocator model, with
    the full-depth extension and the replays computed once and shared by the profiles that need them."""

    def __init__(self, traces: Sequence, extra_layers: int):
        self.traces = [SimpleNamespace(baseline_storages=t.baseline_storages, memory_events=t.memory_events,
                                       evaluation_events=t.evaluation_events, peak_bytes=t.peak_bytes) for t in traces]
        self.extra_layers = extra_layers
        self._deep: tuple | None = None
        self._replays: dict[tuple, AllocatorPeaks] = {}

    def deep(self) -> tuple[Any, str]:
        """The events at full depth and how they were had ("traced", "extended", or None and "deepest traced")."""
        if self._deep is None:
            deep, depth = self.traces[-1], "traced"
            if len(self.traces) == 2 and self.extra_layers > 0:
                try:
                    deep, depth = extend_depth(self.traces[0], self.traces[1], self.extra_layers), "extended"
                except DepthExtensionError as error:
                    logger.warning("Allocator model: %s; using the larger overhead of the traced depths.", error)
                    deep, depth = None, "deepest traced"
            self._deep = (deep, depth)
        return self._deep

    def memory(self, profiles: Sequence, live_peak: int) -> dict[str, dict[str, Any]]:
        return allocator_memory(self, profiles, live_peak)


def _with_layers(config, layers: int):
    fields = config.to_dict()
    fields["num_hidden_layers"] = layers
    if isinstance(fields.get("layer_types"), list):  # per-layer kinds (sliding window...) follow the count
        kinds = fields["layer_types"]
        if len(set(kinds)) > 1:
            raise PacaConfigError("The planner needs a stack of identical decoder layers; this config mixes layer types.")
        fields["layer_types"] = kinds[:1] * layers
    return type(config).from_dict(fields)


def _affine(a: float, b: float, layers: int, traced: tuple[int, int] = TRACED_LAYERS) -> float:
    """Value at ``layers`` on the line through (traced[0], a) and (traced[1], b)."""
    l0, l1 = traced
    return a + (b - a) * (layers - l0) / (l1 - l0)


class MethodTracer:
    """Traces one method on one model at 1 and 2 layers; measurements at full depth, cached by shape."""

    def __init__(self, config, method: str, settings: PlanSettings, profiles: Sequence, fake: bool = True,
                 configs: list | None = None):
        self.config = config
        self.configs = configs  # our method's configs as paca train built them (else the bench's defaults)
        self.spec: MethodSpec = parse_method_spec(method)
        self.settings = settings
        self.profiles = list(profiles)
        self.layers = int(config.num_hidden_layers)
        self.rank = getattr(configs[0], "r", None) if configs else self.spec.rank(settings.rank, settings.match_params)
        self.fake = fake
        offload = settings.offload_activations or "offload" in self.spec.levers
        self.traced_layers = TRACED_LAYERS_OFFLOAD if offload else TRACED_LAYERS
        self._models: list[TracedModel] | None = None
        self._cache: dict[tuple[int, int], Measurement] = {}
        self.traces = 0

    @property
    def quantize(self) -> str | None:
        """The 4-bit type this method's base is planned in (None: the planned dtype)."""
        if self.spec.four_bit:
            return self.settings.quantize
        return next((c.quantize for c in self.configs or () if getattr(c, "quantize", None)), None)

    def options(self) -> dict:
        options = dict(self.settings.options)
        if self.spec.four_bit:
            options["quantize"] = self.settings.quantize
        return options

    def _build(self) -> list[TracedModel]:
        if self._models is None:
            models = []
            for layers in self.traced_layers if self.layers > self.traced_layers[1] else (self.layers,):
                models.append(build(_with_layers(self.config, layers), self.spec, self.rank, self.settings.dtype,
                                    self.options(), fake=self.fake,
                                    gradient_checkpointing=self.settings.gradient_checkpointing, configs=self.configs,
                                    loss_chunk_tokens=self.settings.loss_chunk_tokens,
                                    offload_activations=self.settings.offload_activations))
            self._models = models
        return self._models

    @property
    def counts(self) -> dict[str, int]:
        models = self._build()
        if len(models) == 1:
            return dict(models[0].counts)
        return {k: int(round(_affine(models[0].counts[k], models[1].counts[k], self.layers, self.traced_layers)))
                for k in models[0].counts}

    def layer_weight_bytes(self) -> int:
        models = self._build()
        if len(models) == 1:
            return models[0].counts["weights"] // max(1, self.layers)
        return models[1].counts["weights"] - models[0].counts["weights"]

    def measure(self, seq_len: int, batch_size: int) -> Measurement:
        key = (seq_len, batch_size)
        if key in self._cache:
            return self._cache[key]
        parts = []
        memory_traces = []  # kept for the allocator model, which needs the events of both depths (AllocationEvents)
        for model in self._build():
            trace, counts = trace_step(model, seq_len, batch_size)
            self.traces += 1
            values = {
                "weights": counts["weights"], "gradients": counts["gradients"], "optimizer": counts["optimizer"],
                "saved_activations": trace.saved_bytes, "peak": trace.peak_bytes, "host": counts["host"],
                "flops": trace.flops, "bytes_moved": trace.bytes_moved, "kernels": trace.kernels,
            }
            # Each phase's peak is affine in the layer count, their maximum is not (one phase can overtake another).
            values.update({f"peak:{phase}": peak for phase, peak in trace.peak_by_phase.items()})
            for profile in self.profiles:
                estimate = estimate_time(trace, profile).as_dict()
                for name in ("step_seconds", "compute_seconds", "memory_seconds", "launch_seconds", "kernels", "charged_flops"):
                    values[f"{profile.name}:{name}"] = estimate[name]
                for group in ("phase_seconds", "phase_kernels"):  # per phase, for communication overlap and sharding
                    values.update({f"{profile.name}:{group}:{phase}": v for phase, v in estimate[group].items()})
            memory_traces.append(trace)
            parts.append(values)
            del trace
        if len(parts) == 1:
            full = {k: float(v) for k, v in parts[0].items()}
        else:
            full = {k: _affine(parts[0][k], parts[1][k], self.layers, self.traced_layers) for k in parts[0]}
            full["peak"] = max([full["peak"]] + [v for k, v in full.items() if k.startswith("peak:")])
        measurement = Measurement(
            bytes={k: int(round(full[k])) for k in BYTE_KINDS},
            flops=int(round(full["flops"])), bytes_moved=int(round(full["bytes_moved"])), kernels=int(round(full["kernels"])),
            phase_peaks={k.split(":", 1)[1]: int(round(v)) for k, v in full.items() if k.startswith("peak:")},
        )
        measurement.allocation_events = AllocationEvents(memory_traces, self.layers - self.traced_layers[-1])
        for profile in self.profiles:
            t = {name: full[f"{profile.name}:{name}"] for name in ("step_seconds", "compute_seconds", "memory_seconds", "launch_seconds")}
            t["kernels"] = int(round(full[f"{profile.name}:kernels"]))
            t["charged_flops"] = full[f"{profile.name}:charged_flops"]
            for group in ("phase_seconds", "phase_kernels"):
                prefix = f"{profile.name}:{group}:"
                t[group] = {k[len(prefix):]: v for k, v in full.items() if k.startswith(prefix)}
            parts_t = {"compute": t["compute_seconds"], "memory bandwidth": t["memory_seconds"], "launch overhead": t["launch_seconds"]}
            t["bound"] = max(parts_t, key=parts_t.get)
            measurement.times[profile.name] = t
        self._cache[key] = measurement
        return measurement


def sharded_kinds(settings: PlanSettings) -> tuple[str, ...]:
    """What each of the ranks holds 1/N of: FSDP2 and ZeRO-3 everything per parameter, ZeRO-2 gradients and
    optimizer state, ZeRO-1 optimizer state; nothing for one process or DDP."""
    if settings.world_size <= 1:
        return ()
    if settings.fsdp or settings.zero == 3:
        return ("weights", "gradients", "optimizer")
    return {1: ("optimizer",), 2: ("gradients", "optimizer")}.get(settings.zero, ())


def per_rank_bytes(measurement: Measurement, settings: PlanSettings, layer_weight_bytes: int) -> dict[str, int]:
    """Device bytes per process. One process or DDP: as traced. Sharded over N ranks (:func:`sharded_kinds`):
    each rank keeps 1/N of what is sharded. With sharded weights (FSDP2, ZeRO-3) it gathers one decoder
    layer's full weights at a time, with the next one prefetched (two layers of all-gather buffers).

    The peak is taken per phase. Forward loses the other ranks' weights and optimizer state; backward
    also their gradients (reduce-scattered as they are produced) but holds one layer's unsharded
    gradient while it does. In the optimizer step and the column write, activations are gone and
    everything live is per parameter (weights, gradients, state and the optimizer's temporaries, which
    run on the local shards), so with sharded weights those phases are divided by N; otherwise they
    lose the other ranks' optimizer state (and gradients, ZeRO-2)."""
    out = dict(measurement.bytes)
    kinds = sharded_kinds(settings)
    out["all_gather_buffers"] = 0
    if not kinds:
        return out
    n = settings.world_size
    full = {kind: out[kind] for kind in ("weights", "gradients", "optimizer")}
    for kind in kinds:
        out[kind] = math.ceil(full[kind] / n)
    saved = {kind: full[kind] - out[kind] for kind in full}
    weights_sharded = "weights" in kinds
    if weights_sharded:
        out["all_gather_buffers"] = 2 * layer_weight_bytes
    phase_peaks = measurement.phase_peaks or {"forward": measurement.bytes["peak"]}
    in_flight_gradient = min(layer_weight_bytes, full["gradients"]) if "gradients" in kinds else 0

    def phase_peak(phase: str, peak: int) -> int:
        if phase in ("optimizer", "column_write"):
            return math.ceil(peak / n) if weights_sharded else peak - saved["optimizer"] - saved["gradients"]
        if phase == "backward":
            return peak - saved["weights"] - saved["optimizer"] - saved["gradients"] + in_flight_gradient
        return peak - saved["weights"] - saved["optimizer"]

    out["peak"] = max(phase_peak(phase, peak) for phase, peak in phase_peaks.items()) + out["all_gather_buffers"]
    return out


def allocator_memory(events: AllocationEvents, profiles: Sequence, live_peak: int) -> dict[str, dict[str, Any]]:
    """Per profile: the step's ``allocated_peak`` and ``reserved_peak`` at full depth (one process, unsharded,
    library workspaces included) and ``depth``, how the full-depth events were had.

    ``events``: the step traced at the planner's depths (one trace when that is the model's depth, else two that
    differ by one layer); ``live_peak``: the live bytes at full depth. Which cached block a request lands in
    depends on the whole stack, so the allocator's overhead is not affine in the layer count like the other
    figures: the deeper trace's events are extended to the model's depth (:func:`~.allocator.extend_depth`) and
    replayed (``depth: "extended"``). Should the two traces not differ by one repeated layer, the larger of the
    traced depths' overheads is added to ``live_peak`` (``depth: "deepest traced"``)."""
    deep, depth = events.deep()
    out: dict[str, dict[str, Any]] = {}
    for profile in profiles:
        if deep is not None:
            peaks = allocator_peaks(deep, profile, events._replays)
            out[profile.name] = {"allocated_peak": peaks.allocated_peak, "reserved_peak": peaks.reserved_peak, "depth": depth}
            continue
        shallow = [allocator_peaks(trace, profile) for trace in events.traces]
        live = live_peak + sum(profile.workspace_allocations())
        out[profile.name] = {kind: live + max(getattr(p, kind) - p.live_peak for p in shallow)
                             for kind in ("allocated_peak", "reserved_peak")}
        out[profile.name]["depth"] = depth
    return out


def allocator_peaks(trace, profile, cache: dict | None = None) -> AllocatorPeaks:
    """``trace`` replayed through ``profile``'s allocator model with its library workspaces (cached by rule and
    workspaces: the CUDA profiles share one rule)."""
    rule = AllocatorRule.from_mapping(profile.allocator)
    workspaces = tuple(profile.workspace_allocations())
    key = (rule.key(), workspaces)
    if cache is not None and key in cache:
        return cache[key]
    if rule.kind == "exact" and hasattr(trace, "peak_bytes"):  # nothing to replay: reserved == allocated == live
        live = trace.peak_bytes + sum(workspaces)
        peaks = AllocatorPeaks(live, live, live)
    else:
        peaks = replay_trace(trace, rule, workspaces)
    if cache is not None:
        cache[key] = peaks
    return peaks


def device_memory(measurement: Measurement, per_rank: dict[str, int], profile, settings: PlanSettings) -> dict[str, Any]:
    """What one process holds on ``profile``'s device, in bytes (docs/plan.md, "Device memory"):

    * ``allocated_peak``: blocks handed out (``torch.cuda.max_memory_allocated``);
    * ``reserved_peak``: segments the allocator took (``torch.cuda.max_memory_reserved``);
    * ``runtime_fixed``: what the runtime holds outside the allocator (CUDA context; collective buffers when
      ``world_size`` > 1), named in ``runtime_parts``;
    * ``device_total``: ``reserved_peak + runtime_fixed``, what ``nvidia-smi`` shows for the process. ``fits``
      compares this figure with the limit.

    Under sharding the allocator's overhead of the one-process replay is added to the per-rank live peak (an
    approximation: the sharded weights' own rounding differs by at most a block per tensor)."""
    memory = measurement.device_allocations(profile)
    live = measurement.bytes["peak"]
    allocated = per_rank["peak"] + memory["allocated_peak"] - live
    reserved = per_rank["peak"] + memory["reserved_peak"] - live
    runtime = profile.runtime_fixed_bytes(settings.world_size)
    fixed = sum(runtime.values())
    return {"allocated_peak": allocated, "reserved_peak": reserved, "runtime_fixed": fixed, "device_total": reserved + fixed,
            "runtime_parts": runtime}


def memory_limit(profile, settings: PlanSettings) -> tuple[int, str]:
    """The bytes a process's device total may reach before any margin, and where the figure comes from:
    ``--memory-budget`` (what the user says the process may use on the device, taken as given), else the device's
    memory (on CPU less the share the profile leaves to the OS)."""
    if settings.memory_budget is not None:
        return settings.memory_budget, "--memory-budget"
    if _host_memory(profile):
        return profile.memory_limit(), f"{profile.name} memory less its {profile.memory_margin():.0%} share for the OS"
    return profile.memory_bytes, f"{profile.name} memory"


def _host_memory(profile) -> bool:
    return getattr(profile, "device_type", None) == "cpu"


def fit_margin(profile, settings: PlanSettings, four_bit: bool) -> Margin:
    """The margin fit decisions on ``profile`` keep (:mod:`.margin`): ``--margin``, none on CPU (exact), else the
    measured margin of the plan's regime."""
    sharded = settings.world_size > 1 and bool(settings.fsdp or settings.zero)
    return margin_for(regime(four_bit, settings.gradient_checkpointing, sharded), settings.margin,
                      host_memory=_host_memory(profile) and settings.margin is None)


def search_largest(peak_at: Callable[[int], int], budget: int, start: int, limit: int, step: int, static: int = 0) -> int:
    """Largest multiple of ``step`` in [step, limit] whose traced peak fits ``budget`` (0: none fits).

    Each guess comes from the line through the closest fitting and failing points (peaks are nearly
    affine in batch size and sequence length), then is checked by a trace; a guess that lands on the
    boundary takes two traces to confirm. ``static``: bytes that do not grow with x (weights, optimizer
    state), the first guess's intercept. Falls back to bisection if guesses stop converging."""
    def down(x: float) -> int:
        return max(step, min(limit, int(x // step) * step))

    points: dict[int, int] = {}

    def peak(x: int) -> int:
        if x not in points:
            points[x] = peak_at(x)
        return points[x]

    x = down(min(start, limit))
    lo, hi = (x, None) if peak(x) <= budget else (0, x)
    rounds = 0
    while hi is None:
        if lo >= limit:
            return limit
        others = [p for p in points if p != lo]
        guess = _through(lo, points[lo], others[-1], points[others[-1]], budget) if others else _through(0, static, lo, points[lo], budget)
        nxt = down(max(guess, lo + step)) if guess == guess else down(lo * 2)
        nxt = max(nxt, min(limit, lo + step))
        if peak(nxt) <= budget:
            lo = nxt
        else:
            hi = nxt
    while hi - lo > step:
        rounds += 1
        if rounds > 6 or (lo == 0 and rounds > 1):
            mid = (lo + hi) // 2 // step * step
        else:  # the line through the closest fitting and failing points; while none fits, (0, static) as at first
            guess = _through(lo, points[lo] if lo else static, hi, points[hi], budget)
            mid = int(guess // step) * step if guess == guess else (lo + hi) // 2 // step * step
        mid = min(max(mid, lo + step), (hi - 1) // step * step)  # a multiple of step below hi (hi may be limit)
        if peak(mid) <= budget:
            lo = mid
        else:
            hi = mid
    return lo


def _through(x0: int, y0: int, x1: int, y1: int, budget: int) -> float:
    if y1 == y0:
        return float("nan")
    return x0 + (budget - y0) * (x1 - x0) / (y1 - y0)


def plan_records(config, model_name: str, methods: Sequence[str], profiles: Sequence, settings: PlanSettings,
                 seq_lens: Sequence[int], batch_sizes: Sequence[int], progress: Callable[[str], None] | None = None,
                 search: bool = True, workers: int = 1) -> list[dict]:
    """Every (method, profile, seq_len, batch_size) record; see :func:`record` for the fields.

    ``workers`` > 1 traces methods in that many processes (tracing is single-threaded Python); the
    records come back in ``methods`` order either way."""
    context = context_length(config)
    for seq in seq_lens:
        if seq > context:
            raise PacaConfigError(f"--seq-len {seq} is above {model_name}'s context length ({context}).")
    jobs = [(config, model_name, method, [p.name for p in profiles], settings, tuple(seq_lens), tuple(batch_sizes), search)
            for method in methods]
    if workers <= 1 or len(methods) <= 1:
        out = []
        for job in jobs:
            if progress:
                progress(job[2])
            out += _plan_method(*job, profiles=profiles)
        return out
    import concurrent.futures
    import multiprocessing

    if progress:
        progress(", ".join(methods) + f" ({workers} processes)")
    context_ = multiprocessing.get_context("spawn")  # a clean interpreter: no forked torch threads
    with concurrent.futures.ProcessPoolExecutor(max_workers=workers, mp_context=context_, initializer=_worker_logging,
                                                initargs=(logging.getLogger().getEffectiveLevel(),)) as pool:
        results = list(pool.map(_plan_method_by_name, jobs))
    return [r for chunk in results for r in chunk]


def _worker_logging(level: int) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")


def _plan_method_by_name(job: tuple) -> list[dict]:
    """A worker's job: profiles travel by name (read again from devices/profiles.json or the calibration)."""
    from devices.profiles import get_profile

    config, model_name, method, profile_names, settings, seq_lens, batch_sizes, search = job
    return _plan_method(config, model_name, method, profile_names, settings, seq_lens, batch_sizes, search,
                        profiles=[get_profile(name) for name in profile_names])


def _plan_method(config, model_name: str, method: str, profile_names, settings: PlanSettings, seq_lens, batch_sizes,
                 search: bool, profiles: Sequence) -> list[dict]:
    context = context_length(config)
    records = []
    tracer = MethodTracer(config, method, settings, profiles)
    started = time.perf_counter()
    for profile in profiles:
        limit, limit_source = memory_limit(profile, settings)
        margin = fit_margin(profile, settings, tracer.quantize is not None)
        budget, budget_source = margin.apply(limit), f"{limit_source} less {margin.phrase()}"
        layer_bytes = tracer.layer_weight_bytes()

        def peak_of(s: int, b: int, profile=profile) -> int:
            """The figure 'fits' compares: the device total per rank (reserved segments + the runtime's own memory)."""
            m = tracer.measure(s, b)
            return device_memory(m, per_rank_bytes(m, settings, layer_bytes), profile, settings)["device_total"]

        max_seq: dict[int, int] = {}
        for batch in batch_sizes:
            for seq in seq_lens:
                m = tracer.measure(seq, batch)
                per_rank = per_rank_bytes(m, settings, layer_bytes)
                per_rank.update({k: v for k, v in device_memory(m, per_rank, profile, settings).items() if k != "runtime_parts"})
                fits = per_rank["device_total"] <= budget
                static = (per_rank["weights"] + per_rank["optimizer"] + per_rank["all_gather_buffers"] + per_rank["runtime_fixed"]
                          + sum(profile.workspace_allocations()))
                if search and batch not in max_seq:
                    max_seq[batch] = search_largest(lambda s: peak_of(s, batch), budget, max(seq_lens), context, SEQ_STEP, static)
                max_batch = search_largest(lambda b: peak_of(seq, b), budget, batch, MAX_BATCH, 1, static) if search else None
                timing = m.times[profile.name]
                records.append(record(model_name, tracer, profile, settings, seq, batch, per_rank, fits,
                                      max_seq.get(batch), max_batch, m, timing, budget=budget, context=context,
                                      budget_source=budget_source, margin=margin, limit=limit))
    logger.info("%s: %d traces in %.1f s", method, tracer.traces, time.perf_counter() - started)
    return records


def record(model_name: str, tracer: MethodTracer, profile, settings: PlanSettings, seq: int, batch: int, per_rank: dict,
           fits: bool, max_seq: int | None, max_batch: int | None, m: Measurement, timing: dict, budget: int | None = None,
           context: int | None = None, budget_source: str | None = None, margin: Margin | None = None,
           limit: int | None = None) -> dict:
    """One row of the plan. Bytes are per rank; ``tokens_per_second`` counts every rank's tokens. ``fits``:
    ``bytes["device_total"]`` (reserved peak + the runtime's own memory) at or below ``usable_bytes``, the
    ``limit_bytes`` less the ``margin`` for untraced overhead."""
    counts = tracer.counts
    if budget is None:
        limit, limit_source = memory_limit(profile, settings)
        margin = fit_margin(profile, settings, tracer.quantize is not None)
        budget, budget_source = margin.apply(limit), f"{limit_source} less {margin.phrase()}"
    tokens = seq * batch * max(1, settings.world_size)
    # Per-rank time: the traced step (its sharded optimizer share) plus exposed communication (communication.py).
    comm = step_communication(settings, profile, timing, m.bytes["gradients"], m.bytes["weights"], tracer.layer_weight_bytes(),
                              tracer.layers, counts["trainable_params"])
    step = comm["step_seconds"]
    exposed = (comm["communication"] or {}).get("exposed_seconds") or 0.0
    parts = {"compute": timing["compute_seconds"], "memory bandwidth": timing["memory_seconds"],
             "launch overhead": timing["launch_seconds"], "communication": exposed}
    return {
        "model": model_name,
        "method": tracer.spec.name,
        "device_profile": profile.name,
        "dtype": str(settings.dtype).replace("torch.", ""),
        "seq_len": seq,
        "batch_size": batch,
        "rank": tracer.rank,
        "world_size": settings.world_size,
        "layout": settings.layout(),
        "fsdp": settings.fsdp,
        "zero": settings.zero,
        "gradient_checkpointing": settings.gradient_checkpointing,
        "loss_chunk_tokens": settings.loss_chunk_tokens if tracer.spec.kind == "ours" else None,
        "offload_activations": settings.offload_activations,
        "quantize": tracer.quantize,
        "notes": [QUANTIZED_NOTE] if tracer.quantize else [],
        "trainable_params": counts["trainable_params"],
        "total_params": counts["total_params"],
        "bytes": per_rank,
        "usable_bytes": budget,
        "limit_bytes": limit,
        "margin": margin.as_dict() if margin is not None else None,
        "budget_source": budget_source or ("--memory-budget" if settings.memory_budget is not None else f"{profile.name} memory"),
        "runtime_memory": profile.runtime_fixed_bytes(settings.world_size),
        "allocator_rule": (profile.allocator or {}).get("rule", "exact"),
        "fits": fits,
        "max_seq_len": max_seq,
        "context": context,
        "max_seq_len_is_context": max_seq is not None and context is not None and max_seq >= context,
        "max_batch_size": max_batch,
        "step_seconds": step,
        "tokens_per_second": tokens / step if step else None,
        "bound": max(parts, key=parts.get),
        "time_breakdown": {**{k: timing[k] for k in ("compute_seconds", "memory_seconds", "launch_seconds")},
                           "compute_seconds_per_rank": comm["compute_seconds_per_rank"],
                           "communication_exposed_seconds": exposed, "charged_flops": timing.get("charged_flops"),
                           "phase_seconds": timing.get("phase_seconds")},
        "communication": comm["communication"],
        "kernels": timing["kernels"],
        "flops": m.flops,
        "bytes_moved": m.bytes_moved,
    }
