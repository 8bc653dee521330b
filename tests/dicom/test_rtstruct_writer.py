"""RTSTRUCT writer: dciodvfy-clean, read back by plastimatch and rt-utils, exact contours, clear errors."""

from __future__ import annotations

import dataclasses
import datetime as dt
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from scipy import ndimage
from skimage import measure

from prostate_jrs.dicom.common import PatientInfo, StudyInfo
from prostate_jrs.dicom.rtstruct_writer import RTStructOptions, contours_for_slice, write_rtstruct
from prostate_jrs.geometry import array_from_image, image_from_array
from prostate_jrs.labels import STRUCTURES

if TYPE_CHECKING:  # conftest is not importable at run time; fixtures hand its helpers over
    from conftest import DicomCheck, WrittenSeries

SeriesWriter = Callable[..., "WrittenSeries"]
OPTIONS = RTStructOptions(
    algorithm_name="JRS-CrossStitch",
    algorithm_version="1.2.3",
    content_datetime=dt.datetime(2025, 1, 20, 8, 30, 0),
)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * np.logical_and(a, b).sum() / (a.sum() + b.sum()))


def _fill_holes_per_slice(mask: np.ndarray) -> np.ndarray:
    return np.stack([ndimage.binary_fill_holes(mask[:, :, k]) for k in range(mask.shape[2])], axis=-1)


