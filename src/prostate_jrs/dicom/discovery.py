"""Find the planning CT, its RTSTRUCT and the daily CT of one adaptive session in a folder of DICOM files.

:func:`scan_folder` walks a folder (recursively) and reads headers only; :func:`select_session` picks:

* the planning RTSTRUCT: the only one, the latest (Structure Set Date/Time), or the one given by SOP Instance UID;
* the planning CT: the series the RTSTRUCT references (Referenced Frame of Reference Sequence -> RT Referenced
  Study -> RT Referenced Series), or, when that reference is missing, the only CT series in the referenced frame
  of reference; every image the RTSTRUCT's Contour Image Sequence names must be in it;
* the daily CT: another CT series of the same patient in another frame of reference (a series in the planning
  CT's frame of reference is another reconstruction of the planning scan), the latest by acquisition, series or
  study date and time; or the one given by Series Instance UID.

Safety rules that no option switches off: series of different patients are never combined (Patient ID, and
Patient's Name, Birth Date and Issuer of Patient ID where both sides have them), and the RTSTRUCT's frame of
reference must be the planning CT's. Series of other patients in the folder are left out and reported.

Files with the DICOM prefix that are truncated or corrupt (:func:`prostate_jrs.dicom.files.read_dicom`) are never
silently dropped: one that belongs to a selected series, or whose series cannot be told, stops the selection with
its path (the selected CT could otherwise miss a slice, or a newer RTSTRUCT be overlooked); one that what remains of
its header places in another patient's or another, unselected series is left out with a note.
"""

from __future__ import annotations

import datetime as dt
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypedDict, TypeVar

import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.uid import MediaStorageDirectoryStorage

from prostate_jrs.dicom.files import DamagedFileError, read_dicom
from prostate_jrs.errors import DicomSelectionError

__all__ = [
    "AdaptiveSession",
    "DicomInventory",
    "DicomSelectionError",
    "SeriesInfo",
    "StructureSetInfo",
    "UnreadableFile",
    "check_one_patient",
    "not_a_volume",
    "scan_folder",
    "select_session",
]

_IMAGE_TAGS = [
    "SOPClassUID",
    "SOPInstanceUID",
    "Modality",
    "PatientID",
    "PatientName",
    "PatientBirthDate",
    "IssuerOfPatientID",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "SeriesInstanceUID",
    "SeriesNumber",
    "SeriesDate",
    "SeriesTime",
    "SeriesDescription",
    "AcquisitionDate",
    "AcquisitionTime",
    "AcquisitionDateTime",
    "FrameOfReferenceUID",
    "ImageType",
    "NumberOfFrames",
    "StructureSetLabel",
    "StructureSetDate",
    "StructureSetTime",
    "InstanceCreationDate",
    "InstanceCreationTime",
    "ReferencedFrameOfReferenceSequence",
    "StructureSetROISequence",
    "ApprovalStatus",
    "ReferencedStructureSetSequence",
    "RTPlanDate",
    "RTPlanTime",
]
"""Tags read by the scan: everything else (pixels, contour data) is skipped while parsing."""


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    return "" if value is None else str(value).strip()


def _datetime(date: str, time: str) -> dt.datetime | None:
    """Parse DICOM DA + TM (time optional, fractions and missing parts allowed); ``None`` when no valid date."""
    date = date.strip()
    if len(date) != 8 or not date.isdigit():
        return None
    time = re.split(r"[.+-]", time.strip())[0].replace(":", "")  # drop fractions and a UTC offset
    time = (time + "000000")[:6] if time.isdigit() else "000000"
    try:
        return dt.datetime.strptime(date + time, "%Y%m%d%H%M%S")
    except ValueError:
        return None


@dataclass
class SeriesInfo:
    """Key attributes of one image series found by :func:`scan_folder`.

    Args:
        series_instance_uid: Series Instance UID.
        modality: Modality (``"CT"``, ``"MR"``, ...).
        patient_id: Patient ID.
        patient_name: Patient's Name.
        patient_birth_date: Patient's Birth Date (DA string, may be empty).
        issuer_of_patient_id: Issuer of Patient ID (may be empty).
        study_instance_uid: Study Instance UID.
        study_date: Study Date. study_time: Study Time.
        series_date: Series Date. series_time: Series Time.
        acquisition: earliest acquisition date and time of the instances, if any has one.
        series_number: Series Number, if present.
        description: Series Description.
        frame_of_reference_uid: Frame of Reference UID.
        files: instance files, sorted by path.
        sop_instance_uids: SOP Instance UIDs, in the order of ``files``.
        image_types: distinct Image Type values seen.
        multiframe: whether any instance has more than one frame.
        referenced_structure_sets: SOP Instance UIDs of the structure sets its instances reference
            (Referenced Structure Set Sequence of an RTPLAN), in order of appearance.
        plan_datetime: latest RT Plan Date/Time of its instances (RTPLAN), if any.
    """

    series_instance_uid: str
    modality: str
    patient_id: str
    patient_name: str
    patient_birth_date: str
    issuer_of_patient_id: str
    study_instance_uid: str
    study_date: str
    study_time: str
    series_date: str
    series_time: str
    acquisition: dt.datetime | None
    series_number: int | None
    description: str
    frame_of_reference_uid: str
    files: list[Path] = field(default_factory=list)
    sop_instance_uids: list[str] = field(default_factory=list)
    image_types: set[str] = field(default_factory=set)
    multiframe: bool = False
    referenced_structure_sets: list[str] = field(default_factory=list)
    plan_datetime: dt.datetime | None = None

    @property
    def datetime(self) -> dt.datetime | None:
        """When the series was acquired: acquisition, else series, else study date and time."""
        return (
            self.acquisition
            or _datetime(self.series_date, self.series_time)
            or _datetime(self.study_date, self.study_time)
        )

    @property
    def is_localizer(self) -> bool:
        """Whether the series is a scout/localizer (Image Type LOCALIZER), which is no volume."""
        return any("LOCALIZER" in t for t in self.image_types)

    def describe(self) -> str:
        """One line for messages: UID, modality, description, date, number of instances."""
        when = self.datetime.isoformat(sep=" ") if self.datetime else "no date"
        return (
            f"{self.modality} series {self.series_instance_uid} ({self.description or 'no description'}, {when}, "
            f"{len(self.files)} file(s), patient {self.patient_id!r})"
        )


