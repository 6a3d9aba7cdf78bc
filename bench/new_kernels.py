"""The newer kernels vs stempy 3.6.0: electron counting, virtual images, summed pattern, binning, DPC phase.

    python -m bench.new_kernels            # 256x256 scan, 576x576 frames, 50 events/frame (~40-60 s)
    python -m bench.new_kernels --quick    # 128x128 scan, fewer frames and repeats (~12 s)
    python -m bench.new_kernels --only virtual_images dpc_phase

For each kernel the same data feeds beamops and stempy. Before any timing the
outputs are checked to agree, to the tolerance the module's tests use:

* electron counting: 576x576 uint16 frames, a fixed-pattern dark (100 +- 4 ADU),
  a gain map (0.8-1.25), read noise (2.5 ADU), Poisson ``--electrons`` electrons
  per frame as 5x5 charge clouds (60 +- 10 ADU, sigma 0.45 px) and Poisson 0.5
  X-rays (3000 ADU) per frame. Absolute thresholds 12.5 and 1000. The events of
  every frame equal ``stempy.image.electron_count_frame`` (its float gain path)
  exactly.
* virtual images: ``ScanSimulation`` events (one frame per position), a bright
  field 0:16 px and an annulus 16:48 px around the frame centre; counts equal
  ``stempy.image.create_stem_images(SparseArray, ...) / 65535`` exactly.
* summed pattern: equal to ``np.bincount`` of all events, and to
  ``stempy.image.calculate_sum_sparse`` on the stempy subset, exactly.
* binning: equal to a numpy binning of every event, and per scan position to the
  binned counts of ``SparseArray.bin_frames`` (which moves a pixel repeated
  within a frame to an extra frame) on the stempy subset, exactly.
* DPC phase: 256x256 COM map; ``phase_from_com`` to 1e-9 of
  ``stempy.image.phase_from_com`` and the operator's float32 image to
  2e-6 x max|phase|.

stempy's pure-Python kernels (``calculate_sum_sparse``, ``bin_frames``) run on
the first ``--stempy-frames`` positions only (whole scan rows, their own
SparseArray), as bench.sparse_com does for com_sparse(version=0); rates are per
frame of what each case processed.

Everything is single-threaded: the numba kernels are plain loops, stempy's C++
paths used here run on the calling thread and its Python paths are numpy. Each
table has a ``cpu/wall`` column (process CPU time / wall time over all runs of
the case) to show it. Cases take turns (bench._common.measure_interleaved);
best and median of the runs. Ratio = stempy reference time per frame (or per
map) / this row's: above 1x beamops is faster.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import version

import numpy as np
import stempy.image
import stempy.io
from stempy import _image as stempy_cpp

from beamops import ComMap, DenseFrameBatch, FrameHeader, SparseFrameBatch
from beamops.scan_reduce import _check_and_mark
from beamops.simulate import ScanSimulation
from bench._common import Timing, machine_line, measure_interleaved, table
from transforms.bin_frames import bin_events_kernel, bin_frames
from transforms.diffraction_sum import PatternAccumulator, sum_events_kernel
from transforms.dpc_phase import dpc_phase, phase_from_com
from transforms.electron_count import electron_count, electron_count_kernel
from transforms.virtual_images import VirtualImageAccumulator, VirtualImagesParams, annulus_counts

FRAME_SHAPE = (576, 576)
KERNELS = ("electron_count", "virtual_images", "diffraction_sum", "bin_frames", "dpc_phase")
STEMPY_EVENT = 65535  # create_stem_images adds its mask value per event

# electron counting: detector model and thresholds (values of (frame - dark) / gain)
DARK_MEAN, DARK_SPREAD, READ_NOISE = 100.0, 4.0, 2.5
CHARGE_MEAN, CHARGE_SPREAD, CLOUD_SIGMA = 60.0, 10.0, 0.45
XRAYS_PER_FRAME, XRAY_ADU = 0.5, 3000.0
BACKGROUND, XRAY = 5 * READ_NOISE, 1000.0

# virtual images: bright field and one annulus (integer radii: stempy takes ints)
ANNULI = "0:16,16:48"

# DPC: interactEM's dpc defaults (dpc_phase's)
THETA_DEG, FLIP, REG = -9.0, True, 0.1


# --- timing --------------------------------------------------------------------------------------


@dataclass
class Case:
    """One timed function. ``role``: kernel, process, reference (the stempy API the ratios divide), info."""

    name: str
    fn: Callable[[], object]
    units: int  # frames (or maps) handled per run
    role: str
    stempy: bool = False
    cpu: list[float] = field(default_factory=list)
    wall: list[float] = field(default_factory=list)

    def timed(self) -> Callable[[], object]:
        """``fn``, also recording its process CPU time and wall time (to show it is single-threaded)."""

        def run() -> object:
            c0, w0 = time.process_time(), time.perf_counter()
            out = self.fn()
            self.wall.append(time.perf_counter() - w0)
            self.cpu.append(time.process_time() - c0)
            return out

        return run


@dataclass
class GroupResult:
    title: str
    unit: str  # "frame" or "map"
    cases: list[Case]
    timings: list[Timing]

    def rate(self, i: int, stat: str) -> float:
        return self.cases[i].units / getattr(self.timings[i], stat)

    def index(self, role: str) -> int:
        return next(i for i, c in enumerate(self.cases) if c.role == role)

    def ratio(self, i: int, stat: str) -> float:
        """stempy reference time per unit / case ``i``'s (throughput ratio beamops / stempy)."""
        return self.rate(i, stat) / self.rate(self.index("reference"), stat)


