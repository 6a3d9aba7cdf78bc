"""electron_count: dense detector frames -> electron events (DenseFrameBatch -> SparseFrameBatch).

The rule is stempy's (``stempy.image.electron_count``, checked against the
stempy 3.6.0 source and output), applied to each frame:

1. ``v = (frame - dark) * (1 / gain)`` per pixel, in float32. ``gain`` is a
   per-pixel gain map and the signal is *divided* by it: stempy's Python API
   inverts the map and its C++ multiplies, and so does this kernel.
2. Keep ``background < v < xray``; every other pixel becomes 0.
3. An event is a pixel whose thresholded value is strictly greater than the
   thresholded values of its 8 neighbours (neighbours outside the frame are
   ignored). One electron spreads its charge over a few pixels; this makes it
   one event, at its brightest pixel. Two equal neighbouring maxima are both
   rejected, as in stempy.

Thresholds (``threshold_mode``):

* ``absolute``: ``background_threshold`` and ``xray_threshold`` are values of
  ``v`` (stempy's ``electron_count_frame``).
* ``sigma``: they are multiples of the noise, estimated from the frames as
  stempy's ``electron_count`` does: a Gaussian fitted to the histogram of ``v``
  (unit bins) gives the noise peak (mean ``mu``, width ``sigma``), and the
  plain mean and standard deviation of all values give the X-ray cut::

      background = mu + background_threshold * sigma
      xray       = mean + xray_threshold * std

  stempy estimates them once per scan from 40 randomly drawn frames; a
  stateless operator sees one batch, so they are estimated from each batch's
  own frames (deterministic for a given batch; one 576 x 576 frame already
  holds 3e5 samples). :func:`estimate_thresholds` is the estimator.

Differences from stempy, on purpose: stempy's no-gain path stores
``frame - dark`` in the uint16 frame (truncating, and wrapping negative values
around to ~65535, which its X-ray cut then removes); here ``v`` is float32
always, which equals stempy's gain path bit for bit and its no-gain path
whenever the dark reference holds whole numbers. stempy's threshold estimate
fails ("cannot create std::vector larger than max_size()") when dark-subtracted
values go negative, which they do for half the noise of a well-subtracted
frame; this estimator does not. It fits the noise peak with Guo's weighted
log-parabola (the bins within 10% of the peak height), not stempy's
Levenberg-Marquardt over all bins, and labels a bin by its centre.

Calibration files: ``dark_reference`` and ``gain`` are paths to ``.npy``
files of shape frame_shape, loaded once per worker process (cached by path,
reloaded when the file changes). A path that exists where the pipeline is
built is checked then; one that does not (a mount seen only by workers) is
checked by the first batch, and a failure sends the batch to dead letters.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Literal

import numpy as np
from numba import njit
from pydantic import Field, ValidationInfo, field_validator, model_validator

from beamops import DenseFrameBatch, OperatorParams, SparseFrameBatch, operator

# Histogram of the sigma-mode estimator: unit bins over mean +- HIST_HALF_SPAN_STD * std,
# wider bins only if that would exceed MAX_BINS.
HIST_HALF_SPAN_STD = 8.0
MAX_BINS = 1 << 16
# Bins at least this fraction of the peak height are fitted (about +-2.1 sigma).
PEAK_FRACTION = 0.1


class ElectronCountParams(OperatorParams):
    dark_reference: str | None = Field(
        None,
        title="Dark reference",
        description=(
            "Path of a .npy dark reference (mean dark frame, shape frame_shape), subtracted from every frame. "
            "Unset: no subtraction."
        ),
    )
    gain: str | None = Field(
        None,
        title="Gain map",
        description=(
            "Path of a .npy per-pixel gain map (shape frame_shape, finite, >= 0); the dark-subtracted value is "
            "divided by it, as stempy does (a gain of 0 masks the pixel). Unset: gain 1."
        ),
    )
    threshold_mode: Literal["sigma", "absolute"] = Field(
        "sigma",
        title="Threshold mode",
        description=(
            "sigma: thresholds are multiples of the noise estimated from each batch, as stempy's electron_count "
            "(background = noise mean + n * noise sigma, X-ray = mean + n * std); absolute: thresholds are values."
        ),
    )
    background_threshold: float = Field(
        4.0,
        title="Background threshold",
        description="Pixels must exceed it: n sigmas of the noise (sigma mode) or a value (absolute mode).",
    )
    xray_threshold: float = Field(
        10.0,
        title="X-ray threshold",
        description=(
            "Pixels must stay below it: n standard deviations above the mean of all pixels (sigma mode, "
            "stempy's default 10) or a value (absolute mode)."
        ),
    )

    @field_validator("dark_reference", "gain")
    @classmethod
    def _npy_path(cls, path: str | None, info: ValidationInfo) -> str | None:
        if path is None:
            return None
        if not path.endswith(".npy"):
            raise ValueError(f"must be the path of a .npy file, got {path!r}")
        if os.path.exists(path):  # checked now when visible here; else by the workers
            load_calibration(path, "gain" if info.field_name == "gain" else "dark", None)
        return path

    @model_validator(mode="after")
    def _window(self) -> ElectronCountParams:
        if self.xray_threshold <= self.background_threshold:
            raise ValueError(
                f"xray_threshold ({self.xray_threshold}) must be above background_threshold "
                f"({self.background_threshold}), else no pixel can be counted"
            )
        if self.gain is not None and self.gain == self.dark_reference:
            raise ValueError("dark_reference and gain are the same file")
        return self


class CalibrationError(ValueError):
    """A dark reference or gain map that cannot be used."""


def load_calibration(path: str, kind: Literal["dark", "gain"], frame_shape: tuple[int, int] | None) -> np.ndarray:
    """The float32 dark reference, or the inverse gain, at ``path``; loaded once per process.

    Cached by (path, modification time, size): a rewritten file is loaded again.
    """
    try:
        stat = os.stat(path)
    except OSError as exc:
        raise CalibrationError(f"cannot read {kind} file {path!r}: {exc}") from exc
    array = _load_cached(path, kind, stat.st_mtime_ns, stat.st_size)
    if frame_shape is not None and array.shape != tuple(frame_shape):
        raise CalibrationError(f"{kind} file {path!r} has shape {array.shape}, but the frames are {tuple(frame_shape)}")
    return array


@functools.lru_cache(maxsize=16)
def _load_cached(path: str, kind: str, _mtime_ns: int, _size: int) -> np.ndarray:
    try:
        raw = np.load(path, allow_pickle=False)
    except Exception as exc:
        raise CalibrationError(f"cannot load {kind} file {path!r}: {type(exc).__name__}: {exc}") from exc
    if raw.ndim != 2 or raw.dtype.kind not in "uif" or raw.size == 0:
        raise CalibrationError(f"{kind} file {path!r} must hold a 2-D numeric array, got {raw.dtype} {raw.shape}")
    if not np.isfinite(raw).all():
        raise CalibrationError(f"{kind} file {path!r} holds NaN or infinite values")
    if kind == "gain":
        if (raw < 0).any():
            raise CalibrationError(f"gain file {path!r} holds negative values")
        with np.errstate(divide="ignore"):
            # stempy: gain = np.power(gain, -1) cast to float32; a gain of 0 gives inf (never counted)
            # In float32 for a float32 map (stempy's own arithmetic), else in float64.
            array = np.power(raw if raw.dtype == np.float32 else raw.astype(np.float64), -1).astype(np.float32)
    else:
        array = raw.astype(np.float32)
    array.setflags(write=False)  # shared by every batch of the process
    return array


@functools.lru_cache(maxsize=16)
def _identity(frame_shape: tuple[int, int], value: float) -> np.ndarray:
    array = np.full(frame_shape, value, np.float32)
    array.setflags(write=False)
    return array


# --- kernels ----------------------------------------------------------------------


@njit(cache=True, nogil=True)
def electron_count_kernel(
    frames: np.ndarray,
    dark: np.ndarray,
    inv_gain: np.ndarray,
    background: float,
    xray: float,
    offsets: np.ndarray,
) -> np.ndarray:
    """Events (flat ``row * cols + col``) of every frame, back to back; fills ``offsets`` (n + 1).

    ``frames`` (n, rows, cols) uint16; ``dark`` and ``inv_gain`` (rows, cols) float32.
    """
    n, rows, cols = frames.shape
    # Thresholded frame with a -inf border: every value beats the border, so a
    # pixel on the edge is compared with its in-frame neighbours only.
    t = np.full((rows + 2, cols + 2), -np.inf, np.float32)
    # Two maxima are never neighbours: at most one per 2 x 2 block.
    per_frame_max = ((rows + 1) // 2) * ((cols + 1) // 2)
    events = np.empty(per_frame_max + 64 * n, np.uint32)
    k = 0
    offsets[0] = 0
    zero = np.float32(0.0)
    for i in range(n):
        for r in range(rows):
            for c in range(cols):
                v = (np.float32(frames[i, r, c]) - dark[r, c]) * inv_gain[r, c]
                keep = (v > background) & (v < xray)
                t[r + 1, c + 1] = v if keep else zero
        if len(events) - k < per_frame_max:
            grown = np.empty(2 * len(events) + per_frame_max, np.uint32)
            grown[:k] = events[:k]
            events = grown
        for r in range(1, rows + 1):
            up = t[r - 1]
            mid = t[r]
            down = t[r + 1]
            base = (r - 1) * cols - 1
            for c in range(1, cols + 1):
                v = mid[c]
                is_max = (
                    (v > up[c - 1])
                    & (v > up[c])
                    & (v > up[c + 1])
                    & (v > mid[c - 1])
                    & (v > mid[c + 1])
                    & (v > down[c - 1])
                    & (v > down[c])
                    & (v > down[c + 1])
                )
                # Branchless: always write, advance only on an event.
                events[k] = base + c
                k += is_max
        offsets[i + 1] = k
    return events[:k].copy()


@njit(cache=True, nogil=True)
def _value_stats(frames: np.ndarray, dark: np.ndarray, inv_gain: np.ndarray) -> tuple[float, float, float, float]:
    """(mean, sample std, min, max) of the corrected values ``(frame - dark) * inv_gain``."""
    n, rows, cols = frames.shape
    total = 0.0
    lo = np.inf
    hi = -np.inf
    for i in range(n):
        for r in range(rows):
            for c in range(cols):
                v = np.float64((np.float32(frames[i, r, c]) - dark[r, c]) * inv_gain[r, c])
                total += v
                lo = min(lo, v)
                hi = max(hi, v)
    count = n * rows * cols
    mean = total / count
    squares = 0.0
    for i in range(n):
        for r in range(rows):
            for c in range(cols):
                d = np.float64((np.float32(frames[i, r, c]) - dark[r, c]) * inv_gain[r, c]) - mean
                squares += d * d
    std = np.sqrt(squares / (count - 1)) if count > 1 else 0.0
    return mean, std, lo, hi


@njit(cache=True, nogil=True)
def _histogram(
    frames: np.ndarray, dark: np.ndarray, inv_gain: np.ndarray, first_center: float, width: float, hist: np.ndarray
) -> None:
    """Counts of the corrected values in bins of ``width`` centred on ``first_center + j * width``."""
    n, rows, cols = frames.shape
    nbins = len(hist)
    inv_width = 1.0 / width
    for i in range(n):
        for r in range(rows):
            for c in range(cols):
                v = np.float64((np.float32(frames[i, r, c]) - dark[r, c]) * inv_gain[r, c])
                j = int(np.floor((v - first_center) * inv_width + 0.5))
                if 0 <= j < nbins:
                    hist[j] += 1


# --- thresholds -------------------------------------------------------------------


@dataclass(frozen=True)
class Thresholds:
    """What the sigma-mode estimator found in one batch (values of ``v``)."""

    background: float
    xray: float
    mean: float
    std: float
    noise_mean: float
    noise_sigma: float


def fit_noise_peak(centers: np.ndarray, hist: np.ndarray) -> tuple[float, float]:
    """(mean, sigma) of the Gaussian noise peak of a histogram.

    Guo's weighted log-parabola fit over the contiguous bins around the highest
    one that reach PEAK_FRACTION of its height (at least the peak and its two
    neighbours, when they hold counts). A peak one bin wide gives sigma 0.
    """
    peak = int(np.argmax(hist))
    floor = PEAK_FRACTION * hist[peak]

    def include(j: int) -> bool:  # the peak's neighbours always (if not empty), further bins above the floor
        return 0 <= j < len(hist) and hist[j] > 0 and (abs(j - peak) == 1 or hist[j] >= floor)

    lo = peak
    while include(lo - 1):
        lo -= 1
    hi = peak
    while include(hi + 1):
        hi += 1
    x = centers[lo : hi + 1] - centers[peak]
    h = hist[lo : hi + 1].astype(np.float64)
    if len(h) < 3:
        return float(centers[peak]), 0.0
    design = np.stack([h, h * x, h * x * x], axis=1)
    (_, b, c), *_ = np.linalg.lstsq(design, h * np.log(h), rcond=None)
    if not c < 0:  # no peak shape: fall back to the moments of the selected bins
        mean = float(np.average(x, weights=h))
        return float(centers[peak]) + mean, float(np.sqrt(np.average((x - mean) ** 2, weights=h)))
    return float(centers[peak] - b / (2 * c)), float(np.sqrt(-1.0 / (2 * c)))


def estimate_thresholds(
    frames: np.ndarray, dark: np.ndarray, inv_gain: np.ndarray, background_n_sigma: float, xray_n_sigma: float
) -> Thresholds:
    """stempy's sigma thresholds estimated from ``frames``: see the module docstring."""
    mean, std, vmin, vmax = _value_stats(frames, dark, inv_gain)
    lo = max(vmin, mean - HIST_HALF_SPAN_STD * std)
    hi = min(vmax, mean + HIST_HALF_SPAN_STD * std)
    width = max(1.0, (hi - lo) / (MAX_BINS - 2))
    first_center = np.floor(lo / width) * width
    nbins = int(np.floor((hi - first_center) / width + 0.5)) + 1
    hist = np.zeros(nbins, np.int64)
    _histogram(frames, dark, inv_gain, first_center, width, hist)
    centers = first_center + width * np.arange(nbins)
    noise_mean, noise_sigma = fit_noise_peak(centers, hist)
    return Thresholds(
        background=noise_mean + background_n_sigma * noise_sigma,
        xray=mean + xray_n_sigma * std,
        mean=mean,
        std=std,
        noise_mean=noise_mean,
        noise_sigma=noise_sigma,
    )


