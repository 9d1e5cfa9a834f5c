"""matplotlib set up once for the bench's and the planner's PNG reports (files only, no display)."""
from __future__ import annotations

import math
from typing import Any


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend (imported here, when a plot is drawn: matplotlib is an extra)."""
    import matplotlib

    matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt

    return plt


def subplot_grid(plt: Any, count: int, height_per_row: float) -> tuple[Any, list]:
    """A figure with ``count`` panels, at most three per row (unused cells hidden), and the panels in order."""
    cols = min(3, count)
    rows = math.ceil(count / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6.2 * cols, height_per_row * rows), squeeze=False)
    for ax in axes.flat[count:]:
        ax.set_visible(False)
    return fig, list(axes.flat)
