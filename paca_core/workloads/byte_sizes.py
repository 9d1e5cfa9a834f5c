"""Memory sizes as people write them (``8GiB``, ``512MB``, ``1e9``), for every ``--memory-budget``."""
from __future__ import annotations

import re

from ..errors import PacaConfigError

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str) -> int:
    """``"8GiB"``, ``"512MB"``, ``"1e9"`` → bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
    if not match or match.group(2).lower() not in _UNITS:
        raise PacaConfigError(f"Memory size {text!r} is not understood; write e.g. 8GiB, 512MiB, 16GB or a number of bytes.")
    value = float(match.group(1)) * _UNITS[match.group(2).lower()]
    if value <= 0:
        raise PacaConfigError(f"Memory size {text!r} must be positive.")
    return int(value)
