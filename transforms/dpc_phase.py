"""dpc_phase: ComMap -> phase Image by Fourier integration, and a scan-rotation estimate.

The phase is computed with the same maths as ``stempy.image.phase_from_com``, the function
that interactEM's ``dpc`` operator calls. stempy 3.6.0 was read and cross-checked. Given
``com = ComMap.stacked() = [x, y]``, where x is the detector column and y the row, as from
``stempy.image.com_sparse``:

1. Rotate and optionally flip. ``t`` is ``theta`` in radians; this operator takes degrees, as
   interactEM's ``dpc`` does, and converts them::

       flip=False:  g0 = x cos t - y sin t      g1 = x sin t + y cos t
       flip=True:   g0 = x cos t + y sin t      g1 = x sin t - y cos t

   With ``flip`` the y component is negated before the rotation.
2. Integrate, treating ``g0`` as the phase gradient along scan rows (axis 0) and ``g1`` as the
   gradient along scan columns (axis 1). With ``ky = fftfreq(rows)`` and ``kx = fftfreq(cols)``::

       phase = Re ifft2[(ky F(g0) + kx F(g1)) / (2 pi i (kx^2 + ky^2) + reg)]

   The k = 0 term is set to 0, so the phase has zero mean. ``reg`` is added as it is in stempy
   (a real number added to an imaginary denominator). It damps and phase-shifts the frequencies
   with ``2 pi k^2 <~ reg``. ``reg = 0`` is exact integration of a periodic, curl-free field.

Note the axis quirk this inherits. In stempy's integration the first stacked component is the
gradient along scan *rows*, but in a ComMap the first component is the detector *column*. A
detector whose axes are aligned with the scan (``x = d phase / d col``, ``y = d phase / d row``)
therefore needs ``flip=True, theta=90``, a swap of the two components. The rotation and flip
therefore also absorb this swap, which may be why interactEM's defaults are ``flip=True,
theta=-9``. These defaults are kept here, so an interactEM pipeline gives the same image. The
result is not quantitative, like stempy's (detector px x scan steps), so ``units`` is "a.u.".

NaN positions of a map (positions with no events yet, in a progressive map) are replaced by the
mean of the map's finite values along that axis before integrating, like com_reduce's
``replace_nans``. A map with no finite value is an error (a dead letter).

:func:`estimate_rotation` picks the ``theta`` and ``flip`` in the same convention. It chooses
them so that the rotated field ``(g0, g1)`` has the smallest RMS curl ``d g1/d row - d g0/d col``.
An electrostatic DPC field is curl-free; this is the idea of LiberTEM's ``guess_corrections``.
Its result can be passed to ``dpc_phase`` unchanged.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

import numpy as np
from pydantic import Field

from beamops import ComMap, Image, operator
from beamops.operator import OperatorParams

PHASE_UNITS = "a.u."
# estimate_rotation's default coarse grid, degrees.
DEFAULT_ANGLES = np.arange(-180.0, 180.0, 0.5)
# Smallest scan the curl and divergence stencils work on (central differences need a neighbour each side).
_MIN_SCAN_SIDE = 3


class DpcPhaseParams(OperatorParams):
    flip: bool = Field(
        True,
        title="Flip",
        description=(
            "Negate the COM y (row) component before rotating (stempy's flip). "
            "With theta=90 this maps a scan-aligned detector onto stempy's axes."
        ),
    )
    theta: float = Field(
        -9.0,
        ge=-360.0,
        le=360.0,
        title="Theta (degrees)",
        description="Degrees by which the COM vector is rotated before integrating (stempy's theta, in radians).",
    )
    reg: float = Field(
        0.1,
        ge=0.0,
        title="Regularization",
        description="Added to the denominator 2*pi*i*k^2 of the Fourier integration, as in stempy; 0 = exact.",
    )

    @property
    def image_names(self) -> tuple[str, ...]:
        return ("phase",)


def _finite_xy(com: ComMap) -> tuple[np.ndarray, np.ndarray]:
    """x and y as float64 with NaNs replaced by the mean of that axis's finite values."""
    out = []
    for axis, values in (("x", com.x), ("y", com.y)):
        a = np.asarray(values, np.float64)
        finite = np.isfinite(a)
        if not finite.any():
            raise ValueError(f"ComMap of scan {com.scan_number}: COM {axis} has no finite value to integrate")
        if not finite.all():
            a = np.where(finite, a, a[finite].mean())
        out.append(a)
    return out[0], out[1]


