"""``load_session`` on a synthetic DICOM session: missing structures are reported, an RTSTRUCT without any refused."""

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

from prostate_jrs.dicom.rtstruct_reader import RTStructError
from prostate_jrs.dicom_session import load_session, qa_document
from prostate_jrs.phantom import PhantomConfig, write_dataset
from prostate_jrs.phantom.dicom_export import export_dicom_sessions
from prostate_jrs.pipeline import PipelineSettings


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
