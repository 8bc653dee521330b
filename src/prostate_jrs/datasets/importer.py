"""``prostate-jrs import``: a hospital's DICOM archive export -> the project's dataset format, pseudonymised.

Output (``OUT`` the dataset; ``PRIVATE`` the site's private folder, by default ``OUT`` + ``-private`` beside it)::

    OUT/datalist.json                    training / validation / test (split by patient; daily scans with approved
                                         contours) and inference (daily scans without), items with their rigid record
    OUT/patients/<P>/<P>_planning_ct.nii.gz      planning CT (HU) in its own frame of reference
    OUT/patients/<P>/<P>_planning_labels.nii.gz  planning contours (0 background, 1 prostate, 2 seminal vesicles,
                                                 3 rectum, 4 bladder)
    OUT/patients/<P>/<P>_f01_ct.nii.gz           daily CT of fraction 1 (HU), in its own frame of reference
    OUT/patients/<P>/<P>_f01_labels.nii.gz       its approved daily contours, when it has them
    OUT/patients/<P>/items.json                  the patient's datalist items; the patient is complete when it exists
    PRIVATE/pseudonym_key.csv            Patient ID -> pseudonym <P>: keep it at the site, never share it
    PRIVATE/import_report.json, .csv     per patient and daily scan: imported or skipped, and why (with source
                                         files and UIDs)

Each pair is prepared as the app sees it: the daily CT's planning pair is checked by
:func:`prostate_jrs.dicom.discovery.select_session` (never two patients; contours only in their frame of reference),
both CT series are read by :func:`~prostate_jrs.dicom.ct_reader.read_ct_series`, contours rasterised on their own CT
by :func:`~prostate_jrs.dicom.rtstruct_reader.read_rtstruct` with the synonym table, and the rigid pre-alignment on
bone (:func:`prostate_jrs.rigid.align_on_bone`, what the app's pipeline runs) is recorded in the item (``rigid``:
matrix and residual), so training, evaluation and the app give the network the same input
(:mod:`prostate_jrs.preprocessing`).

Privacy by default: file names, folder names and the datalist carry only the random pseudonym; the NIfTI files carry
geometry and voxels only (no DICOM header); nothing of the source path is written into ``OUT``.

Robustness: problems of one patient or one scan are reported (:mod:`prostate_jrs.datasets.report`), never fatal to
the run. A patient's folder is written under a hidden name and renamed when complete. A re-run reads the previous
report: patients whose source files and settings are unchanged (same fingerprint) are left as they are, so a second
run over the same archive writes nothing; a patient with new or changed files is imported again and replaced.
Patients in a list of ``datalist.json`` keep their list; patients new to the dataset are split among themselves.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import multiprocessing
import os
import shutil
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import SimpleITK as sitk

from prostate_jrs.datasets.archive import DailyScan, PatientPlan, patient_inventories, plan_patient, scan_archive
from prostate_jrs.datasets.pseudonyms import PseudonymKey
from prostate_jrs.datasets.report import ItemReport, PatientReport, read_report, write_report
from prostate_jrs.datasets.splits import DEFAULT_TEST_FRACTION, DEFAULT_VALIDATION_FRACTION, split_patients
from prostate_jrs.dicom.ct_reader import CTSeriesError, CTVolume, read_ct_series
from prostate_jrs.dicom.discovery import DicomInventory, DicomSelectionError, select_session
from prostate_jrs.dicom.files import DamagedFileError
from prostate_jrs.dicom.rtstruct_reader import RTStructContents, RTStructError, read_rtstruct
from prostate_jrs.geometry import array_from_image
from prostate_jrs.labels import LABEL_NAMES, STRUCTURES, SynonymTable
from prostate_jrs.preprocessing import PreprocessingError, model_grid
from prostate_jrs.rigid import RIGID_CONVENTION, NoBoneError, RigidAlignment, align_on_bone

__all__ = [
    "DATASET_NAME",
    "PATIENTS",
    "ImportResult",
    "ImportSettings",
    "dataset_split",
    "import_archive",
    "import_patient",
    "write_datalist",
]

DATASET_NAME = "prostate-jrs import"
_ITEMS = "items.json"
_PARTIAL = ".partial-"
#: Sub-folder of the patient folders. Not the dataset root: MONAI's datalist loader turns any item value naming an
#: existing path under the root into that path, and a folder named like the pseudonym would capture ``patient``.
PATIENTS = "patients"
_PRIVATE_README = (
    "This folder belongs to the site that ran `prostate-jrs import`. pseudonym_key.csv links the pseudonyms of the "
    "dataset to Patient IDs; import_report.* name source files and UIDs. Keep it at the site: never copy it with the "
    "dataset, never send it to a federation server.\n"
)


@dataclass(frozen=True)
class ImportSettings:
    """Settings of :func:`import_archive`.

    Args:
        synonyms: ROI name -> structure table; ``None`` for the default.
        planning_rule: ``rtplan`` or ``earliest`` (:mod:`prostate_jrs.datasets.archive`).
        planning_overrides: Patient ID -> SOP Instance UID of the planning RTSTRUCT, overriding the rule.
        validation_fraction: share of new patients for validation.
        test_fraction: share of new patients for testing.
        seed: seed of the split.
        residual_limit_mm: rigid residual above which the report notes the pair for review.
    """

    synonyms: SynonymTable | None = None
    planning_rule: str = "rtplan"
    planning_overrides: Mapping[str, str] = field(default_factory=dict)
    validation_fraction: float = DEFAULT_VALIDATION_FRACTION
    test_fraction: float = DEFAULT_TEST_FRACTION
    seed: int = 0
    residual_limit_mm: float = 3.0

    def fingerprint(self, patient_key: str) -> str:
        """What of the settings changes this patient's output (the split does not; others' overrides do not)."""
        table = self.synonyms or SynonymTable()
        content = {
            "synonyms": {s.name: table.names_for(s.name) for s in STRUCTURES},
            "rule": self.planning_rule,
            "override": self.planning_overrides.get(patient_key),
        }
        return json.dumps(content, sort_keys=True)


@dataclass
class ImportResult:
    """What :func:`import_archive` wrote."""

    dataset: Path
    datalist: Path
    private_dir: Path
    reports: list[PatientReport]
    report_files: tuple[Path, Path]


# --------------------------------------------------------------------------------------------------- one patient


def _category(err: Exception) -> str:
    """The report category of an exception raised while importing (report.CATEGORIES)."""
    text = str(err)
    if isinstance(err, NoBoneError):
        return "no bone"
    if isinstance(err, PreprocessingError):
        return "outside"
    if isinstance(err.__cause__, DamagedFileError) or "cannot be read" in text or "truncated" in text:
        return "damaged file"
    if "different patients" in text or "another patient" in text:
        return "other patient"
    if "single slice" in text or "localizer" in text or "multi-frame" in text:
        return "not a volume"
    if isinstance(err, DicomSelectionError):
        return "selection"
    if isinstance(err, (CTSeriesError, RTStructError)):
        return "unreadable"
    return "error"


def _write_volume(image: sitk.Image, path: Path) -> str:
    """Write geometry and voxels only: the DICOM meta-data the readers attach never reach the NIfTI header."""
    clean = sitk.Image(image)
    for key in clean.GetMetaDataKeys():
        clean.EraseMetaData(key)
    sitk.WriteImage(clean, str(path), useCompression=True)
    return path.name


def _contour_problem(contours: RTStructContents, what: str) -> tuple[str, str]:
    """``(category, reason)`` when contours lack a structure, else ``("", "")``."""
    if not contours.missing_structures:
        return "", ""
    unmapped = (
        f"; ROIs that map to no structure: {', '.join(map(repr, contours.unmapped_rois))}"
        if contours.unmapped_rois
        else ""
    )
    category = "unmapped roi" if contours.unmapped_rois else "missing structure"
    return category, f"{what} {contours.path} lacks {', '.join(contours.missing_structures)}{unmapped}"


def _daily_item(
    scan: DailyScan,
    plan: PatientPlan,
    planning: CTVolume,
    planning_labels: sitk.Image,
    folder: Path,
    pseudonym: str,
    settings: ImportSettings,
) -> tuple[ItemReport, dict[str, Any] | None]:
    """Check, align and write one daily scan; the report entry and the datalist item (``None`` when skipped)."""
    report = ItemReport(scan.fraction, "skipped", daily_ct=scan.series.describe(), notes=list(scan.notes))
    if scan.problem:
        report.reason, report.category = f"the daily CT {scan.series.describe()} is {scan.problem}", "not a volume"
        return report, None
    assert plan.planning is not None
    try:
        session = select_session(
            plan.inventory,
            rtstruct_sop_uid=plan.planning.rtstruct.sop_instance_uid,
            planning_series_uid=plan.planning.ct.series_instance_uid,
            daily_series_uid=scan.series.series_instance_uid,
        )
        daily = read_ct_series(session.daily_ct.files)
        rigid = RigidAlignment.from_result(align_on_bone(daily.image, planning.image))
        model_grid(daily.image, array_from_image(planning_labels), planning_labels, rigid.daily_to_planning, 1.0, 0.0)
    except (DicomSelectionError, CTSeriesError, NoBoneError, PreprocessingError) as err:
        report.reason, report.category = str(err), _category(err)
        return report, None
    report.rigid_residual_mm = rigid.residual
    if rigid.residual is not None and rigid.residual > settings.residual_limit_mm:
        report.notes.append(f"rigid residual {rigid.residual:.2f} mm above {settings.residual_limit_mm} mm: review")
    stem = f"{pseudonym}_f{scan.fraction:02d}"
    item: dict[str, Any] = {
        "fixed_image": f"{PATIENTS}/{pseudonym}/{_write_volume(daily.image, folder / f'{stem}_ct.nii.gz')}",
        "moving_image": f"{PATIENTS}/{pseudonym}/{pseudonym}_planning_ct.nii.gz",
        "moving_label": f"{PATIENTS}/{pseudonym}/{pseudonym}_planning_labels.nii.gz",
        "patient": pseudonym,
        "fraction": scan.fraction,
        "rigid": rigid.to_record(),
    }
    labels = _daily_labels(scan, daily, settings, report)
    if labels is not None:
        item["fixed_label"] = f"{PATIENTS}/{pseudonym}/{_write_volume(labels, folder / f'{stem}_labels.nii.gz')}"
    return report, item


def _daily_labels(scan: DailyScan, daily: CTVolume, settings: ImportSettings, report: ItemReport) -> sitk.Image | None:
    """The approved daily contours as a label map (status ``training``), or ``None`` and why (status ``inference``)."""
    report.status, report.category = "inference", "no contours"
    if scan.rtstruct is None:
        report.reason = "no approved daily RTSTRUCT of the patient references this daily CT"
        if scan.foreign_rtstructs:  # e.g. contours filed under the wrong patient: never combined
            report.category = "other patient"
            report.reason += f"; it is referenced by another patient's {', '.join(scan.foreign_rtstructs)}: not used"
        return None
    try:
        contours = read_rtstruct(scan.rtstruct.path, daily, settings.synonyms)
    except RTStructError as err:
        report.reason, report.category = f"daily RTSTRUCT not used: {err}", _category(err)
        return None
    report.category, report.reason = _contour_problem(contours, "the daily RTSTRUCT")
    if report.reason:
        return None
    report.status = "training"
    return contours.label_image()


def _read_planning(plan: PatientPlan, settings: ImportSettings) -> tuple[CTVolume, sitk.Image]:
    """The planning CT and its label map.

    Raises:
        CTSeriesError, RTStructError: if they cannot be read.
        _SkippedPatientError: if the planning contours lack a structure.
    """
    assert plan.planning is not None
    planning = read_ct_series(plan.planning.ct.files)
    contours = read_rtstruct(plan.planning.rtstruct.path, planning, settings.synonyms)
    category, reason = _contour_problem(contours, "the planning RTSTRUCT")
    if reason:
        raise _SkippedPatientError(category, reason)
    return planning, contours.label_image()


class _SkippedPatientError(Exception):
    """A patient that cannot be imported, with the report category."""

    def __init__(self, category: str, reason: str) -> None:
        super().__init__(reason)
        self.category = category


def import_patient(
    plan: PatientPlan, pseudonym: str, out_dir: str | os.PathLike[str], settings: ImportSettings, fingerprint: str = ""
) -> PatientReport:
    """Import one patient into ``out_dir/patients/<pseudonym>/`` (complete or not at all); never raises on bad input.

    Args:
        plan: the patient's planning choice and daily scans (:func:`prostate_jrs.datasets.archive.plan_patient`).
        pseudonym: the patient's pseudonym.
        out_dir: the dataset folder.
        settings: import settings.
        fingerprint: recorded in the report for the next run.

    Returns:
        The patient's report (status ``imported`` when at least one daily scan was written).
    """
    start = time.perf_counter()
    report = PatientReport(plan.patient_id, pseudonym, "skipped", notes=list(plan.notes), fingerprint=fingerprint)
    if plan.planning is not None:
        report.planning = f"{plan.planning.rtstruct.path} on CT series {plan.planning.ct.series_instance_uid}"
    if plan.problem:
        report.reason, report.category = plan.problem, plan.category
        return report
    patients = Path(out_dir) / PATIENTS
    patients.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{pseudonym}{_PARTIAL}", dir=patients))
    try:
        planning, planning_labels = _read_planning(plan, settings)
        items = []
        for scan in plan.dailies:
            item_report, item = _daily_item(scan, plan, planning, planning_labels, staging, pseudonym, settings)
            report.items.append(item_report)
            if item is not None:
                items.append(item)
        if not items:
            raise _SkippedPatientError(
                "no daily ct", "no daily CT of the patient could be imported (see the scans' reasons)"
            )
        _write_volume(planning.image, staging / f"{pseudonym}_planning_ct.nii.gz")
        _write_volume(planning_labels, staging / f"{pseudonym}_planning_labels.nii.gz")
        (staging / _ITEMS).write_text(json.dumps({"patient": pseudonym, "items": items}, indent=1))
        staging.chmod(0o755)
        _publish(staging, patients / pseudonym)
        report.status = "imported"
    except _SkippedPatientError as err:
        report.reason, report.category = str(err), err.category
    except (CTSeriesError, RTStructError, DicomSelectionError) as err:
        report.reason, report.category = str(err), _category(err)
    except Exception as err:  # one patient's unexpected failure must not lose the others' work
        report.reason, report.category = f"{type(err).__name__}: {err}", "error"
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        report.seconds = round(time.perf_counter() - start, 2)
    return report


def _publish(staging: Path, target: Path) -> None:
    """Move a complete patient folder into place, replacing an older import of the patient."""
    if target.exists():
        old = target.with_name(f".{target.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        target.rename(old)
        staging.rename(target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        staging.rename(target)


# --------------------------------------------------------------------------------------------------- the dataset


def _patient_items(out_dir: Path) -> dict[str, list[dict[str, Any]]]:
    """Items of every complete patient folder of the dataset, by pseudonym."""
    items: dict[str, list[dict[str, Any]]] = {}
    if not (out_dir / PATIENTS).is_dir():
        return items
    for folder in sorted((out_dir / PATIENTS).iterdir()):
        if folder.is_dir() and not folder.name.startswith(".") and (folder / _ITEMS).is_file():
            items[folder.name] = json.loads((folder / _ITEMS).read_text())["items"]
    return items


def dataset_split(out_dir: str | os.PathLike[str]) -> dict[str, str]:
    """Pseudonym -> list (``training``, ``validation``, ``test``) of the dataset's current ``datalist.json``."""
    path = Path(out_dir) / "datalist.json"
    content = json.loads(path.read_text()) if path.is_file() else {}
    return {item["patient"]: part for part in ("training", "validation", "test") for item in content.get(part, [])}


