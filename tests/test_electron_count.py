"""electron_count: recall and precision on simulated detector frames, and stempy 3.6.0 agreement.

Simulated frames (``simulate`` below): a fixed-pattern dark offset (100 +- 4 ADU
per pixel), Gaussian read noise (sigma 2.5 ADU), rounded to uint16. Each
electron lands at a random sub-pixel point, at least 5 px (Chebyshev) from the
others, and deposits 60 +- 10 ADU as a Gaussian charge cloud (sigma 0.45 px),
so its charge spreads over about 3 x 3 pixels; about one X-ray per two frames
puts 3000 ADU in one pixel. An event counts as found when it lies within one
pixel of an electron's landing pixel (one event per electron at most).

Measured on these frames (40 frames of 128 x 128, 804 electrons, 21 X-rays):

* absolute thresholds 12.5 ADU (5 sigma) and 1000 ADU: recall 0.990, precision 1.000
* sigma mode, 5 and 10 (stempy's X-ray default): recall 0.990, precision 1.000
* without an X-ray cut every X-ray is an event: precision 0.974

(seeds 1-3 of the same simulation give recall 0.987-0.997, precision >= 0.997; the
misses are electrons whose charge splits over 2-4 pixels, none above 5 sigma.)

stempy agreement: the counting rule is compared event for event with
``stempy.image.electron_count_frame`` (its float gain path, and its uint16 path
with a whole-number dark reference), and the sigma thresholds with stempy's own
estimate, whose full ``electron_count`` chain is then reproduced exactly.
stempy's estimate needs dark-subtracted values that stay >= 0 (else it fails:
see transforms/electron_count.py), so that comparison uses a dark reference 20
ADU below the real offset.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import re

import numpy as np
import pytest
import stempy.image as stempy_image
import stempy.io as stempy_io
from hypothesis import example, given, settings
from hypothesis import strategies as st

from beamops import DenseFrameBatch, FrameHeader, OperatorParameterError, SparseFrameBatch
from beamops.testing import run_operator
from transforms.electron_count import (
    electron_count,
    electron_count_kernel,
    estimate_thresholds,
    load_calibration,
)

NOISE = 2.5  # ADU, read noise sigma
FRAME_SHAPE = (128, 128)


# --- simulated detector frames ---------------------------------------------------------


def _cloud_shares(offset: float, sigma: float) -> np.ndarray:
    """Fractions of a 1-D Gaussian centred ``offset`` px from pixel 0's centre falling in pixels -2..2."""
    edges = (np.arange(-2.5, 3.0) - offset) / (sigma * math.sqrt(2))
    cdf = np.array([0.5 * (1 + math.erf(e)) for e in edges])
    return np.diff(cdf)


def simulate(n=40, shape=FRAME_SHAPE, hits=20.0, xrays=0.5, seed=0, dark_offset=100.0):
    """(frames uint16 (n, rows, cols), dark float32, electron pixels per frame, X-ray pixels per frame)."""
    rng = np.random.default_rng(seed)
    rows, cols = shape
    dark = rng.normal(dark_offset, 4.0, shape).astype(np.float32)
    signal = np.zeros((n, rows, cols))
    electrons, xray_pixels = [], []
    for i in range(n):
        points: list[tuple[int, int]] = []
        wanted = rng.poisson(hits)
        for _ in range(10_000):
            if len(points) == wanted:
                break
            r, c = int(rng.integers(1, rows - 1)), int(rng.integers(1, cols - 1))
            if all(max(abs(r - a), abs(c - b)) >= 5 for a, b in points):
                points.append((r, c))
        for r, c in points:
            dy, dx = rng.random(2) - 0.5
            charge = max(rng.normal(60.0, 10.0), 0.0)
            cloud = np.outer(_cloud_shares(dy, 0.45), _cloud_shares(dx, 0.45)) * charge
            r0, r1, c0, c1 = max(r - 2, 0), min(r + 3, rows), max(c - 2, 0), min(c + 3, cols)
            signal[i, r0:r1, c0:c1] += cloud[r0 - r + 2 : r1 - r + 2, c0 - c + 2 : c1 - c + 2]
        electrons.append(np.array([r * cols + c for r, c in points], np.int64))
        hit = rng.integers(0, rows * cols, rng.poisson(xrays))
        signal[i].reshape(-1)[hit] += 3000.0
        xray_pixels.append(hit)
    raw = dark + signal + rng.normal(0.0, NOISE, (n, rows, cols))
    return np.clip(np.rint(raw), 0, 65535).astype(np.uint16), dark, electrons, xray_pixels


