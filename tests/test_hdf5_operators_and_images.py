"""HDF5 source and sink operators, and the image writer, in pipelines."""

from __future__ import annotations

import errno
from pathlib import Path

import numpy as np
import pytest

from beamops import FrameHeader, Image, SparseFrameBatch
from beamops.io.hdf5 import read_stempy_hdf5
from beamops.testing import ScanSimulation, assert_com_close, run_operator
from transforms.com_partial import com_partial
from transforms.com_reduce import com_reduce
from transforms.read_hdf5_frames import read_hdf5_frames
from transforms.write_hdf5_frames import write_hdf5_frames
from transforms.write_image import write_image

SIMS = [
    ScanSimulation(scan_shape=(8, 6), frame_shape=(64, 80), frames_per_position=2, scan_number=n, seed=n)
    for n in (3, 4)
]


def test_saved_scans_reprocess_to_the_same_maps(tmp_path: Path) -> None:
    batches = [b for pair in zip(*(list(s.batches(10)) for s in SIMS), strict=True) for b in pair]  # interleaved
    written = run_operator(write_hdf5_frames(out_dir=str(tmp_path)), reversed(batches))
    assert sorted(Path(p).name for p in written.outputs) == ["scan_000003.h5", "scan_000004.h5"]
    assert written.dead_letters == []
    live = run_operator(lambda f: f | com_partial() | com_reduce(emit_every=0), batches).final_maps()
    for sim in SIMS:
        path = str(tmp_path / f"scan_{sim.scan_number:06d}.h5")
        chain = read_hdf5_frames(path=path, batch_size=7) | com_partial() | com_reduce(emit_every=0)
        replayed = run_operator(lambda root, chain=chain: root.pipeline | chain, []).final_maps()
        assert list(replayed) == [sim.scan_number]
        final = replayed[sim.scan_number]
        assert (final.frames_seen, final.complete) == (sim.n_frames, True)
        assert_com_close(final, live[sim.scan_number], atol=0)


def test_a_saved_scan_holds_each_frame_once_in_frame_number_order(tmp_path: Path) -> None:
    # Two partitions interleave a scan's batches, and Kafka redelivers one of them.
    sim = SIMS[0]
    halves = [sim.batch(0, 48), sim.batch(1, 48)]
    odd_even = [
        SparseFrameBatch.from_frames(
            sim.header, [h.frame(i) for i in range(start, 48, 2)], h.scan_positions[start::2], h.frame_numbers[start::2]
        )
        for h in halves
        for start in (1, 0)
    ]
    result = run_operator(write_hdf5_frames(out_dir=str(tmp_path)), [*odd_even, odd_even[1]])
    assert result.dead_letters == []
    assert result.counter("duplicate_frames") == 24
    (saved,) = read_stempy_hdf5(result.outputs[0], batch_size=1000)
    whole = SparseFrameBatch.from_frames(
        sim.header,
        [h.frame(i) for h in halves for i in range(48)],
        np.concatenate([h.scan_positions for h in halves]),
        np.concatenate([h.frame_numbers for h in halves]),
    )
    np.testing.assert_array_equal(saved.frame_numbers, whole.frame_numbers)
    np.testing.assert_array_equal(saved.scan_positions, whole.scan_positions)
    np.testing.assert_array_equal(saved.offsets, whole.offsets)
    np.testing.assert_array_equal(saved.events, whole.events)


def test_an_existing_file_sends_the_scan_to_dead_letters(tmp_path: Path) -> None:
    (tmp_path / "scan_000003.h5").write_bytes(b"not mine")
    result = run_operator(write_hdf5_frames(out_dir=str(tmp_path)), SIMS[0].batches(16))
    assert result.outputs == []
    assert {d.error_type for d in result.dead_letters} == {"FileExistsError"}
    assert sum(1 for _ in SIMS[0].batches(16)) == len(result.dead_letters)


def test_a_full_disk_fails_the_job_saying_which_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Not dead letters: a full or read-only disk would send every scan there, and their writer fails too."""
    from transforms import write_hdf5_frames as module

    def disk_full(path: Path, *_: object, **__: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(module, "write_stempy_hdf5", disk_full)
    with pytest.raises(Exception, match=f"cannot write '{tmp_path / 'scan_000003.h5'}': .*No space left on device"):
        run_operator(write_hdf5_frames(out_dir=str(tmp_path)), SIMS[0].batches(16))


def test_a_directory_where_a_file_should_go_sends_that_scan_to_dead_letters(tmp_path: Path) -> None:
    (tmp_path / "scan_000003.h5").mkdir()
    batches = [b for sim in SIMS for b in sim.batches(16)]
    result = run_operator(write_hdf5_frames(out_dir=str(tmp_path), overwrite=True), batches)
    assert [Path(p).name for p in result.outputs] == ["scan_000004.h5"]
    assert {d.error_type for d in result.dead_letters} == {"IsADirectoryError"}
    assert len(result.dead_letters) == sum(1 for _ in SIMS[0].batches(16))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scan_000003.h5", "scan_000004.h5"]  # no temp file left


def test_a_bad_file_is_a_dead_letter_naming_it(tmp_path: Path) -> None:
    bad = tmp_path / "bad.h5"
    bad.write_bytes(b"\x89HDF garbage")
    result = run_operator(lambda root: root.pipeline | read_hdf5_frames(path=str(bad)), [])
    assert result.outputs == []
    (letter,) = result.dead_letters
    assert letter.operator == "read_hdf5_frames" and str(bad) in letter.error


def _image(final: bool, frames: int) -> Image:
    header = FrameHeader(scan_number=7, scan_shape=(12, 16), frame_shape=(64, 64))
    data = np.arange(12 * 16, dtype=np.float32).reshape(12, 16)
    return Image(header, "bf", data, "counts", frames, final=final, complete=final)


def test_final_images_become_png_and_npy(tmp_path: Path) -> None:
    result = run_operator(write_image(out_dir=str(tmp_path), colormap="magma"), [_image(False, 10), _image(True, 99)])
    assert sorted(Path(p).name for p in result.outputs) == ["bf_scan_000007.npy", "bf_scan_000007.png"]
    png = (tmp_path / "bf_scan_000007.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5_000
    assert np.array_equal(np.load(tmp_path / "bf_scan_000007.npy"), _image(True, 99).data)


def test_live_previews_are_rate_limited(tmp_path: Path) -> None:
    progressive = [_image(False, n) for n in (10, 20, 30)]
    result = run_operator(
        write_image(out_dir=str(tmp_path), live_preview=True, max_preview_interval_s=3600), progressive
    )
    assert sorted(Path(p).name for p in result.outputs) == ["bf_scan_000007_latest.npy", "bf_scan_000007_latest.png"]


def test_com_map_previews_are_rate_limited(tmp_path: Path) -> None:
    from beamops import ComMap
    from transforms.write_com_map import write_com_map

    header = FrameHeader(scan_number=9, scan_shape=(4, 4), frame_shape=(64, 64))
    plane = np.ones((4, 4), np.float32)
    maps = [ComMap(header, plane * n, plane, n, 16, False, False) for n in (4, 8, 12)]
    op = write_com_map(out_dir=str(tmp_path), write_progressive=True, max_preview_interval_s=3600, colormap="gray")
    result = run_operator(op, maps)
    assert sorted(Path(p).name for p in result.outputs) == ["scan_000009_com_latest.npz", "scan_000009_com_latest.png"]
