"""diffraction_sum: exact per-pixel sums, progressive and final images, completion, timeouts, dead letters.

Batch cases run on FnApiRunner (``run_operator``); cases that depend on the
order of elements or on the watermark use a TestStream on
BundleBasedDirectRunner, with the watermark moved past every timer before
infinity (DESIGN.md section 6). The reference is ``np.bincount`` over all
events, and stempy 3.6.0's ``calculate_sum_sparse`` on the same events.
"""

from __future__ import annotations

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pytest
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline  # alias: not a pytest class
from apache_beam.testing.util import assert_that, equal_to
from stempy.image import calculate_sum_sparse

from beamops import FrameHeader, Image, OperatorParameterError, SparseFrameBatch, testing
from beamops.testing import ScanSimulation, matcher, run_operator, timestamped_stream
from transforms.bin_frames import bin_frames
from transforms.diffraction_sum import diffraction_sum

STREAM_RUNNER = "--runner=BundleBasedDirectRunner"


# --- helpers ------------------------------------------------------------------------


def small_scan(**overrides) -> ScanSimulation:
    """beamops.testing.small_scan with wider frames and more events, so patterns are not sparse."""
    return testing.small_scan(**{"frame_shape": (64, 72), "events_per_frame": 30.0, "disc_radius": 10.0, **overrides})


def reference_sum(batches) -> np.ndarray:
    """np.bincount over every event of every frame, shape frame_shape."""
    header = batches[0].header
    events = np.concatenate([b.events for b in batches]) if batches else np.zeros(0, np.uint32)
    return np.bincount(events, minlength=header.n_pixels).reshape(header.frame_shape)


def summary(image: Image) -> tuple[int, int, bool, bool]:
    return (image.scan_number, image.frames_seen, image.final, image.complete)


def finals(result) -> dict[int, Image]:
    return {m.scan_number: m for m in result.outputs if m.final}


def assert_pattern(image: Image, batches) -> None:
    assert image.name == "diffraction_sum" and image.units == "counts"
    assert image.data.dtype == np.float32 and image.data.shape == batches[0].header.frame_shape
    np.testing.assert_array_equal(image.data, reference_sum(batches))


def _rows(payload: bytes) -> int:
    return pa.ipc.open_stream(payload).read_all().num_rows


# --- exact sums ---------------------------------------------------------------------------


def test_final_pattern_equals_bincount_of_all_events():
    sim = small_scan(frames_per_position=2)  # a position's two frames fall in different batches
    batches = list(sim.batches(20))
    result = run_operator(diffraction_sum(emit_every=0), batches)
    assert result.dead_letters == []
    assert [summary(m) for m in result.outputs] == [(1, 96, True, True)]
    (final,) = result.outputs
    assert_pattern(final, batches)
    assert final.data.sum() == sum(len(b.events) for b in batches) > 0
    assert final.header == sim.header
    assert result.counter("scans_completed") == 1


def test_repeated_pixels_in_one_frame_all_count():
    # Binned frames repeat pixels: a last-write-wins scatter (numpy fancy-index +=) would count them once.
    w = 6
    header = FrameHeader(scan_number=4, scan_shape=(1, 2), frame_shape=(4, w))
    batch = SparseFrameBatch.from_frames(
        header, [np.array([7, 7, 7, 0], np.uint32), np.array([7, 23], np.uint32)], [0, 1], [0, 1]
    )
    (image,) = run_operator(diffraction_sum(emit_every=0), [batch]).outputs
    want = np.zeros(4 * w)
    want[[0, 7, 23]] = [1, 4, 1]
    np.testing.assert_array_equal(image.data.ravel(), want)
    assert image.complete  # no total_frames: complete once both positions are seen


def test_binned_frames_sum_to_the_binned_pattern():
    sim = small_scan(frame_shape=(64, 72))
    batches = list(sim.batches(16))
    result = run_operator(lambda frames: frames | bin_frames(factor=4) | diffraction_sum(emit_every=0), batches)
    assert result.dead_letters == []
    (final,) = result.outputs
    assert final.data.shape == (16, 18)
    full = reference_sum(batches)
    np.testing.assert_array_equal(final.data, full.reshape(16, 4, 18, 4).sum(axis=(1, 3)))


