"""One adaptation end to end: approved DICOM fractions of a patient + a bundle -> a patient bundle.

:func:`adapt_patient` reads the approved fractions (:mod:`prostate_jrs.adaptation.sessions`), puts them on the
bundle's model grid (:mod:`prostate_jrs.adaptation.pairs`), fine-tunes the bundle's network with its own trainer
(:mod:`prostate_jrs.adaptation.finetune`) and writes the patient bundle with its record
(:mod:`prostate_jrs.adaptation.patient_bundle`). ``prostate-jrs adapt`` is a thin front end over it.
"""

from __future__ import annotations

import datetime as dt
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from prostate_jrs.adaptation.finetune import AdaptSettings, TrainingRecord, finetune, model_grid_settings
from prostate_jrs.adaptation.pairs import training_items
from prostate_jrs.adaptation.patient_bundle import (
    Pseudonymiser,
    check_bundle_patient,
    model_summary,
    write_patient_bundle,
)
from prostate_jrs.adaptation.sessions import ApprovedFraction, read_approved_fractions
from prostate_jrs.dicom.common import package_version
from prostate_jrs.labels import SynonymTable
from prostate_jrs.rigid import RigidAlignment

__all__ = ["AdaptationResult", "adapt_patient"]

_FORMAT = 1


@dataclass
class AdaptationResult:
    """What :func:`adapt_patient` wrote.

    Attributes:
        bundle: the patient bundle folder.
        pseudonym: the patient's pseudonym in it.
        fractions: approved fractions learnt from.
        training: the training record.
        seconds: wall time of the whole adaptation (reading, preprocessing, training, writing).
    """

    bundle: Path
    pseudonym: str
    fractions: int
    training: TrainingRecord
    seconds: float


def _fraction_records(
    fractions: Sequence[ApprovedFraction], rigids: Sequence[RigidAlignment], pseudonymiser: Pseudonymiser
) -> list[dict[str, Any]]:
    """Per fraction: its order and keyed digests of its UIDs (no dates, names or folder names)."""
    records = []
    for order, (fraction, rigid) in enumerate(zip(fractions, rigids, strict=True), start=1):
        digests = {name: pseudonymiser.digest(uid) for name, uid in fraction.uids.items()}
        residual = None if rigid.residual is None else round(rigid.residual, 3)
        records.append({"order": order, **digests, "rigid_residual_mm": residual})
    return records


def adapt_patient(
    bundle_dir: str | os.PathLike[str],
    sessions: Sequence[str | os.PathLike[str]],
    out_dir: str | os.PathLike[str],
    settings: AdaptSettings | None = None,
    *,
    synonyms: SynonymTable | None = None,
    progress: Callable[[str], None] | None = None,
) -> AdaptationResult:
    """Fine-tune ``bundle_dir`` on one patient's approved fractions and write the patient bundle ``out_dir``.

    Args:
        bundle_dir: the base bundle (or an earlier patient bundle of the same patient).
        sessions: DICOM folders of approved fractions (:func:`read_approved_fractions`).
        out_dir: the patient bundle folder; must not exist. Written completely or not at all.
        settings: budget and recipe; ``None`` for the defaults.
        synonyms: ROI name -> structure table; ``None`` for the default.
        progress: called with a line per stage and about every tenth of the training steps.

    Returns:
        What was written.

    Raises:
        FileExistsError: if ``out_dir`` exists.
        DicomSelectionError, CTSeriesError, RTStructError: on sessions that are missing, of several patients or
            unreadable (:func:`read_approved_fractions`).
        PatientBundleError: if ``bundle_dir`` is a patient bundle of another patient.
        BundleError: if the bundle lacks its training config or weights, or they are not those it records.
        ValueError: if a pair cannot be aligned on bone or put on the model grid.
    """
    start = time.perf_counter()
    settings = settings or AdaptSettings()
    bundle, out = Path(bundle_dir), Path(out_dir)
    if out.exists():
        raise FileExistsError(f"{out}: already exists; a patient bundle is written into a new folder")
    say = progress or (lambda _: None)
    fractions = read_approved_fractions(sessions, synonyms=synonyms, progress=say)
    check_bundle_patient(bundle, *fractions[0].patient)  # adapting another patient's bundle further is refused too
    approved, planning, rigids = training_items(fractions, model_grid_settings(bundle))
    say(f"{len(approved)} approved pair(s) and {len(planning)} planning scan(s) on the model grid")
    network, record = finetune(bundle, approved, planning, settings, progress=say)
    say(f"patient loss on the approved pairs: {record.loss_before:.4f} -> {record.loss_after:.4f}")
    pseudonymiser = Pseudonymiser.new()
    patient = pseudonymiser.record(fractions[0].patient_key)
    base = model_summary(bundle)
    adaptation = {
        "format": _FORMAT,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "software": {"name": "prostate-jrs", "version": package_version()},
        "patient": patient,
        "base_model": {k: base.get(k) for k in ("kind", "sha256", "name", "version", "base_sha256") if base.get(k)},
        "fractions": _fraction_records(fractions, rigids, pseudonymiser),
        "training": {**record.as_dict(), "total_seconds": round(time.perf_counter() - start, 2)},
    }
    state = {k: v.detach().cpu() for k, v in network.state_dict().items()}
    write_patient_bundle(bundle, out, lambda path: torch.save(state, path), adaptation)
    seconds = time.perf_counter() - start
    say(f"wrote {out} ({seconds:.0f} s)")
    return AdaptationResult(out, str(patient["pseudonym"]), len(fractions), record, seconds)
