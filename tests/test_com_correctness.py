"""The COM chain recovers the simulator's known shift field, and its variants agree.

* sparse chain vs ScanSimulation.expected_com(), with a tolerance derived from
  the simulator's standard error;
* dense kernel (com_dense) vs sparse kernel (com_partial) on the same events;
* the full job: simulated_scan -> com_partial -> com_reduce -> write_com_map;
* the result does not depend on how frames are cut into batches.
"""

from __future__ import annotations

import math

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline  # alias: not a pytest class
from apache_beam.testing.util import assert_that, equal_to

from beamops import ComMap, SparseFrameBatch
from beamops.testing import (
    ScanSimulation,
    assert_com_close,
    dense_batches,
    matches_com,
    run_operator,
    sparse_batches,
)
from transforms._pictures import figure_height
from transforms.com_dense import com_dense
from transforms.com_partial import com_partial
from transforms.com_reduce import com_reduce
from transforms.simulated_scan import simulated_scan
from transforms.write_com_map import write_com_map

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# Tolerance for recovering the shift field.
#
# Each frame's electrons are uniform in a disc of radius R around the true COM and
# rounded to pixels, so one event has variance R²/4 + 1/12 px² per axis and the COM
# of a position with n events has standard error se = sqrt((R²/4 + 1/12) / n)
# (ScanSimulation.com_standard_error()). With n ~ hundreds the error is Gaussian to
# a very good approximation. We compare N positions x 2 axes independent estimates
# and allow k = 5 standard errors: P(|z| > 5) = 5.7e-7, so over 2N = 2048 estimates
# a correct implementation fails for an arbitrary seed with probability ~1e-3, and
# Poisson scatter of n (a position with n = 0.75 * mean is still within 4.3 se,
# P ~ 2e-5) does not change that. k must stay small against the signal: 5 se is
# about 1 px here, far below the 6 px shift amplitude and the x/y difference of the
# field, so a swapped axis, a wrong centre or lost events fail.
K_STANDARD_ERRORS = 5.0


def correctness_sim(**overrides) -> ScanSimulation:
    params = {
        "scan_shape": (32, 32),
        "frame_shape": (96, 128),  # not square: a row/column mix-up cannot cancel
        "events_per_frame": 400.0,
        "disc_radius": 8.0,
        "shift_amplitude": 6.0,
        "seed": 17,
        "scan_number": 1,
    }
    params.update(overrides)
    return ScanSimulation(**params)


def reference_com(batches: list[SparseFrameBatch]) -> tuple[np.ndarray, np.ndarray]:
    """Plain numpy event-weighted COM per position (x = column, y = row), no crop."""
    header = batches[0].header
    sx = np.zeros(header.n_positions)
    sy = np.zeros(header.n_positions)
    n = np.zeros(header.n_positions)
    for b in batches:
        frame_of_event = np.repeat(np.arange(b.n_frames), np.diff(b.offsets))
        pos = b.scan_positions[frame_of_event].astype(np.int64)
        row, col = np.divmod(b.events.astype(np.int64), header.frame_shape[1])
        sx += np.bincount(pos, col, header.n_positions)
        sy += np.bincount(pos, row, header.n_positions)
        n += np.bincount(pos, minlength=header.n_positions)
    with np.errstate(invalid="ignore"):
        return (sx / n).reshape(header.scan_shape), (sy / n).reshape(header.scan_shape)


def rebatch(batches: list[SparseFrameBatch], size: int) -> list[SparseFrameBatch]:
    """The same frames, in the same order, cut into batches of ``size`` frames."""
    header = batches[0].header
    frames = [b.frame(i) for b in batches for i in range(b.n_frames)]
    positions = np.concatenate([b.scan_positions for b in batches])
    numbers = np.concatenate([b.frame_numbers for b in batches])
    return [
        SparseFrameBatch.from_frames(header, frames[i : i + size], positions[i : i + size], numbers[i : i + size])
        for i in range(0, len(frames), size)
    ]


def final_map(result) -> ComMap:
    assert result.dead_letters == []
    (final,) = result.final_maps().values()
    assert final.final and final.complete
    return final


