"""``paca bench --mode max-context``: the longest sequence each method (with its levers) trains at
under a memory budget.

Our methods run as ``paca train`` runs them (LM head + loss in chunks, its default); a peer runs as
it comes, and ``@levers`` add gradient checkpointing, the chunked loss or activation offload
(``peft-lora@gc``, ``paca@all``; :data:`~paca_core.workloads.levers.LEVERS`).

For each entry ``paca plan``'s trace (fake tensors) searches the longest sequence whose step's
live-bytes high-water mark fits the budget, in steps of 64 tokens up to the model's context; then
one step at that length and one at the next step run on **real CPU tensors** under the same
dispatch-level tracker, at the model's full depth, and their measured peaks confirm (or move) the
answer. Activation offload on CPU has no separate device memory to free, so its transfers run as
the planner's stand-in (each offloaded tensor copied into host memory, counted apart): the figures
are device bytes as on an accelerator, which the table says. ``--plan-model`` adds the same search
for a larger shape on a device profile (simulated, never presented as measured).
"""
from __future__ import annotations

import gc
import logging
from dataclasses import dataclass

import torch

from ..memory.chunked_loss import DEFAULT_LOSS_CHUNK_TOKENS
from ..errors import PacaConfigError
from ..plan.planner import SEQ_STEP, MethodTracer, PlanSettings, device_memory, per_rank_bytes, search_largest
from ..plan.shapes import context_length
from ..plan.trace import build, trace_step
from ..workloads.plots import pyplot
from ..workloads.specs import MethodSpec

logger = logging.getLogger(__name__)


@dataclass
class ContextSearch:
    """One entry's answer: planned (fake-tensor trace) and measured (real CPU tensors) longest length."""

    method: str
    levers: tuple[str, ...]
    batch_size: int
    budget_bytes: int
    context: int
    planned: int
    measured: int | None = None
    measured_peak_bytes: int | None = None
    capped: bool = False
    probes: list[tuple[int, int, bool]] | None = None  # (seq_len, measured peak bytes, fits)

    def as_dict(self) -> dict:
        return {"method": self.method, "levers": list(self.levers), "batch_size": self.batch_size, "budget_bytes": self.budget_bytes,
                "context": self.context, "planned_max_seq_len": self.planned, "max_seq_len": self.measured,
                "peak_bytes": self.measured_peak_bytes, "capped": self.capped, "probes": [list(p) for p in self.probes or []]}


def _settings(dtype: torch.dtype, rank: int, match_params: bool, options: dict) -> PlanSettings:
    return PlanSettings(dtype=dtype, rank=rank, match_params=match_params, loss_chunk_tokens=DEFAULT_LOSS_CHUNK_TOKENS,
                        options=tuple(sorted((k, v) for k, v in options.items() if v)))


def planned_longest(config, spec: MethodSpec, batch_size: int, budget: int, dtype: torch.dtype, rank: int,
                    match_params: bool = True, options: dict | None = None, profile=None) -> tuple[int, int]:
    """(longest planned sequence length under ``budget``, the model's context) by tracing fake tensors.
    With a device ``profile`` the step counts as ``paca plan``'s ``fits`` counts it there (``device_total``: the
    allocator's reserved segments and the runtime's own memory), against ``budget``."""
    settings = _settings(dtype, rank, match_params, options or {})
    tracer = MethodTracer(config, spec.name, settings, profiles=())
    context = context_length(config)
    static = tracer.counts["weights"] + tracer.counts["optimizer"]

    def peak(seq_len: int) -> int:
        measurement = tracer.measure(seq_len, batch_size)
        if profile is None:
            return measurement.bytes["peak"]
        per_rank = per_rank_bytes(measurement, settings, tracer.layer_weight_bytes())
        return device_memory(measurement, per_rank, profile, settings)["device_total"]

    longest = search_largest(peak, budget, min(1024, context), context, SEQ_STEP, static)
    return longest, context


def measured_peak(config, spec: MethodSpec, seq_len: int, batch_size: int, dtype: torch.dtype, rank: int | None,
                  options: dict | None = None) -> int:
    """The live-bytes high-water mark of one training step at this shape on real CPU tensors (full depth)."""
    traced = build(config, spec, rank, dtype, options=options, fake=False, loss_chunk_tokens=DEFAULT_LOSS_CHUNK_TOKENS)
    try:
        step, _ = trace_step(traced, seq_len, batch_size)
        return step.peak_bytes
    finally:
        del traced
        gc.collect()