def test_matches_stempy_calculate_sum_sparse():
    sim = ScanSimulation(scan_shape=(8, 8), frame_shape=(128, 96), events_per_frame=60, disc_radius=20, seed=7)
    batches = list(sim.batches(25))
    (final,) = run_operator(diffraction_sum(emit_every=0), batches).outputs
    frames = [np.asarray(b.frame(i), np.uint32) for b in batches for i in range(b.n_frames)]
    want = calculate_sum_sparse(frames, sim.frame_shape)
    assert want.shape == final.data.shape == (128, 96)
    np.testing.assert_array_equal(final.data, want)
    assert want.max() > 1 and (want == 0).any()  # a real pattern, not trivially flat


# --- progressive and final images ----------------------------------------------------------


def test_progressive_patterns_then_final_under_test_stream():
    sim = small_scan()  # 48 positions, one frame each, total_frames = 48
    batches = list(sim.batches(10))  # 10, 10, 10, 10, 8 frames
    stream = timestamped_stream(*[(float(i), b) for i, b in enumerate(batches)])

    def expect(images):
        images = sorted(images, key=lambda m: m.frames_seen)
        # emit_every=16: a snapshot when 16 and 32 frames are first reached (at 20 and 40),
        # none at 48 because the final image replaces it.
        assert [(m.frames_seen, m.final, m.complete) for m in images] == [
            (20, False, False),
            (40, False, False),
            (48, True, True),
        ]
        assert_pattern(images[0], batches[:2])  # each snapshot holds exactly the frames summed so far
        assert_pattern(images[1], batches[:4])
        assert_pattern(images[2], batches)

    with BeamTestPipeline(options=PipelineOptions([STREAM_RUNNER])) as p:
        out = p | stream | diffraction_sum(emit_every=16)
        assert_that(out.image, matcher(expect))
        assert_that(out.dead_letter, equal_to([]), label="NoDeadLetters")


def test_completion_without_total_frames_and_late_frames_are_dead_letters():
    # Without total_frames the scan is complete once every position has a frame;
    # frames after the final image are late.
    sim = small_scan(frames_per_position=3, declare_total_frames=False)
    batches = list(sim.batches(24))  # 6 batches; every position seen after batch 2
    stream = timestamped_stream(*[(float(i), b) for i, b in enumerate(batches)])

    def expect(images):
        assert [summary(m) for m in images] == [(1, 48, True, True)]
        assert_pattern(images[0], batches[:2])

    with BeamTestPipeline(options=PipelineOptions([STREAM_RUNNER])) as p:
        out = p | stream | diffraction_sum(emit_every=0)
        assert_that(out.image, matcher(expect))
        assert_that(
            out.dead_letter | beam.Map(lambda d: (d.operator, d.error_type, _rows(d.payload))),
            equal_to([("diffraction_sum", "LateFrameError", 24)] * 4),
            label="LateFrames",
        )


def test_incomplete_scan_is_flushed_at_end_of_bounded_run():
    sim = small_scan()
    batches = list(sim.batches(10))
    kept = [batches[0], batches[2], batches[4]]  # 28 of 48 frames
    result = run_operator(diffraction_sum(emit_every=0), kept)
    assert result.dead_letters == []
    assert [summary(m) for m in result.outputs] == [(1, 28, True, False)]
    assert_pattern(result.outputs[0], kept)
    assert result.counter("scans_timed_out") == 1 and result.counter("scans_completed") == 0


