"""Rigid pre-alignment of the planning CT to the daily CT on bone.

Planning and daily CT come from different sessions, usually in different frames of reference and couch positions,
so their world coordinates do not correspond. Bone moves rigidly with the patient's setup, so a rigid transform
found on bone is the part of the daily deformation that the deformable registration does not need to learn.

Direction (docs/ARCHITECTURE.md, "DDF convention"): fixed = daily CT, moving = planning CT. The result's transform
maps a **daily world point to the planning world point** showing the same bone, which is what SimpleITK's
registration returns (a fixed-to-moving point map) and what resampling the planning CT onto the daily grid
needs. The planning anatomy at daily voxel ``x`` is the planning image at ``T(A_daily @ x)``; combined with a DDF
on the daily grid it is at ``T(A_daily @ (x + ddf(x)))``. :meth:`RigidResult.ddf` expresses ``T`` alone as a DDF.

Method: both images are reduced to about 3 mm voxels (block averages), clamped to a bone window so that soft
tissue, which deforms, is flat; translation starts from the centres of mass of the bone masks (so unrelated
frames of reference and couch positions do not matter); an Euler transform is optimised with mean squares on the
clamped images, sampled in the dilated daily bone mask, over three resolution levels.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from prostate_jrs.errors import NoBoneError
from prostate_jrs.geometry import identity_grid, index_to_world, world_to_index
from prostate_jrs.hounsfield import AIR_HU

__all__ = [
    "RIGID_CONVENTION",
    "NoBoneError",
    "RigidAlignment",
    "RigidResult",
    "align_on_bone",
    "recorded_or_on_bone",
    "resample_moving",
]

RIGID_CONVENTION = (
    "rigid.daily_to_planning is a 4x4 matrix mapping daily-scan points to planning-scan points (DICOM patient "
    "coordinates, LPS mm; NIfTI RAS points are these with x and y negated), found on bone by "
    "prostate_jrs.rigid.align_on_bone; residual_mm is the RMS distance of the mapped daily bone surface to the "
    "planning bone surface. The network sees the planning scan through this map (prostate_jrs.preprocessing)."
)
"""What the ``rigid`` record of a datalist item means (written into ``datalist.json`` beside it)."""


@dataclass
class RigidResult:
    """A rigid alignment of the planning CT (moving) to the daily CT (fixed).

    Args:
        transform: Euler transform mapping daily (fixed) world points to planning (moving) world points, LPS mm.
        matrix: the same map as a 4x4 matrix acting on ``(x, y, z, 1)``.
        rotation_deg: angles about x, y, z (degrees) of the transform in SimpleITK's Euler3D convention (rotation
            matrix ``Rz @ Rx @ Ry``, about the transform's centre).
        translation_mm: translation of the transform, i.e. ``T(c) - c`` at its centre ``c``.
        bone_rms_mm: RMS distance from daily bone surface points, mapped by the transform, to the planning bone
            surface (residual misalignment; about half a working voxel when aligned, several mm when not).
        bone_overlap: Dice of the daily bone mask and the planning bone mask mapped onto the daily grid.
        metric_value: final mean-squares metric (clamped HU squared).
        iterations: optimiser iterations at the last level.
        stop_condition: SimpleITK's optimiser stop condition.
        seconds: wall time of the alignment.
        resampled: the planning CT resampled onto the daily grid (``resample=True``), else ``None``.
    """

    transform: sitk.Euler3DTransform
    matrix: np.ndarray
    rotation_deg: tuple[float, float, float]
    translation_mm: tuple[float, float, float]
    bone_rms_mm: float
    bone_overlap: float
    metric_value: float
    iterations: int
    stop_condition: str
    seconds: float
    resampled: sitk.Image | None = field(default=None, repr=False)

    def map_points(self, points: np.ndarray) -> np.ndarray:
        """Map daily world points ``(N, 3)`` to planning world points ``(N, 3)``."""
        points = np.asarray(points, dtype=np.float64).reshape(-1, 3)
        return points @ self.matrix[:3, :3].T + self.matrix[:3, 3]

    def ddf(self, fixed: sitk.Image) -> np.ndarray:
        """The transform as a DDF ``(3, I, J, K)`` float32 on ``fixed``'s grid, in voxel units of that grid.

        ``A_fixed @ (x + ddf(x))`` is the planning world point of daily voxel ``x``, expressed in the daily frame's
        voxel units so that a DDF-based warp (:func:`prostate_jrs.geometry.resample_with_ddf`) of the planning
        image onto the daily grid reproduces the rigid resampling.
        """
        to_world, to_index = index_to_world(fixed), world_to_index(fixed)
        mapping = to_index @ self.matrix @ to_world
        grid = identity_grid(tuple(fixed.GetSize()), np.float64)
        moved = np.tensordot(mapping[:3, :3], grid, axes=1) + mapping[:3, 3, None, None, None]
        return (moved - grid).astype(np.float32)


@dataclass(frozen=True)
class RigidAlignment:
    """The rigid pre-alignment of one pair, as the pipeline uses it and a datalist item records it.

    Args:
        daily_to_planning: 4x4 map of daily-frame points (LPS mm) to planning-frame points.
        residual: RMS distance (mm) of daily bone surface points, mapped by ``R``, to the planning bone surface;
            ``None`` when not measured.
        method: how it was obtained (``bone``: :func:`align_on_bone`; ``none``: identity; ``given``: by the caller).
        bone_overlap: Dice of the daily bone mask and the aligned planning bone mask, if measured.
    """

    daily_to_planning: np.ndarray
    residual: float | None = None
    method: str = "bone"
    bone_overlap: float | None = None

    @classmethod
    def from_result(cls, result: RigidResult) -> RigidAlignment:
        """The alignment :func:`align_on_bone` found."""
        return cls(
            daily_to_planning=np.asarray(result.matrix, dtype=np.float64),
            residual=float(result.bone_rms_mm),
            method="bone",
            bone_overlap=float(result.bone_overlap),
        )

    @classmethod
    def from_record(cls, record: Mapping[str, Any], where: str = "rigid") -> RigidAlignment:
        """Read a datalist item's ``rigid`` record (:meth:`to_record`).

        Raises:
            ValueError: naming ``where`` if the matrix is not a 4x4 rigid transform.
        """
        try:
            matrix = np.asarray(record["daily_to_planning"], dtype=np.float64)
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(
                f"{where}: expected a record with a 4x4 'daily_to_planning' matrix, got {record!r}"
            ) from err
        linear = matrix[:3, :3] if matrix.shape == (4, 4) else None
        if (
            linear is None
            or not np.allclose(matrix[3], [0.0, 0.0, 0.0, 1.0], atol=1e-6)
            or not np.allclose(linear @ linear.T, np.eye(3), atol=1e-4)
            or np.linalg.det(linear) <= 0
        ):
            raise ValueError(
                f"{where}: daily_to_planning must be a 4x4 rigid transform (rotation and translation, last row "
                f"0 0 0 1), got {matrix.tolist()}"
            )
        residual, overlap = record.get("residual_mm"), record.get("bone_overlap")
        return cls(
            daily_to_planning=matrix,
            residual=None if residual is None else float(residual),
            method=str(record.get("method", "given")),
            bone_overlap=None if overlap is None else float(overlap),
        )

    def to_record(self) -> dict[str, Any]:
        """JSON-ready record for a datalist item (convention: :data:`RIGID_CONVENTION`)."""

        def rounded(value: float | None) -> float | None:
            return None if value is None or not np.isfinite(value) else round(float(value), 4)

        return {
            "daily_to_planning": np.round(self.daily_to_planning, 6).tolist(),
            "residual_mm": rounded(self.residual),
            "bone_overlap": rounded(self.bone_overlap),
            "method": self.method,
        }

    @property
    def translation_mm(self) -> float:
        """Length of the translation part (mm)."""
        return float(np.linalg.norm(self.daily_to_planning[:3, 3]))

    @property
    def rotation_deg(self) -> float:
        """Rotation angle of the linear part (degrees)."""
        cosine = (np.trace(self.daily_to_planning[:3, :3]) - 1.0) / 2.0
        return float(np.degrees(np.arccos(np.clip(cosine, -1.0, 1.0))))


def _working_image(image: sitk.Image, target_mm: float) -> sitk.Image:
    """Block-average ``image`` to voxels of about ``target_mm`` (never finer than the input), as float32.

    An integer CT is averaged in its own type (means rounded to whole HU) and cast afterwards: casting the whole CT
    first made a fresh float32 copy of it (128 MB and about 32 k page faults at 512 x 512 x 122, about 0.04 s).
    """
    factors = [max(1, round(target_mm / s)) for s in image.GetSpacing()]
    if max(factors) > 1:
        image = sitk.BinShrink(image, factors)
    return sitk.Cast(image, sitk.sitkFloat32)


def _bone_mask(image: sitk.Image, bone_hu: float, min_volume_ml: float, what: str) -> sitk.Image:
    mask = sitk.BinaryThreshold(image, lowerThreshold=bone_hu, upperThreshold=1e9, insideValue=1, outsideValue=0)
    voxel_ml = float(np.prod(image.GetSpacing())) / 1000.0
    volume = float(sitk.GetArrayViewFromImage(mask).sum()) * voxel_ml
    if volume < min_volume_ml:
        stats = sitk.StatisticsImageFilter()
        stats.Execute(image)
        raise NoBoneError(
            f"the {what} has {volume:.1f} ml above {bone_hu:g} HU (max {stats.GetMaximum():.0f} HU); expected at least "
            f"{min_volume_ml:g} ml of bone (a pelvic CT in HU has several hundred ml) for a rigid alignment on bone"
        )
    return mask


def _crop_to_mask(image: sitk.Image, mask: sitk.Image, margin_mm: float) -> tuple[sitk.Image, sitk.Image]:
    """``image`` and ``mask`` cropped to the mask's bounding box grown by ``margin_mm`` (less work for the metric)."""
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.Execute(mask)
    x, y, z, nx, ny, nz = stats.GetBoundingBox(1)
    grow = [int(np.ceil(margin_mm / s)) for s in image.GetSpacing()]
    lo = [max(0, v - g) for v, g in zip((x, y, z), grow, strict=True)]
    hi = [min(n, v + w + g) for v, w, g, n in zip((x, y, z), (nx, ny, nz), grow, image.GetSize(), strict=True)]
    size = [h - low for low, h in zip(lo, hi, strict=True)]
    return sitk.RegionOfInterest(image, size, lo), sitk.RegionOfInterest(mask, size, lo)