def search_entry(config, spec: MethodSpec, batch_size: int, budget: int, dtype: torch.dtype, lora_rank: int,
                 match_params: bool = True, options: dict | None = None, confirm: bool = True) -> ContextSearch:
    """The planner's longest length for ``spec``, then confirmed by real steps at it and one step above
    (moving down, one step at a time, while a real step does not fit)."""
    rank = spec.rank(lora_rank, match_params)
    planned, context = planned_longest(config, spec, batch_size, budget, dtype, lora_rank, match_params, options)
    result = ContextSearch(spec.name, spec.levers, batch_size, budget, context, planned, probes=[])
    if not confirm or planned == 0:
        return result

    def probe(seq: int) -> bool:
        peak = measured_peak(config, spec, seq, batch_size, dtype, rank, options)
        fits = peak <= budget
        result.probes.append((seq, peak, fits))
        logger.info("%s: real step at %d × %d tokens: %.1f MiB (%s)", spec.name, batch_size, seq, peak / 2**20,
                    "fits" if fits else "over the budget")
        return fits

    seq = planned
    while seq >= SEQ_STEP and not probe(seq):
        seq -= SEQ_STEP
    if seq < SEQ_STEP:
        result.measured = 0
        return result
    result.measured = seq
    result.measured_peak_bytes = next(p for s, p, _ in result.probes if s == seq)
    if seq + SEQ_STEP <= context:
        if probe(seq + SEQ_STEP):  # the plan was short of the real answer: say so rather than hide it
            logger.warning("%s: a real step at %d tokens fits although the plan said %d; reporting the plan's bound as "
                           "measured only up to %d.", spec.name, seq + SEQ_STEP, planned, seq + SEQ_STEP)
            result.measured = seq + SEQ_STEP
            result.measured_peak_bytes = result.probes[-1][1]
    else:
        result.capped = True
    return result


def add_context_ratios(records: list[dict]) -> None:
    """Longest length over PEFT LoRA's and over PEFT LoRA with gradient checkpointing, in place."""
    by_name = {r["method"]: r for r in records}
    for name, key in (("peft-lora", "vs_peft_lora"), ("peft-lora@gc", "vs_peft_lora_gc")):
        reference = by_name.get(name)
        for record in records:
            for field in ("max_seq_len", "planned_max_seq_len"):
                mine, theirs = record.get(field), (reference or {}).get(field)
                if mine is not None and theirs:
                    record.setdefault(key, {})[field] = mine / theirs


def context_markdown(records: list[dict], measured: bool = True) -> str:
    """One row per entry: planned and measured longest length, its peak, and the ratios."""
    lines = [
        "| entry | levers | longest seq (planned) | longest seq (measured) | peak at it (MiB) | × PEFT LoRA | × PEFT LoRA + GC |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in records:
        field = "max_seq_len" if measured else "planned_max_seq_len"
        cap = " (context)" if r.get("capped") else ""
        vs, vs_gc = r.get("vs_peft_lora", {}).get(field), r.get("vs_peft_lora_gc", {}).get(field)
        lines.append(
            f"| {r['method']} | {'+'.join(r['levers']) or '–'} | {r['planned_max_seq_len']:,} | "
            f"{'–' if r.get('max_seq_len') is None else format(r['max_seq_len'], ',')}{cap} | "
            f"{'–' if r.get('peak_bytes') is None else format(r['peak_bytes'] / 2**20, ',.0f')} | "
            f"{'–' if vs is None else f'{vs:.2f}×'} | {'–' if vs_gc is None else f'{vs_gc:.2f}×'} |"
        )
    return "\n".join(lines)


def plot_context(records: list[dict], path, title: str) -> None:
    plt = pyplot()
    names = [r["method"] for r in records]
    values = [r["max_seq_len"] if r.get("max_seq_len") is not None else r["planned_max_seq_len"] for r in records]
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(names) + 1.2))
    ax.barh(names, values, color=["#c44" if n.startswith("peft") else "#36a" for n in names])
    ax.invert_yaxis()
    ax.set_xlabel("longest sequence that fits (tokens)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def check_entries(specs: list[MethodSpec]) -> None:
    """Entries the search cannot run, refused before any work."""
    for spec in specs:
        if spec.kind == "floor":
            raise PacaConfigError("floor trains nothing; max-context compares methods that train (drop floor).")
