"""The MONAI Deploy app as users run it: `python app -i IN -o OUT -m BUNDLE` in a subprocess, on tiny sessions."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

import numpy as np
import pydicom
import pytest
from script_loader import load_script

from prostate_jrs.dicom.ct_reader import read_ct_series
from prostate_jrs.dicom.registration import read_deformable_registration
from prostate_jrs.dicom.rtstruct_reader import read_rtstruct
from prostate_jrs.phantom import PhantomConfig, write_dataset
from prostate_jrs.phantom.dicom_export import export_dicom_sessions
from prostate_jrs.pipeline import BundleError

if TYPE_CHECKING:  # conftest is not importable at run time; the fixture hands its helper over
    from conftest import RunApp

REPO = Path(__file__).resolve().parents[2]
OUTPUTS = ("rtstruct.dcm", "seg.dcm", "registration.dcm", "qa.json", "qa.png")


@pytest.fixture(scope="module")
def sessions(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two tiny synthetic patients, one fraction each, exported as DICOM sessions (4 mm voxels)."""
    root = tmp_path_factory.mktemp("synth") / "data"
    write_dataset(root, n_patients=2, n_fractions=1, seed=0, config=PhantomConfig.tiny())
    export_dicom_sessions(root)
    return root


def _record(sessions: Path, patient: str) -> dict:
    manifest = json.loads((sessions / "dicom" / "sessions.json").read_text())
    return next(s for s in manifest["sessions"] if s["patient"] == patient)


def _header(path: Path) -> pydicom.Dataset:
    return pydicom.dcmread(path, stop_before_pixels=True)


