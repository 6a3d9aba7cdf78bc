"""Dense COM: com_dense_kernel frames/s and GB/s vs numpy and vs this machine's read bandwidth.

    python -m bench.dense_com            # 8 batches x 64 frames (340 MB) read 3x per run, 1 GiB bandwidth array
    python -m bench.dense_com --quick    # 4 batches, 1 pass, 256 MiB bandwidth array (< 1 minute)

Frames are uint16 576x576 (663,552 bytes each), in batches of 64 (42 MB); the
pool of batches is many times the 32 MB L3 cache, so every pass reads from
DRAM. The read bandwidth is measured in the same run, single-threaded, as the
best of: ``np.sum`` over a large uint64 array, and numba loops summing a large
uint64 and uint16 array. Everything here is single-threaded (numba loops,
numpy reductions; no BLAS).

Before timing, the dense kernel's sums are checked to equal the sparse
kernel's on the same frames (no crop, circle and box crops), and the numpy
baseline's to equal the dense kernel's.

Target (DESIGN.md section 5): the dense kernel (no crop) reads at >= 60% of
the measured read bandwidth.
"""

from __future__ import annotations

import argparse
import sys
from importlib.metadata import version

import numpy as np
from numba import njit

from beamops.simulate import ScanSimulation
from bench._common import machine_line, measure_interleaved, table, target_line
from transforms.com_dense import com_dense, com_dense_kernel
from transforms.com_partial import BOX, CIRCLE, NO_CROP, com_sparse_kernel

TARGET_PCT = 60.0
FRAME = (576, 576)


@njit(nogil=True, cache=False)
def _sum_u64(a: np.ndarray) -> int:
    s = 0
    for i in range(a.size):
        s += a[i]
    return s


@njit(nogil=True, cache=False)
def _sum_u16(a: np.ndarray) -> int:
    s = 0
    for i in range(a.size):
        s += np.int64(a[i])
    return s


