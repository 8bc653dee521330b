"""CT series reader: slice order from positions, LPS geometry for HFS/FFS/HFP/FFP, clear errors on broken series."""

from __future__ import annotations

import datetime as dt
import random
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from prostate_jrs.dicom.common import PatientInfo, StudyInfo, make_uid
from prostate_jrs.dicom.ct_reader import CTSeriesError, read_ct_series, slice_normal
from prostate_jrs.dicom.ct_series import CTSeriesInfo, write_ct_series
from prostate_jrs.geometry import array_from_image, index_to_world

FIXTURES = Path(__file__).resolve().parents[2] / "../shared/fixtures/real/rtstruct_mim"
PATIENT = PatientInfo(name="Reader^Test", patient_id="PJRS-CTR-1", birth_date=dt.date(1950, 1, 2))
STUDY = StudyInfo(study_instance_uid=make_uid("ct_reader", "study"), study_datetime=dt.datetime(2025, 2, 3, 10, 0))

PhantomMaker = Callable[..., tuple[sitk.Image, sitk.Image]]


def _write(folder: Path, ct: sitk.Image, position: str = "HFS", tag: str = "a") -> list[Path]:
    series = CTSeriesInfo(
        frame_of_reference_uid=make_uid("ct_reader", tag, "for"),
        series_instance_uid=make_uid("ct_reader", tag, position, "series"),
        patient_position=position,
    )
    return write_ct_series(ct, folder, patient=PATIENT, study=STUDY, series=series)


def _edit(path: Path, **values: object) -> None:
    ds = pydicom.dcmread(path)
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    ds.save_as(path)


@pytest.mark.parametrize("position", ["HFS", "FFS", "HFP", "FFP"])
def test_geometry_and_pixels_for_each_patient_position(tmp_path: Path, phantom: PhantomMaker, position: str) -> None:
    ct, _ = phantom(position)
    files = _write(tmp_path, ct, position)
    # Instance Numbers that disagree with the geometry: the reader must sort by position, not by number
    shuffled = files[:]
    random.Random(0).shuffle(shuffled)
    for number, path in enumerate(shuffled, start=1):
        _edit(path, InstanceNumber=number)

    volume = read_ct_series(shuffled)
    image = volume.image
    assert image.GetSize() == ct.GetSize()
    np.testing.assert_allclose(image.GetSpacing(), ct.GetSpacing(), atol=1e-6)
    np.testing.assert_allclose(image.GetOrigin(), ct.GetOrigin(), atol=1e-6)
    np.testing.assert_allclose(image.GetDirection(), ct.GetDirection(), atol=1e-6)
    assert image.GetPixelID() == sitk.sitkInt16
    np.testing.assert_array_equal(array_from_image(image), array_from_image(ct))

    # Independent of the reader: voxel (c, r, k) is pixel (r, c) of the file whose position is the world point of
    # (0, 0, k), at IPP + c * column spacing * row cosine + r * row spacing * column cosine
    matrix = index_to_world(image)
    array = array_from_image(image)
    for k, (ds, path) in enumerate(zip(volume.datasets, volume.files, strict=True)):
        np.testing.assert_allclose((matrix @ [0, 0, k, 1])[:3], [float(v) for v in ds.ImagePositionPatient], atol=1e-4)
        pixels = pydicom.dcmread(path).pixel_array.astype(np.int32) + int(ds.RescaleIntercept)
        iop = np.asarray([float(v) for v in ds.ImageOrientationPatient])
        for r, c in [(0, 0), (3, 17), (39, 47)]:
            world = np.asarray([float(v) for v in ds.ImagePositionPatient])
            world = world + c * float(ds.PixelSpacing[1]) * iop[:3] + r * float(ds.PixelSpacing[0]) * iop[3:]
            np.testing.assert_allclose((matrix @ [c, r, k, 1])[:3], world, atol=1e-4)
            np.testing.assert_allclose(ct.TransformIndexToPhysicalPoint((c, r, k)), world, atol=1e-4)
            assert array[c, r, k] == pixels[r, c]
    assert "PixelData" not in volume.datasets[0]
    assert (
        image.GetMetaData("0020|0052") == volume.frame_of_reference_uid == str(volume.datasets[0].FrameOfReferenceUID)
    )
    assert volume.patient_id == PATIENT.patient_id


