"""Rigid pre-alignment on bone: recovers the phantom's setup transform, across frames of reference and offsets."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from prostate_jrs.dicom.ct_reader import read_ct_series
from prostate_jrs.dicom.discovery import select_session
from prostate_jrs.geometry import array_from_image, index_to_world, resample_with_ddf
from prostate_jrs.phantom import Patient, PhantomConfig, generate_patient, write_dataset
from prostate_jrs.phantom.dicom_export import export_dicom_sessions, setup_transform
from prostate_jrs.phantom.shapes import rotation_matrix
from prostate_jrs.rigid import NoBoneError, align_on_bone, resample_moving


@pytest.fixture(scope="module")
def patient() -> Patient:
    return generate_patient(seed=3, n_fractions=2, config=PhantomConfig.tiny())


def _bone_points(image: sitk.Image, hu: float = 300.0) -> np.ndarray:
    """World coordinates of the bone voxels of ``image``."""
    index = np.argwhere(array_from_image(image) > hu).astype(np.float64)
    to_world = index_to_world(image)
    return index @ to_world[:3, :3].T + to_world[:3, 3]


def _bone_errors(result_points: np.ndarray, truth: np.ndarray, points: np.ndarray) -> np.ndarray:
    expected = points @ truth[:3, :3].T + truth[:3, 3]
    return np.linalg.norm(result_points - expected, axis=1)


def _moved(image: sitk.Image, shift: np.ndarray, angles: np.ndarray) -> tuple[sitk.Image, np.ndarray]:
    """``image`` with the same voxels in another frame: new world = R @ old world + shift; also that 4x4 map."""
    rot = rotation_matrix(angles)
    matrix = np.eye(4)
    matrix[:3, :3], matrix[:3, 3] = rot, shift
    out = sitk.Image(image)
    out.SetDirection(tuple((rot @ np.asarray(image.GetDirection()).reshape(3, 3)).ravel()))
    out.SetOrigin(tuple(rot @ np.asarray(image.GetOrigin()) + shift))
    return out, matrix


@pytest.mark.parametrize("fraction", [0, 1])
def test_recovers_the_setup_transform_on_bone(patient: Patient, fraction: int) -> None:
    daily = patient.fractions[fraction]
    result = align_on_bone(daily.image, patient.planning.image)
    points = _bone_points(daily.image)
    errors = _bone_errors(result.map_points(points), setup_transform(daily.info), points)
    assert errors.max() < 1.0, f"bone error mean {errors.mean():.2f} mm, max {errors.max():.2f} mm"
    assert result.bone_rms_mm < 2.0  # about a third of a 4 mm working voxel once aligned
    assert result.bone_overlap > 0.85


def test_recovers_an_extra_40_mm_3_degree_offset(patient: Patient) -> None:
    daily = patient.fractions[0]
    moved, matrix = _moved(daily.image, np.array([40.0, -30.0, 35.0]), np.array([3.0, -3.0, 3.0]))
    result = align_on_bone(moved, patient.planning.image)
    truth = setup_transform(daily.info) @ np.linalg.inv(matrix)
    points = _bone_points(moved)
    errors = _bone_errors(result.map_points(points), truth, points)
    assert errors.max() < 1.0, f"bone error mean {errors.mean():.2f} mm, max {errors.max():.2f} mm"


def test_identity(patient: Patient) -> None:
    result = align_on_bone(patient.planning.image, patient.planning.image)
    points = _bone_points(patient.planning.image)
    errors = _bone_errors(result.map_points(points), np.eye(4), points)
    assert errors.max() < 0.2
    assert np.abs(result.rotation_deg).max() < 0.05


def test_transform_direction_resampling_and_ddf_agree(patient: Patient) -> None:
    daily = patient.fractions[1]
    result = align_on_bone(daily.image, patient.planning.image, resample=True)
    assert result.resampled is not None
    assert result.resampled.GetSize() == daily.image.GetSize()
    # the SimpleITK transform and the 4x4 matrix are the same daily -> planning map
    point = (10.0, 40.0, -20.0)
    np.testing.assert_allclose(result.transform.TransformPoint(point), result.map_points(point)[0], atol=1e-6)
    # the DDF form of the transform resamples the planning CT like the transform itself
    via_ddf = resample_with_ddf(patient.planning.image, daily.image, result.ddf(daily.image), default_value=-1000)
    direct = array_from_image(result.resampled).astype(np.float32)
    assert np.median(np.abs(via_ddf - direct)) < 1.0
    # on daily bone, the resampled planning CT is what the true setup transform gives
    truth = setup_transform(daily.info)
    true_transform = sitk.AffineTransform(truth[:3, :3].ravel().tolist(), truth[:3, 3].tolist())
    expected = array_from_image(resample_moving(patient.planning.image, daily.image, true_transform))
    bone = array_from_image(daily.image) > 300
    assert np.median(np.abs(direct[bone] - expected[bone])) < 15


def test_different_frames_of_reference_from_dicom(tmp_path: Path) -> None:
    """DICOM sessions: the daily scan has its own frame of reference; the alignment finds the bone transform."""
    out = tmp_path / "D"
    write_dataset(out, 1, 1, 11, config=PhantomConfig.tiny())
    export_dicom_sessions(out)
    record = json.loads((out / "dicom" / "sessions.json").read_text())["sessions"][0]
    session = select_session(out / record["folder"])
    planning = read_ct_series(session.planning_ct.files).image
    daily = read_ct_series(session.daily_ct.files).image
    result = align_on_bone(daily, planning)
    points = _bone_points(daily)
    errors = _bone_errors(result.map_points(points), np.asarray(record["bone_daily_to_planning"]), points)
    assert errors.max() < 1.0, f"bone error mean {errors.mean():.2f} mm, max {errors.max():.2f} mm"


def test_no_bone_is_a_clear_error(patient: Patient) -> None:
    array = np.full((40, 40, 20), -1000, dtype=np.int16)
    i, j = np.meshgrid(np.arange(40), np.arange(40), indexing="ij")
    array[(i - 20) ** 2 + (j - 20) ** 2 < 15**2, :] = 0  # a water cylinder
    water = sitk.GetImageFromArray(array.transpose(2, 1, 0))
    water.SetSpacing((4.0, 4.0, 4.0))
    with pytest.raises(NoBoneError, match=r"daily CT \(fixed\).*above 200 HU.*expected at least"):
        align_on_bone(water, patient.planning.image)
    with pytest.raises(NoBoneError, match=r"planning CT \(moving\)"):
        align_on_bone(patient.planning.image, water)


def test_rejects_a_vector_image(patient: Patient) -> None:
    vector = sitk.Compose(patient.planning.image, patient.planning.image)
    with pytest.raises(ValueError, match="scalar 3D image"):
        align_on_bone(vector, patient.planning.image)


def test_same_seed_same_result(patient: Patient) -> None:
    daily = patient.fractions[0]
    threads = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)  # ITK's threaded metric sums in a varying order
    try:
        first, second = (align_on_bone(daily.image, patient.planning.image, seed=5) for _ in range(2))
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
    np.testing.assert_array_equal(first.matrix, second.matrix)
    with pytest.raises(ValueError, match="seed must be positive"):
        align_on_bone(daily.image, patient.planning.image, seed=0)


def test_an_integer_ct_is_block_averaged_before_it_is_cast() -> None:
    from prostate_jrs.rigid import _working_image

    hu = np.random.default_rng(3).integers(-1024, 2000, size=(6, 8, 10)).astype(np.int16)  # (K, J, I)
    image = sitk.GetImageFromArray(hu)
    image.SetSpacing((1.0, 1.0, 2.0))
    work = _working_image(image, 2.0)
    assert work.GetPixelID() == sitk.sitkFloat32 and work.GetSize() == (5, 4, 6)
    exact = hu.astype(np.float64).reshape(6, 4, 2, 5, 2).mean(axis=(2, 4))
    assert np.abs(sitk.GetArrayFromImage(work) - exact).max() <= 0.5  # means in whole HU
    as_float = _working_image(sitk.Cast(image, sitk.sitkFloat32), 2.0)  # a float CT keeps its exact means
    assert np.allclose(sitk.GetArrayFromImage(as_float), exact, atol=1e-3)