def rotate_com(x: np.ndarray, y: np.ndarray, theta: float, flip: bool) -> tuple[np.ndarray, np.ndarray]:
    """stempy's rotation and flip of (x = column, y = row), theta in degrees.

    Returns ``(g0, g1)``: the phase gradient along scan rows and along scan columns, in
    stempy's integration.
    """
    t = np.deg2rad(theta)
    c, s = np.cos(t), np.sin(t)
    if flip:
        return x * c + y * s, x * s - y * c
    return x * c - y * s, x * s + y * c


def integrate_gradient(g0: np.ndarray, g1: np.ndarray, reg: float = 0.0) -> np.ndarray:
    """stempy's Fourier integration: g0 = d phase / d row, g1 = d phase / d col; zero-mean float64."""
    rows, cols = g0.shape
    ky = np.fft.fftfreq(rows)[:, None]
    kx = np.fft.fftfreq(cols)[None, :]
    numerator = ky * np.fft.fft2(g0) + kx * np.fft.fft2(g1)
    denominator = 2j * np.pi * (kx**2 + ky**2) + reg
    numerator[0, 0] = 0
    denominator[0, 0] = 1
    return np.real(np.fft.ifft2(numerator / denominator))


def phase_from_com(com: ComMap, theta: float = -9.0, flip: bool = True, reg: float = 0.1) -> np.ndarray:
    """The DPC phase (float64, scan shape) of a ComMap. Same as stempy on ``com.stacked()``, theta in degrees.

    NaNs are replaced by the per-axis mean of the finite values first.
    """
    x, y = _finite_xy(com)
    g0, g1 = rotate_com(x, y, theta, flip)
    return integrate_gradient(g0, g1, reg)


@operator(
    title="DPC phase",
    output_name="image",
    input_description="Center of mass map (x = column, y = row)",
    output_description="DPC phase image 'phase' over the scan, arbitrary units",
)
def dpc_phase(com: ComMap, params: DpcPhaseParams) -> Image:
    """Differential phase contrast: integrate a COM map to a phase image, like stempy's phase_from_com.

    The COM is rotated by theta (degrees) and optionally flipped, then integrated in Fourier space
    with regularization reg. Progressive maps give progressive images (final and complete are
    copied). NaN positions are replaced by the map's mean along that axis first.
    """
    phase = phase_from_com(com, params.theta, params.flip, params.reg)
    return Image(
        header=com.header,
        name=params.image_names[0],
        data=phase.astype(np.float32),
        units=PHASE_UNITS,
        frames_seen=com.frames_seen,
        final=com.final,
        complete=com.complete,
    )


# --- scan rotation and flip from the curl of the COM field -------------------------------


class RotationEstimate(NamedTuple):
    """The ``theta`` (degrees, in [-180, 180)) and ``flip`` to pass to dpc_phase, and the RMS curl they leave."""

    theta: float
    flip: bool
    curl_rms: float


