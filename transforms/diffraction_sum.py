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

The keyed-state machinery (one state cell per scan, an event-time timer for
the timeout and the retention, emissions, dead letters, metrics) is
:mod:`beamops.scan_reduce`'s; this module adds the summed pattern.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numba import njit

from beamops import FrameHeader, Image, Port, SparseFrameBatch
from beamops.scan_reduce import ScanProgress, ScanReduceFn, ScanReduceOperator, ScanReduceParams, zeroed

IMAGE_NAME = "diffraction_sum"
UNITS = "counts"


class DiffractionSumParams(ScanReduceParams):
    progressive_output = "a progressive pattern"
    final_output = "pattern"
    frames_verb = "summed"

    @property
    def image_names(self) -> tuple[str, ...]:
        return (IMAGE_NAME,)


@njit(cache=True, nogil=True)
def sum_events_kernel(
    events: np.ndarray,
    offsets: np.ndarray,
    positions: np.ndarray,
    fresh: np.ndarray,
    seen_positions: np.ndarray,
    pattern: np.ndarray,
) -> int:
    """Scatter-add every event of every ``fresh`` frame into ``pattern``; return newly seen positions."""
    new_positions = 0
    for i in range(len(positions)):
        if not fresh[i]:
            continue
        p = positions[i]
        new_positions += seen_positions[p] == 0
        seen_positions[p] = 1
        for k in range(offsets[i], offsets[i + 1]):
            pattern[events[k]] += 1
    return new_positions


@dataclass
class PatternAccumulator(ScanProgress):
    """The running summed pattern of one scan."""

    pattern: np.ndarray
    seen_positions: np.ndarray

    @classmethod
    def empty(cls, header: FrameHeader, emit_every: int) -> PatternAccumulator:
        """Zero counts, plus one bit per expected frame when the header gives total_frames."""
        return cls(
            header,
            zeroed(header.n_pixels, np.int64),
            zeroed(header.n_positions, np.uint8),
            next_emit=emit_every,
        )

    def add(self, batch: SparseFrameBatch) -> int:
        """Sum ``batch``'s events; return how many of its frames were redeliveries (skipped).

        Raises ValueError, before touching the sums, for a batch that does not
        belong to this scan's shape or whose events, positions or frame numbers
        are out of range (the kernel does not check bounds).
        """
        self.check_sparse_batch(batch)
        fresh, duplicates = self.fresh_in_range(batch.header, batch.scan_positions, batch.frame_numbers)
        new_positions = sum_events_kernel(
            batch.events, batch.offsets, batch.scan_positions, fresh, self.seen_positions, self.pattern
        )
        return self.count(batch.n_frames, new_positions, duplicates)

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


class _DiffractionSumFn(ScanReduceFn):
    progressive_metric = "progressive_images"

    def new_accumulator(self, batch: SparseFrameBatch) -> PatternAccumulator:
        return PatternAccumulator.empty(batch.header, self._params.emit_every)

    def state_bytes(self, header: FrameHeader) -> int:
        return header.n_pixels * 8 + header.n_positions  # pattern, seen_positions

    def outputs(self, acc: PatternAccumulator, final: bool) -> list[Image]:
        return [acc.image(final=final)]


class diffraction_sum(ScanReduceOperator):  # noqa: N801 - catalog names are lowercase like the decorated operators
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
    Fn = _DiffractionSumFn
    step = "Sum"
