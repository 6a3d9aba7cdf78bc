"""diffraction_sum: summed diffraction pattern of each scan (SparseFrameBatch -> Image).

The state of an open scan is the event count of every detector pixel, summed
over all its frames so far (int64, exact), plus which positions have had a
frame: O(detector pixels + scan positions) memory, whatever the number of
frames. Emitted, per scan, as an :class:`~beamops.Image` named
``diffraction_sum`` of shape ``frame_shape`` (float32 counts, exact up to
2**24 counts per pixel):

* a progressive image (``final=False``) each time ``emit_every`` more frames
  have been summed;
* a final image (``final=True, complete=True``) as soon as the scan is
  complete: every expected frame seen when the header gives ``total_frames``,
  else every position seen (com_reduce's rule);
* a final image with ``complete=False`` when no frame has arrived for
  ``timeout_s`` seconds of event time; in a bounded run the watermark reaches
  the end at end of input, so an incomplete scan is flushed then.

Frames of a scan that arrive after its final image go to dead letters
(``LateFrameError``) for ``finished_retention_s`` of event time; after that
the scan number may start a new scan. When the header gives ``total_frames``
the state also keeps one bit per frame, so a redelivered frame (Kafka is
at-least-once) is summed once and counted in the ``duplicate_frames`` metric.

The keyed-state pattern is com_reduce's (one state cell per scan, an
event-time timer for the timeout and the retention).
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

from beamops import DEAD_LETTER, DeadLetter, FrameHeader, Image, Operator, OperatorParams, Port, SparseFrameBatch
from beamops.operator import METRICS_NAMESPACE, OperatorMetrics
from transforms.com_reduce import LateFrameError

log = logging.getLogger(__name__)

IMAGE_NAME = "diffraction_sum"
UNITS = "counts"


class DiffractionSumParams(OperatorParams):
    emit_every: int = Field(
        10_000,
        ge=0,
        title="Emit every",
        description="Emit a progressive pattern each time this many more frames of a scan are summed; 0: final only.",
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
            "For this many seconds of event time after a scan's final pattern, its frames are late (dead letters); "
            "after that its number may start a new scan."
        ),
    )


@njit(cache=True, nogil=True)
def sum_events_kernel(
    events: np.ndarray,
    offsets: np.ndarray,
    positions: np.ndarray,
    frame_numbers: np.ndarray,
    dedup: bool,
    seen_frames: np.ndarray,
    seen_positions: np.ndarray,
    pattern: np.ndarray,
) -> tuple[int, int]:
    """Scatter-add every event of every frame into ``pattern`` (one count per event).

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
        new_positions += seen_positions[p] == 0
        seen_positions[p] = 1
        for k in range(offsets[i], offsets[i + 1]):
            pattern[events[k]] += 1
    return new_positions, duplicates


_NO_FRAMES = np.zeros(0, np.uint64)