def _surface_points(mask: sitk.Image) -> np.ndarray:
    """World coordinates ``(N, 3)`` of the voxels on the border of a binary mask."""
    border = sitk.BinaryContour(mask, fullyConnected=False, backgroundValue=0, foregroundValue=1)
    index = np.argwhere(sitk.GetArrayViewFromImage(border) > 0)[:, ::-1].astype(np.float64)  # (i, j, k)
    return index @ index_to_world(mask)[:3, :3].T + index_to_world(mask)[:3, 3]


def _surface_rms(fixed_mask: sitk.Image, moving_mask: sitk.Image, matrix: np.ndarray) -> float:
    """RMS distance of the mapped daily bone surface to the planning bone surface (points inside the planning scan)."""
    distance = sitk.SignedMaurerDistanceMap(
        moving_mask, insideIsPositive=False, squaredDistance=False, useImageSpacing=True
    )
    points = _surface_points(fixed_mask)
    mapped = points @ matrix[:3, :3].T + matrix[:3, 3]
    index = np.c_[mapped, np.ones(len(mapped))] @ world_to_index(moving_mask).T
    size = np.asarray(moving_mask.GetSize())
    inside = np.all((index[:, :3] >= 0) & (index[:, :3] <= size - 1), axis=1)
    if not inside.any():
        return float("inf")
    values = ndimage.map_coordinates(
        sitk.GetArrayViewFromImage(distance).transpose(2, 1, 0), index[inside, :3].T, order=1, mode="nearest"
    )
    return float(np.sqrt(np.mean(values**2)))


