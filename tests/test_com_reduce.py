"""com_reduce: exact event-weighted reduction, progressive/final maps, timeouts, dead letters.

Batch cases run on FnApiRunner (``run_operator``); cases that depend on the
order of elements or on the watermark use a TestStream on
BundleBasedDirectRunner. Under TestStream the watermark is advanced past the
last timer before ``advance_watermark_to_infinity()`` (DESIGN.md section 6),
otherwise ``assert_that`` misses what those timers emit.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import subprocess
import sys

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pytest
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline  # alias: not a pytest class
from apache_beam.testing.util import assert_that, equal_to
from helpers import call_bounded

from beamops import ComMap, ComPartial, FrameHeader, SparseFrameBatch
from beamops.testing import (
    ScanSimulation,
    assert_com_close,
    matcher,
    matches_com,
    run_operator,
    small_scan,
    timestamped_stream,
)
from transforms.com_partial import com_partial
from transforms.com_reduce import com_reduce
from transforms.virtual_images import virtual_images

STREAM_RUNNER = "--runner=BundleBasedDirectRunner"


# --- helpers ------------------------------------------------------------------------


def reference_com(batches) -> tuple[np.ndarray, np.ndarray]:
    """Plain numpy event-weighted COM per position (x = column, y = row), no crop."""
    header = batches[0].header
    sx = np.zeros(header.n_positions)
    sy = np.zeros(header.n_positions)
    n = np.zeros(header.n_positions)
    for b in batches:
        for i in range(b.n_frames):
            row, col = np.divmod(b.frame(i).astype(np.int64), header.frame_shape[1])
            p = int(b.scan_positions[i])
            sx[p] += col.sum()
            sy[p] += row.sum()
            n[p] += len(col)
    with np.errstate(invalid="ignore"):
        return (sx / n).reshape(header.scan_shape), (sy / n).reshape(header.scan_shape)


def events(frame_cols: int, cols, rows) -> np.ndarray:
    return (np.asarray(rows) * frame_cols + np.asarray(cols)).astype(np.uint32)


def reduce_chain(**reduce_params):
    return lambda frames: frames | com_partial() | com_reduce(**reduce_params)


def summary(m: ComMap) -> tuple[int, int, bool, bool]:
    return (m.scan_number, m.frames_seen, m.final, m.complete)


# --- exact reduction ------------------------------------------------------------------


def test_event_weighted_mean_across_batches():
    # Position 0: frame A (1 event at column 10, row 4) in batch 1, frame B
    # (3 events at column 20, row 8) in batch 2. The event-weighted mean is
    # (10 + 3*20)/4 = 17.5 (not 15, the mean of the frame means); rows: (4 + 24)/4 = 7.
    w = 32
    header = FrameHeader(scan_number=5, scan_shape=(1, 2), frame_shape=(16, w), total_frames=3)
    batch1 = SparseFrameBatch.from_frames(header, [events(w, [10], [4])], [0], [0])
    batch2 = SparseFrameBatch.from_frames(
        header, [events(w, [20, 20, 20], [8, 8, 8]), events(w, [3, 5], [1, 2])], [0, 1], [1, 2]
    )
    result = run_operator(reduce_chain(emit_every=0), [batch1, batch2])
    assert result.dead_letters == []
    final = result.final_maps()[5]
    assert (final.frames_seen, final.positions_seen, final.final, final.complete) == (3, 2, True, True)
    assert final.x[0, 0] == pytest.approx(17.5) and final.y[0, 0] == pytest.approx(7.0)
    assert final.x[0, 1] == pytest.approx(4.0) and final.y[0, 1] == pytest.approx(1.5)


def test_event_weighted_mean_from_hand_built_partials():
    # The same reduction fed directly with ComPartials (sums and counts), in
    # three elements, with a frame of position 1 that kept no events.
    header = FrameHeader(scan_number=2, scan_shape=(2, 2), frame_shape=(64, 64), total_frames=6)

    def partial(positions, sum_x, sum_y, counts):
        return ComPartial(
            header,
            np.asarray(positions, np.uint32),
            np.asarray(sum_x, np.float64),
            np.asarray(sum_y, np.float64),
            np.asarray(counts, np.int64),
        )

    partials = [
        partial([0, 1], [10.0, 0.0], [4.0, 0.0], [1, 0]),
        partial([0, 2], [60.0, 90.0], [24.0, 30.0], [3, 3]),
        partial([3, 1], [7.0, 44.0], [11.0, 2.0], [1, 2]),
    ]
    result = run_operator(com_reduce(emit_every=0), partials)
    assert result.dead_letters == []
    final = result.final_maps()[2]
    assert final.complete and final.frames_seen == 6 and final.positions_seen == 4
    np.testing.assert_allclose(final.x, [[17.5, 22.0], [30.0, 7.0]])
    np.testing.assert_allclose(final.y, [[7.0, 1.0], [10.0, 11.0]])


def test_several_frames_of_one_position_in_one_batch():
    w = 40
    header = FrameHeader(scan_number=1, scan_shape=(2, 2), frame_shape=(32, w))
    rng = np.random.default_rng(3)
    positions = [0, 0, 1, 0, 2, 3, 3, 1]
    frames = [events(w, rng.integers(0, w, k), rng.integers(0, 32, k)) for k in (1, 5, 2, 3, 4, 6, 1, 7)]
    batch = SparseFrameBatch.from_frames(header, frames, positions)
    result = run_operator(reduce_chain(emit_every=0), [batch])
    assert result.dead_letters == []
    final = result.final_maps()[1]
    assert final.frames_seen == 8 and final.positions_seen == 4 and final.complete
    want = reference_com([batch])
    assert_com_close(final, want, atol=1e-5)
    # a last-write-wins scatter (numpy fancy-index +=) would keep only frame 3 at position 0
    assert not np.isclose(final.x[0, 0], (frames[3] % w).mean())


# --- progressive and final maps ----------------------------------------------------------


def test_progressive_snapshots_then_final_map_under_test_stream():
    sim = small_scan()  # 48 positions, one frame each, total_frames = 48
    batches = list(sim.batches(10))  # 10, 10, 10, 10, 8 frames
    stream = timestamped_stream(*[(float(i), b) for i, b in enumerate(batches)])

    def expect(maps):
        maps = sorted(maps, key=lambda m: m.frames_seen)
        # emit_every=16: a snapshot when frames_seen first reaches 16, 32 (at 20 and
        # 40 frames), none at 48 because the final map replaces it.
        assert [(m.frames_seen, m.final, m.complete) for m in maps] == [
            (20, False, False),
            (40, False, False),
            (48, True, True),
        ]
        assert [m.positions_seen for m in maps] == [20, 40, 48]
        # a snapshot holds the exact map of the frames seen so far, NaN elsewhere
        assert_com_close(maps[0], reference_com(_pad(batches[:2], batches)), atol=1e-4)
        assert_com_close(maps[-1], reference_com(batches), atol=1e-4)

    with BeamTestPipeline(options=PipelineOptions([STREAM_RUNNER])) as p:
        out = p | stream | com_partial() | com_reduce(emit_every=16)
        assert_that(out.com_map, matcher(expect))
        assert_that(out.dead_letter, equal_to([]), label="NoDeadLetters")


def _pad(seen, all_batches):
    """``seen`` plus the remaining frames emptied (so reference_com gives NaN there)."""
    rest = [b for b in all_batches if b not in seen]
    empty = [
        SparseFrameBatch.from_frames(b.header, [np.zeros(0, np.uint32)] * b.n_frames, b.scan_positions, b.frame_numbers)
        for b in rest
    ]
    return list(seen) + empty


def split(batch: SparseFrameBatch, sizes: list[int]) -> list[SparseFrameBatch]:
    """``batch``'s frames, in order, cut into batches of the given sizes."""
    assert sum(sizes) == batch.n_frames
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    return [
        SparseFrameBatch.from_frames(
            batch.header,
            [batch.frame(i) for i in range(a, b)],
            batch.scan_positions[a:b],
            batch.frame_numbers[a:b],
        )
        for a, b in itertools.pairwise(bounds)
    ]