def test_shift_field_is_recovered_within_standard_error():
    sim = correctness_sim()
    tol = K_STANDARD_ERRORS * sim.com_standard_error()
    assert tol < sim.shift_amplitude / 5  # the tolerance can tell the field from a flat map
    result = run_operator(lambda f: f | com_partial() | com_reduce(), sparse_batches(sim, 200))
    final = final_map(result)
    assert final.frames_seen == sim.n_frames and final.positions_seen == sim.n_positions

    assert_com_close(final, sim.expected_com(), atol=tol)
    # The estimator is unbiased with the stated standard error: the RMS of the
    # normalised errors over 2048 estimates is 1 within a few percent.
    ex, ey = sim.expected_com()
    z = np.concatenate([(final.x - ex).ravel(), (final.y - ey).ravel()]) / sim.com_standard_error()
    assert 0.9 < math.sqrt(np.mean(z**2)) < 1.1
    assert abs(np.mean(z)) < 5 / math.sqrt(z.size)
    # Neither a flat map at the frame centre nor swapped axes would pass.
    cx, cy = sim.center
    flat = (np.full(sim.scan_shape, cx), np.full(sim.scan_shape, cy))
    for wrong in (flat, (ey - cy + cx, ex - cx + cy)):
        with pytest.raises(AssertionError):
            assert_com_close(final, wrong, atol=tol)


def test_shift_field_is_recovered_with_several_frames_per_position():
    # frames_per_position multiplies the events per position; the standard error
    # accounts for it, and a position's frames arrive in different batches.
    sim = correctness_sim(scan_shape=(16, 16), events_per_frame=150.0, frames_per_position=3, seed=5)
    result = run_operator(lambda f: f | com_partial() | com_reduce(), sparse_batches(sim, 100))
    final = final_map(result)
    assert final.frames_seen == sim.n_frames
    assert_com_close(final, sim.expected_com(), atol=K_STANDARD_ERRORS * sim.com_standard_error())
    assert_com_close(final, reference_com(sparse_batches(sim, 100)), atol=1e-4)


@pytest.mark.parametrize(
    "crop",
    [
        {},
        {"crop_radius": 15.0, "init_center_x": 290.0, "init_center_y": 285.0},
        {"crop_radius": 12.5},
        {"crop_to_x": 9.0, "crop_to_y": 14.0, "init_center_x": 284.0, "init_center_y": 291.0},
        {"crop_to_x": 11.0, "crop_to_y": 7.0},
        # centres outside the frame, crops reaching into it (a binned frame with interactEM's defaults)
        {"crop_to_x": 715.0, "crop_to_y": 510.0, "init_center_x": 1000.0, "init_center_y": 800.0},
        {"crop_radius": 712.0, "init_center_x": 1000.0, "init_center_y": 288.0},
    ],
    ids=["no_crop", "circle_given", "circle_own_com", "box_given", "box_own_com", "box_off_frame", "circle_off_frame"],
)
def test_dense_kernel_equals_sparse_kernel(crop):
    sim = ScanSimulation(scan_shape=(8, 8), frame_shape=(576, 576), events_per_frame=50.0, seed=3)
    sparse = sim.batch(0, 64)
    dense = sim.dense_batch(0, 64)
    assert dense.frames.sum() == len(sparse.events)  # same events
    want = com_partial(**crop).process(sparse)
    got = com_dense(**crop).process(dense)
    np.testing.assert_array_equal(got.scan_positions, want.scan_positions)
    np.testing.assert_array_equal(got.counts, want.counts)
    np.testing.assert_allclose(got.sum_x, want.sum_x, rtol=0, atol=1e-9)
    np.testing.assert_allclose(got.sum_y, want.sum_y, rtol=0, atol=1e-9)
    if crop:
        assert want.counts.sum() < len(sparse.events)  # the crop removed events
    assert not np.array_equal(want.sum_x, want.sum_y)


