"""Header modules shared by the project's DICOM writers: patient, study, equipment, new derived series.

The dataclasses hold what a planning system or a scanner puts in every object of one patient and study:
a planning study and a daily study of one patient share a :class:`PatientInfo` and differ in their
:class:`StudyInfo` (study UID, date) and in the frame of reference passed to the series writers.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field

from pydicom.dataset import Dataset

from prostate_jrs.dicom.uids import make_uid, package_version
from prostate_jrs.dicom.values import dicom_date, dicom_time

__all__ = [
    "EquipmentInfo",
    "NewSeriesOptions",
    "PatientInfo",
    "StudyInfo",
    "add_equipment",
    "add_patient_and_study",
    "copy_patient_and_study",
    "image_reference",
    "new_derived_instance",
    "new_series_instance",
]


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


@dataclass(frozen=True, kw_only=True)
class NewSeriesOptions:
    """Options of a writer that makes one instance in a new series derived from a CT series (RTSTRUCT, registration).

    Args:
        algorithm_name: model name.
        algorithm_version: model version.
        series_description: Series Description of the new series.
        series_number: Series Number.
        series_instance_uid: Series Instance UID; ``None`` for a new one.
        sop_instance_uid: SOP Instance UID; ``None`` for a new one.
        content_datetime: content (and series) date/time; ``None`` for now.
        equipment: Manufacturer, model, serial number and software versions of the writer.
    """

    algorithm_name: str = "prostate-jrs"
    algorithm_version: str = field(default_factory=package_version)
    series_description: str = "prostate-jrs"
    series_number: int = 900
    series_instance_uid: str | None = None
    sop_instance_uid: str | None = None
    content_datetime: dt.datetime | None = None
    equipment: EquipmentInfo = field(default_factory=EquipmentInfo)


def new_derived_instance(
    sop_class_uid: str,
    modality: str,
    source: Dataset,
    when: dt.datetime,
    *,
    equipment: EquipmentInfo,
    sop_instance_uid: str | None,
    series_instance_uid: str | None,
    series_number: int,
    series_description: str,
    operators_name: str = "",
) -> Dataset:
    """A new instance in a new series of ``source``'s patient, study and frame of reference.

    Sets SOP Common, Patient, General Study, General Series, Frame of Reference and General Equipment.

    Args:
        sop_class_uid: SOP Class UID of the new instance.
        modality: Modality of its series (e.g. ``RTSTRUCT``, ``REG``).
        source: an image of the series the instance refers to (patient, study and frame of reference are copied
            from it).
        when: instance creation and series date/time.
        equipment: the writer's General (and Enhanced General) Equipment.
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
    ds.FrameOfReferenceUID = str(source.FrameOfReferenceUID)
    ds.PositionReferenceIndicator = source.get("PositionReferenceIndicator", "")
    add_equipment(ds, equipment)
    return ds


def new_series_instance(
    sop_class_uid: str, modality: str, source: Dataset, options: NewSeriesOptions, operators_name: str = ""
) -> tuple[Dataset, dt.datetime]:
    """:func:`new_derived_instance` as a writer's ``options`` describe it, and the content date/time it used.

    Args:
        sop_class_uid: SOP Class UID of the new instance.
        modality: Modality of its series.
        source: an image of the series the instance refers to.
        options: series, UIDs, content date/time (``None``: now) and equipment of the new instance.
        operators_name: Operators' Name (Type 2: may be empty).

    Returns:
        The dataset and the date/time written as instance creation and series date/time.
    """
    when = options.content_datetime or dt.datetime.now().replace(microsecond=0)
    ds = new_derived_instance(
        sop_class_uid,
        modality,
        source,
        when,
        equipment=options.equipment,
        sop_instance_uid=options.sop_instance_uid,
        series_instance_uid=options.series_instance_uid,
        series_number=options.series_number,
        series_description=options.series_description,
        operators_name=operators_name,
    )
    return ds, when


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


def image_reference(image: Dataset) -> Dataset:
    """An item that references ``image`` by Referenced SOP Class and Instance UID (Image SOP Instance Reference)."""
    item = Dataset()
    item.ReferencedSOPClassUID = image.SOPClassUID
    item.ReferencedSOPInstanceUID = image.SOPInstanceUID
    return item
