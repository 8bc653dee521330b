"""The network's input on the model grid: one implementation for the bundle (training, evaluation, inference) and app.

For a pair (planning CT + planning label map, daily CT) and its rigid pre-alignment ``R`` (daily-frame point ->
planning-frame point, LPS mm; :class:`prostate_jrs.rigid.RigidAlignment`):

1. :func:`model_grid`: the grid the network predicts on, in the daily frame: the daily CT's axes reoriented to RAS,
   isotropic ``spacing``, the bounding box of the planning contours mapped into the daily frame by ``R^-1``, plus
   ``margin_mm``, clipped to the daily CT's extent less the context border (but not into the contours' box);
2. :func:`grown`: that grid plus the network's context border (valid convolutions consume it), so filled with the
   daily scan's anatomy wherever the scan reaches far enough;
3. :func:`model_inputs`: one interpolation per volume with SimpleITK onto the grown grid: the daily CT (linear) and
   its label map if any (nearest), the planning CT (linear) and planning labels (nearest) through ``R``; air
   (-1000 HU) or background outside the scans; HU scaled from ``[hu_min, hu_max]`` to ``[-1, 1]`` and clipped.

The app's pipeline (:func:`prostate_jrs.pipeline.run_pipeline`) calls :func:`model_inputs` on the volumes it read
from DICOM; the bundle's configs call :class:`prostate_jrs.transforms.ModelGridd`, which calls it on the NIfTI files
of a datalist item (after ``LoadImaged``) with the item's recorded ``rigid`` (``prostate-jrs import`` and ``synth``
record it), so the same pair gives the network the same input in training, evaluation, inference and the app. This
module needs numpy and SimpleITK only (no torch: ``prostate-jrs import``'s worker processes start fast).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from prostate_jrs.errors import PreprocessingError
from prostate_jrs.geometry import affine_transform, array_from_image, array_view, index_to_world, label_box
from prostate_jrs.hounsfield import AIR_HU

__all__ = [
    "DAILY_TO_PLANNING",
    "LPS_RAS",
    "RIGID",
    "ModelInputs",
    "PreprocessingError",
    "box_corners",
    "grown",
    "model_grid",
    "model_inputs",
    "ras_affine",
    "ras_direction",
    "ras_map",
    "scale_hu",
]

#: Datalist key of an item's rigid pre-alignment record (:meth:`prostate_jrs.rigid.RigidAlignment.to_record`).
RIGID = "rigid"
#: Key of the item's ``R`` after :class:`prostate_jrs.transforms.ModelGridd`: float64 tensor ``(4, 4)``, LPS.
DAILY_TO_PLANNING = "daily_to_planning"

LPS_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
"""Maps LPS world points (DICOM, SimpleITK) to RAS ones (NIfTI, MONAI) and back (it is its own inverse)."""


def ras_direction(daily: sitk.Image) -> np.ndarray:
    """Daily direction cosines with axes permuted and flipped to point R, A, S (LPS world), as ``Orientationd``."""
    direction = np.asarray(daily.GetDirection(), dtype=np.float64).reshape(3, 3)
    targets = np.diag([-1.0, -1.0, 1.0])  # R, A, S in LPS coordinates
    columns, used = [], set()
    for t in range(3):
        dots = targets[:, t] @ direction
        order = [a for a in np.argsort(-np.abs(dots)) if a not in used]
        axis = int(order[0])
        used.add(axis)
        columns.append(direction[:, axis] * np.sign(dots[axis] or 1.0))
    return np.stack(columns, axis=1)


def box_corners(image: sitk.Image, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """World points (N, 3) of the corners of the index box ``[lo, hi]`` of ``image``."""
    corners = np.array([[x, y, z, 1.0] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])
    return (index_to_world(image) @ corners.T).T[:, :3]


def model_grid(
    daily_ct: sitk.Image,
    planning_labels: np.ndarray,
    planning_grid: sitk.Image,
    daily_to_planning: np.ndarray,
    spacing: float,
    margin_mm: float,
    context_mm: float = 0.0,
) -> sitk.Image:
    """The network's grid in the daily frame: RAS axes, isotropic ``spacing``, around the planning contours.

    The grid is the contours' bounding box plus ``margin_mm``, clipped to the daily CT's extent shrunk by
    ``context_mm``, so that the network's context border around it shows the daily scan, not air beyond its ends;
    but never clipped into the contours' box itself (within the daily CT): there the border may reach past the scan.
    A daily scan shorter than contours + margin + border (common along the couch axis) would otherwise show the
    network air on a face it never saw in training, and its DDF folds there.

    Args:
        daily_ct: the daily CT.
        planning_labels: planning label map ``(I, J, K)`` on ``planning_grid``.
        planning_grid: the planning CT (its geometry).
        daily_to_planning: ``R``.
        spacing: model voxel size (mm).
        margin_mm: margin around the contours' bounding box.
        context_mm: the network's context border (mm) to keep inside the daily CT where the contours allow.

    Returns:
        A uint8 image with the grid's geometry, inside the daily CT's extent.

    Raises:
        PreprocessingError: if the planning map has no contour, or the contours do not overlap the daily CT after
            the rigid alignment.
    """
    direction = ras_direction(daily_ct)
    contours = _contours_along(direction, planning_labels, planning_grid, daily_to_planning)
    contour_lo, contour_hi = contours.min(axis=0) - margin_mm, contours.max(axis=0) + margin_mm
    size = np.asarray(daily_ct.GetSize(), dtype=np.float64)
    daily_corners = box_corners(daily_ct, np.zeros(3), size - 1) @ direction
    daily_lo, daily_hi = daily_corners.min(axis=0), daily_corners.max(axis=0)
    box_lo = np.minimum(np.maximum(contour_lo, daily_lo + context_mm), np.maximum(contour_lo + margin_mm, daily_lo))
    box_hi = np.maximum(np.minimum(contour_hi, daily_hi - context_mm), np.minimum(contour_hi - margin_mm, daily_hi))
    if np.any(box_hi - box_lo < spacing):
        raise PreprocessingError(
            "after the rigid alignment the planning contours lie outside the daily CT (contours span "
            f"{np.round(contour_lo + margin_mm, 1).tolist()} to {np.round(contour_hi - margin_mm, 1).tolist()} mm, "
            f"daily CT {np.round(daily_lo, 1).tolist()} to {np.round(daily_hi, 1).tolist()} mm along R, A, S); "
            "check that both scans are of the same patient and the daily scan covers the pelvis"
        )
    # a box clipped to the daily extent is often a whole number of voxels: round-off must not drop the last one
    shape = [int(n) for n in np.floor((box_hi - box_lo) / spacing + 1e-6).astype(int) + 1]
    grid = sitk.Image(shape, sitk.sitkUInt8)
    grid.SetSpacing([float(spacing)] * 3)
    grid.SetDirection(direction.ravel().tolist())
    grid.SetOrigin((direction @ box_lo).tolist())
    return grid


def _contours_along(
    direction: np.ndarray, planning_labels: np.ndarray, planning_grid: sitk.Image, daily_to_planning: np.ndarray
) -> np.ndarray:
    """Corners (8, 3) of the planning contours' voxel box, placed in the daily frame by ``R^-1``, along the axes of
    ``direction`` (mm).

    Raises:
        PreprocessingError: if the planning map has no contour.
    """
    # label_box: per-axis projections, not every labelled voxel's index (np.argwhere); a fraction of the time on a
    # full-resolution planning map
    box = label_box(np.asarray(planning_labels) > 0)
    if box is None:
        raise PreprocessingError("the planning label map is empty: no planning contour to place the model grid on")
    lo = np.array([axis.start for axis in box], dtype=np.float64) - 0.5
    hi = np.array([axis.stop for axis in box], dtype=np.float64) - 0.5
    planning_to_daily = np.linalg.inv(daily_to_planning)
    corners = box_corners(planning_grid, lo, hi)
    corners = (planning_to_daily[:3, :3] @ corners.T).T + planning_to_daily[:3, 3]
    return corners @ direction


def grown(grid: sitk.Image, voxels: int) -> sitk.Image:
    """``grid`` extended by ``voxels`` on every side (same spacing and axes)."""
    bigger = sitk.Image([n + 2 * voxels for n in grid.GetSize()], grid.GetPixelID())
    bigger.SetSpacing(grid.GetSpacing())
    bigger.SetDirection(grid.GetDirection())
    bigger.SetOrigin(grid.TransformContinuousIndexToPhysicalPoint([-float(voxels)] * 3))
    return bigger


def scale_hu(hu: np.ndarray, hu_min: float, hu_max: float) -> np.ndarray:
    """HU mapped linearly from ``[hu_min, hu_max]`` to ``[-1, 1]`` and clipped, as float32."""
    scaled = (np.asarray(hu, dtype=np.float32) - hu_min) / (hu_max - hu_min) * 2.0 - 1.0
    return np.clip(scaled, -1.0, 1.0).astype(np.float32)


@dataclass
class ModelInputs:
    """A pair on the model grid.

    Attributes:
        grid: the model grid (a uint8 image; only its geometry means anything): where the network predicts.
        context_grid: ``grid`` grown by ``context_voxels`` on every side: what the network reads.
        image: float32 ``(3, *context shape)``: daily CT and planning CT scaled to [-1, 1], planning label map.
        daily_hu: float32 ``(*context shape)``: the daily CT in HU.
        daily_labels: float32 ``(*context shape)`` daily label map, or ``None`` when not given.
        context_voxels: the border width.
    """

    grid: sitk.Image
    context_grid: sitk.Image
    image: np.ndarray
    daily_hu: np.ndarray
    daily_labels: np.ndarray | None
    context_voxels: int

    @property
    def inner(self) -> tuple[slice, slice, slice]:
        """Index of ``grid`` inside ``context_grid`` (spatial axes)."""
        b = self.context_voxels
        return tuple(slice(b, b + n) for n in self.grid.GetSize())  # type: ignore[return-value]


def _resample(image: sitk.Image, grid: sitk.Image, transform: sitk.Transform, label: bool) -> np.ndarray:
    interpolator, default = (sitk.sitkNearestNeighbor, 0.0) if label else (sitk.sitkLinear, AIR_HU)
    return array_from_image(sitk.Resample(image, grid, transform, interpolator, default, sitk.sitkFloat32))


def model_inputs(
    daily_ct: sitk.Image,
    planning_ct: sitk.Image,
    planning_labels: sitk.Image,
    daily_to_planning: np.ndarray,
    *,
    spacing: float,
    margin_mm: float,
    context_voxels: int,
    hu_min: float = -1000.0,
    hu_max: float = 1000.0,
    daily_labels: sitk.Image | None = None,
) -> ModelInputs:
    """Put a pair on its model grid: the network's input (see the module docstring).

    Args:
        daily_ct: daily CT in HU.
        planning_ct: planning CT in HU.
        planning_labels: planning label map (0..4) on the planning CT's grid.
        daily_to_planning: ``R``, 4x4 (LPS mm).
        spacing: model voxel size (mm).
        margin_mm: margin around the planning contours.
        context_voxels: context border of the network (``(patch - output) / 2``).
        hu_min: HU mapped to -1.
        hu_max: HU mapped to +1.
        daily_labels: the daily label map on the daily CT's grid (training and evaluation), if any.

    Returns:
        The grids and arrays.

    Raises:
        PreprocessingError: if the planning contours do not reach the daily CT after the rigid alignment.
    """
    # a view, not a transposed copy of the full-resolution planning map: only its contours' box is needed
    grid = model_grid(
        daily_ct,
        array_view(planning_labels),
        planning_labels,
        daily_to_planning,
        spacing,
        margin_mm,
        context_voxels * spacing,
    )
    context = grown(grid, context_voxels)
    to_planning = affine_transform(daily_to_planning)
    daily_hu = _resample(daily_ct, context, sitk.Transform(), label=False)
    planning_hu = _resample(planning_ct, context, to_planning, label=False)
    planning_model = _resample(planning_labels, context, to_planning, label=True)
    inputs = ModelInputs(
        grid=grid,
        context_grid=context,
        image=np.stack([scale_hu(daily_hu, hu_min, hu_max), scale_hu(planning_hu, hu_min, hu_max), planning_model]),
        daily_hu=daily_hu,
        daily_labels=None if daily_labels is None else _resample(daily_labels, context, sitk.Transform(), label=True),
        context_voxels=context_voxels,
    )
    if not inputs.image[(2, *inputs.inner)].any():
        raise PreprocessingError(
            "after the rigid alignment no planning contour falls on the daily CT; check that both scans are of the "
            "same patient and the daily scan covers the pelvis"
        )
    return inputs


def ras_affine(image: sitk.Image) -> np.ndarray:
    """4x4 index-to-world matrix of ``image`` in RAS (NIfTI/MONAI) world coordinates."""
    return LPS_RAS @ index_to_world(image)


def ras_map(daily_to_planning: np.ndarray) -> np.ndarray:
    """A 4x4 map of LPS world points (e.g. ``R``) as the same map of RAS world points."""
    return LPS_RAS @ np.asarray(daily_to_planning, dtype=np.float64) @ LPS_RAS
