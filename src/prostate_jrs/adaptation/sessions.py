"""Approved fractions of one patient, read from DICOM folders: what ``prostate-jrs adapt`` learns from.

An *approved fraction* is a daily CT whose contours a clinician approved, with the planning CT and planning
RTSTRUCT it was treated from. Each folder given to :func:`read_approved_fractions` is scanned once (headers only,
:func:`prostate_jrs.dicom.discovery.scan_folder`), split by patient and planned as ``prostate-jrs import`` plans an
archive (:func:`prostate_jrs.datasets.archive.plan_patient`: the planning structure set by the RTPLAN, else the
earliest contoured CT; every other CT volume is a daily scan, with its latest approved daily RTSTRUCT when one
references it). Every daily scan with approved contours is then read as the app reads a session
(:func:`prostate_jrs.dicom_session.load_session`, same selection and safety checks) and its daily RTSTRUCT
rasterised on it with the same synonym table. A folder may hold one fraction (planning CT + RTSTRUCT + daily CT +
approved daily RTSTRUCT, the usual export of one session) or several; the same daily CT found twice is used once.

Safety: all fractions must be of one patient (Patient ID and Issuer of Patient ID; series of other patients in a
folder are left out with a note); approved daily contours must give all four structures (a missing structure would
teach the network that it is background).
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import SimpleITK as sitk

from prostate_jrs.adaptation.patient_bundle import patient_key
from prostate_jrs.datasets.archive import DailyScan, PatientPlan, patient_inventories, plan_patient
from prostate_jrs.dicom.discovery import DicomSelectionError, scan_folder
from prostate_jrs.dicom.rtstruct_reader import RTStructError, read_rtstruct
from prostate_jrs.dicom_session import SessionInputs, load_session
from prostate_jrs.labels import SynonymTable

__all__ = ["ApprovedFraction", "read_approved_fractions"]


@dataclass
class ApprovedFraction:
    """One approved fraction: the session as the app reads it, plus the approved daily contours.

    Args:
        folder: the folder it was found in.
        inputs: planning CT, planning label map and daily CT (:func:`prostate_jrs.dicom_session.load_session`).
        daily_labels: the approved daily contours as a label map (0..4) on the daily CT's grid.
        daily_rtstruct_uid: SOP Instance UID of the approved daily RTSTRUCT.
        acquired: when the daily CT was acquired (``None`` if undated).
        notes: what was chosen or left out.
    """

    folder: Path
    inputs: SessionInputs
    daily_labels: sitk.Image
    daily_rtstruct_uid: str
    acquired: dt.datetime | None
    notes: list[str] = field(default_factory=list)

    @property
    def patient(self) -> tuple[str, str]:
        """``(Patient ID, Issuer of Patient ID)`` of the planning CT (the daily CT's are the same: checked)."""
        planning = self.inputs.planning.datasets[0]
        return str(planning.get("PatientID", "")), str(planning.get("IssuerOfPatientID", ""))

    @property
    def patient_key(self) -> str:
        """Patient ID with the issuer (:func:`prostate_jrs.adaptation.patient_bundle.patient_key`)."""
        return patient_key(*self.patient)

    @property
    def uids(self) -> dict[str, str]:
        """The DICOM UIDs of the fraction's four inputs."""
        session = self.inputs.session
        return {
            "planning_ct": session.planning_ct.series_instance_uid,
            "planning_rtstruct": session.planning_rtstruct.sop_instance_uid,
            "daily_ct": session.daily_ct.series_instance_uid,
            "daily_rtstruct": self.daily_rtstruct_uid,
        }


def _approved_scans(folder: Path) -> list[tuple[str, PatientPlan, DailyScan]]:
    """``(patient key, plan, daily scan)`` of every daily scan with approved contours in ``folder``."""
    inventory = scan_folder(folder)
    found = []
    for key, part in patient_inventories(inventory).items():
        plan = plan_patient(key, part, archive_structure_sets=inventory.structure_sets)
        if plan.planning is None:
            continue
        found += [(key, plan, scan) for scan in plan.dailies if scan.rtstruct is not None and not scan.problem]
    return found


def _read_fraction(folder: Path, plan: PatientPlan, scan: DailyScan, synonyms: SynonymTable | None) -> ApprovedFraction:
    """Read one approved fraction as the app reads its session, plus its daily contours.

    Raises:
        RTStructError: if the daily contours lack one of the four structures.
    """
    assert plan.planning is not None and scan.rtstruct is not None
    inputs = load_session(
        folder,
        synonyms=synonyms,
        daily_series_uid=scan.series.series_instance_uid,
        rtstruct_sop_uid=plan.planning.rtstruct.sop_instance_uid,
    )
    contours = read_rtstruct(scan.rtstruct.path, inputs.daily, synonyms)
    if contours.missing_structures:
        unmapped = (
            f"; ROIs mapping to no structure: {', '.join(contours.unmapped_rois)}" if contours.unmapped_rois else ""
        )
        raise RTStructError(
            f"{scan.rtstruct.path}: the approved daily contours lack {', '.join(contours.missing_structures)}"
            f"{unmapped}; expected all four structures (a missing one would be learnt as background). Extend the "
            "synonym table, or leave this fraction out"
        )
    notes = [*plan.notes, *scan.notes, *inputs.notes, *contours.notes]
    return ApprovedFraction(
        folder, inputs, contours.label_image(), scan.rtstruct.sop_instance_uid, scan.series.datetime, notes
    )


def read_approved_fractions(
    folders: Sequence[str | os.PathLike[str]],
    *,
    synonyms: SynonymTable | None = None,
    progress: Callable[[str], None] | None = None,
) -> list[ApprovedFraction]:
    """Every approved fraction of one patient in ``folders``, in order of acquisition.

    Args:
        folders: DICOM folders (searched recursively), each holding one or more approved fractions.
        synonyms: ROI name -> structure table; ``None`` for the default.
        progress: called with a short message per fraction read.

    Returns:
        The fractions, oldest first.

    Raises:
        FileNotFoundError: if a folder does not exist.
        DicomSelectionError: if a folder holds no approved fraction, or the folders hold approved fractions of more
            than one patient.
        CTSeriesError, RTStructError: if a series or structure set cannot be read, or daily contours lack a structure.
    """
    found: dict[str, tuple[Path, str, PatientPlan, DailyScan]] = {}
    given = [Path(folder) for folder in folders]
    for folder in given:
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder}: not a folder; expected a DICOM folder of an approved fraction")
        scans = _approved_scans(folder)
        if not scans:
            raise DicomSelectionError(
                f"{folder}: no approved fraction; expected a planning CT + planning RTSTRUCT and a daily CT with an "
                "approved daily RTSTRUCT (Approval Status APPROVED or absent) that references it"
            )
        for key, plan, scan in scans:
            found.setdefault(scan.series.series_instance_uid, (folder, key, plan, scan))
    patients = sorted({key for _, key, _, _ in found.values()})
    if len(patients) > 1:
        where = {key: sorted({str(f) for f, k, _, _ in found.values() if k == key}) for key in patients}
        raise DicomSelectionError(
            f"approved fractions of {len(patients)} patients: "
            + "; ".join(f"PatientID {key!r} in {', '.join(paths)}" for key, paths in where.items())
            + "; a patient bundle learns from one patient's fractions only"
        )
    ordered = sorted(
        found.values(), key=lambda f: (f[3].series.datetime is None, f[3].series.datetime or dt.datetime.min)
    )
    fractions = []
    for folder, _, plan, scan in ordered:
        fractions.append(_read_fraction(folder, plan, scan, synonyms))
        if progress is not None:
            # the folder's place in ``folders``, not its name: names often carry the Patient ID
            progress(
                f"approved fraction {len(fractions)} of {len(ordered)} read (session folder {given.index(folder) + 1})"
            )
    return fractions
