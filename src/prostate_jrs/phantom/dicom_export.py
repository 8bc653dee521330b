"""DICOM export of a synthetic dataset: one folder per adaptive session, as a planning system and a scanner export it.

``prostate-jrs synth OUT ... --dicom`` calls :func:`export_dicom_sessions` once the NIfTI dataset exists. Layout::

    OUT/dicom/JRS001_f01/CT.<uid>.dcm ...   planning CT series (study 1, planning frame of reference)
    OUT/dicom/JRS001_f01/RS.<uid>.dcm       planning RTSTRUCT on it (MANUAL, APPROVED)
    OUT/dicom/JRS001_f01/CT.<uid>.dcm ...   daily CT series (its own study, date and frame of reference)
    OUT/dicom/sessions.json                 ground truth links and coordinate transforms (not DICOM)

Each session folder holds only what a planning system (planning CT, RTSTRUCT) and a scanner (daily CT) would export,
ready for ``python app -i OUT/dicom/JRS001_f01``. The ground truth (daily labels, DDF) stays in the NIfTI dataset;
``sessions.json`` links every session folder to its datalist item and gives the transforms between DICOM patient
coordinates and the dataset's world (see :data:`SESSIONS_README`).

Coordinates: the planning series is written in the dataset's world (its DICOM patient coordinates are the NIfTI
world, LPS). The daily series lies in another frame of reference, as a scan on another day does: its DICOM patient
coordinates are the dataset world plus a table offset drawn from the seed (in-plane SD 15 mm, longitudinal
+/- 250 mm), so world coordinates of the two scans do not correspond and a rigid pre-alignment is needed. The voxel
grids are the NIfTI grids, so the ground-truth DDF (daily voxel units) holds unchanged on the DICOM daily grid.

ROIs of the structure set: ``Prostate``, ``SV``, ``Rectum``, ``Bladder`` (names as planning systems write them;
they map through :class:`prostate_jrs.labels.SynonymTable`) and ``BODY`` (External, the outline a planning system
makes for dose calculation; it maps to no structure, so readers report it as unmapped and ignore it).

Everything is deterministic from the dataset's seeds: UIDs (:func:`prostate_jrs.dicom.uids.make_uid`), dates,
names and table offsets, so the same ``synth`` command gives byte-identical files.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import json
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import SimpleITK as sitk

from prostate_jrs.dicom.ct_series import CTSeriesInfo, synthetic_equipment, write_ct_series
from prostate_jrs.dicom.modules import PatientInfo, StudyInfo
from prostate_jrs.dicom.rtstruct_writer import RTStructOptions, write_rtstruct
from prostate_jrs.dicom.uids import make_uid
from prostate_jrs.hounsfield import BODY_OUTLINE_HU
from prostate_jrs.labels import STRUCTURES, Structure
from prostate_jrs.output_folder import staged_folder

from .shapes import rotation_matrix

__all__ = [
    "ARCHIVE_README",
    "PLANNING_ROI_NAMES",
    "SESSIONS_README",
    "SessionRecord",
    "export_dicom_archive",
    "export_dicom_sessions",
    "setup_transform",
]

PLANNING_ROI_NAMES: dict[str, str] = {
    "prostate": "Prostate",
    "seminal_vesicles": "SV",
    "rectum": "Rectum",
    "bladder": "Bladder",
}
"""ROI Name written for each canonical structure (as a planning system's template names them)."""

_ROI_STRUCTURES = [
    Structure(s.label, s.name, PLANNING_ROI_NAMES[s.name], s.color, s.interpreted_type) for s in STRUCTURES
]

BODY = Structure(label=255, name="body", display_name="BODY", color=(255, 255, 255), interpreted_type="EXTERNAL")
"""The external outline; no canonical structure, so readers report it as unmapped."""

SESSIONS_README = (
    "One entry per session folder (dicom/<patient>_f<fraction>). 'item' is the datalist.json item of the session "
    "(fixed_label and ddf: ground truth on the daily grid; paths relative to the dataset folder). "
    "'planning_to_dataset' and 'daily_to_dataset' are 4x4 matrices mapping DICOM patient coordinates (LPS mm) of "
    "the planning and daily frames of reference to the dataset (NIfTI) world. 'bone_daily_to_planning' maps daily "
    "DICOM points to planning DICOM points for bone (the phantom's rigid setup: bone moves with it only), the "
    "target of a rigid pre-alignment. The ddf holds unchanged on the DICOM daily grid (same voxels): daily voxel x "
    "shows planning anatomy at the dataset world point A_daily_dataset @ (x + ddf(x)), i.e. planning DICOM point "
    "inv(planning_to_dataset) @ that."
)

_TABLE_SHIFT_SD_MM = 15.0
_TABLE_Z_RANGE_MM = 250.0
_FIRST_PLANNING_DAY = dt.date(2026, 1, 5)

# Fixed software versions, not the package's: the same seed gives the same files with any prostate-jrs release.
PLANNING_SCANNER = synthetic_equipment("Synthetic CT Simulator", "SYNSIM01", "CTSIM1", "SYN-CT 1.0")
DAILY_SCANNER = synthetic_equipment("Synthetic CT-on-rails", "SYNCOR01", "LINAC3CT", "SYN-CT 1.0")
PLANNING_SYSTEM = synthetic_equipment("Synthetic TPS", "SYNTPS01", "TPS01", "SYN-TPS 1.0")


@dataclass(frozen=True)
class SessionRecord:
    """What :func:`export_dicom_sessions` wrote for one session (an entry of ``sessions.json``).

    Args:
        folder: session folder, relative to the dataset folder.
        patient: Patient ID.
        fraction: fraction number (1-based).
        item: the datalist item of the session (NIfTI paths relative to the dataset folder).
        uids: Study / Series / SOP Instance and Frame of Reference UIDs written.
        planning_to_dataset: 4x4, planning DICOM patient coordinates -> dataset world.
        daily_to_dataset: 4x4, daily DICOM patient coordinates -> dataset world.
        bone_daily_to_planning: 4x4, daily DICOM point -> planning DICOM point, exact for bone.
    """

    folder: str
    patient: str
    fraction: int
    item: dict[str, object]
    uids: dict[str, str]
    planning_to_dataset: list[list[float]]
    daily_to_dataset: list[list[float]]
    bone_daily_to_planning: list[list[float]]


def setup_transform(info: dict[str, object]) -> np.ndarray:
    """4x4 map of daily world points to planning world points for bone, from a fraction's ``info``.

    The phantom's pull-back (:func:`prostate_jrs.phantom.deformation.pull_back`) maps a daily point ``p`` to
    ``R.T @ (p - t)`` with ``R = rotation_matrix(setup_angles)`` and ``t = setup_shift``; every non-rigid part is
    zero at bone.

    Args:
        info: ``Fraction.info`` (or its entry in ``phantom.json``), with ``setup_shift`` and ``setup_angles``.

    Returns:
        The 4x4 matrix (dataset world, LPS mm).
    """
    rot = rotation_matrix(np.asarray(info["setup_angles"], dtype=np.float64))
    matrix = np.eye(4)
    matrix[:3, :3] = rot.T
    matrix[:3, 3] = -rot.T @ np.asarray(info["setup_shift"], dtype=np.float64)
    return matrix


def _translation(offset: np.ndarray) -> np.ndarray:
    matrix = np.eye(4)
    matrix[:3, 3] = offset
    return matrix


def _body_mask(ct: sitk.Image) -> sitk.Image:
    """The body outline: largest connected region above :data:`~prostate_jrs.hounsfield.BODY_OUTLINE_HU`, enclosed
    holes (rectal gas) filled.

    SimpleITK filters throughout: at clinical size numpy round trips of whole volumes cost seconds.
    """
    mask = ct > BODY_OUTLINE_HU
    largest = sitk.RelabelComponent(sitk.ConnectedComponent(mask), sortByObjectSize=True) == 1
    return sitk.BinaryFillhole(sitk.Cast(largest, sitk.sitkUInt8), fullyConnected=False, foregroundValue=1)


@contextlib.contextmanager
def _without_value_validation() -> Iterator[None]:
    """Skip pydicom's per-value checks while building datasets (restored afterwards).

    The writers format every Decimal String with :func:`prostate_jrs.dicom.values.format_ds`, so the checks find
    nothing, yet at clinical size (a BODY outline of ~100k contour coordinates) they take 40 % of the RTSTRUCT time.
    The written files are still checked by ``dciodvfy`` in the tests.
    """
    previous = pydicom.config.settings.reading_validation_mode
    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
    try:
        yield
    finally:
        pydicom.config.settings.reading_validation_mode = previous


def _weekdays_after(start: dt.date, n: int) -> dt.date:
    """The ``n``-th weekday after ``start`` (radiotherapy fractions are given Monday to Friday)."""
    day = start
    while n > 0:
        day += dt.timedelta(days=1)
        if day.weekday() < 5:
            n -= 1
    return day


def _read_headers(files: list[Path]) -> list[pydicom.Dataset]:
    return [pydicom.dcmread(f, stop_before_pixels=True) for f in files]


def _patient_info(pid: str, seed: int) -> PatientInfo:
    rng = np.random.default_rng([seed, 7001])
    birth = dt.date(1940, 1, 1) + dt.timedelta(days=int(rng.integers(0, 25 * 365)))
    return PatientInfo(name=f"Phantom^{pid}", patient_id=pid, birth_date=birth, sex="M")


_Planning = tuple[list[Path], Path, dict[str, str], dt.date]
"""What :func:`_write_planning` wrote: CT files, RTSTRUCT, UIDs and the planning day."""


def _approved_contours(
    label_and_name: tuple[str, str],
    series: tuple[str, int],
    uids: tuple[str, str],
    when: dt.datetime,
    operator: str,
) -> RTStructOptions:
    """Options of an RTSTRUCT drawn (MANUAL) in the synthetic TPS and approved by the oncologist.

    Args:
        label_and_name: Structure Set Label and Name.
        series: Series Description and Number.
        uids: Series and SOP Instance UIDs.
        when: Structure Set (and review) date and time.
        operator: Operators' Name.
    """
    return RTStructOptions(
        generation="MANUAL",
        algorithm_name="Synthetic TPS",
        algorithm_version="1.0",
        structure_set_label=label_and_name[0],
        structure_set_name=label_and_name[1],
        series_description=series[0],
        series_number=series[1],
        series_instance_uid=uids[0],
        sop_instance_uid=uids[1],
        content_datetime=when,
        operators_name=operator,
        roi_interpreter="Oncologist^Synthetic",
        approval_status="APPROVED",
        reviewer_name="Oncologist^Synthetic",
        equipment=PLANNING_SYSTEM,
        skip_empty=True,
        holes="keyhole",  # read the same by even-odd readers and by readers that take the union (plastimatch)
    )


def _write_planning(
    ct_dir: Path, rs_dir: Path, pid: str, seed: int, patient: PatientInfo, ct: sitk.Image, labels: sitk.Image
) -> _Planning:
    """Planning CT series (into ``ct_dir``) and RTSTRUCT (into ``rs_dir``) of one patient."""
    rng = np.random.default_rng([seed, 7002])
    day = _FIRST_PLANNING_DAY + dt.timedelta(days=int(rng.integers(0, 120)))
    when = dt.datetime.combine(day, dt.time(8 + int(rng.integers(0, 8)), int(rng.integers(0, 60)), 0))
    uid = lambda *parts: make_uid("prostate-jrs synth", seed, pid, "planning", *parts)  # noqa: E731
    study = StudyInfo(
        study_instance_uid=uid("study"),
        study_datetime=when,
        study_id="PLAN1",
        accession_number=f"P{seed % 10**9:09d}",
        referring_physician_name="Oncologist^Synthetic",
        description="RT Planning CT Pelvis",
    )
    frame = uid("frame")
    series = CTSeriesInfo(
        frame_of_reference_uid=frame,
        series_description="Planning CT Pelvis 3mm",
        series_number=2,
        series_instance_uid=uid("ct series"),
        series_datetime=when,
        protocol_name="RT Prostate Planning",
    )
    ct_files = write_ct_series(ct, ct_dir, patient=patient, study=study, series=series, equipment=PLANNING_SCANNER)
    options = _approved_contours(
        ("RT_PROSTATE", "Prostate planning"),
        ("RT Structures Prostate", 3),
        (uid("rtstruct series"), uid("rtstruct")),
        dt.datetime.combine(_weekdays_after(day, 2), dt.time(14, 30, 0)),
        "Dosimetrist^Synthetic",
    )
    labels = sitk.Cast(labels, sitk.sitkUInt8)
    masks = {s.name: sitk.BinaryThreshold(labels, s.label, s.label, 1, 0) for s in STRUCTURES}
    masks[BODY.name] = _body_mask(ct)
    structures = [*_ROI_STRUCTURES, BODY]
    with _without_value_validation():
        rs_path = write_rtstruct(
            masks, _read_headers(ct_files), rs_dir / f"RS.{options.sop_instance_uid}.dcm", structures=structures,
            options=options,
        )  # fmt: skip
    uids = {
        "patient_id": pid,
        "planning_study": study.study_instance_uid,
        "planning_frame_of_reference": frame,
        "planning_ct_series": str(series.series_instance_uid),
        "planning_rtstruct_series": str(options.series_instance_uid),
        "planning_rtstruct_sop": str(options.sop_instance_uid),
    }
    return ct_files, rs_path, uids, day


def _write_daily(
    folder: Path, pid: str, seed: int, fraction: int, patient: PatientInfo, ct: sitk.Image, plan_day: dt.date
) -> tuple[dict[str, str], np.ndarray, dt.datetime]:
    """One daily CT series, in its own study and frame of reference, shifted by a table offset; also the offset and
    the acquisition time."""
    rng = np.random.default_rng([seed, 7003, fraction])
    offset = np.array(
        [*rng.normal(0.0, _TABLE_SHIFT_SD_MM, 2), rng.uniform(-_TABLE_Z_RANGE_MM, _TABLE_Z_RANGE_MM)]
    ).round(1)
    # treatment starts about a week after planning; one fraction per weekday
    day = _weekdays_after(plan_day, 5 + fraction)
    when = dt.datetime.combine(day, dt.time(7 + int(rng.integers(0, 10)), int(rng.integers(0, 60)), 0))
    uid = lambda *parts: make_uid("prostate-jrs synth", seed, pid, "daily", fraction, *parts)  # noqa: E731
    study = StudyInfo(
        study_instance_uid=uid("study"),
        study_datetime=when,
        study_id=f"FX{fraction}",
        accession_number=f"D{seed % 10**7:07d}{fraction:02d}"[-16:],
        referring_physician_name="Oncologist^Synthetic",
        description=f"Daily CT Fraction {fraction}",
    )
    frame = uid("frame")
    series = CTSeriesInfo(
        frame_of_reference_uid=frame,
        series_description=f"Daily CT Fx{fraction}",
        series_number=1,
        series_instance_uid=uid("ct series"),
        series_datetime=when,
        protocol_name="RT Prostate Daily",
    )
    shifted = sitk.Image(ct)
    shifted.SetOrigin(tuple(float(o) for o in np.asarray(ct.GetOrigin()) + offset))
    write_ct_series(shifted, folder, patient=patient, study=study, series=series, equipment=DAILY_SCANNER)
    uids = {
        "daily_study": study.study_instance_uid,
        "daily_frame_of_reference": frame,
        "daily_ct_series": str(series.series_instance_uid),
    }
    return uids, offset, when


def _dataset_items(dataset_dir: Path) -> tuple[dict[str, Any], dict[str, Any], list[dict[str, Any]]]:
    """Datalist, per-patient provenance and every item (sorted by patient and fraction) of a synthetic dataset.

    Raises:
        FileNotFoundError: if ``datalist.json`` or ``phantom.json`` is missing.
        FileExistsError: if ``dataset_dir/dicom`` exists.
        ValueError: if the datalist items lack ``patient`` or ``fraction``.
    """
    for name in ("datalist.json", "phantom.json"):
        if not (dataset_dir / name).is_file():
            raise FileNotFoundError(f"{dataset_dir / name} not found; expected a dataset written by write_dataset")
    if (dataset_dir / "dicom").exists():
        raise FileExistsError(f"{dataset_dir / 'dicom'} already exists; the DICOM export writes a new folder")
    datalist = json.loads((dataset_dir / "datalist.json").read_text())
    phantom = json.loads((dataset_dir / "phantom.json").read_text())["patients"]
    items = [item for part in ("training", "validation", "test") for item in datalist.get(part, [])]
    for item in items:
        if "patient" not in item or "fraction" not in item:
            raise ValueError(f"datalist item {item} has no 'patient' or 'fraction'; expected a synthetic dataset")
    items.sort(key=lambda item: (str(item["patient"]), int(item["fraction"])))
    return datalist, phantom, items


def export_dicom_sessions(
    dataset_dir: str | os.PathLike[str],
    *,
    progress: Callable[[str], None] | None = None,
) -> Path:
    """Write ``dataset_dir/dicom/<patient>_f<fraction>/`` for every item of a synthetic dataset, and ``sessions.json``.

    Args:
        dataset_dir: a folder written by :func:`prostate_jrs.phantom.write_dataset` (``datalist.json`` and
            ``phantom.json``, whose per-patient seeds and setup motion are used).
        progress: called with a short message after each session.

    Returns:
        Path of ``dataset_dir/dicom/sessions.json``.

    Raises:
        FileNotFoundError: if ``datalist.json`` or ``phantom.json`` is missing.
        FileExistsError: if ``dataset_dir/dicom`` exists.
        ValueError: if the datalist items lack ``patient`` or ``fraction``.
    """
    dataset_dir = Path(dataset_dir)
    datalist, phantom, items = _dataset_items(dataset_dir)
    with staged_folder(dataset_dir / "dicom") as staging:
        records: list[SessionRecord] = []
        planning: dict[str, _Planning] = {}
        for item in items:
            pid = str(item["patient"])
            if pid not in planning:
                hidden = staging / f".{pid}_planning"  # copied into each session folder
                planning[pid] = _write_planning_of(dataset_dir, item, hidden, hidden, int(phantom[pid]["seed"]))
            records.append(_write_session(staging, dataset_dir, item, planning[pid], phantom[pid]))
            if progress is not None:
                progress(f"{records[-1].folder}: planning CT + RTSTRUCT + daily CT written")
        for files, _, _, _ in planning.values():
            shutil.rmtree(files[0].parent)
        manifest = {
            "readme": SESSIONS_README,
            "seed": datalist.get("seed"),
            "sessions": [dataclasses.asdict(record) for record in records],
        }
        (staging / "sessions.json").write_text(json.dumps(manifest, indent=1))
    return dataset_dir / "dicom" / "sessions.json"


def _write_planning_of(dataset_dir: Path, item: dict[str, Any], ct_dir: Path, rs_dir: Path, seed: int) -> _Planning:
    """:func:`_write_planning` for the planning scan and contours of a datalist item."""
    pid = str(item["patient"])
    ct = sitk.ReadImage(str(dataset_dir / str(item["moving_image"])))
    labels = sitk.ReadImage(str(dataset_dir / str(item["moving_label"])))
    return _write_planning(ct_dir, rs_dir, pid, seed, _patient_info(pid, seed), ct, labels)


def _write_session(
    staging: Path, dataset_dir: Path, item: dict[str, Any], planning: _Planning, provenance: dict[str, Any]
) -> SessionRecord:
    """One session folder: copies of the planning CT and RTSTRUCT, and the daily CT of ``item``."""
    pid, fraction = str(item["patient"]), int(item["fraction"])
    seed = int(provenance["seed"])
    ct_files, rs_path, plan_uids, plan_day = planning
    folder = staging / f"{pid}_f{fraction:02d}"
    folder.mkdir()
    for path in [*ct_files, rs_path]:
        shutil.copyfile(path, folder / path.name)
    daily = sitk.ReadImage(str(dataset_dir / str(item["fixed_image"])))
    daily_uids, offset, _ = _write_daily(folder, pid, seed, fraction, _patient_info(pid, seed), daily, plan_day)
    daily_to_dataset = _translation(-offset)
    bone = setup_transform(provenance["fractions"][fraction - 1]) @ daily_to_dataset
    return SessionRecord(
        folder=f"dicom/{folder.name}",
        patient=pid,
        fraction=fraction,
        item=dict(item),
        uids={**plan_uids, **daily_uids},
        planning_to_dataset=np.eye(4).tolist(),
        daily_to_dataset=daily_to_dataset.tolist(),
        bone_daily_to_planning=np.round(bone, 9).tolist(),
    )


# --------------------------------------------------------------------------------------------------- archive

ARCHIVE_README = (
    "The folder is a synthetic export of an adaptive-radiotherapy archive, one folder per patient as a planning "
    "system or PACS writes it (prostate-jrs import takes this folder). 'patients' gives, per patient, the ground "
    "truth of every fraction: 'item' is its datalist.json item in the dataset folder (fixed_label: the daily "
    "contours, which the daily RTSTRUCT holds), 'daily_ct_series' the Series Instance UID of its daily CT, "
    "'daily_rtstruct' whether an approved daily RTSTRUCT was written, 'daily_to_dataset' the map of the daily "
    "DICOM patient coordinates to the dataset world (the planning series is written in the dataset world). "
    "'extras' lists what an archive also holds: an RTPLAN per patient, a daily CT without contours, a stray CT "
    "series of another patient, a duplicate export and a non-DICOM file."
)

_STRAY_PATIENT = PatientInfo(name="Stray^Series", patient_id="STRAY001", birth_date=dt.date(1950, 6, 1), sex="M")


def _write_rtplan(folder: Path, ct_files: list[Path], rs_path: Path, pid: str, seed: int, day: dt.date) -> Path:
    """A minimal approved RT Plan referencing the planning structure set (what an archive links plan and contours by).

    Hand-written with pydicom: no maintained library writes RT Plans, and the importer needs only the reference.
    """
    from pydicom.dataset import Dataset
    from pydicom.uid import RTPlanStorage, RTStructureSetStorage

    from prostate_jrs.dicom.files import atomic_write
    from prostate_jrs.dicom.modules import new_derived_instance
    from prostate_jrs.dicom.values import dicom_date, dicom_time

    uid = lambda *parts: make_uid("prostate-jrs synth", seed, pid, "planning", "rtplan", *parts)  # noqa: E731
    when = dt.datetime.combine(_weekdays_after(day, 3), dt.time(11, 0, 0))
    first = pydicom.dcmread(ct_files[0], stop_before_pixels=True)
    ds = new_derived_instance(
        RTPlanStorage, "RTPLAN", first, when, equipment=PLANNING_SYSTEM, sop_instance_uid=uid("sop"),
        series_instance_uid=uid("series"), series_number=4, series_description="RT Plan Prostate",
        operators_name="Dosimetrist^Synthetic",
    )  # fmt: skip
    ds.RTPlanLabel, ds.RTPlanName = "PROSTATE", "Prostate 78 Gy in 39 fractions"
    ds.RTPlanDate, ds.RTPlanTime = dicom_date(when), dicom_time(when)
    ds.RTPlanGeometry = "PATIENT"
    ds.PlanIntent = "CURATIVE"
    reference = Dataset()
    reference.ReferencedSOPClassUID = RTStructureSetStorage
    reference.ReferencedSOPInstanceUID = pydicom.dcmread(rs_path, stop_before_pixels=True).SOPInstanceUID
    ds.ReferencedStructureSetSequence = [reference]
    group = Dataset()
    group.FractionGroupNumber = 1
    group.NumberOfFractionsPlanned = 39
    group.NumberOfBeams = 0
    group.NumberOfBrachyApplicationSetups = 0
    ds.FractionGroupSequence = [group]
    ds.ApprovalStatus = "APPROVED"
    ds.ReviewDate, ds.ReviewTime, ds.ReviewerName = dicom_date(when), dicom_time(when), "Oncologist^Synthetic"
    return atomic_write(ds, folder / f"RP.{ds.SOPInstanceUID}.dcm")


def _write_daily_rtstruct(
    folder: Path, ct_folder: Path, labels: sitk.Image, offset: np.ndarray, pid: str, seed: int, fraction: int,
    when: dt.datetime,
) -> Path:  # fmt: skip
    """The daily contours a clinician approved on the daily CT (written on the daily series' shifted grid)."""
    uid = lambda *parts: make_uid("prostate-jrs synth", seed, pid, "daily", fraction, "rtstruct", *parts)  # noqa: E731
    shifted = sitk.Cast(labels, sitk.sitkUInt8)
    shifted.SetOrigin(tuple(float(o) for o in np.asarray(labels.GetOrigin()) + offset))
    options = _approved_contours(
        (f"FX{fraction}_ADAPT", f"Fraction {fraction} approved"),
        (f"RT Structures Fx{fraction}", 2),
        (uid("series"), uid("sop")),
        when + dt.timedelta(minutes=20),
        "Therapist^Synthetic",
    )
    headers = _read_headers(sorted(ct_folder.glob("CT.*.dcm")))
    with _without_value_validation():
        return write_rtstruct(
            shifted, headers, folder / f"RS.{options.sop_instance_uid}.dcm", structures=_ROI_STRUCTURES, options=options
        )


def _write_archive_patient(
    root: Path, dataset_dir: Path, pid: str, seed: int, items: list[dict[str, Any]], info: dict[str, Any],
    with_last_contours: bool,
) -> dict[str, Any]:  # fmt: skip
    """One patient's export: planning CT, RTSTRUCT and RTPLAN, and per fraction a daily CT with its RTSTRUCT."""
    patient = _patient_info(pid, seed)
    plan = root / pid / "Study_PLAN1"
    ct_files, rs_path, uids, day = _write_planning_of(dataset_dir, items[0], plan / "CT_2", plan / "RTSTRUCT_3", seed)
    _write_rtplan(plan / "RTPLAN_4", ct_files, rs_path, pid, seed, day)
    fractions = []
    for item in items:
        fraction = int(item["fraction"])
        study = root / pid / f"Study_FX{fraction}"
        daily = sitk.ReadImage(str(dataset_dir / str(item["fixed_image"])))
        daily_uids, offset, when = _write_daily(study / "CT_1", pid, seed, fraction, patient, daily, day)
        bone = setup_transform(info["fractions"][fraction - 1])
        contoured = with_last_contours or item is not items[-1]
        if contoured:
            daily_labels = sitk.ReadImage(str(dataset_dir / str(item["fixed_label"])))
            _write_daily_rtstruct(study / "RTSTRUCT_2", study / "CT_1", daily_labels, offset, pid, seed, fraction, when)
        fractions.append(
            {
                "fraction": fraction,
                "item": dict(item),
                "daily_ct_series": daily_uids["daily_ct_series"],
                "daily_rtstruct": contoured,
                "daily_to_dataset": _translation(-offset).tolist(),
                "bone_daily_to_planning": np.round(bone @ _translation(-offset), 9).tolist(),
            }
        )
    return {"planning": uids, "fractions": fractions}


def _write_archive_extras(root: Path, stray_ct: sitk.Image, pids: list[str], seed: int) -> dict[str, str]:
    """What else an archive holds: a stray CT series of another patient, a duplicate export, a non-DICOM file."""
    host = pids[1 % len(pids)]
    uid = lambda *parts: make_uid("prostate-jrs synth", seed, "stray", *parts)  # noqa: E731
    when = dt.datetime.combine(_FIRST_PLANNING_DAY, dt.time(9, 0, 0))
    study = StudyInfo(study_instance_uid=uid("study"), study_datetime=when, study_id="CT1", description="CT Abdomen")
    series = CTSeriesInfo(
        frame_of_reference_uid=uid("frame"), series_description="Abdomen 5mm", series_number=7,
        series_instance_uid=uid("series"), series_datetime=when,
    )  # fmt: skip
    stray_folder = root / host / "Study_FX1" / "CT_7"
    write_ct_series(stray_ct, stray_folder, patient=_STRAY_PATIENT, study=study, series=series)
    duplicate = root / pids[0] / "second_export" / "CT_1"
    shutil.copytree(root / pids[0] / "Study_FX1" / "CT_1", duplicate)
    (root / "export_log.txt").write_text("Export from Synthetic TPS 1.0: every patient of the adaptive programme.\n")
    return {
        "stray_series": f"{stray_folder.relative_to(root)} (PatientID {_STRAY_PATIENT.patient_id})",
        "duplicate_export": str(duplicate.relative_to(root)),
        "non_dicom": "export_log.txt",
    }


def export_dicom_archive(
    dataset_dir: str | os.PathLike[str],
    *,
    progress: Callable[[str], None] | None = None,
) -> Path:
    """Write ``dataset_dir/dicom/`` as a hospital's archive export of the synthetic dataset, and ``archive.json``.

    Layout (what ``prostate-jrs import dataset_dir/dicom OUT`` reads)::

        dicom/JRS001/Study_PLAN1/CT_2/CT.<uid>.dcm       planning CT (dataset world = its DICOM coordinates)
        dicom/JRS001/Study_PLAN1/RTSTRUCT_3/RS.<uid>.dcm planning contours (MANUAL, APPROVED) + BODY
        dicom/JRS001/Study_PLAN1/RTPLAN_4/RP.<uid>.dcm   RT Plan referencing that structure set
        dicom/JRS001/Study_FX1/CT_1/CT.<uid>.dcm         daily CT (own study and frame of reference, table offset)
        dicom/JRS001/Study_FX1/RTSTRUCT_2/RS.<uid>.dcm   the approved daily contours (the phantom's daily truth)
        dicom/JRS001/second_export/CT_1/...              a duplicate export of JRS001's first daily CT
        dicom/JRS002/Study_FX1/CT_7/...                  a stray CT series of another patient (STRAY001)
        dicom/export_log.txt                             a non-DICOM file
        dicom/archive.json                               ground truth links (not DICOM; :data:`ARCHIVE_README`)

    The last fraction of the last patient has no daily RTSTRUCT (a daily scan without contours). Files are
    deterministic from the dataset's seeds, as :func:`export_dicom_sessions` writes them.

    Args:
        dataset_dir: a folder written by :func:`prostate_jrs.phantom.write_dataset`.
        progress: called with a short message after each patient.

    Returns:
        Path of ``dataset_dir/dicom/archive.json``.

    Raises:
        FileNotFoundError, FileExistsError, ValueError: as :func:`export_dicom_sessions` (no synthetic dataset in
            ``dataset_dir``, or ``dataset_dir/dicom`` exists).
    """
    dataset_dir = Path(dataset_dir)
    datalist, phantom, items = _dataset_items(dataset_dir)
    pids = sorted({str(item["patient"]) for item in items})
    with staged_folder(dataset_dir / "dicom") as staging:
        patients = {}
        for pid in pids:
            mine = [item for item in items if str(item["patient"]) == pid]
            seed = int(phantom[pid]["seed"])
            patients[pid] = _write_archive_patient(
                staging, dataset_dir, pid, seed, mine, phantom[pid], with_last_contours=pid != pids[-1]
            )
            if progress is not None:
                progress(f"dicom/{pid}: planning CT + RTSTRUCT + RTPLAN + {len(mine)} daily CT(s) written")
        stray_ct = sitk.ReadImage(str(dataset_dir / str(items[0]["moving_image"])))
        extras = _write_archive_extras(staging, stray_ct, pids, int(datalist.get("seed") or 0))
        extras["without_contours"] = f"{pids[-1]} fraction {patients[pids[-1]]['fractions'][-1]['fraction']}"
        manifest = {"readme": ARCHIVE_README, "seed": datalist.get("seed"), "patients": patients, "extras": extras}
        (staging / "archive.json").write_text(json.dumps(manifest, indent=1))
    return dataset_dir / "dicom" / "archive.json"
