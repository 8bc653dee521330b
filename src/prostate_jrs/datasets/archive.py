"""Which patients, planning scans and daily scans a hospital's DICOM archive export holds.

:func:`scan_archive` reads the headers of every file under the export's root once
(:func:`prostate_jrs.dicom.discovery.scan_folder`: nested folders, other modalities, duplicate exports, non-DICOM and
damaged files) and :func:`patient_inventories` splits the result by patient (Patient ID and Issuer of Patient ID; a
series is never combined with another patient's, whatever folder it sits in). :func:`plan_patient` then decides, for
one patient:

* the **planning RTSTRUCT and CT**. The rule (``--planning-rule``), in order:

  1. an override for the patient (``--planning FILE``: Patient ID -> SOP Instance UID of the planning RTSTRUCT);
  2. ``rtplan`` (default): the structure set the patient's latest RTPLAN references (Referenced Structure Set
     Sequence), if it is in the archive; the CT is the one that structure set references;
  3. ``earliest`` (also the fallback of ``rtplan``): the earliest CT series (acquisition, else series, else study
     date) that an approved or unlabelled RTSTRUCT references, and the latest such RTSTRUCT on it.

* every **daily CT**: each other CT volume of the patient outside the planning CT's frame of reference (a series in
  that frame is another reconstruction of the planning scan), in order of acquisition = fraction 1, 2, ...; with
  its **approved daily RTSTRUCT** when one references it (the latest; one with Approval Status UNAPPROVED or REJECTED
  is never used), else it is a scan for the inference-only list. CT series that are no volume (one slice, a
  localizer, multi-frame) are listed as skipped with the reason; RTSTRUCTs of another patient that reference a
  daily CT are listed and never used.

:func:`prostate_jrs.dicom.discovery.select_session` then checks each (planning, daily) pair exactly as the app does
(same patient, frames of reference, complete series, damaged files).
"""

from __future__ import annotations

import datetime as dt
import os
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from prostate_jrs.dicom.discovery import (
    DicomInventory,
    DicomSelectionError,
    SeriesInfo,
    StructureSetInfo,
    UnreadableFile,
    not_a_volume,
    scan_folder,
)

__all__ = [
    "PLANNING_RULES",
    "DailyScan",
    "PatientPlan",
    "PlanningChoice",
    "patient_inventories",
    "plan_patient",
    "scan_archive",
]

PLANNING_RULES = ("rtplan", "earliest")
"""Rules for the planning structure set (module docstring)."""


@dataclass(frozen=True)
class PlanningChoice:
    """The planning RTSTRUCT and CT chosen for a patient, and by which rule."""

    rtstruct: StructureSetInfo
    ct: SeriesInfo
    rule: str


@dataclass
class DailyScan:
    """One daily CT of a patient.

    Args:
        fraction: 1-based number in order of acquisition among the patient's daily CTs.
        series: the daily CT series.
        rtstruct: its approved daily RTSTRUCT, or ``None``.
        problem: why the scan cannot be imported (e.g. a single slice), or ``""``.
        foreign_rtstructs: RTSTRUCTs of other patients that reference the scan (never used), described.
        notes: what was chosen or left out about it (e.g. an unapproved RTSTRUCT).
    """

    fraction: int
    series: SeriesInfo
    rtstruct: StructureSetInfo | None = None
    problem: str = ""
    foreign_rtstructs: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@dataclass
class PatientPlan:
    """What :func:`plan_patient` found for one patient.

    Args:
        patient_id: Patient ID (the key for the pseudonym).
        inventory: the patient's part of the archive.
        planning: the planning choice, or ``None`` when there is none (then ``problem`` says why).
        dailies: every daily CT, in fraction order.
        problem: why the patient cannot be imported at all, or ``""``.
        category: the problem's report category (``no rtstruct``, ``not a volume``, ``no daily ct``), or ``""``.
        notes: what was chosen or left out, for the report.
    """

    patient_id: str
    inventory: DicomInventory
    planning: PlanningChoice | None
    dailies: list[DailyScan]
    problem: str = ""
    category: str = ""
    notes: list[str] = field(default_factory=list)

    def files(self) -> list[Path]:
        """Every file of the patient (series, structure sets, damaged files), for the resume fingerprint."""
        paths = [f for s in self.inventory.series.values() for f in s.files]
        paths += [s.path for s in self.inventory.structure_sets] + [u.path for u in self.inventory.unreadable_files]
        return sorted(paths)


