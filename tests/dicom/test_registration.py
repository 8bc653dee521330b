"""Deformable Spatial Registration: dciodvfy-clean, exact float32 round trip, the DICOM direction convention."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from scipy import ndimage

from prostate_jrs.dicom.common import PatientInfo, StudyInfo
from prostate_jrs.dicom.registration import (
    RegistrationOptions,
    ddf_to_vectors,
    read_deformable_registration,
    write_deformable_registration,
)
from prostate_jrs.geometry import identity_grid, index_to_world

if TYPE_CHECKING:  # conftest is not importable at run time; fixtures hand its helpers over
    from conftest import DicomCheck, WrittenSeries

OPTIONS = RegistrationOptions(algorithm_name="JRS-CrossStitch", algorithm_version="1.2.3")


def smooth_ddf(shape: tuple[int, int, int], seed: int = 0, amplitude: float = 3.0) -> np.ndarray:
    """A random smooth DDF ``(3, I, J, K)`` in voxels, at most ``amplitude`` voxels."""
    rng = np.random.default_rng(seed)
    fields = [ndimage.gaussian_filter(rng.normal(size=shape), 3.0, mode="wrap") for _ in range(3)]
    ddf = np.stack(fields)
    return (ddf * amplitude / np.abs(ddf).max()).astype(np.float32)


def rigid_matrix(angle_deg: float = 4.0, translation: tuple[float, float, float] = (2.5, -1.0, 6.0)) -> np.ndarray:
    """Rotation about the patient's S axis plus a translation, as a 4x4 daily -> planning matrix."""
    angle = np.deg2rad(angle_deg)
    matrix = np.eye(4)
    matrix[:3, :3] = [[np.cos(angle), -np.sin(angle), 0.0], [np.sin(angle), np.cos(angle), 0.0], [0.0, 0.0, 1.0]]
    matrix[:3, 3] = translation
    return matrix


def expected_source_points(grid: sitk.Image, ddf: np.ndarray, rigid: np.ndarray) -> np.ndarray:
    """``R @ A @ (x + ddf(x))``: the planning-frame point the project's convention samples for daily voxel ``x``."""
    to_world = index_to_world(grid)
    index = identity_grid(tuple(grid.GetSize()), np.float64) + ddf
    world = np.tensordot(to_world[:3, :3], index, axes=1) + to_world[:3, 3, None, None, None]
    return np.tensordot(rigid[:3, :3], world, axes=1) + rigid[:3, 3, None, None, None]


@pytest.fixture(scope="module")
def written(
    daily_series: WrittenSeries, planning_series: WrittenSeries, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, np.ndarray, np.ndarray]:
    ddf = smooth_ddf(daily_series.ct.GetSize())
    rigid = rigid_matrix()
    path = write_deformable_registration(
        ddf,
        daily_series.ct,
        daily_series.datasets,
        planning_series.datasets,
        tmp_path_factory.mktemp("reg") / "REG.dcm",
        daily_to_planning=rigid,
        options=OPTIONS,
    )
    return path, ddf, rigid


def test_passes_dciodvfy(written: tuple[Path, np.ndarray, np.ndarray], dciodvfy: Callable[[Path], DicomCheck]) -> None:
    check = dciodvfy(written[0])
    assert check.errors == [], check.output
    assert check.warnings == [], check.output


def test_round_trip(written: tuple[Path, np.ndarray, np.ndarray], daily_series: WrittenSeries) -> None:
    path, ddf, rigid = written
    registration = read_deformable_registration(path)
    # the stored float32 vectors come back bit for bit
    np.testing.assert_array_equal(registration.vectors, ddf_to_vectors(ddf, daily_series.ct, rigid))
    assert registration.vectors.dtype == np.float32
    # and the DDF up to float32 rounding of the mm vectors
    np.testing.assert_allclose(registration.ddf(), ddf, rtol=0, atol=1e-5)
    np.testing.assert_allclose(registration.pre_matrix, rigid, atol=1e-12)
    np.testing.assert_array_equal(registration.post_matrix, np.eye(4))
    np.testing.assert_allclose(index_to_world(registration.grid), index_to_world(daily_series.ct), atol=1e-9)
    assert registration.grid.GetSize() == daily_series.ct.GetSize()
    assert registration.registered_frame_of_reference_uid == daily_series.datasets[0].FrameOfReferenceUID


