"""virtual_images: BF/ADF images per scan, cross-checked with stempy.image.create_stem_images.

stempy semantics (checked against stempy 3.6.0 by probing single pixels): an event
counts in an annulus when ``inner² <= d² < outer²`` with ``d²`` in float64 from a
float centre; ``center=(x, y)`` is (column, row); each event adds 65535 (its mask
value 0xFFFF), so its images are divided by 65535 here. Its SparseArray path
passes ``frame_shape`` (rows, cols) as (width, height), so it is used with square
frames; non-square frames go through its ndarray path with
``frame_dimensions=(cols, rows)``.

Batch cases run on FnApiRunner (``run_operator``); cases that depend on the order
of elements or on the watermark use a TestStream on BundleBasedDirectRunner, with
the watermark advanced past the last timer before infinity (DESIGN.md section 6).
"""

from __future__ import annotations

from collections import defaultdict

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pytest
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline  # alias: not a pytest class
from apache_beam.testing.util import assert_that, equal_to
from stempy.image import create_stem_images
from stempy.io import SparseArray

from beamops import FrameHeader, Image, OperatorParameterError, SparseFrameBatch
from beamops.registry import discover
from beamops.testing import ScanSimulation, matcher, run_operator, small_scan, timestamped_stream
from transforms.virtual_images import VirtualImageAccumulator, VirtualImagesParams, default_names, virtual_images

STREAM_RUNNER = "--runner=BundleBasedDirectRunner"
STEMPY_EVENT = 65535  # stempy adds its mask value, 0xFFFF, per event


# --- helpers ------------------------------------------------------------------------


def frames_by_position(batches: list[SparseFrameBatch]) -> dict[int, list[np.ndarray]]:
    """Each position's frames, ordered by frame number."""
    found: dict[int, list[tuple[int, np.ndarray]]] = defaultdict(list)
    for batch in batches:
        for i in range(batch.n_frames):
            found[int(batch.scan_positions[i])].append((int(batch.frame_numbers[i]), np.array(batch.frame(i))))
    return {p: [f for _, f in sorted(v, key=lambda t: t[0])] for p, v in found.items()}


def stempy_data(batches: list[SparseFrameBatch]) -> np.ndarray:
    """stempy's sparse layout: (positions, frames per position) of uint32 arrays; missing frames are empty."""
    header = batches[0].header
    per_position = frames_by_position(batches)
    depth = max(len(v) for v in per_position.values())
    data = np.empty((header.n_positions, depth), dtype=object)
    for pos in range(header.n_positions):
        frames = per_position.get(pos, [])
        for k in range(depth):
            data[pos, k] = np.asarray(frames[k] if k < len(frames) else [], np.uint32)
    return data


