"""virtual_images: bright-field and annular dark-field images from sparse frames.

SparseFrameBatch -> Image, one keyed state per scan number, emitting like
com_reduce (progressive images every ``emit_every`` frames, a final image per
annulus when the scan is complete, a timeout flush in event time, late frames
to dead letters).

Annuli
    ``annuli`` is a string of ``inner:outer`` radius pairs in px, comma
    separated (``"0:40,60:200"``), because interactEM parameters are scalars.
    An event at distance ``r`` from the centre counts in an annulus when
    ``inner <= r < outer``, tested as ``inner² <= d² < outer²`` with
    ``d² = (col - center_x)² + (row - center_y)²`` in float64. That is exactly
    stempy's ``create_stem_images`` (checked against stempy 3.6.0: it builds a
    per-pixel mask with ``d >= inner² && d < outer²`` on double distances from a
    float centre, so a pixel at exactly ``inner`` is in, one at exactly
    ``outer`` is out). ``0:R`` is a disc: the bright-field image. stempy takes
    integer radii only; beamops also takes fractional ones.

    Each image holds the number of events of a scan position in the annulus,
    all of the position's frames together, in ``units="counts"``. stempy
    returns 65535 per event (its mask value is 0xFFFF); divide its images by
    65535 to compare.

Axes
    beamops: x = column, y = row. ``center_x`` is a detector column and
    ``center_y`` a row. stempy's ``create_stem_images(center=(x, y))`` also means
    (column, row) (unlike ``com_sparse``'s ``init_center``, which is
    (row, column)); its ``SparseArray`` path however passes ``frame_shape``
    (rows, cols) where its C++ expects (width, height), so it only agrees for
    square frames; its ndarray path with ``frame_dimensions=(cols, rows)`` agrees
    for any frame.

Centre
    Given ``center_x``/``center_y``, every event is binned as it arrives.
    Unset, the centre is the centre of mass of the summed diffraction pattern
    of the scan's frames numbered below ``center_frames`` (by frame number, not
    arrival order, so the same data gives the same images live and offline,
    from any number of partitions): the mean column and the mean row of all
    their events, unrounded. It is fixed once all of them have arrived. If they
    hold no event at all, the frames below twice as many are used, and so on.
    Radii cannot be binned before the centre is known, so until then the events
    of the frames received are kept in state (pixel index, per-frame offsets,
    positions and numbers: about ``center_frames`` frames plus what arrives
    before the last of them) and replayed once the centre is fixed; from then
    on the state is O(annuli x scan positions). A scan that ends (complete or
    timed out) first takes its centre from those of them that came, else from
    all its frames. The centre is fixed once per scan: it does not move as more
    frames arrive, so progressive and final images are consistent.

Emission, completion, late frames and redeliveries are
:mod:`beamops.scan_reduce`'s, as for com_reduce: a scan is
complete when ``total_frames`` frames were seen (when the header has it), else
when every position was seen; a scan without frames for ``timeout_s`` seconds
of event time is flushed as final and incomplete; frames arriving within
``finished_retention_s`` after the final images are dead letters; with
``total_frames`` a redelivered frame is counted once. A position that has had
no frame yet is NaN in a progressive or incomplete image (no data), while a
position whose frames hold no event in the annulus is 0. No progressive image
is emitted before the centre is known.
"""

from __future__ import annotations

import functools
import logging
import math
import re
from dataclasses import dataclass, field

import numpy as np
from numba import njit
from pydantic import Field, ValidationInfo, field_validator, model_validator

from beamops import FrameHeader, Image, OperatorParams, Port, SparseFrameBatch
from beamops.scan_reduce import ScanProgress, ScanReduceFn, ScanReduceOperator, ScanReduceParams, zeroed

log = logging.getLogger(__name__)

UNITS = "counts"
_NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]*$")
_ANNULI_EXAMPLE = "e.g. '0:40,60:200'"


# --- parameters -------------------------------------------------------------------------


