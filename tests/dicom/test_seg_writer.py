"""SEG writer: dciodvfy-clean Segmentation, read back by highdicom to the same label map, SNOMED codes."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import highdicom as hd
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from prostate_jrs.dicom.common import PatientInfo, StudyInfo
from prostate_jrs.dicom.seg_writer import SegOptions, write_seg
from prostate_jrs.labels import STRUCTURES, structure_by_name

if TYPE_CHECKING:  # conftest is not importable at run time; fixtures hand its helpers over
    from conftest import DicomCheck, WrittenSeries

OPTIONS = SegOptions(algorithm_name="JRS-CrossStitch", algorithm_version="1.2.3")


@pytest.fixture(scope="module")
def seg_path(daily_series: WrittenSeries, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_seg(
        daily_series.labels, daily_series.datasets, tmp_path_factory.mktemp("seg") / "SEG.dcm", options=OPTIONS
    )


def _read_labels(path: Path, series: WrittenSeries) -> np.ndarray:
    seg = hd.seg.segread(path)
    uids = [ds.SOPInstanceUID for ds in series.datasets]
    return seg.get_pixels_by_source_instance(uids, combine_segments=True, skip_overlap_checks=True)


def test_passes_dciodvfy(seg_path: Path, dciodvfy: Callable[[Path], DicomCheck]) -> None:
    check = dciodvfy(seg_path)
    assert check.errors == [], check.output
    assert check.warnings == [], check.output


def test_highdicom_reads_back_the_label_map(seg_path: Path, daily_series: WrittenSeries) -> None:
    labels = _read_labels(seg_path, daily_series)  # (frames, rows, columns) in the order asked for
    np.testing.assert_array_equal(labels, sitk.GetArrayFromImage(daily_series.labels))


def test_codes_and_algorithm(seg_path: Path, daily_series: WrittenSeries) -> None:
    seg = hd.seg.segread(seg_path)
    expected_codes = {
        "Prostate": "41216001",
        "SeminalVesicles": "64739004",
        "Rectum": "34402009",
        "Bladder": "89837001",
    }
    assert seg.SegmentationType == "BINARY"
    for number, structure in enumerate(STRUCTURES, start=1):
        description = seg.get_segment_description(number)
        assert description.segment_label == structure.display_name
        assert description.segmented_property_type.value == expected_codes[structure.display_name]
        assert description.segmented_property_type.scheme_designator == "SCT"
        assert description.segmented_property_category.value == "91723000"
        assert description.segmented_property_category.meaning == "Anatomical Structure"
        assert description.algorithm_type == hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC
        algorithm = description.algorithm_identification[0]
        assert (algorithm.AlgorithmName, algorithm.AlgorithmVersion) == ("JRS-CrossStitch", "1.2.3")
        colour = hd.color.CIELabColor.from_dicom_value(description.RecommendedDisplayCIELabValue).to_rgb()
        np.testing.assert_allclose(colour, structure.color, atol=1)
    ct = daily_series.datasets[0]
    for keyword in ("PatientID", "StudyInstanceUID", "FrameOfReferenceUID"):
        assert seg[keyword].value == ct[keyword].value


def test_subset_of_structures_and_ffs(
    tmp_path: Path, patient: PatientInfo, daily_study: StudyInfo, series_writer: Callable[..., WrittenSeries]
) -> None:
    series = series_writer(tmp_path / "ct", patient, daily_study, position="FFS")
    structures = [structure_by_name("bladder"), structure_by_name("rectum")]
    path = write_seg(series.labels, series.datasets, tmp_path / "SEG.dcm", structures=structures, options=OPTIONS)
    labels = _read_labels(path, series)
    source = sitk.GetArrayFromImage(series.labels)
    np.testing.assert_array_equal(labels == 1, source == 4)
    np.testing.assert_array_equal(labels == 2, source == 3)
    assert labels.max() == 2


def test_labelmap_type_reads_back(daily_series: WrittenSeries, tmp_path: Path) -> None:
    # Label Map Segmentation Storage is DICOM 2024: Debian 12's dciodvfy does not know it, so no dciodvfy here
    options = SegOptions(segmentation_type="LABELMAP")
    path = write_seg(daily_series.labels, daily_series.datasets, tmp_path / "SEG.dcm", options=options)
    assert pydicom.dcmread(path).SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.7"
    np.testing.assert_array_equal(_read_labels(path, daily_series), sitk.GetArrayFromImage(daily_series.labels))


def test_bad_input_is_rejected(daily_series: WrittenSeries, tmp_path: Path) -> None:
    shifted = sitk.Image(daily_series.labels)
    shifted.SetOrigin(tuple(np.add(shifted.GetOrigin(), (2.0, 0.0, 0.0))))
    with pytest.raises(ValueError, match="not on the CT grid"):
        write_seg(shifted, daily_series.datasets, tmp_path / "SEG.dcm")
    wrong = sitk.Image(daily_series.labels)
    wrong[1, 1, 1] = 7
    with pytest.raises(ValueError, match=r"labels \[7\]"):
        write_seg(wrong, daily_series.datasets, tmp_path / "SEG.dcm")
    with pytest.raises(ValueError, match="segmentation_type"):
        SegOptions(segmentation_type="FRACTIONAL")  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []
