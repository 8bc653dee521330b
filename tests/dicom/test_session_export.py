"""Synthetic DICOM sessions (``synth --dicom``): dciodvfy-clean, selectable, round-trip to the phantom, reproducible."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from prostate_jrs.dicom.ct_reader import read_ct_series
from prostate_jrs.dicom.discovery import select_session
from prostate_jrs.dicom.rtstruct_reader import read_rtstruct
from prostate_jrs.geometry import array_from_image
from prostate_jrs.labels import STRUCTURES
from prostate_jrs.phantom import PhantomConfig, write_dataset
from prostate_jrs.phantom.dicom_export import export_dicom_sessions

if TYPE_CHECKING:  # conftest is not importable at run time; the fixture hands its helpers over
    from conftest import DicomCheck

SEED = 5


def _dataset(root: Path, n_fractions: int) -> Path:
    out = root / "D"
    write_dataset(out, 1, n_fractions, SEED, config=PhantomConfig.tiny())
    export_dicom_sessions(out)
    return out


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _dataset(tmp_path_factory.mktemp("export"), 2)


@pytest.fixture(scope="module")
def manifest(dataset: Path) -> dict:
    return json.loads((dataset / "dicom" / "sessions.json").read_text())


def test_layout_one_folder_per_session(dataset: Path, manifest: dict) -> None:
    assert sorted(p.name for p in (dataset / "dicom").iterdir()) == ["JRS001_f01", "JRS001_f02", "sessions.json"]
    assert [s["folder"] for s in manifest["sessions"]] == ["dicom/JRS001_f01", "dicom/JRS001_f02"]
    for session in manifest["sessions"]:
        # only DICOM files in a session folder; the ground truth stays in the NIfTI dataset
        files = list((dataset / session["folder"]).iterdir())
        assert all(f.suffix == ".dcm" and not f.name.startswith(".") for f in files)
        for key in ("fixed_label", "ddf", "fixed_image"):
            assert (dataset / session["item"][key]).is_file()
    assert not list(dataset.glob(".dicom*"))  # no staging left


def test_every_file_passes_dciodvfy(dataset: Path, dciodvfy: Callable[[Path], DicomCheck]) -> None:
    files = sorted((dataset / "dicom" / "JRS001_f01").iterdir())
    assert len(files) > 50
    for path in files:
        check = dciodvfy(path)
        assert not check.errors, f"{path.name}:\n{check.output}"


def test_select_session_finds_planning_rtstruct_and_daily(dataset: Path, manifest: dict) -> None:
    for record in manifest["sessions"]:
        session = select_session(dataset / record["folder"])
        uids = record["uids"]
        assert session.patient_id == "JRS001"
        assert session.planning_ct.series_instance_uid == uids["planning_ct_series"]
        assert session.planning_rtstruct.sop_instance_uid == uids["planning_rtstruct_sop"]
        assert session.daily_ct.series_instance_uid == uids["daily_ct_series"]
        assert session.planning_ct.frame_of_reference_uid != session.daily_ct.frame_of_reference_uid
        assert session.planning_ct.study_instance_uid != session.daily_ct.study_instance_uid
        assert session.daily_ct.datetime > session.planning_ct.datetime


def test_planning_round_trip_gives_phantom_ct_and_labels(dataset: Path) -> None:
    session = select_session(dataset / "dicom" / "JRS001_f01")
    volume = read_ct_series(session.planning_ct.files)
    truth_ct = sitk.ReadImage(str(dataset / "JRS001_planning_ct.nii.gz"))
    np.testing.assert_array_equal(array_from_image(volume.image), array_from_image(truth_ct))
    np.testing.assert_allclose(volume.image.GetOrigin(), truth_ct.GetOrigin(), atol=1e-3)
    np.testing.assert_allclose(volume.image.GetSpacing(), truth_ct.GetSpacing(), atol=1e-4)
    np.testing.assert_allclose(volume.image.GetDirection(), np.eye(3).ravel(), atol=1e-6)

    contents = read_rtstruct(session.planning_rtstruct.path, volume)
    assert contents.unmapped_rois == ["BODY"]
    assert contents.missing_structures == []
    assert {roi.name for roi in contents.rois} == {"Prostate", "SV", "Rectum", "Bladder", "BODY"}
    truth = array_from_image(sitk.ReadImage(str(dataset / "JRS001_planning_labels.nii.gz")))
    for structure in STRUCTURES:
        a, b = contents.label_map == structure.label, truth == structure.label
        dice = 2 * (a & b).sum() / (a.sum() + b.sum())
        assert dice >= 0.95, f"{structure.name}: Dice {dice:.3f}"

    rs = pydicom.dcmread(session.planning_rtstruct.path)
    assert rs.ApprovalStatus == "APPROVED"
    assert {roi.ROIGenerationAlgorithm for roi in rs.StructureSetROISequence} == {"MANUAL"}


def test_daily_series_lies_in_its_own_frame_with_the_recorded_offset(dataset: Path, manifest: dict) -> None:
    record = manifest["sessions"][1]
    session = select_session(dataset / record["folder"])
    volume = read_ct_series(session.daily_ct.files)
    truth = sitk.ReadImage(str(dataset / record["item"]["fixed_image"]))
    np.testing.assert_array_equal(array_from_image(volume.image), array_from_image(truth))
    # DICOM daily coordinates -> dataset world: the voxel grid is the NIfTI grid, only the frame differs
    to_dataset = np.asarray(record["daily_to_dataset"])
    origin = to_dataset[:3, :3] @ np.asarray(volume.image.GetOrigin()) + to_dataset[:3, 3]
    np.testing.assert_allclose(origin, truth.GetOrigin(), atol=1e-3)
    assert np.abs(to_dataset[:3, 3]).max() > 1.0  # world coordinates of the two scans do not correspond
    np.testing.assert_allclose(record["planning_to_dataset"], np.eye(4))
    assert volume.frame_of_reference_uid == record["uids"]["daily_frame_of_reference"]
    assert record["uids"]["daily_frame_of_reference"] != record["uids"]["planning_frame_of_reference"]


def test_same_seed_gives_identical_files(dataset: Path, tmp_path: Path) -> None:
    # fraction f depends only on (seed, f): a one-fraction export must reproduce session f01 byte for byte
    again = _dataset(tmp_path, 1)
    first, second = dataset / "dicom" / "JRS001_f01", again / "dicom" / "JRS001_f01"
    names = sorted(p.name for p in first.iterdir())
    assert names == sorted(p.name for p in second.iterdir())
    for name in names:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name


def test_existing_dicom_folder_is_a_clear_error(dataset: Path) -> None:
    with pytest.raises(FileExistsError, match="already exists"):
        export_dicom_sessions(dataset)


def test_missing_dataset_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"datalist\.json"):
        export_dicom_sessions(tmp_path)