def test_app_writes_complete_valid_outputs(sessions: Path, bundle: Path, tmp_path: Path, run_app: RunApp) -> None:
    session = sessions / "dicom" / "JRS001_f01"
    out = tmp_path / "out"
    result = run_app(["-i", str(session), "-o", str(out), "-m", str(bundle)], cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == sorted(OUTPUTS)  # no staging folder left
    for name in ("Prostate", "SeminalVesicles", "Rectum", "Bladder"):
        assert any(line.startswith(name) for line in result.stdout.splitlines()), result.stdout

    record = _record(sessions, "JRS001")
    uids = record["uids"]
    daily_uid, planning_uid = uids["daily_ct_series"], uids["planning_ct_series"]
    daily_files = [p for p in session.glob("CT.*.dcm") if _header(p).SeriesInstanceUID == daily_uid]
    daily = read_ct_series(daily_files)

    # every DICOM output validates
    if shutil.which("dciodvfy"):
        for name in ("rtstruct.dcm", "seg.dcm", "registration.dcm"):
            check = subprocess.run(["dciodvfy", str(out / name)], capture_output=True, text=True)
            errors = [line for line in (check.stdout + check.stderr).splitlines() if line.startswith("Error")]
            assert not errors, f"{name}: {errors}"

    # RTSTRUCT: on the daily series, in its frame of reference, readable back onto the daily CT
    rtstruct = pydicom.dcmread(out / "rtstruct.dcm")
    frame = rtstruct.ReferencedFrameOfReferenceSequence[0]
    assert frame.FrameOfReferenceUID == daily.frame_of_reference_uid
    referenced = frame.RTReferencedStudySequence[0].RTReferencedSeriesSequence[0]
    assert referenced.SeriesInstanceUID == daily_uid
    assert rtstruct.PatientID == "JRS001"
    contours = read_rtstruct(out / "rtstruct.dcm", daily)
    assert contours.label_map.shape == tuple(daily.image.GetSize())
    assert not contours.missing_structures or set(contours.missing_structures) <= {"seminal_vesicles"}

    # SEG on the daily series
    seg = pydicom.dcmread(out / "seg.dcm", stop_before_pixels=True)
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == daily_uid
    assert seg.FrameOfReferenceUID == daily.frame_of_reference_uid

    # registration: daily frame registered, planning frame the source, rigid part as pre-deformation matrix
    qa = json.loads((out / "qa.json").read_text())
    registration = read_deformable_registration(out / "registration.dcm")
    assert registration.registered_frame_of_reference_uid == daily.frame_of_reference_uid
    assert registration.source_frame_of_reference_uid == uids["planning_frame_of_reference"]
    np.testing.assert_allclose(registration.pre_matrix, np.asarray(qa["rigid"]["daily_to_planning"]), atol=1e-5)
    assert registration.ddf_on(daily.image).shape == (3, *daily.image.GetSize())
    # the rigid part recovers the table offset between the two frames (bone; ground truth in sessions.json)
    bone = np.asarray(record["bone_daily_to_planning"])
    np.testing.assert_allclose(registration.pre_matrix[:3, 3], bone[:3, 3], atol=4.0)

    # qa.json
    assert qa["session"]["patient_id"] == "JRS001"
    assert qa["session"]["daily_ct_series_uid"] == daily_uid
    assert qa["session"]["planning_ct_series_uid"] == planning_uid
    assert set(qa["structures"]) == {"prostate", "seminal_vesicles", "rectum", "bladder"}
    assert {"dsc_reg_seg", "volume_ml", "planning_volume_ml", "volume_change_pct", "source"} <= set(
        qa["structures"]["prostate"]
    )
    assert {"folding_fraction", "jacobian_std"} <= set(qa["ddf"])
    assert {"bone_rms_mm", "translation_mm", "daily_to_planning"} <= set(qa["rigid"])
    assert {"load", "rigid", "preprocess", "network", "restore", "qa", "total"} <= set(qa["timings_s"])
    assert qa["settings"]["network_backend"] == _auto_backend_on_cpu()  # the bundle's default on the CPU
    # the bundle's default refinement ran, and its mode and cost are recorded
    refine = qa["refine"]
    assert refine["mode"] == "accurate" and refine["budget"] > 0 and refine["seconds"] > 0
    assert "refine" in qa["timings_s"]
    assert refine["similarity_after"] < refine["similarity_before"]
    assert isinstance(qa["flags"], list)
    assert (out / "qa.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _auto_backend_on_cpu() -> str:
    """``resolve_backend("auto", "cpu")``, resolved in a child process.

    Resolving imports the ONNX engines; OpenVINO imported into the test process while pytest captures its output
    left pytest's capture file closed after the in-process app runs of tests/app/test_app_fuzz.py (every later test
    then errored with "I/O operation on closed file").
    """
    code = "from prostate_jrs.backends import resolve_backend; print(resolve_backend('auto', 'cpu'))"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()


def test_app_refuses_mixed_patients_and_writes_nothing(
    sessions: Path, bundle: Path, tmp_path: Path, run_app: RunApp
) -> None:
    """Planning CT and RTSTRUCT of JRS001 with the daily CT of JRS002: refused, named, no output."""
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    own, other = _record(sessions, "JRS001"), _record(sessions, "JRS002")
    for path in (sessions / own["folder"]).glob("*.dcm"):
        if _header(path).SeriesInstanceUID != own["uids"]["daily_ct_series"]:
            shutil.copy(path, mixed / path.name)  # planning CT and RTSTRUCT of JRS001
    for path in (sessions / other["folder"]).glob("*.dcm"):
        if _header(path).SeriesInstanceUID == other["uids"]["daily_ct_series"]:
            shutil.copy(path, mixed / path.name)  # daily CT of JRS002

    out = tmp_path / "out"
    result = run_app(["-i", str(mixed), "-o", str(out), "-m", str(bundle)], cwd=tmp_path)
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-2000:]
    assert "prostate-jrs: error:" in result.stderr
    assert "JRS002" in result.stderr and "JRS001" in result.stderr
    assert not out.exists() or not any(out.iterdir())


def _app_module() -> ModuleType:
    """``app/app.py`` imported in-process (its folder on ``sys.path`` for ``operators``, as ``python app`` has it)."""
    if str(REPO / "app") not in sys.path:
        sys.path.insert(0, str(REPO / "app"))
    return load_script(REPO / "app" / "app.py", "prostate_jrs_deploy_app")


def test_backend_and_refine_options_are_the_apps_own() -> None:
    app = _app_module()
    options, sdk_argv = app.parse_app_options(["app", "-i", "IN", "--backend", "torch", "-o", "OUT", "--refine", "off"])
    assert options.backend == "torch" and options.refine == "off"
    assert sdk_argv == ["app", "-i", "IN", "-o", "OUT"]
    with pytest.raises(SystemExit):
        app.parse_app_options(["app", "--backend", "tensorrt"])


def test_bundle_path_resolution(bundle: Path, tmp_path: Path) -> None:
    app = _app_module()
    assert app.resolve_bundle(["app", "-m", str(bundle)]) == bundle
    assert app.resolve_bundle(["app", "--model", str(bundle.parent)]) == bundle  # a MAP's models folder
    assert app.resolve_bundle(["app", "-m", str(bundle / "models" / "model.pt")]) == bundle
    empty = tmp_path / "bundle"
    shutil.copytree(REPO / "bundle" / "configs", empty / "configs")
    with pytest.raises(BundleError, match=r"models/model\.pt"):
        app.resolve_bundle(["app", "-m", str(empty)])
    with pytest.raises(BundleError, match="not a MONAI bundle"):
        app.resolve_bundle(["app", "-m", str(REPO / "app")])
