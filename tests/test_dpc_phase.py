"""dpc_phase: agreement with stempy.image.phase_from_com, phase recovery, NaNs, pipelines; estimate_rotation.

Conventions under test (see transforms/dpc_phase.py):

* ``dpc_phase(theta, flip, reg)`` on a ComMap equals
  ``stempy.image.phase_from_com(com.stacked(), theta=radians(theta), flip, reg)``. This is what
  interactEM's ``dpc`` operator computes.
* stempy integrates the rotated first component as d phase / d row. A detector aligned with the
  scan (x = d phase / d col, y = d phase / d row) is therefore ``flip=True, theta=90``.
* A measured map is made from a true gradient ``(g0, g1) = (d phase/d row, d phase/d col)`` with
  ``(x, y) = M(theta, flip)^-1 (g0, g1)``. Here M is dpc_phase's rotation: ``R(theta)`` without
  flip and ``R(theta) diag(1, -1)`` with it. ``estimate_rotation`` must then return that
  ``(theta, flip)``, and dpc_phase with them must give back the phase.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import stempy.image as stim

from beamops import ComMap, FrameHeader, Image, OperatorParameterError
from beamops.spec import OperatorSpec
from beamops.testing import ScanSimulation, run_operator
from transforms.com_partial import com_partial
from transforms.com_reduce import com_reduce
from transforms.dpc_phase import (
    DpcPhaseParams,
    RotationEstimate,
    curl_rms,
    dpc_phase,
    estimate_rotation,
    phase_from_com,
)

DPC_FIXTURE = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "interactem-operators" / "dpc.json"
ROWS, COLS = 48, 64  # not square, so a swapped axis cannot pass


def com_map(x: np.ndarray, y: np.ndarray, *, scan: int = 1, final: bool = True, complete: bool = True) -> ComMap:
    header = FrameHeader(scan_number=scan, scan_shape=x.shape, frame_shape=(128, 128))
    return ComMap(header, np.asarray(x, np.float32), np.asarray(y, np.float32), 123, x.size, final, complete)


def known_phase(rows: int = ROWS, cols: int = COLS, seed: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A phase of positive Gaussian peaks ("atoms") well inside the scan, and its exact gradient.

    Returns ``(phase, d phase / d row, d phase / d col)``. The peaks are at random places with
    random widths, so the field has no mirror symmetry that would make the flip ambiguous.
    """
    rng = np.random.default_rng(seed)
    r, c = np.mgrid[0:rows, 0:cols].astype(np.float64)
    phase, d_row, d_col = np.zeros((3, rows, cols))
    for _ in range(12):
        r0, c0 = rng.uniform(8, rows - 8), rng.uniform(8, cols - 8)
        sigma, amplitude = rng.uniform(1.5, 4.0), rng.uniform(0.5, 2.0)
        peak = amplitude * np.exp(-((r - r0) ** 2 + (c - c0) ** 2) / (2 * sigma**2))
        phase += peak
        d_row -= (r - r0) / sigma**2 * peak
        d_col -= (c - c0) / sigma**2 * peak
    return phase, d_row, d_col


def measured(d_row: np.ndarray, d_col: np.ndarray, theta: float, flip: bool) -> tuple[np.ndarray, np.ndarray]:
    """COM (x, y) a detector at (theta, flip) records: dpc_phase's rotation inverted.

    dpc_phase computes ``(g0, g1) = M (x, y)``, with ``M = R(t)`` or, with flip,
    ``M = R(t) diag(1, -1)``. Then ``(x, y) = diag(1, -1)^flip R(-t) (g0, g1)``.
    """
    t = np.deg2rad(theta)
    c, s = np.cos(t), np.sin(t)
    x = c * d_row + s * d_col
    y = -s * d_row + c * d_col
    return (x, -y) if flip else (x, y)


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(np.ravel(a), np.ravel(b))[0, 1])


def angle_error(a: float, b: float) -> float:
    return abs((a - b + 180.0) % 360.0 - 180.0)


@pytest.fixture(scope="module")
def sim_map() -> ComMap:
    """The simulator's true COM (absolute px, not curl-free), on a non-square scan."""
    sim = ScanSimulation(scan_shape=(ROWS, COLS), frame_shape=(96, 96), disc_radius=10)
    return com_map(*sim.expected_com())


