"""Write a SimpleITK CT volume as a DICOM CT Image Storage series with realistic headers.

Used by ``prostate-jrs synth --dicom`` to produce what a CT scanner (daily CT) or a planning system
(planning CT) would export, and by tests. One file per slice (index ``K`` of the image), named
``CT.<SOPInstanceUID>.dcm`` as planning systems name them.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage

from prostate_jrs.dicom.files import atomic_write
from prostate_jrs.dicom.modules import EquipmentInfo, PatientInfo, StudyInfo, add_equipment, add_patient_and_study
from prostate_jrs.dicom.uids import make_uid, package_version
from prostate_jrs.dicom.values import dicom_date, dicom_time, ds_list, format_ds

__all__ = [
    "PATIENT_POSITIONS",
    "SCANNER",
    "CTSeriesInfo",
    "check_orientation",
    "synthetic_equipment",
    "write_ct_series",
]

PATIENT_POSITIONS: tuple[str, ...] = ("HFS", "FFS", "HFP", "FFP", "HFDR", "HFDL", "FFDR", "FFDL")
"""Patient Position values DICOM defines for CT."""


def synthetic_equipment(
    model_name: str, device_serial_number: str, station_name: str, software_versions: str | None = None
) -> EquipmentInfo:
    """A device of the synthetic clinic (manufacturer ``prostate-jrs``) that writes synthetic DICOM data.

    Args:
        model_name: Manufacturer's Model Name.
        device_serial_number: Device Serial Number.
        station_name: Station Name.
        software_versions: Software Versions; ``None`` for the installed package's version.
    """
    return EquipmentInfo(
        manufacturer="prostate-jrs",
        model_name=model_name,
        software_versions=package_version() if software_versions is None else software_versions,
        device_serial_number=device_serial_number,
        station_name=station_name,
        institution_name="prostate-jrs synthetic clinic",
    )


SCANNER = synthetic_equipment("Synthetic Pelvis CT", "SYN0001", "SYNCT01")
"""Equipment written on synthetic CT series by default."""


_ORTHONORMAL_TOLERANCE = 1e-4


@dataclass(frozen=True)
class CTSeriesInfo:
    """Series-level attributes of one CT series.

    Args:
        frame_of_reference_uid: Frame of Reference UID (a planning and a daily scan have different ones).
        series_description: Series Description.
        series_number: Series Number.
        series_instance_uid: Series Instance UID; ``None`` for a new random one. SOP Instance UIDs are derived
            from it and the slice index, so a deterministic series UID gives deterministic instance UIDs.
        series_datetime: Series (and acquisition/content) date and time; ``None`` for the study's.
        patient_position: Patient Position (``HFS``, ``FFS``, ``HFP``, ...). It is a label: the geometry written
            comes from the image's direction cosines, which must agree with the position the caller simulates.
        position_reference_indicator: Position Reference Indicator (Type 2; empty is allowed).
        kvp: KVP.
        body_part_examined: Body Part Examined.
        protocol_name: Protocol Name.
        acquisition_number: Acquisition Number.
    """

    frame_of_reference_uid: str
    series_description: str = "CT Pelvis"
    series_number: int = 1
    series_instance_uid: str | None = None
    series_datetime: dt.datetime | None = None
    patient_position: str = "HFS"
    position_reference_indicator: str = ""
    kvp: float = 120.0
    body_part_examined: str = "PELVIS"
    protocol_name: str = "Pelvis RT"
    acquisition_number: int = 1


def check_orientation(image: sitk.Image) -> np.ndarray:
    """Check that ``image`` is a 3D image with orthonormal direction cosines and return them as columns.

    Args:
        image: the volume.

    Returns:
        The 3x3 direction matrix; column ``c`` is the LPS direction of index axis ``c``.

    Raises:
        ValueError: if the image is not 3D or its direction is not orthonormal.
    """
    if image.GetDimension() != 3:
        raise ValueError(f"expected a 3D image, got {image.GetDimension()}D")
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    if not np.allclose(direction.T @ direction, np.eye(3), atol=_ORTHONORMAL_TOLERANCE):
        raise ValueError(f"image direction {image.GetDirection()} is not orthonormal; DICOM slices need one")
    return direction


def _hu_to_stored(hu: np.ndarray) -> tuple[np.ndarray, int, int]:
    """Stored pixel values, Pixel Representation and Rescale Intercept for an HU array.

    Scanners commonly store unsigned values with intercept -1024; values below -1024 (padding) need signed storage.
    """
    low, high = int(hu.min()), int(hu.max())
    if low >= -1024 and high <= 65535 - 1024:
        return (hu.astype(np.int32) + 1024).astype(np.uint16), 0, -1024
    if low >= -32768 and high <= 32767:
        return hu.astype(np.int16), 1, 0
    raise ValueError(f"HU values in [{low}, {high}] do not fit 16-bit CT storage")


def write_ct_series(
    image: sitk.Image,
    out_dir: str | os.PathLike[str],
    *,
    patient: PatientInfo,
    study: StudyInfo,
    series: CTSeriesInfo,
    equipment: EquipmentInfo = SCANNER,
) -> list[Path]:
    """Write ``image`` as a CT Image Storage series, one file per slice along index axis ``K``.

    Geometry: Image Orientation (Patient) is the image's direction of index axes ``I`` (row direction, along a
    row) and ``J`` (column direction); Image Position (Patient) of slice ``k`` is the world point of voxel
    ``(0, 0, k)``; Pixel Spacing is ``(spacing J, spacing I)``; Slice Thickness and Spacing Between Slices are
    the spacing along ``K``. Pixels are stored as unsigned 16 bit with Rescale Intercept -1024 and slope 1
    (signed with intercept 0 when values below -1024 occur).

    The files appear all together or not at all: they are written into a temporary folder inside ``out_dir``
    and moved into place once every slice is written.

    Args:
        image: 3D CT volume in HU (integer pixel type; floating-point values are rounded to integers).
        out_dir: folder to write into; created if missing. Other files in it are left alone.
        patient: patient attributes.
        study: study attributes.
        series: series attributes, frame of reference included.
        equipment: scanner attributes.

    Returns:
        The written files, in slice order ``k = 0 .. K-1``.

    Raises:
        ValueError: if the image is not a scalar 3D image with orthonormal direction, the patient position is
            unknown, or the HU values do not fit 16 bits.
    """
    check_orientation(image)
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise ValueError(f"expected a scalar CT image, got {image.GetNumberOfComponentsPerPixel()} components")
    if series.patient_position not in PATIENT_POSITIONS:
        raise ValueError(f"patient_position {series.patient_position!r} is not one of {PATIENT_POSITIONS}")
    array = sitk.GetArrayFromImage(image)  # (K, J, I): slice, row, column
    if not np.issubdtype(array.dtype, np.integer):
        array = np.rint(array)
    stored, pixel_representation, intercept = _hu_to_stored(array)
    series_uid = series.series_instance_uid or make_uid()
    when = series.series_datetime or study.study_datetime
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    tmp_dir = Path(tempfile.mkdtemp(prefix=".ct_series.", dir=out_dir))
    try:
        staged: list[tuple[Path, Path]] = []
        for k in range(stored.shape[0]):
            ds = _slice_dataset(k, series_uid, when, patient, study, series, equipment)
            _add_ct_pixels(ds, stored[k], pixel_representation, intercept, series.kvp)
            _add_image_plane(ds, image, k)
            name = f"CT.{ds.SOPInstanceUID}.dcm"
            staged.append((atomic_write(ds, tmp_dir / name), out_dir / name))
        for tmp_path, final_path in staged:
            os.replace(tmp_path, final_path)
        return [final for _, final in staged]
    finally:
        with contextlib.suppress(OSError):
            shutil.rmtree(tmp_dir)


def _add_image_plane(ds: Dataset, image: sitk.Image, k: int) -> None:
    """Image Plane module of slice ``k`` of ``image`` (see :func:`write_ct_series` for the geometry)."""
    direction = check_orientation(image)
    spacing = np.asarray(image.GetSpacing(), dtype=np.float64)
    position = np.asarray(image.GetOrigin(), dtype=np.float64) + k * spacing[2] * direction[:, 2]
    ds.ImageOrientationPatient = ds_list([*direction[:, 0], *direction[:, 1]])
    ds.ImagePositionPatient = ds_list(position)
    ds.PixelSpacing = ds_list([spacing[1], spacing[0]])
    ds.SliceThickness = format_ds(spacing[2])
    ds.SpacingBetweenSlices = format_ds(spacing[2])
    # Slice Location: signed distance along the slice normal, as scanners write it
    ds.SliceLocation = format_ds(float(np.dot(position, np.cross(direction[:, 0], direction[:, 1]))))


def _add_ct_pixels(ds: Dataset, pixels: np.ndarray, pixel_representation: int, intercept: int, kvp: float) -> None:
    """Image Pixel and CT Image modules of one slice of stored values (see :func:`_hu_to_stored`)."""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = int(pixels.shape[0]), int(pixels.shape[1])
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = pixel_representation
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    ds.RescaleIntercept = str(intercept)
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    ds.KVP = format_ds(kvp)
    ds.ConvolutionKernel = "STANDARD"
    ds.WindowCenter = "40"
    ds.WindowWidth = "400"
    ds.WindowCenterWidthExplanation = "SOFT TISSUE"


def _slice_dataset(
    k: int,
    series_uid: str,
    when: dt.datetime,
    patient: PatientInfo,
    study: StudyInfo,
    series: CTSeriesInfo,
    equipment: EquipmentInfo,
) -> Dataset:
    """SOP Common, Patient, Study, Series, Frame of Reference, Equipment and General Image modules of slice ``k``."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = make_uid(series_uid, "slice", k)
    ds.InstanceCreationDate = dicom_date(when)
    ds.InstanceCreationTime = dicom_time(when)
    add_patient_and_study(ds, patient, study)
    # General Series
    ds.Modality = "CT"
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = series.series_number
    ds.SeriesDate = dicom_date(when)
    ds.SeriesTime = dicom_time(when)
    ds.SeriesDescription = series.series_description
    ds.ProtocolName = series.protocol_name
    ds.BodyPartExamined = series.body_part_examined
    ds.PatientPosition = series.patient_position
    ds.OperatorsName = ""
    # Frame of Reference
    ds.FrameOfReferenceUID = series.frame_of_reference_uid
    ds.PositionReferenceIndicator = series.position_reference_indicator
    add_equipment(ds, equipment)
    # General Image / General Acquisition
    ds.InstanceNumber = k + 1
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.AcquisitionNumber = series.acquisition_number
    ds.AcquisitionDate = dicom_date(when)
    ds.AcquisitionTime = dicom_time(when)
    ds.ContentDate = dicom_date(when)
    ds.ContentTime = dicom_time(when)
    return ds