def test_progressive_snapshots_count_frames_with_uneven_batches():
    # 3 frames per position, total_frames = 144. Every position is seen after 48
    # frames, but only total_frames completes the scan. With emit_every=40, the
    # first batch overshoots two thresholds (90 frames): the next snapshot is due
    # at the next multiple of 40 (120, reached at 130), not at 80 or 100.
    sim = small_scan(frames_per_position=3, events_per_frame=10.0)
    batches = split(sim.batch(0, sim.n_frames), [90, 10, 10, 20, 14])
    stream = timestamped_stream(*[(float(i), b) for i, b in enumerate(batches)])

    with BeamTestPipeline(options=PipelineOptions([STREAM_RUNNER])) as p:
        out = p | stream | com_partial() | com_reduce(emit_every=40)
        assert_that(
            out.com_map | beam.Map(lambda m: (*summary(m), m.positions_seen)),
            equal_to([(1, 90, False, False, 48), (1, 130, False, False, 48), (1, 144, True, True, 48)]),
        )


def test_completion_by_total_frames():
    # header.total_frames = 3 * positions: all positions are seen after the first
    # third of the frames, but the scan is complete only when every frame is in.
    sim = small_scan(frames_per_position=3)
    batches = list(sim.batches(24))
    assert sim.header.total_frames == sim.n_frames == 144
    result = run_operator(reduce_chain(emit_every=0), batches)
    assert result.dead_letters == []
    assert [summary(m) for m in result.outputs] == [(1, 144, True, True)]
    final = result.outputs[0]
    assert final.positions_seen == sim.n_positions
    assert_com_close(final, reference_com(batches), atol=1e-4)


