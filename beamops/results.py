"""Results: ComPartial and ComMap of the center-of-mass chain, and Image.

Units are detector pixels; ``x`` is the detector column and ``y`` the row.
All three encode to one Arrow IPC stream like the frame batches, so they can
go to Kafka, to dead letters or to files in one documented format.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa

from beamops.frames import FrameBatch, FrameDecodeError, FrameHeader, _write_ipc, decode_batch

_HEADER_KEY = b"beamops.header"
_KIND_KEY = b"beamops.kind"
_STATE_KEY = b"beamops.com_map"
_IMAGE_STATE_KEY = b"beamops.image"


def _read_ipc(data: bytes, cls: type) -> tuple[dict[bytes, bytes], FrameHeader, pa.RecordBatch]:
    """The schema metadata, header and record batch of a ``cls.to_bytes()`` stream; FrameDecodeError
    if it is not one."""
    reader = pa.ipc.open_stream(pa.py_buffer(data))
    meta = reader.schema.metadata or {}
    if meta.get(_KIND_KEY) != cls.KIND.encode():
        raise FrameDecodeError(f"not a {cls.__name__} (kind={meta.get(_KIND_KEY)!r})")
    return meta, FrameHeader.from_json(meta[_HEADER_KEY]), reader.read_next_batch()


@contextlib.contextmanager
def _decode_errors() -> Iterator[None]:
    """Any failure to read untrusted bytes as a FrameDecodeError."""
    try:
        yield
    except FrameDecodeError:
        raise
    except Exception as exc:
        raise FrameDecodeError(f"{type(exc).__name__}: {exc}") from exc


@dataclass(frozen=True, eq=False)
class ComPartial:
    """Per-frame center-of-mass sums, small enough to shuffle.

    For each frame: its flat ``scan_positions`` (uint32), ``sum_x`` and ``sum_y``
    (float64: sums of the column and row index of the kept events) and
    ``counts`` (int64: number of kept events), and the frames'
    ``frame_numbers`` when known (they let the reduction drop redelivered
    frames). The mean is
    ``sum_x / counts``; keeping sums, not means, makes the reduction exact
    when one position's frames arrive in different batches.
    """

    KIND: ClassVar[str] = "com_partial"

    header: FrameHeader
    scan_positions: np.ndarray
    sum_x: np.ndarray
    sum_y: np.ndarray
    counts: np.ndarray
    frame_numbers: np.ndarray | None = None
    origin: dict[str, Any] | None = field(default=None, compare=False)

    def __len__(self) -> int:
        return len(self.scan_positions)

    @property
    def n_frames(self) -> int:
        return len(self.scan_positions)

    def to_bytes(self) -> bytes:
        columns = {
            "scan_position": pa.array(self.scan_positions, pa.uint32()),
            "sum_x": pa.array(self.sum_x, pa.float64()),
            "sum_y": pa.array(self.sum_y, pa.float64()),
            "count": pa.array(self.counts, pa.int64()),
        }
        if self.frame_numbers is not None:
            columns["frame_number"] = pa.array(self.frame_numbers, pa.uint64())
        rb = pa.RecordBatch.from_arrays(list(columns.values()), names=list(columns))
        rb = rb.replace_schema_metadata({_KIND_KEY: self.KIND.encode(), _HEADER_KEY: self.header.to_json()})
        return _write_ipc(rb)

    @classmethod
    def from_bytes(cls, data: bytes) -> ComPartial:
        with _decode_errors():
            _, header, rb = _read_ipc(data, cls)
            numbers = rb.column("frame_number").to_numpy() if "frame_number" in rb.schema.names else None
            columns = [rb.column(name).to_numpy() for name in ("scan_position", "sum_x", "sum_y", "count")]
            return cls(header, *columns, frame_numbers=numbers)


@dataclass(frozen=True, eq=False)
class ComMap:
    """Center of mass per scan position, in detector pixels.

    ``x`` (column) and ``y`` (row) are float32 arrays of shape
    ``header.scan_shape``; a position with no counted events is NaN unless the
    reduction was asked to replace NaNs. ``stacked()`` gives ``[x, y]``, the
    order of stempy's and interactEM's ``com[0]`` = column.

    ``final`` marks the last map of a scan; ``complete`` says whether every
    expected frame (or, without ``total_frames``, every position) was seen.
    A final map that is not complete was flushed by the timeout.
    """

    KIND: ClassVar[str] = "com_map"

    header: FrameHeader
    x: np.ndarray
    y: np.ndarray
    frames_seen: int
    positions_seen: int
    final: bool
    complete: bool

    @property
    def scan_number(self) -> int:
        return self.header.scan_number

    def stacked(self) -> np.ndarray:
        return np.stack([self.x, self.y])

    def counters(self) -> dict[str, Any]:
        """Scan number, ``final``, ``complete``, ``frames_seen``, ``positions_seen`` and the scan's ``positions``."""
        return {
            "scan": self.scan_number,
            "final": self.final,
            "complete": self.complete,
            "frames_seen": self.frames_seen,
            "positions_seen": self.positions_seen,
            "positions": self.header.n_positions,
        }

    def to_bytes(self) -> bytes:
        """Arrow IPC: columns ``x`` and ``y`` (float32, row-major scan order).

        Schema metadata: ``beamops.kind`` = ``com_map``, ``beamops.header`` (the
        batch header JSON) and ``beamops.com_map`` (JSON with frames_seen,
        positions_seen, final, complete).
        """
        rb = pa.RecordBatch.from_arrays(
            [pa.array(self.x.reshape(-1), pa.float32()), pa.array(self.y.reshape(-1), pa.float32())],
            names=["x", "y"],
        )
        state = {
            "frames_seen": self.frames_seen,
            "positions_seen": self.positions_seen,
            "final": self.final,
            "complete": self.complete,
        }
        rb = rb.replace_schema_metadata(
            {
                _KIND_KEY: self.KIND.encode(),
                _HEADER_KEY: self.header.to_json(),
                _STATE_KEY: json.dumps(state).encode(),
            }
        )
        return _write_ipc(rb)

    @classmethod
    def from_bytes(cls, data: bytes) -> ComMap:
        with _decode_errors():
            meta, header, rb = _read_ipc(data, cls)
            state = json.loads(meta[_STATE_KEY])
            shape = header.scan_shape
            return cls(
                header,
                rb.column("x").to_numpy().reshape(shape),
                rb.column("y").to_numpy().reshape(shape),
                int(state["frames_seen"]),
                int(state["positions_seen"]),
                bool(state["final"]),
                bool(state["complete"]),
            )


