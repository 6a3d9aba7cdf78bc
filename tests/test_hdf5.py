"""stempy electron-counted HDF5 files: beamops reads what stempy writes and stempy reads what beamops writes."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
from helpers import assert_same_frames, concat
from stempy.io import SparseArray, load_electron_counts

from beamops.frames import FrameHeader, SparseFrameBatch
from beamops.io.hdf5 import StempyFormatError, inspect_stempy_hdf5, read_stempy_hdf5, write_stempy_hdf5
from beamops.simulate import ScanSimulation

# Non-square everywhere, so a swapped axis cannot pass.
SIM = ScanSimulation(
    scan_shape=(3, 5),
    frame_shape=(70, 90),
    events_per_frame=25,
    frames_per_position=2,
    disc_radius=12,
    shift_amplitude=4,
    seed=3,
    scan_number=42,
)


def test_round_trip_gives_the_same_batches(tmp_path):
    path = tmp_path / "scan.h5"
    batches = list(SIM.batches(7))
    info = write_stempy_hdf5(path, batches)
    assert info.n_frames == SIM.n_frames

    back = list(read_stempy_hdf5(path, batch_size=7))
    assert len(back) == len(batches)
    for got, want in zip(back, batches, strict=True):
        assert got.header == want.header  # scan number, shapes, detector and total_frames survive
        np.testing.assert_array_equal(got.events, want.events)
        np.testing.assert_array_equal(got.offsets, want.offsets)
        np.testing.assert_array_equal(got.scan_positions, want.scan_positions)
        np.testing.assert_array_equal(got.frame_numbers, want.frame_numbers)
        assert got.events.dtype == np.uint32
    # Other batch sizes give the same frames, and the scan number can be replaced.
    rebatched = list(read_stempy_hdf5(path, batch_size=4, scan_number=9))
    assert {b.header.scan_number for b in rebatched} == {9}
    assert_same_frames(rebatched, batches)


def test_stempy_reads_what_we_write(tmp_path):
    path = tmp_path / "scan.h5"
    batches = list(SIM.batches(8))
    write_stempy_hdf5(path, batches)

    array = load_electron_counts(str(path))
    assert tuple(array.scan_shape) == SIM.scan_shape
    assert tuple(array.frame_shape) == SIM.frame_shape
    assert array.data.shape == (SIM.n_positions, SIM.frames_per_position)
    assert array.metadata["beamops"]["scan_number"] == 42
    for batch in batches:
        for i in range(batch.n_frames):
            position = int(batch.scan_positions[i])
            # The simulator's j-th frame of a position is frame j * n_positions + position.
            j = int(batch.frame_numbers[i]) // SIM.n_positions
            np.testing.assert_array_equal(array.data[position, j], batch.frame(i))

    # stempy's axes are ours: its dense frame [x, y] is our [row, col], its scan [r, c] ours.
    batch = batches[0]
    events = batch.frame(0)
    rows, cols = np.divmod(events.astype(np.int64), SIM.frame_shape[1])
    scan_row, scan_col = divmod(int(batch.scan_positions[0]), SIM.scan_shape[1])
    dense = SparseArray(array.data[:, :1].copy(), array.scan_shape, array.frame_shape)[scan_row, scan_col]
    assert dense.shape == SIM.frame_shape
    expected = np.zeros(SIM.frame_shape, np.int64)
    np.add.at(expected, (rows, cols), 1)
    np.testing.assert_array_equal(dense > 0, expected > 0)


def test_we_read_what_stempy_writes_with_several_frames_per_position(tmp_path):
    """stempy's own writer (format version 3: position-major rows) with 3 frames per position."""
    rng = np.random.default_rng(0)
    scan_shape, frame_shape, per_position = (4, 3), (50, 60), 3
    data = np.empty((scan_shape[0] * scan_shape[1], per_position), dtype=object)
    for index in np.ndindex(data.shape):
        data[index] = np.unique(rng.integers(0, frame_shape[0] * frame_shape[1], rng.integers(0, 30))).astype(np.uint32)
    path = tmp_path / "stempy.h5"
    SparseArray(data, scan_shape, frame_shape).write_to_hdf5(str(path))

    info = inspect_stempy_hdf5(path)
    assert (info.version, info.scan_shape, info.frame_shape) == (3, scan_shape, frame_shape)
    assert (info.n_frames, info.frames_per_position) == (data.size, per_position)

    batches = list(read_stempy_hdf5(path, batch_size=5))
    assert [b.n_frames for b in batches] == [5, 5, 5, 5, 5, 5, 5, 1]
    header = batches[0].header
    assert (header.scan_number, header.scan_shape, header.frame_shape) == (1, scan_shape, frame_shape)
    assert header.total_frames == data.size and header.detector == "stempy"
    events, lengths, positions, numbers = concat(batches)
    np.testing.assert_array_equal(positions, np.repeat(np.arange(data.shape[0]), per_position))
    np.testing.assert_array_equal(numbers, np.arange(data.size))
    np.testing.assert_array_equal(lengths, [len(f) for f in data.ravel()])
    np.testing.assert_array_equal(events, np.concatenate(list(data.ravel())))