def test_total_frames_unknown_completes_when_every_position_is_seen():
    # Without total_frames the scan is complete once every position has a frame
    # (DESIGN.md section 5); frames that come after the final map are late.
    sim = small_scan(frames_per_position=3, declare_total_frames=False)
    batches = list(sim.batches(24))  # 6 batches; positions all seen after batch 2
    assert sim.header.total_frames is None
    stream = timestamped_stream(*[(float(i), b) for i, b in enumerate(batches)])

    with BeamTestPipeline(options=PipelineOptions([STREAM_RUNNER])) as p:
        out = p | stream | com_partial() | com_reduce(emit_every=0)
        assert_that(
            out.com_map,
            matcher(lambda maps: _check_final_first_pass(maps, batches[:2])),
        )
        assert_that(
            out.dead_letter | beam.Map(lambda d: (d.error_type, _rows(d.payload))),
            equal_to([("LateFrameError", 24)] * 4),
            label="LateFrames",
        )


def _check_final_first_pass(maps, first_batches):
    assert [summary(m) for m in maps] == [(1, 48, True, True)]
    assert maps[0].positions_seen == 48
    assert_com_close(maps[0], reference_com(first_batches), atol=1e-4)


def _rows(payload: bytes) -> int:
    """Number of frames in a dead letter's Arrow IPC payload."""
    return pa.ipc.open_stream(payload).read_all().num_rows


def test_incomplete_scan_is_flushed_at_end_of_bounded_run():
    sim = small_scan()
    batches = list(sim.batches(10))
    kept = [batches[0], batches[2], batches[4]]  # 28 of 48 frames
    result = run_operator(reduce_chain(emit_every=0), kept)
    assert result.dead_letters == []
    assert [summary(m) for m in result.outputs] == [(1, 28, True, False)]
    final = result.outputs[0]
    assert final.positions_seen == 28
    seen = np.zeros(sim.n_positions, bool)
    for b in kept:
        seen[b.scan_positions] = True
    seen = seen.reshape(sim.scan_shape)
    assert np.isnan(final.x[~seen]).all() and np.isnan(final.y[~seen]).all()
    assert np.isfinite(final.x[seen]).all()
    assert_com_close(final, reference_com(_pad(kept, batches)), atol=1e-4)
    assert result.counter("scans_timed_out") == 1 and result.counter("scans_completed") == 0


def test_timeout_in_event_time_flushes_before_later_elements():
    sim1 = small_scan(scan_number=1)
    sim2 = small_scan(scan_number=2, seed=9)
    b1 = list(sim1.batches(16))  # 3 batches of 16
    b2 = list(sim2.batches(16))
    stream = timestamped_stream(
        (0.0, b1[0]),
        (1.0, b1[1]),
        ("watermark", 1.0 + 10.0 + 0.5),  # timeout_s = 10 after the last scan-1 element
        (20.0, b2[0]),
        (21.0, b2[1]),
        (22.0, b1[2]),  # the rest of scan 1 comes after its flush: a dead letter, not a second final map
        (23.0, b2[2]),
    )

    def expect(stamped):
        got = sorted((summary(m), ts) for ts, m in stamped)
        assert [s for s, _ in got] == [
            (1, 32, True, False),  # flushed by the timeout, before the later elements
            (2, 48, True, True),
        ]
        flushed_at = got[0][1]
        assert 11.0 <= flushed_at < 20.0  # the timer's event time, before the next element
        first_flush = next(m for _, m in stamped if m.scan_number == 1)
        assert first_flush.positions_seen == 32
        assert np.isnan(first_flush.x.ravel()[32:]).all() and np.isfinite(first_flush.x.ravel()[:32]).all()

    def expect_dead(dead):
        (d,) = dead
        assert d.error_type == "LateFrameError" and "scan 1" in d.error and d.origin == b1[2].origin

    with BeamTestPipeline(options=PipelineOptions([STREAM_RUNNER])) as p:
        out = p | stream | com_partial() | com_reduce(emit_every=0, timeout_s=10.0)
        stamped = out.com_map | beam.Map(lambda m, ts=beam.DoFn.TimestampParam: (float(ts), m))
        assert_that(stamped, matcher(expect))
        assert_that(out.dead_letter, matcher(expect_dead), label="DeadLetters")


