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
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import apache_beam as beam
import numpy as np
from apache_beam import pvalue
from apache_beam.coders import PickleCoder
from apache_beam.metrics import Metrics
from apache_beam.transforms.timeutil import TimeDomain
from apache_beam.transforms.userstate import ReadModifyWriteStateSpec, TimerSpec, on_timer
from apache_beam.utils.timestamp import Duration, Timestamp
from numba import njit
from pydantic import Field

from beamops import DEAD_LETTER, ComMap, ComPartial, DeadLetter, FrameHeader, Operator, OperatorParams, Port
from beamops.operator import METRICS_NAMESPACE, OperatorMetrics

log = logging.getLogger(__name__)


class ComReduceParams(OperatorParams):
    emit_every: int = Field(
        10_000,
        ge=0,
        title="Emit every",
        description="Emit a progressive map each time this many more frames of a scan are reduced; 0: final only.",
    )
    timeout_s: float = Field(
        300.0,
        gt=0,
        title="Timeout (s)",
        description="Flush a scan as final, marked incomplete, after this many seconds of event time without frames.",
    )
    finished_retention_s: float = Field(
        3600.0,
        gt=0,
        title="Finished scan retention (s)",
        description=(
            "For this many seconds of event time after a scan's final map, its frames are late (dead letters); "
            "after that its number may start a new scan."
        ),
    )
    replace_nans: bool = Field(
        False,
        title="Replace NaNs",
        description="Fill positions without events with the map's per-axis nanmean (stempy's replace_nans); else NaN.",
    )


class LateFrameError(ValueError):
    """Frames of a scan whose final map was already emitted."""


@njit(cache=True, nogil=True)
def _accumulate(
    positions: np.ndarray,
    part_x: np.ndarray,
    part_y: np.ndarray,
    part_n: np.ndarray,
    frame_numbers: np.ndarray,
    seen_frames: np.ndarray,
    dedup: bool,
    sum_x: np.ndarray,
    sum_y: np.ndarray,
    counts: np.ndarray,
    frames: np.ndarray,
) -> tuple[int, int]:
    """Scatter-add per-frame sums into per-position sums.

    With ``dedup``, a frame whose bit is already set in ``seen_frames`` is a
    redelivery and is skipped. Returns (newly seen positions, duplicates).
    """
    new_positions = 0
    duplicates = 0
    for i in range(len(positions)):
        if dedup:
            f = frame_numbers[i]
            byte, bit = f >> 3, np.uint8(1 << (f & 7))
            if seen_frames[byte] & bit:
                duplicates += 1
                continue
            seen_frames[byte] |= bit
        p = positions[i]
        new_positions += frames[p] == 0
        frames[p] += 1
        sum_x[p] += part_x[i]
        sum_y[p] += part_y[i]
        counts[p] += part_n[i]
    return new_positions, duplicates


_NO_FRAMES = np.zeros(0, np.uint64)