def _xy_of(com: ComMap | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(com, ComMap):
        x, y = com.x, com.y
    else:
        x, y = np.asarray(com)
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    if x.ndim != 2 or x.shape != y.shape or min(x.shape) < _MIN_SCAN_SIDE:
        raise ValueError(f"need x and y maps of one 2-D shape, at least 3 x 3; got {x.shape} and {y.shape}")
    return x, y


def _d_row(a: np.ndarray) -> np.ndarray:
    """Central difference along scan rows, on the interior positions."""
    return (a[2:, 1:-1] - a[:-2, 1:-1]) / 2


def _d_col(a: np.ndarray) -> np.ndarray:
    """Central difference along scan columns, on the interior positions."""
    return (a[1:-1, 2:] - a[1:-1, :-2]) / 2


def _curl_basis(x: np.ndarray, y: np.ndarray, flip: bool) -> tuple[np.ndarray, np.ndarray]:
    """Maps A, B with curl(theta) = cos(theta) A + sin(theta) B (interior positions).

    The rotation is linear in (x, y), so the curl d g1/d row - d g0/d col of the rotated field
    is a combination of the four derivatives of x and y.
    """
    xr, xc, yr, yc = _d_row(x), _d_col(x), _d_row(y), _d_col(y)
    if flip:  # g0 = x c + y s, g1 = x s - y c
        return -(yr + xc), xr - yc
    return yr - xc, xr + yc  # g0 = x c - y s, g1 = x s + y c


class _CurlQuadratic:
    """Mean squared curl as a function of theta: a quadratic form in (cos, sin), O(1) per angle."""

    def __init__(self, x: np.ndarray, y: np.ndarray, flip: bool) -> None:
        a, b = _curl_basis(x, y, flip)
        valid = np.isfinite(a) & np.isfinite(b)
        if not valid.any():
            raise ValueError("no scan position has finite COM neighbours; cannot compute the curl")
        a, b = a[valid], b[valid]
        self.aa, self.ab, self.bb = float(np.mean(a * a)), float(np.mean(a * b)), float(np.mean(b * b))

    def rms(self, theta_deg: np.ndarray) -> np.ndarray:
        t = np.deg2rad(np.asarray(theta_deg, np.float64))
        c, s = np.cos(t), np.sin(t)
        return np.sqrt(np.maximum(self.aa * c * c + 2 * self.ab * c * s + self.bb * s * s, 0.0))


def curl_rms(com: ComMap | np.ndarray, theta: float, flip: bool) -> float:
    """RMS curl (px per scan step) of the COM field rotated as dpc_phase would rotate it.

    ``com`` is a ComMap or a stacked ``[x, y]`` array. Central differences over interior positions;
    positions whose stencil touches a NaN are left out.
    """
    x, y = _xy_of(com)
    return float(_CurlQuadratic(x, y, flip).rms(np.asarray(theta)))


def _divergence_skew(x: np.ndarray, y: np.ndarray, theta: float, flip: bool) -> float:
    """Third central moment of the divergence d g0/d row + d g1/d col of the rotated field."""
    g0, g1 = rotate_com(x, y, theta, flip)
    div = _d_row(g0) + _d_col(g1)
    div = div[np.isfinite(div)]
    return float(np.mean((div - div.mean()) ** 3)) if div.size else 0.0


def _wrap(theta: float) -> float:
    """theta in [-180, 180)."""
    return float((theta + 180.0) % 360.0 - 180.0)


def estimate_rotation(
    com: ComMap | np.ndarray,
    flips: Iterable[bool] = (False, True),
    angles: np.ndarray | Iterable[float] = DEFAULT_ANGLES,
    *,
    resolve_polarity: bool = True,
) -> RotationEstimate:
    """The ``(theta, flip, curl_rms)`` for dpc_phase that make the COM field curl-free.

    The search is coarse to fine. For each flip, the RMS curl is evaluated on ``angles`` (degrees).
    It is then refined around the best angle on grids ten times finer each time, down to 1e-6
    degrees. This is cheap because the mean squared curl is a quadratic form in
    (cos theta, sin theta). The flip with the lower minimum wins. Positions whose stencil
    touches a NaN are left out.

    The curl cannot tell theta from theta + 180: that only negates the field, and so the phase.
    With ``resolve_polarity`` the angle is chosen so that the divergence of the rotated field has
    a negative skew. This is LiberTEM's argument: electrons are deflected towards the atoms, so
    the divergence is sharply negative at atom columns and the phase has positive peaks there.
    The returned angle may then lie outside ``angles`` (it is the grid's best + 180, wrapped). The
    flip is ambiguous for a field that varies along one direction only, because the mirror image
    of such a field is curl-free too.
    """
    x, y = _xy_of(com)
    grid = np.unique(np.asarray(list(angles) if not isinstance(angles, np.ndarray) else angles, np.float64))
    flips = tuple(bool(f) for f in flips)
    if grid.size == 0 or not flips:
        raise ValueError("estimate_rotation needs at least one angle and one flip")
    step = float(np.min(np.diff(grid))) if grid.size > 1 else 0.0
    best: RotationEstimate | None = None
    for flip in flips:
        curl = _CurlQuadratic(x, y, flip)
        values = curl.rms(grid)
        theta = float(grid[np.argmin(values)])
        window = step
        while window > 1e-6:
            fine = np.linspace(theta - window, theta + window, 21)
            theta = float(fine[np.argmin(curl.rms(fine))])
            window /= 10
        candidate = RotationEstimate(theta, flip, float(curl.rms(np.asarray(theta))))
        if best is None or candidate.curl_rms < best.curl_rms:
            best = candidate
    assert best is not None
    theta = best.theta
    if resolve_polarity and _divergence_skew(x, y, theta, best.flip) > 0:
        theta += 180.0
    return RotationEstimate(_wrap(theta), best.flip, best.curl_rms)
