"""Fixtures for the DICOM writer tests: a small synthetic pelvis, its CT series on disk, and ``dciodvfy``."""

from __future__ import annotations

import datetime as dt
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from prostate_jrs.dicom.common import PatientInfo, StudyInfo, make_uid
from prostate_jrs.dicom.ct_series import CTSeriesInfo, write_ct_series

SHAPE = (48, 40, 16)  # (I, J, K)
SPACING = (1.5, 1.25, 3.0)


@dataclass(frozen=True)
class DicomCheck:
    """Result of one ``dciodvfy`` run."""

    errors: list[str]
    warnings: list[str]
    output: str


def _run_dciodvfy(path: Path) -> DicomCheck:
    exe = shutil.which("dciodvfy")
    if exe is None:
        # fail, never skip: CI installs Debian's dicom3tools, and a missing validator must not pass silently
        pytest.fail("dciodvfy not found: install it with `apt-get install -y dicom3tools`")
    result = subprocess.run([exe, str(path)], capture_output=True, text=True, timeout=120, check=False)
    output = result.stdout + result.stderr
    lines = [line.strip() for line in output.splitlines()]
    return DicomCheck(
        errors=[line for line in lines if "Error" in line],
        warnings=[line for line in lines if line.startswith("Warning")],
        output=output,
    )


@pytest.fixture(scope="session")
def dciodvfy() -> Callable[[Path], DicomCheck]:
    """Callable validating one DICOM file with Debian's ``dciodvfy``; fails the test when the tool is missing."""
    return _run_dciodvfy


def direction_for(position: str) -> tuple[float, ...]:
    """Direction cosines (columns I, J, K) a scanner writes for an axial scan in patient position ``position``."""
    row, col = {
        "HFS": ((1, 0, 0), (0, 1, 0)),
        "FFS": ((-1, 0, 0), (0, 1, 0)),
        "HFP": ((-1, 0, 0), (0, -1, 0)),
        "FFP": ((1, 0, 0), (0, -1, 0)),
    }[position]
    normal = np.cross(row, col)
    return tuple(float(v) for v in np.stack([row, col, normal], axis=1).ravel())


def make_phantom(
    position: str = "HFS",
    seed: int = 0,
    shape: tuple[int, int, int] = SHAPE,
    spacing: tuple[float, float, float] = SPACING,
) -> tuple[sitk.Image, sitk.Image]:
    """A small CT (int16 HU) and its label map (uint8, labels 0..4) on the same grid.

    The rectum is a hollow tube, so its slices have holes; the bladder is an ellipsoid; prostate and seminal
    vesicles sit between them. Sizes are in mm, so ``shape`` and ``spacing`` change the sampling only.
    """
    rng = np.random.default_rng(seed)
    i, j, k = np.meshgrid(*(np.arange(n, dtype=np.float64) for n in shape), indexing="ij")
    x, y, z = i * spacing[0], j * spacing[1], k * spacing[2]  # mm from the first voxel
    labels = np.zeros(shape, dtype=np.uint8)
    bladder = ((x - 36) / 12) ** 2 + ((y - 16) / 9) ** 2 + ((z - 30) / 12) ** 2 <= 1
    prostate = ((x - 36) / 8) ** 2 + ((y - 30) / 6) ** 2 + ((z - 15) / 8) ** 2 <= 1
    vesicles = ((x - 36) / 14) ** 2 + ((y - 36) / 3.5) ** 2 + ((z - 27) / 5) ** 2 <= 1
    radius = np.hypot(x - 36, y - 43)
    rectum = (radius <= 6.5) & (radius >= 3.0) & (z >= 3) & (z <= 38)
    labels[bladder] = 4
    labels[rectum] = 3
    labels[vesicles & ~bladder & ~rectum] = 2
    labels[prostate & ~bladder & ~rectum] = 1
    body = ((x - 36) / 34) ** 2 + ((y - 25) / 23) ** 2 <= 1
    hu = np.where(body, 20.0, -1000.0) + rng.normal(0.0, 10.0, shape)
    hu[labels == 4] = 5
    hu[labels == 1] = 45
    hu[labels == 3] = 35
    hu[(labels == 3) & (radius < 3.0)] = -700
    ct = sitk.GetImageFromArray(np.clip(np.rint(hu), -1024, 3071).astype(np.int16).transpose(2, 1, 0))
    label_image = sitk.GetImageFromArray(labels.transpose(2, 1, 0))
    direction = direction_for(position)
    for image in (ct, label_image):
        image.SetSpacing(spacing)
        image.SetDirection(direction)
        image.SetOrigin((-36.0, -25.0, -30.0))
    return ct, label_image


