"""write_hdf5_frames: sparse batches -> one stempy HDF5 file per scan.

So a live scan can be saved and reprocessed later (read_hdf5_frames, stempy).
Batches are grouped per scan in event-time sessions: a scan's file is written
once no frame of it has arrived for ``gap_s`` seconds of event time (in a
bounded run, at end of input). Frames are written in frame-number order, each
once: a frame redelivered (Kafka is at-least-once) is counted in the
``duplicate_frames`` metric and skipped.

A scan whose frames pause for longer than ``gap_s`` is several sessions. The
file stores the id of the job run that wrote it (``metadata/beamops`` attribute
``run_id``: the parameter of that name, else drawn when the pipeline is built, so
the same on every worker and after a restart from a checkpoint). A later session
finding this run's file reads it back one batch at a time, merges its frames in
(a frame already in the file is a duplicate) and replaces the file atomically:
the scan ends up as one file. A file from anything else (an earlier run, a job
built again with another ``run_id``, another writer) is not merged into: the
scan goes to dead letters, or with ``overwrite`` replaces it once and then
merges later sessions into it. A job resubmitted from a savepoint is built
again: give it the same ``run_id`` parameter to go on with its files. A
replayed session (a restart after the file was written) merges into the file
and changes nothing. Only the session's frames are in memory: the file is read
one batch at a time. So a short ``gap_s`` costs rewrites of the file, not frames.
The group's ``provenance`` attribute says what made the frames (JSON of the operators
upstream and their parameters, see ``beamops.provenance``).
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Annotated

import apache_beam as beam
import numpy as np
from apache_beam import pvalue
from apache_beam.transforms.window import GlobalWindows, Sessions
from pydantic import Field

from beamops import DEAD_LETTER, FrameHeader, Operator, OperatorParams, Port, SparseFrameBatch
from beamops.io.files import fails_every_file, output_dir, unwritable
from beamops.io.hdf5 import check_same_scan, inspect_stempy_hdf5, read_stempy_hdf5, write_stempy_hdf5
from beamops.operator import LONGEST_DURATION_S, OperatorMetrics
from beamops.spec import Mount, OutputFiles


class WriteHdf5Params(OperatorParams):
    out_dir: Annotated[Mount, OutputFiles("scan_<N>.h5", glob="scan_*.h5")] = Field(
        "out", description="Directory for scan_<N>.h5 files."
    )
    gap_s: float = Field(
        60.0,
        gt=0,
        le=LONGEST_DURATION_S,
        description=(
            "A scan's file is written after this many seconds of event time without frames; "
            "frames after a longer pause are merged into the file this run wrote (a rewrite)."
        ),
    )
    overwrite: bool = Field(
        False, description="Replace a file of the same scan left by an earlier run (one this run wrote is merged into)."
    )
    run_id: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9_.:-]{1,128}$",
        description=(
            "Names the run that writes the files: a run with the same id merges into them. Give one to a job "
            "that will be resubmitted from a savepoint, so it goes on with the files of its open scans. "
            "Default: drawn when the pipeline is built (every build is another run)."
        ),
    )


# Sessions of one scan may reach one worker's threads at once (the DirectRunner runs bundles in
# parallel); a merge reads, rewrites and replaces the file, so two at once would lose one's frames.
# Striped by scan number: a bounded set of locks for any number of scans. (On Flink all sessions of a
# scan come from one GroupByKey key, so one subtask, one after another.)
_SCAN_LOCKS = tuple(threading.Lock() for _ in range(64))


class _WriteScanFn(beam.DoFn):
    def __init__(self, params: WriteHdf5Params, run_id: str, provenance: str) -> None:
        self._params = params
        self._run_id = run_id
        self._provenance = provenance

    def setup(self) -> None:
        self._metrics = OperatorMetrics("write_hdf5_frames")
        self._log = logging.getLogger(__name__)

    def process(self, element: tuple[int, Iterable[SparseFrameBatch]]) -> Iterator[object]:
        scan, batches = element
        batches = list(batches)
        path = Path(self._params.out_dir).expanduser() / f"scan_{scan:06d}.h5"
        try:
            output_dir(path.parent)
            with _SCAN_LOCKS[scan % len(_SCAN_LOCKS)]:
                new_frames = self._write(path, batches)
        except (OSError, ValueError) as exc:
            if isinstance(exc, OSError) and fails_every_file(exc):
                raise unwritable(path, exc) from exc
            # This scan's problem (saved by an earlier run and overwrite=False, a directory in the file's
            # place, batches of one scan number that disagree on its shape): its batches go to dead letters.
            for batch in batches:
                yield self._metrics.to_dead_letters(batch, exc)
            return
        frames_in = sum(b.n_frames for b in batches)
        self._metrics.skipped_redeliveries(self._log, scan, frames_in - new_frames, "written")
        self._metrics.frames_in.inc(frames_in)
        yield str(path)

    def _write(self, path: Path, batches: list[SparseFrameBatch]) -> int:
        """Write ``batches`` to ``path``, merged into the file this run wrote there before if any (a scan
        that paused for longer than ``gap_s``); how many of their frames were not in the file yet."""
        before = self._frames_written_by_this_run(path)
        earlier = () if before is None else read_stempy_hdf5(path, _FRAMES_PER_BATCH)
        frames = _each_frame_once_in_order(path, batches, earlier)
        # Written under a temporary name and renamed: a merge leaves either the earlier sessions or all of them.
        overwrite = self._params.overwrite or before is not None
        try:
            written = write_stempy_hdf5(
                path, frames, overwrite=overwrite, run_id=self._run_id, provenance=self._provenance
            )
        except FileExistsError as exc:
            raise FileExistsError(
                f"{path} was written before this run; set write_hdf5_frames' overwrite parameter to true to replace it"
            ) from exc
        return written.n_frames - (before or 0)

    def _frames_written_by_this_run(self, path: Path) -> int | None:
        """How many frames the file at ``path`` holds if this run wrote it, else None."""
        try:
            info = inspect_stempy_hdf5(path)
        except (OSError, ValueError):  # no file, a directory, not a stempy file: not this run's
            return None
        return info.n_frames if info.run_id == self._run_id else None


_FRAMES_PER_BATCH = 4096  # frames per batch handed to the writer: bounds the copies made to sort them


class _Frames:
    """The frames of batches of one scan, concatenated, to pick from by index."""

    def __init__(self, header: FrameHeader, batches: list[SparseFrameBatch]) -> None:
        self.header = header
        self.numbers = np.concatenate([b.frame_numbers for b in batches])
        self.positions = np.concatenate([b.scan_positions for b in batches])
        self.events = np.concatenate([b.events for b in batches])
        self.lengths = np.concatenate([np.diff(b.offsets) for b in batches])
        self.starts = np.concatenate([[0], np.cumsum(self.lengths)[:-1]]).astype(np.int64)  # of each frame

    def first_of_each_number(self) -> np.ndarray:
        """Indices of the frames in frame-number order, of the first copy of each number only."""
        order = np.argsort(self.numbers, kind="stable")  # stable: the first copy of a number comes first
        first = np.ones(len(order), bool)
        first[1:] = self.numbers[order[1:]] != self.numbers[order[:-1]]
        return order[first]

    def pick(self, chosen: np.ndarray) -> SparseFrameBatch:
        """The frames at indices ``chosen``, in that order, as one batch.

        Not checked again: picking keeps valid frames valid, and every frame was checked once, where
        it came in (:func:`_each_frame_once_in_order` for new ones, :func:`read_stempy_hdf5` for the file's).
        """
        n = self.lengths[chosen]
        offsets = np.concatenate([[0], np.cumsum(n)]).astype(np.int64)
        # each chosen frame's events, back to back: its start in ``events`` plus 0 .. its length - 1
        gather = np.repeat(self.starts[chosen] - offsets[:-1], n) + np.arange(offsets[-1])
        return SparseFrameBatch(self.header, self.events[gather], offsets, self.positions[chosen], self.numbers[chosen])


def _each_frame_once_in_order(
    path: Path, batches: list[SparseFrameBatch], earlier: Iterable[SparseFrameBatch] = ()
) -> Iterator[SparseFrameBatch]:
    """The frames of ``earlier`` and ``batches`` in frame-number order, each number once, as batches.

    ``earlier`` are the frames this run wrote to ``path`` before, in frame-number order and each
    once, checked as :func:`read_stempy_hdf5` reads them; they are streamed, one batch in memory at a
    time. A number in both is kept from ``earlier``, and of copies within ``batches`` the first is
    kept. The frames take the header of ``batches`` (the live scan's, e.g. its declared total).
    ValueError if the frames are not all of one scan (number and shapes), or a batch is not valid
    (a scan position or pixel out of range, say): checked here, before copies are dropped, so a
    bad batch is refused whichever copy of its frames came first.
    """
    if not batches:
        return
    header = batches[0].header
    for b in batches:
        check_same_scan(str(path), header, b.header)
        b.validate()
    new = _Frames(header, batches)
    keep = new.first_of_each_number()
    kept_numbers = new.numbers[keep]
    done = 0  # how many of ``keep`` are yielded
    for old in earlier:
        check_same_scan(str(path), header, old.header)
        below = int(np.searchsorted(kept_numbers, old.frame_numbers[0], side="left"))
        upto = int(np.searchsorted(kept_numbers, old.frame_numbers[-1], side="right"))
        yield from _in_batches(new, keep[done:below])
        # The new frames numbered within ``old``'s range go in among its frames; ``old``'s come first in
        # the pool, so of a number in both, the file's frame is kept and the new copy dropped.
        pool = _Frames(header, [old, new.pick(keep[below:upto])])
        done = upto
        yield pool.pick(pool.first_of_each_number())
    yield from _in_batches(new, keep[done:])


def _in_batches(frames: _Frames, chosen: np.ndarray) -> Iterator[SparseFrameBatch]:
    """The frames at indices ``chosen``, in that order, as batches of up to ``_FRAMES_PER_BATCH``."""
    for begin in range(0, len(chosen), _FRAMES_PER_BATCH):
        yield frames.pick(chosen[begin : begin + _FRAMES_PER_BATCH])


class write_hdf5_frames(Operator):  # noqa: N801 - catalog names are lowercase like the decorated operators
    """Save counted frames as stempy HDF5 files, one per scan."""

    name = "write_hdf5_frames"
    title = "Write frames to stempy HDF5 files"
    description = "Writes each scan's counted frames to <out_dir>/scan_<N>.h5 in stempy's layout."
    Params = WriteHdf5Params
    inputs = {"in": Port(SparseFrameBatch, "Counted frames")}
    outputs = {"path": Port(str, "Files written")}

    def build(self, main: pvalue.PCollection) -> Mapping[str, pvalue.PCollection]:
        # Drawn here, once, and pickled with the DoFn: every worker, and the job restarted from a
        # checkpoint, recognise this run's files by it; a job built again is another run, unless given.
        run_id = self.params.run_id or uuid.uuid4().hex
        write = _WriteScanFn(self.params, run_id=run_id, provenance=self.provenance.to_json())
        results = (
            main
            | "KeyByScan" >> beam.Map(lambda b: (b.header.scan_number, b))
            | "ScanSessions" >> beam.WindowInto(Sessions(self.params.gap_s))
            | "GroupScan" >> beam.GroupByKey()
            | "Write" >> beam.ParDo(write).with_outputs(DEAD_LETTER, main="path")
        )
        # Back to the global window, so these outputs flatten with other operators' dead letters.
        path = results.path | "PathsGlobal" >> beam.WindowInto(GlobalWindows())
        dead = results[DEAD_LETTER] | "DeadGlobal" >> beam.WindowInto(GlobalWindows())
        return {"path": path, DEAD_LETTER: dead}
