"""stempy's electron-counted HDF5 files, read as a stream of SparseFrameBatch and written back.

The layout (stempy 3.6, ``stempy.io.SparseArray.write_to_hdf5`` / ``from_hdf5``)::

    /                           attrs: version (1, 2 or 3; missing means 1)
    /electron_events/frames     vlen uint32, one row per frame: flat pixel indices x*W + y
    /electron_events/scan_positions
    /metadata                   optional, free-form (stempy loads it into SparseArray.metadata)

Axes. stempy calls the detector *row* ``x``, and its Python reader and writer are not
symmetric between the two datasets (checked against the 3.6.0 source):

* ``frames.attrs``: ``Nx`` = frame_shape[0] = **rows**, ``Ny`` = frame_shape[1] = cols
  (``from_hdf5`` reads ``frame_shape = [Nx, Ny]``);
* ``scan_positions.attrs``: ``Nx`` = scan **cols**, ``Ny`` = scan rows
  (``write_to_hdf5`` stores ``Nx = scan_shape[1]``, ``from_hdf5`` reverses ``[Nx, Ny]``).

A flat pixel index is ``x*W + y`` = ``row*cols + col``, and a flat scan position is
``row*scan_cols + col``: both are beamops' flat indices unchanged.

Versions. Version 3 (what stempy writes today) holds ``n_positions * frames_per_position``
rows, position-major (row ``k`` is at position ``k // frames_per_position``; positions with
fewer frames are padded with empty ones), and ``scan_positions`` is just ``arange(n_positions)``.
Versions 1 and 2 hold one row per frame in acquisition order and one ``scan_positions`` entry
per row; stempy converts them on load. Version 1 may repeat a pixel within a frame to count it
twice; beamops keeps repeated indices as separate events in every version, like
``stempy.image.com_sparse`` does.

:func:`write_stempy_hdf5` writes version 2 because it can be streamed (no need to know each
position's frame count up front), keeps frames in acquisition order and never pads. The
beamops header (scan number, detector, total frame count), the writer's ``run_id`` and the
``provenance`` of the frames (JSON, see ``beamops.provenance``) go to
the ``metadata/beamops`` group's attributes and the frame numbers to
``electron_events/frame_numbers``; stempy ignores the dataset and shows the group as
``SparseArray.metadata["beamops"]``.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from beamops.frames import FrameDecodeError, FrameHeader, SparseFrameBatch

GROUP = "electron_events"
FRAMES = f"{GROUP}/frames"
SCAN_POSITIONS = f"{GROUP}/scan_positions"
FRAME_NUMBERS = f"{GROUP}/frame_numbers"
BEAMOPS_METADATA = "metadata/beamops"
WRITE_VERSION = 2
SUPPORTED_VERSIONS = (1, 2, 3)
DEFAULT_DETECTOR = "stempy"
_CHUNK_ROWS = 4096


class StempyFormatError(ValueError):
    """A file that is not a stempy electron-counted HDF5 file (or is damaged).

    ``path`` is the file and ``problem`` what is wrong with it.
    """

    def __init__(self, path: str | os.PathLike[str], problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: not a stempy electron-counted HDF5 file: {problem}")


@dataclass(frozen=True)
class StempyFileInfo:
    """What :func:`inspect_stempy_hdf5` found. Shapes are (rows, cols)."""

    path: str
    version: int
    scan_shape: tuple[int, int]
    frame_shape: tuple[int, int]
    n_frames: int
    #: Version 3 only: rows per scan position (``n_frames // n_positions``); None for 1 and 2.
    frames_per_position: int | None
    #: What write_stempy_hdf5 stored in metadata/beamops, if anything.
    scan_number: int | None = None
    detector: str | None = None
    total_frames: int | None = None
    has_frame_numbers: bool = False
    #: Who wrote the file: what write_stempy_hdf5 was given as ``run_id``, if anything.
    run_id: str | None = None
    #: What made the frames (JSON of ``beamops.provenance.Provenance``), if the writer said.
    provenance: str | None = None

    @property
    def n_positions(self) -> int:
        return self.scan_shape[0] * self.scan_shape[1]


def _h5py() -> Any:
    try:
        import h5py
    except ImportError as exc:  # pragma: no cover - h5py is a dependency
        raise ImportError("reading and writing stempy HDF5 files needs h5py: pip install 'h5py>=3.10'") from exc
    return h5py


def _positive_int_attr(path: str, dataset: Any, name: str) -> int:
    if name not in dataset.attrs:
        raise StempyFormatError(path, f"{dataset.name} has no {name!r} attribute")
    value = dataset.attrs[name]
    try:
        number = int(np.asarray(value).reshape(()))
    except (TypeError, ValueError):
        raise StempyFormatError(path, f"{dataset.name}.attrs[{name!r}] = {value!r} is not an integer") from None
    if number < 1 or number != np.asarray(value).reshape(()):
        raise StempyFormatError(path, f"{dataset.name}.attrs[{name!r}] = {value!r} is not a positive integer")
    return number


def _optional_attr(attrs: Any, name: str) -> Any:
    if name not in attrs:
        return None
    value = attrs[name]
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    if isinstance(value, np.generic):
        return value.item()
    return value


def _inspect(path: str, f: Any) -> StempyFileInfo:
    h5py = _h5py()
    for name in (GROUP, FRAMES, SCAN_POSITIONS):
        if name not in f:
            raise StempyFormatError(path, f"no /{name} (found: {sorted(f.keys())})")
    frames, positions = f[FRAMES], f[SCAN_POSITIONS]
    if not isinstance(frames, h5py.Dataset) or not isinstance(positions, h5py.Dataset):
        raise StempyFormatError(path, f"/{FRAMES} and /{SCAN_POSITIONS} must be datasets")
    base = h5py.check_vlen_dtype(frames.dtype)
    if base is None or not np.issubdtype(base, np.integer):
        raise StempyFormatError(path, f"/{FRAMES} must hold variable-length integer rows, not {frames.dtype}")
    if frames.ndim != 1 or positions.ndim != 1:
        raise StempyFormatError(
            path, f"/{FRAMES} and /{SCAN_POSITIONS} must be 1-D, got {frames.shape} and {positions.shape}"
        )
    if not np.issubdtype(positions.dtype, np.integer):
        raise StempyFormatError(path, f"/{SCAN_POSITIONS} must be integers, not {positions.dtype}")

    raw_version = f.attrs.get("version", 1)
    try:
        version = int(np.asarray(raw_version).reshape(()))
    except (TypeError, ValueError):
        raise StempyFormatError(path, f"version attribute {raw_version!r} is not an integer") from None
    if version not in SUPPORTED_VERSIONS:
        raise StempyFormatError(path, f"unsupported stempy format version {version}; beamops reads 1, 2 and 3")

    # See the module docstring: the two datasets use Nx/Ny differently.
    frame_shape = (_positive_int_attr(path, frames, "Nx"), _positive_int_attr(path, frames, "Ny"))
    scan_shape = (_positive_int_attr(path, positions, "Ny"), _positive_int_attr(path, positions, "Nx"))
    if frame_shape[0] * frame_shape[1] > 2**32:
        raise StempyFormatError(path, f"frame shape {frame_shape} does not fit uint32 pixel indices")
    n_frames = frames.shape[0]
    n_positions = scan_shape[0] * scan_shape[1]

    frames_per_position = None
    if version >= 3:
        if n_frames % n_positions:
            raise StempyFormatError(
                path,
                f"version 3 needs a whole number of frames per scan position, but {n_frames} frames do not divide "
                f"into {n_positions} positions (scan {scan_shape[0]}x{scan_shape[1]})",
            )
        frames_per_position = n_frames // n_positions
    elif positions.shape[0] != n_frames:
        raise StempyFormatError(
            path, f"version {version} needs one scan position per frame: {positions.shape[0]} for {n_frames} frames"
        )

    has_frame_numbers = FRAME_NUMBERS in f
    if has_frame_numbers:
        numbers = f[FRAME_NUMBERS]
        if numbers.shape != (n_frames,) or not np.issubdtype(numbers.dtype, np.integer):
            raise StempyFormatError(
                path, f"/{FRAME_NUMBERS} must hold {n_frames} integers, got {numbers.shape} {numbers.dtype}"
            )

    meta = f[BEAMOPS_METADATA].attrs if BEAMOPS_METADATA in f else {}
    scan_number = _optional_attr(meta, "scan_number")
    total_frames = _optional_attr(meta, "total_frames")
    detector = _optional_attr(meta, "detector")
    run_id = _optional_attr(meta, "run_id")
    provenance = _optional_attr(meta, "provenance")
    return StempyFileInfo(
        path=path,
        version=version,
        scan_shape=scan_shape,
        frame_shape=frame_shape,
        n_frames=n_frames,
        frames_per_position=frames_per_position,
        scan_number=None if scan_number is None else int(scan_number),
        detector=None if detector is None else str(detector),
        total_frames=None if total_frames is None or int(total_frames) < 1 else int(total_frames),
        has_frame_numbers=has_frame_numbers,
        run_id=None if run_id is None else str(run_id),
        provenance=None if provenance is None else str(provenance),
    )


def _open(path: str) -> Any:
    h5py = _h5py()
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: {'a directory, not a file' if Path(path).is_dir() else 'no such file'}")
    try:
        return h5py.File(path, "r")
    except OSError as exc:
        raise StempyFormatError(path, f"cannot open it as HDF5 ({exc})") from exc


def inspect_stempy_hdf5(path: str | os.PathLike[str]) -> StempyFileInfo:
    """Check that ``path`` is a stempy electron-counted file and describe it (reads no events).

    Raises :class:`StempyFormatError` when it is not, and FileNotFoundError when it is missing.
    """
    path = os.fspath(path)
    with _open(path) as f:
        return _inspect(path, f)


def check_scan_positions(path: str | os.PathLike[str]) -> StempyFileInfo:
    """:func:`inspect_stempy_hdf5`, and a StempyFormatError if any row's scan position is outside the scan the
    file's attributes give (versions 1 and 2 store one per row; version 3's follow from the row). Reads the
    positions (4 bytes a row), not the events: for a publisher, which must not send half a file."""
    path = os.fspath(path)
    with _open(path) as f:
        info = _inspect(path, f)
        if info.frames_per_position is None and info.n_frames:
            every = f[SCAN_POSITIONS][()]
            low, high = int(every.min()), int(every.max())
            if low < 0 or high >= info.scan_shape[0] * info.scan_shape[1]:
                raise StempyFormatError(
                    path,
                    f"its scan positions run {low}..{high}, outside the {info.scan_shape[0]}x{info.scan_shape[1]} "
                    f"scan that /{SCAN_POSITIONS}'s Nx and Ny attributes give",
                )
    return info


def read_stempy_hdf5(
    path: str | os.PathLike[str],
    batch_size: int = 1000,
    scan_number: int | None = None,
    *,
    detector: str | None = None,
    on_bad_rows: Callable[[StempyFormatError], None] | None = None,
) -> Iterator[SparseFrameBatch]:
    """Stream a stempy electron-counted file as batches of ``batch_size`` frames, in file order.

    Only one batch of rows is in memory at a time. ``scan_number`` and ``detector`` default
    to what :func:`write_stempy_hdf5` stored in the file, else 1 and ``"stempy"``. The header
    declares ``total_frames`` (the stored value, else the file's frame count), so a reduce
    knows when the scan is complete. Frame numbers are the stored ones, else the row index;
    a version-3 row ``k`` is at scan position ``k // frames_per_position``.

    The file is checked before this returns (:class:`StempyFormatError`); a row whose pixel
    index or scan position is out of range raises the same error when its batch is read, or,
    with ``on_bad_rows``, is handed to it and the rest of the file is read.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    info, header = stempy_header(path, scan_number, detector=detector)
    return _batches(info, header, batch_size, on_bad_rows)


def stempy_header(
    path: str | os.PathLike[str], scan_number: int | None = None, *, detector: str | None = None
) -> tuple[StempyFileInfo, FrameHeader]:
    """The file's description and the header :func:`read_stempy_hdf5` gives its batches (same defaults);
    :class:`StempyFormatError` or FileNotFoundError for a file it cannot read."""
    info = inspect_stempy_hdf5(path)
    if scan_number is None:
        scan_number = info.scan_number if info.scan_number is not None else 1
    header = FrameHeader(
        scan_number=scan_number,
        scan_shape=info.scan_shape,
        frame_shape=info.frame_shape,
        detector=detector or info.detector or DEFAULT_DETECTOR,
        total_frames=info.total_frames or info.n_frames or None,
    )
    try:
        header.validate()
    except FrameDecodeError as exc:
        raise ValueError(str(exc)) from None
    return info, header


def _batches(
    info: StempyFileInfo,
    header: FrameHeader,
    batch_size: int,
    on_bad_rows: Callable[[StempyFormatError], None] | None = None,
) -> Iterator[SparseFrameBatch]:
    with _open(info.path) as f:
        frames, positions = f[FRAMES], f[SCAN_POSITIONS]
        numbers = f[FRAME_NUMBERS] if info.has_frame_numbers else None
        for start in range(0, info.n_frames, batch_size):
            stop = min(start + batch_size, info.n_frames)
            try:
                yield _batch(info, header, frames, positions, numbers, start, stop)
            except StempyFormatError as exc:
                if on_bad_rows is None:
                    raise
                on_bad_rows(exc)  # those rows only: the file goes on


def _batch(
    info: StempyFileInfo, header: FrameHeader, frames: Any, positions: Any, numbers: Any, start: int, stop: int
) -> SparseFrameBatch:
    """Rows ``start``..``stop - 1`` as a checked batch (StempyFormatError naming them if they are not valid)."""
    rows = frames[start:stop]
    lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
    offsets = np.zeros(len(rows) + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    raw = np.concatenate(rows) if offsets[-1] else np.zeros(0, np.int64)
    if len(raw) and (int(raw.min()) < 0 or int(raw.max()) >= header.n_pixels):
        bad = int(raw.min()) if int(raw.min()) < 0 else int(raw.max())
        raise StempyFormatError(
            info.path, f"rows {start}..{stop - 1} hold pixel index {bad}, outside frame {info.frame_shape}"
        )
    if info.frames_per_position is not None:
        scan_positions = (np.arange(start, stop) // info.frames_per_position).astype(np.uint32)
    else:
        raw_positions = positions[start:stop]
        if len(raw_positions) and (int(raw_positions.min()) < 0 or int(raw_positions.max()) >= header.n_positions):
            raise StempyFormatError(
                info.path,
                f"rows {start}..{stop - 1} have scan positions {int(raw_positions.min())}.."
                f"{int(raw_positions.max())}, outside scan {info.scan_shape}",
            )
        scan_positions = raw_positions.astype(np.uint32)
    if numbers is None:
        frame_numbers = np.arange(start, stop, dtype=np.uint64)
    else:
        frame_numbers = numbers[start:stop].astype(np.uint64)
    batch = SparseFrameBatch(
        header,
        raw.astype(np.uint32, copy=False),
        offsets,
        scan_positions,
        frame_numbers,
        origin={"source": "hdf5", "path": info.path, "rows": (start, stop)},
    )
    try:
        batch.validate()
    except FrameDecodeError as exc:
        raise StempyFormatError(info.path, f"rows {start}..{stop - 1}: {exc}") from exc
    return batch


def write_stempy_hdf5(
    path: str | os.PathLike[str],
    batches: Iterable[SparseFrameBatch],
    *,
    overwrite: bool = False,
    run_id: str | None = None,
    provenance: str | None = None,
) -> StempyFileInfo:
    """Write the frames of one scan to a new stempy file (version 2 layout), streaming.

    Every batch must have the same scan number, scan shape and frame shape. The file is
    readable by ``stempy.io.load_electron_counts`` and by :func:`read_stempy_hdf5`, which
    gives back the same frames, scan positions, frame numbers and header. Refuses to replace
    an existing file unless ``overwrite``. The file is written under a temporary name beside
    ``path`` and renamed when complete, so a reader never opens half a file, and a failed
    write removes only its own temporary file. ``run_id``, if given, is stored so a later
    writer can tell a file it wrote itself from another's (:attr:`StempyFileInfo.run_id`);
    ``provenance`` (JSON) says what made the frames (:attr:`StempyFileInfo.provenance`).
    """
    h5py = _h5py()
    path = os.fspath(path)
    iterator = iter(batches)
    first = next(iterator, None)
    if first is None:
        raise ValueError(f"{path}: no batches to write (the scan shape is unknown)")
    header = first.header
    if not overwrite and os.path.exists(path):
        raise FileExistsError(f"{path} already exists; pass overwrite=True to replace it")
    written = 0
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with h5py.File(tmp, "w") as f:
            f.attrs["version"] = WRITE_VERSION
            group = f.create_group(GROUP)
            frames = group.create_dataset(
                "frames", (0,), maxshape=(None,), chunks=(_CHUNK_ROWS,), dtype=h5py.vlen_dtype(np.uint32)
            )
            frames.attrs["Nx"] = header.frame_shape[0]
            frames.attrs["Ny"] = header.frame_shape[1]
            positions = group.create_dataset(
                "scan_positions", (0,), maxshape=(None,), chunks=(_CHUNK_ROWS,), dtype=np.uint32
            )
            positions.attrs["Nx"] = header.scan_shape[1]
            positions.attrs["Ny"] = header.scan_shape[0]
            numbers = group.create_dataset(
                "frame_numbers", (0,), maxshape=(None,), chunks=(_CHUNK_ROWS,), dtype=np.uint64
            )
            meta = f.require_group(BEAMOPS_METADATA)
            meta.attrs["scan_number"] = header.scan_number
            meta.attrs["detector"] = header.detector
            meta.attrs["schema_version"] = header.schema_version
            if header.total_frames is not None:
                meta.attrs["total_frames"] = header.total_frames
            if run_id is not None:
                meta.attrs["run_id"] = run_id
            if provenance is not None:
                meta.attrs["provenance"] = provenance

            for batch in _chain(first, iterator):
                if not isinstance(batch, SparseFrameBatch):
                    raise TypeError(f"{path}: stempy files hold sparse frames, not a {type(batch).__name__}")
                check_same_scan(path, header, batch.header)
                n = batch.n_frames
                rows = np.empty(n, dtype=object)
                offsets = np.asarray(batch.offsets, dtype=np.int64)
                events = np.asarray(batch.events, dtype=np.uint32)
                for i in range(n):
                    rows[i] = events[offsets[i] : offsets[i + 1]]
                for dataset in (frames, positions, numbers):
                    dataset.resize((written + n,))
                _write_rows(frames, written, rows)
                positions[written : written + n] = batch.scan_positions
                numbers[written : written + n] = batch.frame_numbers
                written += n
        if not overwrite and os.path.exists(path):  # written by another writer meanwhile
            raise FileExistsError(f"{path} already exists; pass overwrite=True to replace it")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return StempyFileInfo(
        path=path,
        version=WRITE_VERSION,
        scan_shape=header.scan_shape,
        frame_shape=header.frame_shape,
        n_frames=written,
        frames_per_position=None,
        scan_number=header.scan_number,
        detector=header.detector,
        total_frames=header.total_frames,
        has_frame_numbers=True,
        run_id=run_id,
        provenance=provenance,
    )


def _write_rows(dataset: Any, start: int, rows: np.ndarray) -> None:
    """``dataset[start:start+len(rows)] = rows`` for a vlen dataset and a 1-D object array.

    Through the low-level API because h5py's ``__setitem__`` stacks rows of equal length into
    a 2-D array and then refuses to write it.
    """
    h5py = _h5py()
    if not len(rows):
        return
    file_space = dataset.id.get_space()
    file_space.select_hyperslab((start,), (len(rows),))
    dataset.id.write(h5py.h5s.create_simple((len(rows),)), file_space, rows)


def _chain(first: SparseFrameBatch, rest: Iterator[SparseFrameBatch]) -> Iterator[SparseFrameBatch]:
    yield first
    yield from rest


def check_same_scan(path: str, want: FrameHeader, got: FrameHeader) -> None:
    """ValueError unless ``got`` is of the scan ``want`` describes (number and shapes): one file holds one scan."""
    for name in ("scan_number", "scan_shape", "frame_shape"):
        if getattr(got, name) != getattr(want, name):
            raise ValueError(
                f"{path}: one file holds one scan, but a batch has {name} {getattr(got, name)} "
                f"after {getattr(want, name)}"
            )