def _matrix(transform: sitk.Euler3DTransform) -> np.ndarray:
    matrix = np.eye(4)
    rotation = np.asarray(transform.GetMatrix()).reshape(3, 3)
    centre = np.asarray(transform.GetCenter())
    matrix[:3, :3] = rotation
    matrix[:3, 3] = centre + np.asarray(transform.GetTranslation()) - rotation @ centre
    return matrix


def resample_moving(
    moving: sitk.Image, fixed: sitk.Image, transform: sitk.Transform, default_value: float = AIR_HU, order: int = 1
) -> sitk.Image:
    """The planning (moving) image on the daily (fixed) grid through a daily-to-planning ``transform``.

    Args:
        moving: planning CT (or a label map with ``order=0``).
        fixed: daily CT, whose grid the result takes.
        transform: daily world point -> planning world point (e.g. :attr:`RigidResult.transform`).
        default_value: value outside the planning scan (air for CT, 0 for labels).
        order: 0 nearest neighbour, 1 linear.

    Returns:
        The resampled image, of the moving image's pixel type.
    """
    interpolator = sitk.sitkNearestNeighbor if order == 0 else sitk.sitkLinear
    return sitk.Resample(moving, fixed, transform, interpolator, default_value, moving.GetPixelID())


def align_on_bone(
    fixed: sitk.Image,
    moving: sitk.Image,
    *,
    bone_hu: float = 200.0,
    bone_window: tuple[float, float] = (100.0, 1200.0),
    working_mm: float = 3.0,
    min_bone_ml: float = 20.0,
    max_iterations: int = 200,
    sampling: float = 0.2,
    resample: bool = False,
    seed: int = 1,
) -> RigidResult:
    """Rigidly align the planning CT (``moving``) to the daily CT (``fixed``) on bone.

    Args:
        fixed: daily CT in HU (any grid, orientation and frame of reference).
        moving: planning CT in HU.
        bone_hu: threshold of the bone masks (centres of mass, metric mask, residual).
        bone_window: HU range the images are clamped to for the metric: soft tissue below it is flat, so only
            bone drives the alignment; the upper end limits the weight of dense cortex and metal.
        working_mm: voxel size the images are block-averaged to (speed; accuracy stays below it).
        min_bone_ml: least bone volume (ml above ``bone_hu``) each image must hold.
        max_iterations: optimiser iterations per resolution level.
        sampling: fraction of the working voxels (in the daily bone mask grown by two voxels) the metric samples.
        resample: also return the planning CT resampled onto the daily grid.
        seed: seed of the metric's random sampling (same seed, same result); positive, since SimpleITK reads 0
            (``sitkWallClock``) as "seed from the clock".

    Returns:
        The transform (daily world -> planning world), residual measures and timing.

    Raises:
        NoBoneError: if either image holds less than ``min_bone_ml`` of bone (e.g. a water phantom, or an image
            not in HU).
        ValueError: if an image is not a scalar 3D image, or ``seed`` is not positive.
    """
    if seed <= 0:
        raise ValueError(f"seed must be positive (0 would seed from the clock), got {seed}")
    start = time.perf_counter()
    for what, image in (("daily CT (fixed)", fixed), ("planning CT (moving)", moving)):
        if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
            raise ValueError(f"the {what} must be a scalar 3D image, got {image.GetDimension()}D")
    fixed_clamped, fixed_bone = _bone_image(fixed, "daily CT (fixed)", bone_hu, bone_window, working_mm, min_bone_ml, 3)
    # the planning side keeps more margin, so daily points mapped near its bone edges still find planning voxels
    moving_clamped, moving_bone = _bone_image(
        moving, "planning CT (moving)", bone_hu, bone_window, working_mm, min_bone_ml, 10
    )
    # Centres of mass of the bone masks: the frames of reference may differ by anything
    initial = sitk.CenteredTransformInitializer(
        sitk.Cast(fixed_bone, sitk.sitkFloat32),
        sitk.Cast(moving_bone, sitk.sitkFloat32),
        sitk.Euler3DTransform(),
        sitk.CenteredTransformInitializerFilter.MOMENTS,
    )
    registration = _bone_registration(fixed_bone, max_iterations, sampling, seed)
    registration.SetInitialTransform(initial, inPlace=False)
    final = registration.Execute(fixed_clamped, moving_clamped)

    euler = sitk.Euler3DTransform(sitk.CompositeTransform(final).GetNthTransform(0))
    resampled = resample_moving(moving, fixed, euler) if resample else None
    return _measured(euler, registration, fixed_bone, moving_bone, resampled, start)


