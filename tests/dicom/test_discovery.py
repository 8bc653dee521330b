"""Series discovery and selection: planning CT + RTSTRUCT + daily CT from a folder with studies, strays and junk."""

from __future__ import annotations

import datetime as dt
import shutil
from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest
import SimpleITK as sitk
from dicom_edits import cut_inside
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import ExplicitVRLittleEndian, MediaStorageDirectoryStorage, RTStructureSetStorage

from prostate_jrs.dicom.common import PatientInfo, StudyInfo, make_uid
from prostate_jrs.dicom.ct_reader import read_ct_series
from prostate_jrs.dicom.ct_series import CTSeriesInfo, write_ct_series
from prostate_jrs.dicom.discovery import DicomSelectionError, check_one_patient, scan_folder, select_session
from prostate_jrs.dicom.rtstruct_reader import RTStructError, read_rtstruct
from prostate_jrs.labels import SynonymTable

FIXTURES = Path(__file__).resolve().parents[2] / "../shared/fixtures/real/rtstruct_mim"
PATIENT = PatientInfo(name="Select^Test", patient_id="PJRS-SEL-1", birth_date=dt.date(1951, 7, 8))
STRANGER = PatientInfo(name="Other^Person", patient_id="PJRS-SEL-2", birth_date=dt.date(1960, 1, 1))
PLANNING = StudyInfo(study_instance_uid=make_uid("sel", "planning"), study_datetime=dt.datetime(2025, 1, 6, 9, 15))
DAILY = StudyInfo(study_instance_uid=make_uid("sel", "daily"), study_datetime=dt.datetime(2025, 1, 20, 8, 0))
OTHER = StudyInfo(study_instance_uid=make_uid("sel", "other"), study_datetime=dt.datetime(2025, 1, 25, 8, 0))

PhantomMaker = Callable[..., tuple[sitk.Image, sitk.Image]]


def _series_uid(tag: str) -> str:
    return make_uid("sel", tag, "series")


def _write(
    folder: Path, ct: sitk.Image, patient: PatientInfo, study: StudyInfo, tag: str, when: dt.datetime, frame: str = ""
) -> None:
    series = CTSeriesInfo(
        frame_of_reference_uid=make_uid("sel", frame or tag, "for"),
        series_instance_uid=_series_uid(tag),
        series_datetime=when,
        series_description=f"CT {tag}",
    )
    write_ct_series(ct, folder, patient=patient, study=study, series=series)


def _structure_set(
    path: Path,
    ct_folder: Path,
    *,
    when: str = "101500",
    patient_id: str | None = None,
    with_series_reference: bool = True,
) -> str:
    """A header-only RTSTRUCT (no contours: discovery reads none) referencing the CT series in ``ct_folder``."""
    images = [pydicom.dcmread(p, stop_before_pixels=True) for p in sorted(ct_folder.glob("CT.*.dcm"))]
    first = images[0]
    ds = Dataset()
    ds.SOPClassUID = RTStructureSetStorage
    ds.SOPInstanceUID = make_uid("sel", str(path), when)
    ds.Modality = "RTSTRUCT"
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "StudyInstanceUID", "StudyDate", "StudyTime"):
        setattr(ds, keyword, first.get(keyword))
    if patient_id is not None:
        ds.PatientID = patient_id
    ds.SeriesInstanceUID = make_uid("sel", str(path), "series")
    ds.StructureSetLabel = f"PLAN {when}"
    ds.StructureSetDate, ds.StructureSetTime = "20250107", when
    frame = Dataset()
    frame.FrameOfReferenceUID = first.FrameOfReferenceUID
    if with_series_reference:
        study, series = Dataset(), Dataset()
        study.ReferencedSOPClassUID = "1.2.840.10008.3.1.2.3.1"
        study.ReferencedSOPInstanceUID = first.StudyInstanceUID
        series.SeriesInstanceUID = first.SeriesInstanceUID
        refs = []
        for image in images:
            ref = Dataset()
            ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID = image.SOPClassUID, image.SOPInstanceUID
            refs.append(ref)
        series.ContourImageSequence = DicomSequence(refs)
        study.RTReferencedSeriesSequence = DicomSequence([series])
        frame.RTReferencedStudySequence = DicomSequence([study])
    ds.ReferencedFrameOfReferenceSequence = DicomSequence([frame])
    roi = Dataset()
    roi.ROINumber, roi.ROIName, roi.ReferencedFrameOfReferenceUID = 1, "Prostate", first.FrameOfReferenceUID
    ds.StructureSetROISequence = DicomSequence([roi])
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    pydicom.dcmwrite(path, ds, enforce_file_format=True)
    return str(ds.SOPInstanceUID)


