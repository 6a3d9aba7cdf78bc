"""numba.cuda variants of the COM kernels, and the cpu|cuda|auto device choice.

``com_sparse_cuda`` and ``com_dense_cuda`` take the arguments of
``transforms.com_partial.com_sparse_kernel`` and
``transforms.com_dense.com_dense_kernel`` (``ComCropParams.kernel_args()``
supplies the crop ones) and fill the same output arrays with the same values,
bit for bit:

* one thread block per frame; its threads stride over the frame's CSR event
  range (sparse) or over its pixels (dense, consecutive threads read
  consecutive uint16 pixels of a row, so the reads coalesce);
* every sum is an int64, reduced across the block in shared memory; integer
  addition is associative, so the order of the reduction cannot change a result;
* the crop follows the CPU kernels exactly: centre ``(cx, cy)`` or, when unset,
  the frame's own uncropped COM (``sum / count`` in float64, as on the CPU);
  box ``cx - wx < x <= cx + wx`` per axis; circle ``dx² + dy² <= r²``;
* the crop centre unset needs two passes over a frame (its uncropped COM, then
  the cropped sums); everything else is one pass. The dense crop visits only
  the window the CPU kernel visits.

The only floating-point expression that a GPU could evaluate differently is
the circle test: NVVM contracts ``dx * dx + dy * dy`` into a fused multiply-add
unless told not to (numba compiles with NVVM's default ``-fma=1``), and a fused
result can round the other way right at the rim. The test therefore uses
libdevice's ``dmul_rn``/``dadd_rn``, which are never contracted (checked with
NVVM 12.9 for sm_70: the plain expression compiles to ``fma.rn.f64``, these
kernels to ``mul.rn.f64``/``add.rn.f64`` and no FMA). Division
(``sum / count``), ``sqrt``, ``floor``/``ceil`` and int<->float conversions are
correctly rounded on the GPU, as on the CPU.

Importing this module needs no GPU: numba compiles a kernel at its first
launch. Without ``NUMBA_ENABLE_CUDASIM=1`` set before numba is first imported
the kernels need a CUDA GPU; with it they run in numba's (slow, pure Python)
simulator.
"""

from __future__ import annotations

import logging
import math
import sys
import threading
from typing import Any

import numpy as np
from numba import config as _numba_config
from numba import cuda

from beamops.operator import WorkerEnvironmentError
from transforms._crop_modes import BOX, CIRCLE, NO_CROP, crop_window

__all__ = [
    "BOX",
    "CIRCLE",
    "DENSE_THREADS",
    "DEVICES",
    "NO_CROP",
    "SPARSE_THREADS",
    "com_dense_cuda",
    "com_sparse_cuda",
    "cuda_available",
    "cuda_simulated",
    "resolve_device",
]

_log = logging.getLogger(__name__)

DEVICES = ("cpu", "cuda", "auto")

# Threads per block, powers of two (the tree reduction halves them). A sparse
# frame has tens to hundreds of events, so a small block keeps most of its
# threads busy; a dense frame has 10^4-10^5 pixels and wants a full block.
SPARSE_THREADS = 64
DENSE_THREADS = 128


def cuda_simulated() -> bool:
    """True when numba runs CUDA kernels in its simulator (NUMBA_ENABLE_CUDASIM=1 at import)."""
    return bool(_numba_config.ENABLE_CUDASIM)


def cuda_available() -> bool:
    """numba.cuda.is_available(), False on any error (True under the simulator)."""
    try:
        return bool(cuda.is_available())
    except Exception:
        return False


_logged_cpu_fallback = _logged_simulator = False


