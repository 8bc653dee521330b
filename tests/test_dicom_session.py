"""``load_session`` on a synthetic DICOM session: missing structures are reported, an RTSTRUCT without any refused;
a patient bundle is refused for another patient's session, and ``qa.json`` says which model ran."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from dicom_edits import edit_rois

from prostate_jrs.adaptation.patient_bundle import PatientBundleError
from prostate_jrs.dicom.rtstruct_reader import RTStructError
from prostate_jrs.dicom_session import check_bundle_for_session, load_session, process_session, qa_document
from prostate_jrs.node.runner import ERROR_PREFIX
from prostate_jrs.node.worker import main as worker_main
from prostate_jrs.phantom import PhantomConfig, write_dataset
from prostate_jrs.phantom.dicom_export import export_dicom_sessions
from prostate_jrs.pipeline import PipelineSettings
from prostate_jrs.trust import sha256_file


@pytest.fixture(scope="module")
def session_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny synthetic session (planning CT, RTSTRUCT with Prostate, SV, Rectum, Bladder and BODY, daily CT)."""
    root = tmp_path_factory.mktemp("session") / "data"
    write_dataset(root, n_patients=1, n_fractions=1, seed=1, config=PhantomConfig.tiny())
    export_dicom_sessions(root)
    return root / "dicom" / "JRS001_f01"


def _copy(source: Path, tmp_path: Path) -> tuple[Path, Path]:
    folder = Path(shutil.copytree(source, tmp_path / "in"))
    return folder, next(folder.glob("RS.*.dcm"))


def test_some_structures_missing_are_reported(session_folder: Path, tmp_path: Path) -> None:
    folder, rtstruct = _copy(session_folder, tmp_path)
    edit_rois(rtstruct, rename={"SV": "Spacer"}, remove=("Rectum",))
    inputs = load_session(folder)
    assert inputs.contours.missing_structures == ["seminal_vesicles", "rectum"]
    assert inputs.contours.unmapped_rois == ["Spacer", "BODY"]
    assert "structures missing from the planning RTSTRUCT: seminal_vesicles, rectum" in inputs.notes
    assert "ROIs not used (no structure): Spacer, BODY" in inputs.notes
    labels = sitk.GetArrayFromImage(inputs.planning_labels)
    assert set(np.unique(labels)) == {0, 1, 4}

    # qa.json lists them apart from the notes
    result = SimpleNamespace(contour_source={}, model_grid=sitk.Image(4, 4, 4, sitk.sitkUInt8), qa={})
    document = qa_document(result, inputs, PipelineSettings())  # type: ignore[arg-type]
    assert document["session"]["missing_structures"] == ["seminal_vesicles", "rectum"]
    assert document["session"]["unmapped_rois"] == ["Spacer", "BODY"]
    assert document["session"]["roi_to_structure"]["Spacer"] is None
    json.dumps(document)


def test_rtstruct_without_any_structure_is_refused(session_folder: Path, tmp_path: Path) -> None:
    folder, rtstruct = _copy(session_folder, tmp_path)
    edit_rois(rtstruct, rename={"Prostate": "Target", "SV": "Spacer", "Rectum": "Gut", "Bladder": "Vesica X"})
    with pytest.raises(
        RTStructError,
        match=r"no ROI gives any of the structures prostate, seminal_vesicles, rectum, bladder \(ROIs found: "
        r"'Target', 'Spacer', 'Gut', 'Vesica X', 'BODY'\); expected at least one",
    ) as info:
        load_session(folder)
    assert rtstruct.name in str(info.value) and "synonym table" in str(info.value)

    # ROIs with known names but no contour: also nothing to propagate, and said so
    folder, rtstruct = _copy(session_folder, tmp_path / "2")
    ds = pydicom.dcmread(rtstruct)
    for item in ds.ROIContourSequence:
        del item.ContourSequence
    ds.save_as(rtstruct)
    with pytest.raises(RTStructError, match="'Prostate', 'SV', 'Rectum', 'Bladder' map to a structure but have no"):
        load_session(folder)


def test_a_patient_bundle_is_refused_for_another_patient_and_nothing_is_written(
    patient_bundle: Path, handover: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # the DICOM node's path (process_session): the check comes before the network is loaded or anything written
    out = tmp_path / "out"
    with pytest.raises(PatientBundleError, match=r"a patient bundle adapted for another patient .* is refused"):
        process_session(handover["JRS002"][2].scan, out, patient_bundle)
    assert not out.exists()
    # the node's worker process: exit status 1, one error line, nothing written
    assert worker_main([str(handover["JRS002"][2].scan), str(out), str(patient_bundle), "--device", "cpu"]) == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith(ERROR_PREFIX)]
    assert len(errors) == 1 and "a patient bundle adapted for another patient" in errors[0]
    assert not out.exists()
    check_bundle_for_session(patient_bundle, load_session(handover["JRS001"][2].scan))  # its own patient passes


def test_qa_json_says_which_model_ran(patient_bundle: Path, handover: dict) -> None:
    inputs = load_session(handover["JRS001"][2].scan)
    result = SimpleNamespace(contour_source={}, model_grid=sitk.Image(4, 4, 4, sitk.sitkUInt8), qa={})
    document = qa_document(result, inputs, PipelineSettings(), bundle=str(patient_bundle))  # type: ignore[arg-type]
    model = document["model"]
    assert model["kind"] == "patient" and model["sha256"] == sha256_file(patient_bundle / "models" / "model.pt")
    assert model["fractions_used"] == 1 and len(model["base_sha256"]) == 64
    assert qa_document(result, inputs, PipelineSettings())["model"] is None  # type: ignore[arg-type]