@pytest.fixture(scope="module")
def hospital_folder(tmp_path_factory: pytest.TempPathFactory, phantom: PhantomMaker) -> Path:
    """Planning study (CT + RTSTRUCT), a daily study with two CTs, a stray patient, a text file and a DICOMDIR."""
    root = tmp_path_factory.mktemp("hospital")
    ct, _ = phantom("HFS")
    _write(root / "plan" / "ct", ct, PATIENT, PLANNING, "planning", dt.datetime(2025, 1, 6, 9, 20))
    _structure_set(root / "plan" / "RS.planning.dcm", root / "plan" / "ct")
    _write(root / "daily" / "a", ct, PATIENT, DAILY, "daily-early", dt.datetime(2025, 1, 20, 8, 2))
    _write(root / "daily" / "b", ct, PATIENT, DAILY, "daily-late", dt.datetime(2025, 1, 20, 8, 40))
    # another patient's CT, the newest of all: it must never be taken as the daily CT
    _write(root / "stray", ct, STRANGER, OTHER, "stray", dt.datetime(2025, 1, 25, 8, 5))
    (root / "README.txt").write_text("export from the planning system\n")
    (root / ".partial").mkdir()  # a writer's staging folder: its files are incomplete and must not be read
    shutil.copy(next((root / "plan" / "ct").iterdir()), root / ".partial" / "CT.copy.dcm")
    dicomdir = Dataset()
    dicomdir.file_meta = FileMetaDataset()
    dicomdir.file_meta.MediaStorageSOPClassUID = MediaStorageDirectoryStorage
    dicomdir.file_meta.MediaStorageSOPInstanceUID = make_uid("sel", "dicomdir")
    dicomdir.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dicomdir.FileSetID = "EXPORT"
    pydicom.dcmwrite(root / "DICOMDIR", dicomdir, enforce_file_format=True)
    return root


def _copy(source: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(source, tmp_path / "in"))


def test_scan_groups_series_and_skips_junk(hospital_folder: Path) -> None:
    inventory = scan_folder(hospital_folder)
    assert set(inventory.series) == {_series_uid(t) for t in ("planning", "daily-early", "daily-late", "stray")}
    assert all(len(s.files) == 16 and s.modality == "CT" for s in inventory.series.values())
    assert [p.name for p in inventory.non_dicom_files] == ["README.txt"]
    assert [p.name for p in inventory.dicomdir_files] == ["DICOMDIR"]
    assert [p.name for p in inventory.hidden] == [".partial"]
    assert len(inventory.structure_sets) == 1
    assert inventory.patients() == {PATIENT.patient_id, STRANGER.patient_id}
    planning = inventory.series[_series_uid("planning")]
    assert (planning.study_instance_uid, planning.frame_of_reference_uid) == (
        PLANNING.study_instance_uid,
        make_uid("sel", "planning", "for"),
    )
    assert planning.datetime == dt.datetime(2025, 1, 6, 9, 20)


