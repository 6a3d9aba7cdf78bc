"""HDF5 source and sink operators, and the image writer, in pipelines."""

from __future__ import annotations

import errno
import logging
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from apache_beam.testing.test_stream import TestStream as BeamTestStream  # alias: not a pytest class
from helpers import assert_same_frames
from stempy.io import load_electron_counts

from beamops import ComMap, FrameHeader, Image, OperatorParameterError, SparseFrameBatch
from beamops.io.hdf5 import read_stempy_hdf5, write_stempy_hdf5
from beamops.testing import ScanSimulation, assert_com_close, run_operator, timestamped_stream
from transforms.com_partial import com_partial
from transforms.com_reduce import com_reduce
from transforms.read_hdf5_frames import read_hdf5_frames
from transforms.write_com_map import com_png_title
from transforms.write_hdf5_frames import write_hdf5_frames
from transforms.write_image import axis_labels, write_image

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
    assert_same_frames([saved], halves)


def test_the_writer_says_how_many_redelivered_frames_it_skipped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """In the words of the per-scan reductions: one helper counts them and says so for both."""
    batches = list(SIMS[0].batches(16))
    caplog.set_level(logging.WARNING, logger="transforms.write_hdf5_frames")
    result = run_operator(write_hdf5_frames(out_dir=str(tmp_path)), [*batches, batches[1]])
    assert result.counter("duplicate_frames") == 16
    logged = [(r.getMessage(), r.funcName) for r in caplog.records if r.name == "transforms.write_hdf5_frames"]
    said = "scan 3: skipped 16 frames already written (delivered again, or another run published under the same scan "
    said += "number)"
    assert logged == [(said, "process")]


def _bad(batch: SparseFrameBatch, fault: str) -> SparseFrameBatch:
    """``batch`` with one fault."""
    if fault == "frame_shape":
        other = ScanSimulation(scan_shape=(8, 6), frame_shape=(64, 64), frames_per_position=2, scan_number=3)
        return replace(batch, header=other.header)
    if fault == "scan_positions":
        return replace(batch, scan_positions=np.full(batch.n_frames, SIMS[0].n_positions, np.uint32))
    return replace(batch, events=batch.events + np.uint32(64 * 80))  # fault == "events"


@pytest.mark.parametrize(
    ("fault", "redelivered", "refused"),
    [
        ("frame_shape", False, r"scan_000003.h5: one file holds one scan, but a batch has frame_shape \(64, \d+\)"),
        ("scan_positions", False, r"^scan position 48 out of range for scan_shape \(8, 6\)$"),
        ("events", False, r"^event index \d+ out of range for frame_shape \(64, 80\)$"),
        # A bad copy of frames that came before is refused too, not dropped as a redelivery unread.
        ("scan_positions", True, r"^scan position 48 out of range for scan_shape \(8, 6\)$"),
    ],
)
def test_a_bad_batch_sends_its_scan_to_dead_letters_saying_what_is_wrong(
    tmp_path: Path, fault: str, redelivered: bool, refused: str
) -> None:
    batches = list(SIMS[0].batches(16))
    sent = [*batches, _bad(batches[1], fault)] if redelivered else [*batches[:-1], _bad(batches[-1], fault)]
    result = run_operator(write_hdf5_frames(out_dir=str(tmp_path)), sent)
    assert result.outputs == []
    assert len(result.dead_letters) == len(sent)
    for letter in result.dead_letters:
        assert re.search(refused, letter.error), letter.error
    assert list(tmp_path.iterdir()) == []


def test_a_bad_batch_merged_into_earlier_frames_is_refused() -> None:
    """A later session's bad copy of a frame the file holds: refused, not dropped as the file's duplicate."""
    from transforms import write_hdf5_frames as module

    earlier = list(SIMS[0].batches(16))
    bad = _bad(earlier[1], "scan_positions")
    with pytest.raises(ValueError, match=r"^scan position 48 out of range for scan_shape \(8, 6\)$"):
        list(module._each_frame_once_in_order(Path("scan_000003.h5"), [bad], earlier))


