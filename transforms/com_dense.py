"""com_dense: per-frame center-of-mass sums of dense (uint16) frames.

DenseFrameBatch -> ComPartial, with the crop parameters of com_partial. The
kernel reads each frame once, in its stored uint16 form, accumulating
integer row and column moments; it never makes a float copy of the frames.
``counts`` is then the summed intensity of the kept pixels.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from beamops import DenseFrameBatch, operator
from beamops.results import ComPartial
from transforms._crop_modes import CIRCLE, NO_CROP, crop_window
from transforms._cuda_kernels import com_dense_cuda
from transforms.com_partial import ComCropParams

_crop_window = njit(cache=True, nogil=True, inline="always")(crop_window)


@njit(cache=True, nogil=True)
def com_dense_kernel(
    frames: np.ndarray,
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
    """Fill intensity-weighted sums of column (x) and row (y), and total intensity, per frame."""
    n, rows, cols = frames.shape
    reach = np.sqrt(r2) if mode == CIRCLE else 0.0
    for i in range(n):
        if mode == NO_CROP or not use_init:
            sx = 0
            sy = 0
            total = 0
            for r in range(rows):
                row_sum = 0
                row_x = 0
                for c in range(cols):
                    v = np.int64(frames[i, r, c])
                    row_sum += v
                    row_x += v * c
                sx += row_x
                sy += row_sum * r
                total += row_sum
            if mode == NO_CROP or total == 0:
                sum_x[i], sum_y[i], counts[i] = sx, sy, total
                continue
            ccx, ccy = sx / total, sy / total
        else:
            ccx, ccy = cx, cy
        # Visit only the crop's bounding box (one pixel wider, so rounding of the
        # bounds cannot drop a pixel); the exact test decides inside it.
        half_x, half_y = (reach, reach) if mode == CIRCLE else (wx, wy)
        r_lo, r_hi = _crop_window(ccy, half_y, rows)
        c_lo, c_hi = _crop_window(ccx, half_x, cols)
        kx = 0
        ky = 0
        kn = 0
        for r in range(r_lo, r_hi + 1):
            dy = r - ccy
            row_in = (r > ccy - wy) & (r <= ccy + wy)
            for c in range(c_lo, c_hi + 1):
                dx = c - ccx
                if mode == CIRCLE:
                    keep = np.int64(dx * dx + dy * dy <= r2)
                else:
                    keep = np.int64(row_in & (c > ccx - wx) & (c <= ccx + wx))
                v = keep * np.int64(frames[i, r, c])
                kx += v * c
                ky += v * r
                kn += v
        sum_x[i], sum_y[i], counts[i] = kx, ky, kn


@operator(
    output_name="com_partial",
    title="Partial center of mass (dense frames)",
    input_description="Dense uint16 frames",
    output_description="Per-frame intensity-weighted sums of columns and rows, and total intensity",
)
def com_dense(batch: DenseFrameBatch, params: ComCropParams) -> ComPartial:
    """Per-frame center-of-mass sums (x = column, y = row, in pixels) of dense frames, with optional crop."""
    return params.run_kernel(batch, com_dense_kernel, com_dense_cuda, batch.frames)
