"""com_partial: per-frame center-of-mass sums of sparse (counted) frames.

SparseFrameBatch -> ComPartial. For each frame, the sums over its kept events
of the column (x) and row (y) index, and the number of kept events. Summing,
not averaging, lets com_reduce compute the exact mean of a scan position
whose frames arrive in different batches.

Cropping keeps only the events near a centre, which finds the zero beam in
the presence of scattered electrons:

* box (``crop_to_x``/``crop_to_y``): keep ``cx - wx < x <= cx + wx`` and
  ``cy - wy < y <= cy + wy``, stempy 3.4.1's semantics, which interactEM uses;
* circle (``crop_radius``): keep events at distance <= radius from the centre,
  stempy >= 3.4.2's semantics.

The centre is ``(init_center_x, init_center_y)`` or, when unset, the frame's
own uncropped center of mass (stempy uses the position's, which is the same
when a position has one frame).
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
from numba import njit
from pydantic import Field, model_validator

from beamops import OperatorParams, SparseFrameBatch, operator
from beamops.results import ComPartial
from transforms._crop_modes import BOX, CIRCLE, NO_CROP
from transforms._cuda_kernels import com_sparse_cuda, resolve_device


class ComCropParams(OperatorParams):
    """Crop parameters shared by the sparse and dense COM operators (pixels)."""

    init_center_x: float | None = Field(
        None,
        title="Initial center X (column)",
        description=(
            "Crop centre, detector column in px (beamops x = column; interactEM passes its "
            "init_center_x to stempy, where it is a row). Unset: each frame's own uncropped COM."
        ),
    )
    init_center_y: float | None = Field(
        None,
        title="Initial center Y (row)",
        description="Crop centre, detector row in px (beamops y = row). Set together with init_center_x.",
    )
    crop_to_x: float | None = Field(
        None,
        ge=0,
        title="Crop to X (column half-width)",
        description="Box crop half-width along columns in px: keep cx - w < x <= cx + w (stempy 3.4.1). Unset: no box.",
    )
    crop_to_y: float | None = Field(
        None,
        ge=0,
        title="Crop to Y (row half-width)",
        description="Box crop half-width along rows in px: keep cy - w < y <= cy + w. Set together with crop_to_x.",
    )
    crop_radius: float | None = Field(
        None,
        ge=0,
        title="Crop radius",
        description="Circular crop radius in px: keep events at distance <= radius from the centre (stempy >= 3.4.2).",
    )

    device: Literal["cpu", "cuda", "auto"] = Field(
        "auto",
        title="Device",
        description="Where the kernel runs: cpu, cuda (a GPU, or an error), or auto (cuda when numba sees a GPU).",
    )

    @model_validator(mode="after")
    def _consistent(self) -> ComCropParams:
        if (self.init_center_x is None) != (self.init_center_y is None):
            raise ValueError("set both init_center_x and init_center_y, or neither")
        if (self.crop_to_x is None) != (self.crop_to_y is None):
            raise ValueError("set both crop_to_x and crop_to_y (a box crop), or neither")
        if self.crop_to_x is not None and self.crop_radius is not None:
            raise ValueError("choose a box crop (crop_to_x/_y) or a circular crop (crop_radius), not both")
        return self

    @property
    def crop_mode(self) -> int:
        if self.crop_radius is not None:
            return CIRCLE
        return BOX if self.crop_to_x is not None else NO_CROP

    def run_kernel(self, batch: Any, cpu_kernel: Any, cuda_kernel: Any, *inputs: Any) -> ComPartial:
        """Run the CPU or CUDA kernel (as ``device`` says) on ``inputs``; wrap its sums as a ComPartial."""
        n = batch.n_frames
        sums = (np.empty(n, np.float64), np.empty(n, np.float64), np.empty(n, np.int64))
        kernel = cuda_kernel if resolve_device(self.device) == "cuda" else cpu_kernel
        kernel(*inputs, *self.kernel_args(), *sums)
        return ComPartial(batch.header, batch.scan_positions, *sums, batch.frame_numbers, origin=batch.origin)

    def kernel_args(self) -> tuple[int, bool, float, float, float, float, float]:
        """(mode, use_init_center, cx, cy, half_width_x, half_width_y, radius²) for the kernels."""
        use_init = self.init_center_x is not None
        return (
            self.crop_mode,
            use_init,
            float(self.init_center_x) if use_init else 0.0,
            float(self.init_center_y) if use_init else 0.0,
            float(self.crop_to_x or 0.0),
            float(self.crop_to_y or 0.0),
            float(self.crop_radius or 0.0) ** 2,
        )


# Event indices below this split into (row, col) in float32, which LLVM vectorizes (AVX2 has no
# packed float64 -> int64 conversion). The float32 quotient (e + 0.5) / cols is off by at most
# (e / cols) * 2**-23 and at least 0.5 / cols away from an integer, so truncating it gives the
# exact row for every e < 2**22, whatever cols; 2**21 leaves a margin (a 1448x1448 frame has
# 2.1 M pixels; tests check every index of several shapes).
FLOAT32_SPLIT_MAX_PIXELS = 2**21


@njit(cache=True, nogil=True, inline="always")
def _split(event: np.uint32, inv_cols: float, cols: int) -> tuple[int, int]:
    # (event + 0.5) / cols is at least 0.5 / cols away from an integer, far more
    # than float64 rounding, so this equals event // cols without a division.
    row = int((event + 0.5) * inv_cols)
    return event - row * cols, row


# Events per block of the float32 sums. Below 2**21, the sums of 1024 indices and of their rows stay
# below 2**31, so a block sums them in 32-bit lanes (twice as many per vector as int64) and adds them
# to int64 totals: about 2x faster than int64 lanes at 500 events/frame.
SUM_BLOCK = 1024


@njit(cache=True, nogil=True, inline="always")
def _float32_sums(frame: np.ndarray, cols: int) -> tuple[int, int, bool]:
    """(sum of columns, sum of rows) of one frame's events, and whether they are exact."""
    # sum(col) = sum(event) - cols * sum(row): one float32 conversion per event, in loops LLVM
    # vectorizes (over range(len(slice)), not range(start, stop), which it does not). The OR of the
    # indices, taken in the same pass, says whether all are below 2**21, where the float32 split is
    # exact (an OR costs less than a max, and a pass of its own over the batch about half of this one).
    inv32 = np.float32(1.0 / cols)
    half = np.float32(0.5)
    sum_events = 0
    sum_rows = 0
    bits = np.uint32(0)
    for start in range(0, len(frame), SUM_BLOCK):
        block = frame[start : start + SUM_BLOCK]
        block_events = np.uint32(0)
        block_rows = np.int32(0)
        block_bits = np.uint32(0)
        for k in range(len(block)):
            e = block[k]
            block_events = np.uint32(block_events + e)
            block_rows = np.int32(block_rows + np.int32((np.float32(e) + half) * inv32))
            block_bits = np.uint32(block_bits | e)
        sum_events += block_events
        sum_rows += block_rows
        bits = np.uint32(bits | block_bits)
    # FLOAT32_SPLIT_MAX_PIXELS is a power of two: every index is below it. Else the float32 split may be
    # wrong, and the block sums may have wrapped.
    return sum_events - sum_rows * cols, sum_rows, bits < FLOAT32_SPLIT_MAX_PIXELS