def dense_batches(frames: np.ndarray, batch_size: int, scan_number: int = 1) -> list[DenseFrameBatch]:
    n = len(frames)
    header = FrameHeader(scan_number=scan_number, scan_shape=(1, n), frame_shape=frames.shape[1:], total_frames=n)
    return [
        DenseFrameBatch(
            header,
            frames[a : a + batch_size],
            np.arange(a, min(a + batch_size, n), dtype=np.uint32),
            np.arange(a, min(a + batch_size, n), dtype=np.uint64),
            origin={"source": "test", "batch": a // batch_size},
        )
        for a in range(0, n, batch_size)
    ]


def events_by_frame(outputs: list[SparseFrameBatch]) -> dict[int, np.ndarray]:
    return {int(b.frame_numbers[i]): np.asarray(b.frame(i)) for b in outputs for i in range(b.n_frames)}


def recall_precision(found: dict[int, np.ndarray], electrons: list[np.ndarray], cols: int) -> tuple[float, float]:
    """Events within one pixel (Chebyshev) of an electron's landing pixel, matched one to one."""
    matched = total_events = 0
    for frame, truth in enumerate(electrons):
        events = found[frame].astype(np.int64)
        total_events += len(events)
        if len(events) and len(truth):
            er, ec = np.divmod(events, cols)
            tr, tc = np.divmod(truth, cols)
            near = np.maximum(abs(er[:, None] - tr[None, :]), abs(ec[:, None] - tc[None, :])) <= 1
            # electrons are >= 5 px apart, so an event is near at most one of them
            matched += min(near.any(axis=0).sum(), near.any(axis=1).sum())
    n_electrons = sum(len(t) for t in electrons)
    return matched / n_electrons, matched / max(total_events, 1)


def reference_count(frame: np.ndarray, dark, inv_gain, background: float, xray: float) -> np.ndarray:
    """Plain numpy of the rule: float32 value, threshold window, strict maximum of its 3 x 3 neighbourhood."""
    v = (frame.astype(np.float32) - dark) * inv_gain
    # The thresholds are float64, as in the kernel and in stempy (C++ doubles); numpy would round
    # them to float32 against a float32 array, which moves ties (a window of 5.00000006 becomes 5).
    wide = v.astype(np.float64)
    t = np.where((wide > background) & (wide < xray), v, np.float32(0))
    padded = np.pad(t, 1, constant_values=-np.inf)
    rows, cols = t.shape
    is_max = np.ones(t.shape, bool)
    for dr in (-1, 0, 1):
        for dc in (-1, 0, 1):
            if dr or dc:
                is_max &= t > padded[1 + dr : 1 + dr + rows, 1 + dc : 1 + dc + cols]
    return np.flatnonzero(is_max)


@pytest.fixture(scope="module")
def scan():
    return simulate()


@pytest.fixture
def dark_file(tmp_path, scan):
    path = tmp_path / "dark.npy"
    np.save(path, scan[1])
    return str(path)


# --- recall and precision -------------------------------------------------------------------


def test_recall_and_precision_with_absolute_thresholds(scan, dark_file):
    frames, _, electrons, _ = scan
    op = electron_count(
        dark_reference=dark_file, threshold_mode="absolute", background_threshold=5 * NOISE, xray_threshold=1000.0
    )
    batches = dense_batches(frames, 10)
    result = run_operator(op, batches)
    assert result.dead_letters == []
    assert sorted(b.origin["batch"] for b in result.outputs) == [0, 1, 2, 3]
    for out in result.outputs:  # header, positions and frame numbers of the batch are kept
        (src,) = [b for b in batches if b.origin == out.origin]
        assert out.header == src.header
        np.testing.assert_array_equal(out.scan_positions, src.scan_positions)
        np.testing.assert_array_equal(out.frame_numbers, src.frame_numbers)
        out.validate()
    recall, precision = recall_precision(events_by_frame(result.outputs), electrons, FRAME_SHAPE[1])
    assert sum(len(t) for t in electrons) == 804
    assert recall >= 0.98 and precision >= 0.98, (recall, precision)  # measured: 0.990, 1.000
    assert result.counter("frames_in") == 40


def test_recall_and_precision_with_sigma_thresholds(scan, dark_file):
    frames, dark, electrons, _ = scan
    op = electron_count(dark_reference=dark_file, threshold_mode="sigma", background_threshold=5, xray_threshold=10)
    found = events_by_frame([op.process(b) for b in dense_batches(frames, 10)])
    recall, precision = recall_precision(found, electrons, FRAME_SHAPE[1])
    assert recall >= 0.98 and precision >= 0.98, (recall, precision)  # measured: 0.990, 1.000
    # the estimator finds the read noise: sigma of the rounded noise is sqrt(2.5^2 + 1/12)
    t = estimate_thresholds(frames[:10], dark, np.ones(FRAME_SHAPE, np.float32), 5.0, 10.0)
    assert t.noise_sigma == pytest.approx(math.sqrt(NOISE**2 + 1 / 12), rel=0.03)
    assert abs(t.noise_mean) < 0.1
    assert t.background == pytest.approx(t.noise_mean + 5 * t.noise_sigma)
    assert t.xray == pytest.approx(t.mean + 10 * t.std)
    assert 60 < t.xray < 3000  # above every electron's brightest pixel, below the X-rays


def test_the_xray_threshold_rejects_xrays(scan, dark_file):
    frames, _, electrons, xrays = scan
    n_xrays = sum(len(x) for x in xrays)
    assert n_xrays == 21
    kw = {"dark_reference": dark_file, "threshold_mode": "absolute", "background_threshold": 5 * NOISE}
    batches = dense_batches(frames, 40)
    without = events_by_frame([electron_count(**kw, xray_threshold=60_000.0).process(batches[0])])
    with_cut = events_by_frame([electron_count(**kw, xray_threshold=1000.0).process(batches[0])])
    for frame, hit in enumerate(xrays):
        assert set(hit) <= set(without[frame].tolist())  # without a cut an X-ray is an event...
        assert not set(hit) & set(with_cut[frame].tolist())  # ...with the cut it is not
    _, precision_without = recall_precision(without, electrons, FRAME_SHAPE[1])
    _, precision_with = recall_precision(with_cut, electrons, FRAME_SHAPE[1])
    assert precision_without < precision_with == 1.0  # measured: 0.974 without the cut


# --- the rule, against stempy and a numpy reference -----------------------------------------


def test_matches_stempy_electron_count_frame_with_gain(scan, tmp_path):
    frames, dark, _, _ = scan
    gain = np.random.default_rng(1).uniform(0.8, 1.25, FRAME_SHAPE).astype(np.float32)
    np.save(tmp_path / "gain.npy", gain)
    np.save(tmp_path / "dark.npy", dark)
    op = electron_count(
        dark_reference=str(tmp_path / "dark.npy"),
        gain=str(tmp_path / "gain.npy"),
        threshold_mode="absolute",
        background_threshold=11.0,
        xray_threshold=55.0,  # low enough to cut the brightest electrons too: the X-ray path is exercised
    )
    (out,) = [op.process(b) for b in dense_batches(frames[:20], 20)]
    total = 0
    for i in range(out.n_frames):
        want = stempy_image.electron_count_frame(
            frames[i], darkreference=dark, gain=gain, background_threshold=11.0, xray_threshold=55.0
        ).data[0, 0]
        np.testing.assert_array_equal(out.frame(i), np.sort(want))
        total += len(want)
    assert total > 300


def test_matches_stempy_uint16_path_with_whole_number_dark(scan, tmp_path):
    # stempy without a gain stores frame - dark in the uint16 frame; with a whole-number
    # dark that is exact, and negative values wrap to >= the X-ray threshold, i.e. 0.
    frames, dark, _, _ = scan
    whole = np.rint(dark)
    np.save(tmp_path / "dark.npy", whole)
    op = electron_count(
        dark_reference=str(tmp_path / "dark.npy"), threshold_mode="absolute", background_threshold=9.0,
        xray_threshold=2000.0,
    )  # fmt: skip
    out = op.process(dense_batches(frames[:20], 20)[0])
    for i in range(out.n_frames):
        want = stempy_image.electron_count_frame(
            frames[i], darkreference=whole, background_threshold=9.0, xray_threshold=2000.0
        ).data[0, 0]
        np.testing.assert_array_equal(out.frame(i), np.sort(want))


@settings(max_examples=60, deadline=None)
@given(
    shape=st.tuples(st.integers(1, 7), st.integers(1, 7)),
    n=st.integers(1, 3),
    background=st.floats(0.0, 3.0),
    window=st.floats(0.5, 6.0),
    with_calibration=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
# Windows that float32 rounds to a whole number: the thresholds must be compared in float64.
@example(shape=(1, 2), n=1, background=0.0, window=5.000000059604645, with_calibration=False, seed=0)
@example(shape=(1, 2), n=1, background=0.0, window=4.000000059604645, with_calibration=False, seed=0)
def test_small_frames_with_ties_match_reference_and_stempy(shape, n, background, window, with_calibration, seed):
    # Values 0..6 make equal neighbours common: neither of two equal maxima is an event.
    rng = np.random.default_rng(seed)
    frames = rng.integers(0, 7, (n, *shape)).astype(np.uint16)
    if with_calibration:
        dark = rng.choice([0.0, 0.5, 1.0], shape).astype(np.float32)
        gain = rng.choice([0.5, 1.0, 2.0], shape).astype(np.float32)
        inv_gain = np.power(gain, -1)
    else:
        dark = np.zeros(shape, np.float32)
        inv_gain = np.ones(shape, np.float32)
    xray = background + window
    offsets = np.empty(n + 1, np.int64)
    events = electron_count_kernel(frames, dark, inv_gain, background, xray, offsets)
    for i in range(n):
        got = events[offsets[i] : offsets[i + 1]]
        np.testing.assert_array_equal(got, reference_count(frames[i], dark, inv_gain, background, xray))
        kw = {"darkreference": dark, "gain": gain} if with_calibration else {}
        want = stempy_image.electron_count_frame(frames[i], background_threshold=background, xray_threshold=xray, **kw)
        np.testing.assert_array_equal(got, np.sort(want.data[0, 0]))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # stempy: a reader that is not a SectorThreadedReader
def test_sigma_thresholds_agree_with_stempy_and_its_chain_is_reproduced(tmp_path):
    # 32 frames = one stempy block; stempy draws its 40 sample frames from that block at random.
    frames, dark, _, _ = simulate(n=32, xrays=0.0, seed=4)
    under = np.rint(dark) - 20.0  # keeps frame - dark >= 0 for stempy's estimator
    ones = np.ones(FRAME_SHAPE, np.float32)
    ours = estimate_thresholds(frames, under.astype(np.float32), ones, 4.0, 10.0)

    reader = stempy_io.PyReader(frames, np.arange(32), (32, 1), 32, 32)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        counted = stempy_image.electron_count(
            reader, darkreference=under, background_threshold_n_sigma=4, xray_threshold_n_sigma=10,
            scan_dimensions=(32, 1), verbose=True,
        )  # fmt: skip
    stats = dict(re.findall(r"^([a-z -]+): (-?[0-9.e+-]+)$", printed.getvalue(), re.MULTILINE))
    theirs = {k: float(v) for k, v in stats.items()}
    # stempy samples 40 of the 32 frames at random: its values move by about 0.1% run to run
    assert theirs["optimized mean"] == pytest.approx(ours.noise_mean, abs=0.05)
    assert theirs["optimized std dev"] == pytest.approx(ours.noise_sigma, rel=0.01)
    assert theirs["background threshold"] == pytest.approx(ours.background, rel=0.005)
    assert theirs["xray threshold"] == pytest.approx(ours.xray, rel=0.01)

    # With stempy's own thresholds, the operator reproduces its events exactly.
    np.save(tmp_path / "dark.npy", under)
    op = electron_count(
        dark_reference=str(tmp_path / "dark.npy"), threshold_mode="absolute",
        background_threshold=theirs["background threshold"], xray_threshold=theirs["xray threshold"],
    )  # fmt: skip
    out = op.process(dense_batches(frames, 32)[0])
    for i in range(32):
        np.testing.assert_array_equal(out.frame(i), np.sort(counted.data[i, 0]))
    assert len(out.events) > 500


# --- the operator: calibration files, dead letters, parameters ---------------------------------


def test_no_dark_no_gain_counts_the_raw_values():
    frames = np.zeros((2, 5, 6), np.uint16)
    frames[0, 1, 1] = 9
    frames[0, 1, 2] = 5  # a neighbour of the maximum: not an event
    frames[0, 4, 5] = 7  # a corner pixel: compared with its in-frame neighbours only
    frames[1, 2, 3] = frames[1, 2, 4] = 8  # two equal maxima: neither is an event (stempy)
    (batch,) = dense_batches(frames, 2)
    out = electron_count(threshold_mode="absolute", background_threshold=4, xray_threshold=100).process(batch)
    assert out.frame(0).tolist() == [1 * 6 + 1, 4 * 6 + 5]
    assert out.frame(1).tolist() == []


def test_empty_batch_gives_an_empty_batch():
    header = FrameHeader(scan_number=1, scan_shape=(2, 2), frame_shape=(8, 8))
    empty = DenseFrameBatch(header, np.zeros((0, 8, 8), np.uint16), np.zeros(0, np.uint32), np.zeros(0, np.uint64))
    for mode in ("sigma", "absolute"):
        out = electron_count(threshold_mode=mode).process(empty)
        assert out.n_frames == 0 and len(out.events) == 0 and out.offsets.tolist() == [0]


def test_calibration_problems_are_dead_letters_and_other_batches_flow(scan, tmp_path):
    frames, dark, _, _ = scan
    np.save(tmp_path / "dark.npy", dark)
    good = dense_batches(frames[:20], 10)
    small = dense_batches(frames[:4, :64, :64], 4, scan_number=2)[0].with_origin({"topic": "t", "offset": 9})
    result = run_operator(electron_count(dark_reference=str(tmp_path / "dark.npy")), [good[0], small, good[1]])
    assert sorted(b.origin["batch"] for b in result.outputs) == [0, 1]
    (dead,) = result.dead_letters
    assert dead.operator == "electron_count" and dead.error_type == "CalibrationError"
    assert "has shape (128, 128), but the frames are (64, 64)" in dead.error
    assert dead.origin == {"topic": "t", "offset": 9} and dead.payload_format == "arrow-ipc"

    # a path that does not exist where the pipeline is built is checked by the workers
    missing = str(tmp_path / "elsewhere" / "dark.npy")
    result = run_operator(electron_count(dark_reference=missing), good)
    assert result.outputs == [] and len(result.dead_letters) == 2
    assert all("cannot read dark file" in d.error and missing in d.error for d in result.dead_letters)


def test_calibration_is_loaded_once_per_process_and_reloaded_when_rewritten(tmp_path):
    path = str(tmp_path / "gain.npy")
    np.save(path, np.full((4, 4), 2.0))
    first = load_calibration(path, "gain", (4, 4))
    assert load_calibration(path, "gain", (4, 4)) is first
    assert first.dtype == np.float32 and (first == 0.5).all() and not first.flags.writeable  # the inverse gain
    np.save(path, np.full((4, 5), 4.0))
    os.utime(path, ns=(1, 1))  # a new modification time, whatever the clock's resolution
    assert (load_calibration(path, "gain", None) == 0.25).all()


@pytest.mark.parametrize(
    "params, message",
    [
        ({"dark_reference": "dark.tif"}, "must be the path of a .npy file"),
        ({"threshold_mode": "absolute", "background_threshold": 50, "xray_threshold": 20}, "must be above"),
        ({"threshold_mode": "median"}, "threshold_mode"),
        ({"background_threshold": float("nan")}, "background_threshold"),
        ({"dark": "x.npy"}, "unknown parameter"),
    ],
)
def test_bad_parameters_are_construction_errors(params, message):
    with pytest.raises(OperatorParameterError, match=message):
        electron_count(**params)


def test_a_bad_calibration_file_visible_at_construction_is_a_construction_error(tmp_path):
    np.save(tmp_path / "stack.npy", np.zeros((3, 4, 4)))
    with pytest.raises(OperatorParameterError, match="must hold a 2-D numeric array"):
        electron_count(dark_reference=str(tmp_path / "stack.npy"))
    gain = np.ones((4, 4))
    gain[1, 1] = -1
    np.save(tmp_path / "gain.npy", gain)
    with pytest.raises(OperatorParameterError, match="negative"):
        electron_count(gain=str(tmp_path / "gain.npy"))


def test_interactem_string_defaults_are_coerced():
    op = electron_count({"threshold_mode": "absolute", "background_threshold": "12.5", "xray_threshold": "1000"})
    assert (op.params.background_threshold, op.params.xray_threshold) == (12.5, 1000.0)