def calibration(batch: DenseFrameBatch, params: ElectronCountParams) -> tuple[np.ndarray, np.ndarray]:
    """(dark, inverse gain) for ``batch``'s frame shape, float32 (zeros / ones when unset)."""
    shape = tuple(batch.header.frame_shape)
    dark = (
        _identity(shape, 0.0)
        if params.dark_reference is None
        else load_calibration(params.dark_reference, "dark", shape)
    )
    inv_gain = _identity(shape, 1.0) if params.gain is None else load_calibration(params.gain, "gain", shape)
    return dark, inv_gain


def thresholds_for(
    batch: DenseFrameBatch, params: ElectronCountParams, dark: np.ndarray, inv_gain: np.ndarray
) -> tuple[float, float]:
    """(background, xray) values of ``v`` used for ``batch``."""
    if params.threshold_mode == "absolute" or batch.n_frames == 0:
        return params.background_threshold, params.xray_threshold
    found = estimate_thresholds(batch.frames, dark, inv_gain, params.background_threshold, params.xray_threshold)
    return found.background, found.xray


@operator(
    output_name="frames",
    title="Electron counting",
    input_description="Dense uint16 detector frames",
    output_description="Electron events (one per electron, at its brightest pixel)",
)
def electron_count(batch: DenseFrameBatch, params: ElectronCountParams) -> SparseFrameBatch:
    """Count electrons in dense frames: dark subtraction, gain, background and X-ray thresholds, local maxima.

    See the module docstring for the rule (stempy's) and the thresholds.
    """
    frames = batch.frames
    if frames.dtype != np.uint16 or frames.shape != (batch.n_frames, *batch.header.frame_shape):
        raise ValueError(
            f"dense frames must be uint16 of shape ({batch.n_frames}, *{batch.header.frame_shape}), "
            f"got {frames.dtype} {frames.shape}"
        )
    dark, inv_gain = calibration(batch, params)
    background, xray = thresholds_for(batch, params, dark, inv_gain)
    offsets = np.empty(batch.n_frames + 1, np.int64)
    events = electron_count_kernel(frames, dark, inv_gain, float(background), float(xray), offsets)
    return SparseFrameBatch(
        batch.header, events, offsets, batch.scan_positions, batch.frame_numbers, origin=batch.origin
    )
