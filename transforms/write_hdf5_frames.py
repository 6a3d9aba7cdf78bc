"""write_hdf5_frames: sparse batches -> one stempy HDF5 file per scan.

So a live scan can be saved and reprocessed later (read_hdf5_frames, stempy).
Batches are grouped per scan in event-time sessions: a scan's file is written
once no frame of it has arrived for ``gap_s`` seconds of event time (in a
bounded run, at end of input). Frames are written in frame-number order, each
once: a frame redelivered (Kafka is at-least-once) is counted in the
``duplicate_frames`` metric and skipped. A scan whose frames pause for longer
than ``gap_s`` is two sessions, and its second write finds the first's file
(a dead letter, or with ``overwrite`` a file of the second part alone), so
``gap_s`` should exceed the longest pause within a scan.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import apache_beam as beam
import numpy as np
from apache_beam import pvalue
from apache_beam.metrics import Metrics
from apache_beam.transforms.window import GlobalWindows, Sessions
from pydantic import Field

from beamops import DEAD_LETTER, Operator, OperatorParams, Port, SparseFrameBatch
from beamops.io.files import fails_every_file, output_dir, unwritable
from beamops.io.hdf5 import check_same_scan, write_stempy_hdf5
from beamops.operator import LONGEST_DURATION_S, METRICS_NAMESPACE, OperatorMetrics
from beamops.spec import Mount


class WriteHdf5Params(OperatorParams):
    out_dir: Mount = Field("out", description="Directory for scan_<N>.h5 files.")
    gap_s: float = Field(
        60.0,
        gt=0,
        le=LONGEST_DURATION_S,
        description=(
            "A scan's file is written after this many seconds of event time without frames; "
            "longer than any pause within a scan."
        ),
    )
    overwrite: bool = Field(False, description="Replace an existing file of the same scan.")


class _WriteScanFn(beam.DoFn):
    def __init__(self, params: WriteHdf5Params) -> None:
        self._params = params

    def setup(self) -> None:
        self._metrics = OperatorMetrics("write_hdf5_frames")
        self._duplicates = Metrics.counter(METRICS_NAMESPACE, "duplicate_frames")
        self._log = logging.getLogger(__name__)

    def process(self, element: tuple[int, Iterable[SparseFrameBatch]]) -> Iterator[object]:
        scan, batches = element
        batches = list(batches)
        path = Path(self._params.out_dir) / f"scan_{scan:06d}.h5"
        try:
            output_dir(path.parent)
            frames, duplicates = _each_frame_once_in_order(path, batches)
            write_stempy_hdf5(path, frames, overwrite=self._params.overwrite)
        except (OSError, ValueError) as exc:
            if isinstance(exc, OSError) and fails_every_file(exc):
                raise unwritable(path, exc) from exc
            # This scan's problem (saved before and overwrite=False, a directory in the file's place,
            # batches of one scan number that disagree on its shape): its batches go to dead letters.
            for batch in batches:
                yield self._metrics.to_dead_letters(batch, exc)
            return
        if duplicates:
            self._duplicates.inc(duplicates)
            self._log.warning("scan %d: skipped %d frames written already (redelivered)", scan, duplicates)
        self._metrics.frames_in.inc(sum(b.n_frames for b in batches))
        yield str(path)


def _each_frame_once_in_order(
    path: Path, batches: list[SparseFrameBatch], frames_per_batch: int = 4096
) -> tuple[Iterator[SparseFrameBatch], int]:
    """The frames of ``batches`` in frame-number order, the first copy of each number only, as batches
    of up to ``frames_per_batch``; and how many copies were left out. ValueError if the batches are
    not all of one scan (number and shapes)."""
    if not batches:
        return iter(()), 0
    header = batches[0].header
    for b in batches:
        check_same_scan(str(path), header, b.header)
    numbers = np.concatenate([b.frame_numbers for b in batches])
    positions = np.concatenate([b.scan_positions for b in batches])
    events = np.concatenate([b.events for b in batches])
    lengths = np.concatenate([np.diff(b.offsets) for b in batches])
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)  # of each frame in ``events``
    order = np.argsort(numbers, kind="stable")  # stable: the first copy of a number comes first
    first = np.ones(len(order), bool)
    first[1:] = numbers[order[1:]] != numbers[order[:-1]]
    keep = order[first]

    def chunks() -> Iterator[SparseFrameBatch]:
        for begin in range(0, len(keep), frames_per_batch):
            chosen = keep[begin : begin + frames_per_batch]
            n = lengths[chosen]
            offsets = np.concatenate([[0], np.cumsum(n)]).astype(np.int64)
            # each chosen frame's events, back to back: its start in ``events`` plus 0 .. its length - 1
            gather = np.repeat(starts[chosen] - offsets[:-1], n) + np.arange(offsets[-1])
            batch = SparseFrameBatch(header, events[gather], offsets, positions[chosen], numbers[chosen])
            batch.validate()
            yield batch

    return chunks(), len(order) - len(keep)


class write_hdf5_frames(Operator):  # noqa: N801 - catalog names are lowercase like the decorated operators
    """Save counted frames as stempy HDF5 files, one per scan."""

    name = "write_hdf5_frames"
    title = "Write frames to stempy HDF5 files"
    description = "Writes each scan's counted frames to <out_dir>/scan_<N>.h5 in stempy's layout."
    Params = WriteHdf5Params
    inputs = {"in": Port(SparseFrameBatch, "Counted frames")}
    outputs = {"path": Port(str, "Files written")}

    def build(self, main: pvalue.PCollection) -> Mapping[str, pvalue.PCollection]:
        results = (
            main
            | "KeyByScan" >> beam.Map(lambda b: (b.header.scan_number, b))
            | "ScanSessions" >> beam.WindowInto(Sessions(self.params.gap_s))
            | "GroupScan" >> beam.GroupByKey()
            | "Write" >> beam.ParDo(_WriteScanFn(self.params)).with_outputs(DEAD_LETTER, main="path")
        )
        # Back to the global window, so these outputs flatten with other operators' dead letters.
        path = results.path | "PathsGlobal" >> beam.WindowInto(GlobalWindows())
        dead = results[DEAD_LETTER] | "DeadGlobal" >> beam.WindowInto(GlobalWindows())
        return {"path": path, DEAD_LETTER: dead}
