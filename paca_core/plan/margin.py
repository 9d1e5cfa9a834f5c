"""The share of the memory limit a fit decision keeps free for what tracing cannot see.

Estimates stay unpadded (``bytes``, ``device_total``); only the decisions built on them (``fits``, the searched
``max_seq_len`` / ``max_batch_size``, ``paca train --seq-len/--batch-size auto`` and ``--plan-check``) compare the
device total with ``limit x (1 - margin)``. Why a margin at all: kernels' scratch taken outside ATen, the software
stack a published run used (an older transformers' loss copies, other model code) and allocator behaviour the replay
does not model all add bytes no trace shows, and the published rows show how much (docs/plan-published.md).

The margin is sized per *regime* from evidence: the worst optimism still measured on the published rows of that
regime (the share of the limit the plan left free where the real run had none), written to ``margins.json`` by
``scripts/plan_vs_published.py --update-doc``. A regime without a compared row takes the largest measured margin
(nothing says it is safer). On a device whose memory is host memory (CPU) the traced bytes are exact
(docs/plan.md, "Proof on this CPU"), so no margin is kept there. ``--margin`` overrides all of this.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from ..errors import PacaConfigError

logger = logging.getLogger(__name__)

MARGINS_FILE = Path(__file__).with_name("margins.json")

#: Regime names, as margins.json and the tables say them.
FOUR_BIT = "4-bit base"
SHARDED = "sharded (FSDP / ZeRO)"
CHECKPOINTED = "16-bit, gradient checkpointing"
PLAIN = "16-bit, no checkpointing"
REGIMES = (FOUR_BIT, SHARDED, CHECKPOINTED, PLAIN)


@dataclass(frozen=True)
class Margin:
    """A margin and why: ``fraction`` of the limit kept free, the ``regime`` it was sized for, and its ``source``."""

    fraction: float
    regime: str
    source: str

    def apply(self, limit: int) -> int:
        """The bytes a device total may reach under ``limit`` with this margin."""
        return int(limit * (1.0 - self.fraction))

    def phrase(self) -> str:
        """How a decision says it: "a 12% margin for untraced overhead (4-bit base: ...)"."""
        return f"a {self.fraction:.0%} margin for untraced overhead ({self.regime}: {self.source})"

    def as_dict(self) -> dict:
        return {"fraction": self.fraction, "regime": self.regime, "source": self.source}


def regime(four_bit: bool, gradient_checkpointing: bool, sharded: bool) -> str:
    """The published-row regime a plan falls in: a 4-bit base first (its unseen bytes are bitsandbytes' and the
    recipe's), then sharding, then whether checkpointing keeps activations small."""
    if four_bit:
        return FOUR_BIT
    if sharded:
        return SHARDED
    return CHECKPOINTED if gradient_checkpointing else PLAIN


def parse_margin(text: str | float | None) -> float | None:
    """``--margin``: ``12%``, ``0.12`` or ``12`` (read as percent when above 1); None when not given."""
    if text is None:
        return None
    raw = str(text).strip()
    try:
        value = float(raw.rstrip("%"))
    except ValueError:
        raise PacaConfigError(f"--margin {text!r}: give a share of the memory limit, e.g. 12% or 0.12") from None
    if raw.endswith("%") or value > 1:
        value /= 100.0
    if not 0 <= value < 1:
        raise PacaConfigError(f"--margin {text!r}: must be at least 0 and below 100%")
    return value


def load_margins(path: Path = MARGINS_FILE) -> dict:
    """margins.json: ``{"regimes": {name: {"fraction", "row", "reason"}}, ...}`` (empty when the file is missing)."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        logger.warning("No %s: fit decisions keep no margin for untraced overhead (run scripts/plan_vs_published.py "
                       "--update-doc to size it).", path)
        return {"regimes": {}}


def margin_for(regime_name: str, override: float | None = None, host_memory: bool = False,
               margins: dict | None = None) -> Margin:
    """The margin a fit decision in ``regime_name`` keeps: ``override`` (``--margin``) when given; none where device
    memory is host memory (the CPU plan is exact); else the regime's measured margin, or the largest measured one
    when the regime has no compared row."""
    if override is not None:
        return Margin(override, regime_name, "--margin")
    if host_memory:
        return Margin(0.0, "host memory", "the traced bytes are exact on CPU")
    regimes = (margins if margins is not None else load_margins()).get("regimes", {})
    entry = regimes.get(regime_name)
    if entry is not None:
        return Margin(float(entry["fraction"]), regime_name, entry["reason"])
    if not regimes:
        return Margin(0.0, regime_name, "no published rows measured")
    name, worst = max(regimes.items(), key=lambda item: item[1]["fraction"])
    return Margin(float(worst["fraction"]), regime_name, f"no published row of this regime; the largest measured margin ({name})")


__all__ = ["CHECKPOINTED", "FOUR_BIT", "MARGINS_FILE", "Margin", "PLAIN", "REGIMES", "SHARDED", "load_margins",
           "margin_for", "parse_margin", "regime"]
