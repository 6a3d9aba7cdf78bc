"""com_reduce: ComPartial -> ComMap, one keyed state per scan number.

The state of an open scan is the running sums of x (column), y (row) and
event counts per scan position, plus how many frames each position has had:
O(scan positions) memory, whatever the number of frames. Because it sums
before dividing, the result is the exact event-weighted mean even when one
position's frames arrive in different batches.

What it emits, per scan:

* a progressive map (``final=False``) each time ``emit_every`` more frames
  have been reduced;
* a final map (``final=True, complete=True``) as soon as the scan is complete:
  every expected frame seen when the header gives ``total_frames``, else
  every position seen;
* a final map with ``complete=False`` when no frame has arrived for
  ``timeout_s`` seconds of event time (frame timestamps). In a bounded run the
  watermark reaches the end at end of input, so an incomplete scan is flushed
  then.

Frames of a scan that arrive after its final map go to dead letters for
``finished_retention_s`` of event time; after that the scan number may start
a new scan. When the header gives ``total_frames``, the state also keeps one
bit per frame, so a redelivered frame (Kafka is at-least-once) is counted
once: it is skipped and counted in the ``duplicate_frames`` metric. Without
``total_frames`` redeliveries cannot be told apart and are counted again.

The keyed-state machinery (state cell, timer, emissions, dead letters,
metrics) is :mod:`beamops.scan_reduce`'s; this module adds the COM sums.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numba import njit
from pydantic import Field

from beamops import ComMap, ComPartial, FrameHeader, Port
from beamops.scan_reduce import LateFrameError as LateFrameError  # re-exported: raised by every per-scan reduction
from beamops.scan_reduce import ScanProgress, ScanReduceFn, ScanReduceOperator, ScanReduceParams, zeroed


class ComReduceParams(ScanReduceParams):
    progressive_output = "a progressive map"
    final_output = "map"
    frames_verb = "reduced"

    replace_nans: bool = Field(
        False,
        title="Replace NaNs",
        description="Fill positions without events with the map's per-axis nanmean (stempy's replace_nans); else NaN.",
    )


@njit(cache=True, nogil=True)
def _accumulate(
    positions: np.ndarray,
    part_x: np.ndarray,
    part_y: np.ndarray,
    part_n: np.ndarray,
    fresh: np.ndarray,
    sum_x: np.ndarray,
    sum_y: np.ndarray,
    counts: np.ndarray,
    frames: np.ndarray,
) -> int:
    """Scatter-add the ``fresh`` frames' sums into per-position sums; return newly seen positions."""
    new_positions = 0
    for i in range(len(positions)):
        if not fresh[i]:
            continue
        p = positions[i]
        new_positions += frames[p] == 0
        frames[p] += 1
        sum_x[p] += part_x[i]
        sum_y[p] += part_y[i]
        counts[p] += part_n[i]
    return new_positions


# error_model="numpy": a division by zero gives inf/NaN instead of raising, so the loop has no
# branch and LLVM vectorizes it (2.1-2.4x faster at 256x256 and 1024x1024 than with an if).
@njit(cache=True, nogil=True, error_model="numpy")
def _means(sum_x: np.ndarray, sum_y: np.ndarray, counts: np.ndarray, x: np.ndarray, y: np.ndarray) -> None:
    """x, y = sums / counts per position (divided in float64, stored as float32); NaN where no events."""
    for p in range(len(counts)):
        n = counts[p]
        mean_x = sum_x[p] / n
        mean_y = sum_y[p] / n
        x[p] = mean_x if n != 0 else np.nan
        y[p] = mean_y if n != 0 else np.nan


@dataclass
class ScanAccumulator(ScanProgress):
    """Running COM sums of one scan (LiberTEM-style mergeable result buffers)."""

    sum_x: np.ndarray
    sum_y: np.ndarray
    counts: np.ndarray
    frames: np.ndarray

    @classmethod
    def empty(cls, header: FrameHeader, emit_every: int) -> ScanAccumulator:
        """Per-position sums, plus one bit per expected frame when the header gives total_frames."""
        p = header.n_positions
        return cls(
            header,
            zeroed(p, np.float64),
            zeroed(p, np.float64),
            zeroed(p, np.int64),
            zeroed(p, np.uint32),
            next_emit=emit_every,
        )

    def add(self, partial: ComPartial) -> int:
        """Accumulate ``partial``; return how many of its frames were redeliveries (skipped).

        Raises ValueError, before touching any sum, for a batch that does not
        belong to this scan's shape or whose positions or frame numbers are out
        of range.
        """
        h = partial.header
        self.check_same_scan(h)
        n = partial.n_frames
        if not (len(partial.sum_x) == len(partial.sum_y) == len(partial.counts) == n):
            raise ValueError(f"scan {h.scan_number}: ComPartial columns have different lengths")
        fresh, duplicates = self.fresh_in_range(h, partial.scan_positions, partial.frame_numbers)
        new_positions = _accumulate(
            partial.scan_positions, partial.sum_x, partial.sum_y, partial.counts, fresh,
            self.sum_x, self.sum_y, self.counts, self.frames,
        )  # fmt: skip
        return self.count(n, new_positions, duplicates)

    def com_map(self, final: bool, replace_nans: bool) -> ComMap:
        x = np.empty(self.header.scan_shape, np.float32)
        y = np.empty(self.header.scan_shape, np.float32)
        _means(self.sum_x, self.sum_y, self.counts, x.reshape(-1), y.reshape(-1))
        if replace_nans:
            for axis in (x, y):
                if np.isfinite(axis).any():
                    # the mean in float64, as stempy takes it of its float64 map
                    axis[~np.isfinite(axis)] = np.nanmean(axis, dtype=np.float64)
        return ComMap(
            self.header,
            x,
            y,
            frames_seen=self.frames_seen,
            positions_seen=self.positions_seen,
            final=final,
            complete=self.complete,
        )


class _ComReduceFn(ScanReduceFn):
    progressive_metric = "progressive_maps"

    def new_accumulator(self, partial: ComPartial) -> ScanAccumulator:
        return ScanAccumulator.empty(partial.header, self._params.emit_every)

    def state_bytes(self, header: FrameHeader) -> int:
        return header.n_positions * (8 + 8 + 8 + 4)  # sum_x, sum_y, counts, frames

    def outputs(self, acc: ScanAccumulator, final: bool) -> list[ComMap]:
        if final and acc.frames_seen and not acc.counts.any():
            # A map of NaNs is a valid result, but almost always a crop that misses the beam.
            self._log.warning(
                "scan %d: no event was kept at any of its %d positions (%d frames): every value of its map is "
                "NaN; check the crop's centre and size against the %s frame",
                acc.header.scan_number, acc.header.n_positions, acc.frames_seen, acc.header.frame_shape,
            )  # fmt: skip
        return [acc.com_map(final=final, replace_nans=self._params.replace_nans)]


class com_reduce(ScanReduceOperator):  # noqa: N801 - catalog names are lowercase like the decorated operators
    """Reduce per-frame COM sums into one map per scan, with progressive and final maps."""

    name = "com_reduce"
    title = "Reduce center of mass"
    description = (
        "Accumulates ComPartial sums per scan position in keyed state and emits progressive maps every "
        "emit_every frames and a final map when the scan is complete (or after timeout_s without frames)."
    )
    Params = ComReduceParams
    inputs = {"in": Port(ComPartial, "Per-frame center-of-mass sums")}
    outputs = {"com_map": Port(ComMap, "Center of mass per scan position (x = column, y = row), px")}
    Fn = _ComReduceFn
    step = "Reduce"
