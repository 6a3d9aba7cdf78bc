"""What the picture-writing operators share: how a map is drawn."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from beamops.io.files import atomic_write
from beamops.provenance import PROVENANCE_KEY, Provenance


def draw_map(ax: Any, data: np.ndarray, colormap: str) -> Any:
    """``data`` on ``ax`` (row down, column across), its NaN cells (no data) hatched grey.

    matplotlib leaves NaN cells transparent, so they showed the white figure behind: the top of
    a grey scale, easy to read as the brightest data.
    """
    ax.set_facecolor("lightgrey")
    ax.patch.set_hatch("xx")
    ax.patch.set_edgecolor("dimgrey")
    return ax.imshow(data, cmap=colormap, interpolation="nearest")


def colour_bar(fig: Any, image: Any, ax: Any, data: np.ndarray, label: str | None) -> None:
    """A colour bar for ``image`` (drawn from ``data`` by :func:`draw_map`); for data without a single value,
    "no data" written across ``ax`` instead (matplotlib would scale the bar to a meaningless -0.1..0.1)."""
    if data.size and blank_cells(data) == data.size:
        ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", va="center", backgroundcolor="white")
        return
    # Beside the image and as tall as it: a bar that takes its height from the axes' slot stands twice as
    # tall as a scan twice as wide as high.
    fig.colorbar(image, cax=ax.inset_axes((1.04, 0.0, 0.05, 1.0)), label=label)


def figure_height(shape: tuple[int, int], square: float) -> float:
    """Inches: ``square`` for a square map, less for a wide one and more for a tall one (up to twice), so a
    map fills its figure's width or height instead of floating in white."""
    rows, cols = shape
    titles = 0.9  # the title, the axis labels and the ticks
    return min(max((square - titles) * rows / cols, 1.5) + titles, 2 * square)


def blank_cells(data: np.ndarray) -> int:
    """How many cells of ``data`` are NaN (drawn hatched by :func:`draw_map`)."""
    return int(np.count_nonzero(np.isnan(data)))


def output_state(final: bool, complete: bool) -> str:
    """A scan's output as a picture's title names it: progressive, final, or final but incomplete."""
    if not final:
        return "progressive"
    return "final" if complete else "final, INCOMPLETE"


def save_png(fig: Any, path: Path, provenance: Provenance | None) -> None:
    """``fig`` as a PNG at ``path`` (written whole or not at all), ``provenance`` in its ``beamops-provenance``
    text chunk (JSON, ASCII)."""
    metadata = {PROVENANCE_KEY: provenance.to_json()} if provenance is not None else {}
    atomic_write(path, lambda fh: fig.savefig(fh, format="png", dpi=100, metadata=metadata))