def test_a_flushed_scan_number_is_free_again_after_the_retention():
    sim = small_scan()
    b = list(sim.batches(12))
    stream = timestamped_stream(
        (0.0, b[0]),
        ("watermark", 15.0),  # the timeout (10 s) flushes 12 frames at t=10; retention until t=110
        (50.0, b[1]),  # within the retention: a dead letter
        ("watermark", 200.0),
        (300.0, b[2]),  # after it: a new partial scan 1, flushed at the end
    )

    with BeamTestPipeline(options=PipelineOptions([STREAM_RUNNER])) as p:
        out = p | stream | com_partial() | com_reduce(emit_every=0, timeout_s=10.0, finished_retention_s=100.0)
        assert_that(out.com_map | beam.Map(summary), equal_to([(1, 12, True, False), (1, 12, True, False)]))
        assert_that(out.dead_letter | beam.Map(lambda d: d.error_type), equal_to(["LateFrameError"]), label="Dead")


def test_timeout_counts_from_the_latest_event_time_seen():
    # An element with an earlier timestamp (out of order, not late) must not pull
    # the timeout back: the timer stays at max(event time) + timeout_s = 20.
    sim = small_scan()
    b = list(sim.batches(12))
    stream = timestamped_stream(
        (0.0, b[0]),
        (10.0, b[1]),
        (1.0, b[2]),
        ("watermark", 15.0),  # past 1 + 10, before 10 + 10
        (16.0, b[3]),
    )
    with BeamTestPipeline(options=PipelineOptions([STREAM_RUNNER])) as p:
        out = p | stream | com_partial() | com_reduce(emit_every=0, timeout_s=10.0)
        assert_that(out.com_map | beam.Map(summary), equal_to([(1, 48, True, True)]))


def test_frames_arriving_steadily_for_longer_than_the_timeout_keep_the_scan_open():
    # The timer is set once and moved on when it fires early: at 10 (moved to 18),
    # at 18 (moved to 26); the last batch at 24 completes the scan before that.
    b = list(small_scan().batches(12))
    stream = timestamped_stream(
        (0.0, b[0]),
        ("watermark", 7.0),
        (8.0, b[1]),
        ("watermark", 15.0),
        (16.0, b[2]),
        ("watermark", 23.0),
        (24.0, b[3]),
    )
    with BeamTestPipeline(options=PipelineOptions([STREAM_RUNNER])) as p:
        out = p | stream | com_partial() | com_reduce(emit_every=0, timeout_s=10.0)
        assert_that(out.com_map | beam.Map(summary), equal_to([(1, 48, True, True)]))


def test_late_frames_of_finished_scan_go_to_dead_letters():
    sim = small_scan()
    batches = list(sim.batches(12))  # 4 batches of 12
    late = sim.batch(1, 12)  # a repeat of batch 1 after the scan completed
    other = small_scan(scan_number=7, seed=4)
    other_batches = list(other.batches(48))
    stream = timestamped_stream(
        *[(float(i), b) for i, b in enumerate(batches)],
        (5.0, late),
        (6.0, other_batches[0]),
    )

    def expect_dead(dead):
        assert len(dead) == 1
        (d,) = dead
        assert d.error_type == "LateFrameError" and d.operator == "com_reduce"
        assert "scan 1" in d.error
        assert d.payload_format == "arrow-ipc"
        table = pa.ipc.open_stream(d.payload).read_all()
        np.testing.assert_array_equal(table.column("scan_position").to_numpy(), late.scan_positions)
        assert d.origin == late.origin

    with BeamTestPipeline(options=PipelineOptions([STREAM_RUNNER])) as p:
        out = p | stream | com_partial() | com_reduce(emit_every=0)
        # nothing else is lost: both scans complete, with their exact maps
        assert_that(
            out.com_map,
            matches_com({1: reference_com(batches), 7: reference_com(other_batches)}, atol=1e-4, final_only=False),
        )
        assert_that(out.com_map | beam.Map(summary), equal_to([(1, 48, True, True), (7, 48, True, True)]), label="Maps")
        assert_that(out.dead_letter, matcher(expect_dead), label="DeadLetters")


def test_late_frames_stay_dead_letters_during_the_retention_then_start_a_new_scan():
    # A straggler must not produce a second, incomplete "final" map that would
    # replace the complete one: within finished_retention_s it is a dead letter
    # (even after timeout_s has passed); after the retention the scan number is free again.
    sim = small_scan()
    batches = list(sim.batches(12))
    stream = timestamped_stream(
        *[(float(i), b) for i, b in enumerate(batches)],  # complete at t=3; retention until t=103
        (5.0, sim.batch(1, 12)),  # late: dead letter
        ("watermark", 20.0),
        (30.0, sim.batch(2, 12)),  # after timeout_s but within the retention: still a dead letter
        ("watermark", 200.0),
        (300.0, sim.batch(3, 12)),  # after the retention: a new partial scan 1
    )

    with BeamTestPipeline(options=PipelineOptions([STREAM_RUNNER])) as p:
        out = p | stream | com_partial() | com_reduce(emit_every=0, timeout_s=10.0, finished_retention_s=100.0)
        assert_that(out.com_map | beam.Map(summary), equal_to([(1, 48, True, True), (1, 12, True, False)]))
        assert_that(
            out.dead_letter | beam.Map(lambda d: d.error_type),
            equal_to(["LateFrameError", "LateFrameError"]),
            label="Dead",
        )


