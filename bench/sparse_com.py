"""Sparse COM: beamops' numba kernel vs stempy.image.com_sparse on the same events.

    python -m bench.sparse_com            # 256x256 scan, 576x576 frames, Poisson 50 and 500 events/frame
    python -m bench.sparse_com --quick    # 128x128 scan, fewer repeats (< 1 minute)

Events come from beamops.simulate.ScanSimulation (one frame per scan position).
The same events feed both libraries: beamops gets CSR arrays (the whole scan in
one call, and batches through ``com_partial().process``), stempy gets a
``stempy.io.SparseArray`` whose frames are views of the same event array (its
flat index ``x*W + y`` with x = row is our ``row*W + col``).

Before timing, the outputs are checked to agree to 1e-4 px (stempy's
``com[0]`` is the column mean, ``com[1]`` the row mean; its ``init_center`` is
``(row, col)``). Both libraries run single-threaded: the numba kernel is a plain
loop and stempy's com_sparse is numpy code (bincount, elementwise ops).

Target (DESIGN.md section 7): the beamops kernel runs at >= 10x the throughput of
``stempy.image.com_sparse(version=1)``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import version
from types import SimpleNamespace

import numpy as np
import stempy
import stempy.image
import stempy.io

from beamops.simulate import ScanSimulation
from beamops.testing import assert_com_close
from bench._common import Timing, machine_line, measure_interleaved, table, target_line
from transforms.com_partial import CIRCLE, NO_CROP, com_partial, com_sparse_kernel
from transforms.com_reduce import ScanAccumulator

TARGET = 10.0


@dataclass
class Scan:
    """A simulated scan as whole-scan CSR, as batches, and as a stempy SparseArray."""

    sim: ScanSimulation
    batches: list
    events: np.ndarray
    offsets: np.ndarray
    sparse_array: stempy.io.SparseArray

    @property
    def n_frames(self) -> int:
        return len(self.offsets) - 1

    @property
    def n_events(self) -> int:
        return len(self.events)

    def stempy_subset(self, n_positions: int) -> tuple[stempy.io.SparseArray, int]:
        """The first ``n_positions`` positions (whole scan rows) as their own SparseArray."""
        cols = self.sim.scan_shape[1]
        rows = max(1, min(self.sim.scan_shape[0], n_positions // cols))
        n = rows * cols
        sub = stempy.io.SparseArray(self.sparse_array.data[:n], (rows, cols), self.sim.frame_shape, validate=False)
        return sub, n


def make_scan(scan: int, events_per_frame: float, batch_size: int, seed: int) -> Scan:
    sim = ScanSimulation(scan_shape=(scan, scan), frame_shape=(576, 576), events_per_frame=events_per_frame, seed=seed)
    batches = list(sim.batches(batch_size))
    events = np.concatenate([b.events for b in batches])
    starts = np.cumsum([0] + [len(b.events) for b in batches[:-1]])
    offsets = np.concatenate(
        [np.zeros(1, np.int64)] + [b.offsets[1:] + s for b, s in zip(batches, starts, strict=True)]
    )
    # frame f is scan position f % n_positions; with one frame per position the CSR is in position order
    positions = np.concatenate([b.scan_positions for b in batches])
    assert np.array_equal(positions, np.arange(sim.n_positions)), "expected one frame per position, in order"
    data = np.empty((sim.n_positions, 1), dtype=object)
    for p in range(sim.n_positions):
        data[p, 0] = events[offsets[p] : offsets[p + 1]]
    array = stempy.io.SparseArray(data, sim.scan_shape, sim.frame_shape)
    return Scan(sim, batches, events, offsets, array)


@dataclass(frozen=True)
class Crop:
    name: str
    mode: int
    cx: float = 0.0  # column
    cy: float = 0.0  # row
    radius: float = 0.0

    def kernel_args(self) -> tuple[int, bool, float, float, float, float, float]:
        """The kernel arguments the operator itself derives from its parameters."""
        return self.operator().params.kernel_args()

    def operator(self) -> com_partial:
        if self.mode == NO_CROP:
            return com_partial()
        return com_partial(init_center_x=self.cx, init_center_y=self.cy, crop_radius=self.radius)

    def stempy_kwargs(self) -> dict:
        if self.mode == NO_CROP:
            return {}
        # stempy: x is the detector row, init_center = (row, col)
        return {"crop_to": self.radius, "init_center": (self.cy, self.cx)}


def run_kernel(scan: Scan, crop: Crop) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    n = scan.n_frames
    sx, sy, counts = np.empty(n), np.empty(n), np.empty(n, np.int64)
    com_sparse_kernel(scan.events, scan.offsets, scan.sim.frame_shape[1], *crop.kernel_args(), sx, sy, counts)
    return sx, sy, counts


def run_process(scan: Scan, op: com_partial) -> list:
    return [op.process(b) for b in scan.batches]


def run_process_reduce(scan: Scan, op: com_partial):
    acc = ScanAccumulator.empty(scan.sim.header, emit_every=0)
    for b in scan.batches:
        acc.add(op.process(b))
    return acc.com_map(final=True, replace_nans=False)


def stempy_v1_kernel_inputs(scan: Scan) -> tuple[np.ndarray, np.ndarray]:
    """What _com_sparse_v1 hands to com_v1_kernel: all events and their position index."""
    counts = np.diff(scan.offsets)
    return scan.events, np.repeat(np.arange(scan.n_frames, dtype=np.int32), counts)


def verify(scan: Scan, crop: Crop, v0_subset: int) -> str:
    """Check beamops (kernel, process, process+reduce) against stempy v1 and v0 to 1e-4 px."""
    sx, sy, counts = run_kernel(scan, crop)
    with np.errstate(invalid="ignore", divide="ignore"):
        ours = ((sx / counts).reshape(scan.sim.scan_shape), (sy / counts).reshape(scan.sim.scan_shape))
    op = crop.operator()
    parts = run_process(scan, op)
    for name, got, want in (
        ("sum_x", np.concatenate([p.sum_x for p in parts]), sx),
        ("sum_y", np.concatenate([p.sum_y for p in parts]), sy),
        ("counts", np.concatenate([p.counts for p in parts]), counts),
    ):
        if not np.array_equal(got, want):
            raise AssertionError(f"com_partial().process {name} differs from the whole-scan kernel call")
    assert_com_close(run_process_reduce(scan, op), ours, atol=1e-4)
    com1 = stempy.image.com_sparse(scan.sparse_array, version=1, replace_nans=False, **crop.stempy_kwargs())
    assert_com_close_arrays(ours, com1, "stempy v1")
    sub, n = scan.stempy_subset(v0_subset)
    com0 = stempy.image.com_sparse(sub, version=0, replace_nans=False, **crop.stempy_kwargs())
    assert_com_close_arrays(tuple(a.reshape(-1)[:n].reshape(sub.scan_shape) for a in ours), com0, "stempy v0")
    kept = counts.sum() / scan.n_events
    empty = int((counts == 0).sum())
    diff = max(float(np.nanmax(np.abs(ours[0] - com1[0]))), float(np.nanmax(np.abs(ours[1] - com1[1]))))
    return (
        f"  verified {crop.name}: beamops kernel == process == process+reduce; vs stempy v1 max |diff| "
        f"{diff:.2g} px over {scan.n_frames} frames, vs v0 on {n} frames (<= 1e-4 px); "
        f"{kept:.1%} of events kept, {empty} empty frames"
    )


def assert_com_close_arrays(ours: tuple[np.ndarray, np.ndarray], com: np.ndarray, who: str) -> None:
    """``ours`` = (x, y) against stempy's ``com`` = [column mean, row mean], NaN matching NaN."""
    try:
        assert_com_close(SimpleNamespace(x=ours[0], y=ours[1]), (com[0], com[1]), atol=1e-4)
    except AssertionError as exc:
        raise AssertionError(f"beamops vs {who}: {exc}") from exc