def write_datalist(
    out_dir: str | os.PathLike[str], settings: ImportSettings, keep: Mapping[str, str] | None = None
) -> Path:
    """Write ``datalist.json`` from the complete patient folders (atomically; not at all when unchanged).

    Items with daily contours go to ``training`` / ``validation`` / ``test`` by patient: patients in ``keep`` (the
    split of the dataset before this run, :func:`dataset_split`) stay in their list, the others are split among
    themselves (:func:`prostate_jrs.datasets.splits.split_patients`). Items without daily contours go to
    ``inference``.

    Returns:
        The path of ``datalist.json``.
    """
    out_dir = Path(out_dir)
    path = out_dir / "datalist.json"
    items = _patient_items(out_dir)
    assigned = dict(keep or {})
    contoured = [pid for pid, mine in items.items() if any("fixed_label" in item for item in mine)]
    new = [pid for pid in contoured if pid not in assigned]
    split = split_patients(new, settings.seed, settings.validation_fraction, settings.test_fraction)
    assigned.update({pid: part for part, pids in split.items() for pid in pids})
    datalist: dict[str, Any] = {
        "name": DATASET_NAME,
        "description": "Planning and daily CT pairs imported from a DICOM archive (pseudonymised)",
        "seed": settings.seed,
        "modality": {"0": "CT"},
        "labels": {str(k): v for k, v in LABEL_NAMES.items()},
        "rigid_convention": RIGID_CONVENTION,
    }
    for part in ("training", "validation", "test"):
        datalist[part] = [
            item for pid, mine in items.items() if assigned.get(pid) == part for item in mine if "fixed_label" in item
        ]
    datalist["inference"] = [item for mine in items.values() for item in mine if "fixed_label" not in item]
    text = json.dumps(datalist, indent=2)
    if path.is_file() and path.read_text() == text:
        return path  # unchanged: a run with nothing to do writes nothing
    tmp = out_dir / ".datalist.json.tmp"
    tmp.write_text(text)
    tmp.replace(path)
    return path