def stempy_images(batches, radii, center_xy) -> np.ndarray:
    """stempy's images in counts, (annuli, rows, cols). ``center_xy`` is (column, row), as stempy's (x, y)."""
    header = batches[0].header
    inner = [int(r[0]) for r in radii]
    outer = [int(r[1]) for r in radii]
    assert [tuple(map(float, r)) for r in zip(inner, outer, strict=True)] == [tuple(map(float, r)) for r in radii]
    if header.frame_shape[0] == header.frame_shape[1]:
        sparse = SparseArray(stempy_data(batches), header.scan_shape, header.frame_shape)
        raw = create_stem_images(sparse, inner, outer, center=center_xy)
    else:  # stempy's ndarray path: dimensions are (width, height)
        raw = create_stem_images(
            stempy_data(batches),
            inner,
            outer,
            scan_dimensions=header.scan_shape[::-1],
            frame_dimensions=header.frame_shape[::-1],
            center=center_xy,
        )
    raw = np.asarray(raw, np.uint64)
    assert raw.shape == (len(radii), *header.scan_shape)
    assert not (raw % STEMPY_EVENT).any()
    return (raw // STEMPY_EVENT).astype(np.int64)


def reference_images(batches, radii, center_xy) -> np.ndarray:
    """Plain numpy: events with inner <= r < outer per position, all frames together."""
    header = batches[0].header
    out = np.zeros((len(radii), header.n_positions), np.int64)
    for batch in batches:
        for i in range(batch.n_frames):
            row, col = np.divmod(batch.frame(i).astype(np.int64), header.frame_shape[1])
            d2 = (col - center_xy[0]) ** 2 + (row - center_xy[1]) ** 2
            for a, (lo, hi) in enumerate(radii):
                out[a, int(batch.scan_positions[i])] += int(((d2 >= lo * lo) & (d2 < hi * hi)).sum())
    return out.reshape(len(radii), *header.scan_shape)


def pattern_center(batches, n_frames: int) -> tuple[float, float]:
    """Mean (column, row) of the events of the first ``n_frames`` frames, in arrival order."""
    frames = [b.frame(i) for b in batches for i in range(b.n_frames)][:n_frames]
    events = np.concatenate(frames).astype(np.int64)
    row, col = np.divmod(events, batches[0].header.frame_shape[1])
    return col.sum() / len(events), row.sum() / len(events)


def finals(images) -> dict[str, Image]:
    out = {}
    for im in images:
        if im.final:
            assert im.name not in out, f"two final images named {im.name}"
            out[im.name] = im
    return out


def stacked(images: dict[str, Image], names) -> np.ndarray:
    return np.stack([images[n].data for n in names])


def assert_counts_equal(got: np.ndarray, want: np.ndarray) -> None:
    """Exact equality of counts (float32 images hold integers exactly below 2**24)."""
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, want.astype(np.float32))


def assert_not_trivial(want: np.ndarray) -> None:
    """Guard against vacuous agreement: every annulus has counts that vary over the scan."""
    for image in want:
        assert image.sum() > 0 and image.std() > 0


def summary(im: Image) -> tuple[int, str, int, bool, bool]:
    return (im.scan_number, im.name, im.frames_seen, im.final, im.complete)


def final_images(batches, **params) -> dict[str, Image]:
    """The final images of one complete scan through the operator on FnApiRunner."""
    result = run_operator(virtual_images(**params), batches)
    assert result.dead_letters == []
    got = finals(result.outputs)
    assert all(im.complete and im.units == "counts" for im in got.values())
    return got


# --- agreement with stempy ---------------------------------------------------------------


@pytest.mark.parametrize(
    "annuli, center",
    [
        ("0:20,20:24,24:60", (290.3, 285.6)),  # fractional centre: stempy computes d² in float64
        ("0:12,12:21,21:40", (288.0, 287.0)),  # integer centre: events exactly on the circles
        ("5:19", (284.75, 291.5)),
    ],
    ids=["three-annuli", "integer-center", "one-annulus"],
)
def test_given_center_matches_stempy_exactly(annuli, center):
    # 3 frames per position; frame f lands on position f % 256, so batches of 100
    # frames split every position's frames across batches.
    sim = ScanSimulation(scan_shape=(16, 16), events_per_frame=40, frames_per_position=3, seed=5)
    batches = list(sim.batches(100))
    params = VirtualImagesParams(annuli=annuli)
    got = final_images(batches, annuli=annuli, center_x=center[0], center_y=center[1], emit_every=0)
    assert list(got) == list(params.image_names)
    assert all(im.frames_seen == sim.n_frames and im.data.shape == sim.scan_shape for im in got.values())
    want = stempy_images(batches, params.radii, center)
    assert_not_trivial(want)
    assert_counts_equal(stacked(got, params.image_names), want)
    np.testing.assert_array_equal(want, reference_images(batches, params.radii, center))
    # the axis mapping matters: stempy with the centre's axes swapped gives another answer
    assert not np.array_equal(want, stempy_images(batches, params.radii, center[::-1]))