@pytest.fixture(scope="session")
def phantom() -> Callable[..., tuple[sitk.Image, sitk.Image]]:
    """:func:`make_phantom`, for tests that need their own volumes."""
    return make_phantom


@pytest.fixture(scope="session")
def series_writer() -> Callable[..., WrittenSeries]:
    """:func:`write_series`, for tests that write their own series."""
    return write_series


@pytest.fixture(scope="session")
def patient() -> PatientInfo:
    """One synthetic patient."""
    return PatientInfo(name="Synthetic^Pelvis", patient_id="PJRS-0001", birth_date=dt.date(1952, 3, 14), sex="M")


@pytest.fixture(scope="session")
def planning_study() -> StudyInfo:
    """The planning CT study."""
    return StudyInfo(
        study_instance_uid=make_uid("test", "planning study"),
        study_datetime=dt.datetime(2025, 1, 6, 9, 15, 0),
        study_id="PLAN1",
        accession_number="ACC0001",
        referring_physician_name="Oncologist^Ann",
        description="RT planning pelvis",
    )


@pytest.fixture(scope="session")
def daily_study() -> StudyInfo:
    """A daily (treatment fraction) CT study of the same patient."""
    return StudyInfo(
        study_instance_uid=make_uid("test", "daily study"),
        study_datetime=dt.datetime(2025, 1, 20, 8, 2, 30),
        study_id="FX01",
        accession_number="ACC0002",
        referring_physician_name="Oncologist^Ann",
        description="Daily CT fraction 1",
    )


@dataclass(frozen=True)
class WrittenSeries:
    """A CT series written to disk together with the volumes it came from."""

    ct: sitk.Image
    labels: sitk.Image
    folder: Path
    files: list[Path]
    datasets: list[pydicom.Dataset]


def write_series(
    folder: Path,
    patient: PatientInfo,
    study: StudyInfo,
    position: str = "HFS",
    tag: str = "daily",
    shape: tuple[int, int, int] = SHAPE,
    spacing: tuple[float, float, float] = SPACING,
) -> WrittenSeries:
    """Write the phantom CT as a series into ``folder`` and read it back with pydicom."""
    ct, labels = make_phantom(position, shape=shape, spacing=spacing)
    series = CTSeriesInfo(
        frame_of_reference_uid=make_uid("test", tag, position, "for"),
        series_instance_uid=make_uid("test", tag, position, shape, spacing, "series"),
        series_description=f"CT {tag}",
        series_number=2,
        patient_position=position,
    )
    files = write_ct_series(ct, folder, patient=patient, study=study, series=series)
    return WrittenSeries(ct, labels, folder, files, [pydicom.dcmread(f) for f in files])


@pytest.fixture(scope="session")
def daily_series(
    tmp_path_factory: pytest.TempPathFactory, patient: PatientInfo, daily_study: StudyInfo
) -> WrittenSeries:
    """The phantom written as a daily HFS CT series (read-only for tests: write outputs elsewhere)."""
    return write_series(tmp_path_factory.mktemp("daily_ct"), patient, daily_study)


@pytest.fixture(scope="session")
def planning_series(
    tmp_path_factory: pytest.TempPathFactory, patient: PatientInfo, planning_study: StudyInfo
) -> WrittenSeries:
    """The phantom written as a planning HFS CT series with its own frame of reference."""
    return write_series(tmp_path_factory.mktemp("planning_ct"), patient, planning_study, tag="planning")
