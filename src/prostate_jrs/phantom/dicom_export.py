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

Everything is deterministic from the dataset's seeds: UIDs (:func:`prostate_jrs.dicom.common.make_uid`), dates,
names and table offsets, so the same ``synth`` command gives byte-identical files.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk

from prostate_jrs.dicom.common import EquipmentInfo, PatientInfo, StudyInfo, make_uid
from prostate_jrs.dicom.ct_series import CTSeriesInfo, write_ct_series
from prostate_jrs.dicom.rtstruct_writer import RTStructOptions, write_rtstruct
from prostate_jrs.labels import STRUCTURES, Structure

from .shapes import rotation_matrix

__all__ = [
    "PLANNING_ROI_NAMES",
    "SESSIONS_README",
    "SessionRecord",
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
_BODY_HU = -400.0  # planning systems outline the body at about -300 to -500 HU
_FIRST_PLANNING_DAY = dt.date(2026, 1, 5)

# Fixed software versions, not the package's: the same seed gives the same files with any prostate-jrs release.
PLANNING_SCANNER = EquipmentInfo(
    manufacturer="prostate-jrs",
    model_name="Synthetic CT Simulator",
    software_versions="SYN-CT 1.0",
    device_serial_number="SYNSIM01",
    station_name="CTSIM1",
    institution_name="prostate-jrs synthetic clinic",
)
DAILY_SCANNER = EquipmentInfo(
    manufacturer="prostate-jrs",
    model_name="Synthetic CT-on-rails",
    software_versions="SYN-CT 1.0",
    device_serial_number="SYNCOR01",
    station_name="LINAC3CT",
    institution_name="prostate-jrs synthetic clinic",
)
PLANNING_SYSTEM = EquipmentInfo(
    manufacturer="prostate-jrs",
    model_name="Synthetic TPS",
    software_versions="SYN-TPS 1.0",
    device_serial_number="SYNTPS01",
    station_name="TPS01",
    institution_name="prostate-jrs synthetic clinic",
)


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
    """The body outline: largest connected region above -400 HU, enclosed holes (rectal gas) filled.

    SimpleITK filters throughout: at clinical size numpy round trips of whole volumes cost seconds.
    """
    mask = ct > _BODY_HU
    largest = sitk.RelabelComponent(sitk.ConnectedComponent(mask), sortByObjectSize=True) == 1
    return sitk.BinaryFillhole(sitk.Cast(largest, sitk.sitkUInt8), fullyConnected=False, foregroundValue=1)


@contextlib.contextmanager
def _without_value_validation() -> Iterator[None]:
    """Skip pydicom's per-value checks while building datasets (restored afterwards).

    The writers format every Decimal String with :func:`prostate_jrs.dicom.common.format_ds`, so the checks find
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


def _write_planning(
    staging: Path, pid: str, seed: int, patient: PatientInfo, ct: sitk.Image, labels: sitk.Image
) -> tuple[list[Path], Path, dict[str, str], dt.date]:
    """Planning CT series and RTSTRUCT of one patient into ``staging/<pid>_planning`` (copied into each session)."""
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
    folder = staging / f".{pid}_planning"
    ct_files = write_ct_series(ct, folder, patient=patient, study=study, series=series, equipment=PLANNING_SCANNER)
    contoured = dt.datetime.combine(_weekdays_after(day, 2), dt.time(14, 30, 0))
    options = RTStructOptions(
        generation="MANUAL",
        algorithm_name="Synthetic TPS",
        algorithm_version="1.0",
        structure_set_label="RT_PROSTATE",
        structure_set_name="Prostate planning",
        series_description="RT Structures Prostate",
        series_number=3,
        series_instance_uid=uid("rtstruct series"),
        sop_instance_uid=uid("rtstruct"),
        content_datetime=contoured,
        operators_name="Dosimetrist^Synthetic",
        roi_interpreter="Oncologist^Synthetic",
        approval_status="APPROVED",
        reviewer_name="Oncologist^Synthetic",
        equipment=PLANNING_SYSTEM,
        skip_empty=True,
        holes="keyhole",  # read the same by even-odd readers and by readers that take the union (plastimatch)
    )
    labels = sitk.Cast(labels, sitk.sitkUInt8)
    masks = {s.name: sitk.BinaryThreshold(labels, s.label, s.label, 1, 0) for s in STRUCTURES}
    masks[BODY.name] = _body_mask(ct)
    structures = [
        Structure(s.label, s.name, PLANNING_ROI_NAMES[s.name], s.color, s.interpreted_type) for s in STRUCTURES
    ] + [BODY]
    with _without_value_validation():
        rs_path = write_rtstruct(
            masks, _read_headers(ct_files), folder / f"RS.{options.sop_instance_uid}.dcm", structures=structures,
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
) -> tuple[dict[str, str], np.ndarray]:
    """One daily CT series, in its own study and frame of reference, shifted by a table offset."""
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
    return uids, offset


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
    for name in ("datalist.json", "phantom.json"):
        if not (dataset_dir / name).is_file():
            raise FileNotFoundError(f"{dataset_dir / name} not found; expected a dataset written by write_dataset")
    out_dir = dataset_dir / "dicom"
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} already exists; the DICOM export writes a new folder")
    datalist = json.loads((dataset_dir / "datalist.json").read_text())
    phantom = json.loads((dataset_dir / "phantom.json").read_text())["patients"]
    items = [item for part in ("training", "validation", "test") for item in datalist.get(part, [])]
    for item in items:
        if "patient" not in item or "fraction" not in item:
            raise ValueError(f"datalist item {item} has no 'patient' or 'fraction'; expected a synthetic dataset")
    items.sort(key=lambda item: (str(item["patient"]), int(item["fraction"])))

    staging = Path(tempfile.mkdtemp(prefix=".dicom.partial-", dir=dataset_dir))
    staging.chmod(0o755)
    try:
        records: list[SessionRecord] = []
        planning: dict[str, tuple[list[Path], Path, dict[str, str], dt.date]] = {}
        for item in items:
            pid, fraction = str(item["patient"]), int(item["fraction"])
            seed = int(phantom[pid]["seed"])
            patient = _patient_info(pid, seed)
            if pid not in planning:
                ct = sitk.ReadImage(str(dataset_dir / str(item["moving_image"])))
                labels = sitk.ReadImage(str(dataset_dir / str(item["moving_label"])))
                planning[pid] = _write_planning(staging, pid, seed, patient, ct, labels)
            ct_files, rs_path, plan_uids, plan_day = planning[pid]
            folder = staging / f"{pid}_f{fraction:02d}"
            folder.mkdir()
            for path in [*ct_files, rs_path]:
                shutil.copyfile(path, folder / path.name)
            daily = sitk.ReadImage(str(dataset_dir / str(item["fixed_image"])))
            daily_uids, offset = _write_daily(folder, pid, seed, fraction, patient, daily, plan_day)
            daily_to_dataset = _translation(-offset)
            bone = setup_transform(phantom[pid]["fractions"][fraction - 1]) @ daily_to_dataset
            records.append(
                SessionRecord(
                    folder=f"dicom/{folder.name}",
                    patient=pid,
                    fraction=fraction,
                    item=dict(item),
                    uids={**plan_uids, **daily_uids},
                    planning_to_dataset=np.eye(4).tolist(),
                    daily_to_dataset=daily_to_dataset.tolist(),
                    bone_daily_to_planning=np.round(bone, 9).tolist(),
                )
            )
            if progress is not None:
                progress(f"dicom/{folder.name}: planning CT + RTSTRUCT + daily CT written")
        for files, _, _, _ in planning.values():
            shutil.rmtree(files[0].parent)
        manifest = {
            "readme": SESSIONS_README,
            "seed": datalist.get("seed"),
            "sessions": [dataclasses.asdict(record) for record in records],
        }
        (staging / "sessions.json").write_text(json.dumps(manifest, indent=1))
        os.replace(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir / "sessions.json"