@dataclass
class StructureSetInfo:
    """Key attributes of one RTSTRUCT instance found by :func:`scan_folder`.

    Args:
        path: the file.
        sop_instance_uid: SOP Instance UID.
        series_instance_uid: Series Instance UID (of the RTSTRUCT series).
        patient_id, patient_name, patient_birth_date, issuer_of_patient_id: Patient module.
        study_instance_uid: Study Instance UID.
        label: Structure Set Label.
        datetime: Structure Set Date/Time, else Instance Creation, else Series, else Study Date/Time.
        frame_of_reference_uids: Frame of Reference UIDs in the Referenced Frame of Reference Sequence and the
            ROIs' Referenced Frame of Reference UIDs.
        referenced_images: Series Instance UID of each RT Referenced Series -> SOP Instance UIDs of its Contour
            Image Sequence (the images contoured on); empty when the RTSTRUCT references no series.
        roi_names: ROI Names of the Structure Set ROI Sequence.
        approval_status: Approval Status (300E,0002): ``APPROVED``, ``UNAPPROVED``, ``REJECTED`` or empty when absent.
    """

    path: Path
    sop_instance_uid: str
    series_instance_uid: str
    patient_id: str
    patient_name: str
    patient_birth_date: str
    issuer_of_patient_id: str
    study_instance_uid: str
    label: str
    datetime: dt.datetime | None
    frame_of_reference_uids: list[str]
    referenced_images: dict[str, list[str]]
    roi_names: list[str]
    approval_status: str = ""

    @property
    def referenced_series_uids(self) -> list[str]:
        """Series Instance UIDs of the RT Referenced Series Sequence (empty when missing)."""
        return list(self.referenced_images)


@dataclass
class UnreadableFile:
    """A file with the DICOM prefix that cannot be read completely, and what its intact elements say about it.

    Args:
        path: the file.
        reason: what is wrong (truncated, corrupt, no SOP or Series Instance UID, ...).
        modality: Modality, if an intact element gives it (else empty).
        patient_id: Patient ID, if an intact element gives it.
        series_instance_uid: Series Instance UID, if an intact element gives it.
        sop_instance_uid: SOP Instance UID (or the file meta's Media Storage SOP Instance UID), if intact.
    """

    path: Path
    reason: str
    modality: str = ""
    patient_id: str = ""
    series_instance_uid: str = ""
    sop_instance_uid: str = ""

    def describe(self) -> str:
        """One line for messages: the path, the reason and what is known about the file."""
        known = [
            f"{label} {value}"
            for label, value in (
                ("Modality", self.modality),
                ("patient", repr(self.patient_id) if self.patient_id else ""),
                ("series", self.series_instance_uid),
            )
            if value
        ]
        return f"{self.path} ({self.reason}{'; ' + ', '.join(known) if known else ''})"


@dataclass
class DicomInventory:
    """What :func:`scan_folder` found.

    Args:
        folder: the folder scanned.
        series: image series by Series Instance UID (RTSTRUCTs are not in it).
        structure_sets: RTSTRUCT instances.
        non_dicom_files: files that are not DICOM Part 10 files (skipped).
        dicomdir_files: DICOMDIR files (skipped: the scan reads the files themselves).
        unreadable_files: files with the DICOM prefix that are truncated or corrupt, or lack a SOP or Series Instance
            UID (which every image and structure set has; without one the file cannot be placed): what is known of
            each. :func:`select_session` refuses those that may belong to the session.
        hidden: hidden files and folders (names starting with ``.``), not scanned.
        duplicate_files: further copies of an image instance already in its series (same SOP Instance UID), skipped.

    Other modalities (RTPLAN, RTDOSE, REG, MR, ...) are series like the CTs; the selection only takes CT series.
    """

    folder: Path
    series: dict[str, SeriesInfo] = field(default_factory=dict)
    structure_sets: list[StructureSetInfo] = field(default_factory=list)
    non_dicom_files: list[Path] = field(default_factory=list)
    dicomdir_files: list[Path] = field(default_factory=list)
    unreadable_files: list[UnreadableFile] = field(default_factory=list)
    hidden: list[Path] = field(default_factory=list)
    duplicate_files: list[Path] = field(default_factory=list)

    def patients(self) -> set[str]:
        """Patient IDs of every series and structure set."""
        return {s.patient_id for s in self.series.values()} | {s.patient_id for s in self.structure_sets}

    def summary(self) -> str:
        """One line per series and structure set, for error messages."""
        lines = [f"  {s.describe()}" for s in self.series.values()]
        lines += [
            f"  RTSTRUCT {s.sop_instance_uid} ({s.path.name}, label {s.label!r}, patient {s.patient_id!r})"
            for s in self.structure_sets
        ]
        if not lines:
            lines.append("  (no DICOM image series or RTSTRUCT)")
        if self.non_dicom_files:
            # files without the Part 10 header ('DICM') are not read; say so, they may be DICOM from an old system
            lines.append(
                f"  and {len(self.non_dicom_files)} file(s) skipped as not DICOM Part 10 (no 'DICM' file header), "
                f"e.g. {self.non_dicom_files[0]}"
            )
        return "\n".join(lines)