def warm_up() -> None:
    sim = ScanSimulation(scan_shape=(4, 4), events_per_frame=20)
    b = sim.batch(0, 16)
    for mode in (NO_CROP, CIRCLE):
        crop = Crop("warm", mode, 287.5, 287.5, 10.0)
        crop.operator().process(b)
        n = b.n_frames
        com_sparse_kernel(
            b.events, b.offsets, 576, *crop.kernel_args(), np.empty(n), np.empty(n), np.empty(n, np.int64)
        )
    acc = ScanAccumulator.empty(sim.header, 0)
    acc.add(com_partial().process(b))


def bench_case(scan: Scan, crop: Crop, args: argparse.Namespace) -> tuple[list[list], list[str]]:
    op = crop.operator()
    kw = {**crop.stempy_kwargs(), "replace_nans": False}  # like beamops: empty positions stay NaN
    ev, pos = stempy_v1_kernel_inputs(scan)
    sub, n_sub = scan.stempy_subset(args.v0_positions)
    sub_events = int(scan.offsets[n_sub])
    specs: list[tuple[str, Callable[[], object], int, int, int, int]] = [
        # name, function, repeats, warm-up runs, frames, events (0: the whole scan)
        ("beamops com_sparse_kernel (whole-scan CSR)", lambda: run_kernel(scan, crop), args.repeat, 1, 0, 0),
        (
            f"beamops com_partial().process ({args.batch_size}-frame batches)",
            lambda: run_process(scan, op),
            args.repeat,
            1,
            0,
            0,
        ),
        ("beamops process + ScanAccumulator -> ComMap", lambda: run_process_reduce(scan, op), args.repeat, 1, 0, 0),
        (
            "stempy com_sparse(version=1)  [reference]",
            lambda: stempy.image.com_sparse(scan.sparse_array, version=1, **kw),
            args.stempy_repeat,
            1,
            0,
            0,
        ),
        (
            "stempy com_v1_kernel only (pre-concatenated)",
            lambda: stempy.image.com_v1_kernel(ev, pos, scan.sim.scan_shape, scan.sim.frame_shape, **kw),
            args.stempy_repeat,
            1,
            0,
            0,
        ),
        (
            f"stempy com_sparse(version=0) [{n_sub} frames]",
            lambda: stempy.image.com_sparse(sub, version=0, **kw),
            args.stempy_repeat,
            0,
            n_sub,
            sub_events,
        ),
    ]
    timings = measure_interleaved([s[1] for s in specs], [s[2] for s in specs], [s[3] for s in specs])
    cases: list[tuple[str, Timing, int, int]] = [
        (name, t, frames, events) for (name, _, _, _, frames, events), t in zip(specs, timings, strict=True)
    ]
    ref_best = cases[3][1].best / scan.n_frames
    ref_med = cases[3][1].median / scan.n_frames
    rows = []
    for name, t, frames, events in cases:
        frames = frames or scan.n_frames
        events = events or scan.n_events
        rows.append(
            [
                name,
                t.best * 1e3,
                t.median * 1e3,
                frames / t.best / 1e6,
                frames / t.median / 1e6,
                events / t.best / 1e6,
                f"{ref_best / (t.best / frames):.1f}x",
                f"{ref_med / (t.median / frames):.1f}x",
            ]
        )
    kern, proc, k1 = cases[0][1], cases[1][1], cases[4][1]
    targets = [
        target_line("kernel / stempy v1, best", cases[3][1].best / kern.best, TARGET),
        target_line("kernel / stempy v1, median", cases[3][1].median / kern.median, TARGET),
        target_line("com_partial().process / stempy v1, median", cases[3][1].median / proc.median, TARGET),
        target_line("kernel / stempy com_v1_kernel only, median (stricter, info)", k1.median / kern.median, TARGET),
    ]
    return rows, targets


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="128x128 scan, 3 repeats (< 1 minute)")
    parser.add_argument("--scan", type=int, default=None, help="scan is SCAN x SCAN positions (default 256)")
    parser.add_argument("--events", type=float, nargs="+", default=[50.0, 500.0], help="mean events per frame")
    parser.add_argument("--batch-size", type=int, default=1000, help="frames per batch for com_partial().process")
    parser.add_argument("--repeat", type=int, default=None, help="timed runs of the beamops cases (default 7)")
    parser.add_argument("--stempy-repeat", type=int, default=None, help="timed runs of the stempy cases (default 3)")
    parser.add_argument("--v0-positions", type=int, default=None, help="positions for stempy version=0 (default 8192)")
    parser.add_argument("--center-x", type=float, default=289.5, help="crop centre, detector column (px)")
    parser.add_argument("--center-y", type=float, default=285.5, help="crop centre, detector row (px)")
    parser.add_argument("--radius", type=float, default=16.0, help="crop radius (px)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    quick = args.quick
    args.scan = args.scan or (128 if quick else 256)
    args.repeat = args.repeat or (3 if quick else 7)
    args.stempy_repeat = args.stempy_repeat or (2 if quick else 3)
    args.v0_positions = args.v0_positions or (2048 if quick else 8192)

    print(machine_line())
    print(f"stempy {version('stempy')}, numpy {np.__version__}, numba {version('numba')}")
    print(
        f"scan {args.scan}x{args.scan}, frames 576x576, one frame per position; single-threaded (numba loop; "
        f"stempy's numpy code); times in ms, best and median of {args.repeat} (beamops) / "
        f"{args.stempy_repeat} (stempy) runs taken in turns;\nratio = stempy com_sparse(version=1) time per frame / "
        f"this row's"
    )
    warm_up()
    crops = [
        Crop("no crop", NO_CROP),
        Crop(f"radius {args.radius:g} px around (x={args.center_x}, y={args.center_y})", CIRCLE,
             args.center_x, args.center_y, args.radius),
    ]  # fmt: skip
    headers = ["case", "best ms", "median ms", "Mframe/s best", "Mframe/s med", "Mevent/s best", "ratio best",
               "ratio med"]  # fmt: skip
    for events_per_frame in args.events:
        scan = make_scan(args.scan, events_per_frame, args.batch_size, args.seed)
        print(f"\n=== Poisson {events_per_frame:g} events/frame: {scan.n_frames} frames, {scan.n_events:,} events ===")
        for crop in crops:
            print(f"\n--- {crop.name} ---")
            print(verify(scan, crop, args.v0_positions))
            rows, targets = bench_case(scan, crop, args)
            print(table(headers, rows))
            print("\n".join(targets))
    return 0


if __name__ == "__main__":
    sys.exit(main())
