"""What the picture-writing operators share: how a map is drawn."""

from __future__ import annotations

from typing import Any

import numpy as np


def draw_map(ax: Any, data: np.ndarray, colormap: str) -> Any:
    """``data`` on ``ax`` (row down, column across), its NaN cells (no data) hatched grey.

    matplotlib leaves NaN cells transparent, so they showed the white figure behind: the top of
    a grey scale, easy to read as the brightest data.
    """
    ax.set_facecolor("lightgrey")
    ax.patch.set_hatch("xx")
    ax.patch.set_edgecolor("dimgrey")
    return ax.imshow(data, cmap=colormap, interpolation="nearest")


def blank_cells(data: np.ndarray) -> int:
    """How many cells of ``data`` are NaN (drawn hatched by :func:`draw_map`)."""
    return int(np.count_nonzero(np.isnan(data)))


def output_state(final: bool, complete: bool) -> str:
    """A scan's output as a picture's title names it: progressive, final, or final but incomplete."""
    if not final:
        return "progressive"
    return "final" if complete else "final, INCOMPLETE"
