"""The patient bundle: a complete MONAI bundle fine-tuned for one patient, and the rule that it runs for no other.

A patient bundle is the base bundle's ``configs/``, ``docs/`` and ``LICENSE`` with new weights
(``models/model.pt``, sha256 recorded as ``model_sha256`` by :func:`prostate_jrs.trust.record_model_hash`) and, in
``configs/metadata.json`` under :data:`ADAPTATION_KEY`::

    {"format": 1,
     "patient": {"pseudonym": hex, "scheme": "...", "salt": hex, "site_secret": bool},
     "base_model": {"sha256": ..., "name": ..., "version": ...},
     "fractions": [{"order": 1, "daily_ct": hash, "daily_rtstruct": hash,
                    "planning_ct": hash, "planning_rtstruct": hash, "rigid_residual_mm": ...}, ...],
     "training": {...}}                       # prostate_jrs.adaptation.finetune.TrainingRecord

The pseudonym is a keyed, salted and deliberately slow hash (scrypt) of the Patient ID with the Issuer of Patient ID
(:func:`patient_key`): the bundle never holds the Patient ID, yet a session's patient can be checked against it.
The salt is random per bundle; a site that sets ``$PROSTATE_JRS_SITE_SECRET`` (:data:`SITE_SECRET_ENV`) adds a
secret key to it, so that without the secret nobody can test guessed Patient IDs against the bundle (Patient IDs are
often short numbers; the salt alone only makes each guess cost ~50 ms). The same secret must then be set wherever the
bundle runs. DICOM UIDs are recorded as keyed HMAC-SHA256 digests with the same key.

:func:`check_bundle_patient` is the safety rule: a patient bundle is refused, before anything is read into the
network or written, for a session of any other patient (and when the pseudonym cannot be checked). The app's
inference operator and :func:`prostate_jrs.dicom_session.process_session` (the DICOM node) call it through
:func:`prostate_jrs.dicom_session.check_bundle_for_session`. :func:`model_summary` says in ``qa.json`` which model
ran.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prostate_jrs.errors import PatientBundleError
from prostate_jrs.pipeline import BundleError
from prostate_jrs.trust import MODEL_FILE, MODEL_HASH_KEY, sha256_file, write_bundle

__all__ = [
    "ADAPTATION_KEY",
    "SITE_SECRET_ENV",
    "PatientBundleError",
    "Pseudonymiser",
    "adaptation_record",
    "check_bundle_patient",
    "model_summary",
    "patient_key",
    "write_patient_bundle",
]

#: Key of ``configs/metadata.json`` holding a patient bundle's record.
ADAPTATION_KEY = "patient_adaptation"
#: Environment variable holding the site's secret key of the pseudonyms (optional).
SITE_SECRET_ENV = "PROSTATE_JRS_SITE_SECRET"
_METADATA = "configs/metadata.json"
_FORMAT = 1
_SCRYPT = {"n": 2**14, "r": 8, "p": 1, "dklen": 16}  # ~50 ms and 16 MiB per pseudonym: guessing IDs costs
_SCHEME = "scrypt(n=16384, r=8, p=1) of 'PatientID' or 'PatientID (IssuerOfPatientID)', salt + site secret"
_COPIED = ("configs", "docs", "LICENSE")


def patient_key(patient_id: str, issuer: str = "") -> str:
    """The identity a patient bundle is bound to: Patient ID, with the Issuer of Patient ID in brackets when given."""
    patient_id, issuer = patient_id.strip(), issuer.strip()
    return patient_id if not issuer else f"{patient_id} ({issuer})"


@dataclass(frozen=True)
class Pseudonymiser:
    """Keyed hashes of a patient bundle: the patient's pseudonym and digests of DICOM UIDs.

    Args:
        salt: random bytes stored in the bundle.
        secret: the site secret (empty when none).
    """

    salt: bytes
    secret: bytes = b""

    @classmethod
    def new(cls) -> Pseudonymiser:
        """A fresh salt, with the site secret of ``$PROSTATE_JRS_SITE_SECRET`` if set."""
        return cls(secrets.token_bytes(16), os.environ.get(SITE_SECRET_ENV, "").encode())

    @classmethod
    def from_record(cls, patient: Mapping[str, Any], where: str) -> Pseudonymiser:
        """The pseudonymiser a bundle's ``patient`` record was made with.

        Raises:
            PatientBundleError: naming ``where`` if the record is malformed, or needs the site secret and
                ``$PROSTATE_JRS_SITE_SECRET`` is not set.
        """
        try:
            salt = bytes.fromhex(str(patient["salt"]))
        except (KeyError, ValueError) as err:
            raise PatientBundleError(f"{where}: the patient record has no valid 'salt'; the bundle is damaged") from err
        secret = os.environ.get(SITE_SECRET_ENV, "").encode()
        if patient.get("site_secret") and not secret:
            raise PatientBundleError(
                f"{where}: this patient bundle's pseudonym was made with the site secret; set ${SITE_SECRET_ENV} as "
                "where it was adapted, or the patient cannot be checked and the bundle is not run"
            )
        return cls(salt, secret)

    def pseudonym(self, key: str) -> str:
        """The patient's pseudonym (hex) of a :func:`patient_key`."""
        return hashlib.scrypt(key.encode("utf-8"), salt=self.salt + self.secret, **_SCRYPT).hex()

    def digest(self, uid: str) -> str:
        """A keyed digest (hex, 128 bits) of a DICOM UID: fractions can be matched, not traced back."""
        return hmac.new(self.salt + self.secret, uid.encode("ascii"), hashlib.sha256).hexdigest()[:32]

    def record(self, key: str) -> dict[str, Any]:
        """The ``patient`` record of a bundle for the patient ``key``."""
        return {
            "pseudonym": self.pseudonym(key),
            "scheme": _SCHEME,
            "salt": self.salt.hex(),
            "site_secret": bool(self.secret),
        }


