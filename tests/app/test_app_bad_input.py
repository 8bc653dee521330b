"""Bad input through the app as users run it (``python app -i IN -o OUT -m BUNDLE``, a subprocess).

One tiny synthetic session is generated per module; each case copies it, breaks it with pydicom and runs the app.
Where the app cannot proceed it must exit with status 1, print one ``prostate-jrs: error:`` message naming the file,
tag or ROI and what was expected (no traceback), and leave the output folder as it was: no RTSTRUCT, SEG,
registration or QA file and no staging folder. Refusals happen while the session is read, before the network runs.
Where it can proceed (some structures missing, unknown ROI names) it must say what it left out in ``qa.json``.

The library tests cover each check in detail (tests/dicom/test_discovery.py, test_ct_reader.py,
test_rtstruct_reader.py, test_common.py, tests/test_dicom_session.py); these make sure the app stops, says why
and writes nothing.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pydicom
import pytest
from dicom_edits import edit_rois

from prostate_jrs.phantom import PhantomConfig, write_dataset
from prostate_jrs.phantom.dicom_export import export_dicom_sessions

if TYPE_CHECKING:  # conftest is not importable at run time; the fixture hands its helper over
    from conftest import RunApp

MIM = Path(__file__).resolve().parents[2] / "../shared/fixtures/real/rtstruct_mim"
MIM_SERIES = "2.16.840.1.114362.1.11940992.23790159890.563423471.893.88"  # the CT series the MIM RTSTRUCTs reference
OUTPUTS = ("rtstruct.dcm", "seg.dcm", "registration.dcm", "qa.json", "qa.png")
EARLIER = "earlier_result.txt"  # a file already in the output folder: a refused run must leave it alone


@dataclass(frozen=True)
class Study:
    """The generated session folder and its UIDs (``sessions.json``)."""

    folder: Path
    uids: dict[str, str]


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> Study:
    """One tiny synthetic patient, one fraction: planning CT, planning RTSTRUCT and daily CT in one folder."""
    root = tmp_path_factory.mktemp("synth") / "data"
    write_dataset(root, n_patients=1, n_fractions=1, seed=0, config=PhantomConfig.tiny())
    export_dicom_sessions(root)
    record = json.loads((root / "dicom" / "sessions.json").read_text())["sessions"][0]
    return Study(root / record["folder"], record["uids"])


# ----------------------------------------------------------------------------------------------- mutations


def _series(folder: Path, uid: str) -> list[Path]:
    """Files of one series, in slice order (position along z: the phantom's series are axial)."""
    headers = {p: pydicom.dcmread(p, stop_before_pixels=True) for p in folder.glob("*.dcm")}
    files = [p for p, ds in headers.items() if ds.get("SeriesInstanceUID") == uid]
    return sorted(files, key=lambda p: float(headers[p].ImagePositionPatient[2]))


def _rtstruct(folder: Path) -> Path:
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
    _rtstruct(folder).unlink()
    return ["no RTSTRUCT found", str(folder), "expected the planning structure set"]


def rtstruct_references_missing_series(folder: Path, uids: dict[str, str]) -> list[str]:
    rtstruct = _rtstruct(folder)
    _referenced_series(rtstruct, "1.2.826.0.1.3680043.8.498.424242")
    return [rtstruct.name, "references series 1.2.826.0.1.3680043.8.498.424242", "expected the planning CT series"]


def rtstruct_references_daily_series(folder: Path, uids: dict[str, str]) -> list[str]:
    rtstruct = _rtstruct(folder)
    _referenced_series(rtstruct, uids["daily_ct_series"])
    return [rtstruct.name, "frame of reference", uids["daily_ct_series"], "the contours do not fit that CT"]


def rtstruct_of_another_patient(folder: Path, uids: dict[str, str]) -> list[str]:
    rtstruct = _rtstruct(folder)
    _edit([rtstruct], PatientID="JRS999")
    return [rtstruct.name, "different patients", "PatientID (0010,0020) 'JRS001' vs 'JRS999'", "never combined"]


def no_roi_maps_to_a_structure(folder: Path, uids: dict[str, str]) -> list[str]:
    rtstruct = _rtstruct(folder)
    edit_rois(rtstruct, rename={"Prostate": "Target", "SV": "Spacer", "Rectum": "Gut", "Bladder": "Vesica X"})
    return [rtstruct.name, "no ROI gives any of the structures", "'Target', 'Spacer', 'Gut', 'Vesica X', 'BODY'"]


def daily_not_ct(folder: Path, uids: dict[str, str]) -> list[str]:
    _edit(_series(folder, uids["daily_ct_series"]), Modality="MR")
    return ["no daily CT", f"series {uids['daily_ct_series']}: Modality 'MR', not CT"]


def planning_single_slice(folder: Path, uids: dict[str, str]) -> list[str]:
    files = _series(folder, uids["planning_ct_series"])
    for path in files[:20] + files[21:]:
        path.unlink()
    return [_rtstruct(folder).name, uids["planning_ct_series"], "is a single slice (1 file)", "at least 2 slices"]


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
    rtstruct = _rtstruct(folder)
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
# One app run per kind of bad input (each run costs ~10 s, mostly importing torch and MONAI); variants that take
# the same path through the code are tested in the library tests: a planning series that is not CT
# (test_discovery.py), a daily CT of another patient (test_app.py and test_discovery.py), a slice cut in its header
# (test_discovery.py; it fails like corrupt_file_with_dicm_prefix), the MIM RTSTRUCT whose series is absent
# (test_discovery.py; it fails like rtstruct_references_missing_series).
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


def _error_message(stderr: str) -> str:
    """The app's error message: from ``prostate-jrs: error:`` to ``prostate-jrs: no output written``."""
    start = stderr.rindex("prostate-jrs: error: ")
    end = stderr.index("prostate-jrs: no output written", start)
    return stderr[start:end]


@pytest.mark.parametrize("mutate", REFUSED, ids=[m.__name__ for m in REFUSED])
def test_bad_input_is_refused_with_a_clear_message_and_no_output(
    study: Study, bundle: Path, tmp_path: Path, run_app: RunApp, mutate: Mutation
) -> None:
    folder = Path(shutil.copytree(study.folder, tmp_path / "in"))
    expected = mutate(folder, study.uids)
    # an output folder with an earlier file must keep just that; one the run would create must not appear
    existing = mutate is not no_rtstruct
    out = tmp_path / "out" / "fraction 1"
    if existing:
        out.mkdir(parents=True)
        (out / EARLIER).write_text("kept")

    result = run_app(["-i", str(folder), "-o", str(out), "-m", str(bundle)], tmp_path)

    log = result.stdout[-3000:] + result.stderr[-3000:]
    assert result.returncode == 1, log
    assert "Traceback (most recent call last)" not in result.stderr, log
    message = _error_message(result.stderr)
    for fragment in expected:
        assert fragment in message, f"{fragment!r} not in: {message}"
    if existing:
        assert [p.name for p in out.iterdir()] == [EARLIER]  # no output, no staging folder
    else:
        assert not out.exists()


def test_missing_structures_and_unknown_rois_are_reported(
    study: Study, bundle: Path, tmp_path: Path, run_app: RunApp
) -> None:
    """No rectum, the vesicles under a name no synonym knows: the app proceeds and says so in qa.json."""
    folder = Path(shutil.copytree(study.folder, tmp_path / "in"))
    edit_rois(_rtstruct(folder), rename={"SV": "Spacer"}, remove=("Rectum",))
    out = tmp_path / "out"

    result = run_app(["-i", str(folder), "-o", str(out), "-m", str(bundle)], tmp_path)

    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == sorted(OUTPUTS)
    qa = json.loads((out / "qa.json").read_text())
    session = qa["session"]
    assert session["missing_structures"] == ["seminal_vesicles", "rectum"]
    assert session["unmapped_rois"] == ["Spacer", "BODY"]
    assert session["roi_to_structure"] == {"Prostate": "prostate", "Spacer": None, "Bladder": "bladder", "BODY": None}
    assert "structures missing from the planning RTSTRUCT: seminal_vesicles, rectum" in session["notes"]
    assert "ROIs not used (no structure): Spacer, BODY" in session["notes"]
    for name in ("seminal_vesicles", "rectum"):
        assert f"{name}: not in the planning contours" in qa["flags"]
        assert qa["structures"][name]["planning_volume_ml"] == 0.0
        assert qa["structures"][name]["volume_change_pct"] is None
    assert qa["structures"]["prostate"]["planning_volume_ml"] > 0
    assert "QA flag: rectum: not in the planning contours" in result.stdout