def resolve_device(device: str) -> str:
    """Map ``cpu``, ``cuda`` or ``auto`` to the device the kernels run on: ``"cpu"`` or ``"cuda"``.

    ``auto`` picks ``cuda`` when numba sees a GPU and ``cpu`` otherwise, logging
    that once per process. The simulator does not count as a GPU for ``auto``
    (it is orders of magnitude slower than the CPU kernels), but ``cuda`` uses it.
    ``cuda`` without a usable device raises WorkerEnvironmentError: the job fails, saying so,
    instead of sending every batch to dead letters.
    """
    global _logged_cpu_fallback, _logged_simulator
    if device not in DEVICES:
        raise ValueError(f"device must be one of {', '.join(DEVICES)}; got {device!r}")
    if device == "cpu":
        return "cpu"
    available = cuda_available()
    if device == "cuda":
        if not available:
            raise WorkerEnvironmentError(
                f"device='cuda' was requested but numba sees no CUDA GPU ({_cuda_error()}); "
                "use device='cpu' or device='auto'"
            )
        if cuda_simulated() and not _logged_simulator:
            _logged_simulator = True  # a 32x32 scan took minutes, and nothing said why
            _log.warning(
                "device='cuda' runs in numba's CUDA simulator (NUMBA_ENABLE_CUDASIM=1): each thread in Python, "
                "about a thousand times slower than the CPU kernels; for tests, not for data"
            )
        return "cuda"
    if available and not cuda_simulated():
        return "cuda"
    if not _logged_cpu_fallback:
        _logged_cpu_fallback = True
        reason = "only numba's CUDA simulator is enabled" if available else "no GPU is visible to numba"
        _log.info("device='auto': %s; the CPU kernels are used", reason)
    return "cpu"


def _cuda_error() -> str:
    try:
        error = cuda.cuda_error()
    except Exception as exc:
        error = exc
    return " ".join(str(error).split()) or "no further detail"


def _one_shared_array_per_simulated_block() -> None:
    """Make numba's simulator give every thread of a block the same ``cuda.shared.array``.

    The simulator creates a shared array when the first thread of a launch asks
    for it (``FakeCUDAShared.array``, keyed by the caller's file and line), with
    no lock between looking the key up and storing the new array. A thread
    switch there lets several threads of the first block create arrays of their
    own, and a block reduction over them reads uninitialised memory: frame 0's
    sums came out as garbage about once in a few test runs. On a GPU a block has
    one shared array; here the lookup and the store become one step. The
    simulator's blocks run one after another, so they may share the arrays.
    """
    from numba.core import types
    from numba.cuda.simulator.kernelapi import FakeCUDAShared
    from numba.np import numpy_support

    unlocked = FakeCUDAShared.array
    if getattr(unlocked, "one_per_block", False):
        return
    lock = threading.Lock()

    def array(self: Any, shape: Any, dtype: Any, *args: Any, **kwargs: Any) -> np.ndarray:
        if shape == 0 or args or kwargs:  # dynamic shared memory (made up front), or options left to numba
            return unlocked(self, shape, dtype, *args, **kwargs)
        caller = sys._getframe(1)
        key = (caller.f_code.co_filename, caller.f_lineno)
        with lock:
            found = self._allocations.get(key)
            if found is None:
                found = np.empty(shape, numpy_support.as_dtype(dtype) if isinstance(dtype, types.Type) else dtype)
                self._allocations[key] = found
        return found

    array.one_per_block = True  # type: ignore[attr-defined]
    FakeCUDAShared.array = array


# --- device functions --------------------------------------------------------------------------------------------

if cuda_simulated():
    _one_shared_array_per_simulated_block()

    @cuda.jit(device=True)
    def _dist2(dx, dy):
        # The simulator runs Python floats: IEEE binary64, never fused.
        return dx * dx + dy * dy

else:
    from numba.cuda import libdevice

    @cuda.jit(device=True, inline=True)
    def _dist2(dx, dy):
        # dmul_rn/dadd_rn are never contracted into an FMA, so this rounds as the CPU kernels do.
        return libdevice.dadd_rn(libdevice.dmul_rn(dx, dx), libdevice.dmul_rn(dy, dy))


@cuda.jit(device=True)
def _block_sum3(a, b, c, sh_a, sh_b, sh_c):
    """Sum three int64 values over the block (blockDim.x a power of two); every thread gets the sums."""
    t = cuda.threadIdx.x
    sh_a[t] = a
    sh_b[t] = b
    sh_c[t] = c
    cuda.syncthreads()
    s = cuda.blockDim.x // 2
    while s > 0:
        if t < s:
            sh_a[t] += sh_a[t + s]
            sh_b[t] += sh_b[t + s]
            sh_c[t] += sh_c[t + s]
        cuda.syncthreads()
        s //= 2
    ra = sh_a[0]
    rb = sh_b[0]
    rc = sh_c[0]
    cuda.syncthreads()  # everyone has read the result before the arrays are reused
    return ra, rb, rc


