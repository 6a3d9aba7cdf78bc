"""write_image: Image -> a PNG with a colour map and a colour bar (and an .npy of the data).

Final images go to ``<name>_scan_<NNNNNN>.png``. With ``live_preview`` each
progressive image overwrites ``<name>_scan_<NNNNNN>_latest.png``, at most once
every ``max_preview_interval_s`` seconds per image and scan in each worker,
so a viewer can follow a scan without the writer slowing the stream. Files
are written under a temporary name and renamed: a reader never sees half a file.
The PNG's ``beamops-provenance`` text chunk holds the operators and parameters
that made the image (JSON, see ``beamops.provenance``).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
from pydantic import Field

from beamops import Image, OperatorParams, operator
from beamops.io.files import PreviewThrottle, atomic_write, output_dir
from beamops.provenance import Provenance
from beamops.spec import Mount, OutputFiles
from transforms._pictures import blank_cells, colour_bar, draw_map, figure_height, output_state, save_png

_previews = PreviewThrottle()


class WriteImageParams(OperatorParams):
    out_dir: Annotated[
        Mount, OutputFiles("<image name>_scan_<N>.png and .npy", glob="*_scan_*[0-9].png", named_by_image=True)
    ] = Field("out", title="Output directory", description="Directory for the PNG and .npy files.")
    colormap: Literal["viridis", "plasma", "inferno", "magma", "cividis", "gray", "twilight"] = Field(
        "viridis", description="Matplotlib colour map."
    )
    live_preview: bool = Field(False, description="Overwrite <name>_scan_<N>_latest.png with progressive images.")
    max_preview_interval_s: float = Field(
        2.0, ge=0, description="Least time between two previews of the same image and scan (s)."
    )


def axis_labels(image: Image) -> tuple[str, str]:
    """(x label, y label) of the image: scan or detector columns and rows, told apart by the image's shape."""
    shape = image.data.shape
    scan, detector = shape == image.header.scan_shape, shape == image.header.frame_shape
    # A scan as large as the frames leaves it open which one the image spans.
    space = "scan " if scan and not detector else "detector " if detector and not scan else ""
    return f"{space}column", f"{space}row"


def image_png_title(image: Image) -> str:
    """The PNG's title: scan number, image name, state, frames seen, and how many cells had no frame."""
    blank = blank_cells(image.data)
    hatched = f"; {blank} without frames, hatched" if blank else ""
    state = output_state(image.final, image.complete)
    return f"Scan {image.scan_number}: {image.name} ({state}, {image.frames_seen} frames{hatched})"


def render_png(image: Image, path: Path, colormap: str, provenance: Provenance | None = None) -> None:
    """The image (row down, column across, axes named by :func:`axis_labels`) with a colour bar; scan
    number, name and state in the title; ``provenance`` in a text chunk."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, figure_height(image.data.shape[-2:], 5.0)), constrained_layout=True)
    shown = draw_map(ax, image.data, colormap)
    xlabel, ylabel = axis_labels(image)
    ax.set(xlabel=xlabel, ylabel=ylabel)
    colour_bar(fig, shown, ax, image.data, image.units or None)
    ax.set_title(image_png_title(image))
    save_png(fig, path, provenance)
    plt.close(fig)


@operator(
    output_name="path",
    title="Write images",
    input_description="2-D results",
    output_description="Paths of the files written",
)
def write_image(image: Image, params: WriteImageParams, *, provenance: Provenance) -> Iterator[str] | None:
    """Write final images (and, if asked, rate-limited live previews) as PNG with a colour bar, plus .npy;
    the PNG holds the operators and parameters that made the image."""
    if not image.final:
        if not params.live_preview:
            return None
        if not _previews.due((params.out_dir, image.name, image.scan_number), params.max_preview_interval_s):
            return None
    out = output_dir(params.out_dir)
    stem = f"{image.name}_scan_{image.scan_number:06d}" + ("" if image.final else "_latest")
    png = out / f"{stem}.png"
    render_png(image, png, params.colormap, provenance)
    npy = out / f"{stem}.npy"
    atomic_write(npy, lambda fh: np.save(fh, image.data))
    return iter([str(png), str(npy)])
