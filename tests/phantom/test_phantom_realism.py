"""Realism against the real pelvic CT fixture (TotalSegmentator example, 3 mm): the same statistics on both."""

from __future__ import annotations

from pathlib import Path

import pytest
import SimpleITK as sitk

from prostate_jrs.phantom import PhantomConfig, generate_patient
from prostate_jrs.phantom.realism import hu_statistics

REAL_CT = (
    Path(__file__).resolve().parents[2] / ".." / "shared" / "fixtures" / "real" / "pelvis_ct" / "pelvis_ct_3mm.nii.gz"
)

# Stated tolerances: HU peaks and urine within these many HU of the real scan, noise SD within this ratio.
PEAK_TOLERANCE_HU = 15.0
URINE_TOLERANCE_HU = 10.0
NOISE_RATIO = (0.67, 1.5)


@pytest.fixture(scope="module")
def real_stats() -> dict[str, float]:
    if not REAL_CT.exists():
        pytest.skip(f"real CT fixture not found at {REAL_CT}")
    return hu_statistics(sitk.ReadImage(str(REAL_CT)))


@pytest.fixture(scope="module")
def phantom_stats() -> dict[str, float]:
    # Planning scan only, on the real scan's 3 mm voxels (noise depends on voxel size).
    patient = generate_patient(seed=0, n_fractions=0, config=PhantomConfig().with_spacing(3.0))
    return hu_statistics(patient.planning.image)


def test_real_fixture_statistics_are_sane(real_stats: dict[str, float]) -> None:
    assert -120 < real_stats["fat_peak_hu"] < -80
    assert 0 < real_stats["urine_mean_hu"] < 30
    assert real_stats["urine_volume_ml"] > 50


@pytest.mark.parametrize("key", ["fat_peak_hu", "soft_tissue_peak_hu"])
def test_hu_peaks_match_real_ct(key: str, real_stats: dict[str, float], phantom_stats: dict[str, float]) -> None:
    assert abs(phantom_stats[key] - real_stats[key]) <= PEAK_TOLERANCE_HU, (phantom_stats, real_stats)


def test_urine_matches_real_ct(real_stats: dict[str, float], phantom_stats: dict[str, float]) -> None:
    assert abs(phantom_stats["urine_mean_hu"] - real_stats["urine_mean_hu"]) <= URINE_TOLERANCE_HU


def test_noise_matches_real_ct(real_stats: dict[str, float], phantom_stats: dict[str, float]) -> None:
    ratio = phantom_stats["noise_sd_hu"] / real_stats["noise_sd_hu"]
    assert NOISE_RATIO[0] <= ratio <= NOISE_RATIO[1], (phantom_stats, real_stats)