@functools.lru_cache(maxsize=256)
def parse_annuli(text: str) -> tuple[tuple[float, float], ...]:
    """``"0:40,60:200"`` -> ``((0.0, 40.0), (60.0, 200.0))``; ValueError with the reason otherwise."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"annuli must be comma-separated 'inner:outer' radii in px, {_ANNULI_EXAMPLE}; got nothing")
    annuli = []
    for i, part in enumerate(text.split(","), start=1):
        spec = part.strip()
        where = f"annulus {i} ({spec!r})"
        pieces = spec.split(":")
        if len(pieces) != 2:
            raise ValueError(f"{where}: expected 'inner:outer' radii in px, {_ANNULI_EXAMPLE}")
        try:
            inner, outer = (float(p) for p in pieces)
        except ValueError:
            raise ValueError(f"{where}: radii must be numbers, {_ANNULI_EXAMPLE}") from None
        if not (math.isfinite(inner) and math.isfinite(outer)):
            raise ValueError(f"{where}: radii must be finite")
        if inner < 0:
            raise ValueError(f"{where}: inner radius must be >= 0")
        if outer <= inner:
            raise ValueError(f"{where}: outer radius must be greater than inner radius (inner <= r < outer)")
        annuli.append((inner, outer))
    return tuple(annuli)


def default_names(annuli: tuple[tuple[float, float], ...]) -> tuple[str, ...]:
    """Discs (inner 0) are ``bf`` (``bf1``, ``bf2``... if several), annuli ``adf1``, ``adf2``..."""
    discs = sum(1 for inner, _ in annuli if inner == 0)
    names, n_bf, n_adf = [], 0, 0
    for inner, _ in annuli:
        if inner == 0:
            n_bf += 1
            names.append("bf" if discs == 1 else f"bf{n_bf}")
        else:
            n_adf += 1
            names.append(f"adf{n_adf}")
    return tuple(names)


class _AnnulusParams(OperatorParams):
    """virtual_images' own parameters (VirtualImagesParams adds the per-scan ones after them)."""

    annuli: str = Field(
        "0:40,60:200",
        title="Annuli (inner:outer px)",
        description=(
            "Comma-separated inner:outer radii in px, e.g. '0:40,60:200'; one image per annulus. An event at "
            "distance r from the centre counts when inner <= r < outer (stempy create_stem_images). "
            "0:R is bright field."
        ),
    )
    names: str | None = Field(
        None,
        title="Image names",
        description=(
            "Comma-separated names, one per annulus. Unset: bf for a disc (inner 0; bf1, bf2... if several), "
            "adf1, adf2... for the others."
        ),
    )
    center_x: float | None = Field(
        None,
        title="Center X (column)",
        description=(
            "Annulus centre, detector column in px (beamops x = column; stempy create_stem_images center[0]). "
            "Unset: the centre of mass of the summed pattern of the scan's frames numbered below center_frames."
        ),
    )
    center_y: float | None = Field(
        None,
        title="Center Y (row)",
        description="Annulus centre, detector row in px (beamops y = row). Set together with center_x.",
    )
    center_frames: int = Field(
        1000,
        ge=1,
        title="Centering frames",
        description=(
            "Without center_x/_y: the frames numbered below this define the centre (by frame number, not "
            "arrival order); the frames that come before the centre is fixed are kept in state and replayed."
        ),
    )

    @field_validator("annuli")
    @classmethod
    def _valid_annuli(cls, value: str) -> str:
        parse_annuli(value)
        return value

    @field_validator("names")
    @classmethod
    def _valid_names(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None or not value.strip():
            return None
        names = [n.strip() for n in value.split(",")]
        bad = [n for n in names if not _NAME_RE.match(n)]
        if bad:
            raise ValueError(f"names must start with a letter and hold letters, digits, '_', '.', '-'; bad: {bad}")
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"duplicate names {dupes}")
        annuli = info.data.get("annuli")
        if annuli is not None and len(names) != len(parse_annuli(annuli)):
            raise ValueError(f"{len(names)} names for {len(parse_annuli(annuli))} annuli ({annuli!r})")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> _AnnulusParams:
        if (self.center_x is None) != (self.center_y is None):
            raise ValueError("set both center_x and center_y, or neither")
        return self

    @property
    def radii(self) -> tuple[tuple[float, float], ...]:
        """The annuli as (inner, outer) px."""
        return parse_annuli(self.annuli)

    @property
    def image_names(self) -> tuple[str, ...]:
        if self.names is None:
            return default_names(self.radii)
        return tuple(n.strip() for n in self.names.split(","))

    @property
    def center(self) -> tuple[float, float] | None:
        """The given centre (x = column, y = row), or None: from the summed pattern."""
        return None if self.center_x is None else (float(self.center_x), float(self.center_y))


class VirtualImagesParams(ScanReduceParams, _AnnulusParams):
    # Bases in this order so that the spec lists the annulus parameters first
    # (pydantic orders fields from the last base to the class itself).
    progressive_output = "progressive images"
    final_output = "images"
    frames_verb = "counted"


# --- kernels ----------------------------------------------------------------------------


@njit(cache=True, nogil=True)
def _register_frames(positions: np.ndarray, fresh: np.ndarray, frames_per_position: np.ndarray) -> int:
    """Count each ``fresh`` frame at its position; return newly seen positions."""
    new_positions = 0
    for i in range(len(positions)):
        if fresh[i]:
            p = positions[i]
            new_positions += frames_per_position[p] == 0
            frames_per_position[p] += 1
    return new_positions


