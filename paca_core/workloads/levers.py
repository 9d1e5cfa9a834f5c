"""Memory levers an entry adds after ``@`` (``paca@gc+offload``): their names and how they are written.

HF gradient checkpointing (``gc``), the LM head + loss in chunks (``chunked-loss``: our chunked loss;
for the peers, the same pure-torch "fused linear cross entropy" around their model) and activation
offload of the decoder layers (``offload``); :func:`~.prepare.apply_levers` adds them to a prepared
entry. Torch-free, so argument parsers can list them cheaply.
"""
from __future__ import annotations

from ..errors import PacaConfigError

#: Every lever, in the order an entry's name carries them.
LEVERS = ("gc", "chunked-loss", "offload")
#: ``@all``: every lever.
ALL_LEVERS = "all"


def parse_levers(text: str) -> tuple[str, ...]:
    """``gc+offload`` → ``("gc", "offload")`` in ``LEVERS`` order; ``all`` → every lever."""
    names = [t.strip() for t in text.lower().split("+") if t.strip()]
    if names == [ALL_LEVERS]:
        return LEVERS
    unknown = [n for n in names if n not in LEVERS]
    if unknown or not names or len(set(names)) != len(names):
        raise PacaConfigError(f"levers {text!r}: write one or more of {', '.join(LEVERS)} joined by '+', or '{ALL_LEVERS}' "
                              "(e.g. paca@gc+offload).")
    return tuple(lever for lever in LEVERS if lever in names)