@dataclass(frozen=True, eq=False)
class Image:
    """A 2-D result of one scan: a virtual image, a phase, a summed diffraction pattern...

    ``data`` is float32 with shape (rows, cols): the scan shape for images over scan
    positions, the frame shape for detector-space images. ``name`` says what it is
    (``"bf"``, ``"adf"``, ``"phase"``, ``"diffraction_sum"``...), ``units`` its units.
    ``final`` and ``complete`` mean what they mean for :class:`ComMap`.
    """

    KIND: ClassVar[str] = "image"

    header: FrameHeader
    name: str
    data: np.ndarray
    units: str = ""
    frames_seen: int = 0
    final: bool = True
    complete: bool = True

    @property
    def scan_number(self) -> int:
        return self.header.scan_number

    def to_bytes(self) -> bytes:
        """Arrow IPC: one float32 column ``data`` (row-major), shape and state in the schema metadata."""
        rb = pa.RecordBatch.from_arrays([pa.array(self.data.reshape(-1), pa.float32())], names=["data"])
        state = {
            "name": self.name,
            "units": self.units,
            "shape": list(self.data.shape),
            "frames_seen": self.frames_seen,
            "final": self.final,
            "complete": self.complete,
        }
        rb = rb.replace_schema_metadata(
            {
                _KIND_KEY: self.KIND.encode(),
                _HEADER_KEY: self.header.to_json(),
                _IMAGE_STATE_KEY: json.dumps(state).encode(),
            }
        )
        return _write_ipc(rb)

    @classmethod
    def from_bytes(cls, data: bytes) -> Image:
        with _decode_errors():
            meta, header, rb = _read_ipc(data, cls)
            state = json.loads(meta[_IMAGE_STATE_KEY])
            return cls(
                header,
                str(state["name"]),
                rb.column("data").to_numpy().reshape(state["shape"]),
                str(state["units"]),
                int(state["frames_seen"]),
                bool(state["final"]),
                bool(state["complete"]),
            )


def decode_element(data: bytes) -> FrameBatch | ComPartial | ComMap | Image:
    """Any beamops element from its ``to_bytes()`` (a frame batch or a result), by the kind its Arrow
    schema names; FrameDecodeError for anything else."""
    with _decode_errors():
        kind = (pa.ipc.open_stream(pa.py_buffer(data)).schema.metadata or {}).get(_KIND_KEY)
    result = {cls.KIND.encode(): cls for cls in (ComPartial, ComMap, Image)}.get(kind)
    return result.from_bytes(data) if result is not None else decode_batch(data)
