"""read_hdf5_frames: a recorded scan in stempy's HDF5 layout, as a source of sparse batches.

The same pipeline then processes a recorded scan as it would a live one. The
file is streamed one batch at a time (see beamops.io.hdf5.read_stempy_hdf5);
batches are stamped with their first frame's time at ``frame_rate_hz`` so
event-time operators (timeouts) behave as in a live run.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path

import apache_beam as beam
from apache_beam import pvalue
from apache_beam.transforms.window import TimestampedValue
from pydantic import Field

from beamops import DEAD_LETTER, FrameHeader, Operator, OperatorParams, Port, SparseFrameBatch
from beamops.io.hdf5 import StempyFormatError, read_stempy_hdf5, stempy_header
from beamops.operator import OperatorMetrics
from beamops.spec import Mount


class ReadHdf5Params(OperatorParams):
    path: Mount = Field(description="A stempy electron-counted HDF5 file (electron_events/frames, scan_positions).")
    batch_size: int = Field(1000, ge=1, description="Frames per emitted batch.")
    scan_number: int | None = Field(None, ge=0, description="Scan number to stamp; unset: the file's, else 1.")
    frame_rate_hz: float = Field(87_000.0, gt=0, description="Frame rate used for event timestamps (frames/s).")


class _ReadFileFn(beam.DoFn):
    def __init__(self, params: ReadHdf5Params) -> None:
        self._params = params

    def setup(self) -> None:
        self._metrics = OperatorMetrics("read_hdf5_frames")

    def process(self, path: str) -> Iterator[object]:
        p = self._params
        frames_before = 0
        bad_rows: list[StempyFormatError] = []  # rows that do not decode: dead letters, the rest of the file goes on
        try:
            for batch in read_stempy_hdf5(path, p.batch_size, p.scan_number, on_bad_rows=bad_rows.append):
                yield from self._dead_letters(path, bad_rows)
                self._metrics.frames_out.inc(batch.n_frames)
                yield TimestampedValue(batch.with_origin({"file": path}), frames_before / p.frame_rate_hz)
                frames_before += batch.n_frames
            yield from self._dead_letters(path, bad_rows)
        except (OSError, ValueError) as exc:  # a bad file is a dead letter naming it; the pipeline goes on
            yield from self._dead_letters(path, bad_rows)  # rows found bad before the file failed
            yield self._metrics.to_dead_letters(path.encode(), exc)

    def _dead_letters(self, path: str, bad_rows: list[StempyFormatError]) -> Iterator[object]:
        """One dead letter per batch of rows that did not decode; its error names the file and the rows."""
        for exc in bad_rows:
            yield self._metrics.to_dead_letters(path.encode(), exc)
        bad_rows.clear()


class read_hdf5_frames(Operator):  # noqa: N801 - catalog names are lowercase like the decorated operators
    """Counted frames from a stempy HDF5 file."""

    name = "read_hdf5_frames"
    title = "Read frames from a stempy HDF5 file"
    description = "Streams a recorded scan (stempy's electron-counted HDF5 layout) as sparse frame batches."
    Params = ReadHdf5Params
    outputs = {"frames": Port(SparseFrameBatch, "Counted frames, in file order")}

    def planned_scan(self) -> FrameHeader:
        """The header its batches will carry, from the file: a pipeline definition refuses, before it runs,
        a file it cannot read and a scan too large for a reduction downstream."""
        path = Path(self.params.path)
        try:
            return stempy_header(path, self.params.scan_number)[1]
        except FileNotFoundError as exc:
            if path.is_absolute():
                raise
            raise FileNotFoundError(f"{exc} (looked for in {Path.cwd()})") from None

    def build(self, root: pvalue.PBegin) -> Mapping[str, pvalue.PCollection]:
        results = (
            root
            | "Path" >> beam.Create([self.params.path])
            | "Read" >> beam.ParDo(_ReadFileFn(self.params)).with_outputs(DEAD_LETTER, main="frames")
        )
        return {"frames": results.frames, DEAD_LETTER: results[DEAD_LETTER]}