@njit(cache=True, nogil=True)
def annulus_counts(
    events: np.ndarray,
    offsets: np.ndarray,
    positions: np.ndarray,
    cols: int,
    cx: float,
    cy: float,
    inner2: np.ndarray,
    outer2: np.ndarray,
    counts: np.ndarray,
) -> None:
    """Add each frame's events with ``inner2[a] <= d² < outer2[a]`` to ``counts[a, position]``.

    ``events`` are flat pixel indices ``row * cols + col`` in CSR form with
    ``offsets[0] == 0``, and ``d² = (col - cx)² + (row - cy)²`` in float64, as
    stempy computes it. The
    distances are computed once per event (a vectorised pass), then each
    annulus counts a frame's events with a branchless test and adds the sum to
    its position, so several frames of one position add up.
    """
    n_annuli = len(inner2)
    inv_cols = 1.0 / cols
    d2 = np.empty(offsets[len(positions)], np.float64)  # offsets[0] is 0
    for k in range(len(d2)):
        e = np.float64(events[k])
        # (e + 0.5) / cols is at least 0.5 / cols away from an integer, far more than
        # float64 rounding: this is e // cols without an integer division (as com_partial).
        row = np.floor((e + 0.5) * inv_cols)
        dx = (e - row * cols) - cx
        dy = row - cy
        d2[k] = dx * dx + dy * dy
    for i in range(len(positions)):
        start, stop = offsets[i], offsets[i + 1]
        p = positions[i]
        for a in range(n_annuli):
            lo, hi = inner2[a], outer2[a]
            s = 0
            for k in range(start, stop):
                s += np.int64((d2[k] >= lo) & (d2[k] < hi))
            counts[a, p] += s


# --- per-scan state ------------------------------------------------------------------------


@dataclass
class _Chunk:
    """Frames kept while the centre is unknown (CSR)."""

    events: np.ndarray
    offsets: np.ndarray
    positions: np.ndarray
    numbers: np.ndarray


@dataclass
class VirtualImageAccumulator(ScanProgress):
    """Per-annulus event counts per scan position of one scan, and how its centre is found."""

    names: tuple[str, ...]
    inner2: np.ndarray
    outer2: np.ndarray
    counts: np.ndarray  # (annuli, positions) int64
    frames_per_position: np.ndarray
    center: tuple[float, float] | None
    center_frames: int
    # while the centre is unknown: integer sums over the frames numbered below center_frames (which
    # doubles while they hold no event), how many of them came, and every frame received
    center_frames_used: int = 0
    center_events: int = 0
    center_sum_col: int = 0
    center_sum_row: int = 0
    pending: list[_Chunk] = field(default_factory=list)

    @classmethod
    def empty(cls, header: FrameHeader, params: VirtualImagesParams) -> VirtualImageAccumulator:
        radii = np.asarray(params.radii, np.float64)
        p = header.n_positions
        return cls(
            header,
            params.image_names,
            radii[:, 0] ** 2,
            radii[:, 1] ** 2,
            zeroed((len(radii), p), np.int64),
            zeroed(p, np.uint32),
            params.center,
            params.center_frames,
            next_emit=params.emit_every,
        )

    @property
    def pending_events(self) -> int:
        return sum(len(c.events) for c in self.pending)

    def add(self, batch: SparseFrameBatch) -> int:
        """Count ``batch``'s events; return how many of its frames were redeliveries (skipped).

        Raises ValueError, before touching any count, for a batch that does not
        belong to this scan's shape or holds out-of-range positions, frame
        numbers, events or offsets.
        """
        self.check_sparse_batch(batch)
        n = batch.n_frames
        accepted, duplicates = self.fresh_in_range(batch.header, batch.scan_positions, batch.frame_numbers)
        new_positions = _register_frames(batch.scan_positions, accepted, self.frames_per_position)
        self.count(n, new_positions, duplicates)
        events, offsets, positions = batch.events, np.asarray(batch.offsets, np.int64), batch.scan_positions
        numbers = batch.frame_numbers
        if duplicates:
            events, offsets, positions, numbers = _select_frames(events, offsets, positions, numbers, accepted)
        if self.center is not None:
            self._count(events, offsets, positions)
        else:
            self._centering(
                _Chunk(np.array(events, np.uint32), np.array(offsets, np.int64), np.array(positions), np.array(numbers))
            )
        return duplicates

    def _count(self, events: np.ndarray, offsets: np.ndarray, positions: np.ndarray) -> None:
        cx, cy = self.center
        annulus_counts(
            events, offsets, positions, self.header.frame_shape[1], cx, cy, self.inner2, self.outer2, self.counts
        )

    def _centering(self, chunk: _Chunk) -> None:
        """Sum the events of the frames that define the centre; keep all frames until it is fixed."""
        self.pending.append(chunk)
        self._add_center_frames(chunk, 0, self.center_frames)
        total = self.header.total_frames
        while self.center_frames_used >= min(self.center_frames, total or self.center_frames):
            if self.center_events > 0:
                self.fix_center()
                return
            if total is not None and self.center_frames >= total:
                return  # no event in the whole scan: no centre, the images stay NaN/0
            # no event in those frames: the frames below twice as many define it
            low, self.center_frames = self.center_frames, 2 * self.center_frames
            for kept in self.pending:
                self._add_center_frames(kept, low, self.center_frames)

    def _add_center_frames(self, chunk: _Chunk, low: int, high: int) -> None:
        """Add the events of the frames of ``chunk`` numbered in [low, high) to the centering sums."""
        chosen = (chunk.numbers >= low) & (chunk.numbers < high)
        if not chosen.any():
            return
        frame_events = chunk.events[chunk.offsets[0] : chunk.offsets[-1]]
        self._add_center_events(frame_events[np.repeat(chosen, np.diff(chunk.offsets))])
        self.center_frames_used += int(chosen.sum())

    def _add_center_events(self, events: np.ndarray) -> None:
        rows, cols = np.divmod(events.astype(np.int64), self.header.frame_shape[1])
        self.center_events += len(events)
        self.center_sum_col += int(cols.sum())
        self.center_sum_row += int(rows.sum())

    def fix_center(self) -> None:
        """Fix the centre from the centering sums, else (the scan ended first, with no event in the
        frames that came of them) from every frame received; then replay the kept frames."""
        if self.center is not None:
            return
        if self.center_events == 0:
            for kept in self.pending:
                self._add_center_events(kept.events[kept.offsets[0] : kept.offsets[-1]])
            self.center_frames_used = sum(len(kept.numbers) for kept in self.pending)
            if self.center_events == 0:
                return
        self.center = (self.center_sum_col / self.center_events, self.center_sum_row / self.center_events)
        log.info(
            "scan %d: centre (x=%.4f, y=%.4f) px from %d frames, %d events",
            self.header.scan_number, *self.center, self.center_frames_used, self.center_events,
        )  # fmt: skip
        pending, self.pending = self.pending, []
        for chunk in pending:
            self._count(chunk.events, chunk.offsets, chunk.positions)

    @property
    def progressive_ready(self) -> bool:
        """No progressive image before the centre is known."""
        return self.center is not None

    def images(self, final: bool) -> list[Image]:
        """One Image per annulus: counts per position (NaN where no frame was seen)."""
        if final:
            self.fix_center()
        unseen = self.frames_per_position == 0
        out = []
        for name, counts in zip(self.names, self.counts, strict=True):
            data = counts.astype(np.float32)
            data[unseen] = np.nan
            out.append(
                Image(
                    self.header,
                    name,
                    data.reshape(self.header.scan_shape),
                    units=UNITS,
                    frames_seen=self.frames_seen,
                    final=final,
                    complete=self.complete,
                )
            )
        return out


