"""What ``prostate-jrs import`` imported and skipped, per patient and per daily scan, and why.

The report names source files, UIDs and Patient IDs, so that the site can find and fix what was skipped: it is
written beside the pseudonym key (the private folder the site keeps), never into the dataset. Two forms with the
same content: ``import_report.json`` (one object per patient, read again by the next run to resume) and
``import_report.csv`` (one row per daily scan, and one per patient with no scan imported).

Statuses: a patient is ``imported`` (at least one daily scan written) or ``skipped``; a daily scan is ``training``
(written with its approved daily contours: it goes to training / validation / test), ``inference`` (written without
contours: the inference-only list) or ``skipped``. ``resumed`` marks patients the run left as they were. Each reason
comes with a short ``category`` (:data:`CATEGORIES`), which the console summary prints with the pseudonym only.
"""

from __future__ import annotations

import csv
import dataclasses
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "CATEGORIES",
    "CSV_COLUMNS",
    "ItemReport",
    "PatientReport",
    "read_report",
    "summary_lines",
    "write_report",
]

CATEGORIES = {
    "no rtstruct": "no planning RTSTRUCT on a CT of the patient",
    "no daily ct": "no daily CT besides the planning CT",
    "no contours": "no approved daily RTSTRUCT (the scan goes to the inference list)",
    "unmapped roi": "ROI names that map to no structure (extend the synonym table: --synonyms FILE)",
    "missing structure": "a structure has no contour",
    "damaged file": "a truncated or corrupt file of the series",
    "not a volume": "one slice, a localizer or a multi-frame image",
    "other patient": "series or RTSTRUCT of another patient",
    "selection": "planning and daily scans do not fit together (frames of reference, references, incomplete series)",
    "no bone": "too little bone for the rigid pre-alignment",
    "outside": "the planning contours miss the daily CT after the rigid alignment",
    "unreadable": "a series or RTSTRUCT that cannot be read",
    "error": "an unexpected error (a bug: please report it)",
}
"""Reason categories of skipped patients and scans, and scans without contours."""

CSV_COLUMNS = (
    "patient_key",
    "pseudonym",
    "patient_status",
    "resumed",
    "fraction",
    "status",
    "category",
    "reason",
    "daily_ct",
    "rigid_residual_mm",
)


@dataclass
class ItemReport:
    """One daily scan.

    Args:
        fraction: its fraction number (order of acquisition among the patient's daily CTs).
        status: ``training``, ``inference`` or ``skipped``.
        reason: why it is not ``training`` (no approved contours, missing structures, damaged file, ...), or ``""``.
        category: the reason's category (:data:`CATEGORIES`), or ``""``.
        daily_ct: the source series (UID, description, date, first file).
        rigid_residual_mm: bone surface RMS residual of the rigid pre-alignment, when aligned.
        notes: other remarks (e.g. an unapproved RTSTRUCT left out).
    """

    fraction: int
    status: str
    reason: str = ""
    category: str = ""
    daily_ct: str = ""
    rigid_residual_mm: float | None = None
    notes: list[str] = field(default_factory=list)


@dataclass
class PatientReport:
    """One patient.

    Args:
        patient_key: Patient ID (with the issuer when given).
        pseudonym: the patient's pseudonym in the dataset.
        status: ``imported`` or ``skipped``.
        reason: why the patient was skipped, or ``""``.
        category: the reason's category (:data:`CATEGORIES`), or ``""``.
        planning: the planning RTSTRUCT and CT chosen, and by which rule.
        items: one entry per daily scan.
        notes: what discovery chose or left out.
        fingerprint: of the patient's source files and the settings; an unchanged fingerprint is not imported again.
        seconds: wall time of the patient's import in the run that did it.
        resumed: the run found the patient done (same fingerprint) and did nothing.
    """

    patient_key: str
    pseudonym: str
    status: str
    reason: str = ""
    category: str = ""
    planning: str = ""
    items: list[ItemReport] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    fingerprint: str = ""
    seconds: float = 0.0
    resumed: bool = False

    @classmethod
    def from_dict(cls, record: dict[str, Any]) -> PatientReport:
        """Inverse of :func:`dataclasses.asdict`."""
        items = [ItemReport(**item) for item in record.get("items", [])]
        return cls(**{**record, "items": items})

    def rows(self) -> list[dict[str, object]]:
        """CSV rows: one per daily scan, or one for the patient when it has none."""
        base = {
            "patient_key": self.patient_key,
            "pseudonym": self.pseudonym,
            "patient_status": self.status,
            "resumed": self.resumed,
        }
        if not self.items:
            return [{**base, "fraction": "", "status": self.status, "category": self.category, "reason": self.reason}]
        return [
            {
                **base,
                "fraction": item.fraction,
                "status": item.status,
                "category": item.category,
                "reason": item.reason,
                "daily_ct": item.daily_ct,
                "rigid_residual_mm": "" if item.rigid_residual_mm is None else round(item.rigid_residual_mm, 3),
            }
            for item in self.items
        ]


def write_report(reports: Iterable[PatientReport], folder: str | Path, archive: dict[str, Any]) -> tuple[Path, Path]:
    """Write ``import_report.json`` and ``import_report.csv`` into ``folder`` (each completely or not at all).

    Args:
        reports: one per patient.
        folder: the private folder.
        archive: archive-level facts (root, files skipped as non-DICOM, duplicates, damaged files of no patient).

    Returns:
        The JSON and CSV paths.
    """
    folder = Path(folder)
    ordered = sorted(reports, key=lambda r: r.patient_key)
    document = {"archive": archive, "patients": [dataclasses.asdict(r) for r in ordered]}
    json_path = folder / "import_report.json"
    tmp = folder / ".import_report.json.tmp"
    tmp.write_text(json.dumps(document, indent=1), encoding="utf-8")
    tmp.replace(json_path)
    # not prostate_jrs.evaluation.write_csv: it would bring torch and MONAI into a command that needs neither
    csv_path, tmp = folder / "import_report.csv", folder / ".import_report.csv.tmp"
    with tmp.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(row for report in ordered for row in report.rows())
    tmp.replace(csv_path)
    return json_path, csv_path


def read_report(folder: str | Path) -> dict[str, PatientReport]:
    """The previous run's reports by patient key (empty when there is none or it cannot be read)."""
    path = Path(folder) / "import_report.json"
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
        return {r["patient_key"]: PatientReport.from_dict(r) for r in document.get("patients", [])}
    except (OSError, ValueError, TypeError, KeyError):
        return {}


def summary_lines(reports: Sequence[PatientReport]) -> list[str]:
    """A few lines for the console: counts, and each skipped patient or scan by pseudonym and reason category.

    No Patient ID, file name or UID: those are in the private report only.
    """
    items = [item for report in reports for item in report.items]
    counts = {status: sum(item.status == status for item in items) for status in ("training", "inference", "skipped")}
    imported = sum(r.status == "imported" for r in reports)
    resumed = sum(r.resumed for r in reports)
    lines = [
        f"{imported} of {len(reports)} patient(s) imported ({resumed} unchanged since the last run); daily scans: "
        f"{counts['training']} with contours, {counts['inference']} without (inference list), {counts['skipped']} "
        "skipped"
    ]
    for report in reports:
        if report.status == "skipped":
            lines.append(f"  {report.pseudonym}: patient skipped: {report.category}")
        for item in report.items:
            if item.status != "training":
                lines.append(f"  {report.pseudonym} fraction {item.fraction}: {item.status}: {item.category}")
    return lines