def test_matches_simpleitk_gdcm_reader(tmp_path: Path, phantom: PhantomMaker) -> None:
    ct, _ = phantom("FFS")
    files = _write(tmp_path, ct, "FFS")
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(tmp_path)))
    gdcm = reader.Execute()
    ours = read_ct_series(files).image
    np.testing.assert_allclose(ours.GetOrigin(), gdcm.GetOrigin(), atol=1e-5)
    np.testing.assert_allclose(ours.GetDirection(), gdcm.GetDirection(), atol=1e-6)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(ours), sitk.GetArrayFromImage(gdcm))


def test_slice_normal() -> None:
    np.testing.assert_allclose(slice_normal([1, 0, 0, 0, 1, 0]), [0, 0, 1])
    np.testing.assert_allclose(slice_normal([-1, 0, 0, 0, 1, 0]), [0, 0, -1])  # FFS: k runs towards the feet
    with pytest.raises(ValueError, match="orthogonal"):
        slice_normal([1, 0, 0, 1, 0, 0])


def test_non_integer_rescale_gives_float(tmp_path: Path, phantom: PhantomMaker) -> None:
    ct, _ = phantom()
    files = _write(tmp_path, ct)
    for path in files:
        _edit(path, RescaleSlope="0.5")
    image = read_ct_series(files).image
    assert image.GetPixelID() == sitk.sitkFloat32
    stored = pydicom.dcmread(files[0]).pixel_array
    np.testing.assert_allclose(array_from_image(image)[:, :, 0], stored.T * 0.5 - 1024)


def test_missing_slice_names_the_neighbours(tmp_path: Path, phantom: PhantomMaker) -> None:
    ct, _ = phantom()
    files = _write(tmp_path, ct)
    with pytest.raises(CTSeriesError, match=r"slice gap 6\.000 mm, expected 3\.000 mm") as info:
        read_ct_series(files[:7] + files[8:])
    assert files[6].name in str(info.value) and files[8].name in str(info.value)


def test_inconsistent_orientation_names_the_file(tmp_path: Path, phantom: PhantomMaker) -> None:
    ct, _ = phantom()
    files = _write(tmp_path, ct)
    _edit(files[5], ImageOrientationPatient=[1, 0, 0, 0, 0.9950042, 0.0998334])
    with pytest.raises(CTSeriesError, match="ImageOrientationPatient") as info:
        read_ct_series(files)
    assert files[5].name in str(info.value)


@pytest.mark.parametrize(
    ("keyword", "value", "message"),
    [
        ("PixelSpacing", ["1.25", "1.4"], "PixelSpacing"),
        ("FrameOfReferenceUID", "1.2.3.4", "FrameOfReferenceUID"),
        ("SeriesInstanceUID", "1.2.3.5", "SeriesInstanceUID"),
        ("Modality", "MR", "Modality is 'MR'"),
    ],
)
def test_inconsistent_headers_are_refused(
    tmp_path: Path, phantom: PhantomMaker, keyword: str, value: object, message: str
) -> None:
    ct, _ = phantom()
    files = _write(tmp_path, ct)
    _edit(files[3], **{keyword: value})
    with pytest.raises(CTSeriesError, match=message) as info:
        read_ct_series(files)
    assert files[3].name in str(info.value)


def test_duplicate_and_sheared_slices_are_refused(tmp_path: Path, phantom: PhantomMaker) -> None:
    ct, _ = phantom()
    files = _write(tmp_path, ct)
    position = [float(v) for v in pydicom.dcmread(files[4]).ImagePositionPatient]
    _edit(files[5], ImagePositionPatient=position)
    with pytest.raises(CTSeriesError, match="same position"):
        read_ct_series(files)
    _edit(files[5], ImagePositionPatient=[position[0] + 2.0, position[1], position[2] + 3.0])
    with pytest.raises(CTSeriesError, match="shifted in-plane"):
        read_ct_series(files)


def test_real_ge_slices(tmp_path: Path) -> None:
    # two consecutive slices of a real GE Discovery MI series (Explicit VR, 512x512), given in reverse order
    volume = read_ct_series([FIXTURES / "ct_2.dcm", FIXTURES / "ct_1.dcm"])
    assert volume.image.GetSize() == (512, 512, 2)
    np.testing.assert_allclose(volume.image.GetSpacing(), (0.488281, 0.488281, 5.0))
    np.testing.assert_allclose(volume.image.GetOrigin(), (-125.0, -125.0, 60.0))
    assert [p.name for p in volume.files] == ["ct_1.dcm", "ct_2.dcm"]
    assert volume.patient_id == "PHANTOM_EXAMPLE"
    with pytest.raises(CTSeriesError, match="no files"):
        read_ct_series([])
    not_dicom = tmp_path / "notes.txt"
    not_dicom.write_text("not DICOM")
    with pytest.raises(CTSeriesError, match=r"notes\.txt: cannot read as DICOM"):
        read_ct_series([FIXTURES / "ct_1.dcm", not_dicom])