def _measured(
    euler: sitk.Euler3DTransform,
    registration: sitk.ImageRegistrationMethod,
    fixed_bone: sitk.Image,
    moving_bone: sitk.Image,
    resampled: sitk.Image | None,
    start: float,
) -> RigidResult:
    """The result of a finished registration: the transform, its bone residual and overlap, the optimiser's record
    and the seconds since ``start``."""
    matrix = _matrix(euler)
    rms = _surface_rms(fixed_bone, moving_bone, matrix)
    mapped_bone = sitk.Resample(moving_bone, fixed_bone, euler, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    overlap = sitk.LabelOverlapMeasuresImageFilter()
    overlap.Execute(fixed_bone, mapped_bone)
    return RigidResult(
        transform=euler,
        matrix=matrix,
        rotation_deg=tuple(float(np.rad2deg(a)) for a in euler.GetParameters()[:3]),  # type: ignore[arg-type]
        translation_mm=tuple(float(t) for t in euler.GetTranslation()),  # type: ignore[arg-type]
        bone_rms_mm=rms,
        bone_overlap=float(overlap.GetDiceCoefficient()),
        metric_value=float(registration.GetMetricValue()),
        iterations=int(registration.GetOptimizerIteration()),
        stop_condition=registration.GetOptimizerStopConditionDescription(),
        seconds=time.perf_counter() - start,
        resampled=resampled,
    )


def _bone_image(
    image: sitk.Image,
    what: str,
    bone_hu: float,
    bone_window: tuple[float, float],
    working_mm: float,
    min_bone_ml: float,
    margin_voxels: int,
) -> tuple[sitk.Image, sitk.Image]:
    """One CT as the bone metric sees it: block-averaged to ``working_mm``, cropped to its bone mask plus
    ``margin_voxels`` working voxels, clamped to ``bone_window``; returns the clamped image and the bone mask.

    Raises:
        NoBoneError: naming ``what`` if the image holds less than ``min_bone_ml`` of bone.
    """
    work = _working_image(image, working_mm)
    bone = _bone_mask(work, bone_hu, min_bone_ml, what)
    # bone and its surroundings only
    work, bone = _crop_to_mask(work, bone, margin_voxels * working_mm)
    low, high = bone_window
    return sitk.Clamp(work, sitk.sitkFloat32, low, high), bone


def _bone_registration(
    fixed_bone: sitk.Image, max_iterations: int, sampling: float, seed: int
) -> sitk.ImageRegistrationMethod:
    """SimpleITK's rigid registration as :func:`align_on_bone` runs it: mean squares sampled at random near the daily
    bone, regular-step gradient descent over three resolution levels; the initial transform is the caller's."""
    # Sample where bone edges are: the daily bone mask grown by 2 working voxels
    metric_mask = sitk.BinaryDilate(fixed_bone, [2, 2, 2])
    registration = sitk.ImageRegistrationMethod()
    registration.SetMetricAsMeanSquares()
    registration.SetMetricFixedMask(metric_mask)
    registration.SetMetricSamplingStrategy(registration.RANDOM)
    registration.SetMetricSamplingPercentage(sampling, seed)
    registration.SetInterpolator(sitk.sitkLinear)
    registration.SetOptimizerAsRegularStepGradientDescent(
        learningRate=4.0, minStep=0.01, numberOfIterations=max_iterations, relaxationFactor=0.6,
        gradientMagnitudeTolerance=1e-8,
    )  # fmt: skip
    # One unit of every parameter moves points by about 1 mm (rotations scaled by the image extent)
    registration.SetOptimizerScalesFromPhysicalShift()
    registration.SetShrinkFactorsPerLevel([4, 2, 1])
    registration.SetSmoothingSigmasPerLevel([2.0, 1.0, 0.0])
    registration.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
    return registration


def recorded_or_on_bone(
    record: Mapping[str, Any] | None, daily: sitk.Image, planning: sitk.Image, source: str, key: str = "rigid"
) -> RigidAlignment:
    """A datalist item's recorded rigid pre-alignment (``record``), else one found on bone now.

    Args:
        record: the item's ``key`` record (:meth:`RigidAlignment.to_record`), or ``None``.
        daily: the daily CT (fixed).
        planning: the planning CT (moving).
        source: the item's daily file, for messages.
        key: the record's name in the item, for messages.

    Raises:
        ValueError: naming ``source`` if the record is malformed or the scans have no bone to align on.
    """
    if record is not None:
        return RigidAlignment.from_record(record, f"{source} ({key})")
    try:
        return RigidAlignment.from_result(align_on_bone(daily, planning))
    except NoBoneError as err:
        raise ValueError(f"{source}: rigid pre-alignment on bone failed: {err}") from err