# The CPU dense kernel compiles the same window function.
_window = cuda.jit(device=True)(crop_window)


# --- kernels -----------------------------------------------------------------------------------------------------


@cuda.jit
def _com_sparse_gpu(events, offsets, frame_cols, mode, use_init, cx, cy, wx, wy, r2, sum_x, sum_y, counts):
    i = cuda.blockIdx.x
    t = cuda.threadIdx.x
    nt = cuda.blockDim.x
    sh_a = cuda.shared.array(SPARSE_THREADS, np.int64)
    sh_b = cuda.shared.array(SPARSE_THREADS, np.int64)
    sh_c = cuda.shared.array(SPARSE_THREADS, np.int64)
    start = offsets[i]
    stop = offsets[i + 1]
    n = stop - start
    # Every branch below is uniform across the block (it depends on the frame only), so
    # each thread reaches the same syncthreads() calls.
    if mode == NO_CROP or not use_init or n == 0:
        sx = 0
        sy = 0
        for k in range(start + t, stop, nt):
            # Exact integer split (the CPU kernel's float reciprocal gives the same row; on a
            # GPU the division is cheap next to copying the events to the device).
            e = np.int64(events[k])
            row = e // frame_cols
            sx += e - row * frame_cols
            sy += row
        sx, sy, _ = _block_sum3(sx, sy, 0, sh_a, sh_b, sh_c)
        if mode == NO_CROP or n == 0:
            if t == 0:
                sum_x[i] = sx
                sum_y[i] = sy
                counts[i] = n
            return
        ccx = sx / n
        ccy = sy / n
    else:
        ccx = cx
        ccy = cy
    kx = 0
    ky = 0
    kn = 0
    x_lo = ccx - wx
    x_hi = ccx + wx
    y_lo = ccy - wy
    y_hi = ccy + wy
    for k in range(start + t, stop, nt):
        e = np.int64(events[k])
        row = e // frame_cols
        col = e - row * frame_cols
        keep = (
            _dist2(col - ccx, row - ccy) <= r2
            if mode == CIRCLE
            else (col > x_lo) and (col <= x_hi) and (row > y_lo) and (row <= y_hi)
        )
        if keep:
            kx += col
            ky += row
            kn += 1
    kx, ky, kn = _block_sum3(kx, ky, kn, sh_a, sh_b, sh_c)
    if t == 0:
        sum_x[i] = kx
        sum_y[i] = ky
        counts[i] = kn


@cuda.jit
def _com_dense_gpu(frames, mode, use_init, cx, cy, wx, wy, r2, sum_x, sum_y, counts):
    i = cuda.blockIdx.x
    t = cuda.threadIdx.x
    nt = cuda.blockDim.x
    sh_a = cuda.shared.array(DENSE_THREADS, np.int64)
    sh_b = cuda.shared.array(DENSE_THREADS, np.int64)
    sh_c = cuda.shared.array(DENSE_THREADS, np.int64)
    rows = frames.shape[1]
    cols = frames.shape[2]
    if mode == NO_CROP or not use_init:
        sx = 0
        sy = 0
        total = 0
        # Thread t reads pixels t, t + nt, ... of the row-major frame: neighbouring
        # threads read neighbouring uint16s. The per-pixel integer division is kept for
        # simplicity: the wrappers copy every batch to the device, and moving 2 bytes a
        # pixel over PCIe costs more than the division (an estimate; no GPU measured it).
        for p in range(t, rows * cols, nt):
            r = p // cols
            c = p - r * cols
            v = np.int64(frames[i, r, c])
            sx += v * c
            sy += v * r
            total += v
        sx, sy, total = _block_sum3(sx, sy, total, sh_a, sh_b, sh_c)
        if mode == NO_CROP or total == 0:
            if t == 0:
                sum_x[i] = sx
                sum_y[i] = sy
                counts[i] = total
            return
        ccx = sx / total
        ccy = sy / total
    else:
        ccx = cx
        ccy = cy
    # Visit the CPU kernel's window only: the crop's bounding box, one pixel wider.
    if mode == CIRCLE:
        half_x = math.sqrt(r2)
        half_y = half_x
    else:
        half_x = wx
        half_y = wy
    r_lo, r_hi = _window(ccy, half_y, rows)
    c_lo, c_hi = _window(ccx, half_x, cols)
    width = c_hi - c_lo + 1
    height = r_hi - r_lo + 1
    n_pix = width * height if width > 0 and height > 0 else 0
    x_lo = ccx - wx
    x_hi = ccx + wx
    y_lo = ccy - wy
    y_hi = ccy + wy
    kx = 0
    ky = 0
    kn = 0
    for p in range(t, n_pix, nt):
        dr = p // width
        r = r_lo + dr
        c = c_lo + (p - dr * width)
        keep = (
            _dist2(c - ccx, r - ccy) <= r2
            if mode == CIRCLE
            else (r > y_lo) and (r <= y_hi) and (c > x_lo) and (c <= x_hi)
        )
        if keep:
            v = np.int64(frames[i, r, c])
            kx += v * c
            ky += v * r
            kn += v
    kx, ky, kn = _block_sum3(kx, ky, kn, sh_a, sh_b, sh_c)
    if t == 0:
        sum_x[i] = kx
        sum_y[i] = ky
        counts[i] = kn


