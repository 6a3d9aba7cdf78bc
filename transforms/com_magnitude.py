"""com_magnitude: ComMap -> Image of the COM shift's length (and optionally its angle).

The shift is measured from a reference centre: the map's own mean (default,
so the image shows the beam's deflection across the scan) or a given
``center_x``/``center_y`` (detector column/row, px). NaN positions stay NaN.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field, model_validator

from beamops import ComMap, Image, OperatorParams, operator


class ComMagnitudeParams(OperatorParams):
    quantity: Literal["magnitude", "angle"] = Field(
        "magnitude", description="magnitude: shift length in px; angle: its direction in degrees (atan2 of y, x)."
    )
    center_x: float | None = Field(None, description="Reference column (px); unset: map mean.")
    center_y: float | None = Field(None, description="Reference row (px); unset: map mean.")

    @property
    def image_names(self) -> tuple[str, ...]:
        return (f"com_{self.quantity}",)

    @model_validator(mode="after")
    def _both_or_neither(self) -> ComMagnitudeParams:
        if (self.center_x is None) != (self.center_y is None):
            raise ValueError("set both center_x and center_y, or neither")
        return self


@operator(output_name="image", title="COM shift magnitude", output_description="Shift length (px) or angle (deg)")
def com_magnitude(com: ComMap, params: ComMagnitudeParams) -> Image:
    """Length (or direction) of each position's COM shift from a reference centre, x = column, y = row."""
    x = com.x.astype(np.float64)
    y = com.y.astype(np.float64)
    with np.errstate(invalid="ignore"):
        cx = np.nanmean(x) if params.center_x is None else params.center_x
        cy = np.nanmean(y) if params.center_y is None else params.center_y
    dx, dy = x - cx, y - cy
    if params.quantity == "magnitude":
        data, units = np.hypot(dx, dy), "px"
    else:
        data, units = np.degrees(np.arctan2(dy, dx)), "deg"
    return Image(
        com.header, params.image_names[0], data.astype(np.float32), units, com.frames_seen, com.final, com.complete
    )
