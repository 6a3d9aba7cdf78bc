"""bin_frames: bin counted frames by an integer factor (SparseFrameBatch -> SparseFrameBatch).

Each event at detector (row, col) moves to binned pixel
``(row // factor, col // factor)`` of a frame of shape
``(rows // factor, cols // factor)``: flat index
``(row // factor) * (cols // factor) + col // factor``. An event stays one
event, in the same frame and order, so the events of a binned frame may repeat
a pixel (a binned pixel counts every electron of its factor x factor block).
Scan positions, frame numbers, the rest of the header and the origin are kept;
``factor=1`` returns the batch unchanged.

Both frame dimensions must be divisible by ``factor``. The frame shape is a
property of the data, not of the pipeline (the same pipeline may read several
detectors), so it is checked per batch: a batch that does not divide goes to
dead letters with the reason, and the other batches flow. ``factor`` itself
(an int >= 1) is checked when the pipeline is built.

stempy's ``SparseArray.bin_frames`` gives the same binned counts for square
frames; for non-square frames it divides by the row count where the column
count belongs (stempy 3.6.0), so it is not a reference there. It also splits
repeated pixels into extra frames, because a stempy frame cannot repeat one.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from numba import njit
from pydantic import Field

from beamops import OperatorParams, SparseFrameBatch, operator


class BinFramesParams(OperatorParams):
    factor: int = Field(
        2,
        ge=1,
        title="Bin factor",
        description="Detector pixels per binned pixel along each axis; both frame dimensions must be divisible by it.",
    )


class FrameShapeError(ValueError):
    """A frame shape that the bin factor does not divide."""


@njit(cache=True, nogil=True)
def bin_events_kernel(events: np.ndarray, frame_cols: int, factor: int, out: np.ndarray) -> int:
    """Fill ``out`` with the binned flat index of every event; return the largest input event (or -1)."""
    binned_cols = frame_cols // factor
    largest = -1
    for k in range(len(events)):
        e = np.int64(events[k])
        largest = max(largest, e)
        row = e // frame_cols
        col = e - row * frame_cols
        out[k] = (row // factor) * binned_cols + col // factor
    return largest


@operator(
    output_name="frames",
    title="Bin frames",
    input_description="Counted frames",
    output_description="Counted frames on a detector binned by factor along rows and columns",
)
def bin_frames(batch: SparseFrameBatch, params: BinFramesParams) -> SparseFrameBatch:
    """Bin counted frames by an integer factor along detector rows and columns (events keep their count)."""
    factor = params.factor
    if factor == 1:
        return batch
    rows, cols = batch.header.frame_shape
    if rows % factor or cols % factor:
        raise FrameShapeError(
            f"frame_shape {batch.header.frame_shape} is not divisible by bin factor {factor} "
            f"(rows % factor = {rows % factor}, cols % factor = {cols % factor})"
        )
    binned = np.empty(len(batch.events), np.uint32)
    largest = bin_events_kernel(batch.events, cols, factor, binned)
    if largest >= rows * cols:
        raise ValueError(f"event index {largest} out of range for frame_shape {batch.header.frame_shape}")
    header = dataclasses.replace(batch.header, frame_shape=(rows // factor, cols // factor))
    return SparseFrameBatch(
        header, binned, batch.offsets, batch.scan_positions, batch.frame_numbers, origin=batch.origin
    )