def test_an_existing_file_sends_the_scan_to_dead_letters(tmp_path: Path) -> None:
    (tmp_path / "scan_000003.h5").write_bytes(b"not mine")
    result = run_operator(write_hdf5_frames(out_dir=str(tmp_path)), SIMS[0].batches(16))
    assert result.outputs == []
    assert {d.error_type for d in result.dead_letters} == {"FileExistsError"}
    assert sum(1 for _ in SIMS[0].batches(16)) == len(result.dead_letters)


def _paused_scan_stream(sim: ScanSimulation, gap_s: float) -> BeamTestStream:
    """A scan in 16-frame batches: half, a pause longer than ``gap_s``, then the rest in reverse order with one
    frame of the first half redelivered among them."""
    batches = list(sim.batches(16))
    first, rest = batches[: len(batches) // 2], batches[len(batches) // 2 :]
    again = first[1]
    redelivered = SparseFrameBatch.from_frames(
        sim.header, [again.frame(3)], again.scan_positions[3:4], again.frame_numbers[3:4]
    )
    resumed = 3 * gap_s
    return timestamped_stream(
        *[(float(i), b) for i, b in enumerate(first)],
        ("watermark", len(first) + gap_s + 1),  # the first session closes: its file is written
        *[(resumed + i, b) for i, b in enumerate([*reversed(rest[1:]), redelivered, rest[0]])],
    )


def _run_paused_scan(sim: ScanSimulation, out_dir: Path, **params: object) -> int:
    """Write a paused scan (two sessions); the number of frames counted as duplicates."""
    write = write_hdf5_frames(out_dir=str(out_dir), gap_s=10.0, **params)
    stream = _paused_scan_stream(sim, gap_s=10.0)
    result = run_operator(lambda root: root.pipeline | stream | write, [], runner="BundleBasedDirectRunner")
    name = f"scan_{sim.scan_number:06d}.h5"
    assert [Path(p).name for p in result.outputs] == [name, name]  # one write per session
    assert result.dead_letters == []
    return result.counter("duplicate_frames")


def _assert_holds_the_whole_scan_once_in_order(sim: ScanSimulation, path: Path) -> None:
    (saved,) = read_stempy_hdf5(path, batch_size=sim.n_frames + 1)
    sent = list(sim.batches(16))  # what _paused_scan_stream sends (the simulator draws each batch by its index)
    whole = SparseFrameBatch.from_frames(
        sim.header,
        [b.frame(i) for b in sent for i in range(b.n_frames)],
        np.concatenate([b.scan_positions for b in sent]),
        np.concatenate([b.frame_numbers for b in sent]),
    )
    assert saved.header == whole.header
    np.testing.assert_array_equal(saved.frame_numbers, np.arange(sim.n_frames))
    assert_same_frames([saved], [whole])
    array = load_electron_counts(str(path))  # stempy reads it too: every position has all its frames
    assert array.data.shape == (sim.n_positions, sim.frames_per_position)
    for i in range(whole.n_frames):
        j = int(whole.frame_numbers[i]) // sim.n_positions  # the simulator's j-th frame of a position
        np.testing.assert_array_equal(array.data[int(whole.scan_positions[i]), j], whole.frame(i))


def test_a_scan_that_pauses_longer_than_gap_s_is_one_file(tmp_path: Path) -> None:
    sim = SIMS[0]
    assert _run_paused_scan(sim, tmp_path) == 1  # the redelivered frame, already in the first session's file
    _assert_holds_the_whole_scan_once_in_order(sim, tmp_path / "scan_000003.h5")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scan_000003.h5"]  # no temp file left


def test_with_overwrite_only_an_earlier_runs_file_is_replaced_not_this_runs(tmp_path: Path) -> None:
    """The first session replaces the earlier run's file; the second adds to it instead of replacing it."""
    sim = SIMS[0]
    earlier = ScanSimulation(scan_shape=(8, 6), frame_shape=(64, 80), frames_per_position=3, scan_number=3, seed=9)
    write_stempy_hdf5(tmp_path / "scan_000003.h5", earlier.batches(50))
    assert _run_paused_scan(sim, tmp_path, overwrite=True) == 1
    _assert_holds_the_whole_scan_once_in_order(sim, tmp_path / "scan_000003.h5")


def test_frames_merge_into_earlier_ones_in_order_each_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Earlier frames (even numbers 10..78, read back in batches of 5) and new ones (the rest, reversed,
    with redeliveries) interleave; of a number in both the earlier frame stays."""
    from transforms import write_hdf5_frames as module

    whole = SIMS[0].batch(0, 96)

    def frames(numbers: list[int], *, empty: bool = False) -> SparseFrameBatch:
        picked = [np.zeros(0, np.uint32) if empty else whole.frame(i) for i in numbers]
        return SparseFrameBatch.from_frames(whole.header, picked, whole.scan_positions[numbers], numbers)

    evens = list(range(10, 80, 2))
    earlier = [frames(evens[i : i + 5]) for i in range(0, len(evens), 5)]
    rest = [n for n in range(95, -1, -1) if n not in evens]
    new = [frames(rest[:30]), frames([14, 30], empty=True), frames(rest[25:]), frames([7])]
    monkeypatch.setattr(module, "_FRAMES_PER_BATCH", 4)  # new frames before and after the earlier ones: batches
    merged = list(module._each_frame_once_in_order(Path("scan.h5"), new, earlier))
    assert [b.n_frames for b in merged[:3]] == [4, 4, 2]  # 0..9
    assert max(b.n_frames for b in merged[-5:]) == 4  # 79..95
    assert_same_frames(merged, [whole])


def test_a_job_built_again_with_the_same_run_id_merges_into_its_files(tmp_path: Path) -> None:
    """A job resubmitted from a savepoint is built again: with the same run_id it goes on with its files."""
    sim = SIMS[0]
    path = tmp_path / "scan_000003.h5"
    sent = list(sim.batches(16))
    first = run_operator(write_hdf5_frames(out_dir=str(tmp_path), run_id="cam-1"), sent[:3])
    assert (first.outputs, first.dead_letters) == ([str(path)], [])
    again = run_operator(write_hdf5_frames(out_dir=str(tmp_path), run_id="cam-1"), sent[2:])  # one batch redelivered
    assert (again.outputs, again.dead_letters) == ([str(path)], [])
    _assert_holds_the_whole_scan_once_in_order(sim, path)
    saved = path.read_bytes()

    other = run_operator(write_hdf5_frames(out_dir=str(tmp_path), run_id="cam-2"), sent[:1])
    assert [d.error_type for d in other.dead_letters] == ["FileExistsError"]
    assert path.read_bytes() == saved


def test_a_run_id_is_a_name() -> None:
    with pytest.raises(OperatorParameterError, match="parameter 'run_id'"):
        write_hdf5_frames(run_id="two words")


def test_an_earlier_runs_file_is_refused_without_overwrite_and_replaced_with_it(tmp_path: Path) -> None:
    sim = SIMS[0]
    path = tmp_path / "scan_000003.h5"
    assert run_operator(write_hdf5_frames(out_dir=str(tmp_path)), sim.batches(16)).dead_letters == []
    saved = path.read_bytes()
    part = list(sim.batches(16))[:2]  # a second run of the same scan number, with fewer frames

    refused = run_operator(write_hdf5_frames(out_dir=str(tmp_path)), part)
    assert refused.outputs == []
    assert [d.error_type for d in refused.dead_letters] == ["FileExistsError"] * len(part)
    assert refused.dead_letters[0].error == (
        f"{path} was written before this run; set write_hdf5_frames' overwrite parameter to true to replace it"
    )
    assert path.read_bytes() == saved

    replaced = run_operator(write_hdf5_frames(out_dir=str(tmp_path), overwrite=True), part)
    assert (replaced.outputs, replaced.dead_letters) == ([str(path)], [])
    (back,) = read_stempy_hdf5(path, batch_size=sim.n_frames)
    np.testing.assert_array_equal(back.frame_numbers, np.arange(32))  # the new run's frames only, not merged


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


def test_a_bad_row_sends_its_batch_to_dead_letters_and_the_rest_of_the_file_is_read(tmp_path: Path) -> None:
    # Before, the read stopped at the bad row: every frame after its batch was dropped.
    import h5py

    sim = SIMS[0]  # 96 frames
    path = tmp_path / "scan.h5"
    write_stempy_hdf5(path, sim.batches(16))
    with h5py.File(path, "r+") as f:
        f["electron_events/frames"][10] = np.array([64 * 80 + 5], np.uint32)  # past the last pixel
    result = run_operator(lambda root: root.pipeline | read_hdf5_frames(path=str(path), batch_size=4), [])
    (letter,) = result.dead_letters
    assert "rows 8..11 hold pixel index 5125, outside frame (64, 80)" in letter.error and str(path) in letter.error
    numbers = np.sort(np.concatenate([b.frame_numbers for b in result.outputs]))
    np.testing.assert_array_equal(numbers, [n for n in range(96) if not 8 <= n <= 11])


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


def test_the_picture_of_a_map_says_how_many_positions_are_blank() -> None:
    sim = ScanSimulation(scan_shape=(6, 5), events_per_frame=50)

    def final_map(**crop: float) -> ComMap:
        return run_operator(lambda f: f | com_partial(**crop) | com_reduce(), sim.batches(7)).final_maps()[1]

    assert com_png_title(final_map()) == "Scan 1: center of mass (final; 30 frames, 30/30 positions)"
    empty = final_map(crop_radius=0.0, init_center_x=5.0, init_center_y=5.0)  # far from the disc: nothing kept
    assert np.isnan(empty.x).all()
    assert (
        com_png_title(empty) == "Scan 1: center of mass (final; 30 frames, 30/30 positions; 30 without events, hatched)"
    )
    # An incomplete map: its positions no frame reached are not said to be "without events"
    cut = run_operator(lambda f: f | com_partial() | com_reduce(), list(sim.batches(7))[:2]).final_maps()[1]
    assert com_png_title(cut) == (
        "Scan 1: center of mass (final, INCOMPLETE; 14 frames, 14/30 positions; 16 without frames, hatched)"
    )


def test_cells_without_data_are_hatched_not_white_and_counted_in_the_title() -> None:
    # Before, NaN cells were transparent over a white figure: the brightest grey, read as data.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from transforms._pictures import draw_map
    from transforms.write_image import image_png_title

    header = ScanSimulation(scan_shape=(2, 2), frame_shape=(64, 64), disc_radius=8, shift_amplitude=2).header
    data = np.array([[1.0, np.nan], [0.0, 0.5]], np.float32)
    fig, ax = plt.subplots(figsize=(2, 2), dpi=50)
    ax.set_position((0, 0, 1, 1))
    draw_map(ax, data, "gray")
    fig.canvas.draw()
    pixels = np.asarray(fig.canvas.buffer_rgba())[..., :3]
    plt.close(fig)
    brightest, blank = pixels[25, 25], pixels[25, 75]  # cells (0, 0) and (0, 1), rows down
    assert tuple(brightest) == (255, 255, 255) and tuple(blank) != (255, 255, 255)
    image = Image(header, "bf", data, final=True, complete=False, frames_seen=3)
    assert image_png_title(image) == "Scan 1: bf (final, INCOMPLETE, 3 frames; 1 without frames, hatched)"


def test_a_map_without_a_single_value_says_no_data_instead_of_a_colour_bar() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from transforms._pictures import colour_bar, draw_map

    for data, bars, texts in [(np.full((2, 2), np.nan), 0, ["no data"]), (np.array([[np.nan, 1.0]]), 1, [])]:
        fig, ax = plt.subplots()
        colour_bar(fig, draw_map(ax, data, "gray"), ax, data, "px")
        assert (len(ax.child_axes), [t.get_text() for t in ax.texts]) == (bars, texts)  # a bar is an inset of ax
        plt.close(fig)


def test_a_colour_bar_is_as_tall_as_its_map_whatever_the_scans_shape() -> None:
    """A 32x64 scan's bars stood twice as tall as its maps: they took the height of the axes' slot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from transforms._pictures import colour_bar, draw_map, figure_height

    for shape in [(32, 64), (64, 24), (50, 50)]:
        data = np.arange(float(np.prod(shape))).reshape(shape)
        fig, ax = plt.subplots(figsize=(5, figure_height(shape, 4.6)), constrained_layout=True)
        colour_bar(fig, draw_map(ax, data, "gray"), ax, data, "px")
        fig.canvas.draw()
        (bar,) = ax.child_axes
        shown, beside = ax.get_window_extent(), bar.get_window_extent()
        plt.close(fig)
        assert beside.height == pytest.approx(shown.height, abs=1.0), shape
        assert shown.width / shown.height == pytest.approx(shape[1] / shape[0], rel=0.02)  # square cells


def test_an_image_names_its_axes_in_scan_or_detector_space() -> None:
    header = ScanSimulation(scan_shape=(6, 5), frame_shape=(64, 72), disc_radius=8, shift_amplitude=2).header
    scan_image = Image(header, "bf", np.zeros((6, 5), np.float32))
    pattern = Image(header, "diffraction_sum", np.zeros((64, 72), np.float32))
    assert axis_labels(scan_image) == ("scan column", "scan row")
    assert axis_labels(pattern) == ("detector column", "detector row")


def test_an_interrupted_write_leaves_the_file_as_it_was_and_no_temporary_file(tmp_path: Path) -> None:
    """Ctrl-C while a map's PNG was drawn left a 0-byte ``.scan_000002_com.png.tmp`` beside the maps."""
    from beamops.io.files import atomic_write

    path = tmp_path / "scan_000001_com.png"
    path.write_bytes(b"earlier")

    def interrupted(fh: object) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, interrupted)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]
    assert path.read_bytes() == b"earlier"
    atomic_write(path, lambda fh: fh.write(b"new"))
    assert [p.name for p in tmp_path.iterdir()] == [path.name] and path.read_bytes() == b"new"


