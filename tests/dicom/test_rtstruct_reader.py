"""RTSTRUCT reader: even-odd filling, orientation, ROI mapping, safety checks, plastimatch and real MIM files."""

from __future__ import annotations

import datetime as dt
import shutil
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from matplotlib.path import Path as PolygonPath
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, RTStructureSetStorage

from prostate_jrs.dicom.common import PatientInfo, StudyInfo, make_uid
from prostate_jrs.dicom.ct_reader import CTVolume, read_ct_series
from prostate_jrs.dicom.ct_series import CTSeriesInfo, write_ct_series
from prostate_jrs.dicom.rtstruct_reader import RTStructError, fill_even_odd, read_rtstruct
from prostate_jrs.geometry import array_from_image, index_to_world
from prostate_jrs.labels import SynonymTable

FIXTURES = Path(__file__).resolve().parents[2] / "../shared/fixtures/real/rtstruct_mim"
PATIENT = PatientInfo(name="Contour^Test", patient_id="PJRS-RTR-1", birth_date=dt.date(1949, 5, 6))
STUDY = StudyInfo(study_instance_uid=make_uid("rt_reader", "study"), study_datetime=dt.datetime(2025, 3, 4, 9, 0))

PhantomMaker = Callable[..., tuple[sitk.Image, sitk.Image]]
# ROI: (name, [(geometric type, points (N, 3) in index coordinates of the CT)])
RoiSpec = tuple[str, Sequence[tuple[str, np.ndarray]]]


def _ct(folder: Path, phantom: PhantomMaker, position: str = "HFS") -> CTVolume:
    ct, _ = phantom(position)
    series = CTSeriesInfo(
        frame_of_reference_uid=make_uid("rt_reader", position, "for"),
        series_instance_uid=make_uid("rt_reader", position, "series"),
        patient_position=position,
    )
    return read_ct_series(write_ct_series(ct, folder, patient=PATIENT, study=STUDY, series=series))


def _rtstruct(path: Path, ct: CTVolume, rois: Sequence[RoiSpec], *, implicit_vr: bool = False) -> Path:
    """A minimal RTSTRUCT built with pydicom; contour points are given in CT index coordinates."""
    matrix = index_to_world(ct.image)
    first = ct.datasets[0]
    ds = Dataset()
    ds.SOPClassUID = RTStructureSetStorage
    ds.SOPInstanceUID = make_uid("rt_reader", str(path))
    ds.Modality = "RTSTRUCT"
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "StudyInstanceUID", "StudyDate", "StudyTime"):
        setattr(ds, keyword, first.get(keyword))
    ds.SeriesInstanceUID = make_uid("rt_reader", str(path), "series")
    ds.StructureSetLabel = "TEST"
    ds.StructureSetDate, ds.StructureSetTime = "20250304", "100000"
    frame = Dataset()
    frame.FrameOfReferenceUID = ct.frame_of_reference_uid
    study, series = Dataset(), Dataset()
    study.ReferencedSOPClassUID = "1.2.840.10008.3.1.2.3.1"
    study.ReferencedSOPInstanceUID = first.StudyInstanceUID
    series.SeriesInstanceUID = ct.series_instance_uid
    images = []
    for image_ds in ct.datasets:
        image = Dataset()
        image.ReferencedSOPClassUID, image.ReferencedSOPInstanceUID = image_ds.SOPClassUID, image_ds.SOPInstanceUID
        images.append(image)
    series.ContourImageSequence = DicomSequence(images)
    study.RTReferencedSeriesSequence = DicomSequence([series])
    frame.RTReferencedStudySequence = DicomSequence([study])
    ds.ReferencedFrameOfReferenceSequence = DicomSequence([frame])
    roi_items, contour_items, observations = [], [], []
    for number, (name, contours) in enumerate(rois, start=1):
        roi = Dataset()
        roi.ROINumber, roi.ROIName = number, name
        roi.ReferencedFrameOfReferenceUID = ct.frame_of_reference_uid
        roi.ROIGenerationAlgorithm = "MANUAL"
        roi_items.append(roi)
        item = Dataset()
        item.ReferencedROINumber = number
        item.ROIDisplayColor = [255, 0, number]
        if contours:
            sequence = []
            for kind, points in contours:
                world = (np.c_[points, np.ones(len(points))] @ matrix.T)[:, :3]
                contour = Dataset()
                contour.ContourGeometricType = kind
                contour.NumberOfContourPoints = len(points)
                contour.ContourData = [f"{v:.6g}" for v in world.ravel()]
                sequence.append(contour)
            item.ContourSequence = DicomSequence(sequence)
        contour_items.append(item)
        observation = Dataset()
        observation.ObservationNumber, observation.ReferencedROINumber = number, number
        observation.RTROIInterpretedType, observation.ROIInterpreter = "ORGAN", ""
        observations.append(observation)
    ds.StructureSetROISequence = DicomSequence(roi_items)
    ds.ROIContourSequence = DicomSequence(contour_items)
    ds.RTROIObservationsSequence = DicomSequence(observations)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian if implicit_vr else ExplicitVRLittleEndian
    pydicom.dcmwrite(path, ds, enforce_file_format=True)
    return path


