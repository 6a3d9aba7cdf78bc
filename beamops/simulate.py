"""A simulated 4D-STEM scan with a known center-of-mass shift field.

Each frame is a bright-field disc of radius ``disc_radius`` whose centre is
``center + shift(position)``; its electrons are drawn uniformly in the disc
(Poisson number per frame) and rounded to the nearest pixel, so the expected
COM of a frame is exactly ``center + shift``. The shift field is smooth and
different along x and y, so an axis swap cannot pass a test.

Frames are numbered in acquisition order; frame ``f`` lands on scan position
``f % n_positions``, so with several frames per position a position's frames
fall in different batches. Batch ``i`` depends only on ``(seed, scan_number,
i)``: any worker can make any batch, and reruns give identical events.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from numba import njit

from beamops.frames import DenseFrameBatch, FrameHeader, SparseFrameBatch


@functools.lru_cache(maxsize=16)
def _flat_shift_field(scan_shape: tuple[int, int], amplitude: float) -> tuple[np.ndarray, np.ndarray]:
    """The shift field, flat in scan order; cached because every batch of a scan needs it."""
    rows, cols = scan_shape
    r, c = np.mgrid[0:rows, 0:cols].astype(np.float64)
    sx = amplitude * np.sin(2 * np.pi * c / cols) * (0.5 + 0.5 * r / rows)
    sy = 0.5 * amplitude * np.cos(2 * np.pi * r / rows)
    return sx.reshape(-1), sy.reshape(-1)


@njit(cache=True, nogil=True)
def _disc_events(
    uv: np.ndarray,
    start: int,
    offsets: np.ndarray,
    positions: np.ndarray,
    sx: np.ndarray,
    sy: np.ndarray,
    cx: float,
    cy: float,
    radius: float,
    cols: int,
    events: np.ndarray,
) -> int:
    """Fill ``events[start:]``: frame ``i``'s electrons (``offsets[i]:offsets[i + 1]``) uniform in the
    disc of ``radius`` around (x, y) = (cx + sx[p], cy + sy[p]), p = positions[i], rounded to the
    nearest pixel (flat index row * cols + col). ``uv`` (2, m) are uniform draws in [0, 1); a draw
    outside the unit disc is rejected (no sqrt, cos or sin). Returns how far it got: len(events)
    unless the draws ran out."""
    j, m = 0, uv.shape[1]
    k = start
    i = np.searchsorted(offsets, start, side="right") - 1
    while i < len(positions):
        x0 = cx + sx[positions[i]]
        y0 = cy + sy[positions[i]]
        while k < offsets[i + 1]:
            if j == m:
                return k
            u = 2.0 * uv[0, j] - 1.0
            v = 2.0 * uv[1, j] - 1.0
            j += 1
            if u * u + v * v <= 1.0:
                events[k] = np.uint32(np.rint(y0 + radius * v)) * cols + np.uint32(np.rint(x0 + radius * u))
                k += 1
        i += 1
    return k


@dataclass(frozen=True)
class ScanSimulation:
    """Parameters of one simulated scan. Shapes are (rows, cols); lengths in px."""

    scan_shape: tuple[int, int] = (64, 64)
    frame_shape: tuple[int, int] = (576, 576)
    events_per_frame: float = 50.0
    frames_per_position: int = 1
    disc_radius: float = 20.0
    shift_amplitude: float = 8.0
    seed: int = 0
    scan_number: int = 1
    detector: str = "simulated"
    declare_total_frames: bool = True

    def __post_init__(self) -> None:
        rows, cols = self.frame_shape
        reach = self.disc_radius + self.shift_amplitude + 1
        if min(rows, cols) / 2 < reach:
            raise ValueError(
                f"frame_shape {self.frame_shape} is too small for disc_radius {self.disc_radius} "
                f"+ shift_amplitude {self.shift_amplitude}: the disc would be clipped"
            )
        if self.events_per_frame < 0 or self.frames_per_position < 1 or min(self.scan_shape) < 1:
            raise ValueError("events_per_frame >= 0, frames_per_position >= 1 and a non-empty scan are required")
        if not (self.disc_radius > 0 and self.shift_amplitude >= 0):  # a negative one would pass the check above
            got = f"got {self.disc_radius} and {self.shift_amplitude}"
            raise ValueError(f"disc_radius must be > 0 and shift_amplitude >= 0 px, {got}")

    @property
    def n_positions(self) -> int:
        return self.scan_shape[0] * self.scan_shape[1]

    @property
    def n_frames(self) -> int:
        return self.n_positions * self.frames_per_position

    @property
    def center(self) -> tuple[float, float]:
        """Unshifted disc centre (x = column, y = row), px."""
        return ((self.frame_shape[1] - 1) / 2, (self.frame_shape[0] - 1) / 2)

    @property
    def header(self) -> FrameHeader:
        return FrameHeader(
            scan_number=self.scan_number,
            scan_shape=self.scan_shape,
            frame_shape=self.frame_shape,
            detector=self.detector,
            total_frames=self.n_frames if self.declare_total_frames else None,
        )

    def shift_field(self) -> tuple[np.ndarray, np.ndarray]:
        """The known COM shift (x = column, y = row) per scan position, px, shape scan_shape."""
        sx, sy = _flat_shift_field(self.scan_shape, self.shift_amplitude)
        return sx.reshape(self.scan_shape).copy(), sy.reshape(self.scan_shape).copy()

    def expected_com(self) -> tuple[np.ndarray, np.ndarray]:
        """The true COM (x, y) per position in px: what an exact estimator converges to."""
        sx, sy = self.shift_field()
        cx, cy = self.center
        return cx + sx, cy + sy

    def com_standard_error(self) -> float:
        """Standard error (px) of one position's COM estimate along one axis.

        A uniform disc of radius R has variance R²/4 per axis, and rounding to
        pixels adds 1/12; a position averages about events_per_frame *
        frames_per_position events.
        """
        n_events = max(self.events_per_frame * self.frames_per_position, 1.0)
        return float(np.sqrt((self.disc_radius**2 / 4 + 1 / 12) / n_events))

    def n_batches(self, batch_size: int) -> int:
        return -(-self.n_frames // batch_size)

    def batch(self, index: int, batch_size: int) -> SparseFrameBatch:
        """Sparse batch ``index`` of ``batch_size`` frames (the last one may be shorter)."""
        first = index * batch_size
        if not 0 <= first < self.n_frames:
            raise IndexError(f"batch {index} is outside a scan of {self.n_frames} frames")
        frame_numbers = np.arange(first, min(first + batch_size, self.n_frames), dtype=np.uint64)
        positions = (frame_numbers % self.n_positions).astype(np.uint32)
        rng = np.random.default_rng([self.seed, self.scan_number, index])
        counts = rng.poisson(self.events_per_frame, size=len(positions))
        offsets = np.zeros(len(positions) + 1, np.int64)
        np.cumsum(counts, out=offsets[1:])
        events = np.empty(offsets[-1], np.uint32)
        sx, sy = _flat_shift_field(self.scan_shape, self.shift_amplitude)
        cx, cy = self.center
        done = 0
        while done < len(events):  # a disc takes 4/pi draws per electron on average; rarely, more
            left = len(events) - done
            uv = rng.random((2, left * 4 // 3 + 64), dtype=np.float32)  # float32: twice as fast to draw
            done = _disc_events(
                uv, done, offsets, positions, sx, sy, cx, cy, self.disc_radius, self.frame_shape[1], events
            )
        return SparseFrameBatch(
            self.header,
            events,
            offsets,
            positions,
            frame_numbers,
            origin={"source": "simulator", "scan": self.scan_number, "batch": index},
        )

    def batches(self, batch_size: int) -> Iterator[SparseFrameBatch]:
        for index in range(self.n_batches(batch_size)):
            yield self.batch(index, batch_size)

    def dense_batch(self, index: int, batch_size: int) -> DenseFrameBatch:
        """The same frames as :meth:`batch`, as uint16 images (each event adds 1)."""
        sparse = self.batch(index, batch_size)
        n, pixels = sparse.n_frames, self.frame_shape[0] * self.frame_shape[1]
        frame_of_event = np.repeat(np.arange(n), np.diff(sparse.offsets))
        flat = np.bincount(frame_of_event * pixels + sparse.events, minlength=n * pixels)
        return DenseFrameBatch(
            self.header,
            flat.astype(np.uint16).reshape(n, *self.frame_shape),
            sparse.scan_positions,
            sparse.frame_numbers,
            origin=sparse.origin,
        )