@dataclass
class ScanAccumulator:
    """Running COM sums of one scan (LiberTEM-style mergeable result buffers)."""

    header: FrameHeader
    sum_x: np.ndarray
    sum_y: np.ndarray
    counts: np.ndarray
    frames: np.ndarray
    seen_frames: np.ndarray
    frames_seen: int = 0
    positions_seen: int = 0
    duplicates: int = 0
    next_emit: int = 0

    @classmethod
    def empty(cls, header: FrameHeader, emit_every: int) -> ScanAccumulator:
        """Per-position sums, plus one bit per expected frame when the header gives total_frames."""
        p = header.n_positions
        return cls(
            header,
            np.zeros(p, np.float64),
            np.zeros(p, np.float64),
            np.zeros(p, np.int64),
            np.zeros(p, np.uint32),
            np.zeros(-(-(header.total_frames or 0) // 8), np.uint8),
            next_emit=emit_every,
        )

    def add(self, partial: ComPartial) -> int:
        """Accumulate ``partial``; return how many of its frames were redeliveries (skipped).

        Raises ValueError, before touching any sum, for a batch that does not
        belong to this scan's shape or whose positions or frame numbers are out
        of range.
        """
        h, mine = partial.header, self.header
        if (h.scan_shape, h.frame_shape, h.total_frames) != (mine.scan_shape, mine.frame_shape, mine.total_frames):
            raise ValueError(
                f"scan {h.scan_number}: batch has scan_shape {h.scan_shape}, frame_shape {h.frame_shape}, "
                f"total_frames {h.total_frames}, but the scan started with {mine.scan_shape}, "
                f"{mine.frame_shape}, {mine.total_frames}"
            )
        n = partial.n_frames
        if not (len(partial.sum_x) == len(partial.sum_y) == len(partial.counts) == n):
            raise ValueError(f"scan {h.scan_number}: ComPartial columns have different lengths")
        if n and int(partial.scan_positions.max()) >= mine.n_positions:
            raise ValueError(
                f"scan {h.scan_number}: scan position {int(partial.scan_positions.max())} out of range "
                f"for scan_shape {mine.scan_shape}"
            )
        dedup = mine.total_frames is not None and partial.frame_numbers is not None
        if dedup and n and int(partial.frame_numbers.max()) >= mine.total_frames:
            raise ValueError(
                f"scan {h.scan_number}: frame number {int(partial.frame_numbers.max())} out of range "
                f"for a scan of {mine.total_frames} frames"
            )
        new_positions, duplicates = _accumulate(
            partial.scan_positions, partial.sum_x, partial.sum_y, partial.counts,
            partial.frame_numbers if dedup else _NO_FRAMES, self.seen_frames, dedup,
            self.sum_x, self.sum_y, self.counts, self.frames,
        )  # fmt: skip
        self.positions_seen += new_positions
        self.frames_seen += n - duplicates
        self.duplicates += duplicates
        return duplicates

    @property
    def complete(self) -> bool:
        if self.header.total_frames is not None:
            return self.frames_seen >= self.header.total_frames
        return self.positions_seen == self.header.n_positions

    def com_map(self, final: bool, replace_nans: bool) -> ComMap:
        with np.errstate(invalid="ignore", divide="ignore"):
            x = (self.sum_x / self.counts).reshape(self.header.scan_shape)
            y = (self.sum_y / self.counts).reshape(self.header.scan_shape)
        if replace_nans:
            for axis in (x, y):
                if np.isfinite(axis).any():
                    axis[~np.isfinite(axis)] = np.nanmean(axis)
        return ComMap(
            self.header,
            x.astype(np.float32),
            y.astype(np.float32),
            frames_seen=self.frames_seen,
            positions_seen=self.positions_seen,
            final=final,
            complete=self.complete,
        )


@dataclass
class _ScanState:
    """Everything com_reduce keeps for one scan number, in one state cell.

    One cell, not three: the SDK's state cache weighs every cell it commits,
    at a fixed cost of milliseconds each.
    """

    acc: ScanAccumulator | None = None
    finished: bool = False
    latest: Timestamp | None = None


class _ComReduceFn(beam.DoFn):
    STATE = ReadModifyWriteStateSpec("scan", PickleCoder())
    TIMEOUT = TimerSpec("timeout", TimeDomain.WATERMARK)

    def __init__(self, name: str, params: ComReduceParams) -> None:
        self._name = name
        self._params = params

    def setup(self) -> None:
        self._metrics = OperatorMetrics()
        self._completed = Metrics.counter(METRICS_NAMESPACE, "scans_completed")
        self._timed_out = Metrics.counter(METRICS_NAMESPACE, "scans_timed_out")
        self._snapshots = Metrics.counter(METRICS_NAMESPACE, "progressive_maps")
        self._duplicates = Metrics.counter(METRICS_NAMESPACE, "duplicate_frames")

    def process(
        self,
        element: tuple[int, ComPartial],
        timestamp: Timestamp = beam.DoFn.TimestampParam,
        state_cell: Any = beam.DoFn.StateParam(STATE),
        timeout: Any = beam.DoFn.TimerParam(TIMEOUT),
    ) -> Iterator[Any]:
        scan_number, partial = element
        started = time.perf_counter()
        state = state_cell.read() or _ScanState()
        try:
            if state.finished:
                raise LateFrameError(f"scan {scan_number} already emitted its final map; {len(partial)} frames late")
            acc = state.acc or ScanAccumulator.empty(partial.header, self._params.emit_every)
            duplicates = acc.add(partial)
        except Exception as exc:  # the batch goes to dead letters; the scan goes on
            self._metrics.errors.inc()
            yield pvalue.TaggedOutput(DEAD_LETTER, DeadLetter.from_exception(self._name, partial, exc))
            return
        finally:
            self._metrics.observe(partial, started)

        if duplicates:
            self._duplicates.inc(duplicates)
            log.warning("scan %d: skipped %d frames already reduced (redelivered)", scan_number, duplicates)
        state.latest = max(timestamp, state.latest or timestamp)

        if acc.complete:
            # Keep the scan marked finished for a while, so stragglers become dead letters
            # instead of a second, incomplete "final" map that would replace this one.
            timeout.set(state.latest + Duration.of(self._params.finished_retention_s))
            state_cell.write(_ScanState(finished=True, latest=state.latest))
            self._completed.inc()
            self._metrics.frames_out.inc(acc.frames_seen)
            log.info("scan %d complete: %d frames", scan_number, acc.frames_seen)
            yield acc.com_map(final=True, replace_nans=self._params.replace_nans)
            return
        timeout.set(state.latest + Duration.of(self._params.timeout_s))
        if self._params.emit_every and acc.frames_seen >= acc.next_emit:
            every = self._params.emit_every
            acc.next_emit = (acc.frames_seen // every + 1) * every
            self._snapshots.inc()
            log.info("scan %d: %d frames, %d positions so far", scan_number, acc.frames_seen, acc.positions_seen)
            yield acc.com_map(final=False, replace_nans=self._params.replace_nans)
        state.acc = acc
        state_cell.write(state)

    @on_timer(TIMEOUT)
    def flush(
        self,
        key: int = beam.DoFn.KeyParam,
        state_cell: Any = beam.DoFn.StateParam(STATE),
    ) -> Iterator[ComMap]:
        state = state_cell.read()
        state_cell.clear()
        acc = state.acc if state else None
        if acc is not None:
            self._timed_out.inc()
            self._metrics.frames_out.inc(acc.frames_seen)
            log.warning(
                "scan %d flushed incomplete after %.0f s without frames: %d frames, %d of %d positions",
                key, self._params.timeout_s, acc.frames_seen, acc.positions_seen, acc.header.n_positions,
            )  # fmt: skip
            yield acc.com_map(final=True, replace_nans=self._params.replace_nans)


class com_reduce(Operator):  # noqa: N801 - catalog names are lowercase like the decorated operators
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

    def build(self, main: pvalue.PCollection) -> Mapping[str, pvalue.PCollection]:
        results = (
            main
            | "KeyByScan" >> beam.Map(lambda p: (p.header.scan_number, p)).with_output_types(tuple[int, ComPartial])
            | "Reduce" >> beam.ParDo(_ComReduceFn(self.name, self.params)).with_outputs(DEAD_LETTER, main="com_map")
        )
        return {"com_map": results.com_map, DEAD_LETTER: results[DEAD_LETTER]}
