"""Cross-check of the sparse COM chain against stempy 3.6.0 on identical events.

Axis mapping (DESIGN.md section 5): stempy names the detector *row* ``x``, so its
flat index is ``x * W + y``, its ``init_center`` is ``(row, col)`` and its output is
``com[0]`` = column mean, ``com[1]`` = row mean. beamops ``ComMap.x`` is the
column and ``.y`` the row, so ``ComMap.x`` <-> ``com[0]``, ``ComMap.y`` <-> ``com[1]``
and ``init_center_x`` (a column) <-> ``init_center[1]``.

stempy >= 3.4.2 crops with a circle (``crop_radius`` here). The box crop
(``crop_to_x/_y``, stempy 3.4.1 as pinned by interactEM) is checked against a
plain numpy reference written below instead.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import pytest
from stempy.image import com_sparse
from stempy.io import SparseArray

from beamops import ComMap, FrameHeader, SparseFrameBatch
from beamops.testing import ScanSimulation, assert_com_close, run_operator
from transforms.com_partial import ComCropParams, com_partial, com_sparse_kernel
from transforms.com_reduce import com_reduce

ATOL = 1e-4  # px; stempy works in float32 (about 1.5e-5 px rounding at 300 px)
VERSIONS = pytest.mark.parametrize("version", [0, 1], ids=["stempy_v0", "stempy_v1"])


# --- helpers ------------------------------------------------------------------------


def to_sparse_array(batches: list[SparseFrameBatch]) -> SparseArray:
    """The same events as a stempy SparseArray of shape (n_positions, frames_per_position).

    A position's frames are ordered by frame number; positions with fewer frames
    are padded with empty frames (which add no events, as in a real acquisition).
    """
    header = batches[0].header
    per_position: dict[int, list[tuple[int, np.ndarray]]] = defaultdict(list)
    for batch in batches:
        for i in range(batch.n_frames):
            per_position[int(batch.scan_positions[i])].append(
                (int(batch.frame_numbers[i]), np.array(batch.frame(i), dtype=np.uint32))
            )
    depth = max(len(v) for v in per_position.values())
    data = np.empty((header.n_positions, depth), dtype=object)
    for pos in range(header.n_positions):
        frames = [f for _, f in sorted(per_position.get(pos, []), key=lambda t: t[0])]
        for k in range(depth):
            data[pos, k] = frames[k] if k < len(frames) else np.zeros(0, np.uint32)
    return SparseArray(data, header.scan_shape, header.frame_shape)


def stempy_com(batches, version, *, crop_to=None, init_center_xy=None, replace_nans=False):
    """stempy's COM as (x = column, y = row); init_center_xy is beamops' (column, row)."""
    init_center = None if init_center_xy is None else (init_center_xy[1], init_center_xy[0])  # stempy: (row, col)
    com = com_sparse(
        to_sparse_array(batches), crop_to=crop_to, init_center=init_center, replace_nans=replace_nans, version=version
    )
    assert com.shape == (2, *batches[0].header.scan_shape)
    return com[0], com[1]


def beamops_com(batches, *, replace_nans=False, **crop) -> ComMap:
    """The final ComMap of the real chain: batches -> com_partial -> com_reduce (FnApiRunner)."""
    result = run_operator(
        lambda frames: frames | com_partial(**crop) | com_reduce(replace_nans=replace_nans, emit_every=0),
        batches,
    )
    assert result.dead_letters == []
    finals = result.final_maps()
    assert list(finals) == [batches[0].header.scan_number]
    (final,) = finals.values()
    assert final.complete
    return final


def assert_not_trivial(x: np.ndarray, y: np.ndarray) -> None:
    """Guard against vacuous agreement: real, varying values on both axes."""
    assert np.isfinite(x).sum() >= 4 and np.isfinite(y).sum() >= 4
    assert np.nanstd(x) > 0.1 and np.nanstd(y) > 0.1


# --- circle crop and no crop vs stempy ------------------------------------------------------


@VERSIONS
def test_no_crop_matches_stempy(version):
    sim = ScanSimulation(scan_shape=(16, 12), events_per_frame=50, seed=11)
    batches = list(sim.batches(50))
    got = beamops_com(batches)
    want = stempy_com(batches, version)
    assert_not_trivial(*want)
    assert not np.isnan(got.x).any()
    assert_com_close(got, want, atol=ATOL)


@VERSIONS
@pytest.mark.parametrize(
    "radius, replace_nans",
    [(12.0, False), (3.0, False), (3.0, True)],
    ids=["r12", "r3-nan", "r3-replace_nans"],
)
def test_radius_crop_given_center_matches_stempy(version, radius, replace_nans):
    # The centre is off the disc centre (287.5, 287.5) and not symmetric in x/y, so
    # swapping init_center's axes changes which events are kept. Radius 3 leaves
    # about a third of the frames with no kept event (NaN, or filled by replace_nans).
    sim = ScanSimulation(scan_shape=(16, 16), events_per_frame=50, seed=5)
    batches = list(sim.batches(64))
    center = (293.0, 284.0)  # (column, row)
    got = beamops_com(
        batches, replace_nans=replace_nans, crop_radius=radius, init_center_x=center[0], init_center_y=center[1]
    )
    want = stempy_com(batches, version, crop_to=radius, init_center_xy=center, replace_nans=replace_nans)
    assert_not_trivial(*want)
    if radius == 3.0 and not replace_nans:
        assert 10 < np.isnan(want[0]).sum() < sim.n_positions - 10  # the NaN path is really exercised
    assert_com_close(got, want, atol=ATOL)
    # The axis mapping matters: stempy with the centre's axes swapped gives another answer.
    swapped = stempy_com(batches, version, crop_to=radius, init_center_xy=center[::-1], replace_nans=replace_nans)
    with pytest.raises(AssertionError):
        assert_com_close(got, swapped, atol=ATOL)


@VERSIONS
def test_radius_crop_unset_center_one_frame_per_position_matches_stempy(version):
    # init_center unset: stempy centres the crop on each position's uncropped COM,
    # beamops on each frame's; with one frame per position these are the same.
    sim = ScanSimulation(scan_shape=(16, 16), events_per_frame=40, seed=2)
    batches = list(sim.batches(100))
    radius = 10.5
    # stempy v1 computes the distance in float32, beamops the squared distance in
    # float64; make sure no event sits so close to the circle that the two could differ.
    for batch in batches:
        for i in range(batch.n_frames):
            row, col = np.divmod(batch.frame(i).astype(np.int64), sim.frame_shape[1])
            if len(row):
                d2 = (col - col.mean()) ** 2 + (row - row.mean()) ** 2
                assert np.abs(d2 - radius**2).min() > 1e-3, "test data puts an event on the crop circle"
    got = beamops_com(batches, crop_radius=radius)
    want = stempy_com(batches, version, crop_to=radius)
    assert_not_trivial(*want)
    assert_com_close(got, want, atol=ATOL)
    # and the crop changed the result (not the same as no crop)
    with pytest.raises(AssertionError):
        assert_com_close(got, stempy_com(batches, version), atol=ATOL)


@VERSIONS
@pytest.mark.parametrize("replace_nans", [False, True], ids=["nan", "replace_nans"])
def test_empty_frames_match_stempy(version, replace_nans):
    # About 60% of the frames have no events (Poisson mean 0.5), plus a position
    # whose frame is empty by construction.
    sim = ScanSimulation(scan_shape=(12, 12), events_per_frame=0.5, seed=7)
    batches = list(sim.batches(50))
    first = batches[0]
    frames = [np.zeros(0, np.uint32)] + [first.frame(i) for i in range(1, first.n_frames)]
    batches[0] = SparseFrameBatch.from_frames(first.header, frames, first.scan_positions, first.frame_numbers)
    got = beamops_com(batches, replace_nans=replace_nans)
    want = stempy_com(batches, version, replace_nans=replace_nans)
    n_empty = sum(int((np.diff(b.offsets) == 0).sum()) for b in batches)
    assert 0.4 * sim.n_positions < n_empty < 0.8 * sim.n_positions
    if replace_nans:
        assert not np.isnan(got.x).any() and not np.isnan(got.y).any()
        # an empty position holds the per-axis mean of the others, which differ on x and y
        assert got.x[0, 0] != got.y[0, 0]
    else:
        assert np.isnan(got.x[0, 0]) and np.isnan(got.y[0, 0])
        assert np.isnan(got.x).sum() == n_empty
    assert_com_close(got, want, atol=ATOL)


@VERSIONS
@pytest.mark.parametrize(
    "crop",
    [{}, {"crop_radius": 9.0, "init_center_x": 290.0, "init_center_y": 286.0}],
    ids=["no_crop", "radius_crop_given_center"],
)
def test_several_frames_per_position_match_stempy(version, crop):
    # Frame f lands on position f % n_positions: with 3 frames per position and
    # batches of 40 frames, every position's frames arrive in different batches.
    sim = ScanSimulation(scan_shape=(8, 10), events_per_frame=20, frames_per_position=3, seed=4)
    batches = list(sim.batches(40))
    assert len(batches) == 6
    got = beamops_com(batches, **crop)
    assert got.frames_seen == sim.n_frames
    center = (crop["init_center_x"], crop["init_center_y"]) if crop else None
    want = stempy_com(batches, version, crop_to=crop.get("crop_radius"), init_center_xy=center)
    assert_not_trivial(*want)
    assert_com_close(got, want, atol=ATOL)
    # An unweighted mean of the per-frame means would not match: the test can tell.
    by_frame = stempy_com_per_frame(batches, version, crop_to=crop.get("crop_radius"), init_center_xy=center)
    with pytest.raises(AssertionError):
        assert_com_close(got, by_frame, atol=ATOL)


def stempy_com_per_frame(batches, version, **kw):
    """Mean over a position's frames of stempy's per-frame COM (the wrong reduction)."""
    header = batches[0].header
    per_frame = []
    for batch in batches:
        for i in range(batch.n_frames):
            one = SparseFrameBatch.from_frames(
                FrameHeader(0, (1, 1), header.frame_shape), [batch.frame(i)], [0], [batch.frame_numbers[i]]
            )
            x, y = stempy_com([one], version, **kw)
            per_frame.append((int(batch.scan_positions[i]), x[0, 0], y[0, 0]))
    x = np.full(header.n_positions, np.nan)
    y = np.full(header.n_positions, np.nan)
    for pos in range(header.n_positions):
        vals = np.array([(a, b) for p, a, b in per_frame if p == pos])
        x[pos], y[pos] = np.nanmean(vals[:, 0]), np.nanmean(vals[:, 1])
    return x.reshape(header.scan_shape), y.reshape(header.scan_shape)


@VERSIONS
@pytest.mark.parametrize(
    "crop",
    [{}, {"crop_radius": 11.0, "init_center_x": 203.0, "init_center_y": 291.0}],
    ids=["no_crop", "radius_crop_given_center"],
)
def test_kernel_called_directly_matches_stempy(version, crop):
    # Non-square frames (disc centre: column 199.5, row 287.5) catch a divmod by the wrong frame dimension.
    sim = ScanSimulation(scan_shape=(10, 6), frame_shape=(576, 400), events_per_frame=60, seed=9)
    (batch,) = sim.batches(sim.n_frames)
    n = batch.n_frames
    sum_x, sum_y, counts = np.empty(n), np.empty(n), np.empty(n, np.int64)
    com_sparse_kernel(
        batch.events,
        batch.offsets,
        sim.frame_shape[1],
        *ComCropParams(**crop).kernel_args(),
        sum_x,
        sum_y,
        counts,
    )
    assert (batch.scan_positions == np.arange(n)).all()
    with np.errstate(invalid="ignore"):
        x = (sum_x / counts).reshape(sim.scan_shape)
        y = (sum_y / counts).reshape(sim.scan_shape)
    center = (crop["init_center_x"], crop["init_center_y"]) if crop else None
    want = stempy_com([batch], version, crop_to=crop.get("crop_radius"), init_center_xy=center)
    assert_not_trivial(*want)
    assert_com_close(ComMap(batch.header, x, y, n, n, True, True), want, atol=ATOL)


# --- box crop (interactEM / stempy 3.4.1 semantics) vs a numpy reference -----------------


def box_crop_reference(batches, cx, cy, wx, wy):
    """Per position: mean column and row of the events with cx-wx < col <= cx+wx and cy-wy < row <= cy+wy.

    (cx, cy) = (column, row) centre; None means each frame's own uncropped COM.
    Frames of a position are summed before dividing (event-weighted mean).
    """
    header = batches[0].header
    sx = np.zeros(header.n_positions)
    sy = np.zeros(header.n_positions)
    n = np.zeros(header.n_positions)
    for batch in batches:
        for i in range(batch.n_frames):
            row, col = np.divmod(batch.frame(i).astype(np.int64), header.frame_shape[1])
            if len(row) == 0:
                continue
            ccx, ccy = (col.mean(), row.mean()) if cx is None else (cx, cy)
            keep = (col > ccx - wx) & (col <= ccx + wx) & (row > ccy - wy) & (row <= ccy + wy)
            pos = int(batch.scan_positions[i])
            sx[pos] += col[keep].sum()
            sy[pos] += row[keep].sum()
            n[pos] += keep.sum()
    with np.errstate(invalid="ignore"):
        return (sx / n).reshape(header.scan_shape), (sy / n).reshape(header.scan_shape)


BOX_CX, BOX_CY, BOX_WX, BOX_WY = 40, 30, 6, 4  # column, row, half-widths (different on purpose)


def boundary_frames(frame_cols: int) -> list[np.ndarray]:
    """Hand-made frames with events exactly on the box edges around (BOX_CX, BOX_CY).

    Each frame's uncropped COM is exactly (BOX_CX, BOX_CY), so the same edges
    apply with init_center unset. Offsets -w (excluded), -w+1 (kept), +w (kept),
    +w+1 (excluded), plus one event at -2 that balances the sum to zero.
    """
    cx, cy, wx, wy = BOX_CX, BOX_CY, BOX_WX, BOX_WY

    def idx(cols, rows):
        return (np.asarray(rows) * frame_cols + np.asarray(cols)).astype(np.uint32)

    along_x = [-wx, -wx + 1, wx, wx + 1, -2]
    along_y = [-wy, -wy + 1, wy, wy + 1, -2]
    return [
        idx([cx + d for d in along_x], [cy] * 5),  # columns on the x edges
        idx([cx] * 5, [cy + d for d in along_y]),  # rows on the y edges
        # corners: (+wx, +wy) kept; (-wx+1, -wy) dropped by y; (-wx, -wy+1) dropped by x;
        # (+wx-1, +wy-1) kept, and balances the sums
        idx([cx + wx, cx - wx + 1, cx - wx, cx + wx - 1], [cy + wy, cy - wy, cy - wy + 1, cy + wy - 1]),
        np.zeros(0, np.uint32),  # empty frame
    ]


@pytest.mark.parametrize("given_center", [True, False], ids=["init_center_given", "init_center_unset"])
def test_box_crop_matches_numpy_reference(given_center):
    frame_shape = (64, 80)
    header = FrameHeader(scan_number=3, scan_shape=(3, 4), frame_shape=frame_shape)
    hand = boundary_frames(frame_shape[1])
    # The rest of the scan: random events around the box, in two batches.
    rng = np.random.default_rng(1)
    rand = [
        (rng.integers(BOX_CY - 8, BOX_CY + 9, 30) * frame_shape[1] + rng.integers(BOX_CX - 9, BOX_CX + 10, 30)).astype(
            np.uint32
        )
        for _ in range(header.n_positions - len(hand))
    ]
    frames = hand + rand
    positions = np.arange(header.n_positions)
    batches = [
        SparseFrameBatch.from_frames(header, frames[:6], positions[:6], positions[:6]),
        SparseFrameBatch.from_frames(header, frames[6:], positions[6:], positions[6:]),
    ]
    crop = {"crop_to_x": float(BOX_WX), "crop_to_y": float(BOX_WY)}
    if given_center:
        crop |= {"init_center_x": float(BOX_CX), "init_center_y": float(BOX_CY)}
    want = box_crop_reference(
        batches, BOX_CX if given_center else None, BOX_CY if given_center else None, BOX_WX, BOX_WY
    )
    got = beamops_com(batches, **crop)
    assert_com_close(got, want, atol=1e-5)

    # Hand-checked edges (independent of the reference function):
    # frame 0 keeps columns cx-wx+1, cx+wx, cx-2 -> mean cx - 1/3, row cy.
    assert got.x[0, 0] == pytest.approx(BOX_CX - 1 / 3, abs=1e-5)
    assert got.y[0, 0] == pytest.approx(BOX_CY, abs=1e-5)
    # frame 1 keeps rows cy-wy+1, cy+wy, cy-2 -> mean cy - 1/3, column cx.
    assert got.x[0, 1] == pytest.approx(BOX_CX, abs=1e-5)
    assert got.y[0, 1] == pytest.approx(BOX_CY - 1 / 3, abs=1e-5)
    # frame 2 keeps (cx+wx, cy+wy) and (cx+wx-1, cy+wy-1).
    assert got.x[0, 2] == pytest.approx(BOX_CX + BOX_WX - 0.5, abs=1e-5)
    assert got.y[0, 2] == pytest.approx(BOX_CY + BOX_WY - 0.5, abs=1e-5)
    # the empty frame is NaN
    assert np.isnan(got.x[0, 3]) and np.isnan(got.y[0, 3])
    # the crop really removes events from the random frames
    uncropped = box_crop_reference(batches, BOX_CX, BOX_CY, 1000, 1000)
    assert np.nanmax(np.abs(uncropped[0] - want[0])) > 0.1


@pytest.mark.parametrize("given_center", [True, False], ids=["init_center_given", "init_center_unset"])
def test_box_crop_simulated_scan_matches_numpy_reference(given_center):
    sim = ScanSimulation(scan_shape=(12, 12), events_per_frame=60, seed=21)
    batches = list(sim.batches(50))
    cx, cy, wx, wy = 291.0, 284.0, 9.0, 5.0
    crop = {"crop_to_x": wx, "crop_to_y": wy}
    if given_center:
        crop |= {"init_center_x": cx, "init_center_y": cy}
    got = beamops_com(batches, **crop)
    want = box_crop_reference(batches, cx if given_center else None, cy if given_center else None, wx, wy)
    assert_not_trivial(*want)
    assert_com_close(got, want, atol=ATOL)
