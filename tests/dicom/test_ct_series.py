"""CT series writer: dciodvfy-clean files that SimpleITK (GDCM) reads back to the same volume and geometry."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from prostate_jrs.dicom import ct_series
from prostate_jrs.dicom.common import PatientInfo, StudyInfo, format_ds, make_uid
from prostate_jrs.dicom.ct_series import CTSeriesInfo, write_ct_series

if TYPE_CHECKING:  # conftest is not importable at run time; fixtures hand its helpers over
    from conftest import DicomCheck, WrittenSeries

PhantomMaker = Callable[..., tuple[sitk.Image, sitk.Image]]
SeriesWriter = Callable[..., "WrittenSeries"]


def _read_with_gdcm(folder: Path) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    return reader.Execute()


def test_every_slice_passes_dciodvfy(daily_series: WrittenSeries, dciodvfy: Callable[[Path], DicomCheck]) -> None:
    for path in daily_series.files:
        check = dciodvfy(path)
        assert check.errors == [], check.output
        assert check.warnings == [], check.output


@pytest.mark.parametrize("position", ["HFS", "FFS", "HFP", "FFP"])
def test_gdcm_reads_back_pixels_and_geometry(
    tmp_path: Path, patient: PatientInfo, daily_study: StudyInfo, position: str, series_writer: SeriesWriter
) -> None:
    written = series_writer(tmp_path, patient, daily_study, position=position)
    back = _read_with_gdcm(tmp_path)
    assert back.GetSize() == written.ct.GetSize()
    np.testing.assert_allclose(back.GetSpacing(), written.ct.GetSpacing(), atol=1e-6)
    np.testing.assert_allclose(back.GetOrigin(), written.ct.GetOrigin(), atol=1e-6)
    np.testing.assert_allclose(back.GetDirection(), written.ct.GetDirection(), atol=1e-6)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(written.ct))
    assert {ds.PatientPosition for ds in written.datasets} == {position}


def test_headers(daily_series: WrittenSeries, patient: PatientInfo, daily_study: StudyInfo) -> None:
    datasets = daily_series.datasets
    first = datasets[0]
    assert first.SOPClassUID == pydicom.uid.CTImageStorage
    assert first.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert str(first.PatientName) == patient.name and first.PatientID == patient.patient_id
    assert first.PatientBirthDate == "19520314" and first.PatientSex == "M"
    assert first.StudyInstanceUID == daily_study.study_instance_uid
    assert (first.StudyDate, first.StudyTime) == ("20250120", "080230")
    assert first.AccessionNumber == "ACC0002" and first.StudyID == "FX01"
    assert first.Modality == "CT" and first.SeriesNumber == 2
    assert [float(v) for v in first.PixelSpacing] == [1.25, 1.5]  # (row spacing = J, column spacing = I)
    assert float(first.SliceThickness) == 3.0 and float(first.SpacingBetweenSlices) == 3.0
    assert (first.Rows, first.Columns) == (40, 48)
    assert float(first.RescaleIntercept) == -1024 and float(first.RescaleSlope) == 1
    assert [ds.InstanceNumber for ds in datasets] == list(range(1, 17))
    assert len({ds.SOPInstanceUID for ds in datasets}) == 16
    assert len({ds.SeriesInstanceUID for ds in datasets}) == 1
    assert len({ds.FrameOfReferenceUID for ds in datasets}) == 1
    z = [float(ds.ImagePositionPatient[2]) for ds in datasets]
    np.testing.assert_allclose(np.diff(z), 3.0)
    assert all(f.name == f"CT.{ds.SOPInstanceUID}.dcm" for f, ds in zip(daily_series.files, datasets, strict=True))


def test_planning_and_daily_share_patient_not_study(
    daily_series: WrittenSeries, planning_series: WrittenSeries
) -> None:
    daily, planning = daily_series.datasets[0], planning_series.datasets[0]
    assert (daily.PatientID, daily.PatientName) == (planning.PatientID, planning.PatientName)
    assert daily.StudyInstanceUID != planning.StudyInstanceUID
    assert daily.FrameOfReferenceUID != planning.FrameOfReferenceUID
    assert daily.StudyDate != planning.StudyDate


def test_uids_are_reproducible(
    tmp_path: Path, patient: PatientInfo, daily_study: StudyInfo, series_writer: SeriesWriter
) -> None:
    first = series_writer(tmp_path / "a", patient, daily_study)
    second = series_writer(tmp_path / "b", patient, daily_study)
    assert [ds.SOPInstanceUID for ds in first.datasets] == [ds.SOPInstanceUID for ds in second.datasets]


def test_values_below_minus_1024_are_stored_signed(
    tmp_path: Path, patient: PatientInfo, daily_study: StudyInfo, phantom: PhantomMaker
) -> None:
    ct, _ = phantom()
    array = sitk.GetArrayFromImage(ct)
    array[0, 0, :5] = -2048  # padding value some scanners use outside the field of view
    padded = sitk.GetImageFromArray(array)
    padded.CopyInformation(ct)
    files = write_ct_series(padded, tmp_path, patient=patient, study=daily_study, series=CTSeriesInfo(make_uid()))
    first = pydicom.dcmread(files[0])
    assert first.PixelRepresentation == 1 and float(first.RescaleIntercept) == 0
    np.testing.assert_array_equal(sitk.GetArrayFromImage(_read_with_gdcm(tmp_path)), array)


def test_bad_input_is_rejected(
    tmp_path: Path, patient: PatientInfo, daily_study: StudyInfo, phantom: PhantomMaker
) -> None:
    series = CTSeriesInfo(make_uid())
    with pytest.raises(ValueError, match="3D"):
        write_ct_series(sitk.Image(8, 8, sitk.sitkInt16), tmp_path, patient=patient, study=daily_study, series=series)
    skewed, _ = phantom()
    skewed.SetDirection((1, 0, 0, 0.5, 1, 0, 0, 0, 1))
    with pytest.raises(ValueError, match="orthonormal"):
        write_ct_series(skewed, tmp_path, patient=patient, study=daily_study, series=series)
    ct, _ = phantom()
    with pytest.raises(ValueError, match="patient_position"):
        write_ct_series(
            ct, tmp_path, patient=patient, study=daily_study, series=CTSeriesInfo(make_uid(), patient_position="XYZ")
        )
    with pytest.raises(ValueError, match="sex"):
        PatientInfo(name="A^B", patient_id="1", sex="male")
    assert list(tmp_path.iterdir()) == []


def test_failed_write_leaves_nothing(
    tmp_path: Path,
    patient: PatientInfo,
    daily_study: StudyInfo,
    monkeypatch: pytest.MonkeyPatch,
    phantom: PhantomMaker,
) -> None:
    real_write = ct_series.atomic_write
    calls = {"n": 0}

    def failing_write(ds: pydicom.Dataset, path: Path) -> Path:
        calls["n"] += 1
        if calls["n"] == 5:
            raise OSError("disk full")
        return real_write(ds, path)

    monkeypatch.setattr(ct_series, "atomic_write", failing_write)
    ct, _ = phantom()
    (tmp_path / "other.txt").write_text("kept")
    with pytest.raises(OSError, match="disk full"):
        write_ct_series(ct, tmp_path, patient=patient, study=daily_study, series=CTSeriesInfo(make_uid()))
    assert [p.name for p in tmp_path.iterdir()] == ["other.txt"]


@pytest.mark.parametrize(
    ("value", "expected"),
    [(0.0, "0"), (1.5, "1.5"), (-123.456789012345678, "-123.45678901235"), (1e-20, "1e-20")],
)
def test_format_ds_fits_16_characters(value: float, expected: str) -> None:
    assert format_ds(value) == expected
    assert len(format_ds(-1234567.123456789e-7)) <= 16


def test_written_files_are_readable_by_other_users(tmp_path):
    """mkstemp makes files private; outputs go to gateways and PACS users, so they follow the umask instead."""
    from prostate_jrs.dicom.common import atomic_write

    ds = pydicom.Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ds.SOPInstanceUID = "1.2.3.4"
    previous = os.umask(0o022)
    try:
        path = atomic_write(ds, tmp_path / "out.dcm")
    finally:
        os.umask(previous)
    assert path.stat().st_mode & 0o777 == 0o644


def test_synthetic_equipment() -> None:
    from prostate_jrs.dicom.ct_series import SCANNER, synthetic_equipment
    from prostate_jrs.dicom.uids import package_version

    device = synthetic_equipment("Model", "SN1", "ST1", "SW 2")
    assert (device.manufacturer, device.institution_name) == ("prostate-jrs", "prostate-jrs synthetic clinic")
    assert (device.model_name, device.device_serial_number, device.station_name) == ("Model", "SN1", "ST1")
    assert device.software_versions == "SW 2" and SCANNER.software_versions == package_version()
