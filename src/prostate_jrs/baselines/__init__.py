"""Classical registration baselines the networks are compared with."""

from __future__ import annotations

from prostate_jrs.baselines.elastix import ElastixResult, ElastixSettings, register_bspline, world_ddf_to_voxels
from prostate_jrs.baselines.pairs import BASELINES, PairScore, contour_box, score_baseline

__all__ = [
    "BASELINES",
    "ElastixResult",
    "ElastixSettings",
    "PairScore",
    "contour_box",
    "register_bspline",
    "score_baseline",
    "world_ddf_to_voxels",
]