@dataclass
class PatternAccumulator:
    """The running summed pattern of one scan."""

    header: FrameHeader
    pattern: np.ndarray
    seen_positions: np.ndarray
    seen_frames: np.ndarray
    frames_seen: int = 0
    positions_seen: int = 0
    duplicates: int = 0
    next_emit: int = 0

    @classmethod
    def empty(cls, header: FrameHeader, emit_every: int) -> PatternAccumulator:
        """Zero counts, plus one bit per expected frame when the header gives total_frames."""
        return cls(
            header,
            np.zeros(header.n_pixels, np.int64),
            np.zeros(header.n_positions, np.uint8),
            np.zeros(-(-(header.total_frames or 0) // 8), np.uint8),
            next_emit=emit_every,
        )

    def add(self, batch: SparseFrameBatch) -> int:
        """Sum ``batch``'s events; return how many of its frames were redeliveries (skipped).

        Raises ValueError, before touching the sums, for a batch that does not
        belong to this scan's shape or whose events, positions or frame numbers
        are out of range (the kernel does not check bounds).
        """
        h, mine = batch.header, self.header
        if (h.scan_shape, h.frame_shape, h.total_frames) != (mine.scan_shape, mine.frame_shape, mine.total_frames):
            raise ValueError(
                f"scan {h.scan_number}: batch has scan_shape {h.scan_shape}, frame_shape {h.frame_shape}, "
                f"total_frames {h.total_frames}, but the scan started with {mine.scan_shape}, "
                f"{mine.frame_shape}, {mine.total_frames}"
            )
        n = batch.n_frames
        if len(batch.offsets) != n + 1 or len(batch.frame_numbers) != n:
            raise ValueError(f"scan {h.scan_number}: batch has {len(batch.offsets)} offsets for {n} frames")
        if n and (
            batch.offsets[0] != 0 or batch.offsets[-1] != len(batch.events) or (np.diff(batch.offsets) < 0).any()
        ):
            raise ValueError(f"scan {h.scan_number}: offsets do not run monotonically from 0 to len(events)")
        if len(batch.events) and int(batch.events.max()) >= mine.n_pixels:
            raise ValueError(
                f"scan {h.scan_number}: event index {int(batch.events.max())} out of range "
                f"for frame_shape {mine.frame_shape}"
            )
        if n and int(batch.scan_positions.max()) >= mine.n_positions:
            raise ValueError(
                f"scan {h.scan_number}: scan position {int(batch.scan_positions.max())} out of range "
                f"for scan_shape {mine.scan_shape}"
            )
        dedup = mine.total_frames is not None
        if dedup and n and int(batch.frame_numbers.max()) >= mine.total_frames:
            raise ValueError(
                f"scan {h.scan_number}: frame number {int(batch.frame_numbers.max())} out of range "
                f"for a scan of {mine.total_frames} frames"
            )
        new_positions, duplicates = sum_events_kernel(
            batch.events, batch.offsets, batch.scan_positions,
            batch.frame_numbers if dedup else _NO_FRAMES, dedup, self.seen_frames,
            self.seen_positions, self.pattern,
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

    def image(self, final: bool) -> Image:
        return Image(
            self.header,
            IMAGE_NAME,
            self.pattern.reshape(self.header.frame_shape).astype(np.float32),
            units=UNITS,
            frames_seen=self.frames_seen,
            final=final,
            complete=self.complete,
        )


@dataclass
class _ScanState:
    """Everything diffraction_sum keeps for one scan number, in one state cell.

    One cell, not several: the SDK's state cache weighs every cell it commits.
    """

    acc: PatternAccumulator | None = None
    finished: bool = False
    latest: Timestamp | None = None


class _DiffractionSumFn(beam.DoFn):
    STATE = ReadModifyWriteStateSpec("scan", PickleCoder())
    TIMEOUT = TimerSpec("timeout", TimeDomain.WATERMARK)

    def __init__(self, name: str, params: DiffractionSumParams) -> None:
        self._name = name
        self._params = params

    def setup(self) -> None:
        self._metrics = OperatorMetrics()
        self._completed = Metrics.counter(METRICS_NAMESPACE, "scans_completed")
        self._timed_out = Metrics.counter(METRICS_NAMESPACE, "scans_timed_out")
        self._snapshots = Metrics.counter(METRICS_NAMESPACE, "progressive_images")
        self._duplicates = Metrics.counter(METRICS_NAMESPACE, "duplicate_frames")

    def process(
        self,
        element: tuple[int, SparseFrameBatch],
        timestamp: Timestamp = beam.DoFn.TimestampParam,
        state_cell: Any = beam.DoFn.StateParam(STATE),
        timeout: Any = beam.DoFn.TimerParam(TIMEOUT),
    ) -> Iterator[Any]:
        scan_number, batch = element
        started = time.perf_counter()
        state = state_cell.read() or _ScanState()
        try:
            if state.finished:
                raise LateFrameError(f"scan {scan_number} already emitted its final pattern; {len(batch)} frames late")
            acc = state.acc or PatternAccumulator.empty(batch.header, self._params.emit_every)
            duplicates = acc.add(batch)
        except Exception as exc:  # the batch goes to dead letters; the scan goes on
            self._metrics.errors.inc()
            yield pvalue.TaggedOutput(DEAD_LETTER, DeadLetter.from_exception(self._name, batch, exc))
            return
        finally:
            self._metrics.observe(batch, started)

        if duplicates:
            self._duplicates.inc(duplicates)
            log.warning("scan %d: skipped %d frames already summed (redelivered)", scan_number, duplicates)
        state.latest = max(timestamp, state.latest or timestamp)

        if acc.complete:
            # Stay finished for a while, so stragglers become dead letters instead
            # of a second, incomplete "final" pattern that would replace this one.
            timeout.set(state.latest + Duration.of(self._params.finished_retention_s))
            state_cell.write(_ScanState(finished=True, latest=state.latest))
            self._completed.inc()
            self._metrics.frames_out.inc(acc.frames_seen)
            log.info("scan %d complete: %d frames summed", scan_number, acc.frames_seen)
            yield acc.image(final=True)
            return
        timeout.set(state.latest + Duration.of(self._params.timeout_s))
        if self._params.emit_every and acc.frames_seen >= acc.next_emit:
            every = self._params.emit_every
            acc.next_emit = (acc.frames_seen // every + 1) * every
            self._snapshots.inc()
            yield acc.image(final=False)
        state.acc = acc
        state_cell.write(state)

    @on_timer(TIMEOUT)
    def flush(
        self,
        key: int = beam.DoFn.KeyParam,
        state_cell: Any = beam.DoFn.StateParam(STATE),
    ) -> Iterator[Image]:
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
            yield acc.image(final=True)


class diffraction_sum(Operator):  # noqa: N801 - catalog names are lowercase like the decorated operators
    """Sum the counted frames of each scan into one diffraction pattern, progressive and final."""

    name = "diffraction_sum"
    title = "Summed diffraction pattern"
    description = (
        "Sums the events of every frame of a scan per detector pixel in keyed state; emits an Image "
        "'diffraction_sum' (frame_shape, counts) every emit_every frames and when the scan is complete "
        "(or after timeout_s without frames)."
    )
    Params = DiffractionSumParams
    inputs = {"in": Port(SparseFrameBatch, "Counted frames")}
    outputs = {"image": Port(Image, "Image 'diffraction_sum': event counts per detector pixel, shape frame_shape")}

    def build(self, main: pvalue.PCollection) -> Mapping[str, pvalue.PCollection]:
        results = (
            main
            | "KeyByScan"
            >> beam.Map(lambda b: (b.header.scan_number, b)).with_output_types(tuple[int, SparseFrameBatch])
            | "Sum" >> beam.ParDo(_DiffractionSumFn(self.name, self.params)).with_outputs(DEAD_LETTER, main="image")
        )
        return {"image": results.image, DEAD_LETTER: results[DEAD_LETTER]}