def test_dense_chain_equals_sparse_chain():
    # Small frames: dense batches are shipped whole between stages.
    sim = ScanSimulation(
        scan_shape=(8, 8), frame_shape=(128, 160), events_per_frame=50.0, frames_per_position=2, seed=8
    )
    sparse = final_map(run_operator(lambda f: f | com_partial() | com_reduce(), sparse_batches(sim, 48)))
    dense = final_map(run_operator(lambda f: f | com_dense() | com_reduce(), dense_batches(sim, 48)))
    assert dense.frames_seen == sparse.frames_seen == sim.n_frames
    assert_com_close(dense, sparse, atol=1e-9)


def test_result_does_not_depend_on_batch_size():
    sim = correctness_sim(scan_shape=(16, 16), frames_per_position=2, events_per_frame=50.0, seed=23)
    big = sparse_batches(sim, 1000)
    small = rebatch(big, 7)
    assert len(big) == 1 and len(small) == math.ceil(sim.n_frames / 7)
    assert sum(len(b.events) for b in small) == len(big[0].events)
    maps = [final_map(run_operator(lambda f: f | com_partial() | com_reduce(), b)) for b in (big, small)]
    assert_com_close(maps[0], maps[1], atol=1e-9)
    assert_com_close(maps[0], reference_com(big), atol=1e-4)


def test_full_chain_writes_npz_and_png(tmp_path):
    params = {
        "scan_rows": 12,
        "scan_cols": 16,
        "frame_rows": 96,
        "frame_cols": 128,
        "events_per_frame": 400.0,
        "disc_radius": 8.0,
        "shift_amplitude": 6.0,
        "batch_size": 48,  # 4 equal batches: progressive maps at 96 and 144 frames in any order
        "seed": 4,
        "first_scan_number": 1,
    }
    sim = ScanSimulation(
        scan_shape=(12, 16),
        frame_shape=(96, 128),
        events_per_frame=400.0,
        disc_radius=8.0,
        shift_amplitude=6.0,
        seed=4,
        scan_number=1,
    )
    tol = K_STANDARD_ERRORS * sim.com_standard_error()
    npz_path = tmp_path / "scan_000001_com.npz"
    png_path = tmp_path / "scan_000001_com.png"

    with BeamTestPipeline(options=PipelineOptions(["--runner=FnApiRunner"])) as p:
        frames = p | "Simulate" >> simulated_scan(**params)
        maps = frames | com_partial() | com_reduce(emit_every=64)
        written = maps | write_com_map(out_dir=str(tmp_path))
        assert_that(maps.com_map, matches_com({1: sim.expected_com()}, atol=tol), label="FinalMap")
        assert_that(written.path, equal_to([str(npz_path), str(png_path)]), label="Paths")
        assert_that(written.dead_letter, equal_to([]), label="NoDeadLetters")
        progressive = maps.com_map | beam.Filter(lambda m: not m.final) | beam.Map(lambda m: m.frames_seen)
        assert_that(progressive, equal_to([96, 144]), label="Progressive")
        # batches carry the event time of their first frame at the default 87 kHz
        stamps = frames.frames | beam.Map(
            lambda b, ts=beam.DoFn.TimestampParam: (
                int(b.frame_numbers[0]),
                abs(ts.micros - b.frame_numbers[0] / 0.087),
            )
        )
        assert_that(
            stamps | beam.Map(lambda s: (s[0], s[1] <= 1)),
            equal_to([(f, True) for f in (0, 48, 96, 144)]),
            label="EventTime",
        )

    assert sorted(f.name for f in tmp_path.iterdir()) == [npz_path.name, png_path.name]  # no temp files left
    with np.load(npz_path) as npz:
        com, x, y = npz["com"], npz["x"], npz["y"]
        assert int(npz["scan_number"]) == 1
        assert bool(npz["final"]) and bool(npz["complete"])
        assert int(npz["frames_seen"]) == sim.n_frames and int(npz["positions_seen"]) == sim.n_positions
    assert com.shape == (2, 12, 16) and com.dtype == np.float32
    np.testing.assert_array_equal(com[0], x)
    np.testing.assert_array_equal(com[1], y)
    # [x, y] stacked: com[0] is the column mean, com[1] the row mean, as stempy.
    ex, ey = sim.expected_com()
    assert np.abs(com[0] - ex).max() < tol and np.abs(com[1] - ey).max() < tol
    assert np.abs(com[0] - ey).max() > 10 * tol  # (a swap would fail: frame centre x 63.5, y 47.5)
    # The operator's events are the simulator's: same map as the numpy reference.
    rx, ry = reference_com(sparse_batches(sim, 48))
    np.testing.assert_allclose(com[0], rx, atol=1e-4, rtol=0)
    np.testing.assert_allclose(com[1], ry, atol=1e-4, rtol=0)

    data = png_path.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert len(data) > 10_000
    import matplotlib.image

    image = matplotlib.image.imread(png_path)
    # 10 in wide at 100 dpi; a 12x16 scan's maps are wider than high, and so is the figure (4.6 in when square)
    assert image.shape[:2] == (int(100 * figure_height((12, 16), 4.6)), 1000) == (367, 1000)
    assert image.reshape(-1, image.shape[-1]).std(axis=0).max() > 0.05  # not a blank picture


