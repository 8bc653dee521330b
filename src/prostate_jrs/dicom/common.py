"""Header modules, UIDs and safe file writing shared by the project's DICOM writers.

The dataclasses hold what a planning system or a scanner puts in every object of one patient and study:
a planning study and a daily study of one patient share a :class:`PatientInfo` and differ in their
:class:`StudyInfo` (study UID, date) and in the frame of reference passed to the series writers.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import tempfile
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

from prostate_jrs.errors import ProstateJRSError
from prostate_jrs.geometry import index_to_world

__all__ = [
    "IMPLEMENTATION_CLASS_UID",
    "DamagedFileError",
    "EquipmentInfo",
    "PatientInfo",
    "StudyInfo",
    "add_equipment",
    "add_patient_and_study",
    "atomic_write",
    "code_item",
    "copy_patient_and_study",
    "dicom_date",
    "dicom_time",
    "ds_list",
    "file_meta_for",
    "format_ds",
    "make_uid",
    "match_slices",
    "package_version",
    "read_dicom",
]

_POSITION_TOLERANCE_MM = 1e-3
_DIRECTION_TOLERANCE = 1e-4
_FRAME_OF_REFERENCE_KEY = "0020|0052"  # meta-data key of SimpleITK/GDCM images read from DICOM


def package_version() -> str:
    """Version of the installed ``prostate-jrs`` distribution (``"0+unknown"`` when not installed)."""
    try:
        return metadata.version("prostate-jrs")
    except metadata.PackageNotFoundError:
        return "0+unknown"


IMPLEMENTATION_CLASS_UID: UID = generate_uid(entropy_srcs=["prostate-jrs implementation"])
"""Implementation Class UID written into the file meta information (stable across runs)."""


def make_uid(*entropy: object) -> UID:
    """A new UID under pydicom's root.

    Args:
        *entropy: values that determine the UID; the same values give the same UID, so synthetic data is
            reproducible from a seed (e.g. ``make_uid("synth", seed, patient, "planning", "series")``).
            Without values the UID is random.

    Returns:
        The UID.
    """
    if not entropy:
        return generate_uid()
    return generate_uid(entropy_srcs=[repr(e) for e in entropy])


def dicom_date(value: dt.date | dt.datetime) -> str:
    """``YYYYMMDD``."""
    return value.strftime("%Y%m%d")


def dicom_time(value: dt.datetime) -> str:
    """``HHMMSS`` (whole seconds, as most scanners write it)."""
    return value.strftime("%H%M%S")


def format_ds(value: float) -> str:
    """Decimal String of at most 16 characters (the DS limit), as precise as fits.

    Raises:
        ValueError: if ``value`` is not finite.
    """
    value = float(value)
    if not np.isfinite(value):
        raise ValueError(f"cannot write {value} as a DICOM Decimal String")
    if value == 0.0:
        return "0"
    for digits in range(16, 0, -1):
        text = f"{value:.{digits}g}"
        if "e" in text:
            # pydicom and other readers accept exponents, but plain notation is what TPSs write and read
            mantissa, exponent = text.split("e")
            text = f"{mantissa}e{int(exponent)}"
        if len(text) <= 16:
            return text
    raise ValueError(f"cannot write {value} in 16 characters")


@dataclass(frozen=True)
class PatientInfo:
    """Patient module attributes, shared by every study of one patient.

    Args:
        name: Patient's Name in DICOM PN form (``"Family^Given"``).
        patient_id: Patient ID.
        birth_date: Patient's Birth Date, or ``None`` for unknown (written empty).
        sex: Patient's Sex: ``"M"``, ``"F"``, ``"O"`` or ``""``.
    """

    name: str
    patient_id: str
    birth_date: dt.date | None = None
    sex: str = "M"

    def __post_init__(self) -> None:
        if self.sex not in ("M", "F", "O", ""):
            raise ValueError(f"PatientInfo.sex must be 'M', 'F', 'O' or '', got {self.sex!r}")
        if not self.patient_id or len(self.patient_id) > 64:
            raise ValueError(f"PatientInfo.patient_id must have 1 to 64 characters, got {self.patient_id!r}")


@dataclass(frozen=True)
class StudyInfo:
    """General Study module attributes of one study (e.g. the planning CT study or one daily CT study).

    Args:
        study_instance_uid: Study Instance UID.
        study_datetime: Study Date and Time; also the default date/time of the series in it.
        study_id: Study ID (at most 16 characters).
        accession_number: Accession Number (at most 16 characters).
        referring_physician_name: Referring Physician's Name (PN), may be empty.
        description: Study Description.
    """

    study_instance_uid: str = field(default_factory=make_uid)
    study_datetime: dt.datetime = field(default_factory=lambda: dt.datetime.now().replace(microsecond=0))
    study_id: str = "1"
    accession_number: str = ""
    referring_physician_name: str = ""
    description: str = ""

    def __post_init__(self) -> None:
        if len(self.study_id) > 16 or len(self.accession_number) > 16:
            raise ValueError("StudyInfo.study_id and accession_number must have at most 16 characters")


@dataclass(frozen=True)
class EquipmentInfo:
    """General (and Enhanced General) Equipment module attributes.

    Args:
        manufacturer: Manufacturer.
        model_name: Manufacturer's Model Name.
        software_versions: Software Versions.
        device_serial_number: Device Serial Number.
        station_name: Station Name.
        institution_name: Institution Name.
    """

    manufacturer: str = "prostate-jrs"
    model_name: str = "prostate-jrs"
    software_versions: str = field(default_factory=package_version)
    device_serial_number: str = "0"
    station_name: str = ""
    institution_name: str = ""


def add_patient_and_study(ds: Dataset, patient: PatientInfo, study: StudyInfo) -> None:
    """Set the Patient and General Study modules on ``ds``."""
    ds.PatientName = patient.name
    ds.PatientID = patient.patient_id
    ds.PatientBirthDate = "" if patient.birth_date is None else dicom_date(patient.birth_date)
    ds.PatientSex = patient.sex
    ds.StudyInstanceUID = study.study_instance_uid
    ds.StudyDate = dicom_date(study.study_datetime)
    ds.StudyTime = dicom_time(study.study_datetime)
    ds.StudyID = study.study_id
    ds.AccessionNumber = study.accession_number
    ds.ReferringPhysicianName = study.referring_physician_name
    if study.description:
        ds.StudyDescription = study.description


def copy_patient_and_study(ds: Dataset, source: Dataset) -> None:
    """Copy the Patient and General Study modules from ``source`` (an image of the referenced series) to ``ds``.

    Type 2 attributes missing in ``source`` are written empty, so the result stays conformant.
    """
    for keyword in (
        "PatientName",
        "PatientID",
        "PatientBirthDate",
        "PatientSex",
        "StudyInstanceUID",
        "StudyDate",
        "StudyTime",
        "StudyID",
        "AccessionNumber",
        "ReferringPhysicianName",
    ):
        setattr(ds, keyword, source.get(keyword, ""))
    for keyword in ("StudyDescription", "PatientAge", "OtherPatientIDs"):
        if keyword in source:
            setattr(ds, keyword, source[keyword].value)


def new_derived_instance(
    sop_class_uid: str,
    modality: str,
    source: Dataset,
    when: dt.datetime,
    *,
    sop_instance_uid: str | None,
    series_instance_uid: str | None,
    series_number: int,
    series_description: str,
    operators_name: str = "",
) -> Dataset:
    """A new instance in a new series of ``source``'s patient and study: SOP Common, Patient, General Study, Series.

    Args:
        sop_class_uid: SOP Class UID of the new instance.
        modality: Modality of its series (e.g. ``RTSTRUCT``, ``REG``).
        source: an image of the series the instance refers to (patient and study are copied from it).
        when: instance creation and series date/time.
        sop_instance_uid: SOP Instance UID; a new one when ``None``.
        series_instance_uid: Series Instance UID; a new one when ``None``.
        series_number: Series Number.
        series_description: Series Description.
        operators_name: Operators' Name (Type 2: may be empty).
    """
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = sop_class_uid
    ds.SOPInstanceUID = sop_instance_uid or make_uid()
    ds.InstanceCreationDate, ds.InstanceCreationTime = dicom_date(when), dicom_time(when)
    copy_patient_and_study(ds, source)
    ds.Modality = modality
    ds.SeriesInstanceUID = series_instance_uid or make_uid()
    ds.SeriesNumber = series_number
    ds.SeriesDate, ds.SeriesTime = dicom_date(when), dicom_time(when)
    ds.SeriesDescription = series_description
    ds.OperatorsName = operators_name
    return ds


def add_equipment(ds: Dataset, equipment: EquipmentInfo) -> None:
    """Set the General Equipment module (all Enhanced General Equipment attributes included) on ``ds``."""
    ds.Manufacturer = equipment.manufacturer
    ds.ManufacturerModelName = equipment.model_name
    ds.SoftwareVersions = equipment.software_versions
    ds.DeviceSerialNumber = equipment.device_serial_number
    if equipment.station_name:
        ds.StationName = equipment.station_name
    if equipment.institution_name:
        ds.InstitutionName = equipment.institution_name


def file_meta_for(ds: Dataset) -> FileMetaDataset:
    """File meta information (Explicit VR Little Endian) for ``ds``, which must have SOP Class and Instance UIDs."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = IMPLEMENTATION_CLASS_UID
    meta.ImplementationVersionName = f"PJRS_{package_version()}"[:16]
    return meta


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(ds: Dataset, path: str | os.PathLike[str]) -> Path:
    """Write ``ds`` as a DICOM file (Part 10, Explicit VR Little Endian): completely or not at all.

    The file is written to a temporary file in the same folder and moved into place with :func:`os.replace`.

    Args:
        ds: the dataset; it gets file meta information if it has none.
        path: the file to write; its folder is created.

    Returns:
        The path written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not getattr(ds, "file_meta", None) or "TransferSyntaxUID" not in ds.file_meta:
        ds.file_meta = file_meta_for(ds)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp creates the file private (0600); a gateway or PACS user must be able to read the output
        os.fchmod(fd, 0o666 & ~_current_umask())
        with os.fdopen(fd, "wb") as handle:
            pydicom.dcmwrite(handle, ds, enforce_file_format=True)
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
    return path


class DamagedFileError(ProstateJRSError, ValueError):
    """A file with the DICOM Part 10 prefix that is truncated or corrupt.

    Args:
        path: the file.
        reason: what is wrong, for messages.
        dataset: what could be parsed (``None`` when nothing could); it may identify the series the file belongs to.
    """

    def __init__(self, path: Path, reason: str, dataset: Dataset | None = None) -> None:
        super().__init__(f"{path}: truncated or corrupt DICOM file ({reason})")
        self.path = path
        self.reason = reason
        self.dataset = dataset


_UNDEFINED_LENGTH = 0xFFFFFFFF


def _short_element(ds: Dataset) -> str | None:
    """The first top-level element whose value is shorter than its header declares, described; else ``None``."""
    for element in ds.elements():
        if (
            isinstance(element, RawDataElement)
            and element.value is not None
            and element.length != _UNDEFINED_LENGTH
            and len(element.value) < element.length
        ):
            tag = element.tag
            return (
                f"element ({tag.group:04X},{tag.element:04X}) declares {element.length} bytes but the file ends after "
                f"{len(element.value)}"
            )
    return None


def _structure_problem(ds: Dataset) -> str | None:
    """Parse every element of ``ds`` (recursively); the first element the dictionary makes a sequence that is none.

    A sequence written with another VR (a PACS that lost the VR, a broken writer) parses into a number or bytes; every
    reader would then fail on it in its own way, so it is named here.
    """
    for element in ds.iterall():
        known = element.VR != "SQ" and pydicom.datadict.dictionary_has_tag(element.tag)
        if known and pydicom.datadict.dictionary_VR(element.tag) == "SQ":
            tag = element.tag
            return (
                f"element ({tag.group:04X},{tag.element:04X}) {element.keyword} has VR {element.VR}; expected a "
                "sequence (SQ)"
            )
    return None


def read_dicom(path: str | os.PathLike[str], **kwargs: object) -> Dataset:
    """:func:`pydicom.dcmread` that refuses a truncated or corrupt file instead of returning the part it parsed.

    pydicom stops quietly at the end of a truncated file: the last value comes back short (half the pixel data) or
    the elements after the cut are simply missing, and bytes after a ``DICM`` prefix that are not DICOM at all parse
    into nonsense elements. A CT slice or RTSTRUCT read that way loses pixels, slices or contours without a word, so
    this parses every element (pydicom would otherwise convert them lazily, and fail later, wherever they are first
    used), checks that no sequence was written with another VR, that every element read is as long as its header
    declares, that pydicom did not reach the end of the file inside a sequence or an undefined-length value, and that
    the file meta information names a transfer syntax.
    Files cut exactly between two elements pass: callers check that the elements they need are present.

    Args:
        path: the file.
        **kwargs: passed to :func:`pydicom.dcmread` (e.g. ``stop_before_pixels``, ``specific_tags``).

    Returns:
        The dataset.

    Raises:
        pydicom.errors.InvalidDicomError: if the file is not DICOM Part 10 (no ``DICM`` prefix): not damaged, just
            not DICOM.
        DamagedFileError: if it has the prefix but cannot be read completely; the message names the file.
    """
    path = Path(path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            ds = pydicom.dcmread(path, **kwargs)  # type: ignore[arg-type]
        except pydicom.errors.InvalidDicomError:
            raise
        except Exception as err:  # pydicom raises many types on damaged files (struct.error, ValueError, OSError, ...)
            raise DamagedFileError(path, f"cannot be parsed: {type(err).__name__}: {err}") from err
        meta = getattr(ds, "file_meta", None)
        problem = (
            "no Transfer Syntax UID (0002,0010) in the file meta information"
            if meta is None or "TransferSyntaxUID" not in meta
            else _short_element(meta) or _short_element(ds)  # before the elements are converted below
        )
        if not problem:
            try:  # pydicom converts elements lazily: parse them all now, so that a damaged one fails here, not later
                problem = _structure_problem(ds)
            except Exception as err:
                problem = f"cannot be parsed: {type(err).__name__}: {err}"
    eof = [str(w.message) for w in caught if "end of file" in str(w.message).lower()]
    problem = eof[0] if eof else problem
    if problem:
        raise DamagedFileError(path, problem, ds)
    for w in caught:  # a complete file: keep pydicom's warnings visible, as without the check
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return ds


def code_item(value: str, scheme: str, meaning: str) -> Dataset:
    """A code sequence item (Code Value, Coding Scheme Designator, Code Meaning)."""
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


def ds_list(values: Iterable[float]) -> list[str]:
    """Values as Decimal Strings of at most 16 characters each (see :func:`format_ds`)."""
    return [format_ds(v) for v in values]


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
    if not reference_series:
        raise ValueError(f"reference_series is empty; expected the CT images the {what} lies on")
    for keyword in ("PatientID", "StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID"):
        values = {str(ds.get(keyword, "")) for ds in reference_series}
        if len(values) != 1:
            raise ValueError(f"reference_series mixes {keyword} values {sorted(values)}; expected one CT series")
        if keyword == "FrameOfReferenceUID" and values == {""}:
            raise ValueError(f"reference_series has no FrameOfReferenceUID; the {what} needs a frame of reference")
    # an image read from DICOM (GDCM, ct_reader) carries its Frame of Reference UID: same grid in another frame is
    # another place
    grid_frame = (
        grid.GetMetaData(_FRAME_OF_REFERENCE_KEY).strip(" \x00") if grid.HasMetaDataKey(_FRAME_OF_REFERENCE_KEY) else ""
    )
    series_frame = str(reference_series[0].FrameOfReferenceUID)
    if grid_frame and grid_frame != series_frame:
        raise ValueError(
            f"the {what} is in frame of reference {grid_frame} but the CT series in {series_frame}: "
            "they do not fit each other"
        )
    size = grid.GetSize()
    direction = np.asarray(grid.GetDirection(), dtype=np.float64).reshape(3, 3)
    spacing = grid.GetSpacing()
    to_index = np.linalg.inv(index_to_world(grid))
    by_slice: dict[int, Dataset] = {}
    for ds in reference_series:
        name = f"CT image {ds.get('SOPInstanceUID', '?')} (instance {ds.get('InstanceNumber', '?')})"
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
        if k in by_slice:
            raise ValueError(f"{name} and another image of the series both lie on slice {k}")
        by_slice[k] = ds
    missing = sorted(set(range(size[2])) - set(by_slice))
    if missing:
        raise ValueError(f"the reference series has no image for slices {missing} of the {what}: not on the CT grid")
    return [by_slice[k] for k in range(size[2])]