def test_annulus_boundaries_are_half_open_like_stempy():
    # Centre (column 5, row 5) on a 12x12 frame: events at r = 0, 2 (inner edge of
    # 2:3), 3 (outer edge of 2:3, inner edge of 3:5) and 5 (outer edge of 3:5).
    w = 12
    header = FrameHeader(scan_number=3, scan_shape=(1, 2), frame_shape=(w, w))
    at = [(5, 5), (5, 7), (8, 5), (5, 10), (2, 1)]  # (column, row): r = 0, 2, 3, 5, 5
    frame0 = np.array([row * w + col for col, row in at], np.uint32)
    frame1 = np.array([5 * w + 3, 5 * w + 3], np.uint32)  # r = 2, twice
    batch = SparseFrameBatch.from_frames(header, [frame0, frame1], [0, 1])
    annuli = "0:2,2:3,3:5"
    got = final_images([batch], annuli=annuli, names="disc,ring,outer", center_x=5.0, center_y=5.0)
    assert_counts_equal(stacked(got, ["disc", "ring", "outer"]), np.array([[[1, 0]], [[1, 2]], [[1, 0]]]))
    want = stempy_images([batch], VirtualImagesParams(annuli=annuli).radii, (5, 5))
    assert_counts_equal(stacked(got, ["disc", "ring", "outer"]), want)


def test_center_from_summed_pattern_of_all_frames_matches_stempy():
    # 512 frames < center_frames (default 1000): the centre is the mean (column, row)
    # of every event of the scan, whatever order the batches come in.
    sim = ScanSimulation(scan_shape=(16, 16), events_per_frame=40, frames_per_position=2, seed=8)
    batches = list(sim.batches(128))
    annuli = "0:16,16:21,21:40"
    params = VirtualImagesParams(annuli=annuli)
    got = final_images(batches, annuli=annuli, emit_every=0)
    center = pattern_center(batches, sim.n_frames)
    assert center != sim.center  # not the frame's geometric centre
    want = stempy_images(batches, params.radii, center)
    assert_not_trivial(want)
    assert_counts_equal(stacked(got, params.image_names), want)
    # the centre matters here: stempy around the frame's centre (287.5, 287.5) disagrees
    assert not np.array_equal(want, stempy_images(batches, params.radii, sim.center))


@pytest.mark.parametrize("order", ["in order", "reversed", "interleaved"])
def test_center_from_the_frames_numbered_below_center_frames_under_test_stream(order: str):
    """center_frames=100 with batches of 40: the centre comes from frames 0..99 (batches 1-2 and the first
    20 frames of batch 3), whatever order the batches arrive in (live from several partitions, offline from
    a file); frames before it is fixed are kept and replayed, frames after it are counted as they come.
    Before, it came from the first 100 frames to arrive."""
    sim = ScanSimulation(scan_shape=(12, 12), events_per_frame=40, frames_per_position=2, seed=2, shift_amplitude=8.0)
    batches = list(sim.batches(40))  # 288 frames, 8 batches, in frame-number order
    arrived = {"in order": batches, "reversed": batches[::-1], "interleaved": batches[1::2] + batches[::2]}[order]
    annuli = "0:16,16:21,21:40"
    params = VirtualImagesParams(annuli=annuli)
    want = stempy_images(batches, params.radii, pattern_center(batches, 100))
    assert_not_trivial(want)
    other = pattern_center(batches, 120) if order == "in order" else pattern_center(arrived, 100)
    assert not np.array_equal(want, stempy_images(batches, params.radii, other))  # another centre shows
    stream = timestamped_stream(*[(float(i), b) for i, b in enumerate(arrived)])

    def expect(images):
        assert sorted(summary(im) for im in images) == [(1, n, 288, True, True) for n in ("adf1", "adf2", "bf")]
        assert_counts_equal(stacked(finals(images), params.image_names), want)

    with BeamTestPipeline(options=PipelineOptions([STREAM_RUNNER])) as p:
        out = p | stream | virtual_images(annuli=annuli, center_frames=100, emit_every=0)
        assert_that(out.images, matcher(expect))
        assert_that(out.dead_letter, equal_to([]), label="NoDeadLetters")


