"""bin_frames: binned flat indices, one event stays one event, per-batch frame-shape errors.

References: a plain numpy binning written below, and stempy 3.6.0's
``SparseArray.bin_frames`` (square frames only: for non-square frames stempy
divides by the row count where the column count belongs).
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from stempy.io import SparseArray

from beamops import FrameHeader, OperatorParameterError, SparseFrameBatch
from beamops.testing import ScanSimulation, run_operator
from transforms.bin_frames import BinFramesParams, bin_frames

# --- helpers ------------------------------------------------------------------------


def reference_bin(events: np.ndarray, frame_shape: tuple[int, int], factor: int) -> np.ndarray:
    """Plain numpy: (row // f) * (cols // f) + col // f for every event."""
    row, col = np.divmod(events.astype(np.int64), frame_shape[1])
    return ((row // factor) * (frame_shape[1] // factor) + col // factor).astype(np.uint32)


def random_batch(rng, frame_shape, n_frames=12, scan_shape=(3, 4), max_events=40, scan_number=1) -> SparseFrameBatch:
    header = FrameHeader(scan_number=scan_number, scan_shape=scan_shape, frame_shape=frame_shape)
    pixels = frame_shape[0] * frame_shape[1]
    frames = [rng.integers(0, pixels, rng.integers(0, max_events + 1)).astype(np.uint32) for _ in range(n_frames)]
    positions = rng.integers(0, scan_shape[0] * scan_shape[1], n_frames)
    return SparseFrameBatch.from_frames(header, frames, positions, rng.permutation(n_frames) + 100)


def assert_binned(out: SparseFrameBatch, batch: SparseFrameBatch, factor: int) -> None:
    rows, cols = batch.header.frame_shape
    assert out.header.frame_shape == (rows // factor, cols // factor)
    # everything else of the header, the frames and the origin are kept
    assert (out.header.scan_number, out.header.scan_shape, out.header.total_frames, out.header.detector) == (
        batch.header.scan_number,
        batch.header.scan_shape,
        batch.header.total_frames,
        batch.header.detector,
    )
    np.testing.assert_array_equal(out.offsets, batch.offsets)
    np.testing.assert_array_equal(out.scan_positions, batch.scan_positions)
    np.testing.assert_array_equal(out.frame_numbers, batch.frame_numbers)
    assert out.origin == batch.origin
    assert out.events.dtype == np.uint32
    np.testing.assert_array_equal(out.events, reference_bin(batch.events, (rows, cols), factor))
    out.validate()  # a well-formed batch of the binned shape


# --- the binning rule --------------------------------------------------------------------


@pytest.mark.parametrize("factor", [2, 3, 4, 6, 12])
def test_non_square_frames_match_numpy_reference(factor):
    rng = np.random.default_rng(factor)
    batch = random_batch(rng, (48, 60)).with_origin({"source": "test", "batch": 3})
    assert_binned(bin_frames(factor=factor).process(batch), batch, factor)


@settings(max_examples=60, deadline=None)
@given(
    factor=st.integers(1, 5),
    binned_shape=st.tuples(st.integers(1, 9), st.integers(1, 9)),
    seed=st.integers(0, 2**32 - 1),
)
def test_binning_matches_reference_for_any_divisible_shape(factor, binned_shape, seed):
    rng = np.random.default_rng(seed)
    frame_shape = (binned_shape[0] * factor, binned_shape[1] * factor)
    batch = random_batch(rng, frame_shape, n_frames=int(rng.integers(0, 6)), max_events=30)
    out = bin_frames(factor=factor).process(batch)
    if factor == 1:
        assert out is batch
    else:
        assert_binned(out, batch, factor)


def test_an_event_stays_one_event_and_repeats_are_kept():
    # A 2x2 block holding 4 events (frame 0) becomes 4 events on one binned pixel;
    # event order within a frame is kept.
    w = 8
    header = FrameHeader(scan_number=2, scan_shape=(1, 2), frame_shape=(6, w))
    block = np.array([2 * w + 4, 2 * w + 5, 3 * w + 4, 3 * w + 5], np.uint32)  # rows 2-3, cols 4-5
    other = np.array([5 * w + 7, 0], np.uint32)
    batch = SparseFrameBatch.from_frames(header, [block, other], [0, 1], [0, 1])
    out = bin_frames(factor=2).process(batch)
    binned_w = w // 2
    assert out.frame(0).tolist() == [1 * binned_w + 2] * 4
    assert out.frame(1).tolist() == [2 * binned_w + 3, 0]
    # the per-pixel counts of the binned frame equal the 2x2 sums of the original counts
    dense = np.bincount(batch.frame(0), minlength=6 * w).reshape(6, w)
    binned = np.bincount(out.frame(0), minlength=3 * binned_w).reshape(3, binned_w)
    np.testing.assert_array_equal(binned, dense.reshape(3, 2, binned_w, 2).sum(axis=(1, 3)))


def test_factor_one_returns_the_batch_unchanged():
    batch = random_batch(np.random.default_rng(0), (10, 14))
    assert bin_frames(factor=1).process(batch) is batch


# --- against stempy ------------------------------------------------------------------------


@pytest.mark.parametrize("factor", [2, 4])
def test_square_frames_match_stempy_bin_frames(factor):
    # stempy frames cannot repeat a pixel, so it moves repeats to extra frames of the
    # same position: compare the binned counts per scan position.
    sim = ScanSimulation(scan_shape=(4, 5), frame_shape=(64, 64), events_per_frame=80, disc_radius=12, seed=3)
    (batch,) = sim.batches(sim.n_frames)
    out = bin_frames(factor=factor).process(batch)
    data = np.empty((sim.n_positions, 1), dtype=object)
    for i in range(batch.n_frames):
        data[batch.scan_positions[i], 0] = np.asarray(batch.frame(i), np.uint32)
    stempy_binned = SparseArray(data, sim.scan_shape, sim.frame_shape).bin_frames(factor)
    assert stempy_binned.frame_shape == out.header.frame_shape
    pixels = out.header.n_pixels
    for i in range(batch.n_frames):
        position = int(batch.scan_positions[i])
        want = np.zeros(pixels, np.int64)
        for frame in stempy_binned.data[position]:
            np.add.at(want, frame.astype(np.int64), 1)
        got = np.bincount(out.frame(i), minlength=pixels)
        np.testing.assert_array_equal(got, want)
    assert len(out.events) == len(batch.events)
    # repeats within a frame really occur, and stempy moved them to extra frames: the comparison covers them
    assert any(len(np.unique(out.frame(i))) < len(out.frame(i)) for i in range(out.n_frames))
    assert stempy_binned.data.shape[1] > 1


# --- errors -------------------------------------------------------------------------------


def test_indivisible_frame_shape_goes_to_dead_letters_and_the_rest_flows():
    rng = np.random.default_rng(5)
    good = [random_batch(rng, (48, 60), scan_number=s) for s in (1, 2)]
    bad = random_batch(rng, (48, 50), scan_number=3).with_origin({"topic": "frames", "partition": 0, "offset": 7})
    result = run_operator(bin_frames(factor=4), [good[0], bad, good[1]])
    assert sorted(b.header.scan_number for b in result.outputs) == [1, 2]
    for out in result.outputs:
        assert_binned(out, good[out.header.scan_number - 1], 4)
    (dead,) = result.dead_letters
    assert dead.operator == "bin_frames" and dead.error_type == "FrameShapeError"
    assert "frame_shape (48, 50) is not divisible by bin factor 4" in dead.error
    assert dead.origin == bad.origin and dead.payload_format == "arrow-ipc"


def test_out_of_range_events_are_an_error_not_a_wrong_index():
    header = FrameHeader(scan_number=1, scan_shape=(1, 1), frame_shape=(4, 4))
    # built without validate(): an event past the frame must not become a plausible binned index
    batch = SparseFrameBatch(
        header, np.array([3, 16], np.uint32), np.array([0, 2]), np.zeros(1, np.uint32), np.zeros(1, np.uint64)
    )
    with pytest.raises(ValueError, match="event index 16 out of range"):
        bin_frames(factor=2).process(batch)


@pytest.mark.parametrize("bad", [0, -2, 1.5, "two"])
def test_bad_factor_is_a_construction_error(bad):
    with pytest.raises(OperatorParameterError, match="factor"):
        bin_frames(factor=bad)


def test_factor_from_an_interactem_string_default():
    assert bin_frames({"factor": "4"}).params == BinFramesParams(factor=4)