def test_redelivered_frames_are_counted_once():
    # Kafka is at-least-once: a batch delivered twice must not count twice.
    sim = small_scan()
    batches = list(sim.batches(12))
    redelivered = [*batches[:2], batches[1], *batches[2:]]
    result = run_operator(lambda f: f | com_partial() | com_reduce(emit_every=0), redelivered)
    final = result.final_maps()[sim.scan_number]
    assert (final.frames_seen, final.complete) == (48, True)
    assert_com_close(final, reference_com(batches), atol=1e-4)  # the map is float32
    assert result.counter("duplicate_frames") == 12
    assert result.dead_letters == []


def test_out_of_range_positions_and_frame_numbers_are_dead_letters():
    sim = small_scan()
    batches = list(sim.batches(12))
    header = batches[0].header
    bad_position = ComPartial(
        header, np.array([10_000], np.uint32), np.ones(1), np.ones(1), np.ones(1, np.int64), np.array([0], np.uint64)
    )
    bad_frame = ComPartial(
        header, np.array([0], np.uint32), np.ones(1), np.ones(1), np.ones(1, np.int64), np.array([10_000], np.uint64)
    )
    partials = [com_partial().process(b) for b in batches]
    result = run_operator(com_reduce(emit_every=0), [partials[0], bad_position, bad_frame, *partials[1:]])
    assert sorted(d.error.split(":")[1].split()[0] for d in result.dead_letters) == ["frame", "scan"]
    final = result.final_maps()[sim.scan_number]
    assert_com_close(final, reference_com(batches), atol=1e-4)


def test_batch_with_other_scan_shape_goes_to_dead_letters():
    sim = small_scan()
    batches = list(sim.batches(16))
    wrong = small_scan(scan_shape=(4, 4), events_per_frame=5.0).batch(0, 16)
    assert wrong.header.scan_number == sim.scan_number
    stream = timestamped_stream((0.0, batches[0]), (1.0, wrong), (2.0, batches[1]), (3.0, batches[2]))

    def expect_dead(dead):
        assert [d.error_type for d in dead] == ["ValueError"]
        assert "(4, 4)" in dead[0].error and "(6, 8)" in dead[0].error
        assert _rows(dead[0].payload) == 16

    with BeamTestPipeline(options=PipelineOptions([STREAM_RUNNER])) as p:
        out = p | stream | com_partial() | com_reduce(emit_every=0)
        assert_that(out.com_map | beam.Map(summary), equal_to([(1, 48, True, True)]), label="Maps")
        assert_that(out.com_map, matches_com({1: reference_com(batches)}), label="Values")
        assert_that(out.dead_letter, matcher(expect_dead), label="DeadLetters")


def test_a_scan_whose_shapes_need_more_than_max_state_mb_goes_to_dead_letters():
    sim = small_scan()
    huge = small_scan(scan_number=9, scan_shape=(512, 512)).batch(0, 4)  # 512*512 positions * 28 B = 7.3 MB
    partials = [com_partial().process(b) for b in [huge, *sim.batches(12), huge]]
    result = run_operator(com_reduce(emit_every=0, max_state_mb=1), partials)
    assert [d.error_type for d in result.dead_letters] == ["ScanTooLargeError"] * 2
    assert "scan 9: scan_shape (512, 512), frame_shape" in result.dead_letters[0].error
    assert "need 7 MB of state, more than max_state_mb=1" in result.dead_letters[0].error
    assert list(result.final_maps()) == [sim.scan_number]
    assert_com_close(result.final_maps()[sim.scan_number], reference_com(list(sim.batches(12))), atol=1e-4)


def test_state_bytes_is_what_each_accumulator_allocates():
    """max_state_mb is checked against ``state_bytes``, before anything is allocated: it must count
    every array of every operator's accumulator (plus the bit per expected frame)."""
    from transforms.com_reduce import ComReduceParams, _ComReduceFn
    from transforms.diffraction_sum import DiffractionSumParams, _DiffractionSumFn
    from transforms.virtual_images import VirtualImagesParams, _VirtualImagesFn

    header = FrameHeader(scan_number=1, scan_shape=(30, 40), frame_shape=(50, 70), total_frames=2401)
    empty = np.zeros(0, np.uint32)
    batch = SparseFrameBatch(header, empty, np.zeros(1, np.int64), empty, np.zeros(0, np.uint64))
    for fn in (
        _ComReduceFn("com_reduce", ComReduceParams()),
        _DiffractionSumFn("diffraction_sum", DiffractionSumParams()),
        _VirtualImagesFn("virtual_images", VirtualImagesParams(annuli="0:10,10:20,20:30")),
    ):
        acc = fn.new_accumulator(batch)
        allocated = sum(v.nbytes for v in vars(acc).values() if isinstance(v, np.ndarray))
        assert allocated == fn.state_bytes(header) + 301, type(fn).__name__  # 301 = ceil(2401 / 8)