def numpy_com(frames: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Numpy baseline, exact integer arithmetic: row and column sums, then first moments."""
    rows = frames.sum(axis=2, dtype=np.int64)  # (n, H)
    cols = frames.sum(axis=1, dtype=np.int64)  # (n, W)
    sx = cols @ np.arange(frames.shape[2], dtype=np.int64)
    sy = rows @ np.arange(frames.shape[1], dtype=np.int64)
    return sx.astype(np.float64), sy.astype(np.float64), rows.sum(axis=1)


def dense_pool(n_batches: int, batch_frames: int, events: float) -> list[np.ndarray]:
    """Distinct batches of simulated frames; the kernel's work does not depend on the values."""
    sim = ScanSimulation(scan_shape=(64, 64), frame_shape=FRAME, events_per_frame=events)
    return [sim.dense_batch(i % sim.n_batches(batch_frames), batch_frames).frames for i in range(n_batches)]


def kernel_args(mode: int) -> tuple[int, bool, float, float, float, float, float]:
    # crop centre (x=col 289.5, y=row 285.5), box half-widths 12/9, radius 16
    return (mode, mode != NO_CROP, 289.5, 285.5, 12.0, 9.0, 16.0**2)


def verify(batch_frames: int, events: float) -> list[str]:
    sim = ScanSimulation(scan_shape=(64, 64), frame_shape=FRAME, events_per_frame=events)
    sparse = sim.batch(1, batch_frames)
    frames = sim.dense_batch(1, batch_frames).frames
    n = sparse.n_frames
    lines = []
    for mode, name in ((NO_CROP, "no crop"), (CIRCLE, "circle r=16"), (BOX, "box 12x9")):
        d = np.empty(n), np.empty(n), np.empty(n, np.int64)
        s = np.empty(n), np.empty(n), np.empty(n, np.int64)
        com_dense_kernel(frames, *kernel_args(mode), *d)
        com_sparse_kernel(sparse.events, sparse.offsets, FRAME[1], *kernel_args(mode), *s)
        for label, a, b in zip(("sum_x", "sum_y", "counts"), d, s, strict=True):
            if not np.array_equal(a, b):
                raise AssertionError(f"dense != sparse kernel ({name}, {label})")
        lines.append(f"  verified {name}: dense kernel == sparse kernel on {n} frames ({int(s[2].sum())} events kept)")
    d = np.empty(n), np.empty(n), np.empty(n, np.int64)
    noisy = frames + np.random.default_rng(0).integers(0, 4000, frames.shape, dtype=np.uint16)
    com_dense_kernel(noisy, *kernel_args(NO_CROP), *d)
    for label, a, b in zip(("sum_x", "sum_y", "counts"), d, numpy_com(noisy), strict=True):
        if not np.array_equal(a, b):
            raise AssertionError(f"numpy baseline != dense kernel ({label})")
    lines.append("  verified: numpy baseline == dense kernel (no crop) on the same frames plus uniform noise 0..3999")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller pool, 1 pass, 3 repeats (< 1 minute)")
    parser.add_argument("--batch-frames", type=int, default=64, help="frames per batch (default 64)")
    parser.add_argument("--pool", type=int, default=None, help="distinct batches in memory (default 8, quick 4)")
    parser.add_argument("--passes", type=int, default=None, help="passes over the pool per timed run (default 3)")
    parser.add_argument("--repeat", type=int, default=None, help="timed runs (default 5, quick 3)")
    parser.add_argument("--bw-mib", type=int, default=None, help="bandwidth array size, MiB (default 1024)")
    parser.add_argument("--events", type=float, default=500.0, help="simulated events per frame")
    args = parser.parse_args(argv)
    quick = args.quick
    pool_n = args.pool or (4 if quick else 8)
    passes = args.passes or (1 if quick else 3)
    repeat = args.repeat or (3 if quick else 5)
    bw_bytes = (args.bw_mib or (256 if quick else 1024)) * 2**20

    print(machine_line())
    print(f"numpy {np.__version__}, numba {version('numba')}; single-threaded")
    print("\n".join(verify(args.batch_frames, args.events)))

    pool = dense_pool(pool_n, args.batch_frames, args.events)
    n_frames = pool_n * args.batch_frames * passes
    data_bytes = sum(b.nbytes for b in pool) * passes
    print(
        f"pool: {pool_n} batches x {args.batch_frames} frames of uint16 {FRAME[0]}x{FRAME[1]} = "
        f"{sum(b.nbytes for b in pool) / 1e6:.0f} MB (L3 is 32 MB); {passes} pass(es) per run = "
        f"{data_bytes / 1e9:.2f} GB, {n_frames} frames; best and median of {repeat} runs, all cases taken in turns"
    )

    outs = np.empty(args.batch_frames), np.empty(args.batch_frames), np.empty(args.batch_frames, np.int64)

    def run_kernel(mode: int) -> None:
        a = kernel_args(mode)
        for _ in range(passes):
            for frames in pool:
                com_dense_kernel(frames, *a, *outs)

    op = com_dense()
    from beamops.frames import DenseFrameBatch

    sim = ScanSimulation(scan_shape=(64, 64), frame_shape=FRAME)
    positions = np.arange(args.batch_frames, dtype=np.uint32) % sim.n_positions
    batches = [DenseFrameBatch(sim.header, f, positions, positions.astype(np.uint64)) for f in pool]

    def run_operator() -> None:
        for _ in range(passes):
            for b in batches:
                op.process(b)

    def run_numpy() -> None:
        for _ in range(passes):
            for frames in pool:
                numpy_com(frames)

    big64 = np.ones(bw_bytes // 8, np.uint64)
    big16 = np.ones(bw_bytes // 2, np.uint16)
    _sum_u64(big64[:16])
    _sum_u16(big16[:16])
    com_dense_kernel(pool[0][:2], *kernel_args(NO_CROP), *outs)  # JIT warm-up (also the crop modes)
    com_dense_kernel(pool[0][:2], *kernel_args(CIRCLE), *outs)

    bw_specs = [
        ("read bw: np.sum(uint64 array)", lambda: np.sum(big64)),
        ("read bw: numba loop sum(uint64 array)", lambda: _sum_u64(big64)),
        ("read bw: numba loop sum(uint16 array)", lambda: _sum_u16(big16)),
    ]
    specs = [
        ("com_dense_kernel, no crop", lambda: run_kernel(NO_CROP)),
        ("com_dense().process, no crop", run_operator),
        ("numpy sum(axis=2) + sum(axis=1) + int matmul", run_numpy),
        ("com_dense_kernel, circle crop (info)", lambda: run_kernel(CIRCLE)),
        ("com_dense_kernel, box crop (info)", lambda: run_kernel(BOX)),
    ]
    every = bw_specs + specs
    timings = measure_interleaved([fn for _, fn in every], [repeat] * len(every))
    bw_cases = [(name, t, bw_bytes) for (name, _), t in zip(bw_specs, timings, strict=False)]
    cases = [(name, t, data_bytes) for (name, _), t in zip(specs, timings[len(bw_specs) :], strict=True)]
    bw_best = max(nbytes / t.best for _, t, nbytes in bw_cases)
    bw_med = max(nbytes / t.median for _, t, nbytes in bw_cases)
    rows = []
    for name, t, nbytes in bw_cases:
        rows.append([name, t.best * 1e3, t.median * 1e3, "", "", nbytes / t.best / 1e9, nbytes / t.median / 1e9,
                     f"{nbytes / t.best / bw_best:.0%}", f"{nbytes / t.median / bw_med:.0%}"])  # fmt: skip
    for name, t, nbytes in cases:
        rows.append([name, t.best * 1e3, t.median * 1e3, n_frames / t.best, n_frames / t.median,
                     nbytes / t.best / 1e9, nbytes / t.median / 1e9,
                     f"{nbytes / t.best / bw_best:.0%}", f"{nbytes / t.median / bw_med:.0%}"])  # fmt: skip
    headers = ["case", "best ms", "median ms", "frames/s best", "frames/s med", "GB/s best", "GB/s med",
               "% bw best", "% bw med"]  # fmt: skip
    print(table(headers, rows))
    kern = cases[0][1]
    numpy_t = cases[2][1]
    print(
        f"  read bandwidth (best of the three methods): {bw_best / 1e9:.2f} GB/s best, {bw_med / 1e9:.2f} GB/s median"
    )
    print(target_line("dense kernel / read bandwidth, best", 100 * data_bytes / kern.best / bw_best, TARGET_PCT, "%"))
    print(
        target_line("dense kernel / read bandwidth, median", 100 * data_bytes / kern.median / bw_med, TARGET_PCT, "%")
    )
    print(f"  dense kernel / numpy baseline (median): {numpy_t.median / kern.median:.1f}x (info)")
    print(f"  4D Camera rate 87,000 frames/s: dense kernel runs at {n_frames / kern.median / 87e3:.2f}x of it (1 core)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