# --- agreement with stempy ----------------------------------------------------------


@pytest.mark.parametrize("theta", [-9.0, 0.0, 37.5, 90.0, -151.25])
@pytest.mark.parametrize("flip", [False, True])
@pytest.mark.parametrize("reg", [0.0, 1e-10, 0.1, 2.0])
def test_matches_stempy_phase_from_com(sim_map: ComMap, theta: float, flip: bool, reg: float) -> None:
    params = DpcPhaseParams(theta=theta, flip=flip, reg=reg)
    image = dpc_phase(params).process(sim_map)
    want = stim.phase_from_com(sim_map.stacked(), theta=np.deg2rad(theta), flip=flip, reg=reg)
    assert image.data.shape == (ROWS, COLS) and image.data.dtype == np.float32
    # float64 maths are identical; only the float32 output rounds.
    np.testing.assert_allclose(phase_from_com(sim_map, theta, flip, reg), want, rtol=0, atol=1e-9)
    np.testing.assert_allclose(image.data, want, rtol=0, atol=2e-6 * np.abs(want).max())


def test_odd_scan_shape_matches_stempy() -> None:
    rng = np.random.default_rng(3)
    m = com_map(rng.normal(50, 2, (17, 23)), rng.normal(40, 2, (17, 23)))
    want = stim.phase_from_com(m.stacked(), theta=np.deg2rad(-9), flip=True, reg=0.1)
    np.testing.assert_allclose(dpc_phase().process(m).data, want, rtol=0, atol=2e-6 * np.abs(want).max())


def test_defaults_are_interactem_dpc_defaults(sim_map: ComMap) -> None:
    params = DpcPhaseParams()
    assert (params.flip, params.theta, params.reg) == (True, -9.0, 0.1)
    fixture = {p.name: p for p in OperatorSpec.load(DPC_FIXTURE).parameters or []}
    ours = {p.name: p for p in dpc_phase.spec().parameters or []}
    assert set(ours) == set(fixture) == {"flip", "theta", "reg"}
    for name, p in fixture.items():
        assert (ours[name].type, ours[name].default) == (p.type, p.default), name
    # interactEM's dpc: theta * pi / 180 into stempy, on com_sparse's [column, row] array.
    spec = json.loads(dpc_phase.spec().to_json())
    assert [p["name"] for p in spec["inputs"]] == ["in"] and [p["name"] for p in spec["outputs"]] == ["image"]
    want = stim.phase_from_com(sim_map.stacked(), theta=-9 * np.pi / 180, flip=True, reg=0.1)
    np.testing.assert_allclose(dpc_phase().process(sim_map).data, want, rtol=0, atol=2e-6 * np.abs(want).max())


@pytest.mark.parametrize("bad", [{"reg": -0.1}, {"reg": float("inf")}, {"theta": float("nan")}, {"theta": 720.0}])
def test_invalid_parameters_are_rejected(bad: dict[str, float]) -> None:
    with pytest.raises(OperatorParameterError, match=next(iter(bad))):
        dpc_phase(**bad)


# --- phase recovery -------------------------------------------------------------------


def test_scan_aligned_detector_is_flip_true_theta_90() -> None:
    # x = d phase / d col, y = d phase / d row: stempy's axes need the swap flip=True, theta=90.
    phase, d_row, d_col = known_phase()
    m = com_map(d_col + 130.0, d_row + 120.0)  # absolute COM: the constant offset is dropped at k = 0
    got = dpc_phase(theta=90.0, flip=True, reg=0.0).process(m).data
    assert correlation(got, phase) > 0.9999
    assert abs(float(got.mean())) < 1e-5
    np.testing.assert_allclose(got, phase - phase.mean(), atol=0.02 * np.ptp(phase))
    # Without the swap the phase is wrong.
    assert correlation(dpc_phase(theta=0.0, flip=False, reg=0.0).process(m).data, phase) < 0.5