def test_truncated_or_corrupt_slice_is_refused_by_name(tmp_path: Path, phantom: PhantomMaker) -> None:
    ct, _ = phantom()
    files = _write(tmp_path, ct)
    data = files[5].read_bytes()
    files[5].write_bytes(data[: len(data) // 2])  # cut in the pixel data: pydicom alone returns half the pixels
    with pytest.raises(CTSeriesError, match=r"truncated or corrupt DICOM file \(element \(7FE0,0010\)") as info:
        read_ct_series(files)
    assert files[5].name in str(info.value)

    files[5].write_bytes(data)
    ds = pydicom.dcmread(files[6])
    del ds.PixelData  # cut exactly before the pixel data: every element read is complete
    ds.save_as(files[6])
    with pytest.raises(CTSeriesError, match=r"no PixelData \(7FE0,0010\)") as info:
        read_ct_series(files)
    assert files[6].name in str(info.value)

    files[6].write_bytes(b"\0" * 128 + b"DICM" + random.Random(1).randbytes(3000))
    with pytest.raises(CTSeriesError, match="truncated or corrupt") as info:
        read_ct_series(files)
    assert files[6].name in str(info.value)


def test_uneven_spacing_is_refused(tmp_path: Path, phantom: PhantomMaker) -> None:
    ct, _ = phantom()
    files = _write(tmp_path, ct)
    position = [float(v) for v in pydicom.dcmread(files[8]).ImagePositionPatient]
    _edit(files[8], ImagePositionPatient=[position[0], position[1], position[2] + 1.0])  # gaps 4 mm and 2 mm
    with pytest.raises(
        CTSeriesError, match=r"slice gap 4\.000 mm, expected 3\.000 mm .*\(2 irregular gap\(s\)\); .*not uniform"
    ) as info:
        read_ct_series(files)
    assert files[7].name in str(info.value) and files[8].name in str(info.value)


def test_gantry_tilt_is_refused(tmp_path: Path, phantom: PhantomMaker) -> None:
    # a tilted gantry: every slice's column direction tilts by the gantry angle while the slices are still stacked
    # along the table (z), so the stack is sheared; the series is consistent in itself, only the geometry is not
    ct, _ = phantom()
    files = _write(tmp_path, ct)
    angle = np.radians(12.0)
    for path in files:
        _edit(
            path,
            ImageOrientationPatient=[1, 0, 0, 0, f"{np.cos(angle):.8f}", f"{np.sin(angle):.8f}"],
            GantryDetectorTilt="12",
        )
    with pytest.raises(
        CTSeriesError, match=r"shifted in-plane by \d+\.\d+ mm .*\(gantry tilt .*GantryDetectorTilt \(0018,1120\) 12\)"
    ) as info:
        read_ct_series(files)
    assert any(path.name in str(info.value) for path in files)


@pytest.mark.parametrize(
    ("dtype", "slope", "intercept"),
    [(np.uint16, 1, -1024), (np.int16, 1, 0), (np.uint16, 2, -2048), (np.int16, -1, 10), (np.uint8, 3, -100)],
)
def test_integer_hu_is_the_float32_computation(dtype: type, slope: int, intercept: int) -> None:
    from prostate_jrs.dicom.ct_reader import _integer_hu

    rng = np.random.default_rng(0)
    info = np.iinfo(dtype)
    low, high = max(info.min, -3000), min(info.max, 4000)
    slices = [rng.integers(low, high, (7, 5), dtype=dtype) for _ in range(3)]
    expected = np.stack(slices).astype(np.float32) * np.float32(slope) + np.float32(intercept)
    volume = _integer_hu(slices, [float(slope)] * 3, [float(intercept)] * 3)
    assert volume is not None and volume.dtype == np.int16
    np.testing.assert_array_equal(volume, expected.astype(np.int16))


def test_integer_hu_gives_way_beyond_int16() -> None:
    from prostate_jrs.dicom.ct_reader import _integer_hu

    slices = [np.array([[0, 40000]], dtype=np.uint16)]
    assert _integer_hu(slices, [1.0], [-1024.0]) is None
