"""Header modules shared by the writers: a new derived series from a writer's options, image references."""

from __future__ import annotations

import dataclasses
import datetime as dt

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, RTStructureSetStorage

from prostate_jrs.dicom import common
from prostate_jrs.dicom.modules import EquipmentInfo, NewSeriesOptions, image_reference, new_series_instance
from prostate_jrs.dicom.registration import RegistrationOptions
from prostate_jrs.dicom.rtstruct_writer import RTStructOptions


def _ct_image() -> Dataset:
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, "1.2.3.4"
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Doe^J", "P1", "19500101", "M"
    ds.StudyInstanceUID, ds.StudyDate, ds.StudyTime, ds.StudyID = "1.2.3", "20260101", "080000", "S1"
    ds.AccessionNumber, ds.ReferringPhysicianName = "A1", ""
    ds.FrameOfReferenceUID, ds.PositionReferenceIndicator = "1.2.3.9", "XY"
    return ds


def test_image_reference_names_class_and_instance() -> None:
    item = image_reference(_ct_image())
    assert (item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID) == (CTImageStorage, "1.2.3.4")
    assert len(item) == 2


def test_new_series_instance_takes_series_frame_and_equipment_from_options() -> None:
    when = dt.datetime(2026, 2, 3, 4, 5, 6)
    equipment = EquipmentInfo(model_name="M", software_versions="9", station_name="ST")
    options = RTStructOptions(
        series_description="contours", series_number=7, series_instance_uid="1.5", sop_instance_uid="1.5.1",
        content_datetime=when, equipment=equipment,
    )  # fmt: skip
    ds, used = new_series_instance(RTStructureSetStorage, "RTSTRUCT", _ct_image(), options, "Op^Er")
    assert used == when
    assert (ds.SOPInstanceUID, ds.SeriesInstanceUID, ds.SeriesNumber) == ("1.5.1", "1.5", 7)
    assert (ds.Modality, ds.SeriesDescription, ds.OperatorsName) == ("RTSTRUCT", "contours", "Op^Er")
    assert (ds.SeriesDate, ds.SeriesTime, ds.InstanceCreationTime) == ("20260203", "040506", "040506")
    assert (ds.PatientID, ds.StudyInstanceUID) == ("P1", "1.2.3")
    assert (ds.FrameOfReferenceUID, ds.PositionReferenceIndicator) == ("1.2.3.9", "XY")
    assert (ds.ManufacturerModelName, ds.SoftwareVersions, ds.StationName) == ("M", "9", "ST")


def test_new_series_instance_makes_uids_and_time_when_not_given() -> None:
    ds, when = new_series_instance(RTStructureSetStorage, "REG", _ct_image(), RegistrationOptions())
    assert ds.SOPInstanceUID != ds.SeriesInstanceUID and ds.SeriesNumber == 903
    assert abs((dt.datetime.now() - when).total_seconds()) < 60 and when.microsecond == 0


def test_writer_options_share_the_new_series_fields() -> None:
    names = {f.name for f in dataclasses.fields(NewSeriesOptions)}
    for options in (RTStructOptions, RegistrationOptions):
        assert names <= {f.name for f in dataclasses.fields(options)}
    assert RTStructOptions().series_number == 901 and RegistrationOptions().series_number == 903
    with pytest.raises(TypeError):  # keyword-only: the shared fields do not shift positional arguments
        RTStructOptions("AUTOMATIC")  # type: ignore[misc]


def test_common_still_exports_every_name() -> None:
    for name in ("read_dicom", "atomic_write", "format_ds", "ds_list", "make_uid", "match_slices", "PatientInfo"):
        assert callable(getattr(common, name))
    assert set(common.__all__) >= {"image_reference", "new_series_instance", "NewSeriesOptions", "package_version"}