def test_exact_for_a_periodic_phase() -> None:
    r, c = np.mgrid[0:ROWS, 0:COLS].astype(np.float64)
    a, b = 2 * np.pi / ROWS, 2 * np.pi / COLS
    phase = np.sin(2 * a * r) * np.cos(3 * b * c) + 0.5 * np.cos(a * r + b * c)
    d_row = 2 * a * np.cos(2 * a * r) * np.cos(3 * b * c) - 0.5 * a * np.sin(a * r + b * c)
    d_col = -3 * b * np.sin(2 * a * r) * np.sin(3 * b * c) - 0.5 * b * np.sin(a * r + b * c)
    for theta, flip in [(90.0, True), (-9.0, True), (25.0, False)]:
        x, y = measured(d_row, d_col, theta, flip)
        got = phase_from_com(com_map(x, y), theta, flip, 0.0)
        np.testing.assert_allclose(got, phase - phase.mean(), atol=1e-5)


def test_regularisation_damps_low_frequencies_like_stempy() -> None:
    phase, d_row, d_col = known_phase()
    m = com_map(d_col, d_row)
    exact = phase_from_com(m, 90.0, True, 0.0)
    damped = phase_from_com(m, 90.0, True, 0.1)
    assert np.std(damped) < np.std(exact)
    assert correlation(damped, phase) < correlation(exact, phase)


# --- NaNs and progressive maps ------------------------------------------------------


def test_nans_are_replaced_by_the_map_mean_first(sim_map: ComMap) -> None:
    x, y = sim_map.x.copy(), sim_map.y.copy()
    x[3, 5] = y[3, 5] = np.nan
    x[10:12, 40:44] = np.nan
    y[0, 0] = np.nan
    m = com_map(x, y)
    image = dpc_phase(theta=12.0, flip=False, reg=0.05).process(m)
    filled = np.stack([np.where(np.isnan(x), np.nanmean(x), x), np.where(np.isnan(y), np.nanmean(y), y)])
    want = stim.phase_from_com(filled, theta=np.deg2rad(12.0), flip=False, reg=0.05)
    assert np.isfinite(image.data).all()
    np.testing.assert_allclose(image.data, want, rtol=0, atol=2e-6 * np.abs(want).max())
    assert np.isnan(m.x[3, 5])  # the input map is left alone


def test_a_map_without_finite_values_is_an_error() -> None:
    nan = np.full((4, 4), np.nan)
    with pytest.raises(ValueError, match="no finite value"):
        dpc_phase().process(com_map(nan, nan))


def test_progressive_maps_give_progressive_images(sim_map: ComMap) -> None:
    m = com_map(sim_map.x, sim_map.y, scan=7, final=False, complete=False)
    image = dpc_phase().process(m)
    assert isinstance(image, Image)
    assert (image.name, image.units, image.header, image.scan_number) == ("phase", "a.u.", m.header, 7)
    assert (image.frames_seen, image.final, image.complete) == (123, False, False)
    flushed = dpc_phase().process(com_map(sim_map.x, sim_map.y, final=True, complete=False))
    assert (flushed.final, flushed.complete) == (True, False)


# --- the operator in pipelines --------------------------------------------------------


def test_operator_on_com_maps_with_a_dead_letter(sim_map: ComMap) -> None:
    nan = np.full((4, 4), np.nan)
    maps = [sim_map, com_map(sim_map.x, sim_map.y, scan=2, final=False, complete=False), com_map(nan, nan, scan=3)]
    result = run_operator(dpc_phase(theta=-9.0, flip=True, reg=0.1), maps)
    by_scan = {image.scan_number: image for image in result.outputs}
    assert set(by_scan) == {1, 2}
    want = stim.phase_from_com(sim_map.stacked(), theta=np.deg2rad(-9.0), flip=True, reg=0.1)
    np.testing.assert_allclose(by_scan[1].data, want, rtol=0, atol=2e-6 * np.abs(want).max())
    assert by_scan[1].final and not by_scan[2].final
    (dead,) = result.dead_letters
    assert (dead.operator, dead.error_type) == ("dpc_phase", "ValueError") and "no finite value" in dead.error