@dataclass
class AdaptiveSession:
    """The inputs of one adaptive fraction, selected from a folder.

    Args:
        patient_id: Patient ID shared by all three inputs.
        planning_ct: the planning CT series.
        planning_rtstruct: the planning RTSTRUCT.
        daily_ct: the daily CT series.
        notes: what the selection chose, assumed or left out, for the log and the QA report.
        inventory: everything the scan found.
    """

    patient_id: str
    planning_ct: SeriesInfo
    planning_rtstruct: StructureSetInfo
    daily_ct: SeriesInfo
    notes: list[str]
    inventory: DicomInventory


def _iter_files(folder: Path, hidden: list[Path]) -> Iterable[Path]:
    """Files under ``folder`` in a stable order; hidden files and folders go to ``hidden`` instead.

    Hidden names are skipped because writers (this project's included) stage incomplete files under them.
    """
    for root, dirs, files in os.walk(folder):
        hidden += [Path(root) / d for d in dirs if d.startswith(".")]
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if name.startswith("."):
                hidden.append(Path(root) / name)
            else:
                yield Path(root) / name


class _PatientAndStudy(TypedDict):
    patient_id: str
    patient_name: str
    patient_birth_date: str
    issuer_of_patient_id: str
    study_instance_uid: str


def _patient_and_study(ds: Dataset) -> _PatientAndStudy:
    """The patient identity and study of a header, as :class:`SeriesInfo` and :class:`StructureSetInfo` hold them."""
    return _PatientAndStudy(
        patient_id=_text(ds, "PatientID"),
        patient_name=_text(ds, "PatientName"),
        patient_birth_date=_text(ds, "PatientBirthDate"),
        issuer_of_patient_id=_text(ds, "IssuerOfPatientID"),
        study_instance_uid=_text(ds, "StudyInstanceUID"),
    )


def _structure_set_info(ds: Dataset, path: Path) -> StructureSetInfo:
    frames: list[str] = []
    images: dict[str, list[str]] = {}
    for frame in ds.get("ReferencedFrameOfReferenceSequence", []):
        if _text(frame, "FrameOfReferenceUID"):
            frames.append(_text(frame, "FrameOfReferenceUID"))
        for study in frame.get("RTReferencedStudySequence", []):
            for series in study.get("RTReferencedSeriesSequence", []):
                sop_uids = images.setdefault(_text(series, "SeriesInstanceUID"), [])
                sop_uids += [
                    _text(image, "ReferencedSOPInstanceUID") for image in series.get("ContourImageSequence", [])
                ]
    roi_names = []
    for roi in ds.get("StructureSetROISequence", []):
        roi_names.append(_text(roi, "ROIName"))
        if _text(roi, "ReferencedFrameOfReferenceUID"):
            frames.append(_text(roi, "ReferencedFrameOfReferenceUID"))
    when = (
        _datetime(_text(ds, "StructureSetDate"), _text(ds, "StructureSetTime"))
        or _datetime(_text(ds, "InstanceCreationDate"), _text(ds, "InstanceCreationTime"))
        or _datetime(_text(ds, "SeriesDate"), _text(ds, "SeriesTime"))
        or _datetime(_text(ds, "StudyDate"), _text(ds, "StudyTime"))
    )
    return StructureSetInfo(
        path=path,
        sop_instance_uid=_text(ds, "SOPInstanceUID"),
        series_instance_uid=_text(ds, "SeriesInstanceUID"),
        **_patient_and_study(ds),
        label=_text(ds, "StructureSetLabel"),
        datetime=when,
        frame_of_reference_uids=list(dict.fromkeys(frames)),
        referenced_images={uid: list(dict.fromkeys(sops)) for uid, sops in images.items() if uid},
        roi_names=roi_names,
        approval_status=_text(ds, "ApprovalStatus").upper(),
    )


def _add_image(inventory: DicomInventory, ds: Dataset, path: Path) -> None:
    uid = _text(ds, "SeriesInstanceUID")
    series = inventory.series.get(uid)
    if series is None:
        number = ds.get("SeriesNumber")
        series = SeriesInfo(
            series_instance_uid=uid,
            modality=_text(ds, "Modality"),
            **_patient_and_study(ds),
            study_date=_text(ds, "StudyDate"),
            study_time=_text(ds, "StudyTime"),
            series_date=_text(ds, "SeriesDate"),
            series_time=_text(ds, "SeriesTime"),
            acquisition=None,
            series_number=None if number in (None, "") else int(number),
            description=_text(ds, "SeriesDescription"),
            frame_of_reference_uid=_text(ds, "FrameOfReferenceUID"),
        )
        inventory.series[uid] = series
    elif _text(ds, "PatientID") != series.patient_id:
        # one Series Instance UID with two patients is corrupt input; never guess which files belong together
        raise DicomSelectionError(
            f"{path}: PatientID {_text(ds, 'PatientID')!r} differs from {series.patient_id!r} in {series.files[0]}, "
            f"although both belong to series {uid}; a series must hold one patient"
        )
    if _text(ds, "SOPInstanceUID") in series.sop_instance_uids:
        inventory.duplicate_files.append(path)  # the same instance twice (e.g. two exports): read it once
        return
    series.files.append(path)
    series.sop_instance_uids.append(_text(ds, "SOPInstanceUID"))
    if ds.get("ImageType"):
        series.image_types.add("\\".join(str(v) for v in ds.ImageType))
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        series.multiframe = True
    acquisition_datetime = _text(ds, "AcquisitionDateTime")
    acquired = _datetime(acquisition_datetime[:8], acquisition_datetime[8:]) or _datetime(
        _text(ds, "AcquisitionDate"), _text(ds, "AcquisitionTime")
    )
    if acquired is not None and (series.acquisition is None or acquired < series.acquisition):
        series.acquisition = acquired
    for reference in ds.get("ReferencedStructureSetSequence", []):  # an RTPLAN names the contours it was planned on
        structure_set = _text(reference, "ReferencedSOPInstanceUID")
        if structure_set and structure_set not in series.referenced_structure_sets:
            series.referenced_structure_sets.append(structure_set)
    planned = _datetime(_text(ds, "RTPlanDate"), _text(ds, "RTPlanTime"))
    if planned is not None and (series.plan_datetime is None or planned > series.plan_datetime):
        series.plan_datetime = planned