def _rect(i0: float, i1: float, j0: float, j1: float, k: float, clockwise: bool = False) -> np.ndarray:
    corners = [(i0, j0), (i1, j0), (i1, j1), (i0, j1)]
    return np.asarray([(i, j, k) for i, j in (corners[::-1] if clockwise else corners)], dtype=np.float64)


@pytest.mark.parametrize("position", ["HFS", "FFS", "HFP"])
def test_even_odd_holes_islands_and_orientation(tmp_path: Path, phantom: PhantomMaker, position: str) -> None:
    ct = _ct(tmp_path / "ct", phantom, position)
    # half-integer vertices: no voxel centre lies on an edge, so the expected mask is exact
    outer = _rect(2.5, 20.5, 3.5, 15.5, 5)
    hole = _rect(6.5, 10.5, 7.5, 11.5, 5, clockwise=False)  # same winding as the outer: only even-odd makes a hole
    island = _rect(30.5, 33.5, 30.5, 35.5, 5)
    other_slice = _rect(0.5, 3.5, 0.5, 2.5, 9.4, clockwise=True)  # 0.4 slices off: still slice 9, with a note
    rois: list[RoiSpec] = [
        ("CTV_Prostate", [("CLOSED_PLANAR", outer), ("CLOSED_PLANAR", hole), ("CLOSED_PLANAR", island)]),
        ("Blaas", [("CLOSED_PLANAR", other_slice), ("POINT", np.asarray([[4.0, 4.0, 9.0]]))]),
        ("Rectum", []),
        ("Couch", [("CLOSED_PLANAR", _rect(0.5, 47.5, 38.5, 39.5, 0))]),
    ]
    path = _rtstruct(tmp_path / "rs.dcm", ct, rois, implicit_vr=True)
    assert pydicom.dcmread(path).file_meta.TransferSyntaxUID == ImplicitVRLittleEndian

    contents = read_rtstruct(path, ct)
    expected = np.zeros(ct.image.GetSize(), dtype=bool)
    expected[3:21, 4:16, 5] = True
    expected[7:11, 8:12, 5] = False
    expected[31:34, 31:36, 5] = True
    np.testing.assert_array_equal(contents.structure_mask("prostate"), expected)
    bladder = np.zeros_like(expected)
    bladder[1:4, 1:3, 9] = True
    np.testing.assert_array_equal(contents.structure_mask("bladder"), bladder)
    assert contents.roi_to_structure == {
        "CTV_Prostate": "prostate",
        "Blaas": "bladder",
        "Rectum": "rectum",
        "Couch": None,
    }
    assert contents.unmapped_rois == ["Couch"]
    assert contents.empty_rois == ["Rectum"]
    assert contents.missing_structures == ["seminal_vesicles", "rectum"]
    assert [r.num_contours for r in contents.rois] == [3, 1, 0, 1]
    assert contents.rois[1].num_ignored == 1 and any("not CLOSED_PLANAR" in n for n in contents.notes)
    assert any("'Blaas': contours lie up to 1.20 mm off" in n for n in contents.notes)
    assert contents.rois[3].mask is None  # unmapped ROIs are not rasterised unless asked for
    assert contents.rois[0].interpreted_type == "ORGAN" and contents.rois[0].color == (255, 0, 1)
    label_map = contents.label_map
    assert label_map.dtype == np.uint8 and set(np.unique(label_map)) == {0, 1, 4}
    assert contents.label_image().GetSize() == ct.image.GetSize()
    np.testing.assert_allclose(contents.label_image().GetDirection(), ct.image.GetDirection())

    couch = read_rtstruct(path, ct, roi_names=["Couch"]).rois[3].mask
    assert couch is not None and couch.sum() == 47 and couch[:, 39, 0].sum() == 47