def rate_unit(unit: str, rates: list[float]) -> tuple[float, str]:
    """(divisor, label) so that the largest rate prints with at most 4 digits: frames/s, kframes/s, Mframes/s."""
    top = max(rates)
    if top >= 1e6:
        return 1e6, f"M{unit}s/s"
    if top >= 1e4:
        return 1e3, f"k{unit}s/s"
    return 1.0, f"{unit}s/s"


def run_group(title: str, unit: str, cases: list[Case], args: argparse.Namespace) -> GroupResult:
    repeats = [args.stempy_repeat if c.stempy else args.repeat for c in cases]
    timings = measure_interleaved([c.timed() for c in cases], repeats, 1)
    result = GroupResult(title, unit, cases, timings)
    scale, label = rate_unit(unit, [result.rate(i, "best") for i in range(len(cases))])
    headers = ["case", f"{unit}s/run", "best ms", "median ms", f"{label} best", f"{label} med", "ratio best",
               "ratio med", "cpu/wall"]  # fmt: skip
    rows = []
    for i, (c, t) in enumerate(zip(cases, timings, strict=True)):
        rows.append(
            [
                c.name + ("  [reference]" if c.role == "reference" else ""),
                c.units,
                t.best * 1e3,
                t.median * 1e3,
                result.rate(i, "best") / scale,
                result.rate(i, "median") / scale,
                f"{result.ratio(i, 'best'):.2f}x",
                f"{result.ratio(i, 'median'):.2f}x",
                f"{sum(c.cpu) / sum(c.wall):.2f}",
            ]
        )
    print(table(headers, rows))
    return result


# --- sparse data shared by virtual images, summed pattern and binning ----------------------------