def scan_folder(folder: str | os.PathLike[str]) -> DicomInventory:
    """Read the headers of every file under ``folder`` and group them into series and structure sets.

    Non-DICOM files (no Part 10 preamble) and DICOMDIR files are skipped and counted, not read.

    Args:
        folder: the input folder.

    Returns:
        The inventory.

    Raises:
        DicomSelectionError: if ``folder`` is not a folder, or one series holds two patients.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DicomSelectionError(f"{folder}: not a folder; expected a folder of DICOM files")
    inventory = DicomInventory(folder=folder)
    for path in _iter_files(folder, inventory.hidden):
        try:
            ds = read_dicom(path, stop_before_pixels=True, specific_tags=_IMAGE_TAGS)
        except pydicom.errors.InvalidDicomError:
            inventory.non_dicom_files.append(path)
            continue
        except DamagedFileError as err:  # reported; select_session decides whether the session can do without it
            inventory.unreadable_files.append(_unreadable(path, err.reason, err.dataset))
            continue
        storage_class = ds.file_meta.get("MediaStorageSOPClassUID") if hasattr(ds, "file_meta") else None
        try:
            if path.name.upper() == "DICOMDIR" or storage_class == MediaStorageDirectoryStorage:
                inventory.dicomdir_files.append(path)
            elif _text(ds, "Modality") == "RTSTRUCT":
                inventory.structure_sets.append(_structure_set_info(ds, path))
            elif not _text(ds, "SeriesInstanceUID") or not _text(ds, "SOPInstanceUID"):
                # every image has both; without them the file cannot be placed in a series (cut after its first
                # elements, or garbage after a DICM prefix that happens to parse)
                missing = [k for k in ("SOPInstanceUID", "SeriesInstanceUID") if not _text(ds, k)]
                reason = f"no {' or '.join(f'{k} {_tag(k)}' for k in missing)}; truncated or not an image"
                inventory.unreadable_files.append(_unreadable(path, reason, ds))
            else:
                _add_image(inventory, ds, path)
        except DicomSelectionError:
            raise
        except Exception as err:  # values that do not parse (e.g. a corrupt sequence): the file is damaged
            inventory.unreadable_files.append(_unreadable(path, f"{type(err).__name__}: {err}", ds))
    for series in inventory.series.values():
        order = sorted(range(len(series.files)), key=lambda i: series.files[i])
        series.files = [series.files[i] for i in order]
        series.sop_instance_uids = [series.sop_instance_uids[i] for i in order]
    return inventory


def _tag(keyword: str) -> str:
    tag = pydicom.datadict.tag_for_keyword(keyword) or 0
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


def _intact_text(ds: Dataset | None, keyword: str) -> str:
    """``keyword``'s value if the element is present and complete in a possibly truncated dataset, else ``""``.

    The element a file was cut in holds a prefix of its value (half a UID): never use it to place the file.
    """
    if ds is None:
        return ""
    try:
        tag = pydicom.datadict.tag_for_keyword(keyword)
        if tag is None or tag not in ds:
            return ""
        element = ds.get_item(tag)
        if isinstance(element, RawDataElement) and element.value is not None and len(element.value) < element.length:
            return ""
        return _text(ds, keyword)
    except Exception:  # any element of a damaged file may fail to convert: then it tells nothing
        return ""


def _unreadable(path: Path, reason: str, ds: Dataset | None) -> UnreadableFile:
    """An :class:`UnreadableFile` with what the intact elements of ``ds`` (partly parsed, or ``None``) tell."""
    meta = getattr(ds, "file_meta", None)
    return UnreadableFile(
        path=path,
        reason=reason,
        modality=_intact_text(ds, "Modality"),
        patient_id=_intact_text(ds, "PatientID"),
        series_instance_uid=_intact_text(ds, "SeriesInstanceUID"),
        sop_instance_uid=_intact_text(ds, "SOPInstanceUID") or _intact_text(meta, "MediaStorageSOPInstanceUID"),
    )


def _normalised_name(name: str) -> str:
    # trailing empty PN components and case differ between systems writing the same patient
    return "^".join(part.strip() for part in name.upper().split("=")[0].split("^")).rstrip("^")


def _check_same_patient(
    reference: SeriesInfo | StructureSetInfo, other: SeriesInfo | StructureSetInfo, what: str, other_what: str
) -> None:
    """Refuse two inputs of different patients (safety rule: no option switches this off)."""

    def where(item: SeriesInfo | StructureSetInfo) -> str:
        return str(item.path) if isinstance(item, StructureSetInfo) else f"series {item.series_instance_uid}"

    if not reference.patient_id or not other.patient_id:
        missing = where(reference) if not reference.patient_id else where(other)
        raise DicomSelectionError(
            f"{missing}: no PatientID (0010,0020); cannot verify that the {what} and the {other_what} belong to "
            "one patient"
        )
    checks = [
        ("PatientID (0010,0020)", reference.patient_id, other.patient_id),
        ("IssuerOfPatientID (0010,0021)", reference.issuer_of_patient_id, other.issuer_of_patient_id),
        ("PatientBirthDate (0010,0030)", reference.patient_birth_date, other.patient_birth_date),
        ("PatientName (0010,0010)", _normalised_name(reference.patient_name), _normalised_name(other.patient_name)),
    ]
    for attribute, mine, theirs in checks:
        if mine and theirs and mine != theirs:
            raise DicomSelectionError(
                f"the {what} ({where(reference)}) and the {other_what} ({where(other)}) belong to different patients: "
                f"{attribute} {mine!r} vs {theirs!r}; series of different patients are never combined"
            )


_Dated = TypeVar("_Dated", SeriesInfo, StructureSetInfo)


def _by_datetime(
    candidates: list[_Dated], undated: Callable[[_Dated], str], tie: Callable[[_Dated, _Dated], str]
) -> list[_Dated]:
    """Two or more candidates, oldest first, when the latest is certain.

    Args:
        candidates: series or structure sets to choose the latest of.
        undated: the message for a candidate without date and time.
        tie: the message for the two latest candidates when they have the same date and time.

    Raises:
        DicomSelectionError: if a candidate has no date and time, or the two latest share theirs: never guess.
    """
    missing = [c for c in candidates if c.datetime is None]
    if missing:
        raise DicomSelectionError(undated(missing[0]))
    ordered = sorted(candidates, key=lambda c: c.datetime)  # type: ignore[arg-type, return-value]
    if ordered[-1].datetime == ordered[-2].datetime:
        raise DicomSelectionError(tie(ordered[-1], ordered[-2]))
    return ordered


def _pick_rtstruct(
    inventory: DicomInventory, rtstruct_sop_uid: str | None, patient_id: str | None, notes: list[str]
) -> StructureSetInfo:
    candidates = inventory.structure_sets
    if not candidates:
        raise DicomSelectionError(
            f"{inventory.folder}: no RTSTRUCT found; expected the planning structure set (Modality RTSTRUCT) beside "
            f"the planning CT. Found:\n{inventory.summary()}"
        )
    if rtstruct_sop_uid is not None:
        matching = [s for s in candidates if s.sop_instance_uid == rtstruct_sop_uid]
        if not matching:
            raise DicomSelectionError(
                f"{inventory.folder}: no RTSTRUCT with SOP Instance UID {rtstruct_sop_uid}; found "
                + ", ".join(f"{s.sop_instance_uid} ({s.path.name})" for s in candidates)
            )
        return matching[0]
    if patient_id is not None:
        candidates = [s for s in candidates if s.patient_id == patient_id]
        if not candidates:
            raise DicomSelectionError(f"{inventory.folder}: no RTSTRUCT of patient {patient_id!r}")
    patients = sorted({s.patient_id for s in candidates})
    if len(patients) > 1:
        raise DicomSelectionError(
            f"{inventory.folder}: RTSTRUCTs of {len(patients)} patients ({', '.join(map(repr, patients))}); "
            "choose one with patient_id or rtstruct_sop_uid"
        )
    if len(candidates) == 1:
        return candidates[0]
    ordered = _by_datetime(
        candidates,
        undated=lambda s: (
            f"{s.path}: RTSTRUCT has no StructureSetDate (3006,0008), so the latest of {len(candidates)} "
            "RTSTRUCTs cannot be chosen; choose one with rtstruct_sop_uid"
        ),
        tie=lambda last, other: (
            f"{last.path} and {other.path}: two RTSTRUCTs with the same date and time; choose one with rtstruct_sop_uid"
        ),
    )
    chosen = ordered[-1]
    notes.append(
        f"chose the latest of {len(candidates)} RTSTRUCTs: {chosen.path.name} ({chosen.label!r}, {chosen.datetime}); "
        f"left out {', '.join(s.path.name for s in ordered[:-1])}"
    )
    return chosen


def _planning_ct(
    inventory: DicomInventory, rtstruct: StructureSetInfo, planning_series_uid: str | None, notes: list[str]
) -> SeriesInfo:
    referenced = rtstruct.referenced_series_uids
    if planning_series_uid is not None:
        if referenced and planning_series_uid not in referenced:
            raise DicomSelectionError(
                f"{rtstruct.path}: the RTSTRUCT references series {', '.join(referenced)}, not the requested planning "
                f"series {planning_series_uid}"
            )
        referenced = [planning_series_uid]
    if referenced:
        planning = _referenced_series(inventory, rtstruct, referenced)
    else:
        planning = _only_ct_in_frame(inventory, rtstruct, notes)
    _check_planning_ct(inventory, rtstruct, planning)
    return planning


def _referenced_series(inventory: DicomInventory, rtstruct: StructureSetInfo, referenced: list[str]) -> SeriesInfo:
    """The one series of ``referenced`` (the RTSTRUCT's, or the requested one) present in the folder.

    Raises:
        DicomSelectionError: if none is present, or several (unless exactly one of them is a CT).
    """
    present = [inventory.series[uid] for uid in referenced if uid in inventory.series]
    if not present:
        raise DicomSelectionError(
            f"{rtstruct.path}: the RTSTRUCT references series {', '.join(referenced)} (frame of reference "
            f"{', '.join(rtstruct.frame_of_reference_uids) or 'not given'}), which is not in {inventory.folder}; "
            f"expected the planning CT series there. Found:\n{inventory.summary()}"
        )
    if len(present) > 1 and sum(s.modality == "CT" for s in present) == 1:
        present = [s for s in present if s.modality == "CT"]  # e.g. contours referencing a CT and a fused MR
    if len(present) > 1:
        raise DicomSelectionError(
            f"{rtstruct.path}: the RTSTRUCT references {len(present)} series present in {inventory.folder} "
            f"({', '.join(s.series_instance_uid for s in present)}); choose one with planning_series_uid"
        )
    return present[0]


def _only_ct_in_frame(inventory: DicomInventory, rtstruct: StructureSetInfo, notes: list[str]) -> SeriesInfo:
    """The only CT series in the frame of reference of an RTSTRUCT that references no series.

    Raises:
        DicomSelectionError: if the RTSTRUCT names no frame of reference, or no or several CT series are in it.
    """
    frames = rtstruct.frame_of_reference_uids
    if not frames:
        raise DicomSelectionError(
            f"{rtstruct.path}: the RTSTRUCT references neither a series (RTReferencedSeriesSequence (3006,0014)) "
            "nor a frame of reference (ReferencedFrameOfReferenceSequence (3006,0010)); cannot find its CT"
        )
    matches = [s for s in inventory.series.values() if s.modality == "CT" and s.frame_of_reference_uid in frames]
    if not matches:
        raise DicomSelectionError(
            f"{rtstruct.path}: the RTSTRUCT has no RTReferencedSeriesSequence (3006,0014) and no CT series in "
            f"{inventory.folder} has its frame of reference {', '.join(frames)}; expected the planning CT there. "
            f"Found:\n{inventory.summary()}"
        )
    if len(matches) > 1:
        raise DicomSelectionError(
            f"{rtstruct.path}: the RTSTRUCT has no RTReferencedSeriesSequence (3006,0014) and {len(matches)} CT "
            f"series share its frame of reference ({', '.join(s.series_instance_uid for s in matches)}); choose "
            "one with planning_series_uid"
        )
    planning = matches[0]
    notes.append(
        f"{rtstruct.path.name} does not reference a series; took the only CT series in its frame of reference, "
        f"{planning.series_instance_uid}"
    )
    return planning


def _check_planning_ct(inventory: DicomInventory, rtstruct: StructureSetInfo, planning: SeriesInfo) -> None:
    """Refuse a planning CT that is no CT volume, is in another frame of reference than the RTSTRUCT, or lacks an
    image the RTSTRUCT's contours were drawn on."""
    if planning.modality != "CT":
        raise DicomSelectionError(
            f"{rtstruct.path}: the referenced series {planning.series_instance_uid} has Modality "
            f"{planning.modality!r}; expected a planning CT"
        )
    why_not = not_a_volume(planning)
    if why_not:
        raise DicomSelectionError(
            f"{rtstruct.path}: the planning CT series {planning.series_instance_uid} ({len(planning.files)} file(s), "
            f"e.g. {planning.files[0]}) is {why_not}; expected the CT volume the contours were drawn on, with at "
            "least 2 slices"
        )
    if rtstruct.frame_of_reference_uids and planning.frame_of_reference_uid not in rtstruct.frame_of_reference_uids:
        raise DicomSelectionError(
            f"{rtstruct.path}: the RTSTRUCT's frame of reference {', '.join(rtstruct.frame_of_reference_uids)} is not "
            f"the one of its CT series {planning.series_instance_uid} ({planning.frame_of_reference_uid}); the "
            "contours do not fit that CT"
        )
    contoured = rtstruct.referenced_images.get(planning.series_instance_uid, [])
    have = set(planning.sop_instance_uids)
    missing = [uid for uid in contoured if uid not in have]
    if missing:
        raise DicomSelectionError(
            f"{rtstruct.path}: the planning CT series {planning.series_instance_uid} is incomplete: "
            f"{len(missing)} of the {len(contoured)} images the RTSTRUCT's "
            f"ContourImageSequence (3006,0016) references are not in {inventory.folder} (e.g. {missing[0]}); "
            f"found {len(planning.files)} file(s) of that series"
        )


def _storage_class(path: Path) -> str:
    """The name of a file's SOP Class (e.g. "Enhanced CT Image Storage"), for messages."""
    try:
        sop_class = read_dicom(path, specific_tags=["SOPClassUID"]).get("SOPClassUID", "")
    except (pydicom.errors.InvalidDicomError, DamagedFileError):
        return "image"
    return pydicom.uid.UID(str(sop_class)).name or "image"


def not_a_volume(series: SeriesInfo) -> str:
    """Why ``series`` is no CT volume (a localizer, multi-frame or single-slice series), or ``""``."""
    if series.is_localizer:
        return "a localizer (ImageType LOCALIZER)"
    if series.multiframe:
        return (
            f"a multi-frame {_storage_class(series.files[0])} (NumberOfFrames (0028,0008) > 1, e.g. "
            f"{series.files[0]}), which this reader does not take: export it as single-frame CT Image Storage"
        )
    if len(series.files) < 2:
        return f"a single slice ({len(series.files)} file)"
    return ""


def _daily_ct(
    inventory: DicomInventory,
    planning: SeriesInfo,
    rtstruct: StructureSetInfo,
    daily_series_uid: str | None,
    notes: list[str],
) -> SeriesInfo:
    if daily_series_uid is not None:
        return _requested_daily_ct(inventory, planning, rtstruct, daily_series_uid, notes)
    candidates = _daily_candidates(inventory, planning, notes)
    if len(candidates) == 1:
        daily = candidates[0]
    else:
        ordered = _by_datetime(
            candidates,
            undated=lambda s: (
                f"{len(candidates)} candidate daily CT series and {s.describe()} has no acquisition, series "
                "or study date; choose the daily CT with daily_series_uid"
            ),
            tie=lambda last, other: (
                f"two candidate daily CT series were acquired at the same time ({last.series_instance_uid}, "
                f"{other.series_instance_uid}); choose one with daily_series_uid"
            ),
        )
        daily = ordered[-1]
        notes.append(
            f"chose the latest of {len(candidates)} daily CT candidates: {daily.describe()}; left out "
            + ", ".join(s.series_instance_uid for s in ordered[:-1])
        )
    _check_same_patient(planning, daily, "planning CT", "daily CT")
    return daily


def _requested_daily_ct(
    inventory: DicomInventory, planning: SeriesInfo, rtstruct: StructureSetInfo, daily_series_uid: str, notes: list[str]
) -> SeriesInfo:
    """The daily CT the caller named, once checked to be a CT volume of the patient other than the planning CT."""
    daily = inventory.series.get(daily_series_uid)
    if daily is None:
        raise DicomSelectionError(
            f"{inventory.folder}: no series with SeriesInstanceUID {daily_series_uid} (the requested daily CT). "
            f"Found:\n{inventory.summary()}"
        )
    if daily.modality != "CT":
        raise DicomSelectionError(
            f"requested daily series {daily_series_uid} has Modality {daily.modality!r}; expected CT"
        )
    if daily.series_instance_uid == planning.series_instance_uid:
        raise DicomSelectionError(
            f"requested daily series {daily_series_uid} is the planning CT the RTSTRUCT {rtstruct.path.name} "
            "references; expected another CT series"
        )
    if not_a_volume(daily):
        raise DicomSelectionError(
            f"requested daily series {daily_series_uid} is {not_a_volume(daily)}; expected a CT volume"
        )
    _check_same_patient(planning, daily, "planning CT", "requested daily CT")
    if daily.frame_of_reference_uid == planning.frame_of_reference_uid:
        notes.append("the requested daily CT shares the planning CT's frame of reference")
    return daily


def _daily_candidates(inventory: DicomInventory, planning: SeriesInfo, notes: list[str]) -> list[SeriesInfo]:
    """The CT volumes of the planning CT's patient in other frames of reference (at least one).

    Raises:
        DicomSelectionError: if there is none, with why each other series was left out.
    """
    candidates = []
    left_out: list[str] = []  # why each other series is no daily CT: the error below needs it when none is left
    for series in inventory.series.values():
        uid = series.series_instance_uid
        if uid == planning.series_instance_uid:
            continue
        if series.modality != "CT":
            left_out.append(f"series {uid}: Modality {series.modality!r}, not CT")
            continue
        if series.patient_id != planning.patient_id:
            # reported in the notes by select_session; series of different patients are never combined
            left_out.append(f"series {uid}: patient {series.patient_id!r}, not {planning.patient_id!r}")
            continue
        if series.frame_of_reference_uid and series.frame_of_reference_uid == planning.frame_of_reference_uid:
            # same frame of reference = same scan session: another reconstruction of the planning scan, not a daily
            notes.append(
                f"left out {series.describe()}: it shares the planning CT's frame of reference (another "
                "reconstruction of the planning scan?); choose it with daily_series_uid if it is the daily CT"
            )
            left_out.append(f"series {uid}: in the planning CT's frame of reference (a planning reconstruction?)")
            continue
        why_not = not_a_volume(series)
        if why_not:
            notes.append(f"left out {series.describe()}: {why_not}, not a CT volume")
            left_out.append(f"series {uid}: {why_not}, not a CT volume")
            continue
        candidates.append(series)
    if not candidates:
        reasons = "".join(f"\n  {line}" for line in left_out)
        raise DicomSelectionError(
            f"{inventory.folder}: no daily CT: expected a CT series of patient {planning.patient_id!r} other than the "
            f"planning CT {planning.series_instance_uid}, with at least 2 slices"
            + (f". Left out:{reasons}" if reasons else "")
            + f"\nFound:\n{inventory.summary()}"
        )
    return candidates


def _check_unreadable(
    inventory: DicomInventory,
    rtstruct: StructureSetInfo,
    planning: SeriesInfo,
    daily: SeriesInfo,
    notes: list[str],
) -> None:
    """Refuse the session when a damaged file may belong to it; note the damaged files that cannot.

    A damaged file is harmless only when its intact elements place it in another patient, in a series whose other
    files were read and which was not selected, or in a series of a modality the session does not use (an RTSTRUCT
    of this patient could be a newer plan's; a CT series none of whose files can be read could be the daily CT).

    Raises:
        DicomSelectionError: naming the first damaged file that belongs, or may belong, to the session.
    """
    selected = {planning.series_instance_uid: "planning CT", daily.series_instance_uid: "daily CT"}
    contoured = set(rtstruct.referenced_images.get(planning.series_instance_uid, []))
    for damaged in inventory.unreadable_files:
        if damaged.series_instance_uid in selected:
            why = f"it is a file of the {selected[damaged.series_instance_uid]} series {damaged.series_instance_uid}"
        elif damaged.sop_instance_uid and damaged.sop_instance_uid in contoured:
            why = f"it is image {damaged.sop_instance_uid}, which the RTSTRUCT {rtstruct.path.name} was drawn on"
        elif damaged.patient_id and damaged.patient_id != planning.patient_id:
            notes.append(
                f"left out {damaged.describe()}: unreadable, and of another patient than {planning.patient_id!r}"
            )
            continue
        elif damaged.series_instance_uid and (
            damaged.series_instance_uid in inventory.series or damaged.modality not in ("", "CT", "RTSTRUCT")
        ):
            # a file of a series that was considered (its other files were read) and not chosen, or of a modality
            # the session never uses: the session is complete without it
            notes.append(f"left out {damaged.describe()}: unreadable, and of a series that is not used")
            continue
        elif damaged.modality == "RTSTRUCT":
            why = f"it is an RTSTRUCT of patient {planning.patient_id!r}, maybe a newer one than {rtstruct.path.name}"
        elif damaged.series_instance_uid:
            why = (
                f"it is of CT series {damaged.series_instance_uid}, of which no file can be read: that may be the "
                "latest daily CT"
            )
        else:
            why = (
                "what can be read of it does not tell which series it belongs to: it may be a slice of the planning "
                "or daily CT, which would then be incomplete"
            )
        raise DicomSelectionError(
            f"{damaged.describe()}: cannot be read, and {why}; expected every file of the planning CT, the planning "
            f"RTSTRUCT and the daily CT to be complete: re-export the file, or remove it from {inventory.folder}"
        )


def select_session(
    source: str | os.PathLike[str] | DicomInventory,
    *,
    daily_series_uid: str | None = None,
    rtstruct_sop_uid: str | None = None,
    planning_series_uid: str | None = None,
    patient_id: str | None = None,
) -> AdaptiveSession:
    """Select planning CT, planning RTSTRUCT and daily CT from a folder (or a scanned inventory).

    Args:
        source: the input folder, or the result of :func:`scan_folder`.
        daily_series_uid: Series Instance UID of the daily CT; ``None`` for the latest other CT of the patient.
        rtstruct_sop_uid: SOP Instance UID of the planning RTSTRUCT; ``None`` for the only or latest one.
        planning_series_uid: Series Instance UID of the planning CT, needed only when the RTSTRUCT's references
            leave a choice.
        patient_id: restrict the selection to this patient when the folder holds several.

    Returns:
        The selected session, with notes on what was chosen and left out.

    Raises:
        DicomSelectionError: if something is missing, ambiguous, inconsistent or of different patients, or a
            truncated or corrupt file may belong to the session; the message names the files or UIDs and what was
            expected.
    """
    inventory = source if isinstance(source, DicomInventory) else scan_folder(source)
    notes: list[str] = []
    try:
        rtstruct = _pick_rtstruct(inventory, rtstruct_sop_uid, patient_id, notes)
        planning = _planning_ct(inventory, rtstruct, planning_series_uid, notes)
        _check_same_patient(planning, rtstruct, "planning CT", "planning RTSTRUCT")
        if patient_id is not None and planning.patient_id != patient_id:
            raise DicomSelectionError(
                f"{rtstruct.path}: belongs to patient {planning.patient_id!r}, not the requested {patient_id!r}"
            )
        daily = _daily_ct(inventory, planning, rtstruct, daily_series_uid, notes)
    except DicomSelectionError as err:
        if not inventory.unreadable_files:
            raise
        # a missing RTSTRUCT or slice is often the damaged file itself: name it beside the error
        damaged = "".join(f"\n  {u.describe()}" for u in inventory.unreadable_files)
        raise DicomSelectionError(f"{err}\nFiles that could not be read (the cause?):{damaged}") from err
    _check_unreadable(inventory, rtstruct, planning, daily, notes)
    _note_left_out(inventory, planning, daily, notes)
    return AdaptiveSession(
        patient_id=planning.patient_id,
        planning_ct=planning,
        planning_rtstruct=rtstruct,
        daily_ct=daily,
        notes=notes,
        inventory=inventory,
    )


def _note_left_out(inventory: DicomInventory, planning: SeriesInfo, daily: SeriesInfo, notes: list[str]) -> None:
    """Note what the selection left out (other patients, skipped and duplicate files) and a daily CT older than the
    planning CT."""
    others = sorted({s.patient_id for s in inventory.series.values()} - {planning.patient_id})
    if others:
        notes.append(
            f"left out series of other patients ({', '.join(map(repr, others))}): series of different patients are "
            "never combined"
        )
    if inventory.non_dicom_files or inventory.dicomdir_files or inventory.hidden:
        notes.append(
            f"skipped {len(inventory.non_dicom_files)} non-DICOM file(s), {len(inventory.dicomdir_files)} DICOMDIR, "
            f"{len(inventory.hidden)} hidden file(s) or folder(s)"
        )
    if inventory.duplicate_files:
        notes.append(
            f"skipped {len(inventory.duplicate_files)} duplicate image file(s) (same SOP Instance UID), e.g. "
            f"{inventory.duplicate_files[0]}"
        )
    if planning.datetime and daily.datetime and daily.datetime < planning.datetime:
        notes.append(f"the daily CT ({daily.datetime}) is older than the planning CT ({planning.datetime})")


def check_one_patient(inventory: DicomInventory) -> None:
    """Refuse a folder whose series and structure sets are not all of one patient.

    Stricter than :func:`select_session`, which leaves other patients' series out: a folder that should hold one
    patient's session (e.g. a job of the DICOM node) must not hold anything of another. Patients compare as in the
    selection: Patient ID, and Issuer of Patient ID, Birth Date and Name where both sides have them.

    Raises:
        DicomSelectionError: naming the two series or files and the attribute that differs.
    """
    items: list[SeriesInfo | StructureSetInfo] = [*inventory.series.values(), *inventory.structure_sets]

    def kind(item: SeriesInfo | StructureSetInfo) -> str:
        return f"{item.modality} series" if isinstance(item, SeriesInfo) else "RTSTRUCT"

    for other in items[1:]:
        _check_same_patient(items[0], other, kind(items[0]), kind(other))
