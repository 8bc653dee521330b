"""The app with a patient bundle: refused on another patient's study (one line, exit 1, nothing written), run on its
own patient's study with ``qa.json`` naming the model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from prostate_jrs.trust import sha256_file

pytestmark = pytest.mark.slow  # adapts a bundle, then two app processes

if TYPE_CHECKING:  # conftest is not importable at run time; the fixture hands its helper over
    from conftest import RunApp


def test_a_patient_bundle_runs_for_its_patient_only(
    run_app: RunApp, patient_bundle: Path, handover: dict, tmp_path: Path
) -> None:
    refused = tmp_path / "refused"
    other = handover["JRS003"][2].scan
    result = run_app(["-i", str(other), "-o", str(refused), "-m", str(patient_bundle)], tmp_path)
    assert result.returncode == 1, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("prostate-jrs: error:")]
    assert len(errors) == 1 and "a patient bundle adapted for another patient" in errors[0]
    assert "prostate-jrs: no output written" in result.stderr
    assert not refused.exists()

    out = tmp_path / "own"
    result = run_app(["-i", str(handover["JRS001"][2].scan), "-o", str(out), "-m", str(patient_bundle)], tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    model = json.loads((out / "qa.json").read_text())["model"]
    assert model["kind"] == "patient" and model["sha256"] == sha256_file(patient_bundle / "models" / "model.pt")