def _metadata(bundle: Path) -> dict[str, Any]:
    path = bundle / _METADATA
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise BundleError(f"{path}: not valid JSON ({err}); expected the bundle's metadata") from None
    if not isinstance(data, dict):
        raise BundleError(f"{path}: expected a JSON object (the bundle's metadata)")
    return data


def adaptation_record(bundle_dir: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The bundle's patient record (:data:`ADAPTATION_KEY` of its metadata), or ``None`` for a base bundle.

    Raises:
        BundleError: if the metadata is not a JSON object, or the record is not one.
    """
    bundle = Path(bundle_dir)
    record = _metadata(bundle).get(ADAPTATION_KEY)
    if record is not None and not isinstance(record, dict):
        raise PatientBundleError(f"{bundle / _METADATA}: {ADAPTATION_KEY!r} is not an object; the bundle is damaged")
    return record


def check_bundle_patient(bundle_dir: str | os.PathLike[str], patient_id: str, issuer: str = "") -> None:
    """Refuse a patient bundle for a session of another patient; a base bundle passes.

    Args:
        bundle_dir: the bundle folder.
        patient_id: the session's Patient ID.
        issuer: its Issuer of Patient ID.

    Raises:
        PatientBundleError: if the bundle is a patient bundle of another patient, or its patient cannot be checked
            (no Patient ID, a damaged record, the site secret missing).
    """
    bundle = Path(bundle_dir)
    record = adaptation_record(bundle)
    if record is None:
        return
    where = str(bundle / _METADATA)
    patient = record.get("patient")
    if not isinstance(patient, dict) or not patient.get("pseudonym"):
        raise PatientBundleError(f"{where}: the patient bundle names no patient pseudonym; the bundle is damaged")
    if not patient_id.strip():
        raise PatientBundleError(
            f"{bundle}: a patient bundle, and the session has no PatientID (0010,0020) to check it against; refused"
        )
    pseudonymiser = Pseudonymiser.from_record(patient, where)
    if not hmac.compare_digest(pseudonymiser.pseudonym(patient_key(patient_id, issuer)), str(patient["pseudonym"])):
        raise PatientBundleError(
            f"{bundle}: a patient bundle adapted for another patient (pseudonym {str(patient['pseudonym'])[:8]}); "
            "this session's patient is not that patient, so it is refused. Run the base bundle or this patient's "
            "own patient bundle"
        )


def model_summary(bundle_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Which model a bundle runs, for ``qa.json``: ``kind`` (``base`` or ``patient``), its sha256, name and version;
    for a patient bundle also the base model's sha256, the patient pseudonym and the number of fractions learnt."""
    bundle = Path(bundle_dir)
    metadata = _metadata(bundle)
    weights = bundle / MODEL_FILE
    summary: dict[str, Any] = {
        "kind": "base",
        "sha256": metadata.get(MODEL_HASH_KEY) or (sha256_file(weights) if weights.is_file() else None),
        "name": metadata.get("name"),
        "version": metadata.get("version"),
    }
    record = metadata.get(ADAPTATION_KEY)
    if isinstance(record, dict):
        summary.update(
            kind="patient",
            base_sha256=(record.get("base_model") or {}).get("sha256"),
            patient_pseudonym=(record.get("patient") or {}).get("pseudonym"),
            fractions_used=len(record.get("fractions") or []),
        )
    return summary


def write_patient_bundle(
    base_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    write_weights: Any,
    record: Mapping[str, Any],
) -> Path:
    """Write a patient bundle: the base's configs, docs and licence, new weights and the patient record.

    The folder appears complete or not at all (written beside ``out_dir`` under a hidden name, then renamed).

    Args:
        base_dir: the bundle that was fine-tuned.
        out_dir: the new bundle folder; must not exist.
        write_weights: called with the path of ``models/model.pt`` to write the weights there.
        record: the :data:`ADAPTATION_KEY` record (patient, base model, fractions, training).

    Returns:
        ``out_dir``.

    Raises:
        FileExistsError: if ``out_dir`` exists.
    """
    base = Path(base_dir)

    def fill(staging: Path) -> None:
        for name in _COPIED:
            source = base / name
            if source.is_dir():
                shutil.copytree(source, staging / name)
            elif source.is_file():
                shutil.copy2(source, staging / name)
        (staging / "models").mkdir()
        write_weights(staging / MODEL_FILE)
        metadata = _metadata(staging)
        version = str(metadata.get("version", "0"))
        metadata["version"] = f"{version.split('+')[0]}+patient"
        metadata["name"] = f"{metadata.get('name', 'bundle')} (patient-specific)"
        entry = (
            f"fine-tuned for one patient on {len(record.get('fractions', []))} approved fraction(s) from model "
            f"sha256 {str(record.get('base_model', {}).get('sha256', ''))[:12]}; runs for that patient only"
        )
        metadata["changelog"] = {metadata["version"]: entry, **metadata.get("changelog", {})}
        metadata[ADAPTATION_KEY] = dict(record)
        (staging / _METADATA).write_text(json.dumps(metadata, indent=4) + "\n", encoding="utf-8")

    return write_bundle(out_dir, fill, "a patient bundle")
