"""Crop modes and the dense crop window shared by the center-of-mass kernels (CPU and CUDA)."""

import math

NO_CROP, BOX, CIRCLE = 0, 1, 2


def crop_window(centre: float, half: float, size: int) -> tuple[int, int]:
    """The pixels a dense kernel visits on one axis for a crop of half-width ``half`` (px) around
    ``centre`` (px): floor(centre - half) - 1 .. ceil(centre + half) + 1, clipped to 0 .. size - 1
    (empty when first > last). One pixel wider each side, so rounding cannot drop a pixel; the exact
    crop test decides inside it.

    The float bounds are clamped to [-2, size + 1] first, which changes no clipped bound but keeps the
    float -> int conversion in range for a centre far outside the frame. Compiled by numba for the CPU
    and for CUDA, hence the plain ifs (numba's CUDA target mis-resolves max(float64, float64) in a
    device function) and int() around floor/ceil (float64 on the GPU).
    """
    lo = centre - half
    hi = centre + half
    if lo < -2.0:
        lo = -2.0
    elif lo > size + 1.0:
        lo = size + 1.0
    if hi < -2.0:
        hi = -2.0
    elif hi > size + 1.0:
        hi = size + 1.0
    first = int(math.floor(lo)) - 1  # noqa: RUF046 (a float64 on the GPU)
    if first < 0:
        first = 0
    last = int(math.ceil(hi)) + 1  # noqa: RUF046
    if last > size - 1:
        last = size - 1
    return first, last