def test_beamops_maps_lists_each_scans_map_with_its_counters(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Whether every scan got a complete final map was a matter of numpy by hand."""
    import json

    from beamops.cli import main as beamops_main
    from transforms.write_com_map import write_com_map

    sims = [ScanSimulation(scan_shape=(4, 5), frame_shape=(64, 64), disc_radius=8, shift_amplitude=2, scan_number=n)
            for n in (1, 2)]  # fmt: skip
    batches = [*sims[0].batches(7), *list(sims[1].batches(7))[:2]]  # scan 2 is cut: flushed incomplete
    run_operator(lambda f: f | com_partial() | com_reduce() | write_com_map(out_dir=str(tmp_path)), batches)
    assert beamops_main(["maps", str(tmp_path)]) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"scan 1: final, 20 frames, 20/20 positions  {tmp_path}/scan_000001_com.npz",
        f"scan 2: final, INCOMPLETE, 14 frames, 14/20 positions  {tmp_path}/scan_000002_com.npz",
    ]
    assert beamops_main(["maps", "--json", str(tmp_path / "scan_000002_com.npz")]) == 0
    assert json.loads(capsys.readouterr().out) == {
        "scan": 2, "final": True, "complete": False, "frames_seen": 14, "positions_seen": 14, "positions": 20,
        "where": str(tmp_path / "scan_000002_com.npz"),
    }  # fmt: skip
    (tmp_path / "notes.npz").write_bytes(b"not a map")
    assert beamops_main(["maps", str(tmp_path / "notes.npz"), str(tmp_path / "gone")]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'notes.npz'}: not a COM map written by write_com_map" in err
    assert f"{tmp_path / 'gone'}: no such file or folder" in err
