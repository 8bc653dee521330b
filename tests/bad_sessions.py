"""Broken DICOM sessions for the refusal tests: one tiny synthetic session, and mutations that break a copy of it.

Each mutation edits a session folder in place with pydicom and returns the fragments the refusal must name (the file,
tag, UID or ROI and what was expected). ``tests/test_dicom_session_refusals.py`` checks every mutation through
``load_session`` (the library); ``tests/app/test_app_bad_input.py`` runs a few through the app as users run it.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from dicom_edits import edit_rois

from prostate_jrs.phantom import PhantomConfig, write_dataset
from prostate_jrs.phantom.dicom_export import export_dicom_sessions

MIM = Path(__file__).resolve().parents[1] / "../shared/fixtures/real/rtstruct_mim"
MIM_SERIES = "2.16.840.1.114362.1.11940992.23790159890.563423471.893.88"  # the CT series the MIM RTSTRUCTs reference


@dataclass(frozen=True)
class Study:
    """The generated session folder and its UIDs (``sessions.json``)."""

    folder: Path
    uids: dict[str, str]


def make_study(root: Path) -> Study:
    """One tiny synthetic patient, one fraction: planning CT, planning RTSTRUCT and daily CT in one folder."""
    write_dataset(root, n_patients=1, n_fractions=1, seed=0, config=PhantomConfig.tiny())
    export_dicom_sessions(root)
    record = json.loads((root / "dicom" / "sessions.json").read_text())["sessions"][0]
    return Study(root / record["folder"], record["uids"])


def _series(folder: Path, uid: str) -> list[Path]:
    """Files of one series, in slice order (position along z: the phantom's series are axial)."""
    headers = {p: pydicom.dcmread(p, stop_before_pixels=True) for p in folder.glob("*.dcm")}
    files = [p for p, ds in headers.items() if ds.get("SeriesInstanceUID") == uid]
    return sorted(files, key=lambda p: float(headers[p].ImagePositionPatient[2]))


def rtstruct_of(folder: Path) -> Path:
    """The session folder's RTSTRUCT file."""
    return next(folder.glob("RS.*.dcm"))


def _edit(paths: list[Path], **values: object) -> None:
    for path in paths:
        ds = pydicom.dcmread(path)
        for keyword, value in values.items():
            setattr(ds, keyword, value)
        ds.save_as(path)


def _cut(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _referenced_series(rtstruct: Path, uid: str) -> None:
    ds = pydicom.dcmread(rtstruct)
    study = ds.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence[0]
    study.RTReferencedSeriesSequence[0].SeriesInstanceUID = uid
    ds.save_as(rtstruct)


def no_rtstruct(folder: Path, uids: dict[str, str]) -> list[str]:
    rtstruct_of(folder).unlink()
    return ["no RTSTRUCT found", str(folder), "expected the planning structure set"]


def rtstruct_references_missing_series(folder: Path, uids: dict[str, str]) -> list[str]:
    rtstruct = rtstruct_of(folder)
    _referenced_series(rtstruct, "1.2.826.0.1.3680043.8.498.424242")
    return [rtstruct.name, "references series 1.2.826.0.1.3680043.8.498.424242", "expected the planning CT series"]


def rtstruct_references_daily_series(folder: Path, uids: dict[str, str]) -> list[str]:
    rtstruct = rtstruct_of(folder)
    _referenced_series(rtstruct, uids["daily_ct_series"])
    return [rtstruct.name, "frame of reference", uids["daily_ct_series"], "the contours do not fit that CT"]


def rtstruct_of_another_patient(folder: Path, uids: dict[str, str]) -> list[str]:
    rtstruct = rtstruct_of(folder)
    _edit([rtstruct], PatientID="JRS999")
    return [rtstruct.name, "different patients", "PatientID (0010,0020) 'JRS001' vs 'JRS999'", "never combined"]


def no_roi_maps_to_a_structure(folder: Path, uids: dict[str, str]) -> list[str]:
    rtstruct = rtstruct_of(folder)
    edit_rois(rtstruct, rename={"Prostate": "Target", "SV": "Spacer", "Rectum": "Gut", "Bladder": "Vesica X"})
    return [rtstruct.name, "no ROI gives any of the structures", "'Target', 'Spacer', 'Gut', 'Vesica X', 'BODY'"]


def daily_not_ct(folder: Path, uids: dict[str, str]) -> list[str]:
    _edit(_series(folder, uids["daily_ct_series"]), Modality="MR")
    return ["no daily CT", f"series {uids['daily_ct_series']}: Modality 'MR', not CT"]


def planning_single_slice(folder: Path, uids: dict[str, str]) -> list[str]:
    files = _series(folder, uids["planning_ct_series"])
    for path in files[:20] + files[21:]:
        path.unlink()
    return [rtstruct_of(folder).name, uids["planning_ct_series"], "is a single slice (1 file)", "at least 2 slices"]


def daily_missing_slice(folder: Path, uids: dict[str, str]) -> list[str]:
    files = _series(folder, uids["daily_ct_series"])
    files[20].unlink()
    return [files[19].name, files[21].name, "slice gap", "slices missing or spacing not uniform"]


def daily_duplicate_position(folder: Path, uids: dict[str, str]) -> list[str]:
    files = _series(folder, uids["daily_ct_series"])
    _edit([files[21]], ImagePositionPatient=pydicom.dcmread(files[20]).ImagePositionPatient)
    return [files[20].name, files[21].name, "two slices at the same position", "expected one slice per position"]


def daily_uneven_spacing(folder: Path, uids: dict[str, str]) -> list[str]:
    files = _series(folder, uids["daily_ct_series"])
    x, y, z = (float(v) for v in pydicom.dcmread(files[20]).ImagePositionPatient)
    _edit([files[20]], ImagePositionPatient=[x, y, z + 1.5])
    return [files[19].name, files[20].name, "slice gap", "spacing not uniform"]


def daily_gantry_tilt(folder: Path, uids: dict[str, str]) -> list[str]:
    # every slice tilted by the gantry angle while the slices are stacked along the table: a sheared volume
    angle = np.radians(10.0)
    orientation = [1, 0, 0, 0, f"{np.cos(angle):.8f}", f"{np.sin(angle):.8f}"]
    _edit(_series(folder, uids["daily_ct_series"]), ImageOrientationPatient=orientation, GantryDetectorTilt="10")
    return ["shifted in-plane", "gantry tilt", "GantryDetectorTilt (0018,1120) 10", "expected slices stacked"]


def planning_slice_truncated(folder: Path, uids: dict[str, str]) -> list[str]:
    path = _series(folder, uids["planning_ct_series"])[20]
    _cut(path, 0.5)  # cut in the pixel data
    return [path.name, "truncated or corrupt DICOM file", "(7FE0,0010)", "expected a complete CT slice"]


def corrupt_file_with_dicm_prefix(folder: Path, uids: dict[str, str]) -> list[str]:
    (folder / "CT.broken.dcm").write_bytes(b"\0" * 128 + b"DICM" + bytes(range(256)) * 16)
    return ["CT.broken.dcm", "does not tell which series it belongs to", "remove it from"]


def rtstruct_truncated(folder: Path, uids: dict[str, str]) -> list[str]:
    rtstruct = rtstruct_of(folder)
    _cut(rtstruct, 0.5)
    return [rtstruct.name, "truncated or corrupt DICOM file", "expected a complete RTSTRUCT"]


def mim_rtstruct_with_incomplete_ct(folder: Path, uids: dict[str, str]) -> list[str]:
    # the real MIM export: RTSTRUCT drawn on 5 slices, 2 of them present
    shutil.rmtree(folder)
    folder.mkdir()
    for name in ("dummy_rt.dcm", "ct_1.dcm", "ct_2.dcm"):
        shutil.copy(MIM / name, folder)
    return ["dummy_rt.dcm", f"planning CT series {MIM_SERIES} is incomplete", "3 of the 5 images"]


def mim_rtstruct_without_series_reference(folder: Path, uids: dict[str, str]) -> list[str]:
    # non_existent_reference_rt.dcm names no series; with the CT slices of its frame of reference and a daily CT of
    # its patient it is selected, and then none of its ROIs (ROI-1 .. ROI-4) is a structure
    daily = _series(folder, uids["daily_ct_series"])
    for path in folder.iterdir():
        if path not in daily:
            path.unlink()
    _edit(daily, PatientID="PHANTOM_EXAMPLE", PatientName="PHANTOM_EXAMPLE", PatientBirthDate="")
    for name in ("non_existent_reference_rt.dcm", "ct_1.dcm", "ct_2.dcm"):
        shutil.copy(MIM / name, folder)
    return ["non_existent_reference_rt.dcm", "no ROI gives any of the structures", "'ROI-1', 'ROI-2'"]


Mutation = Callable[[Path, dict[str, str]], list[str]]
# Every kind of bad input that must be refused; variants that take the same path through the code are tested in the
# reader tests: a planning series that is not CT (test_discovery.py), a daily CT of another patient (test_app.py and
# test_discovery.py), a slice cut in its header (test_discovery.py; it fails like corrupt_file_with_dicm_prefix), the
# MIM RTSTRUCT whose series is absent (test_discovery.py; it fails like rtstruct_references_missing_series).
REFUSED: list[Mutation] = [
    no_rtstruct,
    rtstruct_references_missing_series,
    rtstruct_references_daily_series,
    rtstruct_of_another_patient,
    no_roi_maps_to_a_structure,
    daily_not_ct,
    planning_single_slice,
    daily_missing_slice,
    daily_duplicate_position,
    daily_uneven_spacing,
    daily_gantry_tilt,
    planning_slice_truncated,
    corrupt_file_with_dicm_prefix,
    rtstruct_truncated,
    mim_rtstruct_with_incomplete_ct,
    mim_rtstruct_without_series_reference,
]