def test_fill_even_odd_matches_crossing_test_of_each_polygon() -> None:
    rng = np.random.default_rng(3)
    polygons = [rng.uniform(-3, 35, size=(n, 2)) for n in (5, 9, 13)]  # self-intersecting, overlapping, clipped
    mask = fill_even_odd(polygons, (32, 24))
    centres = np.stack(np.meshgrid(np.arange(32), np.arange(24), indexing="ij"), axis=-1).reshape(-1, 2)
    expected = np.zeros(32 * 24, dtype=bool)
    for polygon in polygons:
        # for one polygon, matplotlib's crossing test is the even-odd rule; XOR combines the polygons
        expected ^= PolygonPath(polygon, closed=False).contains_points(centres)
    np.testing.assert_array_equal(mask, expected.reshape(32, 24))
    assert not fill_even_odd([], (4, 4)).any()
    # centres on the edges count as inside on every side: [2, 5] x [3, 6] fills 4 x 4 pixels, also when clipped
    square = np.asarray([(2.0, 3.0), (5.0, 3.0), (5.0, 6.0), (2.0, 6.0)])
    expected_square = np.zeros((8, 8), dtype=bool)
    expected_square[2:6, 3:7] = True
    np.testing.assert_array_equal(fill_even_odd([square], (8, 8)), expected_square)
    np.testing.assert_array_equal(fill_even_odd([square], (5, 6)), expected_square[:5, :6])
    diamond = np.asarray([(4.0, 0.0), (7.0, 3.0), (4.0, 6.0), (1.0, 3.0)])  # vertices and edges through centres
    expected_diamond = np.add.outer(np.abs(np.arange(8) - 4), np.abs(np.arange(8) - 3)) <= 3
    np.testing.assert_array_equal(fill_even_odd([diamond], (8, 8)), expected_diamond)


def test_overlap_precedence_and_duplicate_structures(tmp_path: Path, phantom: PhantomMaker) -> None:
    ct = _ct(tmp_path / "ct", phantom)
    prostate = ("Prostate", [("CLOSED_PLANAR", _rect(4.5, 12.5, 4.5, 12.5, 3))])
    bladder = ("Bladder", [("CLOSED_PLANAR", _rect(10.5, 20.5, 4.5, 12.5, 3))])
    contents = read_rtstruct(_rtstruct(tmp_path / "a.dcm", ct, [bladder, prostate]), ct)
    assert contents.label_map[11, 8, 3] == 1  # prostate wins over bladder
    assert contents.label_map[15, 8, 3] == 4
    assert any("overlaps" in note for note in contents.notes)

    empty_twin = ("CTV_Prostate", [])
    contents = read_rtstruct(_rtstruct(tmp_path / "b.dcm", ct, [prostate, empty_twin]), ct)
    assert contents.structure_rois["prostate"].name == "Prostate"
    second = ("prostaat", [("CLOSED_PLANAR", _rect(4.5, 8.5, 4.5, 8.5, 4))])
    with pytest.raises(RTStructError, match="'Prostate', 'prostaat' all map to prostate"):
        read_rtstruct(_rtstruct(tmp_path / "c.dcm", ct, [prostate, second]), ct)