@dataclass
class SparseScan:
    sim: ScanSimulation
    batches: list[SparseFrameBatch]
    events: np.ndarray  # whole scan, CSR in position order (one frame per position)
    offsets: np.ndarray
    positions: np.ndarray
    sparse_array: stempy.io.SparseArray

    @property
    def n_frames(self) -> int:
        return len(self.positions)

    def frames(self, n: int) -> list[np.ndarray]:
        return [self.events[self.offsets[p] : self.offsets[p + 1]] for p in range(n)]

    def subset(self, n_positions: int) -> tuple[stempy.io.SparseArray, SparseFrameBatch]:
        """The first whole scan rows holding at most ``n_positions`` positions: a SparseArray and a batch."""
        cols = self.sim.scan_shape[1]
        rows = max(1, min(self.sim.scan_shape[0], n_positions // cols))
        n = rows * cols
        array = stempy.io.SparseArray(self.sparse_array.data[:n], (rows, cols), self.sim.frame_shape, validate=False)
        header = FrameHeader(scan_number=1, scan_shape=(rows, cols), frame_shape=self.sim.frame_shape, total_frames=n)
        end = int(self.offsets[n])
        batch = SparseFrameBatch(
            header, self.events[:end], self.offsets[: n + 1], self.positions[:n], np.arange(n, dtype=np.uint64)
        )
        return array, batch


def make_sparse_scan(scan: int, events_per_frame: float, batch_size: int, seed: int) -> SparseScan:
    sim = ScanSimulation(scan_shape=(scan, scan), frame_shape=FRAME_SHAPE, events_per_frame=events_per_frame, seed=seed)
    batches = list(sim.batches(batch_size))
    events = np.concatenate([b.events for b in batches])
    lengths = np.concatenate([np.diff(b.offsets) for b in batches])
    offsets = np.zeros(len(lengths) + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    positions = np.concatenate([b.scan_positions for b in batches])
    assert np.array_equal(positions, np.arange(sim.n_positions)), "expected one frame per position, in order"
    data = np.empty((sim.n_positions, 1), dtype=object)
    for p in range(sim.n_positions):
        data[p, 0] = events[offsets[p] : offsets[p + 1]]
    array = stempy.io.SparseArray(data, sim.scan_shape, sim.frame_shape)
    return SparseScan(sim, batches, events, offsets, positions, array)


# --- 1. electron counting --------------------------------------------------------------------------


def _cloud_shares(offsets: np.ndarray) -> np.ndarray:
    """Fractions of a 1-D Gaussian (CLOUD_SIGMA) centred ``offset`` px from pixel 0 in pixels -2..2: (n, 5)."""
    edges = (np.arange(-2.5, 3.0)[None, :] - offsets[:, None]) / (CLOUD_SIGMA * math.sqrt(2))
    cdf = 0.5 * (1 + np.frompyfunc(math.erf, 1, 1)(edges).astype(np.float64))
    return np.diff(cdf, axis=1)


def make_dense_frames(n: int, electrons: float, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """(frames uint16 (n, 576, 576), dark float32, gain float32, electrons injected)."""
    rng = np.random.default_rng(seed)
    rows, cols = FRAME_SHAPE
    pixels = rows * cols
    dark = rng.normal(DARK_MEAN, DARK_SPREAD, FRAME_SHAPE).astype(np.float32)
    gain = rng.uniform(0.8, 1.25, FRAME_SHAPE).astype(np.float32)
    counts = rng.poisson(electrons, n)
    total = int(counts.sum())
    frame_of = np.repeat(np.arange(n), counts)
    r, c = rng.integers(2, rows - 2, total), rng.integers(2, cols - 2, total)
    dy, dx = rng.random(total) - 0.5, rng.random(total) - 0.5
    charge = np.maximum(rng.normal(CHARGE_MEAN, CHARGE_SPREAD, total), 0.0)
    cloud = charge[:, None, None] * _cloud_shares(dy)[:, :, None] * _cloud_shares(dx)[:, None, :]
    around = np.arange(-2, 3)
    flat = frame_of[:, None, None] * pixels + (r[:, None, None] + around[None, :, None]) * cols
    flat = flat + c[:, None, None] + around[None, None, :]
    signal = np.bincount(flat.ravel(), weights=cloud.ravel(), minlength=n * pixels)
    n_xrays = rng.poisson(XRAYS_PER_FRAME, n)
    xray_at = np.repeat(np.arange(n), n_xrays) * pixels + rng.integers(0, pixels, int(n_xrays.sum()))
    signal[xray_at] += XRAY_ADU
    signal = signal.reshape(n, rows, cols)
    frames = np.empty((n, rows, cols), np.uint16)
    for a in range(0, n, 16):  # in chunks: the float32 noise of all frames at once would be large
        raw = dark + gain * signal[a : a + 16] + READ_NOISE * rng.standard_normal(signal[a : a + 16].shape, np.float32)
        frames[a : a + 16] = np.clip(np.rint(raw), 0, 65535)
    return frames, dark, gain, total


def bench_electron_count(args: argparse.Namespace) -> GroupResult:
    n = args.dense_frames
    frames, dark, gain, injected = make_dense_frames(n, args.electrons, args.seed)
    header = FrameHeader(scan_number=1, scan_shape=(1, n), frame_shape=FRAME_SHAPE, total_frames=n)
    bs = args.dense_batch_size
    batches = [
        DenseFrameBatch(
            header,
            frames[a : a + bs],
            np.arange(a, min(a + bs, n), dtype=np.uint32),
            np.arange(a, min(a + bs, n), dtype=np.uint64),
        )
        for a in range(0, n, bs)
    ]
    tmp = tempfile.TemporaryDirectory(prefix="bench_new_kernels_")
    dark_path, gain_path = os.path.join(tmp.name, "dark.npy"), os.path.join(tmp.name, "gain.npy")
    np.save(dark_path, dark)
    np.save(gain_path, gain)
    op = electron_count(
        dark_reference=dark_path,
        gain=gain_path,
        threshold_mode="absolute",
        background_threshold=BACKGROUND,
        xray_threshold=XRAY,
    )
    op_sigma = electron_count(
        dark_reference=dark_path, gain=gain_path, threshold_mode="sigma", background_threshold=5, xray_threshold=10
    )
    inv_gain = np.power(gain, -1).astype(np.float32)  # what the operator loads, and what stempy's wrapper passes

    def kernel() -> tuple[np.ndarray, np.ndarray]:
        offsets = np.empty(n + 1, np.int64)
        return electron_count_kernel(frames, dark, inv_gain, BACKGROUND, XRAY, offsets), offsets

    def stempy_api() -> list:
        return [
            stempy.image.electron_count_frame(
                f, darkreference=dark, gain=gain, background_threshold=BACKGROUND, xray_threshold=XRAY
            )
            for f in frames
        ]

    options = stempy_cpp.ElectronCountOptionsClassic()
    options.dark_reference = dark
    options.gain = inv_gain
    options.background_threshold = BACKGROUND
    options.x_ray_threshold = XRAY
    options.apply_row_dark_subtraction = False
    options.optimized_mean = 0.0
    options.apply_row_dark_use_mean = False
    dims = FRAME_SHAPE[::-1]

    def stempy_inner() -> list:
        return [stempy_cpp.electron_count_frame(f, dims, options) for f in frames]

    # verify: kernel == process == stempy's API == stempy's C++ call with the options prepared once
    events, offsets = kernel()
    processed = [op.process(b) for b in batches]
    if not np.array_equal(np.concatenate([b.events for b in processed]), events):
        raise AssertionError("electron_count().process events differ from the kernel's")
    ours = [events[offsets[i] : offsets[i + 1]] for i in range(n)]
    for i, (theirs, inner) in enumerate(zip(stempy_api(), stempy_inner(), strict=True)):
        if not np.array_equal(ours[i], np.sort(theirs.data[0, 0])):
            raise AssertionError(f"frame {i}: beamops events differ from stempy electron_count_frame")
        if not np.array_equal(ours[i], np.sort(np.asarray(inner))):
            raise AssertionError(f"frame {i}: beamops events differ from stempy's C++ electron_count_frame")
    sigma_events = sum(len(b.events) for b in (op_sigma.process(b) for b in batches))
    print(
        f"  verified: {n} frames, {len(events):,} events ({len(events) / injected:.3f} per injected electron; "
        f"sigma mode finds {sigma_events:,}); kernel == process == stempy electron_count_frame, event for event"
    )
    cases = [
        Case("beamops electron_count_kernel (all frames, one call)", kernel, n, "kernel"),
        Case(
            f"beamops electron_count().process, absolute ({bs}-frame batches)",
            lambda: [op.process(b) for b in batches],
            n,
            "process",
        ),
        Case(
            "beamops electron_count().process, sigma (info: + threshold estimate)",
            lambda: [op_sigma.process(b) for b in batches],
            n,
            "info",
        ),
        Case("stempy electron_count_frame per frame", stempy_api, n, "reference", stempy=True),
        Case("stempy C++ electron_count_frame, options once (info)", stempy_inner, n, "info", stempy=True),
    ]
    try:
        return run_group("electron counting", "frame", cases, args)
    finally:
        tmp.cleanup()


# --- 2. virtual images -----------------------------------------------------------------------------


def bench_virtual_images(scan: SparseScan, args: argparse.Namespace) -> GroupResult:
    params = VirtualImagesParams(annuli=ANNULI, center_x=scan.sim.center[0], center_y=scan.sim.center[1], emit_every=0)
    auto = VirtualImagesParams(annuli=ANNULI, emit_every=0)  # centre from the first center_frames frames
    radii = np.asarray(params.radii)
    inner2, outer2 = radii[:, 0] ** 2, radii[:, 1] ** 2
    cx, cy = params.center
    cols, p = scan.sim.frame_shape[1], scan.sim.n_positions
    inner, outer = [int(r) for r in radii[:, 0]], [int(r) for r in radii[:, 1]]

    def kernel(center: tuple[float, float] = (cx, cy)) -> np.ndarray:
        counts = np.zeros((len(radii), p), np.int64)
        annulus_counts(scan.events, scan.offsets, scan.positions, cols, *center, inner2, outer2, counts)
        return counts

    def process(prm: VirtualImagesParams) -> VirtualImageAccumulator:
        acc = VirtualImageAccumulator.empty(scan.sim.header, prm)
        for b in scan.batches:
            acc.add(b)
        acc.images(final=True)
        return acc

    def stempy_api(center: tuple[float, float] = (cx, cy)) -> np.ndarray:
        return stempy.image.create_stem_images(scan.sparse_array, inner, outer, center=center)

    counts = kernel()
    acc = process(params)
    images = np.stack([im.data for im in acc.images(final=True)])
    raw = np.asarray(stempy_api(), np.uint64)
    if raw.shape != (len(radii), *scan.sim.scan_shape) or (raw % STEMPY_EVENT).any():
        raise AssertionError(f"unexpected stempy images: shape {raw.shape}")
    want = (raw // STEMPY_EVENT).astype(np.int64).reshape(len(radii), p)
    if not np.array_equal(counts, want):
        raise AssertionError("annulus_counts differs from stempy create_stem_images / 65535")
    if not np.array_equal(images.reshape(len(radii), p), want):
        raise AssertionError("VirtualImageAccumulator images differ from stempy create_stem_images / 65535")
    auto_acc = process(auto)
    auto_images = np.stack([im.data for im in auto_acc.images(final=True)]).reshape(len(radii), p)
    auto_want = (np.asarray(stempy_api(auto_acc.center), np.uint64) // STEMPY_EVENT).astype(np.int64)
    if not np.array_equal(auto_images, auto_want.reshape(len(radii), p)):
        raise AssertionError("images around the centre found from the first frames differ from stempy's")
    print(
        f"  verified: annuli {ANNULI} px around ({cx}, {cy}); kernel == accumulator == stempy / 65535 on "
        f"{p} positions ({int(want[0].sum()):,} BF and {int(want[1].sum()):,} ADF events); also around the "
        f"centre found from the first {auto.center_frames} frames, ({auto_acc.center[0]:.3f}, {auto_acc.center[1]:.3f})"
    )
    n = scan.n_frames
    bs = len(scan.batches[0])
    cases = [
        Case("beamops annulus_counts (whole-scan CSR)", kernel, n, "kernel"),
        Case(f"beamops accumulator, given centre ({bs}-frame batches)", lambda: process(params), n, "process"),
        Case(
            f"beamops accumulator, centre from first {auto.center_frames} frames (info)",
            lambda: process(auto),
            n,
            "info",
        ),
        Case("stempy create_stem_images(SparseArray), 2 annuli", stempy_api, n, "reference", stempy=True),
    ]
    return run_group("virtual images", "frame", cases, args)


# --- 3. summed diffraction pattern ------------------------------------------------------------------


def bench_diffraction_sum(scan: SparseScan, args: argparse.Namespace) -> GroupResult:
    header, pixels, p = scan.sim.header, scan.sim.frame_shape[0] * scan.sim.frame_shape[1], scan.sim.n_positions
    frame_numbers = np.arange(p, dtype=np.uint64)
    sub_array, sub_batch = scan.subset(args.stempy_frames)
    n_sub = sub_batch.n_frames
    sub_frames = scan.frames(n_sub)

    def kernel(events=scan.events, offsets=scan.offsets, positions=scan.positions, numbers=frame_numbers) -> np.ndarray:
        # as the operator runs it for a scan with total_frames: the range check and the redelivery bitset
        pattern = np.zeros(pixels, np.int64)
        fresh = np.empty(len(positions), np.bool_)
        status, _ = _check_and_mark(positions, numbers, p, p, np.zeros(-(-p // 8), np.uint8), fresh)
        assert status == 0, "positions or frame numbers out of range"
        sum_events_kernel(events, offsets, positions, fresh, np.zeros(len(positions), np.uint8), pattern)
        return pattern

    def process() -> np.ndarray:
        acc = PatternAccumulator.empty(header, 0)
        for b in scan.batches:
            acc.add(b)
        return acc.image(final=True).data

    def stempy_api() -> np.ndarray:
        return stempy.image.calculate_sum_sparse(sub_frames, scan.sim.frame_shape)

    def stempy_array_sum() -> np.ndarray:
        return sub_array.sum(axis=(0, 1))

    want = np.bincount(scan.events, minlength=pixels)
    if not np.array_equal(kernel(), want) or not np.array_equal(process().reshape(-1), want):
        raise AssertionError("sum_events_kernel / PatternAccumulator differ from np.bincount of all events")
    sub = kernel(sub_batch.events, sub_batch.offsets, sub_batch.scan_positions, sub_batch.frame_numbers)
    if not np.array_equal(stempy_api().reshape(-1), sub):
        raise AssertionError("beamops differs from stempy calculate_sum_sparse")
    # SparseArray.sum adds 1 per distinct pixel of a frame: a pixel repeated within a frame counts once
    frame_of = np.repeat(np.arange(n_sub, dtype=np.int64), np.diff(sub_batch.offsets))
    distinct = np.unique(frame_of * pixels + sub_batch.events) % pixels
    if not np.array_equal(stempy_array_sum().reshape(-1), np.bincount(distinct, minlength=pixels)):
        raise AssertionError("stempy SparseArray.sum differs from the per-frame distinct-pixel sum")
    repeats = len(sub_batch.events) - len(distinct)
    print(
        f"  verified: kernel == accumulator == np.bincount over {p} frames; == stempy calculate_sum_sparse on "
        f"the first {n_sub} frames; SparseArray.sum (info) drops the {repeats:,} repeats of a pixel within a frame "
        f"({repeats / len(sub_batch.events):.1%} of events) and equals the distinct-pixel sum"
    )
    bs = len(scan.batches[0])
    cases = [
        Case("beamops sum_events_kernel (whole-scan CSR, dedup bitset)", kernel, p, "kernel"),
        Case(f"beamops PatternAccumulator + image ({bs}-frame batches)", process, p, "process"),
        Case(f"stempy calculate_sum_sparse [{n_sub} frames]", stempy_api, n_sub, "reference", stempy=True),
        Case(
            f"stempy SparseArray.sum(axis=(0, 1)) (info, not equal) [{n_sub} frames]",
            stempy_array_sum,
            n_sub,
            "info",
            stempy=True,
        ),
    ]
    return run_group("summed diffraction pattern", "frame", cases, args)


# --- 4. binning ------------------------------------------------------------------------------------


def bench_bin_frames(scan: SparseScan, args: argparse.Namespace) -> GroupResult:
    factor = args.bin_factor
    rows, cols = scan.sim.frame_shape
    binned_pixels = (rows // factor) * (cols // factor)
    op = bin_frames(factor=factor)
    sub_array, sub_batch = scan.subset(args.stempy_frames)
    n_sub = sub_batch.n_frames

    def kernel(events: np.ndarray = scan.events) -> np.ndarray:
        out = np.empty(len(events), np.uint32)
        bin_events_kernel(events, cols, factor, out)
        return out

    def process() -> list[SparseFrameBatch]:
        return [op.process(b) for b in scan.batches]

    def stempy_api() -> stempy.io.SparseArray:
        return sub_array.bin_frames(factor)

    row, col = np.divmod(scan.events.astype(np.int64), cols)
    want = ((row // factor) * (cols // factor) + col // factor).astype(np.uint32)
    got = kernel()
    if not np.array_equal(got, want) or not np.array_equal(np.concatenate([b.events for b in process()]), want):
        raise AssertionError("bin_events_kernel / bin_frames().process differ from numpy binning")
    # per position: sorted (position, binned pixel) keys of every event
    ours = np.sort(
        np.repeat(sub_batch.scan_positions.astype(np.int64), np.diff(sub_batch.offsets)) * binned_pixels
        + kernel(sub_batch.events)
    )
    binned = stempy_api()
    if binned.frame_shape != (rows // factor, cols // factor):
        raise AssertionError(f"stempy binned frame_shape {binned.frame_shape}")
    keys = [
        pos * binned_pixels + frame.astype(np.int64)
        for pos in range(binned.data.shape[0])
        for frame in binned.data[pos]
        if len(frame)
    ]
    theirs = np.sort(np.concatenate(keys))
    if not np.array_equal(ours, theirs):
        raise AssertionError("beamops binned counts per position differ from stempy SparseArray.bin_frames")
    print(
        f"  verified: factor {factor}; kernel == process == numpy binning over {scan.n_frames} frames; binned "
        f"counts per position == stempy bin_frames on the first {n_sub} frames (stempy used "
        f"{binned.data.shape[1]} frames per position for repeated pixels)"
    )
    bs = len(scan.batches[0])
    cases = [
        Case("beamops bin_events_kernel (whole-scan CSR)", kernel, scan.n_frames, "kernel"),
        Case(f"beamops bin_frames().process ({bs}-frame batches)", process, scan.n_frames, "process"),
        Case(f"stempy SparseArray.bin_frames({factor}) [{n_sub} frames]", stempy_api, n_sub, "reference", stempy=True),
    ]
    return run_group(f"binning by {factor}", "frame", cases, args)


# --- 5. DPC phase ----------------------------------------------------------------------------------


def bench_dpc_phase(args: argparse.Namespace) -> GroupResult:
    side = args.dpc_scan
    sim = ScanSimulation(scan_shape=(side, side), frame_shape=FRAME_SHAPE)
    x, y = sim.expected_com()
    rng = np.random.default_rng(args.seed)
    x = (x + rng.normal(0, 0.3, x.shape)).astype(np.float32)  # a measured map: COM noise of ~50 events
    y = (y + rng.normal(0, 0.3, y.shape)).astype(np.float32)
    com = ComMap(sim.header, x, y, sim.n_frames, sim.n_positions, True, True)
    stacked = com.stacked()
    op = dpc_phase(theta=THETA_DEG, flip=FLIP, reg=REG)
    theta = np.deg2rad(THETA_DEG)
    k = args.dpc_maps

    want = stempy.image.phase_from_com(stacked, theta=theta, flip=FLIP, reg=REG)
    np.testing.assert_allclose(phase_from_com(com, THETA_DEG, FLIP, REG), want, rtol=0, atol=1e-9)
    image = op.process(com)
    np.testing.assert_allclose(image.data, want, rtol=0, atol=2e-6 * np.abs(want).max())
    diff = float(np.abs(phase_from_com(com, THETA_DEG, FLIP, REG) - want).max())
    print(
        f"  verified: {side}x{side} map, theta {THETA_DEG} deg, flip {FLIP}, reg {REG}: phase_from_com vs stempy "
        f"max |diff| {diff:.2g} (<= 1e-9); dpc_phase().process float32 image within 2e-6 x max|phase|"
    )
    cases = [
        Case(
            "beamops phase_from_com (float64)",
            lambda: [phase_from_com(com, THETA_DEG, FLIP, REG) for _ in range(k)],
            k,
            "kernel",
        ),
        Case("beamops dpc_phase().process -> float32 Image", lambda: [op.process(com) for _ in range(k)], k, "process"),
        Case(
            "stempy phase_from_com(com.stacked())",
            lambda: [stempy.image.phase_from_com(stacked, theta=theta, flip=FLIP, reg=REG) for _ in range(k)],
            k,
            "reference",
            stempy=True,
        ),
    ]
    return run_group("DPC phase", "map", cases, args)


# --- main ------------------------------------------------------------------------------------------


def warm_up() -> None:
    """Compile (or load from numba's cache) every kernel before any timing."""
    sim = ScanSimulation(scan_shape=(4, 4), events_per_frame=20)
    b = sim.batch(0, 16)
    bin_frames(factor=2).process(b)
    acc = PatternAccumulator.empty(sim.header, 0)
    acc.add(b)
    v = VirtualImageAccumulator.empty(sim.header, VirtualImagesParams(annuli=ANNULI, emit_every=0))
    v.add(b)
    v.images(final=True)
    frames = np.zeros((2, 8, 8), np.uint16)
    electron_count_kernel(
        frames, np.zeros((8, 8), np.float32), np.ones((8, 8), np.float32), 1.0, 2.0, np.empty(3, np.int64)
    )


def summary(results: list[GroupResult]) -> str:
    headers = ["kernel", "unit", "beamops kernel best", "kernel med", "process med", "stempy med",
               "kernel/stempy best", "kernel/stempy med", "process/stempy med"]  # fmt: skip
    rows = []
    for r in results:
        k, pr, ref = r.index("kernel"), r.index("process"), r.index("reference")
        scale, label = rate_unit(r.unit, [r.rate(k, "best"), r.rate(pr, "best")])
        rows.append(
            [
                r.title,
                label,
                r.rate(k, "best") / scale,
                r.rate(k, "median") / scale,
                r.rate(pr, "median") / scale,
                r.rate(ref, "median") / scale,
                f"{r.ratio(k, 'best'):.2f}x",
                f"{r.ratio(k, 'median'):.2f}x",
                f"{r.ratio(pr, 'median'):.2f}x",
            ]
        )
    return table(headers, rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="128x128 scan, fewer frames and repeats (< 1 minute)")
    parser.add_argument("--only", nargs="+", choices=KERNELS, default=list(KERNELS), help="run these kernels only")
    parser.add_argument("--scan", type=int, default=None, help="sparse scan is SCAN x SCAN positions (default 256)")
    parser.add_argument("--events", type=float, default=50.0, help="mean events per sparse frame")
    parser.add_argument("--batch-size", type=int, default=1000, help="frames per sparse batch for the process paths")
    parser.add_argument(
        "--stempy-frames",
        type=int,
        default=None,
        help="positions for stempy's Python kernels (calculate_sum_sparse, bin_frames; default 8192)",
    )
    parser.add_argument("--bin-factor", type=int, default=2)
    parser.add_argument("--dense-frames", type=int, default=None, help="dense frames to count (default 128)")
    parser.add_argument("--dense-batch-size", type=int, default=32, help="dense frames per batch for process")
    parser.add_argument("--electrons", type=float, default=50.0, help="mean electrons per dense frame")
    parser.add_argument("--dpc-scan", type=int, default=256, help="DPC map is N x N (default 256)")
    parser.add_argument("--dpc-maps", type=int, default=None, help="maps per timed DPC run (default 20)")
    parser.add_argument("--repeat", type=int, default=None, help="timed runs of the beamops cases (default 11)")
    parser.add_argument("--stempy-repeat", type=int, default=None, help="timed runs of the stempy cases (default 7)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    quick = args.quick
    args.scan = args.scan or (128 if quick else 256)
    args.stempy_frames = args.stempy_frames or (2048 if quick else 8192)
    args.dense_frames = args.dense_frames or (32 if quick else 128)
    args.dpc_maps = args.dpc_maps or (5 if quick else 20)
    args.repeat = args.repeat or (3 if quick else 11)
    args.stempy_repeat = args.stempy_repeat or (2 if quick else 7)

    started = time.perf_counter()
    print(machine_line())
    print(f"stempy {version('stempy')}, numpy {np.__version__}, numba {version('numba')}")
    print(
        f"single-threaded; times in ms, best and median of {args.repeat} (beamops) / {args.stempy_repeat} (stempy) "
        "runs taken in turns;\nratio = stempy reference time per frame (map) / this row's: > 1x means beamops is "
        "faster; cpu/wall ~1.00 means one thread"
    )
    warm_up()
    results = []
    if "electron_count" in args.only:
        print(
            f"\n=== electron counting: {args.dense_frames} dense frames 576x576 uint16, "
            f"Poisson {args.electrons:g} electrons/frame on noise ==="
        )
        results.append(bench_electron_count(args))
    sparse = [k for k in ("virtual_images", "diffraction_sum", "bin_frames") if k in args.only]
    if sparse:
        scan = make_sparse_scan(args.scan, args.events, args.batch_size, args.seed)
        what = f"{args.scan}x{args.scan} scan, 576x576 frames, Poisson {args.events:g} events/frame"
        for name, fn, title in (
            ("virtual_images", bench_virtual_images, "virtual images (BF/ADF)"),
            ("diffraction_sum", bench_diffraction_sum, "summed diffraction pattern"),
            ("bin_frames", bench_bin_frames, f"binning by {args.bin_factor}"),
        ):
            if name in sparse:
                print(f"\n=== {title}: {what}, {scan.n_frames} frames, {len(scan.events):,} events ===")
                results.append(fn(scan, args))
        del scan
    if "dpc_phase" in args.only:
        print(f"\n=== DPC phase: {args.dpc_scan}x{args.dpc_scan} COM map, {args.dpc_maps} maps per run ===")
        results.append(bench_dpc_phase(args))
    print("\n=== summary: throughput and beamops / stempy (above 1x beamops is faster) ===")
    print(summary(results))
    print(f"\n(total {time.perf_counter() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
