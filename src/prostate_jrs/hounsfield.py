"""Hounsfield-unit levels that more than one module uses, defined once."""

from __future__ import annotations

__all__ = ["AIR_HU", "BODY_HU", "BODY_OUTLINE_HU"]

#: Air and gas; the fill value of every resampling of a CT outside the scan.
AIR_HU = -1000.0
#: A daily voxel above it is body: QA's and the evaluation's DDF statistics, the previews' crop.
BODY_HU = -500.0
#: Where planning systems draw the external (BODY) contour, about -300 to -500 HU; the phantom's BODY ROI and the
#: body found in a real CT use it.
BODY_OUTLINE_HU = -400.0