def test_contours_that_do_not_fit_the_ct_are_refused(tmp_path: Path, phantom: PhantomMaker) -> None:
    ct = _ct(tmp_path / "ct", phantom)
    below = ("Bladder", [("CLOSED_PLANAR", _rect(4.5, 12.5, 4.5, 12.5, -0.7))])
    with pytest.raises(RTStructError, match=r"ROI 'Bladder' contour 1 lies at .* off the CT's 16 slice"):
        read_rtstruct(_rtstruct(tmp_path / "a.dcm", ct, [below]), ct)
    tilted = np.asarray([(4.5, 4.5, 3.0), (12.5, 4.5, 3.0), (12.5, 12.5, 4.0), (4.5, 12.5, 4.0)])
    with pytest.raises(RTStructError, match="ROI 'Rectum' contour 1 is not parallel to the CT slices"):
        read_rtstruct(_rtstruct(tmp_path / "b.dcm", ct, [("Rectum", [("CLOSED_PLANAR", tilted)])]), ct)
    two_planes = [
        ("CLOSED_PLANAR", _rect(4.5, 12.5, 4.5, 12.5, 2.7)),
        ("CLOSED_PLANAR", _rect(5.5, 9.5, 4.5, 9.5, 3.2)),
    ]
    with pytest.raises(RTStructError, match=r"ROI 'Bladder' has contours in 2 different planes .* slice 3"):
        read_rtstruct(_rtstruct(tmp_path / "d.dcm", ct, [("Bladder", two_planes)]), ct)
    # an unmapped ROI off the slices is only noted: it is not used
    contents = read_rtstruct(_rtstruct(tmp_path / "c.dcm", ct, [("Marker", below[1])]), ct)
    assert any("off the CT" in note and "not used" in note for note in contents.notes)


def test_frame_of_reference_must_match(tmp_path: Path, phantom: PhantomMaker) -> None:
    ct = _ct(tmp_path / "ct", phantom)
    path = _rtstruct(tmp_path / "rs.dcm", ct, [("Bladder", [("CLOSED_PLANAR", _rect(4.5, 9.5, 4.5, 9.5, 2))])])
    with pytest.raises(RTStructError, match="never put on a CT of another frame of reference"):
        read_rtstruct(path, ct.image, frame_of_reference_uid="1.2.826.0.1.999")
    bare = sitk.Image(ct.image.GetSize(), sitk.sitkInt16)
    bare.CopyInformation(ct.image)
    with pytest.raises(RTStructError, match="no Frame of Reference UID"):
        read_rtstruct(path, bare)
    # the image from read_ct_series carries its frame of reference as meta-data
    assert read_rtstruct(path, ct.image).structure_mask("bladder").sum() == 25
    with pytest.raises(RTStructError, match="Modality is 'CT'"):
        read_rtstruct(ct.files[0], ct)