def test_selects_planning_rtstruct_and_latest_daily(hospital_folder: Path) -> None:
    session = select_session(hospital_folder)
    assert session.patient_id == PATIENT.patient_id
    assert session.planning_ct.series_instance_uid == _series_uid("planning")
    assert session.planning_rtstruct.path.name == "RS.planning.dcm"
    assert session.daily_ct.series_instance_uid == _series_uid("daily-late")
    notes = "\n".join(session.notes)
    assert "latest of 2 daily CT candidates" in notes
    assert repr(STRANGER.patient_id) in notes and "never combined" in notes
    assert "skipped 1 non-DICOM file(s), 1 DICOMDIR, 1 hidden" in notes
    # the selected series read as volumes
    assert read_ct_series(session.daily_ct.files).series_instance_uid == _series_uid("daily-late")


def test_explicit_daily_series_is_honoured(hospital_folder: Path) -> None:
    session = select_session(hospital_folder, daily_series_uid=_series_uid("daily-early"))
    assert session.daily_ct.series_instance_uid == _series_uid("daily-early")
    with pytest.raises(DicomSelectionError, match="is the planning CT"):
        select_session(hospital_folder, daily_series_uid=_series_uid("planning"))
    with pytest.raises(DicomSelectionError, match=r"no series with SeriesInstanceUID 1\.2\.3 "):
        select_session(hospital_folder, daily_series_uid="1.2.3")


def test_other_patient_is_refused(hospital_folder: Path, tmp_path: Path, phantom: PhantomMaker) -> None:
    with pytest.raises(DicomSelectionError, match=r"different patients: PatientID \(0010,0020\) 'PJRS-SEL-1' vs"):
        select_session(hospital_folder, daily_series_uid=_series_uid("stray"))
    # same Patient ID, another birth date: not the same patient either
    folder = _copy(hospital_folder, tmp_path)
    twin = PatientInfo(name=PATIENT.name, patient_id=PATIENT.patient_id, birth_date=dt.date(1988, 8, 8))
    ct, _ = phantom("HFS")
    _write(folder / "daily" / "c", ct, twin, DAILY, "daily-twin", dt.datetime(2025, 1, 20, 9, 0))
    with pytest.raises(DicomSelectionError, match="PatientBirthDate"):
        select_session(folder)
    # an RTSTRUCT of another patient on this patient's CT
    folder = _copy(hospital_folder, tmp_path / "2")
    (folder / "plan" / "RS.planning.dcm").unlink()
    _structure_set(folder / "plan" / "RS.wrong.dcm", folder / "plan" / "ct", patient_id=STRANGER.patient_id)
    with pytest.raises(DicomSelectionError, match=r"planning RTSTRUCT .* belong to different patients"):
        select_session(folder)


def test_several_rtstructs(hospital_folder: Path, tmp_path: Path) -> None:
    folder = _copy(hospital_folder, tmp_path)
    older = _structure_set(folder / "plan" / "RS.older.dcm", folder / "plan" / "ct", when="080000")
    session = select_session(folder)
    assert session.planning_rtstruct.path.name == "RS.planning.dcm"
    assert any("latest of 2 RTSTRUCTs" in note for note in session.notes)
    assert select_session(folder, rtstruct_sop_uid=older).planning_rtstruct.path.name == "RS.older.dcm"
    with pytest.raises(DicomSelectionError, match=r"no RTSTRUCT with SOP Instance UID 9\.9"):
        select_session(folder, rtstruct_sop_uid="9.9")


def test_missing_inputs_give_clear_errors(hospital_folder: Path, tmp_path: Path) -> None:
    folder = _copy(hospital_folder, tmp_path)
    (folder / "plan" / "RS.planning.dcm").unlink()
    with pytest.raises(DicomSelectionError, match="no RTSTRUCT found") as info:
        select_session(folder)
    assert "1 file(s) skipped as not DICOM Part 10" in str(info.value) and "README.txt" in str(info.value)

    folder = _copy(hospital_folder, tmp_path / "2")
    shutil.rmtree(folder / "daily")
    with pytest.raises(DicomSelectionError, match="no daily CT: expected a CT series of patient 'PJRS-SEL-1'"):
        select_session(folder)

    folder = _copy(hospital_folder, tmp_path / "3")
    shutil.rmtree(folder / "plan" / "ct")
    with pytest.raises(DicomSelectionError, match=f"references series {_series_uid('planning')} .* not in"):
        select_session(folder)

    folder = _copy(hospital_folder, tmp_path / "4")
    sorted((folder / "plan" / "ct").glob("CT.*.dcm"))[7].unlink()
    with pytest.raises(DicomSelectionError, match="is incomplete: 1 of the 16 images"):
        select_session(folder)

    with pytest.raises(DicomSelectionError, match="not a folder"):
        select_session(tmp_path / "nowhere")