def _plastimatch_masks(rtstruct: Path, ct_folder: Path, out: Path, grid: sitk.Image) -> dict[str, np.ndarray]:
    exe = shutil.which("plastimatch")
    if exe is None:
        pytest.fail("plastimatch not found: install it with `apt-get install -y plastimatch`")
    command = [exe, "convert", "--input", str(rtstruct), "--referenced-ct", str(ct_folder)]
    command += ["--output-prefix", str(out), "--prefix-format", "nrrd"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    masks = {}
    for path in out.glob("*.nrrd"):
        image = sitk.Resample(sitk.ReadImage(str(path)), grid, sitk.Transform(), sitk.sitkNearestNeighbor)
        masks[path.stem] = array_from_image(image) != 0
    return masks


@pytest.fixture(scope="module")
def written(daily_series: WrittenSeries, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The phantom's label map written on the daily series, once with each way of writing holes."""
    out = tmp_path_factory.mktemp("rtstruct")
    return {
        holes: write_rtstruct(
            daily_series.labels,
            daily_series.datasets,
            out / f"RS_{holes}.dcm",
            options=dataclasses.replace(OPTIONS, holes=holes),
        )
        for holes in ("separate", "keyhole")
    }


@pytest.mark.parametrize("holes", ["separate", "keyhole"])
def test_passes_dciodvfy(written: dict[str, Path], holes: str, dciodvfy: Callable[[Path], DicomCheck]) -> None:
    check = dciodvfy(written[holes])
    assert check.errors == [], check.output
    assert check.warnings == [], check.output


def test_planning_rtstruct_manual_approved_passes_dciodvfy(
    planning_series: WrittenSeries, tmp_path: Path, dciodvfy: Callable[[Path], DicomCheck]
) -> None:
    options = RTStructOptions(
        generation="MANUAL",
        algorithm_name="SyntheticTPS",
        algorithm_version="1.0",
        approval_status="APPROVED",
        reviewer_name="Oncologist^Ann",
        operators_name="Dosimetrist^Bob",
        roi_interpreter="Oncologist^Ann",
        structure_set_label="PLAN",
    )
    path = write_rtstruct(planning_series.labels, planning_series.datasets, tmp_path / "RS.dcm", options=options)
    check = dciodvfy(path)
    assert check.errors == [], check.output
    ds = pydicom.dcmread(path)
    assert {roi.ROIGenerationAlgorithm for roi in ds.StructureSetROISequence} == {"MANUAL"}
    assert all("ROIDerivationAlgorithmIdentificationSequence" not in roi for roi in ds.StructureSetROISequence)
    assert ds.ApprovalStatus == "APPROVED" and str(ds.ReviewerName) == "Oncologist^Ann"


def test_plastimatch_reads_back_keyhole_exactly(
    written: dict[str, Path], daily_series: WrittenSeries, tmp_path: Path
) -> None:
    masks = _plastimatch_masks(written["keyhole"], daily_series.folder, tmp_path, daily_series.labels)
    labels = array_from_image(daily_series.labels)
    for structure in STRUCTURES:
        score = dice(masks[structure.display_name], labels == structure.label)
        assert score >= 0.95, (structure.name, score)
        assert score == 1.0, (structure.name, score)  # sub-voxel contours separate inside and outside pixel centres


def test_plastimatch_fills_separate_holes(
    written: dict[str, Path], daily_series: WrittenSeries, tmp_path: Path
) -> None:
    # plastimatch takes the union of a slice's contours, so holes written as separate contours come back filled;
    # this documents why the keyhole option exists
    masks = _plastimatch_masks(written["separate"], daily_series.folder, tmp_path, daily_series.labels)
    labels = array_from_image(daily_series.labels)
    for structure in STRUCTURES:
        expected = _fill_holes_per_slice(labels == structure.label)
        assert dice(masks[structure.display_name], expected) == 1.0, structure.name


@pytest.mark.parametrize("holes", ["separate", "keyhole"])
def test_rt_utils_reads_back(
    tmp_path: Path, patient: PatientInfo, daily_study: StudyInfo, series_writer: SeriesWriter, holes: str
) -> None:
    from rt_utils import RTStructBuilder  # dev dependency; missing, it fails the test rather than skipping it

    # rt-utils 1.2.7 swaps rows and columns (mask axes and PixelSpacing order), so it needs square, isotropic pixels
    series = series_writer(tmp_path / "ct", patient, daily_study, shape=(48, 48, 16), spacing=(1.25, 1.25, 3.0))
    path = write_rtstruct(
        series.labels,
        series.datasets,
        tmp_path / "rs" / "RS.dcm",
        options=dataclasses.replace(OPTIONS, holes=holes),
    )
    rtstruct = RTStructBuilder.create_from(str(series.folder), str(path))
    labels = array_from_image(series.labels)
    for structure in STRUCTURES:
        # rt-utils indexes its (columns, rows, slices)-shaped mask as [row, column, slice]
        mask = rtstruct.get_roi_mask_by_name(structure.display_name).transpose(1, 0, 2)
        expected = labels == structure.label
        # rt-utils rounds vertices to whole pixels and fills polygon borders, which grows sub-voxel contours
        # by up to one pixel: every voxel comes back, plus a rim
        assert np.logical_and(mask, expected).sum() / expected.sum() >= 0.99, structure.name
        assert dice(mask, expected) >= 0.85, (structure.name, dice(mask, expected))


def test_contents(written: dict[str, Path], daily_series: WrittenSeries) -> None:
    ds = pydicom.dcmread(written["separate"])
    ct = daily_series.datasets[0]
    assert ds.SOPClassUID == pydicom.uid.RTStructureSetStorage and ds.Modality == "RTSTRUCT"
    for keyword in ("PatientID", "PatientName", "StudyInstanceUID", "AccessionNumber", "FrameOfReferenceUID"):
        assert ds[keyword].value == ct[keyword].value, keyword
    assert [roi.ROIName for roi in ds.StructureSetROISequence] == [s.display_name for s in STRUCTURES]
    assert [list(c.ROIDisplayColor) for c in ds.ROIContourSequence] == [list(s.color) for s in STRUCTURES]
    assert [o.RTROIInterpretedType for o in ds.RTROIObservationsSequence] == [s.interpreted_type for s in STRUCTURES]
    for roi in ds.StructureSetROISequence:
        assert roi.ROIGenerationAlgorithm == "AUTOMATIC"
        assert roi.ROIGenerationDescription == "JRS-CrossStitch 1.2.3"
        algorithm = roi.ROIDerivationAlgorithmIdentificationSequence[0]
        assert (algorithm.AlgorithmName, algorithm.AlgorithmVersion) == ("JRS-CrossStitch", "1.2.3")
        assert roi.ReferencedFrameOfReferenceUID == ct.FrameOfReferenceUID
    assert ds.ApprovalStatus == "UNAPPROVED"
    frame = ds.ReferencedFrameOfReferenceSequence[0]
    study = frame.RTReferencedStudySequence[0]
    series = study.RTReferencedSeriesSequence[0]
    assert frame.FrameOfReferenceUID == ct.FrameOfReferenceUID
    assert study.ReferencedSOPInstanceUID == ct.StudyInstanceUID
    assert series.SeriesInstanceUID == ct.SeriesInstanceUID
    assert {i.ReferencedSOPInstanceUID for i in series.ContourImageSequence} == {
        d.SOPInstanceUID for d in daily_series.datasets
    }
    z_of = {d.SOPInstanceUID: float(d.ImagePositionPatient[2]) for d in daily_series.datasets}
    rectum_holes = 0
    for roi_contour in ds.ROIContourSequence:
        for contour in roi_contour.ContourSequence:
            points = np.asarray(contour.ContourData, dtype=np.float64).reshape(-1, 3)
            assert contour.ContourGeometricType == "CLOSED_PLANAR"
            assert contour.NumberOfContourPoints == len(points)
            assert np.allclose(points[:, 2], z_of[contour.ContourImageSequence[0].ReferencedSOPInstanceUID])
            rectum_holes += roi_contour.ReferencedROINumber == 3
    labels = array_from_image(daily_series.labels)
    rectum_slices = int((labels == 3).any(axis=(0, 1)).sum())
    assert rectum_holes == 2 * rectum_slices  # outer border and hole border on every rectum slice


@pytest.mark.parametrize("holes", ["separate", "keyhole"])
def test_contours_separate_pixel_centres_exactly(holes: str) -> None:
    rng = np.random.default_rng(7)
    blobs = ndimage.gaussian_filter(rng.random((40, 36)), 2.0)
    mask = blobs > np.quantile(blobs, 0.55)
    mask[10:30, 10:30] = True
    mask[15:25, 15:25] = False  # a hole ...
    mask[19:21, 19:22] = True  # ... with an island in it
    polygons = contours_for_slice(mask, holes)  # type: ignore[arg-type]
    centres = np.argwhere(np.ones_like(mask)).astype(np.float64)
    inside = np.stack([measure.points_in_poly(centres, p) for p in polygons])
    # even-odd for separate borders; union for keyholed ones (channels carry no area)
    rebuilt = (inside.sum(axis=0) % 2 == 1) if holes == "separate" else inside.any(axis=0)
    rebuilt = rebuilt.reshape(mask.shape)
    if holes == "separate":
        np.testing.assert_array_equal(rebuilt, mask)
    else:
        # pixel centres exactly on a zero-width channel are ambiguous for a point-in-polygon test
        assert np.count_nonzero(rebuilt != mask) <= 0.01 * mask.sum()


def test_masks_input_with_overlap_and_empty_structure(
    daily_series: WrittenSeries, tmp_path: Path, dciodvfy: Callable[[Path], DicomCheck]
) -> None:
    labels = array_from_image(daily_series.labels)
    prostate = labels == 1
    ptv = ndimage.binary_dilation(prostate, iterations=2)  # overlaps everything around the prostate
    masks = {
        "prostate": image_from_array(ptv.astype(np.uint8), daily_series.labels),
        "bladder": image_from_array((labels == 4).astype(np.uint8), daily_series.labels),
        "rectum": image_from_array(np.zeros_like(labels), daily_series.labels),
    }
    path = write_rtstruct(masks, daily_series.datasets, tmp_path / "RS.dcm", options=OPTIONS)
    ds = pydicom.dcmread(path)
    assert [roi.ROIName for roi in ds.StructureSetROISequence] == ["Prostate", "Bladder", "Rectum"]
    assert "ContourSequence" not in ds.ROIContourSequence[2]
    assert dciodvfy(path).errors == []
    skipped = write_rtstruct(
        masks,
        daily_series.datasets,
        tmp_path / "RS2.dcm",
        options=dataclasses.replace(OPTIONS, skip_empty=True),
    )
    assert [roi.ROIName for roi in pydicom.dcmread(skipped).StructureSetROISequence] == ["Prostate", "Bladder"]


def test_label_map_off_the_ct_grid_is_rejected(daily_series: WrittenSeries, tmp_path: Path) -> None:
    shifted = sitk.Image(daily_series.labels)
    shifted.SetOrigin(tuple(np.add(shifted.GetOrigin(), (0.0, 0.0, 1.5))))
    cropped = daily_series.labels[:, :, :10]
    flipped = sitk.Flip(daily_series.labels, [True, False, False], flipAboutOrigin=False)
    resampled = sitk.Resample(daily_series.labels, [24, 20, 16], sitk.Transform(), sitk.sitkNearestNeighbor)
    for bad, message in [
        (shifted, "not a slice of the label map"),
        (cropped, "not a slice of the label map"),
        (flipped, "ImageOrientationPatient"),
        (resampled, "columns x"),
    ]:
        with pytest.raises(ValueError, match=message):
            write_rtstruct(bad, daily_series.datasets, tmp_path / "RS.dcm")
    with pytest.raises(ValueError, match="no image for slices"):
        write_rtstruct(daily_series.labels, daily_series.datasets[:-1], tmp_path / "RS.dcm")
    assert not (tmp_path / "RS.dcm").exists()


def test_label_map_from_another_frame_of_reference_is_rejected(
    daily_series: WrittenSeries, planning_series: WrittenSeries, tmp_path: Path
) -> None:
    # planning and daily phantoms share their grid: only the frame of reference tells them apart
    labels = sitk.Image(daily_series.labels)
    labels.SetMetaData("0020|0052", planning_series.datasets[0].FrameOfReferenceUID)
    with pytest.raises(ValueError, match="frame of reference"):
        write_rtstruct(labels, daily_series.datasets, tmp_path / "RS.dcm")
    labels.SetMetaData("0020|0052", daily_series.datasets[0].FrameOfReferenceUID + "\x00")
    assert write_rtstruct(labels, daily_series.datasets, tmp_path / "RS.dcm").exists()


def test_bad_input_is_rejected(daily_series: WrittenSeries, planning_series: WrittenSeries, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="mixes StudyInstanceUID"):
        write_rtstruct(
            daily_series.labels, daily_series.datasets[:8] + planning_series.datasets[8:], tmp_path / "RS.dcm"
        )
    wrong = sitk.Image(daily_series.labels)
    wrong[0, 0, 0] = 9
    with pytest.raises(ValueError, match=r"labels \[9\]"):
        write_rtstruct(wrong, daily_series.datasets, tmp_path / "RS.dcm")
    with pytest.raises(ValueError, match="integer"):
        write_rtstruct(sitk.Cast(daily_series.labels, sitk.sitkFloat32), daily_series.datasets, tmp_path / "RS.dcm")
    with pytest.raises(ValueError, match="reviewer_name"):
        RTStructOptions(approval_status="APPROVED")
    with pytest.raises(ValueError, match="generation"):
        RTStructOptions(generation="AI")  # type: ignore[arg-type]
    with pytest.raises(KeyError, match="unknown structure"):
        write_rtstruct({"prostrate": daily_series.labels}, daily_series.datasets, tmp_path / "RS.dcm")
    assert list(tmp_path.iterdir()) == []