def test_version_1_files_with_one_row_per_frame(tmp_path):
    """Older files: no version attribute, one scan position per row, in acquisition order."""
    path = tmp_path / "v1.h5"
    rows = [np.array([1, 5, 5], np.uint32), np.array([], np.uint32), np.array([7], np.uint32)]
    with h5py.File(path, "w") as f:
        frames = f.create_dataset("electron_events/frames", (3,), dtype=h5py.vlen_dtype(np.uint32))
        column = np.empty(3, dtype=object)
        column[:] = rows
        frames[...] = column
        frames.attrs["Nx"], frames.attrs["Ny"] = 4, 2  # frame rows, cols
        positions = f.create_dataset("electron_events/scan_positions", data=np.array([2, 0, 2], np.uint16))
        positions.attrs["Nx"], positions.attrs["Ny"] = 3, 1  # scan cols, rows
    (batch,) = read_stempy_hdf5(path, batch_size=10)
    assert batch.header.frame_shape == (4, 2) and batch.header.scan_shape == (1, 3)
    np.testing.assert_array_equal(batch.scan_positions, [2, 0, 2])
    np.testing.assert_array_equal(batch.events, [1, 5, 5, 7])  # a repeated pixel stays two events
    np.testing.assert_array_equal(batch.offsets, [0, 3, 3, 4])


def test_frames_of_equal_length(tmp_path):
    """h5py stacks equal-length rows into a 2-D array on a plain slice assignment; the writer must not."""
    header = FrameHeader(scan_number=1, scan_shape=(2, 2), frame_shape=(4, 4))
    batch = SparseFrameBatch.from_frames(header, [np.array([i, 15], np.uint32) for i in range(4)], range(4))
    path = tmp_path / "equal.h5"
    write_stempy_hdf5(path, [batch, batch])
    assert_same_frames(list(read_stempy_hdf5(path, batch_size=3)), [batch, batch])
    assert [list(f) for f in load_electron_counts(str(path)).data[:, 1]] == [[i, 15] for i in range(4)]


def test_reading_streams_one_batch_at_a_time(tmp_path):
    path = tmp_path / "scan.h5"
    write_stempy_hdf5(path, SIM.batches(100))
    batches = read_stempy_hdf5(path, batch_size=4)
    first = next(batches)
    assert first.n_frames == 4 and first.origin == {"source": "hdf5", "path": str(path), "rows": (0, 4)}
    batches.close()


def write_minimal(path, *, version=3, frame_attrs=None, scan_attrs=None, rows=None, positions=None):
    rows = rows if rows is not None else [np.array([0, 3], np.uint32), np.array([1], np.uint32)] * 3
    with h5py.File(path, "w") as f:
        f.attrs["version"] = version
        frames = f.create_dataset("electron_events/frames", (len(rows),), dtype=h5py.vlen_dtype(np.uint32))
        column = np.empty(len(rows), dtype=object)
        column[:] = rows
        frames[...] = column
        for key, value in (frame_attrs if frame_attrs is not None else {"Nx": 4, "Ny": 4}).items():
            frames.attrs[key] = value
        scan = f.create_dataset(
            "electron_events/scan_positions", data=positions if positions is not None else np.arange(6)
        )
        for key, value in (scan_attrs if scan_attrs is not None else {"Nx": 3, "Ny": 2}).items():
            scan.attrs[key] = value


@pytest.mark.parametrize(
    ("kwargs", "problem"),
    [
        ({"frame_attrs": {"Nx": 4}}, "/electron_events/frames has no 'Ny' attribute"),
        ({"scan_attrs": {"Nx": 3, "Ny": 0}}, "is not a positive integer"),
        ({"version": 7}, "unsupported stempy format version 7"),
        ({"scan_attrs": {"Nx": 4, "Ny": 1}}, "6 frames do not divide into 4 positions"),
        ({"version": 2, "positions": np.arange(5)}, "one scan position per frame: 5 for 6 frames"),
    ],
)
def test_malformed_files_fail_clearly_before_reading(tmp_path, kwargs, problem):
    path = tmp_path / "bad.h5"
    write_minimal(path, **kwargs)
    with pytest.raises(StempyFormatError, match=problem) as caught:
        read_stempy_hdf5(path)  # raises on the call, not at the first batch
    assert caught.value.path == str(path) and str(path) in str(caught.value)
    assert isinstance(caught.value, ValueError)


def test_out_of_range_events_and_positions_fail_clearly(tmp_path):
    path = tmp_path / "bad_event.h5"
    write_minimal(path, rows=[np.array([], np.uint32)] * 5 + [np.array([1, 16], np.uint32)])
    with pytest.raises(StempyFormatError, match=r"rows 4..5 hold pixel index 16, outside frame \(4, 4\)"):
        list(read_stempy_hdf5(path, batch_size=2))

    path = tmp_path / "bad_position.h5"
    write_minimal(path, version=2, positions=np.array([0, 1, 2, 3, 4, 6]))
    with pytest.raises(StempyFormatError, match=r"scan positions 4..6, outside scan \(2, 3\)"):
        list(read_stempy_hdf5(path, batch_size=2))


