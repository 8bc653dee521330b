"""The patient bundle: complete and loadable, bound to its patient by a keyed pseudonym, refused for anyone else."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from prostate_jrs.adaptation.patient_bundle import (
    ADAPTATION_KEY,
    SITE_SECRET_ENV,
    PatientBundleError,
    Pseudonymiser,
    check_bundle_patient,
    model_summary,
    patient_key,
    write_patient_bundle,
)
from prostate_jrs.adaptation.sessions import read_approved_fractions
from prostate_jrs.pipeline import load_bundle
from prostate_jrs.trust import MODEL_HASH_KEY, sha256_file


def _metadata(bundle: Path) -> dict:
    return json.loads((bundle / "configs" / "metadata.json").read_text())


def test_pseudonyms_are_salted_keyed_and_slow_to_guess(monkeypatch: pytest.MonkeyPatch) -> None:
    plain = Pseudonymiser(b"\x01" * 16)
    pseudonym = plain.pseudonym("JRS001")
    assert len(pseudonym) == 32 and int(pseudonym, 16) >= 0
    assert pseudonym == Pseudonymiser(b"\x01" * 16).pseudonym("JRS001")
    assert pseudonym != plain.pseudonym("JRS002") != Pseudonymiser(b"\x02" * 16).pseudonym("JRS001")
    assert pseudonym != Pseudonymiser(b"\x01" * 16, b"site key").pseudonym("JRS001")
    assert patient_key(" JRS001 ", "HOSP") == "JRS001 (HOSP)" and patient_key("JRS001") == "JRS001"
    assert len(plain.digest("1.2.3.4")) == 32 and plain.digest("1.2.3.4") != plain.digest("1.2.3.5")
    record = plain.record("JRS001")
    assert record["salt"] == "01" * 16 and record["site_secret"] is False and "JRS001" not in json.dumps(record)

    monkeypatch.setenv(SITE_SECRET_ENV, "site key")
    keyed = Pseudonymiser.new()
    record = keyed.record("JRS001")
    assert record["site_secret"] is True
    assert Pseudonymiser.from_record(record, "m").pseudonym("JRS001") == record["pseudonym"]
    monkeypatch.delenv(SITE_SECRET_ENV)
    with pytest.raises(PatientBundleError, match=f"m: .*made with the site secret; set \\${SITE_SECRET_ENV}"):
        Pseudonymiser.from_record(record, "m")
    with pytest.raises(PatientBundleError, match="no valid 'salt'"):
        Pseudonymiser.from_record({"pseudonym": "ab"}, "m")


def test_the_patient_bundle_is_complete_loadable_and_holds_no_identifier(
    patient_bundle: Path, trainable_tiny_bundle: Path, handover: dict
) -> None:
    network, settings = load_bundle(patient_bundle)  # the app's loader: sha256 checked, weights fit the config
    assert settings.model_spacing == 4.0
    base, metadata = _metadata(trainable_tiny_bundle), _metadata(patient_bundle)
    assert metadata[MODEL_HASH_KEY] == sha256_file(patient_bundle / "models" / "model.pt") != base[MODEL_HASH_KEY]
    assert metadata["version"] == base["version"].split("+")[0] + "+patient"
    assert next(iter(metadata["changelog"])) == metadata["version"]
    record = metadata[ADAPTATION_KEY]
    assert record["format"] == 1
    assert record["base_model"]["sha256"] == base[MODEL_HASH_KEY] and record["base_model"]["kind"] == "base"
    assert Pseudonymiser.from_record(record["patient"], "m").pseudonym("JRS001") == record["patient"]["pseudonym"]
    training = record["training"]
    assert training["settings"]["steps"] == 1 and len(training["loss_curve"]) == 1
    assert training["approved_pairs"] == 1 and training["planning_items"] == 1 and training["total_seconds"] > 0
    (fraction,) = record["fractions"]
    assert fraction["order"] == 1 and fraction["rigid_residual_mm"] is not None
    uids = read_approved_fractions([handover["JRS001"][1].approved])[0].uids
    digest = Pseudonymiser.from_record(record["patient"], "m").digest
    assert {k: fraction[k] for k in uids} == {k: digest(v) for k, v in uids.items()}
    for path in patient_bundle.rglob("*"):  # no Patient ID, patient name or UID anywhere in the bundle
        if path.is_file():
            content = path.read_bytes()
            assert b"JRS001" not in content and b"Phantom^" not in content, path
            assert not any(uid.encode() in content for uid in uids.values()), path
    for config in ("train.json", "inference.json", "evaluate.json"):
        assert (patient_bundle / "configs" / config).read_bytes() == (
            trainable_tiny_bundle / "configs" / config
        ).read_bytes()
    assert set(torch.load(patient_bundle / "models" / "model.pt", weights_only=True)) == set(network.state_dict())


def test_a_patient_bundle_runs_for_its_patient_only(patient_bundle: Path, trainable_tiny_bundle: Path) -> None:
    check_bundle_patient(trainable_tiny_bundle, "ANYONE")  # a base bundle runs for everyone
    check_bundle_patient(patient_bundle, "JRS001")
    with pytest.raises(
        PatientBundleError, match=r"JRS001_bundle: a patient bundle adapted for another patient \(pseudonym"
    ):
        check_bundle_patient(patient_bundle, "JRS002")
    with pytest.raises(PatientBundleError, match="adapted for another patient"):
        check_bundle_patient(patient_bundle, "JRS001", "OTHER HOSPITAL")  # same ID, another issuer
    with pytest.raises(PatientBundleError, match=r"the session has no PatientID \(0010,0020\) to check it against"):
        check_bundle_patient(patient_bundle, "")


def test_model_summary_says_which_model_runs(patient_bundle: Path, trainable_tiny_bundle: Path) -> None:
    base = model_summary(trainable_tiny_bundle)
    assert base["kind"] == "base" and base["sha256"] == _metadata(trainable_tiny_bundle)[MODEL_HASH_KEY]
    patient = model_summary(patient_bundle)
    assert patient["kind"] == "patient" and patient["sha256"] == _metadata(patient_bundle)[MODEL_HASH_KEY]
    assert patient["base_sha256"] == base["sha256"] and patient["fractions_used"] == 1
    assert patient["patient_pseudonym"] == _metadata(patient_bundle)[ADAPTATION_KEY]["patient"]["pseudonym"]


def test_a_patient_bundle_is_written_completely_or_not_at_all(trainable_tiny_bundle: Path, tmp_path: Path) -> None:
    record = {"patient": Pseudonymiser(b"\x00" * 16).record("X"), "base_model": {"sha256": "ab"}, "fractions": []}

    def fail(path: Path) -> None:
        path.write_bytes(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_patient_bundle(trainable_tiny_bundle, tmp_path / "out", fail, record)
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "out").mkdir()
    with pytest.raises(FileExistsError, match="out: already exists"):
        write_patient_bundle(trainable_tiny_bundle, tmp_path / "out", fail, record)