def test_frame_of_reference_fallback(hospital_folder: Path, tmp_path: Path) -> None:
    folder = _copy(hospital_folder, tmp_path)
    (folder / "plan" / "RS.planning.dcm").unlink()
    _structure_set(folder / "plan" / "RS.noref.dcm", folder / "plan" / "ct", with_series_reference=False)
    session = select_session(folder)
    assert session.planning_ct.series_instance_uid == _series_uid("planning")
    assert any("does not reference a series" in note for note in session.notes)


def test_localizer_is_not_a_daily_ct(hospital_folder: Path, tmp_path: Path) -> None:
    folder = _copy(hospital_folder, tmp_path)
    for path in (folder / "daily" / "b").iterdir():
        ds = pydicom.dcmread(path)
        ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
        ds.save_as(path)
    shutil.copytree(folder / "daily" / "a", folder / "copy of a")  # a second export of the same images
    session = select_session(folder)
    assert session.daily_ct.series_instance_uid == _series_uid("daily-early")
    assert len(session.daily_ct.files) == 16
    assert any("localizer" in note for note in session.notes)
    assert any("skipped 16 duplicate image file(s)" in note for note in session.notes)


def test_reconstruction_of_the_planning_scan_is_not_a_daily_ct(
    hospital_folder: Path, tmp_path: Path, phantom: PhantomMaker
) -> None:
    folder = _copy(hospital_folder, tmp_path)
    ct, _ = phantom("HFS")
    when = dt.datetime(2025, 1, 21, 8, 0)  # newer than every daily CT
    _write(folder / "plan" / "thin", ct, PATIENT, PLANNING, "planning-recon", when, frame="planning")
    session = select_session(folder)
    assert session.daily_ct.series_instance_uid == _series_uid("daily-late")
    assert any("shares the planning CT's frame of reference" in note for note in session.notes)


def test_real_mim_files(tmp_path: Path, phantom: PhantomMaker) -> None:
    # dummy_rt.dcm with the 2 of its 5 CT slices that are in the fixtures: the incomplete series is named
    folder = tmp_path / "dummy"
    folder.mkdir()
    for name in ("dummy_rt.dcm", "ct_1.dcm", "ct_2.dcm"):
        shutil.copy(FIXTURES / name, folder)
    with pytest.raises(
        DicomSelectionError, match=r"dummy_rt\.dcm: the planning CT series .* is incomplete: 3 of the 5"
    ):
        select_session(folder)

    # invalid_reference_rt.dcm beside a CT series of the same patient that it does not reference
    folder = tmp_path / "invalid"
    folder.mkdir()
    shutil.copy(FIXTURES / "invalid_reference_rt.dcm", folder)
    phantom_patient = PatientInfo(name="PHANTOM_EXAMPLE", patient_id="PHANTOM_EXAMPLE")
    ct, _ = phantom("HFS")
    _write(folder / "ct", ct, phantom_patient, DAILY, "phantom-daily", dt.datetime(2025, 1, 20, 8, 0))
    referenced = "2.16.840.1.114362.1.11940992.23790159890.563423471.893.88"
    with pytest.raises(
        DicomSelectionError, match=rf"invalid_reference_rt\.dcm: the RTSTRUCT references series {referenced}"
    ):
        select_session(folder)

    # non_existent_reference_rt.dcm has no RT Referenced Study: without a CT in its frame of reference, a clear error
    folder = tmp_path / "nonexistent"
    folder.mkdir()
    shutil.copy(FIXTURES / "non_existent_reference_rt.dcm", folder)
    with pytest.raises(DicomSelectionError, match=r"has no RTReferencedSeriesSequence \(3006,0014\) and no CT series"):
        select_session(folder)
    # with the CT slices of its frame of reference and a daily CT it is selected by frame of reference ...
    for name in ("ct_1.dcm", "ct_2.dcm"):
        shutil.copy(FIXTURES / name, folder)
    _write(folder / "daily", ct, phantom_patient, DAILY, "phantom-daily", dt.datetime(2025, 1, 20, 8, 0))
    session = select_session(folder)
    assert session.planning_ct.series_instance_uid == referenced
    assert session.daily_ct.series_instance_uid == _series_uid("phantom-daily")
    assert any("does not reference a series" in note for note in session.notes)
    # ... and reading its contours on the 2 slices present names the ROI that does not fit
    planning = read_ct_series(session.planning_ct.files)
    clinic = SynonymTable().extend({"bladder": ["ROI-4"]})
    with pytest.raises(RTStructError, match=r"ROI 'ROI-4' contour 1 lies at 70\.00 mm"):
        read_rtstruct(session.planning_rtstruct.path, planning, clinic)