@pytest.mark.parametrize("position", ["HFS", "FFS", "HFP"])
def test_plastimatch_rtstruct_round_trip(tmp_path: Path, phantom: PhantomMaker, position: str) -> None:
    exe = shutil.which("plastimatch")
    if exe is None:
        # fail, never skip: CI installs it, and this is the only RTSTRUCT here written by another implementation
        pytest.fail("plastimatch not found: install it with `apt-get install -y plastimatch`")
    ct, labels = phantom(position)
    sitk.WriteImage(ct, str(tmp_path / "ct.mha"))
    (tmp_path / "masks").mkdir()
    label_array = array_from_image(labels)
    names = {1: "CTV_Prostate", 2: "SV", 3: "Rectum", 4: "Bladder"}  # ROI name = file stem
    for label, name in names.items():
        mask = sitk.Cast(labels == label, sitk.sitkUInt8)
        sitk.WriteImage(mask, str(tmp_path / "masks" / f"{name}.mha"))
    result = subprocess.run(
        [exe, "convert", "--input", str(tmp_path / "ct.mha"), "--input-prefix", str(tmp_path / "masks"),
         "--output-dicom", str(tmp_path / "dicom")],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    ct_files = [
        p for p in (tmp_path / "dicom").iterdir() if pydicom.dcmread(p, stop_before_pixels=True).Modality == "CT"
    ]
    rtss = next((tmp_path / "dicom").glob("rtss*.dcm"))
    volume = read_ct_series(ct_files)
    assert volume.image.GetSize() == ct.GetSize()
    np.testing.assert_allclose(volume.image.GetOrigin(), ct.GetOrigin(), atol=1e-3)
    np.testing.assert_allclose(volume.image.GetDirection(), ct.GetDirection(), atol=1e-6)

    contents = read_rtstruct(rtss, volume)
    assert contents.missing_structures == [] and contents.unmapped_rois == []
    for label, name in names.items():
        expected = label_array == label
        mask = contents.structure_mask(contents.roi_to_structure[name])
        dice = 2 * (mask & expected).sum() / (mask.sum() + expected.sum())
        assert dice >= 0.95, (name, dice)  # in practice 1.0: plastimatch traces voxel boundaries
    # the rectum is a hollow tube: its lumen must come out empty (plastimatch keyholes the hole)
    lumen = (label_array == 0) & (np.roll(label_array == 3, 3, axis=0)) & (np.roll(label_array == 3, -3, axis=0))
    assert contents.label_map[lumen].mean() < 0.05


def test_real_mim_rtstruct(tmp_path: Path) -> None:
    path = FIXTURES / "dummy_rt.dcm"
    assert pydicom.dcmread(path).file_meta.TransferSyntaxUID == ImplicitVRLittleEndian
    incomplete = read_ct_series([FIXTURES / "ct_1.dcm", FIXTURES / "ct_2.dcm"])

    # nothing maps to the four structures: ROIs are listed and counted, none is rasterised
    contents = read_rtstruct(path, incomplete)
    assert [(r.number, r.name, r.num_contours, r.structure) for r in contents.rois] == [
        (n, f"ROI-{n}", 3, None) for n in (1, 2, 3, 4)
    ]
    assert contents.unmapped_rois == ["ROI-1", "ROI-2", "ROI-3", "ROI-4"]
    assert contents.missing_structures == ["prostate", "seminal_vesicles", "rectum", "bladder"]
    assert contents.empty_rois == [] and not contents.label_map.any()
    assert any("not in CT series" in note for note in contents.notes)

    # a clinic's synonym table maps them: the incomplete CT (2 of 5 slices) gives a clear error, not a crash
    clinic = SynonymTable().extend({"prostate": ["ROI-1"], "rectum": ["ROI-3"]})
    with pytest.raises(RTStructError, match=r"ROI 'ROI-1' contour 1 lies at 70\.00 mm .* off the CT's 2 slice\(s\)"):
        read_rtstruct(path, incomplete, clinic)

    # on a grid covering all 5 referenced slices every ROI has voxels on its 3 contoured slices
    grid = sitk.Image(512, 512, 5, sitk.sitkUInt8)
    grid.SetSpacing(incomplete.image.GetSpacing())
    grid.SetOrigin(incomplete.image.GetOrigin())
    full = read_rtstruct(path, grid, clinic, frame_of_reference_uid=incomplete.frame_of_reference_uid, all_rois=True)
    for roi in full.rois:
        assert roi.mask is not None
        assert [int(k) for k in np.flatnonzero(roi.mask.any(axis=(0, 1)))] == [0, 1, 2], roi.name
    assert set(np.unique(full.label_map)) == {0, 1, 3}


def test_damaged_rtstruct_is_refused_by_name(tmp_path: Path, phantom: PhantomMaker) -> None:
    ct = _ct(tmp_path / "ct", phantom)
    rois: list[RoiSpec] = [
        (name, [("CLOSED_PLANAR", _rect(4.5, 12.5, 4.5, 12.5, k)) for k in range(2, 14)])
        for name in ("Prostate", "Rectum", "Bladder")
    ]
    path = _rtstruct(tmp_path / "rs.dcm", ct, rois)
    data = path.read_bytes()
    # cut in the ROI Contour Sequence: pydicom alone would return fewer contours, or fail deep inside the reader
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(RTStructError, match=r"cut\.dcm: truncated or corrupt DICOM file .*a complete RTSTRUCT"):
        read_rtstruct(cut, ct)

    ds = pydicom.dcmread(path)
    del ds.ROIContourSequence[1].ReferencedROINumber
    ds.save_as(tmp_path / "no_number.dcm")
    with pytest.raises(
        RTStructError, match=r"ROIContourSequence \(3006,0039\) item 2 has no ReferencedROINumber \(3006,0084\)"
    ):
        read_rtstruct(tmp_path / "no_number.dcm", ct)

    ds = pydicom.dcmread(path)
    del ds.ROIContourSequence[2].ContourSequence[0].ContourData
    ds.save_as(tmp_path / "no_points.dcm")
    with pytest.raises(RTStructError, match=r"ROI 'Bladder' contour 1: ContourData \(3006,0050\) has 0 values"):
        read_rtstruct(tmp_path / "no_points.dcm", ct)
