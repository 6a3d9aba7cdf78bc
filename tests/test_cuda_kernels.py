"""The numba.cuda COM kernels equal the CPU kernels bit for bit; cpu|cuda|auto device choice.

numba's CUDA simulator is chosen when numba is first imported (NUMBA_ENABLE_CUDASIM=1),
and this pytest process has imported numba long before. So the comparisons run in
subprocesses: this file run as a script, ``python tests/test_cuda_kernels.py sparse|dense``,
compares transforms._cuda_kernels with the CPU kernels on every case of CASES and prints
one JSON line; a module-scoped fixture starts the sparse and the dense run at once (the
simulator runs a thread per GPU thread, so it is slow: keep the data small) and the
tests read their case from it. Where numba sees a real GPU the same comparison also
runs there, without the simulator.

The data: simulated frames (ScanSimulation, 64x72 px, ~100 events, more events than a
sparse block has threads), an empty frame, a frame whose crop keeps nothing (two
opposite corners: the centre of mass lies between them), and frames with a pixel on
every box edge and on the circle's rim (3-4-5 triangles at radius 5), around both the
given centre and the frame's own centre of mass. Dense frames add full-range uint16
values, so int64 accumulation is exercised. Crops wider than int64 are checked against
the CPU sparse kernel instead: the CPU dense kernel overflows its window there.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
KINDS = ("sparse", "dense")
FRAME_SHAPE = (64, 72)  # rows, cols: not square, so a row/column mix-up cannot cancel
CENTRE = (36.0, 31.0)  # x = column, y = row; integer, so events land exactly on the crop edges
CROPS = {
    "no_crop": {},
    "box": {"crop_to_x": 5.0, "crop_to_y": 4.0},
    "circle": {"crop_radius": 5.0},
}
CASES = [f"{crop}-{centre}" for crop in CROPS for centre in ("centre_given", "centre_unset")]
SUBPROCESS_TIMEOUT_S = 240


# --- the subprocess side -------------------------------------------------------------------------------------------


def _params(case: str):
    from transforms.com_partial import ComCropParams

    crop, centre = case.split("-")
    given = {"init_center_x": CENTRE[0], "init_center_y": CENTRE[1]} if centre == "centre_given" else {}
    return ComCropParams(**CROPS[crop], **given)


def _square(half: int) -> tuple:
    """Rows and columns of every pixel within ``half`` of CENTRE (a square, so its own COM is CENTRE)."""
    import numpy as np

    rows, cols = np.mgrid[-half : half + 1, -half : half + 1]
    return (rows.ravel() + int(CENTRE[1])).astype(np.int64), (cols.ravel() + int(CENTRE[0])).astype(np.int64)


def _sparse_frames():
    """(events, offsets): simulated frames plus the special ones, as one CSR batch."""
    import numpy as np

    from beamops.simulate import ScanSimulation

    rows, cols = FRAME_SHAPE
    sim = ScanSimulation(
        scan_shape=(2, 2), frame_shape=FRAME_SHAPE, events_per_frame=100.0, disc_radius=12.0, shift_amplitude=6.0
    )
    batch = sim.batch(0, 2)
    simulated = [batch.events[batch.offsets[k] : batch.offsets[k + 1]] for k in range(batch.n_frames)]
    assert min(len(f) for f in simulated) > 64, "want more events than a sparse block has threads"
    sq_rows, sq_cols = _square(7)  # covers the box (5, 4) edges and the circle (r = 5) rim
    empty = np.zeros(0, np.uint32)
    corners = np.array([0, (rows - 1) * cols + cols - 1], np.uint32)  # COM mid-frame, no event near it
    square = (sq_rows * cols + sq_cols).astype(np.uint32)
    frames = [simulated[0], empty, corners, square, simulated[1], empty]
    offsets = np.zeros(len(frames) + 1, np.int64)
    np.cumsum([len(f) for f in frames], out=offsets[1:])
    return np.concatenate(frames).astype(np.uint32), offsets


def _dense_frames():
    """uint16 (n, rows, cols): simulated frames plus the special ones."""
    import numpy as np

    from beamops.simulate import ScanSimulation

    sim = ScanSimulation(
        scan_shape=(2, 2), frame_shape=FRAME_SHAPE, events_per_frame=100.0, disc_radius=12.0, shift_amplitude=6.0
    )
    simulated = sim.dense_batch(0, 2).frames
    zeros = np.zeros(FRAME_SHAPE, np.uint16)
    corners = zeros.copy()
    corners[0, 0] = corners[-1, -1] = 65535
    full_range = np.random.default_rng(7).integers(0, 65536, size=FRAME_SHAPE, dtype=np.uint16)
    square = zeros.copy()
    square[_square(7)] = 65535  # own COM exactly CENTRE, pixels on every crop edge
    return np.stack([simulated[0], zeros, corners, full_range, square, simulated[1]])


def _huge_crops(com_dense_cuda, com_sparse_kernel) -> dict:
    """Crops wider than int64 (valid ComCropParams) keep the whole frame.

    The CPU dense kernel converts its window bounds to int64 unclamped and returns
    zeros here; the CUDA one clamps first. So this compares with the CPU sparse kernel
    (no window) on the same pixels: a frame of ones is one event per pixel.
    """
    import numpy as np

    from transforms.com_partial import ComCropParams

    rows, cols = 8, 8
    frames = np.ones((1, rows, cols), np.uint16)
    events = np.arange(rows * cols, dtype=np.uint32)
    offsets = np.array([0, rows * cols], np.int64)
    crops = {
        "huge_box": {"crop_to_x": 1e300, "crop_to_y": 1e300},
        "huge_box_far_centre": {"crop_to_x": 1e300, "crop_to_y": 1e300, "init_center_x": 1e300, "init_center_y": 3.0},
        "huge_circle": {"crop_radius": 1e150},
    }
    results = {}
    for name, crop in crops.items():
        params = ComCropParams(**crop)
        want = np.full(1, np.nan), np.full(1, np.nan), np.full(1, -1, np.int64)
        got = np.full(1, np.nan), np.full(1, np.nan), np.full(1, -1, np.int64)
        com_sparse_kernel(events, offsets, cols, *params.kernel_args(), *want)
        com_dense_cuda(frames, *params.kernel_args(), *got)
        mismatches = [
            f"{label}: dense cuda {g.tolist()} != sparse cpu {w.tolist()}"
            for label, w, g in zip(("sum_x", "sum_y", "counts"), want, got, strict=True)
            if not np.array_equal(g, w)
        ]
        results[name] = {"mismatches": mismatches, "kept": int(want[2][0])}
    return results


def _compare(kind: str) -> dict:
    """Run the CPU and the CUDA kernel of ``kind`` on every case; a JSON-able report."""
    import numpy as np

    from transforms import _cuda_kernels
    from transforms.com_dense import com_dense_kernel
    from transforms.com_partial import com_sparse_kernel

    if kind == "sparse":
        events, offsets = _sparse_frames()
        n = len(offsets) - 1

        def cpu(args, out):
            com_sparse_kernel(events, offsets, FRAME_SHAPE[1], *args, *out)

        def gpu(args, out):
            _cuda_kernels.com_sparse_cuda(events, offsets, FRAME_SHAPE[1], *args, *out)

    else:
        frames = _dense_frames()
        n = len(frames)

        def cpu(args, out):
            com_dense_kernel(frames, *args, *out)

        def gpu(args, out):
            _cuda_kernels.com_dense_cuda(frames, *args, *out)

    def outputs():
        # Sentinels: an entry the kernel forgot to write cannot pass.
        return np.full(n, np.nan), np.full(n, np.nan), np.full(n, -1, np.int64)

    cases = {}
    for case in CASES:
        args = _params(case).kernel_args()
        want, got = outputs(), outputs()
        cpu(args, want)
        start = time.perf_counter()
        gpu(args, got)
        seconds = time.perf_counter() - start
        mismatches = [
            f"{name}: cuda {g.tolist()} ({g.dtype}) != cpu {w.tolist()} ({w.dtype})"
            for name, w, g in zip(("sum_x", "sum_y", "counts"), want, got, strict=True)
            if g.dtype != w.dtype or not np.array_equal(g, w)
        ]
        cases[case] = {
            "mismatches": mismatches,
            "seconds": round(seconds, 3),
            "kept": int(want[2].sum()),
            "frames_keeping_nothing": int((want[2] == 0).sum()),
        }
    if kind == "dense":
        cases.update(_huge_crops(_cuda_kernels.com_dense_cuda, com_sparse_kernel))
    # A batch without frames launches nothing and leaves the outputs alone.
    untouched = np.full(2, np.nan), np.full(2, np.nan), np.full(2, -1, np.int64)
    if kind == "sparse":
        _cuda_kernels.com_sparse_cuda(
            np.zeros(0, np.uint32), np.zeros(1, np.int64), FRAME_SHAPE[1], *_params(CASES[0]).kernel_args(), *untouched
        )
    else:
        _cuda_kernels.com_dense_cuda(
            np.zeros((0, *FRAME_SHAPE), np.uint16), *_params(CASES[0]).kernel_args(), *untouched
        )
    return {
        "simulated": _cuda_kernels.cuda_simulated(),
        "resolve_device": {d: _cuda_kernels.resolve_device(d) for d in ("cpu", "cuda", "auto")},
        "no_frames_untouched": bool(np.isnan(untouched[0]).all() and (untouched[2] == -1).all()),
        "cases": cases,
    }


def _switch_threads_in_every_simulated_allocation() -> None:
    """Let another simulated GPU thread run while the simulator allocates a shared array.

    Without transforms._cuda_kernels' lock around the simulator's shared arrays,
    two threads of the first block then always create an array each, and the
    comparisons below fail on frame 0 every time instead of once in a few runs.
    """
    import types

    import numpy as np
    from numba.cuda.simulator import kernelapi

    def empty(*args, **kwargs):
        time.sleep(0.001)  # gives up the GIL, as an expiring switch interval can right there
        return np.empty(*args, **kwargs)

    slow_numpy = types.ModuleType("numpy_with_a_slow_empty")
    slow_numpy.__getattr__ = lambda name: getattr(np, name)  # everything else is numpy's (PEP 562)
    slow_numpy.empty = empty
    kernelapi.np = slow_numpy


def main(argv: list[str]) -> None:
    (kind,) = argv
    if kind not in KINDS:
        raise SystemExit(f"usage: python {Path(__file__).name} {'|'.join(KINDS)}")
    # The simulator's block manager polls its threads for syncthreads(); with Python's
    # default 5 ms switch interval most of a launch is spent waiting for the GIL.
    sys.setswitchinterval(1e-3)
    if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
        _switch_threads_in_every_simulated_allocation()
    start = time.perf_counter()
    report = _compare(kind)
    report["seconds"] = round(time.perf_counter() - start, 3)
    print(json.dumps(report))


# --- the pytest side -----------------------------------------------------------------------------------------------


def _start(kind: str, simulate: bool) -> subprocess.Popen:
    env = dict(os.environ)
    env.pop("NUMBA_ENABLE_CUDASIM", None)
    if simulate:
        env["NUMBA_ENABLE_CUDASIM"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    return subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), kind],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _collect(procs: dict[str, subprocess.Popen]) -> dict[str, dict]:
    reports = {}
    for kind, proc in procs.items():
        try:
            out, err = proc.communicate(timeout=SUBPROCESS_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            pytest.fail(f"{kind} comparison took over {SUBPROCESS_TIMEOUT_S} s\n{err[-4000:]}")
        if proc.returncode != 0:
            pytest.fail(f"{kind} comparison failed (exit {proc.returncode}):\n{err[-4000:]}")
        reports[kind] = json.loads(out.strip().splitlines()[-1])
    return reports


def _cuda_available_here() -> bool:
    from transforms._cuda_kernels import cuda_available

    return cuda_available()


@pytest.fixture(scope="module", params=["simulator", pytest.param("gpu", marks=pytest.mark.gpu)])
def reports(request) -> dict[str, dict]:
    simulate = request.param == "simulator"
    if not simulate and not _cuda_available_here():
        pytest.fail("the gpu tests need a CUDA GPU visible to numba; deselect them with -m 'not gpu'")
    # Both kinds at once: each subprocess is one busy interpreter.
    return _collect({kind: _start(kind, simulate) for kind in KINDS})


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("case", CASES)
def test_cuda_kernel_equals_cpu_kernel(reports, kind, case):
    result = reports[kind]["cases"][case]
    assert not result["mismatches"], "\n".join(result["mismatches"])


@pytest.mark.parametrize("case", ["huge_box", "huge_box_far_centre", "huge_circle"])
def test_dense_cuda_keeps_the_frame_under_a_crop_wider_than_int64(reports, case):
    result = reports["dense"]["cases"][case]
    assert result["kept"] > 0
    assert not result["mismatches"], "\n".join(result["mismatches"])


def test_comparison_data_covers_the_edge_cases(reports):
    for kind in KINDS:
        cases = reports[kind]["cases"]
        for crop in ("box", "circle"):
            for centre in ("centre_given", "centre_unset"):
                result = cases[f"{crop}-{centre}"]
                assert result["kept"] > 0, (kind, crop, centre)
                # The empty frame(s) and the two-corner frame keep nothing.
                assert result["frames_keeping_nothing"] >= 2, (kind, crop, centre)
        assert reports[kind]["no_frames_untouched"], kind


def test_subprocess_device_choice(reports):
    for report in reports.values():
        if report["simulated"]:
            # The simulator serves device="cuda" but is no reason for "auto" to leave the CPU kernels.
            assert report["resolve_device"] == {"cpu": "cpu", "cuda": "cuda", "auto": "cpu"}
        else:
            assert report["resolve_device"] == {"cpu": "cpu", "cuda": "cuda", "auto": "cuda"}


# --- resolve_device in this process ---------------------------------------------------------------------------------


@pytest.fixture
def kernels(monkeypatch):
    from transforms import _cuda_kernels

    monkeypatch.setattr(_cuda_kernels, "_logged_cpu_fallback", False)
    return _cuda_kernels


def test_auto_without_gpu_is_cpu_and_logs_once(kernels, monkeypatch, caplog):
    if kernels.cuda_available():
        monkeypatch.setattr(kernels, "cuda_available", lambda: False)
    caplog.set_level(logging.INFO, logger=kernels.__name__)
    assert kernels.resolve_device("auto") == "cpu"
    assert kernels.resolve_device("auto") == "cpu"
    records = [r for r in caplog.records if r.name == kernels.__name__]
    assert len(records) == 1
    assert records[0].levelno == logging.INFO
    message = records[0].getMessage()
    assert "no GPU" in message and "CPU kernels" in message


def test_auto_with_gpu_is_cuda(kernels, monkeypatch, caplog):
    monkeypatch.setattr(kernels, "cuda_available", lambda: True)
    monkeypatch.setattr(kernels, "cuda_simulated", lambda: False)
    caplog.set_level(logging.INFO, logger=kernels.__name__)
    assert kernels.resolve_device("auto") == "cuda"
    assert kernels.resolve_device("cuda") == "cuda"
    assert not [r for r in caplog.records if r.name == kernels.__name__]


def test_auto_under_the_simulator_is_cpu(kernels, monkeypatch, caplog):
    monkeypatch.setattr(kernels, "cuda_available", lambda: True)
    monkeypatch.setattr(kernels, "cuda_simulated", lambda: True)
    monkeypatch.setattr(kernels, "_logged_cpu_fallback", False)
    monkeypatch.setattr(kernels, "_logged_simulator", False)
    caplog.set_level(logging.INFO, logger=kernels.__name__)
    assert kernels.resolve_device("auto") == "cpu"
    assert kernels.resolve_device("cuda") == kernels.resolve_device("cuda") == "cuda"
    auto, cuda = [r for r in caplog.records if r.name == kernels.__name__]  # each said once
    assert "simulator" in auto.getMessage() and auto.levelno == logging.INFO
    # A 32x32 scan on device='cuda' under the simulator took minutes, and nothing said why.
    assert cuda.levelno == logging.WARNING and "about a thousand times slower" in cuda.getMessage()


def test_cuda_without_gpu_raises(kernels, monkeypatch):
    if kernels.cuda_available():
        monkeypatch.setattr(kernels, "cuda_available", lambda: False)
    with pytest.raises(RuntimeError, match=r"device='cuda'.*no CUDA GPU"):
        kernels.resolve_device("cuda")


def test_cpu_is_cpu(kernels, caplog):
    caplog.set_level(logging.INFO, logger=kernels.__name__)
    assert kernels.resolve_device("cpu") == "cpu"
    assert not caplog.records


@pytest.mark.parametrize("bad", ["gpu", "CPU", "", "cuda:0", None])
def test_bad_device_raises(kernels, bad):
    with pytest.raises(ValueError, match="cpu, cuda, auto"):
        kernels.resolve_device(bad)


def test_cuda_available_is_false_on_error(kernels, monkeypatch):
    def broken():
        raise OSError("driver exploded")

    monkeypatch.setattr(kernels.cuda, "is_available", broken)
    assert kernels.cuda_available() is False


if __name__ == "__main__":
    main(sys.argv[1:])
