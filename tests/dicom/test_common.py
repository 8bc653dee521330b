"""``read_dicom``: truncated or corrupt files are refused with their path, never read in part."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import ExplicitVRLittleEndian, RTStructureSetStorage

from prostate_jrs.dicom.common import DamagedFileError, read_dicom
from prostate_jrs.dicom.files import read_whole

FIXTURES = Path(__file__).resolve().parents[2] / "../shared/fixtures/real/rtstruct_mim"


def _cut(source: Path, target: Path, keep: float) -> Path:
    data = source.read_bytes()
    target.write_bytes(data[: int(len(data) * keep)])
    return target


def test_complete_files_are_read() -> None:
    ds = read_dicom(FIXTURES / "ct_1.dcm")
    assert ds.Modality == "CT" and len(ds.PixelData) == 512 * 512 * 2
    header = read_dicom(FIXTURES / "dummy_rt.dcm", stop_before_pixels=True, specific_tags=["Modality"])
    assert header.Modality == "RTSTRUCT"


def test_truncated_pixel_data_is_refused(tmp_path: Path) -> None:
    # pydicom itself reads this without a word and returns half the pixel data
    cut = _cut(FIXTURES / "ct_1.dcm", tmp_path / "half.dcm", 0.5)
    assert len(pydicom.dcmread(cut).PixelData) < 512 * 512 * 2
    with pytest.raises(DamagedFileError, match=r"half\.dcm: truncated .*\(7FE0,0010\) declares 524288 bytes") as info:
        read_dicom(cut)
    assert info.value.path == cut and info.value.dataset is not None
    assert info.value.dataset.SeriesInstanceUID  # what was read before the cut identifies the series
    # the header alone ends before the cut: a header scan cannot see it (the CT reader reads the pixels too)
    assert read_dicom(cut, stop_before_pixels=True).Modality == "CT"


def test_cut_inside_the_header_is_refused(tmp_path: Path) -> None:
    cut = _cut(FIXTURES / "ct_1.dcm", tmp_path / "head.dcm", 600 / 527812)
    with pytest.raises(DamagedFileError, match=r"head\.dcm: .*declares 6 bytes but the file ends after 2"):
        read_dicom(cut)
    with pytest.raises(DamagedFileError, match="Transfer Syntax UID"):
        read_dicom(_cut(FIXTURES / "ct_1.dcm", tmp_path / "meta.dcm", 140 / 527812))


def test_garbage_after_the_dicm_prefix_is_refused(tmp_path: Path) -> None:
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"\0" * 128 + b"DICM" + random.Random(0).randbytes(4000))
    with pytest.raises(DamagedFileError, match=r"junk\.dcm: truncated or corrupt"):
        read_dicom(junk)
    text = tmp_path / "notes.txt"
    text.write_text("not DICOM at all")
    with pytest.raises(pydicom.errors.InvalidDicomError):  # not damaged DICOM: callers skip it
        read_dicom(text)


def test_cut_inside_an_undefined_length_sequence_is_refused(tmp_path: Path) -> None:
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = RTStructureSetStorage, "1.2.826.0.1.3680043.8.498.1", "RTSTRUCT"
    items = []
    for number in range(1, 41):
        item = Dataset()
        item.ROINumber, item.ROIName = number, f"ROI {number}"
        items.append(item)
    ds.StructureSetROISequence = DicomSequence(items)
    ds["StructureSetROISequence"].is_undefined_length = True
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    whole = tmp_path / "rs.dcm"
    pydicom.dcmwrite(whole, ds, enforce_file_format=True)
    assert len(read_dicom(whole).StructureSetROISequence) == 40
    with pytest.raises(DamagedFileError, match=r"cut\.dcm: truncated or corrupt"):
        read_dicom(_cut(whole, tmp_path / "cut.dcm", 0.5))


class _ReaderError(Exception):
    pass


def test_read_whole_raises_the_readers_own_error(tmp_path: Path) -> None:
    assert read_whole(FIXTURES / "ct_1.dcm", _ReaderError, "a slice").Modality == "CT"
    text = tmp_path / "notes.txt"
    text.write_text("not DICOM at all")
    with pytest.raises(_ReaderError, match=r"notes\.txt: cannot read as DICOM"):
        read_whole(text, _ReaderError, "a slice")
    cut = _cut(FIXTURES / "ct_1.dcm", tmp_path / "half.dcm", 0.5)
    with pytest.raises(_ReaderError, match=r"half\.dcm: truncated or corrupt DICOM file \(.*\); expected a slice$"):
        read_whole(cut, _ReaderError, "a slice")


@pytest.mark.parametrize(
    ("value", "vr", "fast"),
    [
        (b"1.5\\-2\\+3.25e-2\\.5 ", "DS", True),
        (b"-123.456789012345", "DS", False),  # 17 characters: pydicom's converter decides (and warns)
        (b"abc", "DS", False),
        (b"NaN", "DS", False),
        (b"1\\\\2", "DS", False),  # an empty value
        (b"", "DS", False),
        (b"1.5", None, False),  # implicit VR: the dictionary's VR, pydicom's business
        (b"1.5", "LO", False),
    ],
)
@pytest.mark.parametrize("tag", [0x30060050, 0x30060039])  # ContourData (DS); ROIContourSequence (SQ) written as DS
def test_valid_decimal_strings_left_raw_only_when_pydicom_takes_them(
    value: bytes, vr: str | None, fast: bool, tag: int
) -> None:
    from pydicom.dataelem import RawDataElement

    from prostate_jrs.dicom.files import _valid_decimal_strings

    element = RawDataElement(pydicom.tag.Tag(tag), vr, len(value), value, 0, False, True)
    fast = fast and tag == 0x30060050  # a sequence written as DS is parsed: read_dicom names it
    assert _valid_decimal_strings(element) is fast
    if fast:  # what pydicom would have made of it: the same numbers, without a warning
        numbers = [float(v) for v in value.decode().rstrip().split("\\")]
        assert np.allclose(pydicom.values.convert_DS_string(value, True), numbers, rtol=0, atol=0)


def test_read_dicom_leaves_only_valid_contour_data_raw(tmp_path: Path) -> None:
    ds = Dataset()
    ds.SOPClassUID = RTStructureSetStorage
    ds.SOPInstanceUID = "1.2.3.4"
    contour = Dataset()
    contour.ContourData = [1.5, -2.0, 3.0]
    item = Dataset()
    item.ContourSequence = DicomSequence([contour])
    ds.ROIContourSequence = DicomSequence([item])
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    good = tmp_path / "good.dcm"
    ds.save_as(good, enforce_file_format=True)
    read = read_dicom(good)
    assert isinstance(read.ROIContourSequence[0].ContourSequence[0].get_item(0x30060050).value, bytes)
    assert [float(v) for v in read.ROIContourSequence[0].ContourSequence[0].ContourData] == [1.5, -2.0, 3.0]
    bad = tmp_path / "bad.dcm"
    assert good.read_bytes().count(b"-2.0") == 1
    bad.write_bytes(good.read_bytes().replace(b"-2.0", b"a2.0"))  # garbled text, as a broken exporter writes it
    garbled = read_dicom(bad).ROIContourSequence[0].ContourSequence[0]
    # pydicom's converter had its say (it keeps text it cannot convert): the RTSTRUCT reader refuses it later
    assert not isinstance(garbled.get_item(0x30060050).value, bytes)


def test_read_dicom_names_a_sequence_written_as_decimal_strings(tmp_path: Path) -> None:
    ds = Dataset()
    ds.SOPClassUID = RTStructureSetStorage
    ds.SOPInstanceUID = "1.2.3.4"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.add_new(0x30060039, "DS", "1\\2")  # ROIContourSequence with a DS value, as a broken writer leaves it
    path = tmp_path / "rs.dcm"
    ds.save_as(path, enforce_file_format=True)
    with pytest.raises(DamagedFileError, match=r"\(3006,0039\) ROIContourSequence has VR DS; expected a sequence"):
        read_dicom(path)


def test_elements_a_clean_file_converted_are_not_converted_again(tmp_path: Path) -> None:
    from pydicom.dataelem import RawDataElement

    from prostate_jrs.dicom import files

    files._CLEAN_RAW.clear()
    first = read_dicom(FIXTURES / "ct_1.dcm")
    assert len(files._CLEAN_RAW) > 20  # the slice's small elements, with their encoding
    again = read_dicom(FIXTURES / "ct_1.dcm")  # as the next slice of a series repeats them
    assert isinstance(again.get_item(0x00080060), RawDataElement)  # Modality: left for pydicom to convert on use
    assert [(e.tag, e.VR, e.value) for e in again] == [(e.tag, e.VR, e.value) for e in first]

    # a file whose reading warned leaves nothing remembered: its values warn again wherever they are read
    files._CLEAN_RAW.clear()
    ds = pydicom.dcmread(FIXTURES / "ct_1.dcm")
    ds[0x00200013] = RawDataElement(pydicom.tag.Tag(0x00200013), "IS", 4, b"1.5 ", 0, False, True)  # InstanceNumber
    odd = tmp_path / "odd.dcm"
    ds.save_as(odd, enforce_file_format=True)
    with pytest.warns(UserWarning, match="1.5"):
        read_dicom(odd)
    assert not files._CLEAN_RAW