@njit(cache=True, nogil=True)
def _exact_sums(frame: np.ndarray, cols: int) -> tuple[int, int]:
    """(sum of columns, sum of rows) of one frame's events, split in float64 (any uint32 index)."""
    sx = 0
    sy = 0
    inv_cols = 1.0 / cols
    for k in range(len(frame)):
        col, row = _split(frame[k], inv_cols, cols)
        sx += col
        sy += row
    return sx, sy


@njit(cache=True, nogil=True, inline="always")
def _uncropped_sums(frame: np.ndarray, cols: int) -> tuple[int, int]:
    """(sum of columns, sum of rows) of one frame's events: in float32 blocks, else (an index of 2**21
    or more) in float64. The call stays out of _float32_sums: in there it made its loops 2x slower."""
    sx, sy, exact = _float32_sums(frame, cols)
    return (sx, sy) if exact else _exact_sums(frame, cols)


@njit(cache=True, nogil=True)
def com_sparse_kernel(
    events: np.ndarray,
    offsets: np.ndarray,
    frame_cols: int,
    mode: int,
    use_init: bool,
    cx: float,
    cy: float,
    wx: float,
    wy: float,
    r2: float,
    sum_x: np.ndarray,
    sum_y: np.ndarray,
    counts: np.ndarray,
) -> None:
    """Fill per-frame sums of column (x) and row (y) and event counts (CSR input)."""
    inv_cols = 1.0 / frame_cols
    if mode == NO_CROP:
        # The common case, as one tight loop per frame: about 1.5x faster than through the branches below.
        for i in range(len(offsets) - 1):
            frame = events[offsets[i] : offsets[i + 1]]
            sum_x[i], sum_y[i] = _uncropped_sums(frame, frame_cols)
            counts[i] = len(frame)
        return
    for i in range(len(offsets) - 1):
        frame = events[offsets[i] : offsets[i + 1]]
        n = len(frame)
        if n == 0:
            sum_x[i], sum_y[i], counts[i] = 0, 0, 0
            continue
        if use_init:
            ccx, ccy = cx, cy
        else:  # the frame's own uncropped centre
            sx, sy = _uncropped_sums(frame, frame_cols)
            ccx, ccy = sx / n, sy / n
        kx = 0
        ky = 0
        kn = 0
        # Branchless masks: an `if` per event costs 5-7x here.
        if mode == CIRCLE:
            for k in range(n):
                col, row = _split(frame[k], inv_cols, frame_cols)
                dx = col - ccx
                dy = row - ccy
                keep = np.int64(dx * dx + dy * dy <= r2)
                kx += keep * col
                ky += keep * row
                kn += keep
        else:
            x_lo, x_hi, y_lo, y_hi = ccx - wx, ccx + wx, ccy - wy, ccy + wy
            for k in range(n):
                col, row = _split(frame[k], inv_cols, frame_cols)
                keep = np.int64((col > x_lo) & (col <= x_hi) & (row > y_lo) & (row <= y_hi))
                kx += keep * col
                ky += keep * row
                kn += keep
        sum_x[i], sum_y[i], counts[i] = kx, ky, kn


@operator(
    output_name="com_partial",
    title="Partial center of mass",
    input_description="Counted frames",
    output_description="Per-frame sums of event columns and rows, and event counts",
)
def com_partial(batch: SparseFrameBatch, params: ComCropParams) -> ComPartial:
    """Per-frame center-of-mass sums (x = column, y = row, in pixels) of sparse frames, with optional crop."""
    return params.run_kernel(
        batch, com_sparse_kernel, com_sparse_cuda, batch.events, batch.offsets, batch.header.frame_shape[1]
    )