# --- host wrappers -----------------------------------------------------------------------------------------------


def _launch(kernel: Any, threads: int, n: int, inputs: tuple[Any, ...], crop: tuple[Any, ...], outs: tuple) -> None:
    """Launch one block per frame and copy the three per-frame sums into ``outs``."""
    mode, use_init, cx, cy, wx, wy, r2 = crop
    device_outs = (cuda.device_array(n, np.float64), cuda.device_array(n, np.float64), cuda.device_array(n, np.int64))
    # Python scalars, so a kernel is compiled once rather than once per numpy scalar type.
    scalars = (int(mode), bool(use_init), float(cx), float(cy), float(wx), float(wy), float(r2))
    kernel[n, threads](*inputs, *scalars, *device_outs)
    for device_array, out in zip(device_outs, outs, strict=True):
        # The CPU kernels assign out[i] for i < n, casting; do the same for any output array.
        out[:n] = device_array.copy_to_host()


def com_sparse_cuda(
    events: np.ndarray,
    offsets: np.ndarray,
    frame_cols: int,
    mode: int,
    use_init: bool,
    cx: float,
    cy: float,
    wx: float,
    wy: float,
    r2: float,
    sum_x: np.ndarray,
    sum_y: np.ndarray,
    counts: np.ndarray,
) -> None:
    """GPU com_sparse_kernel: fill per-frame sums of column (x) and row (y) and event counts (CSR input)."""
    n = len(offsets) - 1
    if n <= 0:
        return
    inputs = (
        cuda.to_device(np.ascontiguousarray(events, dtype=np.uint32)),
        cuda.to_device(np.ascontiguousarray(offsets, dtype=np.int64)),
        int(frame_cols),
    )
    _launch(_com_sparse_gpu, SPARSE_THREADS, n, inputs, (mode, use_init, cx, cy, wx, wy, r2), (sum_x, sum_y, counts))


def com_dense_cuda(
    frames: np.ndarray,
    mode: int,
    use_init: bool,
    cx: float,
    cy: float,
    wx: float,
    wy: float,
    r2: float,
    sum_x: np.ndarray,
    sum_y: np.ndarray,
    counts: np.ndarray,
) -> None:
    """GPU com_dense_kernel: fill intensity-weighted sums of column (x) and row (y), and total intensity, per frame."""
    if frames.ndim != 3:
        raise ValueError(f"frames must have shape (n, rows, cols); got {frames.shape}")
    n = frames.shape[0]
    if n == 0:
        return
    # Copies the whole batch although a cropped pass with a given centre reads only its
    # windows: the copy is one contiguous transfer, and gathering windows on the host would cost more.
    inputs = (cuda.to_device(np.ascontiguousarray(frames, dtype=np.uint16)),)
    _launch(_com_dense_gpu, DENSE_THREADS, n, inputs, (mode, use_init, cx, cy, wx, wy, r2), (sum_x, sum_y, counts))
