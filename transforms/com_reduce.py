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

Frames of a scan that arrive after its final map go to dead letters until
the timeout has passed again; after that they start a new (partial) scan.
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
from apache_beam.coders import BooleanCoder, PickleCoder
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
    sum_x: np.ndarray,
    sum_y: np.ndarray,
    counts: np.ndarray,
    frames: np.ndarray,
) -> int:
    """Scatter-add per-frame sums into per-position sums; return newly seen positions."""
    new_positions = 0
    for i in range(len(positions)):
        p = positions[i]
        new_positions += frames[p] == 0
        frames[p] += 1
        sum_x[p] += part_x[i]
        sum_y[p] += part_y[i]
        counts[p] += part_n[i]
    return new_positions


@dataclass
class ScanAccumulator:
    """Running COM sums of one scan (LiberTEM-style mergeable result buffers)."""

    header: FrameHeader
    sum_x: np.ndarray
    sum_y: np.ndarray
    counts: np.ndarray
    frames: np.ndarray
    frames_seen: int = 0
    positions_seen: int = 0
    next_emit: int = 0

    @classmethod
    def empty(cls, header: FrameHeader, emit_every: int) -> ScanAccumulator:
        p = header.n_positions
        return cls(
            header,
            np.zeros(p, np.float64),
            np.zeros(p, np.float64),
            np.zeros(p, np.int64),
            np.zeros(p, np.uint32),
            next_emit=emit_every,
        )

    def add(self, partial: ComPartial) -> None:
        h, mine = partial.header, self.header
        if (h.scan_shape, h.frame_shape) != (mine.scan_shape, mine.frame_shape):
            raise ValueError(
                f"scan {h.scan_number}: batch has scan_shape {h.scan_shape}, frame_shape {h.frame_shape}, "
                f"but the scan started with {mine.scan_shape}, {mine.frame_shape}"
            )
        self.positions_seen += _accumulate(
            partial.scan_positions, partial.sum_x, partial.sum_y, partial.counts,
            self.sum_x, self.sum_y, self.counts, self.frames,
        )  # fmt: skip
        self.frames_seen += partial.n_frames

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


class _ComReduceFn(beam.DoFn):
    SCAN = ReadModifyWriteStateSpec("scan", PickleCoder())
    FINISHED = ReadModifyWriteStateSpec("finished", BooleanCoder())
    MAX_TS = ReadModifyWriteStateSpec("max_ts", PickleCoder())
    TIMEOUT = TimerSpec("timeout", TimeDomain.WATERMARK)

    def __init__(self, name: str, params: ComReduceParams) -> None:
        self._name = name
        self._params = params

    def setup(self) -> None:
        self._metrics = OperatorMetrics()
        self._completed = Metrics.counter(METRICS_NAMESPACE, "scans_completed")
        self._timed_out = Metrics.counter(METRICS_NAMESPACE, "scans_timed_out")
        self._snapshots = Metrics.counter(METRICS_NAMESPACE, "progressive_maps")

    def process(
        self,
        element: tuple[int, ComPartial],
        timestamp: Timestamp = beam.DoFn.TimestampParam,
        scan_state: Any = beam.DoFn.StateParam(SCAN),
        finished_state: Any = beam.DoFn.StateParam(FINISHED),
        max_ts_state: Any = beam.DoFn.StateParam(MAX_TS),
        timeout: Any = beam.DoFn.TimerParam(TIMEOUT),
    ) -> Iterator[Any]:
        scan_number, partial = element
        started = time.perf_counter()
        try:
            if finished_state.read():
                raise LateFrameError(f"scan {scan_number} already emitted its final map; {len(partial)} frames late")
            acc = scan_state.read() or ScanAccumulator.empty(partial.header, self._params.emit_every)
            acc.add(partial)
        except Exception as exc:  # the batch goes to dead letters; the scan goes on
            self._metrics.errors.inc()
            yield pvalue.TaggedOutput(DEAD_LETTER, DeadLetter.from_exception(self._name, partial, exc))
            return
        finally:
            self._metrics.observe(partial, started)

        latest = max(timestamp, max_ts_state.read() or timestamp)
        max_ts_state.write(latest)
        timeout.set(latest + Duration.of(self._params.timeout_s))

        if acc.complete:
            scan_state.clear()
            finished_state.write(True)
            self._completed.inc()
            self._metrics.frames_out.inc(acc.frames_seen)
            log.info("scan %d complete: %d frames", scan_number, acc.frames_seen)
            yield acc.com_map(final=True, replace_nans=self._params.replace_nans)
            return
        if self._params.emit_every and acc.frames_seen >= acc.next_emit:
            every = self._params.emit_every
            acc.next_emit = (acc.frames_seen // every + 1) * every
            self._snapshots.inc()
            log.info("scan %d: %d frames, %d positions so far", scan_number, acc.frames_seen, acc.positions_seen)
            yield acc.com_map(final=False, replace_nans=self._params.replace_nans)
        scan_state.write(acc)

    @on_timer(TIMEOUT)
    def flush(
        self,
        key: int = beam.DoFn.KeyParam,
        scan_state: Any = beam.DoFn.StateParam(SCAN),
        finished_state: Any = beam.DoFn.StateParam(FINISHED),
        max_ts_state: Any = beam.DoFn.StateParam(MAX_TS),
    ) -> Iterator[ComMap]:
        acc = scan_state.read()
        scan_state.clear()
        finished_state.clear()
        max_ts_state.clear()
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