def _check_out_dir(out_dir: Path, root: Path) -> None:
    """Refuse an output folder that is not (yet) an imported dataset, or lies inside the archive.

    Raises:
        FileExistsError: if ``out_dir`` holds something else.
        ValueError: if ``out_dir`` is inside ``root``.
    """
    if out_dir.resolve().is_relative_to(root.resolve()):
        raise ValueError(f"{out_dir}: the dataset folder must not lie inside the archive {root}")
    if not out_dir.exists() or not any(out_dir.iterdir()):
        return
    datalist = out_dir / "datalist.json"
    try:
        ours = json.loads(datalist.read_text()).get("name") == DATASET_NAME
    except (OSError, ValueError):
        ours = False
    if not ours:
        raise FileExistsError(
            f"{out_dir} exists and is not a dataset written by `prostate-jrs import` (no {datalist.name} of "
            "one); choose a new output folder, or the folder of an earlier import to resume it"
        )


def _fingerprint(plan: PatientPlan, settings: ImportSettings) -> str:
    """Hash of the patient's source files (path, size, modification time) and the settings that shape the output."""
    digest = hashlib.sha256(settings.fingerprint(plan.patient_id).encode())
    for path in plan.files():
        stat = path.stat()
        digest.update(f"{path}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _init_worker(threads: int) -> None:
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)