def _select_frames(
    events: np.ndarray, offsets: np.ndarray, positions: np.ndarray, numbers: np.ndarray, keep: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The CSR, positions and frame numbers of the kept frames only."""
    lengths = np.diff(offsets)
    new_offsets = np.zeros(int(keep.sum()) + 1, np.int64)
    np.cumsum(lengths[keep], out=new_offsets[1:])
    return events[offsets[0] :][np.repeat(keep, lengths)], new_offsets, positions[keep], numbers[keep]


# --- the keyed DoFn -------------------------------------------------------------------------


class _VirtualImagesFn(ScanReduceFn):
    progressive_metric = "progressive_images"

    def new_accumulator(self, batch: SparseFrameBatch) -> VirtualImageAccumulator:
        return VirtualImageAccumulator.empty(batch.header, self._params)

    def state_bytes(self, header: FrameHeader) -> int:
        annuli = len(self._params.radii)
        return header.n_positions * (8 * annuli + 4) + 16 * annuli  # counts, frames_per_position; radii squared

    def outputs(self, acc: VirtualImageAccumulator, final: bool) -> list[Image]:
        return acc.images(final=final)


class virtual_images(ScanReduceOperator):  # noqa: N801 - catalog names are lowercase like the decorated operators
    """Bright-field / annular dark-field images per scan from sparse frames, progressive and final."""

    name = "virtual_images"
    title = "Virtual images (BF/ADF)"
    description = (
        "Counts each scan position's events in one or more annuli (inner <= r < outer px, stempy "
        "create_stem_images semantics) around a given centre or the centre of mass of the scan's first "
        "center_frames frames; keyed per scan, one Image per annulus every emit_every frames and when the "
        "scan is complete (or after timeout_s without frames)."
    )
    Params = VirtualImagesParams
    inputs = {"in": Port(SparseFrameBatch, "Sparse (electron-counted) frames")}
    outputs = {"images": Port(Image, "One image per annulus and emission (name = annulus name), counts, scan_shape")}
    Fn = _VirtualImagesFn
    step = "Count"