@pytest.mark.parametrize(
    "frame_shape",
    [(576, 576), (1448, 1448), (512, 4096), (1, 2**21), (2048, 2048)],
    ids=lambda s: f"{s[0]}x{s[1]}",
)
def test_sparse_kernel_splits_every_pixel_index_exactly(frame_shape):
    """Every index of the frame, one event per frame: the float32 split (below 2**21) and the float64 one."""
    from transforms.com_partial import FLOAT32_SPLIT_MAX_PIXELS, NO_CROP, com_sparse_kernel

    rows, cols = frame_shape
    events = np.arange(rows * cols, dtype=np.uint32)
    offsets = np.arange(rows * cols + 1, dtype=np.int64)
    sums = np.empty(len(events)), np.empty(len(events)), np.empty(len(events), np.int64)
    com_sparse_kernel(events, offsets, cols, NO_CROP, False, 0.0, 0.0, 0.0, 0.0, 0.0, *sums)
    assert (rows * cols <= FLOAT32_SPLIT_MAX_PIXELS) == (frame_shape != (2048, 2048))
    np.testing.assert_array_equal(sums[0], events % cols)
    np.testing.assert_array_equal(sums[1], events // cols)
    np.testing.assert_array_equal(sums[2], 1)


@pytest.mark.parametrize("cols", [576, 2048, 1])
def test_sparse_kernel_sums_are_exact_per_frame_whatever_its_largest_index(cols):
    """Long frames of the largest indices below 2**21 (32-bit block sums at their bound), frames with an
    index >= 2**21 (the exact float64 split, for that frame only) and empty frames: every sum exact."""
    from transforms.com_partial import FLOAT32_SPLIT_MAX_PIXELS, NO_CROP, SUM_BLOCK, com_sparse_kernel

    rng = np.random.default_rng(4)
    top = FLOAT32_SPLIT_MAX_PIXELS
    frames = [
        rng.integers(0, 576 * 576, rng.poisson(300)),
        np.full(3 * SUM_BLOCK + 17, top - 1),  # every block sum as large as it can be
        rng.integers(top - cols, top, 2 * SUM_BLOCK),
        np.array([], np.int64),
        np.concatenate([rng.integers(0, top, SUM_BLOCK + 5), [top]]),  # one index past the float32 split
        rng.integers(top, 2**32 - 1, 2 * SUM_BLOCK + 1),  # block sums would wrap: all float64
        rng.integers(0, 1000, 50),
    ]
    events = np.concatenate(frames).astype(np.uint32)
    offsets = np.concatenate([[0], np.cumsum([len(f) for f in frames])]).astype(np.int64)
    n = len(frames)
    sums = np.empty(n), np.empty(n), np.empty(n, np.int64)
    com_sparse_kernel(events, offsets, cols, NO_CROP, False, 0.0, 0.0, 0.0, 0.0, 0.0, *sums)
    exact = [f.astype(np.int64) for f in frames]
    np.testing.assert_array_equal(sums[0], [int((f % cols).sum()) for f in exact])
    np.testing.assert_array_equal(sums[1], [int((f // cols).sum()) for f in exact])
    np.testing.assert_array_equal(sums[2], [len(f) for f in exact])