def scan_archive(root: str | os.PathLike[str]) -> DicomInventory:
    """Read the headers of every file under an archive export's root (no pixel data).

    Raises:
        FileNotFoundError: if ``root`` is not a folder.
        DicomSelectionError: if one series holds two patients (corrupt input: never guessed).
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: not a folder; expected the root folder of a DICOM archive export")
    return scan_folder(root)


def _patient_key(patient_id: str, issuer: str) -> str:
    return patient_id if not issuer else f"{patient_id} ({issuer})"


def _owner_of_damaged(damaged: UnreadableFile, inventory: DicomInventory, folders: Mapping[Path, set[str]]) -> set[str]:
    """Patients a damaged file may belong to: by its intact Patient ID or series, else by the folder it sits in."""
    if damaged.series_instance_uid in inventory.series:
        series = inventory.series[damaged.series_instance_uid]
        return {_patient_key(series.patient_id, series.issuer_of_patient_id)}
    if damaged.patient_id:
        keys = {
            _patient_key(s.patient_id, s.issuer_of_patient_id)
            for s in inventory.series.values()
            if s.patient_id == damaged.patient_id
        }
        return keys or {damaged.patient_id}
    return set(folders.get(damaged.path.parent, set()))


def patient_inventories(inventory: DicomInventory) -> dict[str, DicomInventory]:
    """Split an archive's inventory by patient (key: Patient ID, with the issuer in brackets when given).

    A damaged file goes to the patient its intact elements name; one that names nobody goes to the patients whose
    files share its folder (there it may be a missing slice), or to none.
    """
    parts: dict[str, DicomInventory] = {}

    def part(key: str) -> DicomInventory:
        return parts.setdefault(key, DicomInventory(folder=inventory.folder))

    folders: dict[Path, set[str]] = defaultdict(set)
    for uid, series in inventory.series.items():
        key = _patient_key(series.patient_id, series.issuer_of_patient_id)
        part(key).series[uid] = series
        for path in series.files:
            folders[path.parent].add(key)
    for structure_set in inventory.structure_sets:
        key = _patient_key(structure_set.patient_id, structure_set.issuer_of_patient_id)
        part(key).structure_sets.append(structure_set)
        folders[structure_set.path.parent].add(key)
    for damaged in inventory.unreadable_files:
        for key in _owner_of_damaged(damaged, inventory, folders):
            part(key).unreadable_files.append(damaged)
    for duplicate in inventory.duplicate_files:
        for key in folders.get(duplicate.parent, set()):
            part(key).duplicate_files.append(duplicate)
    return dict(sorted(parts.items()))


def _when(value: dt.datetime | None) -> tuple[bool, dt.datetime]:
    """Sort key: undated first, then by date and time."""
    return (value is not None, value or dt.datetime.min)


def _usable(structure_set: StructureSetInfo) -> bool:
    """An RTSTRUCT that may hold approved contours: approved, or without an Approval Status."""
    return structure_set.approval_status in ("", "APPROVED")


def _on_series(structure_set: StructureSetInfo, series: SeriesInfo, inventory: DicomInventory) -> bool:
    """Whether ``structure_set`` was drawn on ``series``: by its series reference, else by the frame of reference
    when that frame holds only this CT series."""
    if structure_set.referenced_series_uids:
        return series.series_instance_uid in structure_set.referenced_series_uids
    if series.frame_of_reference_uid not in structure_set.frame_of_reference_uids:
        return False
    frame = series.frame_of_reference_uid
    return sum(s.modality == "CT" and s.frame_of_reference_uid == frame for s in inventory.series.values()) == 1


def _latest(structure_sets: list[StructureSetInfo]) -> StructureSetInfo:
    return max(structure_sets, key=lambda s: (*_when(s.datetime), s.path.name))


def _ct_of(structure_set: StructureSetInfo, inventory: DicomInventory) -> SeriesInfo | None:
    cts = [s for s in inventory.series.values() if s.modality == "CT" and _on_series(structure_set, s, inventory)]
    return cts[0] if len(cts) == 1 else None


def _choose_planning(inventory: DicomInventory, rule: str, override: str | None, notes: list[str]) -> PlanningChoice:
    """The planning RTSTRUCT and CT of one patient (module docstring).

    Raises:
        DicomSelectionError: if there is no RTSTRUCT, or none that references a CT of the patient.
    """
    by_uid = {s.sop_instance_uid: s for s in inventory.structure_sets}
    if override is not None:
        chosen = by_uid.get(override)
        if chosen is None:
            raise DicomSelectionError(f"the planning override names RTSTRUCT {override}, which is not in the archive")
        ct = _ct_of(chosen, inventory)
        if ct is None:
            raise DicomSelectionError(
                f"{chosen.path}: the planning override's RTSTRUCT references no CT in the archive"
            )
        return PlanningChoice(chosen, ct, "override")
    if not inventory.structure_sets:
        raise DicomSelectionError("no RTSTRUCT: expected a planning structure set (Modality RTSTRUCT)")
    if rule == "rtplan":
        plans = sorted(
            (s for s in inventory.series.values() if s.modality == "RTPLAN" and s.referenced_structure_sets),
            key=lambda s: _when(s.plan_datetime or s.datetime),
        )
        for plan in reversed(plans):
            referenced = [by_uid[uid] for uid in plan.referenced_structure_sets if uid in by_uid]
            ct = _ct_of(referenced[0], inventory) if referenced else None
            if ct is not None:
                return PlanningChoice(referenced[0], ct, "rtplan")
            notes.append(f"RTPLAN series {plan.series_instance_uid} references no structure set on a CT in the archive")
    candidates = []
    for series in inventory.series.values():
        drawn = [s for s in inventory.structure_sets if _usable(s) and _on_series(s, series, inventory)]
        if series.modality == "CT" and drawn:
            candidates.append((series, _latest(drawn)))
    if not candidates:
        found = ", ".join(
            f"{s.path} ({s.label!r}, {s.approval_status or 'no approval status'})" for s in inventory.structure_sets
        )
        raise DicomSelectionError(
            f"no approved RTSTRUCT references a CT series of the patient in the archive; found RTSTRUCTs {found}"
        )
    # undated CTs last: the planning scan is the earliest one known to be
    series, structure_set = min(candidates, key=lambda c: (c[0].datetime is None, c[0].datetime or dt.datetime.min))
    return PlanningChoice(structure_set, series, "earliest")


def _daily_scan(
    fraction: int,
    series: SeriesInfo,
    inventory: DicomInventory,
    planning: PlanningChoice,
    archive_structure_sets: Sequence[StructureSetInfo],
) -> DailyScan:
    """One daily CT with its approved RTSTRUCT (if any) and what was left out about it."""
    scan = DailyScan(fraction, series, problem=not_a_volume(series))
    drawn = [
        s
        for s in inventory.structure_sets
        if s.sop_instance_uid != planning.rtstruct.sop_instance_uid and _on_series(s, series, inventory)
    ]
    for structure_set in drawn:
        if not _usable(structure_set):
            scan.notes.append(f"RTSTRUCT {structure_set.path} is {structure_set.approval_status}: not used as contours")
    approved = [s for s in drawn if _usable(s)]
    if approved:
        scan.rtstruct = _latest(approved)
        if len(approved) > 1:
            scan.notes.append(f"took the latest of {len(approved)} daily RTSTRUCTs: {scan.rtstruct.path}")
    for structure_set in archive_structure_sets:
        if (
            structure_set.patient_id != series.patient_id
            and series.series_instance_uid in structure_set.referenced_images
        ):
            scan.foreign_rtstructs.append(f"RTSTRUCT {structure_set.path} of PatientID {structure_set.patient_id!r}")
    return scan


def plan_patient(
    patient_id: str,
    inventory: DicomInventory,
    *,
    archive_structure_sets: Sequence[StructureSetInfo] = (),
    rule: str = "rtplan",
    override: str | None = None,
) -> PatientPlan:
    """Planning choice and daily scans of one patient (module docstring); problems are reported, never raised.

    Args:
        patient_id: the patient's key (:func:`patient_inventories`).
        inventory: the patient's part of the archive.
        archive_structure_sets: every RTSTRUCT of the archive (to report other patients' RTSTRUCTs on these scans).
        rule: ``rtplan`` or ``earliest`` (:data:`PLANNING_RULES`).
        override: SOP Instance UID of the planning RTSTRUCT for this patient, overriding the rule.

    Raises:
        ValueError: on an unknown rule.
    """
    if rule not in PLANNING_RULES:
        raise ValueError(f"unknown planning rule {rule!r}; expected one of {', '.join(PLANNING_RULES)}")
    notes: list[str] = []
    try:
        planning = _choose_planning(inventory, rule, override, notes)
    except DicomSelectionError as err:
        cts = [s.describe() for s in inventory.series.values() if s.modality == "CT"]
        where = f"; CT series: {'; '.join(cts)}" if cts else ""
        return PatientPlan(patient_id, inventory, None, [], f"{err}{where}", "no rtstruct", notes)
    why_not = not_a_volume(planning.ct)
    if why_not:
        problem = f"the planning CT {planning.ct.describe()} of {planning.rtstruct.path} is {why_not}"
        return PatientPlan(patient_id, inventory, planning, [], problem, "not a volume", notes)
    notes.append(f"planning RTSTRUCT {planning.rtstruct.path} on {planning.ct.describe()} (rule: {planning.rule})")
    dailies = []
    for series in inventory.series.values():
        if series.modality != "CT" or series.series_instance_uid == planning.ct.series_instance_uid:
            continue
        if series.frame_of_reference_uid and series.frame_of_reference_uid == planning.ct.frame_of_reference_uid:
            notes.append(f"left out {series.describe()}: in the planning CT's frame of reference (a reconstruction?)")
        elif series.is_localizer:
            notes.append(f"left out {series.describe()}: a localizer")
        else:
            dailies.append(series)
    dailies.sort(key=lambda s: (*_when(s.datetime), s.series_instance_uid))
    scans = [_daily_scan(k, s, inventory, planning, archive_structure_sets) for k, s in enumerate(dailies, start=1)]
    if not scans:
        return PatientPlan(
            patient_id, inventory, planning, [], problem="no daily CT besides the planning CT", notes=notes
        )
    return PatientPlan(patient_id, inventory, planning, scans, notes=notes)
