"""Scoring the classical baselines on a datalist pair exactly as the bundle's evaluation scores a network.

A pair of the project's dataset (docs/ARCHITECTURE.md, "Dataset on disk": planning CT, planning label map, daily
CT, daily label map, NIfTI) is registered by ``"identity"`` (the planning contours copied unchanged through the
scanners' shared world frame), ``"rigid"`` (moved by the rigid pre-alignment on bone only) or ``"elastix"``
(:func:`prostate_jrs.baselines.elastix.register_bspline` on the daily CT cropped around the planning contours, the
same box the network is given, starting from the same rigid pre-alignment the network's preprocessing uses: the
item's ``rigid`` record, else one on bone: :func:`prostate_jrs.rigid.recorded_or_on_bone`), and scored with
:func:`prostate_jrs.evaluation.case_metrics` on the daily CT's own grid: DSC, MSD and HD95 per structure of the
registration path, and the DDF's folding inside the crop.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from prostate_jrs.baselines.elastix import ElastixSettings, register_bspline
from prostate_jrs.evaluation import DailyGridResult, case_metrics, compose_rigid
from prostate_jrs.geometry import affine_transform, array_from_image, index_to_world, resample_with_ddf
from prostate_jrs.hounsfield import AIR_HU
from prostate_jrs.preprocessing import RIGID
from prostate_jrs.rigid import recorded_or_on_bone
from prostate_jrs.transforms import FIXED_IMAGE, FIXED_LABEL, MOVING_IMAGE, MOVING_LABEL, TRUE_DDF, case_name

__all__ = ["BASELINES", "PairScore", "contour_box", "score_baseline"]

#: Methods :func:`score_baseline` knows.
BASELINES = ("identity", "rigid", "elastix")


@dataclass(frozen=True)
class PairScore:
    """Metrics of one method on one pair.

    Attributes:
        rows: one row per structure of the registration path (keys as :func:`~prostate_jrs.evaluation.case_metrics`).
        ddf_row: DDF quality inside the crop (``folding_fraction``, ``jacobian_std``, ...) and, for items with a
            ground-truth ``ddf``, its error inside the body (``ddf_error_mean_mm``, ...).
        seconds: registration time (0 for identity).
    """

    rows: list[dict[str, object]]
    ddf_row: dict[str, object]
    seconds: float


def contour_box(daily: sitk.Image, planning_labels: sitk.Image, margin_mm: float) -> tuple[list[int], list[int]]:
    """Index box (start, size) of the daily grid around the planning contours plus ``margin_mm``, clipped to it.

    Raises:
        ValueError: if no planning contour falls on the daily grid.
    """
    on_daily = resample_with_ddf(planning_labels, daily, order=0)
    voxels = np.argwhere(on_daily > 0)
    if voxels.size == 0:
        raise ValueError("no planning contour falls on the daily CT; expected the pair to show the same pelvis")
    margin = np.ceil(margin_mm / np.asarray(daily.GetSpacing())).astype(int)
    start = np.maximum(voxels.min(axis=0) - margin, 0)
    stop = np.minimum(voxels.max(axis=0) + 1 + margin, np.asarray(daily.GetSize()))
    return [int(v) for v in start], [int(v) for v in stop - start]


def score_baseline(
    item: Mapping[str, Any],
    method: str,
    margin_mm: float = 70.0,
    settings: ElastixSettings | None = None,
) -> PairScore:
    """Register and score one datalist item with a classical method.

    Args:
        item: datalist item with absolute paths (``fixed_image``, ``moving_image``, ``moving_label``,
            ``fixed_label``; ``patient`` optional).
        method: ``"identity"``, ``"rigid"`` or ``"elastix"``.
        margin_mm: margin of the crop around the planning contours; the bundle's default input box is 70 mm (30 mm
            output margin plus the network's 20-voxel context at 2 mm).
        settings: elastix parameters; defaults to :class:`ElastixSettings`.

    Returns:
        The pair's metrics.

    Raises:
        ValueError: on an unknown method, or planning contours that miss the daily CT.
    """
    if method not in BASELINES:
        raise ValueError(f"unknown baseline {method!r}; expected one of {BASELINES}")
    daily = sitk.ReadImage(str(item[FIXED_IMAGE]), sitk.sitkFloat32)
    planning_labels = sitk.ReadImage(str(item[MOVING_LABEL]), sitk.sitkUInt8)
    reference = array_from_image(sitk.ReadImage(str(item[FIXED_LABEL]), sitk.sitkUInt8))
    start, size = contour_box(daily, planning_labels, margin_mm)
    box = tuple(slice(s, s + n) for s, n in zip(start, size, strict=True))
    fov = np.zeros(daily.GetSize(), dtype=bool)
    fov[box] = True
    ddf = np.zeros((3, *daily.GetSize()), dtype=np.float32)
    seconds = 0.0
    rigid = np.eye(4)
    if method != "identity":
        planning = sitk.ReadImage(str(item[MOVING_IMAGE]), sitk.sitkFloat32)
        rigid = recorded_or_on_bone(item.get(RIGID), daily, planning, str(item[FIXED_IMAGE]), RIGID).daily_to_planning
    if method == "elastix":
        crop = sitk.RegionOfInterest(daily, size, start)
        moving = sitk.Resample(planning, crop, affine_transform(rigid), sitk.sitkLinear, AIR_HU, sitk.sitkFloat32)
        result = register_bspline(crop, moving, settings)
        seconds = result.seconds  # without itk's one-off loading of its elastix wrappers (~20 s)
        # the crop shares the daily grid's spacing and axes, so its voxel displacement is the daily grid's
        ddf[(slice(None), *box)] = result.ddf
    ddf = compose_rigid(ddf, index_to_world(daily), rigid)  # relative to the planning file's own coordinates
    reg = resample_with_ddf(planning_labels, daily, ddf, order=0)
    daily_result = DailyGridResult(
        ddf=ddf, reg=reg, seg=np.zeros_like(reg), labels=reg, affine=index_to_world(daily), fov=fov
    )
    true_ddf = None
    if item.get(TRUE_DDF):  # phantom pairs know their deformation: NIfTI (I, J, K, 3) in daily voxel units
        true_ddf = np.moveaxis(array_from_image(sitk.ReadImage(str(item[TRUE_DDF]), sitk.sitkVectorFloat32)), -1, 0)
    name, patient = case_name(Path(item[FIXED_IMAGE])), item.get("patient", "")
    rows, ddf_row = case_metrics(
        daily_result, reference, name, patient, true_ddf=true_ddf, daily_ct=array_from_image(daily)
    )
    return PairScore([r for r in rows if r["path"] == "reg"], ddf_row, seconds)