def test_non_square_frames_and_scan_match_stempy():
    sim = small_scan(frame_shape=(40, 72), scan_shape=(5, 9), frames_per_position=2, seed=4)
    batches = list(sim.batches(30))
    annuli = "0:5,5:9,9:30"
    center = (36.2, 19.4)
    params = VirtualImagesParams(annuli=annuli)
    got = final_images(batches, annuli=annuli, center_x=center[0], center_y=center[1], emit_every=0)
    want = stempy_images(batches, params.radii, center)
    assert_not_trivial(want)
    assert_counts_equal(stacked(got, params.image_names), want)


def test_several_frames_of_one_position_in_one_batch():
    # A last-write-wins scatter (numpy fancy-index +=) would keep one frame per position.
    w = 40
    header = FrameHeader(scan_number=1, scan_shape=(2, 2), frame_shape=(w, w))
    rng = np.random.default_rng(3)
    positions = [0, 0, 1, 0, 2, 3, 3, 1]
    frames = [
        (rng.integers(0, w, k) * w + rng.integers(0, w, k)).astype(np.uint32) for k in (9, 15, 12, 13, 14, 6, 11, 7)
    ]
    batch = SparseFrameBatch.from_frames(header, frames, positions)
    annuli = "0:10,10:30"
    radii = VirtualImagesParams(annuli=annuli).radii
    got = final_images([batch], annuli=annuli, center_x=19.5, center_y=20.25, emit_every=0)
    want = reference_images([batch], radii, (19.5, 20.25))
    assert want[:, 0, 0].sum() > 0
    assert_counts_equal(stacked(got, ["bf", "adf1"]), want)
    assert_counts_equal(stacked(got, ["bf", "adf1"]), stempy_images([batch], radii, (19.5, 20.25)))


def test_centering_skips_empty_frames_and_replays_the_kept_frames():
    # center_frames=2, but the first three frames hold no event: the centre comes
    # from frames 0-3 (the first with an event is frame 3), frame 4 is not part of
    # it. Until then the frames are kept in state; once the centre is fixed they
    # are replayed and the state keeps counts only.
    w = 20
    header = FrameHeader(scan_number=4, scan_shape=(1, 6), frame_shape=(w, w), total_frames=6)
    empty = np.zeros(0, np.uint32)

    def ev(*col_row):
        return np.array([r * w + c for c, r in col_row], np.uint32)

    frames = [empty, empty, empty, ev((10, 10), (12, 10)), ev((3, 3)), ev((11, 10))]
    first = SparseFrameBatch.from_frames(header, frames[:2], [0, 1], [0, 1])
    second = SparseFrameBatch.from_frames(header, frames[2:], [2, 3, 4, 5], [2, 3, 4, 5])
    params = VirtualImagesParams(annuli="0:1.5,1.5:20", center_frames=2)
    acc = VirtualImageAccumulator.empty(header, params)
    acc.add(first)
    assert acc.center is None and acc.pending_events == 0  # two frames, no event yet
    acc.add(second)
    assert acc.center == (11.0, 10.0)  # frame 3 only
    assert acc.pending == [] and acc.center_frames_used == 4
    images = {im.name: im.data for im in acc.images(final=True)}
    assert_counts_equal(images["bf"], np.array([[0, 0, 0, 2, 0, 1]]))  # r = 1, 1; r = 0
    assert_counts_equal(images["adf1"], np.array([[0, 0, 0, 0, 1, 0]]))  # r = 10.6


def test_kept_frames_are_bounded_by_center_frames_and_a_batch():
    sim = small_scan()
    batches = list(sim.batches(10))
    acc = VirtualImageAccumulator.empty(sim.header, VirtualImagesParams(annuli="0:6", center_frames=15))
    acc.add(batches[0])
    assert acc.center is None and acc.pending_events == len(batches[0].events)
    acc.add(batches[1])  # 20 frames >= 15: the centre is fixed, the kept frames are replayed and dropped
    assert acc.center == pattern_center(batches, 15) and acc.pending == []
    for b in batches[2:]:
        acc.add(b)
    (image,) = acc.images(final=True)
    assert_counts_equal(image.data[None], reference_images(batches, ((0, 6),), acc.center))


