"""Largest sequence length (or batch) whose training step fits a memory budget, by search.

Each probe is a fresh worker process running one step at that size; the search itself only sees
"bytes used at this size, or did not fit" and needs nothing about devices. (Budgets are parsed by
:func:`paca_core.workloads.byte_sizes.parse_bytes`.)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from ..errors import PacaConfigError


@dataclass
class SearchResult:
    """``best``: the largest size that fit (0 if none did); ``probes``: (size, bytes or None, fits) in order."""

    budget_bytes: int
    best: int = 0
    best_bytes: int | None = None
    capped: bool = False
    probes: list[tuple[int, int | None, bool]] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {
            "budget_bytes": self.budget_bytes,
            "best": self.best,
            "best_bytes": self.best_bytes,
            "capped": self.capped,
            "probes": [list(p) for p in self.probes],
        }


def search_max(probe: Callable[[int], int | None], start: int, budget: int, step: int = 1, upper: int = 1 << 20,
               planned: int | None = None) -> SearchResult:
    """Largest multiple of ``step`` in ``[step, upper]`` whose ``probe`` stays within ``budget``.

    ``probe(size)`` returns the bytes a step at ``size`` used, or None when it did not run (out of
    memory). Memory must grow with size: the search doubles from ``start`` until a size does not fit
    (or ``upper`` is reached, reported as ``capped``), then bisects; about 2·log2(answer/step) probes.
    ``planned``: the planner's answer (``paca plan``'s trace); when probes at it and one step above
    confirm it, that is the whole search (two probes), else the search starts from it.
    """
    if step < 1 or upper < step:
        raise PacaConfigError(f"search step {step} and upper bound {upper} must satisfy 1 <= step <= upper.")
    upper = (upper // step) * step  # every probed size is a multiple of step
    result = SearchResult(budget)

    def fits(size: int) -> bool:
        used = probe(size)
        ok = used is not None and used <= budget
        result.probes.append((size, used, ok))
        if ok and size > result.best:
            result.best, result.best_bytes = size, used
        return ok

    if planned is not None and planned >= step:
        planned = min((planned // step) * step, upper)
        if fits(planned):
            if planned >= upper:
                result.capped = True
                return result
            if not fits(planned + step):
                return result
        start = planned
    size = min(max(step, (start // step) * step), upper)
    if any(p[0] == size for p in result.probes):
        ok = next(p[2] for p in result.probes if p[0] == size)
    else:
        ok = fits(size)
    if ok:
        low, high = size, None
        while high is None:
            if low >= upper:
                result.capped = True
                return result
            candidate = min(low * 2, upper)
            if fits(candidate):
                low = candidate
            else:
                high = candidate
    else:
        low, high = 0, size
        while low == 0 and high > step:
            candidate = max(step, (high // 2 // step) * step)
            if fits(candidate):
                low = candidate
            else:
                high = candidate
        if low == 0:
            return result  # not even one step's worth fits
    while high - low > step:
        middle = low + ((high - low) // 2 // step) * step
        if fits(middle):
            low = middle
        else:
            high = middle
    return result