def test_planning_series_must_be_a_ct_volume(hospital_folder: Path, tmp_path: Path, phantom: PhantomMaker) -> None:
    folder = _copy(hospital_folder, tmp_path)
    for path in (folder / "plan" / "ct").iterdir():
        ds = pydicom.dcmread(path)
        ds.Modality = "MR"
        ds.save_as(path)
    with pytest.raises(
        DicomSelectionError,
        match=rf"RS\.planning\.dcm: the referenced series {_series_uid('planning')} has Modality "
        r"'MR'; expected a planning CT",
    ):
        select_session(folder)

    # one slice: contours drawn on it would give a volume one slice thick; no daily CT is matched to it
    folder = tmp_path / "one"
    shutil.copytree(hospital_folder / "daily", folder / "daily")
    ct, _ = phantom("HFS", shape=(48, 40, 1))
    _write(folder / "plan" / "ct", ct, PATIENT, PLANNING, "planning-one", dt.datetime(2025, 1, 6, 9, 20))
    _structure_set(folder / "plan" / "RS.one.dcm", folder / "plan" / "ct")
    with pytest.raises(
        DicomSelectionError, match=r"RS\.one\.dcm: the planning CT series .* is a single slice \(1 file\)"
    ) as info:
        select_session(folder)
    assert "at least 2 slices" in str(info.value)


def test_no_daily_ct_says_why_each_series_was_left_out(
    hospital_folder: Path, tmp_path: Path, phantom: PhantomMaker
) -> None:
    folder = _copy(hospital_folder, tmp_path)
    shutil.rmtree(folder / "daily" / "b")
    for path in (folder / "daily" / "a").iterdir():  # the daily scan, exported as MR
        ds = pydicom.dcmread(path)
        ds.Modality = "MR"
        ds.save_as(path)
    ct, _ = phantom("HFS", shape=(48, 40, 1))
    _write(folder / "daily" / "c", ct, PATIENT, DAILY, "daily-one", dt.datetime(2025, 1, 20, 9, 0))
    with pytest.raises(DicomSelectionError, match="no daily CT") as info:
        select_session(folder)
    message = str(info.value)
    assert f"series {_series_uid('daily-early')}: Modality 'MR', not CT" in message
    assert f"series {_series_uid('daily-one')}: a single slice (1 file), not a CT volume" in message
    assert f"series {_series_uid('stray')}: patient 'PJRS-SEL-2', not 'PJRS-SEL-1'" in message