# --- progressive and final images --------------------------------------------------------


def test_progressive_then_final_images_under_test_stream():
    sim = small_scan()  # 48 positions, one frame each, total_frames = 48
    batches = list(sim.batches(10))  # 10, 10, 10, 10, 8 frames
    annuli = "0:6,6:12"
    center = (31.7, 32.2)
    radii = VirtualImagesParams(annuli=annuli).radii
    stream = timestamped_stream(*[(float(i), b) for i, b in enumerate(batches)])

    def expect(images):
        # emit_every=16: progressive at 20 and 40 frames (first reaching 16, 32), then the final at 48
        assert sorted(summary(im) for im in images) == sorted(
            (1, name, n, n == 48, n == 48) for n in (20, 40, 48) for name in ("bf", "adf1")
        )
        by_frames = {(im.frames_seen, im.name): im for im in images}
        first = stacked({n: by_frames[(20, n)] for n in ("bf", "adf1")}, ["bf", "adf1"])
        seen = np.zeros(sim.n_positions, bool)
        seen[:20] = True
        seen = seen.reshape(sim.scan_shape)
        assert np.isnan(first[:, ~seen]).all()  # no frame yet: no data
        want_first = reference_images(batches[:2], radii, center)
        np.testing.assert_array_equal(first[:, seen], want_first[:, seen])
        final = stacked({n: by_frames[(48, n)] for n in ("bf", "adf1")}, ["bf", "adf1"])
        assert_counts_equal(final, stempy_images(batches, radii, center))

    with BeamTestPipeline(options=PipelineOptions([STREAM_RUNNER])) as p:
        out = p | stream | virtual_images(annuli=annuli, center_x=center[0], center_y=center[1], emit_every=16)
        assert_that(out.images, matcher(expect))
        assert_that(out.dead_letter, equal_to([]), label="NoDeadLetters")


def test_no_progressive_image_before_the_centre_is_known():
    # center_frames=25, emit_every=10, batches of 10: the 10 and 20 frame thresholds
    # pass while the centre is unknown; the first progressive images come at 30 frames.
    sim = small_scan()
    batches = list(sim.batches(10))
    annuli = "0:6,6:12"
    radii = VirtualImagesParams(annuli=annuli).radii
    stream = timestamped_stream(*[(float(i), b) for i, b in enumerate(batches)])
    center = pattern_center(batches, 25)

    def expect(images):
        assert sorted({(im.frames_seen, im.final) for im in images}) == [(30, False), (40, False), (48, True)]
        by_frames = {(im.frames_seen, im.name): im for im in images}
        at30 = stacked({n: by_frames[(30, n)] for n in ("bf", "adf1")}, ["bf", "adf1"])
        want = reference_images(batches[:3], radii, center).reshape(2, -1)[:, :30]
        np.testing.assert_array_equal(at30.reshape(2, -1)[:, :30], want)
        final = stacked({n: by_frames[(48, n)] for n in ("bf", "adf1")}, ["bf", "adf1"])
        assert_counts_equal(final, stempy_images(batches, radii, center))

    with BeamTestPipeline(options=PipelineOptions([STREAM_RUNNER])) as p:
        out = p | stream | virtual_images(annuli=annuli, center_frames=25, emit_every=10)
        assert_that(out.images, matcher(expect))