def test_timeout_in_event_time_then_retention_of_a_finished_scan():
    sim = small_scan()
    b = list(sim.batches(16))  # 3 batches of 16
    other = small_scan(scan_number=2, seed=5)
    o = list(other.batches(48))
    stream = timestamped_stream(
        (0.0, b[0]),
        ("watermark", 0.0 + 10.0 + 0.5),  # timeout_s = 10 after scan 1's last element: flushed incomplete
        (20.0, b[1]),  # stragglers of the flushed scan 1, within its retention: dead letters, not a second
        (21.0, b[2]),  # "final" pattern of just them
        (22.0, o[0]),  # scan 2 complete in one batch
        (23.0, o[0]),  # a straggler of the finished scan 2: dead letter
    )

    def expect(stamped):
        got = sorted((summary(m), ts) for ts, m in stamped)
        assert [s for s, _ in got] == [(1, 16, True, False), (2, 48, True, True)]
        first = next(m for ts, m in stamped if m.scan_number == 1)
        assert_pattern(first, [b[0]])
        assert 10.0 <= min(ts for ts, _ in stamped) < 20.0  # the timer's event time, before the next element

    with BeamTestPipeline(options=PipelineOptions([STREAM_RUNNER])) as p:
        out = p | stream | diffraction_sum(emit_every=0, timeout_s=10.0, finished_retention_s=100.0)
        stamped = out.image | beam.Map(lambda m, ts=beam.DoFn.TimestampParam: (float(ts), m))
        assert_that(stamped, matcher(expect))
        assert_that(out.dead_letter | beam.Map(lambda d: d.error_type), equal_to(["LateFrameError"] * 3), label="Dead")


def test_redelivered_frames_are_counted_once():
    sim = small_scan()
    batches = list(sim.batches(12))
    redelivered = [*batches[:2], batches[1], *batches[2:]]
    result = run_operator(diffraction_sum(emit_every=0), redelivered)
    (final,) = result.outputs
    assert summary(final) == (1, 48, True, True)
    assert_pattern(final, batches)
    assert result.counter("duplicate_frames") == 12
    assert result.dead_letters == []


def test_bad_batches_are_dead_letters_and_the_scan_goes_on():
    sim = small_scan()
    batches = list(sim.batches(16))
    header = sim.header
    wrong_shape = small_scan(frame_shape=(64, 64), scan_number=1).batch(0, 16)
    one = np.zeros(1, np.uint32)
    # built without validate(): out-of-range indices must not reach the kernel, which does not check bounds
    bad_event = SparseFrameBatch(header, np.array([10**6], np.uint32), np.array([0, 1]), one, np.zeros(1, np.uint64))
    bad_position = SparseFrameBatch(header, one, np.array([0, 1]), np.array([999], np.uint32), np.zeros(1, np.uint64))
    bad_frame = SparseFrameBatch(header, one, np.array([0, 1]), one, np.array([999], np.uint64))
    inputs = [batches[0], wrong_shape, bad_event, bad_position, bad_frame, batches[1], batches[2]]
    stream = timestamped_stream(*[(float(i), x) for i, x in enumerate(inputs)])

    def expect_dead(dead):
        errors = sorted(d.error for d in dead)
        assert len(errors) == 4 and all(d.error_type == "ValueError" for d in dead)
        assert any("(64, 64)" in e and "(64, 72)" in e for e in errors)
        assert any("event index 1000000 out of range" in e for e in errors)
        assert any("scan position 999 out of range" in e for e in errors)
        assert any("frame number 999 out of range" in e for e in errors)

    with BeamTestPipeline(options=PipelineOptions([STREAM_RUNNER])) as p:
        out = p | stream | diffraction_sum(emit_every=0)
        assert_that(out.image, matcher(lambda images: [assert_pattern(m, batches) for m in images]), label="Values")
        assert_that(out.image | beam.Map(summary), equal_to([(1, 48, True, True)]), label="Images")
        assert_that(out.dead_letter, matcher(expect_dead), label="DeadLetters")


def test_two_interleaved_scans_are_summed_independently():
    sim_a = small_scan(scan_number=3, seed=11, frames_per_position=2)
    sim_b = small_scan(scan_number=4, seed=12, frame_shape=(80, 72))
    a = list(sim_a.batches(20))
    b = list(sim_b.batches(20))
    interleaved = [x for pair in zip(a, b, strict=False) for x in pair] + a[len(b) :]
    result = run_operator(diffraction_sum(emit_every=0), interleaved)
    assert result.dead_letters == []
    got = finals(result)
    assert [summary(got[s]) for s in (3, 4)] == [(3, 96, True, True), (4, 48, True, True)]
    assert_pattern(got[3], a)
    assert_pattern(got[4], b)


@pytest.mark.parametrize("bad", [{"emit_every": -1}, {"timeout_s": 0}, {"bin": 2}])
def test_bad_parameters_are_construction_errors(bad):
    with pytest.raises(OperatorParameterError):
        diffraction_sum(**bad)