def _run(
    tasks: list[tuple[PatientPlan, str, str]],
    out_dir: Path,
    settings: ImportSettings,
    workers: int,
    on_done: Any,
) -> None:
    """Import the patients of ``tasks`` (plan, pseudonym, fingerprint), in ``workers`` processes when more than one."""
    if workers <= 1 or len(tasks) <= 1:
        for plan, pseudonym, fingerprint in tasks:
            on_done(import_patient(plan, pseudonym, out_dir, settings, fingerprint))
        return
    threads = max(1, (os.cpu_count() or 1) // workers)
    context = multiprocessing.get_context("spawn")  # no fork of a process with SimpleITK/torch threads running
    with concurrent.futures.ProcessPoolExecutor(
        workers, mp_context=context, initializer=_init_worker, initargs=(threads,)
    ) as pool:
        futures = [pool.submit(import_patient, plan, p, out_dir, settings, f) for plan, p, f in tasks]
        for future in concurrent.futures.as_completed(futures):
            on_done(future.result())


def _prepare(root: Path, out_dir: Path, private: Path) -> None:
    """Check and create the output folders; remove what a killed run left half-written.

    Raises:
        FileNotFoundError: if ``root`` is not a folder.
        FileExistsError, ValueError: if ``out_dir`` or ``private`` cannot be used.
    """
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: not a folder; expected the root folder of a DICOM archive export")
    _check_out_dir(out_dir, root)
    if private.resolve().is_relative_to(out_dir.resolve()):
        raise ValueError(f"{private}: the private folder (pseudonym key, report) must lie outside the dataset")
    out_dir.mkdir(parents=True, exist_ok=True)
    private.mkdir(parents=True, exist_ok=True, mode=0o700)
    (private / "README.txt").write_text(_PRIVATE_README)
    for stale in out_dir.glob(f"{PATIENTS}/.*{_PARTIAL}*"):
        shutil.rmtree(stale, ignore_errors=True)


def _resumed(
    plan: PatientPlan, previous: Mapping[str, PatientReport], out_dir: Path, pseudonym: str, fingerprint: str
) -> PatientReport | None:
    """The previous run's report of the patient when nothing changed since (then the patient needs no work)."""
    done = previous.get(plan.patient_id)
    if done is None or done.fingerprint != fingerprint or done.pseudonym != pseudonym:
        return None
    if done.status == "imported" and not (out_dir / PATIENTS / pseudonym / _ITEMS).is_file():
        return None  # the dataset lost the patient's folder: import again
    done.resumed = True
    return done


def import_archive(
    root: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    private_dir: str | os.PathLike[str] | None = None,
    settings: ImportSettings | None = None,
    workers: int = 1,
    show_progress: bool | None = None,
) -> ImportResult:
    """Import every patient of a DICOM archive export into a dataset folder (module docstring).

    Args:
        root: the archive export's root folder (searched recursively).
        out_dir: the dataset folder: new, empty, or an earlier import to resume.
        private_dir: folder of the pseudonym key and the report; default ``out_dir`` + ``-private`` beside it.
        settings: import settings.
        workers: patients imported in parallel (processes).
        show_progress: progress bar on stderr; ``None`` shows it on a terminal only.

    Returns:
        Paths written and the per-patient reports.

    Raises:
        FileNotFoundError: if ``root`` is not a folder.
        FileExistsError: if ``out_dir`` holds something else than an earlier import.
        ValueError: if ``out_dir`` lies inside ``root``, the private folder inside ``out_dir``, or a setting is bad.
    """
    from tqdm import tqdm

    settings = settings or ImportSettings()
    root, out_dir = Path(root), Path(out_dir)
    private = Path(private_dir) if private_dir is not None else out_dir.with_name(f"{out_dir.name}-private")
    _prepare(root, out_dir, private)
    inventory = scan_archive(root)
    plans = _plan_patients(inventory, settings)
    key = PseudonymKey(private / "pseudonym_key.csv")
    pseudonyms = {plan.patient_id: key.pseudonym(plan.patient_id) for plan in plans}
    key.save()  # before any file is written under a pseudonym
    previous, reports, tasks, keep = read_report(private), {}, [], dataset_split(out_dir)
    for plan in plans:
        fingerprint, pseudonym = _fingerprint(plan, settings), pseudonyms[plan.patient_id]
        done = _resumed(plan, previous, out_dir, pseudonym, fingerprint)
        if done is not None:
            reports[plan.patient_id] = done
        else:
            tasks.append((plan, pseudonym, fingerprint))
    archive = _archive_summary(root, inventory)
    bar = tqdm(total=len(plans), initial=len(reports), unit="patient", desc="import", disable=_disabled(show_progress))

    def on_done(report: PatientReport) -> None:
        reports[report.patient_key] = report
        write_datalist(out_dir, settings, keep)  # the dataset is usable after every patient
        write_report(reports.values(), private, archive)
        bar.update(1)

    with bar:
        _run(tasks, out_dir, settings, workers, on_done)
    datalist = write_datalist(out_dir, settings, keep)
    files = write_report(reports.values(), private, archive)
    return ImportResult(out_dir, datalist, private, sorted(reports.values(), key=lambda r: r.patient_key), files)


def _plan_patients(inventory: DicomInventory, settings: ImportSettings) -> list[PatientPlan]:
    """What to import of each patient of the archive (planning choice by the settings' rule and overrides)."""
    return [
        plan_patient(
            pid, part, archive_structure_sets=inventory.structure_sets, rule=settings.planning_rule,
            override=settings.planning_overrides.get(pid),
        )
        for pid, part in patient_inventories(inventory).items()
    ]  # fmt: skip


def _archive_summary(root: Path, inventory: DicomInventory) -> dict[str, Any]:
    """What the report says about the archive as a whole: files that were not read, and why."""
    return {
        "root": str(root),
        "non_dicom_files": [str(p) for p in inventory.non_dicom_files],
        "duplicate_files": len(inventory.duplicate_files),
        "dicomdir_files": [str(p) for p in inventory.dicomdir_files],
        "hidden": [str(p) for p in inventory.hidden],
    }


def _disabled(show_progress: bool | None) -> bool | None:
    return None if show_progress is None else not show_progress
