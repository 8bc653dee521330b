"""CT in the transfer syntaxes scanners and PACS send, against the uncompressed original; objects refused by name.

Each compressed copy is made from the phantom's uncompressed series with pydicom's encoders (pylibjpeg-openjpeg for
JPEG 2000, pyjpegls for JPEG-LS, pydicom's own for RLE, Deflate and Big Endian) and read back with the project's
reader, whose decoding goes through pydicom's decoder plugins (pinned dependencies). Lossless syntaxes must give the
same HU voxel for voxel, lossy ones stay within what their setting allows; the geometry never changes.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom import uid
from pydicom.pixels import get_decoder

from prostate_jrs.dicom.ct_reader import CTSeriesError, CTVolume, read_ct_series
from prostate_jrs.dicom.discovery import DicomSelectionError, select_session
from prostate_jrs.dicom.rtstruct_reader import RTStructError
from prostate_jrs.dicom.rtstruct_writer import write_rtstruct
from prostate_jrs.dicom_session import load_session


def _compress(syntax: str, **kwargs: object) -> Callable[[pydicom.Dataset, Path], None]:
    def write(ds: pydicom.Dataset, path: Path) -> None:
        ds.compress(syntax, generate_instance_uid=False, **kwargs)  # keep the UIDs: the same slices, re-encoded
        ds.save_as(path)

    return write


def _deflate(ds: pydicom.Dataset, path: Path) -> None:
    ds.file_meta.TransferSyntaxUID = uid.DeflatedExplicitVRLittleEndian
    ds.save_as(path, enforce_file_format=True)


def _big_endian(ds: pydicom.Dataset, path: Path) -> None:
    pixels = ds.pixel_array
    ds.PixelData = pixels.astype(pixels.dtype.newbyteorder(">")).tobytes()  # OW is written in the file's byte order
    ds.file_meta.TransferSyntaxUID = uid.ExplicitVRBigEndian
    pydicom.dcmwrite(path, ds, implicit_vr=False, little_endian=False, enforce_file_format=True)


#: syntax -> (writer, largest |HU difference| allowed against the original)
SYNTAXES: dict[str, tuple[Callable[[pydicom.Dataset, Path], None], float]] = {
    uid.JPEG2000Lossless: (_compress(uid.JPEG2000Lossless), 0.0),
    uid.JPEG2000: (_compress(uid.JPEG2000, j2k_psnr=[90]), 20.0),  # lossy: PSNR 90 dB of the 16-bit range
    uid.JPEGLSLossless: (_compress(uid.JPEGLSLossless), 0.0),
    uid.JPEGLSNearLossless: (_compress(uid.JPEGLSNearLossless, jls_error=3), 3.0),  # near-lossless: |error| <= 3
    uid.RLELossless: (_compress(uid.RLELossless), 0.0),
    uid.DeflatedExplicitVRLittleEndian: (_deflate, 0.0),
    uid.ExplicitVRBigEndian: (_big_endian, 0.0),
}


def _convert(files: list[Path], folder: Path, write: Callable[[pydicom.Dataset, Path], None]) -> list[Path]:
    folder.mkdir(parents=True)
    out = []
    for path in files:
        write(pydicom.dcmread(path), folder / path.name)
        out.append(folder / path.name)
    return out


@pytest.mark.parametrize("syntax", list(SYNTAXES), ids=[uid.UID(s).keyword for s in SYNTAXES])
def test_each_transfer_syntax_reads_like_the_uncompressed_original(daily_series, tmp_path: Path, syntax: str) -> None:
    assert get_decoder(syntax).is_available, f"no pydicom decoder plugin for {uid.UID(syntax).name}"
    write, tolerance = SYNTAXES[syntax]
    original = read_ct_series(daily_series.files)
    files = _convert(daily_series.files, tmp_path / "converted", write)
    assert pydicom.dcmread(files[0], stop_before_pixels=True).file_meta.TransferSyntaxUID == syntax

    converted = read_ct_series(files)

    expected = sitk.GetArrayFromImage(original.image).astype(np.float64)
    got = sitk.GetArrayFromImage(converted.image).astype(np.float64)
    assert got.shape == expected.shape
    difference = np.abs(got - expected)
    assert difference.max() <= tolerance, f"{uid.UID(syntax).name}: max |HU difference| {difference.max()}"
    for attribute in ("GetOrigin", "GetSpacing", "GetDirection"):
        np.testing.assert_allclose(getattr(converted.image, attribute)(), getattr(original.image, attribute)())
    assert converted.sop_instance_uids == original.sop_instance_uids


def _enhanced(files: list[Path], path: Path, sop_class: str | None = None) -> Path:
    """The series as one Legacy Converted Enhanced CT object (multi-frame, as some PACS send); optionally relabelled."""
    datasets = [pydicom.dcmread(f) for f in files]
    enhanced = hd.legacy.LegacyConvertedEnhancedCTImage(
        legacy_datasets=datasets,
        series_instance_uid=hd.UID(),
        series_number=99,
        sop_instance_uid=hd.UID(),
        instance_number=1,
    )
    if sop_class is not None:
        enhanced.SOPClassUID = sop_class
        enhanced.file_meta.MediaStorageSOPClassUID = sop_class
    enhanced.save_as(path)
    return path


@pytest.mark.parametrize("sop_class", [None, uid.EnhancedCTImageStorage], ids=["legacy_converted", "enhanced"])
def test_enhanced_ct_multiframe_is_refused_by_name(daily_series, tmp_path: Path, sop_class: str | None) -> None:
    path = _enhanced(daily_series.files, tmp_path / "enhanced.dcm", sop_class)
    name = uid.UID(sop_class or uid.LegacyConvertedEnhancedCTImageStorage).name
    with pytest.raises(CTSeriesError, match=rf"enhanced\.dcm: multi-frame {name} \(NumberOfFrames \(0028,0008\) 16\)"):
        read_ct_series([path])


def _session(folder: Path, planning: CTVolume, daily_files: list[Path], labels: sitk.Image) -> Path:
    for path in [*planning.files, *daily_files]:
        shutil.copy(path, folder / path.name)
    return write_rtstruct(labels, planning.datasets, folder / "RS.planning.dcm")


def test_enhanced_daily_ct_is_named_when_no_daily_ct_is_left(planning_series, daily_series, tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    planning = read_ct_series(planning_series.files)
    labels = sitk.Cast(planning_series.labels, sitk.sitkUInt8)
    labels.CopyInformation(planning.image)
    _session(folder, planning, [], labels)
    _enhanced(daily_series.files, folder / "daily_enhanced.dcm", uid.EnhancedCTImageStorage)
    with pytest.raises(DicomSelectionError) as caught:
        select_session(folder)
    assert "multi-frame Enhanced CT Image Storage (NumberOfFrames (0028,0008) > 1" in str(caught.value)
    assert "daily_enhanced.dcm" in str(caught.value)


@pytest.mark.parametrize("degrees", [8.0, 90.0], ids=["tilted", "sagittal"])
def test_rtstruct_on_a_tilted_or_non_axial_planning_ct_is_refused_by_name(
    series_writer, patient, planning_study, daily_series, tmp_path: Path, degrees: float
) -> None:
    """A planning CT scanned with gantry tilt (slices stacked along their tilted normal) or reconstructed sagittally."""
    written = series_writer(tmp_path / "tilted_ct", patient, planning_study, tag=f"tilted{degrees}")
    angle = np.radians(degrees)
    rotation = np.array([[1, 0, 0], [0, np.cos(angle), -np.sin(angle)], [0, np.sin(angle), np.cos(angle)]])
    for path in written.files:  # rotate the whole stack about the patient's x axis: still one regular grid
        ds = pydicom.dcmread(path)
        orientation = np.asarray(ds.ImageOrientationPatient, float)
        rotated = np.concatenate([rotation @ orientation[:3], rotation @ orientation[3:]])
        ds.ImageOrientationPatient = [f"{v:.8f}" for v in rotated]
        ds.ImagePositionPatient = [f"{v:.4f}" for v in rotation @ np.asarray(ds.ImagePositionPatient, float)]
        ds.save_as(path)
    planning = read_ct_series(written.files)  # the reader takes any regular orientation ...
    labels = sitk.Cast(written.labels, sitk.sitkUInt8)
    labels.CopyInformation(planning.image)
    folder = tmp_path / "in"
    folder.mkdir()
    rtstruct = _session(folder, planning, daily_series.files, labels)

    with pytest.raises(RTStructError) as caught:  # ... the session does not put planning contours on it
        load_session(folder)
    message = str(caught.value)
    assert message.startswith(f"{rtstruct}: references planning CT series {planning.series_instance_uid}")
    assert "ImageOrientationPatient (0020,0037)" in message and f"{degrees:.1f} deg off" in message
