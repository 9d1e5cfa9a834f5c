"""Choosing a default learning rate that holds on data we did not tune on.

A default tuned on one data set can be far from best on another. The rule here picks, for one
method (at one rank), the learning rate whose *worst* data set keeps the largest share of that data
set's best result::

    share(lr, d) = improvement(lr, d) / max over lr' of improvement(lr', d)
    chosen lr    = argmax over lr of  min over d of share(lr, d)

where improvement = held-out loss of the frozen model − held-out loss after fine-tuning. The worst
case, not the average, because a user on an unseen data set cares about not falling off a cliff;
an average lets one data set where a learning rate shines hide another where it fails.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

#: Improvement of a run that diverged (non-finite loss): worse than any finite result.
DIVERGED = float("-inf")


class LrRuleError(ValueError):
    """The table cannot support a choice (no common learning rate, or nothing improved on a data set)."""


@dataclass(frozen=True)
class LrChoice:
    """The chosen learning rate and why: its worst share and every share it was compared on."""

    lr: float
    worst_share: float
    worst_dataset: str
    #: share[dataset][lr] for every lr run on every data set.
    shares: dict[str, dict[float, float]]
    #: The best lr of each data set on its own.
    best_lr: dict[str, float]

    def worst_shares(self) -> dict[float, float]:
        """min over data sets of the share, for each candidate lr."""
        lrs = next(iter(self.shares.values())).keys()
        return {lr: min(s[lr] for s in self.shares.values()) for lr in lrs}


def shares(improvements: dict[str, dict[float, float]]) -> dict[str, dict[float, float]]:
    """share[d][lr] = improvement[d][lr] / best improvement on d, for the lrs run on every data set
    (the candidates); the best is taken over every lr run on d."""
    if not improvements:
        raise LrRuleError("no results to choose from")
    common = set.intersection(*(set(by_lr) for by_lr in improvements.values()))
    if not common:
        raise LrRuleError(f"no learning rate was run on every data set ({sorted(improvements)})")
    out: dict[str, dict[float, float]] = {}
    for dataset, by_lr in improvements.items():
        best = max(by_lr.values())  # over every lr run on this data set (edge extensions included)
        if not best > 0:
            raise LrRuleError(f"no learning rate improved on the frozen model on {dataset!r} (best {best}); shares are undefined")
        out[dataset] = {lr: (by_lr[lr] / best if math.isfinite(by_lr[lr]) else DIVERGED) for lr in sorted(common)}
    return out


def choose_lr(improvements: dict[str, dict[float, float]]) -> LrChoice:
    """The lr maximising the worst data set's share. Ties (equal worst share) go to the higher mean
    share, then to the smaller lr (the safer side of a cliff)."""
    table = shares(improvements)
    lrs = sorted(next(iter(table.values())))

    def score(lr: float) -> tuple[float, float, float]:
        values = [table[d][lr] for d in table]
        return (min(values), sum(values) / len(values), -lr)

    lr = max(lrs, key=score)
    worst_dataset = min(table, key=lambda d: table[d][lr])
    # Over every lr run on the data set (edge extensions included), like the shares' denominators.
    best_lr = {d: max(by_lr, key=lambda x: by_lr[x] if math.isfinite(by_lr[x]) else -math.inf) for d, by_lr in improvements.items()}
    return LrChoice(lr, table[worst_dataset][lr], worst_dataset, table, best_lr)


def average_best_lr(improvements: dict[str, dict[float, float]]) -> float:
    """The lr with the best mean improvement (what the rule does *not* use; reported for contrast)."""
    common = sorted(set.intersection(*(set(v) for v in improvements.values())))
    return max(common, key=lambda lr: sum(improvements[d][lr] for d in improvements))
