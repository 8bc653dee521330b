"""Match a grid (label map, mask, DDF grid) to the CT images of the series it lies on, slice by slice."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import SimpleITK as sitk
from pydicom.dataset import Dataset

from prostate_jrs.geometry import index_to_world

__all__ = ["match_slices"]

_POSITION_TOLERANCE_MM = 1e-3
_DIRECTION_TOLERANCE = 1e-4
_FRAME_OF_REFERENCE_KEY = "0020|0052"  # meta-data key of SimpleITK/GDCM images read from DICOM


def match_slices(reference_series: Sequence[Dataset], grid: sitk.Image, what: str = "label map") -> list[Dataset]:
    """Match every slice ``k`` of ``grid`` to the CT image of ``reference_series`` it lies on.

    Args:
        reference_series: the images of one CT series, in any order.
        grid: an image (label map, mask, DDF grid) that must lie exactly on that series' voxel grid.
        what: what ``grid`` is, for error messages.

    Returns:
        The dataset of slice ``k`` at position ``k``.

    Raises:
        ValueError: if the series is empty, mixes series, patients or frames of reference, ``grid`` carries another
            Frame of Reference UID (meta-data key ``0020|0052``) or does not lie on the series' voxel grid (size,
            spacing, orientation or slice positions differ).
    """
    _check_one_series(reference_series, what)
    _check_frame_of_reference(grid, str(reference_series[0].FrameOfReferenceUID), what)
    to_index = np.linalg.inv(index_to_world(grid))
    size = grid.GetSize()
    by_slice: dict[int, Dataset] = {}
    for ds in reference_series:
        name = f"CT image {ds.get('SOPInstanceUID', '?')} (instance {ds.get('InstanceNumber', '?')})"
        k = _slice_index(ds, name, grid, to_index, what)
        if k in by_slice:
            raise ValueError(f"{name} and another image of the series both lie on slice {k}")
        by_slice[k] = ds
    missing = sorted(set(range(size[2])) - set(by_slice))
    if missing:
        raise ValueError(f"the reference series has no image for slices {missing} of the {what}: not on the CT grid")
    return [by_slice[k] for k in range(size[2])]


def _check_one_series(reference_series: Sequence[Dataset], what: str) -> None:
    """Refuse an empty series, or one that mixes patients, studies, series or frames of reference, or has none."""
    if not reference_series:
        raise ValueError(f"reference_series is empty; expected the CT images the {what} lies on")
    for keyword in ("PatientID", "StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID"):
        values = {str(ds.get(keyword, "")) for ds in reference_series}
        if len(values) != 1:
            raise ValueError(f"reference_series mixes {keyword} values {sorted(values)}; expected one CT series")
        if keyword == "FrameOfReferenceUID" and values == {""}:
            raise ValueError(f"reference_series has no FrameOfReferenceUID; the {what} needs a frame of reference")


def _check_frame_of_reference(grid: sitk.Image, series_frame: str, what: str) -> None:
    """Refuse a grid read from DICOM in another frame of reference than the series (same grid elsewhere)."""
    # an image read from DICOM (GDCM, ct_reader) carries its Frame of Reference UID: same grid in another frame is
    # another place
    grid_frame = (
        grid.GetMetaData(_FRAME_OF_REFERENCE_KEY).strip(" \x00") if grid.HasMetaDataKey(_FRAME_OF_REFERENCE_KEY) else ""
    )
    if grid_frame and grid_frame != series_frame:
        raise ValueError(
            f"the {what} is in frame of reference {grid_frame} but the CT series in {series_frame}: "
            "they do not fit each other"
        )


def _slice_index(ds: Dataset, name: str, grid: sitk.Image, to_index: np.ndarray, what: str) -> int:
    """The slice ``k`` of ``grid`` the CT image ``ds`` lies on, after checking its size, orientation and spacing.

    Raises:
        ValueError: naming the image when it does not lie on a slice of ``grid``.
    """
    size = grid.GetSize()
    direction = np.asarray(grid.GetDirection(), dtype=np.float64).reshape(3, 3)
    spacing = grid.GetSpacing()
    if (int(ds.Columns), int(ds.Rows)) != (size[0], size[1]):
        raise ValueError(
            f"{name} has {ds.Columns} columns x {ds.Rows} rows but the {what} is {size[0]} x {size[1]}: "
            f"the {what} is not on the CT grid"
        )
    iop = np.asarray([float(v) for v in ds.ImageOrientationPatient])
    if not np.allclose(iop, np.concatenate([direction[:, 0], direction[:, 1]]), atol=_DIRECTION_TOLERANCE):
        raise ValueError(
            f"{name} has ImageOrientationPatient {list(iop)} but the {what} has direction cosines "
            f"{list(direction[:, 0]) + list(direction[:, 1])}: the {what} is not on the CT grid"
        )
    row_spacing, column_spacing = (float(v) for v in ds.PixelSpacing)
    if not np.allclose([column_spacing, row_spacing], spacing[:2], atol=_POSITION_TOLERANCE_MM):
        raise ValueError(
            f"{name} has PixelSpacing {[row_spacing, column_spacing]} but the {what} has "
            f"{[spacing[1], spacing[0]]}: the {what} is not on the CT grid"
        )
    position = np.asarray([float(v) for v in ds.ImagePositionPatient])
    index = to_index[:3, :3] @ position + to_index[:3, 3]
    k = round(float(index[2]))
    if np.abs(index - [0.0, 0.0, k]).max() * max(spacing) > _POSITION_TOLERANCE_MM * 10 or not 0 <= k < size[2]:
        raise ValueError(
            f"{name} at ImagePositionPatient {list(position)} is not a slice of the {what} (continuous index "
            f"{np.round(index, 3).tolist()}): the {what} is not on the CT grid"
        )
    return k