def test_files_that_are_not_stempy_files(tmp_path):
    text = tmp_path / "notes.h5"
    text.write_text("not hdf5")
    with pytest.raises(StempyFormatError, match="cannot open it as HDF5"):
        read_stempy_hdf5(text)

    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f.create_dataset("data", data=np.zeros(3))
    with pytest.raises(StempyFormatError, match=r"no /electron_events \(found: \['data'\]\)"):
        inspect_stempy_hdf5(other)

    dense = tmp_path / "dense.h5"
    with h5py.File(dense, "w") as f:
        f.create_dataset("electron_events/frames", data=np.zeros((2, 4), np.uint16))
        f.create_dataset("electron_events/scan_positions", data=np.arange(2))
    with pytest.raises(StempyFormatError, match="variable-length integer rows"):
        inspect_stempy_hdf5(dense)

    with pytest.raises(FileNotFoundError):
        read_stempy_hdf5(tmp_path / "missing.h5")


def test_writer_refuses_mixed_scans_and_existing_files(tmp_path):
    path = tmp_path / "scan.h5"
    other = ScanSimulation(**{**SIM.__dict__, "scan_number": 43})
    with pytest.raises(ValueError, match="one file holds one scan, but a batch has scan_number 43 after 42"):
        write_stempy_hdf5(path, [SIM.batch(0, 4), other.batch(0, 4)])
    assert not path.exists()  # a failed write leaves no partial file

    write_stempy_hdf5(path, SIM.batches(10))
    with pytest.raises(FileExistsError):
        write_stempy_hdf5(path, SIM.batches(10))
    write_stempy_hdf5(path, [SIM.batch(0, 3)], overwrite=True)
    assert inspect_stempy_hdf5(path).n_frames == 3

    with pytest.raises(ValueError, match="no batches"):
        write_stempy_hdf5(tmp_path / "empty.h5", [])


def test_the_writers_run_id_is_stored_and_stempy_ignores_it(tmp_path):
    path = tmp_path / "scan.h5"
    assert write_stempy_hdf5(path, SIM.batches(10)).run_id is None
    assert inspect_stempy_hdf5(path).run_id is None
    assert write_stempy_hdf5(path, SIM.batches(10), overwrite=True, run_id="run-1").run_id == "run-1"
    assert inspect_stempy_hdf5(path).run_id == "run-1"
    array = load_electron_counts(str(path))
    assert array.metadata["beamops"]["run_id"] == "run-1"
    assert array.data.shape == (SIM.n_positions, SIM.frames_per_position)


def test_empty_frames_and_an_undeclared_total(tmp_path):
    header = FrameHeader(scan_number=0, scan_shape=(1, 2), frame_shape=(2, 3), detector="d", total_frames=None)
    batch = SparseFrameBatch.from_frames(header, [np.array([], np.uint32), np.array([5], np.uint32)], [0, 1])
    path = tmp_path / "tiny.h5"
    write_stempy_hdf5(path, [batch])
    (back,) = read_stempy_hdf5(path)
    assert back.header.scan_number == 0 and back.header.detector == "d"
    assert back.header.total_frames == 2  # not stored, so the file's frame count
    np.testing.assert_array_equal(back.offsets, [0, 0, 1])
    assert [list(f) for f in load_electron_counts(str(path)).data[:, 0]] == [[], [5]]


def test_the_simulate_job_rejects_a_bad_file_before_connecting(tmp_path, capsys):
    from jobs import simulate

    path = tmp_path / "bad.h5"
    write_minimal(path, version=7)
    # No broker listens on port 9; the file is checked first.
    assert simulate.main(["--bootstrap_servers", "127.0.0.1:9", "--topic", "t", "--hdf5", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{path}: not a stempy electron-counted HDF5 file: unsupported stempy format version 7" in err
    # Scan positions outside the scan: refused whole, before anything is sent (else half the file was published).
    positions = tmp_path / "positions.h5"
    write_minimal(positions, version=2, positions=np.array([0, 1, 2, 3, 4, 6]))
    assert simulate.main(["--bootstrap_servers", "127.0.0.1:9", "--topic", "t", "--hdf5", str(positions)]) == 2
    assert (
        f"{positions}: not a stempy electron-counted HDF5 file: its scan positions run 0..6, outside the 2x3 scan "
        "that /electron_events/scan_positions's Nx and Ny attributes give"
    ) in capsys.readouterr().err
    assert list(read_stempy_hdf5(positions, 6, on_bad_rows=lambda exc: None)) == []  # a reader may still skip rows
    assert simulate.main(["--bootstrap_servers", "127.0.0.1:9", "--topic", "t", "--hdf5", str(tmp_path / "no")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert simulate.main(["--bootstrap_servers", "127.0.0.1:9", "--topic", "t", "--hdf5", str(tmp_path)]) == 2
    assert f"{tmp_path}: a directory, not a file" in capsys.readouterr().err
