"""Discovery in an archive export: patients kept apart, the planning rule and its fallbacks, daily RTSTRUCTs."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pydicom
import pytest
from dicom_edits import copy_patients

from prostate_jrs.datasets.archive import patient_inventories, plan_patient, scan_archive


def _plan(archive: Path, patient: str = "JRS001", **kwargs):
    inventory = scan_archive(archive)
    parts = patient_inventories(inventory)
    return plan_patient(patient, parts[patient], archive_structure_sets=inventory.structure_sets, **kwargs), parts


@pytest.fixture
def one_patient(synthetic_archive: Path, tmp_path: Path) -> Path:
    return copy_patients(synthetic_archive / "dicom", ["JRS001", "JRS002"], tmp_path / "archive")


def test_patients_are_never_mixed(one_patient: Path) -> None:
    plan, parts = _plan(one_patient, "JRS002")
    assert set(parts) == {"JRS001", "JRS002", "STRAY001"}  # the stray series in JRS002's folder stays apart
    assert all(s.patient_id == "JRS002" for s in parts["JRS002"].series.values())
    assert [d.fraction for d in plan.dailies] == [1, 2, 3] and all(d.rtstruct is not None for d in plan.dailies)
    stray, _ = _plan(one_patient, "STRAY001")
    assert stray.planning is None and stray.category == "no rtstruct" and "no RTSTRUCT" in stray.problem


def test_planning_rule_and_fallbacks(one_patient: Path) -> None:
    planning_rs = next((one_patient / "JRS001" / "Study_PLAN1" / "RTSTRUCT_3").iterdir())
    plan, _ = _plan(one_patient)
    # the RTPLAN names the planning structure set, although the daily RTSTRUCTs are later
    assert plan.planning.rule == "rtplan" and plan.planning.rtstruct.path == planning_rs
    earliest, _ = _plan(one_patient, rule="earliest")
    assert earliest.planning.rule == "earliest" and earliest.planning.rtstruct.path == planning_rs
    for path in (one_patient / "JRS001" / "Study_PLAN1" / "RTPLAN_4").iterdir():
        path.unlink()
    fallback, _ = _plan(one_patient)
    assert fallback.planning.rule == "earliest" and fallback.planning.rtstruct.path == planning_rs
    # an override: the second fraction's contours as the plan; the former planning CT becomes one more scan
    daily_rs = next((one_patient / "JRS001" / "Study_FX2" / "RTSTRUCT_2").iterdir())
    uid = str(pydicom.dcmread(daily_rs, stop_before_pixels=True).SOPInstanceUID)
    override, _ = _plan(one_patient, override=uid)
    assert override.planning.rule == "override" and override.planning.rtstruct.path == daily_rs
    assert len(override.dailies) == 3 and plan.planning.ct.series_instance_uid in {
        d.series.series_instance_uid for d in override.dailies
    }
    with pytest.raises(ValueError, match="unknown planning rule"):
        _plan(one_patient, rule="latest")


def test_unapproved_daily_contours_are_not_used(one_patient: Path) -> None:
    path = next((one_patient / "JRS001" / "Study_FX2" / "RTSTRUCT_2").iterdir())
    ds = pydicom.dcmread(path)
    ds.ApprovalStatus = "UNAPPROVED"
    ds.save_as(path)
    plan, _ = _plan(one_patient)
    second = plan.dailies[1]
    assert second.rtstruct is None and "UNAPPROVED" in second.notes[0]
    assert plan.dailies[0].rtstruct is not None


def test_synth_archive_looks_like_an_export(synthetic_archive: Path) -> None:
    """What `synth --dicom archive` writes: RTPLAN -> planning contours, approved daily contours, the extras."""
    root = synthetic_archive / "dicom"
    manifest = json.loads((root / "archive.json").read_text())
    assert sorted(manifest["patients"]) == [f"JRS00{k}" for k in range(1, 7)]
    assert manifest["extras"]["without_contours"] == "JRS006 fraction 3"
    inventory = scan_archive(root)
    assert {p.name for p in inventory.non_dicom_files} == {"archive.json", "export_log.txt"}
    assert len(inventory.duplicate_files) == len(list((root / "JRS001" / "second_export" / "CT_1").iterdir()))
    plan = next((root / "JRS001" / "Study_PLAN1" / "RTPLAN_4").iterdir())
    planning = pydicom.dcmread(next((root / "JRS001" / "Study_PLAN1" / "RTSTRUCT_3").iterdir()))
    rtplan = pydicom.dcmread(plan)
    assert rtplan.ReferencedStructureSetSequence[0].ReferencedSOPInstanceUID == planning.SOPInstanceUID
    daily = pydicom.dcmread(next((root / "JRS001" / "Study_FX1" / "RTSTRUCT_2").iterdir()))
    frames = [ds.ReferencedFrameOfReferenceSequence[0].FrameOfReferenceUID for ds in (daily, planning)]
    assert daily.ApprovalStatus == "APPROVED" and frames[0] != frames[1]
    exe = shutil.which("dciodvfy")
    if exe is None:  # CI installs dicom3tools; a missing validator must not pass silently
        pytest.fail("dciodvfy not found: install it with `apt-get install -y dicom3tools`")
    for path in (plan, next((root / "JRS001" / "Study_FX1" / "RTSTRUCT_2").iterdir())):
        result = subprocess.run([exe, str(path)], capture_output=True, text=True, timeout=120)
        output = result.stdout + result.stderr
        assert not [line for line in output.splitlines() if "Error" in line], output