def test_com_chain_to_phase_matches_stempy_on_the_final_map() -> None:
    sim = ScanSimulation(scan_shape=(12, 16), frame_shape=(96, 96), disc_radius=10, events_per_frame=100)
    result = run_operator(
        lambda frames: frames | com_partial() | com_reduce(emit_every=64) | dpc_phase(reg=0.05), sim.batches(32)
    )
    reduced = run_operator(lambda frames: frames | com_partial() | com_reduce(emit_every=0), sim.batches(32))
    final_map = reduced.final_maps()[sim.scan_number]
    assert result.dead_letters == []
    finals = [image for image in result.outputs if image.final]
    assert len(finals) == 1 and finals[0].complete and finals[0].frames_seen == sim.n_frames
    assert any(not image.final for image in result.outputs)  # progressive images came through
    want = stim.phase_from_com(final_map.stacked(), theta=np.deg2rad(-9.0), flip=True, reg=0.05)
    np.testing.assert_allclose(finals[0].data, want, rtol=0, atol=2e-6 * np.abs(want).max())


# --- scan rotation and flip -------------------------------------------------------------


@pytest.mark.parametrize("theta", [-170.3, -9.0, 0.0, 33.7, 90.0, 123.4])
@pytest.mark.parametrize("flip", [False, True])
def test_estimate_rotation_recovers_a_known_rotation_and_flip(theta: float, flip: bool) -> None:
    phase, d_row, d_col = known_phase()
    x, y = measured(d_row, d_col, theta, flip)
    m = com_map(x + 130.0, y + 120.0)
    est = estimate_rotation(m)
    assert isinstance(est, RotationEstimate) and len(est) == 3
    assert est.flip is flip
    assert angle_error(est.theta, theta) < 0.5, est
    assert -180.0 <= est.theta < 180.0
    # The estimate is in dpc_phase's convention: it gives back the phase (sign included).
    assert correlation(dpc_phase(theta=est.theta, flip=est.flip, reg=0.0).process(m).data, phase) > 0.99
    assert est.curl_rms < 0.1 * curl_rms(m, theta + 45.0, flip)
    assert est.curl_rms < 0.1 * min(curl_rms(m, t, not flip) for t in np.arange(-180.0, 180.0, 1.0))


def test_theta_and_theta_plus_180_tie_without_polarity() -> None:
    _, d_row, d_col = known_phase(seed=5)
    m = com_map(*measured(d_row, d_col, 30.0, False))
    assert curl_rms(m, 30.0, False) == pytest.approx(curl_rms(m, -150.0, False), rel=1e-9)
    free = estimate_rotation(m, resolve_polarity=False)
    assert angle_error(free.theta % 180.0, 30.0) < 0.5 and free.flip is False
    # With polarity the angle that makes the atoms positive peaks is chosen.
    assert angle_error(estimate_rotation(m).theta, 30.0) < 0.5
    negated = com_map(-m.x, -m.y)
    assert angle_error(estimate_rotation(negated).theta, -150.0) < 0.5


def test_estimate_rotation_is_robust_to_noise_nans_and_a_coarse_grid() -> None:
    _, d_row, d_col = known_phase(seed=2)
    x, y = measured(d_row, d_col, -9.0, True)
    rng = np.random.default_rng(0)
    noise = 0.2 * float(np.abs(np.stack([x, y])).mean())
    x = x + rng.normal(0, noise, x.shape)
    y = y + rng.normal(0, noise, y.shape)
    x[5, 7] = np.nan
    y[20:22, 30] = np.nan
    est = estimate_rotation(com_map(x, y), angles=np.arange(-180, 180, 5.0))
    assert est.flip is True and angle_error(est.theta, -9.0) < 0.5 and np.isfinite(est.curl_rms)
    # A stacked [x, y] array works too, and a restricted search range stays in it.
    restricted = estimate_rotation(np.stack([x, y]), flips=(True,), angles=np.arange(-20, 20.5, 0.5))
    assert restricted.flip is True and angle_error(restricted.theta, -9.0) < 0.5


def test_estimate_rotation_rejects_degenerate_input() -> None:
    with pytest.raises(ValueError, match="3 x 3"):
        estimate_rotation(np.zeros((2, 2, 5)))
    with pytest.raises(ValueError, match="one angle"):
        estimate_rotation(np.zeros((2, 5, 5)), angles=[])
