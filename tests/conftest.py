"""Session fixtures shared by several test packages: an ONNX cache, a synthetic hospital archive and its import.

The archive is what ``prostate-jrs synth D --patients 6 --fractions 3 --seed 0 --preset tiny --dicom archive`` writes
(4 mm voxels): six patients with planning CT, RTSTRUCT and RTPLAN, three daily CTs each with approved daily contours
(the last patient's last one without), a stray series of another patient, a duplicate export and a non-DICOM file.
The import tests, the preprocessing test, the bundle-on-imported-data test and the two-site federated test use it.
The adaptation tests, the app's and the session's patient-bundle tests use its per-fraction folders (``handover``) and
a patient bundle adapted to JRS001's first approved fraction (``patient_bundle``).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from prostate_jrs.adaptation.finetune import AdaptSettings
from prostate_jrs.adaptation.runner import adapt_patient
from prostate_jrs.cli import main
from prostate_jrs.phantom.handover import FractionFolders, fraction_folders
from prostate_jrs.tiny_bundle import TINY_TRAINING, write_tiny_bundle

REPO = Path(__file__).resolve().parents[1]

ARCHIVE_ARGS = ["--patients", "6", "--fractions", "3", "--seed", "0", "--preset", "tiny", "--dicom", "archive"]


@pytest.fixture(scope="session", autouse=True)
def onnx_cache() -> Iterator[str]:
    """``$PROSTATE_JRS_CACHE`` for the session (and the app runs it starts): nothing is written to the home folder,
    and a network exported once (e.g. the tiny bundle's seed-0 weights) is reused by every later test."""
    folder = tempfile.mkdtemp(prefix="prostate-jrs-cache-")
    previous = os.environ.get("PROSTATE_JRS_CACHE")
    os.environ["PROSTATE_JRS_CACHE"] = folder
    yield folder
    if previous is None:
        os.environ.pop("PROSTATE_JRS_CACHE", None)
    else:
        os.environ["PROSTATE_JRS_CACHE"] = previous
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def synthetic_archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The synthetic dataset folder; its ``dicom/`` is the archive export (``dicom/archive.json``: the truth)."""
    root = tmp_path_factory.mktemp("archive") / "synth"
    assert main(["synth", str(root), *ARCHIVE_ARGS]) == 0
    return root


@pytest.fixture(scope="session")
def imported_archive(synthetic_archive: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``prostate-jrs import`` of the untouched archive: the dataset folder (``<dataset>-private`` beside it)."""
    out = tmp_path_factory.mktemp("imported") / "dataset"
    assert main(["import", str(synthetic_archive / "dicom"), str(out), "--no-progress"]) == 0
    return out


@pytest.fixture(scope="session")
def handover(
    synthetic_archive: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, dict[int, FractionFolders]]:
    """``{patient: {fraction: folders}}``: per fraction of the archive, the new-fraction and the approved folder."""
    return fraction_folders(synthetic_archive, tmp_path_factory.mktemp("handover"))


@pytest.fixture(scope="session")
def trainable_tiny_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The repo's bundle with tiny inference and training settings and random weights (seed 0)."""
    return write_tiny_bundle(REPO / "bundle", tmp_path_factory.mktemp("adapt") / "tiny", training=TINY_TRAINING)


@pytest.fixture(scope="session")
def patient_bundle(
    trainable_tiny_bundle: Path,
    handover: dict[str, dict[int, FractionFolders]],
    tmp_path_factory: pytest.TempPathFactory,
) -> Path:
    """``trainable_tiny_bundle`` adapted (one step) to JRS001's approved fraction 1: it runs for JRS001 only."""
    out = tmp_path_factory.mktemp("patient") / "JRS001_bundle"
    adapt_patient(trainable_tiny_bundle, [handover["JRS001"][1].approved], out, AdaptSettings(steps=1))
    return out
