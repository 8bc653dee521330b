"""Write and read a Deformable Spatial Registration (planning CT -> daily CT) holding the project's DDF.

Hand-written with pydicom because no maintained library writes this IOD (highdicom has none; see
docs/ARCHITECTURE.md, "Hand-written DICOM writers").

Direction convention (DICOM PS3.3 C.20.3.1.1, "Deformable Registration Sequence"): the registrations "are applied
to the Registered RCS coordinates": first the Pre Deformation Matrix, then the deformation offsets, then the Post
Deformation Matrix; "the resulting coordinate addresses the sample point within the Source RCS". With the grid
point ``y`` (in the Registered RCS, from Image Position/Orientation (Patient), Grid Resolution and the grid index)
and the vector ``D(y)`` stored at it::

    p = M_post @ (M_pre @ y + D(y))          (p: where to sample the Source RCS)

Here the Registered RCS is the daily CT's frame of reference (the frame of reference of this object) and the
Source RCS is the planning CT's. So the vectors point from the daily scan into the planning scan: exactly the
"pull" direction of the project's DDF (warped planning at daily voxel ``x`` = planning at ``x + ddf(x)``).

This module writes ``M_pre = R`` (the rigid part, a 4x4 mapping daily-frame points to planning-frame points),
``M_post = I`` and ``D = R[:3, :3] @ u``, where ``u`` is the DDF in mm along the daily scan's LPS axes
(``u = A[:3, :3] @ ddf`` with ``A`` the daily grid's index-to-world matrix). Then ``p = R @ (y + u)``: the rigidly
pre-aligned planning image sampled at ``y + u``, which is what the network's DDF means. Note the opposite direction of
the rigid Spatial Registration IOD (C.20.2.1.1), whose matrix maps Source RCS points into the Registered RCS: a rigid
registration object for the same pair would hold ``inv(R)``.

Some readers compose the other way round, ``p = M_pre @ (y + D(y))`` (deformation first, vector along the registered
axes); for a rigid part without rotation (the usual couch shift) both readings give the same point.

The deformation grid is the daily CT's voxel grid (or every n-th voxel of it, ``grid_step``). Vectors are stored as
float32 (OF) in the order of the standard (C.20.3.1.3: rows of a plane left to right, top to bottom, then planes),
i.e. index order ``K, J, I``; a grid whose slice axis runs against row x column is stored flipped along ``K``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.dataset import Dataset
from pydicom.uid import DeformableSpatialRegistrationStorage

from prostate_jrs.dicom.files import atomic_write
from prostate_jrs.dicom.modules import NewSeriesOptions, image_reference, new_series_instance
from prostate_jrs.dicom.slices import match_slices
from prostate_jrs.dicom.values import dicom_date, dicom_time, ds_list
from prostate_jrs.geometry import identity_grid, index_to_world, resample_to_grid

__all__ = [
    "DeformableRegistration",
    "RegistrationOptions",
    "ddf_to_vectors",
    "read_deformable_registration",
    "registration_grid",
    "vectors_to_ddf",
    "write_deformable_registration",
]

_RIGID_TOLERANCE = 1e-6


@dataclass(frozen=True, kw_only=True)
class RegistrationOptions(NewSeriesOptions):
    """Descriptive attributes of a written Deformable Spatial Registration (and those of :class:`NewSeriesOptions`).

    Args:
        algorithm_name: model name (Content Description and Frame of Reference Transformation Comment).
        content_label: Content Label (upper case, at most 16 characters).
        content_creator_name: Content Creator's Name (Type 2; may be empty).
        content_datetime: Content (and Series) Date/Time; ``None`` for now.
    """

    content_label: str = "JRS_DDF"
    content_creator_name: str = ""
    series_description: str = "prostate-jrs planning to daily registration"
    series_number: int = 903


@dataclass(frozen=True)
class DeformableRegistration:
    """The content of a Deformable Spatial Registration with one deformable item (see the module docstring).

    Args:
        pre_matrix: ``M_pre``, 4x4, maps Registered (daily) RCS points towards the Source (planning) RCS.
        post_matrix: ``M_post``, 4x4.
        vectors: ``D``, float32 ``(3, I, J, K)`` on ``grid``, mm.
        grid: geometry of the deformation grid in the Registered RCS (a scalar image; only its size, spacing,
            origin and direction mean anything).
        source_frame_of_reference_uid: frame of reference of the planning scan.
        registered_frame_of_reference_uid: frame of reference of the daily scan (and of the object).
    """

    pre_matrix: np.ndarray
    post_matrix: np.ndarray
    vectors: np.ndarray
    grid: sitk.Image
    source_frame_of_reference_uid: str
    registered_frame_of_reference_uid: str

    def source_points(self) -> np.ndarray:
        """Source (planning) RCS point each grid point maps to, ``(3, I, J, K)`` float64 mm."""
        index = identity_grid(tuple(self.grid.GetSize()), np.float64)
        to_world = index_to_world(self.grid)
        points = np.tensordot(to_world[:3, :3], index, axes=1) + to_world[:3, 3, None, None, None]
        moved = np.tensordot(self.pre_matrix[:3, :3], points, axes=1) + self.pre_matrix[:3, 3, None, None, None]
        moved += self.vectors
        return np.tensordot(self.post_matrix[:3, :3], moved, axes=1) + self.post_matrix[:3, 3, None, None, None]

    def ddf_on(self, image: sitk.Image) -> np.ndarray:
        """The project's DDF on the grid of ``image`` (e.g. the daily CT when the stored grid is coarser).

        The mm vectors are interpolated trilinearly between grid points (the standard leaves interpolation to the
        implementation; beyond the grid the nearest grid point's vector is used), then converted.

        Args:
            image: the grid to return the DDF on; it must lie in the registered (daily) frame of reference.

        Returns:
            ``(3, I, J, K)`` float32 in voxel units of ``image``.

        Raises:
            ValueError: if the Post Deformation Matrix is not the identity.
        """
        if not np.allclose(self.post_matrix, np.eye(4), atol=_RIGID_TOLERANCE):
            raise ValueError("the Post Deformation Matrix is not the identity; the registration is not a DDF after R")
        vectors = resample_to_grid(
            self.vectors, index_to_world(self.grid), index_to_world(image), image.GetSize(), order=1, mode="nearest"
        )
        return vectors_to_ddf(vectors, image, self.pre_matrix)

    def ddf(self) -> np.ndarray:
        """The project's DDF ``(3, I, J, K)`` float32, voxel units of ``grid`` (see :func:`vectors_to_ddf`).

        Raises:
            ValueError: if ``post_matrix`` is not the identity (the project's DDF then cannot express it).
        """
        if not np.allclose(self.post_matrix, np.eye(4), atol=_RIGID_TOLERANCE):
            raise ValueError("the Post Deformation Matrix is not the identity; the registration is not a DDF after R")
        return vectors_to_ddf(self.vectors, self.grid, self.pre_matrix)


def _check_ddf(ddf: np.ndarray, grid: sitk.Image) -> None:
    shape = (3, *grid.GetSize())
    if ddf.shape != shape:
        raise ValueError(f"DDF of shape {ddf.shape} does not match the daily grid; expected {shape}")
    if not np.all(np.isfinite(ddf)):
        raise ValueError("the DDF has NaN or infinite values")


def _check_matrix(matrix: np.ndarray, name: str) -> np.ndarray:
    matrix = np.asarray(matrix, dtype=np.float64)
    if matrix.shape != (4, 4) or not np.allclose(matrix[3], [0, 0, 0, 1]):
        raise ValueError(f"{name} must be a 4x4 homogeneous matrix with last row (0, 0, 0, 1), got {matrix.tolist()}")
    return matrix


def _matrix_type(matrix: np.ndarray) -> str:
    linear = matrix[:3, :3]
    if np.allclose(linear.T @ linear, np.eye(3), atol=_RIGID_TOLERANCE) and np.linalg.det(linear) > 0:
        return "RIGID"
    return "AFFINE"


def ddf_to_vectors(ddf: np.ndarray, grid: sitk.Image, daily_to_planning: np.ndarray | None = None) -> np.ndarray:
    """DICOM deformation vectors ``D = R[:3, :3] @ A[:3, :3] @ ddf`` (mm) from the project's DDF.

    Args:
        ddf: ``(3, I, J, K)`` displacement in voxel units of ``grid`` (geometry.py convention).
        grid: the daily image (fixed grid).
        daily_to_planning: ``R``, the rigid 4x4 mapping daily-frame points to planning-frame points; ``None``
            for the identity (both scans in one frame of reference).

    Returns:
        float32 ``(3, I, J, K)`` vectors in mm.

    Raises:
        ValueError: if the DDF does not fit the grid or the matrix is not homogeneous 4x4.
    """
    _check_ddf(ddf, grid)
    rigid = np.eye(4) if daily_to_planning is None else _check_matrix(daily_to_planning, "daily_to_planning")
    return _to_vectors(ddf, grid, rigid)


def _to_vectors(ddf: np.ndarray, grid: sitk.Image, rigid: np.ndarray) -> np.ndarray:
    """``R A ddf`` (float32) for a DDF in voxel units of ``grid``; ``ddf`` may be a subsampled view of one on it."""
    linear = (rigid[:3, :3] @ index_to_world(grid)[:3, :3]).astype(np.float32)
    return np.tensordot(linear, np.asarray(ddf, dtype=np.float32), axes=1)


def registration_grid(daily_image: sitk.Image, grid_step: Sequence[int] = (1, 1, 1)) -> sitk.Image:
    """The deformation grid written for ``grid_step``: every n-th voxel of the daily grid (geometry only, uint8).

    A DDF restored straight onto this grid (:meth:`prostate_jrs.pipeline.PipelineResult.ddf_on`) is what
    :func:`write_deformable_registration` writes, without a DDF on the full daily grid first.

    Raises:
        ValueError: if ``grid_step`` is not three positive integers.
    """
    if len(grid_step) != 3 or any(int(n) < 1 for n in grid_step):
        raise ValueError(f"grid_step must be three positive integers, got {tuple(grid_step)}")
    step = [int(n) for n in grid_step]
    grid = sitk.Image([-(-int(n) // s) for n, s in zip(daily_image.GetSize(), step, strict=True)], sitk.sitkUInt8)
    grid.SetSpacing([float(v) * s for v, s in zip(daily_image.GetSpacing(), step, strict=True)])
    grid.SetOrigin(daily_image.GetOrigin())
    grid.SetDirection(daily_image.GetDirection())
    return grid


def vectors_to_ddf(vectors: np.ndarray, grid: sitk.Image, daily_to_planning: np.ndarray | None = None) -> np.ndarray:
    """The inverse of :func:`ddf_to_vectors`: project DDF ``(3, I, J, K)`` float32 in voxel units of ``grid``."""
    _check_ddf(vectors, grid)
    rigid = np.eye(4) if daily_to_planning is None else _check_matrix(daily_to_planning, "daily_to_planning")
    linear = np.linalg.inv(rigid[:3, :3] @ index_to_world(grid)[:3, :3])
    return np.tensordot(linear, vectors.astype(np.float64), axes=1).astype(np.float32)


def _right_handed(grid: sitk.Image, vectors: np.ndarray) -> tuple[sitk.Image, np.ndarray]:
    """Grid and vectors with the slice axis along row x column, as the grid of the standard has it."""
    direction = np.asarray(grid.GetDirection()).reshape(3, 3)
    if np.linalg.det(direction) > 0:
        return grid, vectors
    flipped = sitk.Flip(grid, [False, False, True], flipAboutOrigin=False)
    return flipped, vectors[:, :, :, ::-1]


def _series_reference(series: Sequence[Dataset]) -> Dataset:
    item = Dataset()
    item.SeriesInstanceUID = series[0].SeriesInstanceUID
    item.ReferencedInstanceSequence = [image_reference(ds) for ds in series]
    return item


def _matrix_item(matrix: np.ndarray) -> Dataset:
    item = Dataset()
    item.FrameOfReferenceTransformationMatrix = ds_list(matrix.ravel())
    item.FrameOfReferenceTransformationMatrixType = _matrix_type(matrix)
    return item


def write_deformable_registration(
    ddf: np.ndarray,
    daily_image: sitk.Image,
    daily_series: Sequence[Dataset],
    planning_series: Sequence[Dataset],
    out_path: str | os.PathLike[str],
    *,
    daily_to_planning: np.ndarray | None = None,
    grid_step: tuple[int, int, int] = (1, 1, 1),
    options: RegistrationOptions | None = None,
) -> Path:
    """Write the planning -> daily registration ``R`` then ``ddf`` as a Deformable Spatial Registration.

    The object belongs to the daily study and frame of reference (the Registered RCS); the planning series is the
    source. See the module docstring for what the stored matrices and vectors mean.

    Args:
        ddf: ``(3, I, J, K)`` DDF on the daily grid in voxel units of that grid (geometry.py convention), or already on
            ``registration_grid(daily_image, grid_step)`` in voxel units of that grid (then written as it is).
        daily_image: the daily CT (or any image on its grid) that defines the DDF's grid.
        daily_series: the daily CT images as read from disk; ``daily_image`` must lie on their grid.
        planning_series: the planning CT images as read from disk (the source of the registration).
        out_path: the file to write (written completely or not at all).
        daily_to_planning: ``R``, rigid 4x4 mapping daily-frame points (LPS mm) to planning-frame points; it is
            written as the Pre Deformation Matrix. ``None`` for the identity, which requires both series to share
            a frame of reference. With a planning -> daily matrix ``T`` at hand, pass ``inv(T)``.
        grid_step: keep every n-th DDF voxel along ``I, J, K`` for the deformation grid. The full daily grid
            (default) round-trips exactly but takes 12 bytes per voxel (about 300 MB for 512 x 512 x 100); e.g.
            ``(4, 4, 1)`` is 16 times smaller, and readers interpolate between grid points
            (:meth:`DeformableRegistration.ddf_on`).
        options: descriptive attributes.

    Returns:
        The written path.

    Raises:
        ValueError: if the DDF does not fit the daily grid, the daily image is not on the daily series' grid, the
            series belong to different patients, or a matrix is missing or malformed.
    """
    options = options or RegistrationOptions()
    coarse = registration_grid(daily_image, grid_step)
    on_coarse = tuple(np.shape(ddf)) == (3, *coarse.GetSize()) and coarse.GetSize() != daily_image.GetSize()
    _check_ddf(ddf, coarse if on_coarse else daily_image)
    daily_slices = match_slices(daily_series, daily_image, what="DDF grid")
    rigid = _checked_rigid(daily_slices[0], planning_series, daily_to_planning)
    step = [int(n) for n in grid_step]
    # subsample first (or take the DDF restored onto the coarse grid): on a 512 x 512 x 300 grid the whole DDF is GBs
    if on_coarse:  # in voxel units of the coarse grid
        vectors = _to_vectors(ddf, coarse, rigid)
    else:  # in voxel units of the daily grid
        vectors = _to_vectors(ddf[:, :: step[0], :: step[1], :: step[2]], daily_image, rigid)
    grid, vectors = _right_handed(coarse, vectors)
    daily = daily_slices[0]
    # General Series + Spatial Registration Series, Frame of Reference (the Registered RCS, daily), Equipment
    ds, when = new_series_instance(DeformableSpatialRegistrationStorage, "REG", daily, options)
    # an unpaired body part makes Laterality (Type 2C) not required
    ds.BodyPartExamined = daily.get("BodyPartExamined", "") or "PELVIS"
    # Deformable Spatial Registration (Content Identification macro included)
    ds.ContentDate, ds.ContentTime = dicom_date(when), dicom_time(when)
    ds.InstanceNumber = 1
    ds.ContentLabel = options.content_label
    ds.ContentDescription = f"{options.algorithm_name} {options.algorithm_version}: planning CT to daily CT"[:64]
    ds.ContentCreatorName = options.content_creator_name
    item = _deformable_item(planning_series, rigid, grid, vectors, options)
    _add_registration_items(ds, item, daily_slices, planning_series)
    return atomic_write(ds, out_path)


def _checked_rigid(
    daily: Dataset, planning_series: Sequence[Dataset], daily_to_planning: np.ndarray | None
) -> np.ndarray:
    """The Pre Deformation Matrix ``R`` after checking that the planning series fits the daily image ``daily``.

    Raises:
        ValueError: if the planning series is empty or not one series, belongs to another patient, or ``R`` is
            missing (different frames of reference) or malformed.
    """
    if not planning_series:
        raise ValueError("planning_series is empty; expected the planning CT images (the registration's source)")
    for keyword in ("PatientID", "SeriesInstanceUID", "FrameOfReferenceUID"):
        values = {str(ds.get(keyword, "")) for ds in planning_series}
        if len(values) != 1:
            raise ValueError(f"planning_series mixes {keyword} values {sorted(values)}; expected one CT series")
    planning = planning_series[0]
    if str(daily.PatientID) != str(planning.PatientID):
        raise ValueError(
            f"planning series is of patient {planning.PatientID!r} but daily series of {daily.PatientID!r}; "
            "a registration never combines two patients"
        )
    if daily_to_planning is None and str(planning.FrameOfReferenceUID) != str(daily.FrameOfReferenceUID):
        raise ValueError(
            "planning and daily series have different frames of reference; pass daily_to_planning (the rigid "
            "pre-alignment) instead of assuming the identity"
        )
    return np.eye(4) if daily_to_planning is None else _check_matrix(daily_to_planning, "daily_to_planning")


def _deformable_item(
    planning_series: Sequence[Dataset],
    rigid: np.ndarray,
    grid: sitk.Image,
    vectors: np.ndarray,
    options: RegistrationOptions,
) -> Dataset:
    """Deformable Registration item: planning (source) images, ``R`` as Pre Deformation Matrix, the vector grid."""
    direction = np.asarray(grid.GetDirection()).reshape(3, 3)
    grid_item = Dataset()
    grid_item.ImageOrientationPatient = ds_list([*direction[:, 0], *direction[:, 1]])
    grid_item.ImagePositionPatient = ds_list(grid.GetOrigin())
    grid_item.GridDimensions = [int(n) for n in grid.GetSize()]
    grid_item.GridResolution = [float(s) for s in grid.GetSpacing()]
    # (3, I, J, K) -> (K, J, I, 3): planes, rows top to bottom, columns left to right, then x, y, z
    grid_item.VectorGridData = np.ascontiguousarray(vectors.transpose(3, 2, 1, 0), dtype="<f4").tobytes()
    item = Dataset()
    item.SourceFrameOfReferenceUID = str(planning_series[0].FrameOfReferenceUID)
    item.ReferencedImageSequence = [image_reference(ds) for ds in planning_series]
    item.FrameOfReferenceTransformationComment = (
        f"rigid pre-alignment then DDF from {options.algorithm_name} {options.algorithm_version}"
    )[:64]  # LO: at most 64 characters
    item.RegistrationTypeCodeSequence = []
    item.PreDeformationMatrixRegistrationSequence = [_matrix_item(rigid)]
    item.PostDeformationMatrixRegistrationSequence = [_matrix_item(np.eye(4))]
    item.DeformableRegistrationGridSequence = [grid_item]
    return item


def _add_registration_items(
    ds: Dataset, item: Dataset, daily_slices: Sequence[Dataset], planning_series: Sequence[Dataset]
) -> None:
    """Set the Deformable Registration Sequence (identity item for the daily images first, where the frames differ)
    and the Common Instance Reference module (daily images in this study, planning ones in theirs)."""
    daily, planning = daily_slices[0], planning_series[0]
    registered_for = str(daily.FrameOfReferenceUID)
    # the daily images themselves are registered by the identity; first item, deformable second, as Varian Velocity
    # writes them (some readers index the items)
    identity = Dataset()
    identity.SourceFrameOfReferenceUID = registered_for
    identity.ReferencedImageSequence = [image_reference(ds) for ds in daily_slices]
    identity.RegistrationTypeCodeSequence = []
    same_frame = str(item.SourceFrameOfReferenceUID) == registered_for
    ds.DeformableRegistrationSequence = [item] if same_frame else [identity, item]
    ds.ReferencedSeriesSequence = [] if same_frame else [_series_reference(daily_slices)]
    if str(planning.StudyInstanceUID) == str(daily.StudyInstanceUID):
        ds.ReferencedSeriesSequence.append(_series_reference(planning_series))
    else:
        other = Dataset()
        other.StudyInstanceUID = planning.StudyInstanceUID
        other.ReferencedSeriesSequence = [_series_reference(planning_series)]
        ds.StudiesContainingOtherReferencedInstancesSequence = [other]
    if not ds.ReferencedSeriesSequence:
        del ds.ReferencedSeriesSequence


def read_deformable_registration(path: str | os.PathLike[str]) -> DeformableRegistration:
    """Read the deformable item of a Deformable Spatial Registration file.

    Args:
        path: the file.

    Returns:
        Matrices, vectors and grid of the (only) item with a deformation grid; ``.ddf()`` gives the project's DDF.

    Raises:
        ValueError: if the file is not a Deformable Spatial Registration, has no or several deformable items, or its
            vector data does not match its grid dimensions.
    """
    ds = pydicom.dcmread(path)
    if ds.get("SOPClassUID") != DeformableSpatialRegistrationStorage:
        raise ValueError(f"{path}: SOP Class {ds.get('SOPClassUID')} is not Deformable Spatial Registration Storage")
    items = [
        item for item in ds.get("DeformableRegistrationSequence", []) if item.get("DeformableRegistrationGridSequence")
    ]
    if len(items) != 1:
        raise ValueError(f"{path}: expected exactly one Deformable Registration item with a grid, found {len(items)}")
    item = items[0]
    grid_item = item.DeformableRegistrationGridSequence[0]

    def matrix(keyword: str) -> np.ndarray:
        sequence = item.get(keyword)
        if not sequence:
            return np.eye(4)
        values = [float(v) for v in sequence[0].FrameOfReferenceTransformationMatrix]
        return _check_matrix(np.asarray(values).reshape(4, 4), keyword)

    size = [int(n) for n in grid_item.GridDimensions]
    data = np.frombuffer(grid_item.VectorGridData, dtype="<f4")
    if data.size != 3 * int(np.prod(size)):
        raise ValueError(f"{path}: Vector Grid Data has {data.size} values, expected 3 x {size}")
    vectors = data.reshape(size[2], size[1], size[0], 3).transpose(3, 2, 1, 0).astype(np.float32)
    orientation = np.asarray([float(v) for v in grid_item.ImageOrientationPatient])
    row, column = orientation[:3], orientation[3:]
    grid = sitk.Image(size, sitk.sitkUInt8)
    grid.SetSpacing([float(v) for v in grid_item.GridResolution])
    grid.SetOrigin([float(v) for v in grid_item.ImagePositionPatient])
    grid.SetDirection(np.stack([row, column, np.cross(row, column)], axis=1).ravel().tolist())
    return DeformableRegistration(
        pre_matrix=matrix("PreDeformationMatrixRegistrationSequence"),
        post_matrix=matrix("PostDeformationMatrixRegistrationSequence"),
        vectors=np.ascontiguousarray(vectors),
        grid=grid,
        source_frame_of_reference_uid=str(item.SourceFrameOfReferenceUID),
        registered_frame_of_reference_uid=str(ds.FrameOfReferenceUID),
    )
