"""write_hdf5_frames: sparse batches -> one stempy HDF5 file per scan.

So a live scan can be saved and reprocessed later (read_hdf5_frames, stempy).
Batches are grouped per scan in event-time sessions: a scan's file is written
once no frame of it has arrived for ``gap_s`` seconds of event time (in a
bounded run, at end of input). Frames are written in frame-number order.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import apache_beam as beam
from apache_beam import pvalue
from apache_beam.transforms.window import GlobalWindows, Sessions
from pydantic import Field

from beamops import DEAD_LETTER, Operator, OperatorParams, Port, SparseFrameBatch
from beamops.io.files import fails_every_file, output_dir, unwritable
from beamops.io.hdf5 import write_stempy_hdf5
from beamops.operator import OperatorMetrics
from beamops.spec import Mount


class WriteHdf5Params(OperatorParams):
    out_dir: Mount = Field("out", description="Directory for scan_<N>.h5 files.")
    gap_s: float = Field(60.0, gt=0, description="A scan's file is written after this many seconds without frames.")
    overwrite: bool = Field(False, description="Replace an existing file of the same scan.")


class _WriteScanFn(beam.DoFn):
    def __init__(self, params: WriteHdf5Params) -> None:
        self._params = params

    def setup(self) -> None:
        self._metrics = OperatorMetrics("write_hdf5_frames")

    def process(self, element: tuple[int, Iterable[SparseFrameBatch]]) -> Iterator[object]:
        scan, batches = element
        ordered = sorted(batches, key=lambda b: int(b.frame_numbers[0]) if b.n_frames else -1)
        path = Path(self._params.out_dir) / f"scan_{scan:06d}.h5"
        try:
            output_dir(path.parent)
            write_stempy_hdf5(path, ordered, overwrite=self._params.overwrite)
        except (OSError, ValueError) as exc:
            if isinstance(exc, OSError) and fails_every_file(exc):
                raise unwritable(path, exc) from exc
            # This scan's problem (saved before and overwrite=False, a directory in the file's place,
            # batches of one scan number that disagree on its shape): its batches go to dead letters.
            for batch in ordered:
                yield self._metrics.to_dead_letters(batch, exc)
            return
        self._metrics.frames_in.inc(sum(b.n_frames for b in ordered))
        yield str(path)


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
