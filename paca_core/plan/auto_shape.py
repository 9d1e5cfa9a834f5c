"""``paca train --seq-len auto`` / ``--batch-size auto``: the largest shape whose traced step fits a budget.

The step is traced as ``paca plan`` traces it (fake tensors from the model folder's config.json, the
run's own method configs and levers), and the largest value is searched by tracing
(:func:`~.planner.search_largest`), never extrapolated. Rules:

* ``--seq-len auto``: the longest multiple of :data:`~.planner.SEQ_STEP` tokens that fits at the given
  batch size, capped by the model's context length;
* ``--batch-size auto``: the largest batch that fits at the given sequence length, capped by
  :data:`MAX_AUTO_BATCH` (the data set's size is not known before loading; ``paca train`` lowers the
  batch to what the training split holds afterwards, which never raises the peak);
* both: the sequence length first, at batch 1 (a longer context is what only memory can buy; a larger
  batch can also be had with ``--grad-accum``), then the batch at that length.

Nothing is loaded; a budget that nothing fits raises :class:`PacaConfigError` with the smallest
setting's planned peak and the levers.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..errors import PacaConfigError
from ..flags.train_options import is_auto
from ..workloads.byte_sizes import parse_bytes
from .preflight import LEVERS, traced_peak
from .planner import SEQ_STEP, search_largest
from .shapes import context_length

#: The largest batch ``--batch-size auto`` chooses: past it the step is long and --grad-accum does the same job.
MAX_AUTO_BATCH = 1024
#: Exceptions a trace raises when the planner cannot follow a method or model (an op without a fake kernel...).
TRACE_ERRORS = (PacaConfigError, NotImplementedError, RuntimeError, TypeError, ValueError)


def parse_budget(text: str) -> int:
    """``--memory-budget`` in bytes (``24GiB``, ``512MiB``, ``16GB``, ``80e9``), read as ``paca bench`` reads it."""
    try:
        return parse_bytes(text)
    except PacaConfigError as error:
        raise PacaConfigError(f"--memory-budget: {error}") from None


def format_bytes(value: int) -> str:
    """GiB for device-sized figures, MiB below one GiB (tiny models would all read 0.00 GiB)."""
    return f"{value / 2**30:.2f} GiB" if value >= 2**30 else f"{value / 2**20:.1f} MiB"


@dataclass(frozen=True)
class ShapeChoice:
    """The shape a run will train at and why: its planned peak per process against the budget."""

    seq_len: int
    batch_size: int
    peak_bytes: int
    budget_bytes: int
    #: Which of "seq_len" / "batch_size" were chosen here (the others were given).
    chosen: tuple[str, ...]
    #: The margin for untraced overhead kept below the budget (:class:`~.margin.Margin` as a dict), if any.
    margin: dict | None = None

    def as_dict(self) -> dict:
        return {"seq_len": self.seq_len, "batch_size": self.batch_size, "planned_peak_bytes": self.peak_bytes,
                "memory_budget_bytes": self.budget_bytes, "margin": self.margin, "chosen": list(self.chosen),
                "source": "paca plan trace"}


class ShapePeaks:
    """Planned per-process peak of one ``paca train`` step by (seq_len, batch_size); traces are cached.

    A method or model the planner cannot trace raises :class:`PacaConfigError` asking for explicit numbers."""

    def __init__(self, tracer, include_host: bool = False, device_type: str | None = None):
        self.tracer = tracer
        self.include_host = include_host
        self.device_type = device_type

    def __call__(self, seq_len: int, batch_size: int) -> int:
        try:
            return traced_peak(self.tracer, seq_len, batch_size, self.include_host, self.device_type)
        except TRACE_ERRORS as error:
            raise self._untraceable(error) from None

    def context(self) -> int:
        return context_length(self.tracer.config)

    def static_bytes(self) -> int:
        """Bytes that do not grow with the shape (weights, optimizer state): the search's first intercept."""
        from .planner import per_rank_bytes

        try:
            per_rank = per_rank_bytes(self.tracer.measure(SEQ_STEP, 1), self.tracer.settings, self.tracer.layer_weight_bytes())
        except TRACE_ERRORS as error:
            raise self._untraceable(error) from None
        return per_rank["weights"] + per_rank["optimizer"] + per_rank["all_gather_buffers"]

    def _untraceable(self, error: Exception) -> PacaConfigError:
        return PacaConfigError(
            f"--seq-len/--batch-size auto needs paca plan's trace of --method {self.tracer.spec.name} on this model, and "
            f"the planner cannot trace it ({type(error).__name__}: {error}). Pass explicit numbers instead of auto "
            "(`paca plan` shows what it can trace)."
        )


def choose_shape(peaks: Callable[[int, int], int], seq_len: int | str, batch_size: int | str, budget: int,
                 context: int, static: int = 0) -> ShapeChoice:
    """The largest ``auto`` shape whose planned peak ``peaks(seq, batch)`` fits ``budget`` (rules: module doc).

    Raises :class:`PacaConfigError` when not even the smallest setting fits, with its planned peak and the levers.
    """
    chosen = tuple(name for name, value in (("seq_len", seq_len), ("batch_size", batch_size)) if is_auto(value))
    if not chosen:
        raise ValueError("choose_shape needs --seq-len auto or --batch-size auto")
    if is_auto(seq_len):
        if context < SEQ_STEP:
            raise PacaConfigError(f"--seq-len auto searches multiples of {SEQ_STEP} tokens, and this model's context is "
                                  f"{context}: pass an explicit --seq-len.")
        at_batch = 1 if is_auto(batch_size) else int(batch_size)
        longest = context // SEQ_STEP * SEQ_STEP  # the context itself when it is a multiple of SEQ_STEP
        seq_len = search_largest(lambda s: peaks(s, at_batch), budget, SEQ_STEP, longest, SEQ_STEP, static)
        if seq_len == 0:
            _nothing_fits("--seq-len auto", SEQ_STEP, at_batch, peaks(SEQ_STEP, at_batch), budget)
    if is_auto(batch_size):
        batch_size = search_largest(lambda b: peaks(seq_len, b), budget, 1, MAX_AUTO_BATCH, 1, static)
        if batch_size == 0:
            _nothing_fits("--batch-size auto", int(seq_len), 1, peaks(int(seq_len), 1), budget)
    return ShapeChoice(int(seq_len), int(batch_size), peaks(int(seq_len), int(batch_size)), budget, chosen)


def _nothing_fits(flag: str, seq_len: int, batch_size: int, peak: int, budget: int) -> None:
    raise PacaConfigError(
        f"{flag}: nothing fits the memory budget of {format_bytes(budget)} per process. The smallest setting, "
        f"--seq-len {seq_len} at --batch-size {batch_size}, plans a peak of {format_bytes(peak)} (paca plan's trace). "
        f"Levers that lower it: {LEVERS}; or a larger --memory-budget. Nothing was loaded."
    )


def choose_with_tracer(tracer, seq_len: int | str, batch_size: int | str, budget: int, include_host: bool = False,
                       device_type: str | None = None) -> ShapeChoice:
    """:func:`choose_shape` on ``tracer``'s step (:func:`.preflight.step_tracer`), capped by its model's context."""
    peaks = ShapePeaks(tracer, include_host, device_type)
    return choose_shape(peaks, seq_len, batch_size, budget, peaks.context(), peaks.static_bytes())