def test_direction_convention(written: tuple[Path, np.ndarray, np.ndarray], daily_series: WrittenSeries) -> None:
    # DICOM C.20.3.1.1: Source RCS point = M_post (M_pre y + D(y)) for grid point y of the Registered RCS
    path, ddf, rigid = written
    registration = read_deformable_registration(path)
    np.testing.assert_allclose(
        registration.source_points(), expected_source_points(daily_series.ct, ddf, rigid), atol=1e-4
    )


def test_headers(
    written: tuple[Path, np.ndarray, np.ndarray], daily_series: WrittenSeries, planning_series: WrittenSeries
) -> None:
    ds = pydicom.dcmread(written[0])
    daily, planning = daily_series.datasets[0], planning_series.datasets[0]
    assert ds.SOPClassUID == pydicom.uid.DeformableSpatialRegistrationStorage and ds.Modality == "REG"
    assert ds.FrameOfReferenceUID == daily.FrameOfReferenceUID
    assert ds.StudyInstanceUID == daily.StudyInstanceUID and ds.PatientID == daily.PatientID
    identity, deformable = ds.DeformableRegistrationSequence
    assert deformable.SourceFrameOfReferenceUID == planning.FrameOfReferenceUID
    assert identity.SourceFrameOfReferenceUID == daily.FrameOfReferenceUID
    assert deformable.PreDeformationMatrixRegistrationSequence[0].FrameOfReferenceTransformationMatrixType == "RIGID"
    grid = deformable.DeformableRegistrationGridSequence[0]
    assert list(grid.GridDimensions) == list(daily_series.ct.GetSize())
    assert len(grid.VectorGridData) == 3 * 4 * int(np.prod(daily_series.ct.GetSize()))
    other = ds.StudiesContainingOtherReferencedInstancesSequence[0]
    assert other.StudyInstanceUID == planning.StudyInstanceUID
    referenced = {i.ReferencedSOPInstanceUID for i in other.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert referenced == {d.SOPInstanceUID for d in planning_series.datasets}
    assert ds.ContentDescription.startswith("JRS-CrossStitch 1.2.3")


def test_coarser_grid(
    daily_series: WrittenSeries,
    planning_series: WrittenSeries,
    tmp_path: Path,
    dciodvfy: Callable[[Path], DicomCheck],
) -> None:
    ddf = smooth_ddf(daily_series.ct.GetSize(), seed=1)
    rigid = rigid_matrix(angle_deg=-2.0)
    path = write_deformable_registration(
        ddf,
        daily_series.ct,
        daily_series.datasets,
        planning_series.datasets,
        tmp_path / "REG.dcm",
        daily_to_planning=rigid,
        grid_step=(2, 2, 1),
    )
    assert dciodvfy(path).errors == []
    registration = read_deformable_registration(path)
    assert registration.grid.GetSize() == (24, 20, 16)
    np.testing.assert_allclose(registration.grid.GetSpacing(), (3.0, 2.5, 3.0))
    # exact at the stored grid points ...
    np.testing.assert_allclose(
        registration.source_points(), expected_source_points(daily_series.ct, ddf, rigid)[:, ::2, ::2, :], atol=1e-4
    )
    # ... and interpolated in between (trilinear: within a tenth of the largest displacement for this field)
    on_daily = registration.ddf_on(daily_series.ct)
    assert on_daily.shape == ddf.shape
    np.testing.assert_allclose(on_daily[:, ::2, ::2, :], ddf[:, ::2, ::2, :], atol=1e-5)
    assert np.abs(on_daily[:, :-1, :-1, :] - ddf[:, :-1, :-1, :]).max() < 0.1 * np.abs(ddf).max()
    # float32 sampling (geometry.resample_to_grid): equal to 1e-5 voxel on its own grid
    np.testing.assert_allclose(registration.ddf_on(registration.grid), registration.ddf(), atol=1e-5)


def test_same_frame_of_reference_without_rigid(
    tmp_path: Path,
    patient: PatientInfo,
    daily_study: StudyInfo,
    series_writer: Callable[..., WrittenSeries],
    dciodvfy: Callable[[Path], DicomCheck],
) -> None:
    # two series of one study and one frame of reference, e.g. a phantom pair: the rigid part is the identity
    daily = series_writer(tmp_path / "a", patient, daily_study, tag="daily")
    second = series_writer(tmp_path / "b", patient, daily_study, tag="daily")
    second_series_uid = pydicom.uid.generate_uid()
    for ds in second.datasets:
        ds.SeriesInstanceUID = second_series_uid
    ddf = smooth_ddf(daily.ct.GetSize(), seed=3)
    path = write_deformable_registration(ddf, daily.ct, daily.datasets, second.datasets, tmp_path / "REG.dcm")
    check = dciodvfy(path)
    assert check.errors == [], check.output
    registration = read_deformable_registration(path)
    np.testing.assert_array_equal(registration.pre_matrix, np.eye(4))
    np.testing.assert_allclose(
        registration.source_points(), expected_source_points(daily.ct, ddf, np.eye(4)), atol=1e-4
    )


def test_left_handed_grid_is_stored_right_handed(
    tmp_path: Path, patient: PatientInfo, daily_study: StudyInfo, planning_series: WrittenSeries
) -> None:
    from prostate_jrs.dicom.common import make_uid
    from prostate_jrs.dicom.ct_series import CTSeriesInfo, write_ct_series

    ct = sitk.Image(planning_series.ct)
    direction = np.asarray(ct.GetDirection()).reshape(3, 3)
    direction[:, 2] *= -1  # slices stored head to feet
    ct.SetDirection(direction.ravel().tolist())
    files = write_ct_series(ct, tmp_path / "ct", patient=patient, study=daily_study, series=CTSeriesInfo(make_uid()))
    datasets = [pydicom.dcmread(f) for f in files]
    ddf = smooth_ddf(ct.GetSize(), seed=5)
    path = write_deformable_registration(
        ddf, ct, datasets, planning_series.datasets, tmp_path / "REG.dcm", daily_to_planning=rigid_matrix()
    )
    registration = read_deformable_registration(path)
    assert np.linalg.det(np.asarray(registration.grid.GetDirection()).reshape(3, 3)) > 0
    expected = expected_source_points(ct, ddf, rigid_matrix())[:, :, :, ::-1]
    np.testing.assert_allclose(registration.source_points(), expected, atol=1e-4)


def test_bad_input_is_rejected(
    daily_series: WrittenSeries,
    planning_series: WrittenSeries,
    tmp_path: Path,
    series_writer: Callable[..., WrittenSeries],
    planning_study: StudyInfo,
) -> None:
    ddf = smooth_ddf(daily_series.ct.GetSize())
    out = tmp_path / "REG.dcm"
    args = (daily_series.ct, daily_series.datasets, planning_series.datasets, out)
    with pytest.raises(ValueError, match="does not match the daily grid"):
        write_deformable_registration(ddf[:, :-1], *args, daily_to_planning=np.eye(4))
    nan = ddf.copy()
    nan[0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        write_deformable_registration(nan, *args, daily_to_planning=np.eye(4))
    with pytest.raises(ValueError, match="different frames of reference"):
        write_deformable_registration(ddf, *args)
    with pytest.raises(ValueError, match="4x4 homogeneous"):
        write_deformable_registration(ddf, *args, daily_to_planning=np.ones((4, 4)))
    other_patient = series_writer(
        tmp_path / "other", PatientInfo(name="Other^Person", patient_id="PJRS-0002"), planning_study, tag="planning"
    )
    with pytest.raises(ValueError, match="never combines two patients"):
        write_deformable_registration(
            ddf, daily_series.ct, daily_series.datasets, other_patient.datasets, out, daily_to_planning=np.eye(4)
        )
    shifted = sitk.Image(daily_series.ct)
    shifted.SetOrigin(tuple(np.add(shifted.GetOrigin(), (0.0, 5.0, 0.0))))
    with pytest.raises(ValueError, match="DDF grid is not on the CT grid"):
        write_deformable_registration(
            ddf, shifted, daily_series.datasets, planning_series.datasets, out, daily_to_planning=np.eye(4)
        )
    assert not out.exists()
    with pytest.raises(ValueError, match="not Deformable Spatial Registration"):
        read_deformable_registration(daily_series.files[0])