def test_two_interleaved_scans_are_reduced_independently():
    # Same scan shape, different events and frame counts; batches alternate.
    sim_a = small_scan(scan_number=3, seed=11, frames_per_position=2)
    sim_b = small_scan(scan_number=4, seed=12, frame_shape=(80, 72))
    a = list(sim_a.batches(20))
    b = list(sim_b.batches(20))
    interleaved = [x for pair in zip(a, b, strict=False) for x in pair] + a[len(b) :]
    assert len(interleaved) == len(a) + len(b)
    result = run_operator(reduce_chain(emit_every=0), interleaved)
    assert result.dead_letters == []
    finals = result.final_maps()
    assert sorted(finals) == [3, 4]
    assert [summary(finals[s]) for s in (3, 4)] == [(3, 96, True, True), (4, 48, True, True)]
    assert_com_close(finals[3], reference_com(a), atol=1e-4)
    assert_com_close(finals[4], reference_com(b), atol=1e-4)
    with pytest.raises(AssertionError):  # the two scans really differ
        assert_com_close(finals[3], finals[4], atol=1e-2)


def test_replace_nans_fills_each_axis_with_its_nanmean():
    w = 50
    header = FrameHeader(scan_number=8, scan_shape=(2, 3), frame_shape=(40, w))
    frames = [
        events(w, [10, 12], [30, 30]),  # (11, 30)
        np.zeros(0, np.uint32),  # empty frame: NaN
        events(w, [20], [2]),  # (20, 2)
        events(w, [41, 43, 45], [5, 7, 9]),  # (43, 7)
        np.zeros(0, np.uint32),
        events(w, [1, 1], [0, 4]),  # (1, 2)
    ]
    batch = SparseFrameBatch.from_frames(header, frames, range(6))
    mean_x, mean_y = np.mean([11, 20, 43, 1]), np.mean([30, 2, 7, 2])
    assert mean_x != mean_y

    plain = run_operator(reduce_chain(emit_every=0), [batch]).final_maps()[8]
    filled = run_operator(reduce_chain(emit_every=0, replace_nans=True), [batch]).final_maps()[8]
    assert plain.complete and filled.complete
    np.testing.assert_array_equal(np.isnan(plain.x), [[False, True, False], [False, True, False]])
    np.testing.assert_array_equal(np.isnan(plain.y), np.isnan(plain.x))
    np.testing.assert_allclose(filled.x, [[11, mean_x, 20], [43, mean_x, 1]], rtol=1e-6)
    np.testing.assert_allclose(filled.y, [[30, mean_y, 2], [7, mean_y, 2]], rtol=1e-6)


def test_com_map_divides_in_float64_and_gives_nan_only_where_no_events_were_kept():
    """NaN where a position kept no events, even if a foreign ComPartial gives it non-zero sums
    (a division by zero would give inf); elsewhere float32 of the float64 mean."""
    from transforms.com_reduce import ScanAccumulator

    header = FrameHeader(scan_number=1, scan_shape=(1, 4), frame_shape=(576, 576), total_frames=4)
    sums_x = np.array([1.0, 5.0, 0.0, 2.0**40 + 1.0])
    sums_y = np.array([2.0, -3.0, 0.0, 7.0])
    counts = np.array([3, 0, 0, 3], np.int64)
    acc = ScanAccumulator.empty(header, 0)
    acc.add(ComPartial(header, np.arange(4, dtype=np.uint32), sums_x, sums_y, counts, np.arange(4, dtype=np.uint64)))
    com = acc.com_map(final=True, replace_nans=False)
    want_x = np.array([1 / 3, np.nan, np.nan, (2.0**40 + 1.0) / 3], np.float32).reshape(1, 4)
    want_y = np.array([2 / 3, np.nan, np.nan, 7 / 3], np.float32).reshape(1, 4)
    np.testing.assert_array_equal(com.x, want_x)
    np.testing.assert_array_equal(com.y, want_y)


