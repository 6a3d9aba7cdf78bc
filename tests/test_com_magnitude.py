"""com_magnitude on a known shift field."""

from __future__ import annotations

import numpy as np
import pytest

from beamops import ComMap, FrameHeader, OperatorParameterError
from beamops.testing import ScanSimulation, run_operator
from transforms.com_magnitude import com_magnitude


def _map() -> ComMap:
    sim = ScanSimulation(scan_shape=(6, 8))
    x, y = sim.expected_com()
    x[0, 0] = np.nan
    header = FrameHeader(scan_number=1, scan_shape=(6, 8), frame_shape=(576, 576))
    return ComMap(header, x.astype(np.float32), y.astype(np.float32), 48, 48, True, True)


def test_magnitude_and_angle_of_the_shift() -> None:
    com = _map()
    result = run_operator(com_magnitude(center_x=287.5, center_y=287.5), [com])
    (image,) = result.outputs
    want = np.hypot(com.x.astype(np.float64) - 287.5, com.y.astype(np.float64) - 287.5)
    np.testing.assert_allclose(image.data, want, rtol=1e-6, equal_nan=True)
    assert (image.name, image.units, image.final) == ("com_magnitude", "px", True)
    angle = com_magnitude(quantity="angle").process(com)
    dx, dy = com.x - np.nanmean(com.x), com.y - np.nanmean(com.y)
    np.testing.assert_allclose(angle.data, np.degrees(np.arctan2(dy, dx)), atol=1e-3, equal_nan=True)
    assert np.isnan(angle.data[0, 0]) and angle.units == "deg"


def test_a_half_given_centre_is_rejected() -> None:
    with pytest.raises(OperatorParameterError, match="center"):
        com_magnitude(center_x=3.0)