@pytest.mark.parametrize("given_center", [True, False], ids=["given_center", "pattern_center"])
def test_incomplete_scan_is_flushed_at_end_of_bounded_run(given_center):
    sim = small_scan()
    batches = list(sim.batches(10))
    kept = [batches[0], batches[2], batches[4]]  # 28 of 48 frames
    annuli = "0:6,6:12"
    radii = VirtualImagesParams(annuli=annuli).radii
    center = (31.7, 32.2) if given_center else pattern_center(kept, 28)  # fewer frames than center_frames: all
    params = {"center_x": center[0], "center_y": center[1]} if given_center else {}
    result = run_operator(virtual_images(annuli=annuli, emit_every=0, **params), kept)
    assert result.dead_letters == []
    assert sorted(summary(im) for im in result.outputs) == [(1, "adf1", 28, True, False), (1, "bf", 28, True, False)]
    got = stacked(finals(result.outputs), ["bf", "adf1"])
    seen = np.zeros(sim.n_positions, bool)
    for b in kept:
        seen[b.scan_positions] = True
    seen = seen.reshape(sim.scan_shape)
    assert np.isnan(got[:, ~seen]).all()
    want = stempy_images(kept, radii, center)  # stempy: missing frames are empty
    assert_not_trivial(want)
    np.testing.assert_array_equal(got[:, seen], want[:, seen])
    assert result.counter("scans_timed_out") == 1 and result.counter("scans_completed") == 0


def test_completion_without_total_frames_is_every_position_seen():
    sim = small_scan(frames_per_position=2, declare_total_frames=False)
    batches = list(sim.batches(24))  # positions all seen after batch 2; batches 3-4 are late
    center = (31.7, 32.2)
    stream = timestamped_stream(*[(float(i), b) for i, b in enumerate(batches)])
    radii = VirtualImagesParams(annuli="0:6").radii

    def expect(images):
        assert [summary(im) for im in images] == [(1, "bf", 48, True, True)]
        assert_counts_equal(images[0].data[None], reference_images(batches[:2], radii, center))

    with BeamTestPipeline(options=PipelineOptions([STREAM_RUNNER])) as p:
        out = p | stream | virtual_images(annuli="0:6", center_x=center[0], center_y=center[1], emit_every=0)
        assert_that(out.images, matcher(expect))
        assert_that(out.dead_letter | beam.Map(lambda d: d.error_type), equal_to(["LateFrameError"] * 2), label="Late")


def test_late_frames_of_finished_scan_go_to_dead_letters():
    sim = small_scan()
    batches = list(sim.batches(12))
    late = sim.batch(1, 12)  # a repeat of batch 1 after the scan completed
    other = small_scan(scan_number=7, seed=4)
    other_batches = list(other.batches(48))
    stream = timestamped_stream(*[(float(i), b) for i, b in enumerate(batches)], (5.0, late), (6.0, other_batches[0]))
    center = (31.7, 32.2)
    radii = VirtualImagesParams(annuli="0:6").radii

    def expect_dead(dead):
        assert len(dead) == 1
        (d,) = dead
        assert d.error_type == "LateFrameError" and d.operator == "virtual_images"
        assert "scan 1" in d.error
        table = pa.ipc.open_stream(d.payload).read_all()
        np.testing.assert_array_equal(table.column("scan_position").to_numpy(), late.scan_positions)
        assert d.origin == late.origin

    def expect_images(images):
        assert sorted(summary(im) for im in images) == [(1, "bf", 48, True, True), (7, "bf", 48, True, True)]
        by_scan = {im.scan_number: im for im in images}
        assert_counts_equal(by_scan[1].data[None], stempy_images(batches, radii, center))
        assert_counts_equal(by_scan[7].data[None], stempy_images(other_batches, radii, center))

    with BeamTestPipeline(options=PipelineOptions([STREAM_RUNNER])) as p:
        out = p | stream | virtual_images(annuli="0:6", center_x=center[0], center_y=center[1], emit_every=0)
        assert_that(out.images, matcher(expect_images))
        assert_that(out.dead_letter, matcher(expect_dead), label="DeadLetters")


