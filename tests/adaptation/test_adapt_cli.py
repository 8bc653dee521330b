"""``prostate-jrs adapt`` on tiny data: a loadable patient bundle, or one error line and nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from prostate_jrs.adaptation.patient_bundle import ADAPTATION_KEY
from prostate_jrs.cli import main
from prostate_jrs.pipeline import load_bundle


@pytest.mark.slow  # a whole adaptation and a bundle load
def test_adapt_writes_a_loadable_patient_bundle(
    trainable_tiny_bundle: Path, handover: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sessions = [str(handover["JRS004"][k].approved) for k in (1, 2)]
    out = tmp_path / "patient_bundle"
    args = ["adapt", "--bundle", str(trainable_tiny_bundle), "--sessions", *sessions, "--out", str(out)]
    assert main([*args, "--steps", "2", "--seed", "3"]) == 0
    printed = capsys.readouterr().out
    assert "approved fraction 2 of 2 read" in printed and "step 2/2: training loss" in printed
    assert f"wrote {out}; it runs for this patient only" in printed and "JRS004" not in printed
    load_bundle(out)
    record = json.loads((out / "configs" / "metadata.json").read_text())[ADAPTATION_KEY]
    assert [f["order"] for f in record["fractions"]] == [1, 2]
    assert record["training"]["settings"]["steps"] == 2 and record["training"]["settings"]["seed"] == 3
    assert [p.name for p in tmp_path.iterdir()] == [out.name]  # no staging folder left

    # an existing output folder is never written into
    assert main([*args, "--steps", "1"]) == 2
    assert "patient_bundle: already exists" in capsys.readouterr().err


def test_adapt_refuses_mixed_patients_and_another_patients_bundle(
    patient_bundle: Path,
    trainable_tiny_bundle: Path,
    handover: dict,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "out"
    mixed = [str(handover["JRS001"][1].approved), str(handover["JRS005"][1].approved)]
    assert main(["adapt", "--bundle", str(trainable_tiny_bundle), "--sessions", *mixed, "--out", str(out)]) == 2
    error = capsys.readouterr().err
    assert error.startswith("prostate-jrs adapt: error: approved fractions of 2 patients") and error.count("\n") == 1
    other = [str(handover["JRS005"][1].approved)]
    assert main(["adapt", "--bundle", str(patient_bundle), "--sessions", *other, "--out", str(out)]) == 2
    assert "a patient bundle adapted for another patient" in capsys.readouterr().err
    assert not out.exists()
    with pytest.raises(SystemExit):
        main(["adapt", "--bundle", str(trainable_tiny_bundle), "--sessions", *other, "--out", str(out), "--steps", "0"])