def test_state_cache_weighs_accumulators_without_scanning_module_globals(monkeypatch):
    """Setup switches off objsize's per-call scan of module globals; an accumulator weighs the same either way."""
    import objsize
    from apache_beam.runners.worker.statecache import get_deep_size

    from beamops.scan_reduce import ScanState
    from transforms.com_reduce import ScanAccumulator

    monkeypatch.setattr(objsize.default_settings, "exclude_modules_globals", True)
    partial = com_partial().process(next(iter(small_scan().batches(48))))
    assert run_operator(com_reduce(), [partial]).outputs, "the reduce ran"
    assert objsize.default_settings.exclude_modules_globals is False

    acc = ScanAccumulator.empty(partial.header, 0)
    acc.add(partial)
    state = [ScanState(acc=acc, latest=beam.utils.timestamp.Timestamp(5))]
    weight = get_deep_size(state)
    monkeypatch.setattr(objsize.default_settings, "exclude_modules_globals", True)
    assert get_deep_size(state) == weight


def _resident_pages(array: np.ndarray) -> tuple[int, int]:
    """(pages of ``array``'s buffer the kernel has backed with memory, pages in all), from mincore(2)."""
    import ctypes
    import mmap

    page = mmap.PAGESIZE
    start = array.ctypes.data // page * page
    n_pages = -(-(array.ctypes.data + array.nbytes - start) // page)
    vec = (ctypes.c_ubyte * n_pages)()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mincore(ctypes.c_void_p(start), ctypes.c_size_t(n_pages * page), vec) != 0:
        raise OSError(ctypes.get_errno(), "mincore failed")
    return sum(v & 1 for v in vec), n_pages


def _unbacked_pages_of_fresh_state() -> dict[str, list[int]]:
    """{array: [pages not backed by memory, pages, nonzero elements]} of a new 1024x1024 scan's state.

    The first entry, ``np.zeros``, is the control: it shows the check can see unbacked pages.
    """
    from beamops.scan_reduce import zeroed
    from transforms.com_reduce import ScanAccumulator
    from transforms.diffraction_sum import PatternAccumulator
    from transforms.virtual_images import VirtualImageAccumulator, VirtualImagesParams

    header = FrameHeader(scan_number=1, scan_shape=(1024, 1024), frame_shape=(1024, 1024), total_frames=1 << 20)
    arrays = {"np.zeros": np.zeros(1 << 21, np.float64), "zeroed": zeroed((3, 1 << 20), np.int64)}
    for acc in (
        ScanAccumulator.empty(header, 0),
        PatternAccumulator.empty(header, 0),
        VirtualImageAccumulator.empty(header, VirtualImagesParams(annuli="0:10")),
    ):
        for name, value in vars(acc).items():
            if isinstance(value, np.ndarray) and value.nbytes >= 1 << 20:
                arrays[f"{type(acc).__name__}.{name}"] = value
    report = {}
    for name, array in arrays.items():
        resident, pages = _resident_pages(array)  # before anything reads it: a read maps the zero page
        report[name] = [pages - resident, pages, int(np.count_nonzero(array))]
    return report


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mincore(2) of anonymous memory, glibc's malloc")
def test_scan_state_is_written_when_the_scan_starts():
    """Per-scan sums start as written zeros, not np.zeros' untouched pages (see beamops.scan_reduce.zeroed).

    Checked in a fresh process whose glibc maps every block of 1 MiB or more anew: in a long test
    session glibc raises its mmap threshold and hands out reused heap memory, which calloc has to
    clear, so np.zeros there is already backed and the control would say nothing.
    """
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
    out = subprocess.run(
        [sys.executable, __file__, "residency"], env=env, capture_output=True, text=True, check=True
    ).stdout
    report = json.loads(out)
    unbacked, pages, _ = report.pop("np.zeros")
    assert unbacked > pages // 2, f"the control: np.zeros left only {unbacked} of {pages} pages unbacked"
    assert len(report) >= 8, sorted(report)
    for name, (unbacked, pages, nonzero) in report.items():
        assert unbacked == 0, f"{name}: {unbacked} of {pages} pages unbacked"
        assert nonzero == 0, f"{name}: {nonzero} nonzero elements"


if __name__ == "__main__" and sys.argv[1:] == ["residency"]:
    print(json.dumps(_unbacked_pages_of_fresh_state()))


@pytest.mark.parametrize(
    ("positions", "numbers", "error"),
    [
        ([0, 1, 4], [0, 1, 2], "scan position 4 out of range for scan_shape \\(1, 4\\)"),
        ([0, 1, 2], [0, 1, 8], "frame number 8 out of range for a scan of 8 frames"),
        ([0, 1, 2], [0, 1, 2**64 - 1], f"frame number {2**64 - 1} out of range"),
    ],
    ids=["position", "frame-number", "largest-uint64"],
)
def test_a_batch_out_of_range_changes_nothing_and_redeliveries_are_told_apart(positions, numbers, error):
    """The range checks run before any frame is marked seen or any sum is added."""
    from transforms.com_reduce import ScanAccumulator

    header = FrameHeader(scan_number=1, scan_shape=(1, 4), frame_shape=(576, 576), total_frames=8)

    def partial(pos: list[int], num: list[int]) -> ComPartial:
        n = len(pos)
        ones = np.ones(n)
        return ComPartial(header, np.array(pos, np.uint32), ones, ones, np.ones(n, np.int64), np.array(num, np.uint64))

    acc = ScanAccumulator.empty(header, 0)
    assert acc.add(partial([3], [5])) == 0
    before = {name: np.copy(getattr(acc, name)) for name in ("sum_x", "counts", "frames", "seen_frames")}
    with pytest.raises(ValueError, match=error):
        acc.add(partial(positions, numbers))
    for name, array in before.items():
        np.testing.assert_array_equal(getattr(acc, name), array, err_msg=name)
    assert (acc.frames_seen, acc.positions_seen) == (1, 1)
    short = partial([0, 1, 2], [0, 1, 2])
    short = ComPartial(header, short.scan_positions, short.sum_x, short.sum_y, short.counts, short.frame_numbers[:2])
    with pytest.raises(ValueError, match="2 frame numbers for 3 scan positions"):
        acc.add(short)
    for name, array in before.items():
        np.testing.assert_array_equal(getattr(acc, name), array, err_msg=name)
    # Frame 5 again (a redelivery) is skipped and counted; frames 0 and 1 are new.
    assert acc.add(partial([3, 0, 1], [5, 0, 1])) == 1
    assert (acc.frames_seen, acc.positions_seen, acc.duplicates) == (3, 3, 1)
    np.testing.assert_array_equal(acc.counts, [1, 1, 0, 1])


def test_a_crop_that_keeps_no_event_says_so(caplog: pytest.LogCaptureFixture) -> None:
    sim = small_scan()
    off_frame = {"init_center_x": 1e5, "init_center_y": 1e5, "crop_radius": 5.0}
    with caplog.at_level(logging.WARNING, logger="transforms.com_reduce"):
        result = run_operator(lambda f: f | com_partial(off_frame) | com_reduce(emit_every=0), sim.batches(12))
    final = result.final_maps()[sim.scan_number]
    assert np.isnan(final.x).all() and final.complete
    (warning,) = [r.getMessage() for r in caplog.records if "no event was kept" in r.getMessage()]
    assert f"scan {sim.scan_number}: no event was kept at any of its" in warning


def test_an_incomplete_scan_stamped_finer_than_a_millisecond_is_flushed_at_the_end() -> None:
    """At 87 kHz frames are 11.5 µs apart; Beam's timers keep milliseconds. A timeout due between two
    milliseconds fired before it was due and was set again, for ever: the run never ended."""
    from transforms.simulated_scan import simulated_scan

    def run() -> list[tuple[int, int, bool, bool]]:
        drop_first = beam.Filter(lambda batch: int(batch.frame_numbers[0]) != 0)  # an incomplete scan
        chain = simulated_scan(scan_rows=4, scan_cols=4, batch_size=5, frame_rate_hz=87_000.0)
        result = run_operator(
            lambda root: (root.pipeline | chain).frames | drop_first | com_partial() | com_reduce(emit_every=0), []
        )
        return [summary(m) for m in result.outputs]

    assert call_bounded(run, "the run", timeout=120) == [(1, 11, True, False)]


@pytest.mark.parametrize("runner", ["FnApiRunner", "BundleBasedDirectRunner"])
def test_every_reduction_of_one_stage_flushes_its_incomplete_scans(runner: str) -> None:
    """Two com_reduce and a virtual_images fused in one stage each flush the scan that ends incomplete.

    Fails with one timer name for every reduction: the FnApiRunner buffered the timers of a stage by
    name (apache/beam#21995), and only one of the three flushed scan 6."""
    sims = [ScanSimulation(scan_shape=(4, 4), frame_shape=(64, 64), scan_number=n) for n in (5, 6)]
    frames = [*sims[0].batches(4), *list(sims[1].batches(4))[:-1]]  # scan 6 lacks its last batch

    def three_reductions(source: beam.PCollection) -> beam.PCollection:
        partials = source | com_partial()
        outputs = [partials | label >> com_reduce(emit_every=0) for label in ("com_a", "com_b")]
        images = source | "images" >> virtual_images(annuli="0:20", names="bf", emit_every=0)
        finals = [outputs[0]["com_map"], outputs[1]["com_map"], images["images"]]
        return finals | beam.Flatten()

    result = run_operator(three_reductions, frames, runner=runner)
    finals = sorted((type(m).__name__, m.header.scan_number, m.complete) for m in result.outputs if m.final)
    assert finals == [
        ("ComMap", 5, True), ("ComMap", 5, True), ("ComMap", 6, False), ("ComMap", 6, False),
        ("Image", 5, True), ("Image", 6, False),
    ]  # fmt: skip
