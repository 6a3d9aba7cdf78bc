"""write_com_map: ComMap -> files: an ``.npz`` and a PNG picture per scan.

Final maps go to ``scan_<NNNNNN>_com.npz`` / ``.png``. With
``write_progressive`` each progressive map (at most one every
``max_preview_interval_s`` per scan and worker) overwrites
``scan_<NNNNNN>_com_latest.npz`` / ``.png``, a live preview. Files are written
to a temporary name and renamed, so a reader never sees half a file.

The ``.npz`` holds ``com`` (float32, ``[x, y]`` stacked, shape
``(2, scan_rows, scan_cols)``, x = column, the order of stempy's ``com``),
``x``, ``y``, the scan's counters and ``provenance``: JSON of the operators
and parameters that made the map (``beamops.provenance.Provenance.from_json``),
which the PNG also holds, in its ``beamops-provenance`` text chunk. The PNG shows x and y side by side with
colour bars, the scan number in the title, and how many positions are blank (NaN: no
event kept there).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import Field

from beamops import ComMap, operator
from beamops.io.files import PreviewThrottle, atomic_write, output_dir
from beamops.operator import OperatorParams
from beamops.provenance import Provenance, read_provenance
from beamops.spec import Mount, OutputFiles
from transforms._pictures import blank_cells, colour_bar, draw_map, figure_height, output_state, save_png

_previews = PreviewThrottle()


class WriteComMapParams(OperatorParams):
    out_dir: Annotated[Mount, OutputFiles("scan_<N>_com.npz and .png", glob="scan_*_com.npz")] = Field(
        "out", title="Output directory", description="Directory for the .npz and .png files."
    )
    png: bool = Field(True, title="Write PNG", description="Also write a picture of each map.")
    write_progressive: bool = Field(
        False, title="Write progressive maps", description="Overwrite scan_<N>_com_latest.* with each progressive map."
    )
    max_preview_interval_s: float = Field(
        2.0, ge=0, description="Least time between two progressive files of the same scan (s), per worker."
    )
    colormap: Literal["viridis", "plasma", "inferno", "magma", "cividis", "gray", "twilight"] = Field(
        "viridis", description="Matplotlib colour map of the PNG."
    )


# The .npz files of the maps this operator writes, final (scan_<N>_com.npz) and progressive (..._latest).
MAP_FILES = "scan_*_com*.npz"


def map_provenances(folder: Path, newest: int = 16) -> list[Provenance]:
    """The provenance of the ``newest`` maps (by modification time, final or progressive) this operator
    wrote in ``folder``; files without one, or that cannot be read, are skipped."""
    paths = sorted(folder.glob(MAP_FILES), key=_modified, reverse=True)[:newest]
    found = []
    for path in paths:
        with contextlib.suppress(ValueError):  # read_provenance's error for a file without one, or unreadable
            found.append(read_provenance(path))
    return found


def map_counters(path: Path) -> dict[str, Any]:
    """The counters of a map this operator wrote (as :meth:`ComMap.counters`), from its .npz; ValueError for a
    file that is not one."""
    try:
        with np.load(path) as npz:
            counters = {key: npz[key].item() for key in ("frames_seen", "positions_seen", "final", "complete")}
            return {"scan": int(npz["scan_number"]), **counters, "positions": int(npz["x"].size)}
    except (OSError, KeyError, ValueError) as exc:
        raise ValueError(f"{path}: not a COM map written by write_com_map ({exc})") from None


def describe_map(counters: dict[str, Any]) -> str:
    """One line for a map's counters (:func:`map_counters`, :meth:`ComMap.counters`) and ``where`` it is."""
    state = output_state(counters["final"], counters["complete"])
    seen = f"{counters['positions_seen']}/{counters['positions']}"
    return f"scan {counters['scan']}: {state}, {counters['frames_seen']} frames, {seen} positions  {counters['where']}"


def _modified(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:  # removed meanwhile
        return 0.0


def com_png_title(com: ComMap) -> str:
    """The PNG's title: scan number, state, frames and positions seen, and how many positions are blank."""
    state = output_state(com.final, com.complete)
    # A position without kept events is NaN, drawn hatched: the title says how many, so a blank map is explained,
    # those no frame reached (of an incomplete map) apart from those whose frames had no events.
    empty = blank_cells(com.x + com.y)
    without_frames = min(empty, com.header.n_positions - com.positions_seen)
    counts = [(without_frames, "without frames"), (empty - without_frames, "without events")]
    said = ", ".join(f"{n} {what}" for n, what in counts if n)
    blank = f"; {said}, hatched" if said else ""
    return (
        f"Scan {com.scan_number}: center of mass ({state}; {com.frames_seen} frames, "
        f"{com.positions_seen}/{com.header.n_positions} positions{blank})"
    )


def render_com_png(com: ComMap, path: Path, colormap: str = "viridis", provenance: Provenance | None = None) -> None:
    """x and y maps (scan row down, scan column across) side by side with colour bars in detector px,
    under :func:`com_png_title`; ``provenance`` goes into a text chunk."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, figure_height(com.header.scan_shape, 4.6)), constrained_layout=True)
    for ax, data, label in zip(axes, (com.x, com.y), ("x (column)", "y (row)"), strict=True):
        image = draw_map(ax, data, colormap)
        ax.set_title(f"COM {label}")
        ax.set_xlabel("scan column")
        ax.set_ylabel("scan row")
        colour_bar(fig, image, ax, data, "detector px")
    fig.suptitle(com_png_title(com))
    save_png(fig, path, provenance)
    plt.close(fig)


@operator(
    output_name="path",
    title="Write COM map files",
    input_description="Center-of-mass maps",
    output_description="Paths of the files written",
)
def write_com_map(com: ComMap, params: WriteComMapParams, *, provenance: Provenance) -> Iterator[str] | None:
    """Write each final ComMap (and optionally each progressive one) as .npz and PNG files, with the
    operators and parameters that made it."""
    if not com.final:
        if not params.write_progressive:
            return None
        if not _previews.due((params.out_dir, com.scan_number), params.max_preview_interval_s):
            return None
    out = output_dir(params.out_dir)
    stem = f"scan_{com.scan_number:06d}_com" + ("" if com.final else "_latest")
    npz = out / f"{stem}.npz"
    atomic_write(
        npz,
        lambda fh: np.savez(
            fh,
            com=com.stacked(),
            x=com.x,
            y=com.y,
            scan_number=com.scan_number,
            frames_seen=com.frames_seen,
            positions_seen=com.positions_seen,
            final=com.final,
            complete=com.complete,
            provenance=provenance.to_json(),
        ),
    )
    written = [str(npz)]
    if params.png:
        png = out / f"{stem}.png"
        render_com_png(com, png, params.colormap, provenance)
        written.append(str(png))
    return iter(written)