def test_redelivered_frames_are_counted_once_and_bad_batches_are_dead_letters():
    sim = small_scan()
    batches = list(sim.batches(12))
    wrong_shape = small_scan(scan_shape=(4, 4)).batch(0, 16)
    redelivered = [*batches[:2], batches[1], wrong_shape, *batches[2:]]
    center = (31.7, 32.2)
    radii = VirtualImagesParams(annuli="0:6,6:12").radii
    result = run_operator(
        virtual_images(annuli="0:6,6:12", center_x=center[0], center_y=center[1], emit_every=0), redelivered
    )
    got = finals(result.outputs)
    assert all(im.frames_seen == 48 and im.complete for im in got.values())
    assert_counts_equal(stacked(got, ["bf", "adf1"]), stempy_images(batches, radii, center))
    assert result.counter("duplicate_frames") == 12
    assert [d.error_type for d in result.dead_letters] == ["ValueError"]
    assert "(4, 4)" in result.dead_letters[0].error


# --- parameters and catalog --------------------------------------------------------------


@pytest.mark.parametrize(
    "annuli, reason",
    [
        ("", "got nothing"),
        ("0-40", "expected 'inner:outer'"),
        ("0:40:60", "expected 'inner:outer'"),
        ("0:40,", "annulus 2"),
        ("a:b", "must be numbers"),
        ("40:10", "greater than inner"),
        ("10:10", "greater than inner"),
        ("-1:5", "inner radius must be >= 0"),
        ("0:inf", "finite"),
        ("nan:4", "finite"),
    ],
)
def test_bad_annuli_are_rejected_at_construction(annuli, reason):
    with pytest.raises(OperatorParameterError) as err:
        virtual_images(annuli=annuli)
    message = str(err.value)
    assert "'virtual_images'" in message and "parameter 'annuli'" in message
    assert reason in message


@pytest.mark.parametrize(
    "params, parameter, reason",
    [
        ({"names": "bf"}, "'names'", "1 names for 2 annuli"),
        ({"names": "bf,bf"}, "'names'", "duplicate"),
        ({"names": "bf,2adf"}, "'names'", "must start with a letter"),
        ({"center_x": 3.0}, "'virtual_images': set both", "set both center_x and center_y"),
        ({"center_frames": 0}, "'center_frames'", "greater than or equal to 1"),
        ({"annulus": "0:4"}, "unknown parameter", "annulus"),
    ],
)
def test_other_bad_parameters_are_rejected_at_construction(params, parameter, reason):
    with pytest.raises(OperatorParameterError) as err:
        virtual_images(**params)
    assert "'virtual_images'" in str(err.value) and parameter in str(err.value) and reason in str(err.value)


def test_default_and_given_names():
    assert default_names(((0, 40), (60, 200))) == ("bf", "adf1")
    assert default_names(((0, 10), (10, 20), (20, 40))) == ("bf", "adf1", "adf2")
    assert default_names(((0, 10), (0, 20), (30, 40))) == ("bf1", "bf2", "adf1")
    assert default_names(((60, 200),)) == ("adf1",)
    params = virtual_images(annuli=" 0:40 , 60:200.5 ", names=" haadf_in , haadf ").params
    assert params.radii == ((0.0, 40.0), (60.0, 200.5))
    assert params.image_names == ("haadf_in", "haadf")
    assert virtual_images(names="").params.image_names == ("bf", "adf1")


def test_operator_is_in_the_catalog_with_a_scalar_annuli_parameter():
    op = discover()["virtual_images"]
    assert op is virtual_images
    spec = op.spec()
    params = {p.name: p for p in spec.parameters}
    assert params["annuli"].type.value == "str" and params["annuli"].default == "0:40,60:200"
    assert params["center_frames"].default == 1000
    assert [p.type for p in spec.inputs] == ["sparse_frames"] and [p.type for p in spec.outputs] == ["image"]
    # interactEM ships defaults as strings; they are coerced to the declared types
    coerced = virtual_images.validate_params({"center_frames": "200", "center_x": "10.5", "center_y": "3"})
    assert (coerced.center_frames, coerced.center) == (200, (10.5, 3.0))