def test_damaged_file_of_the_session_is_refused_by_name(hospital_folder: Path, tmp_path: Path) -> None:
    # cut after its Series Instance UID: the file is placed in the daily series, which would miss a slice
    folder = _copy(hospital_folder, tmp_path)
    slice_file = sorted((folder / "daily" / "b").iterdir())[5]
    cut_inside(slice_file, "FrameOfReferenceUID")
    with pytest.raises(
        DicomSelectionError,
        match=rf"{slice_file.name} \(element \(0020,0052\) declares .*: cannot be read, and it is a file of the daily "
        rf"CT series {_series_uid('daily-late')}",
    ) as info:
        select_session(folder)
    assert "re-export the file, or remove it" in str(info.value)

    # every file of the latest daily CT damaged: the earlier one must not be taken in its place unnoticed
    folder = _copy(hospital_folder, tmp_path / "all")
    for path in (folder / "daily" / "b").iterdir():
        cut_inside(path, "FrameOfReferenceUID")
    with pytest.raises(DicomSelectionError, match=f"CT series {_series_uid('daily-late')}, of which no file can be"):
        select_session(folder)

    # garbage after a DICM prefix: nothing tells which series it belongs to, so the session cannot be checked
    folder = _copy(hospital_folder, tmp_path / "2")
    (folder / "daily" / "b" / "CT.extra.dcm").write_bytes(b"\0" * 128 + b"DICM" + bytes(range(256)) * 8)
    with pytest.raises(DicomSelectionError, match=r"CT\.extra\.dcm .*does not tell which series it belongs to"):
        select_session(folder)

    # a planning slice the RTSTRUCT was drawn on, cut before its Series Instance UID: placed by its SOP Instance UID
    folder = _copy(hospital_folder, tmp_path / "3")
    slice_file = sorted((folder / "plan" / "ct").iterdir())[3]
    cut_inside(slice_file, "StudyDate")
    with pytest.raises(DicomSelectionError, match="is incomplete") as info:
        select_session(folder)
    assert f"Files that could not be read (the cause?):\n  {slice_file}" in str(info.value)

    # the only RTSTRUCT, cut in its references: named beside "no RTSTRUCT found"
    folder = _copy(hospital_folder, tmp_path / "4")
    cut_inside(folder / "plan" / "RS.planning.dcm", "ReferencedFrameOfReferenceSequence")
    with pytest.raises(DicomSelectionError, match="no RTSTRUCT found") as info:
        select_session(folder)
    assert "RS.planning.dcm" in str(info.value) and "Modality RTSTRUCT" in str(info.value)


def test_damaged_file_of_another_patient_is_left_out(hospital_folder: Path, tmp_path: Path) -> None:
    folder = _copy(hospital_folder, tmp_path)
    stray = sorted((folder / "stray").iterdir())[2]
    cut_inside(stray, "FrameOfReferenceUID")
    inventory = scan_folder(folder)
    assert [u.path for u in inventory.unreadable_files] == [stray]
    damaged = inventory.unreadable_files[0]
    assert (damaged.patient_id, damaged.series_instance_uid, damaged.modality) == (
        STRANGER.patient_id,
        _series_uid("stray"),
        "CT",
    )
    session = select_session(inventory)
    assert session.daily_ct.series_instance_uid == _series_uid("daily-late")
    assert any(str(stray) in note and "another patient" in note for note in session.notes)


def test_check_one_patient_refuses_any_other_patient(hospital_folder: Path, tmp_path: Path) -> None:
    """Stricter than the selection, which leaves the stray patient out: a folder that must hold one patient does not."""
    assert select_session(hospital_folder).patient_id == PATIENT.patient_id
    with pytest.raises(DicomSelectionError, match=r"belong to different patients: PatientID \(0010,0020\)"):
        check_one_patient(scan_folder(hospital_folder))
    folder = _copy(hospital_folder, tmp_path)
    shutil.rmtree(folder / "stray")
    check_one_patient(scan_folder(folder))  # one patient: planning, RTSTRUCT and two daily CTs
