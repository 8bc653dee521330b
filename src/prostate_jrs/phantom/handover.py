"""One DICOM folder per fraction from a synthetic archive export, as a clinic hands a fraction over.

:func:`prostate_jrs.phantom.dicom_export.export_dicom_archive` writes a hospital's archive (``dicom/<P>/Study_PLAN1``
with the planning CT, RTSTRUCT and RTPLAN; ``dicom/<P>/Study_FX<k>/CT_1`` the daily CT and ``RTSTRUCT_2`` its
approved contours). Patient-specific adaptation and its benchmark need the per-fraction view:
:func:`fraction_folders` makes, for every fraction, ``<P>_f<NN>/`` (planning study + daily CT: a new fraction, what
the app receives) and, when the archive has approved contours for it, ``<P>_f<NN>_approved/`` (the same + the approved
daily RTSTRUCT: what ``prostate-jrs adapt`` learns from). Files are hard links where the file system allows (copies
otherwise); other series of the daily study (the archive's stray series of another patient) are not taken.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

__all__ = ["FractionFolders", "fraction_folders"]

_PLANNING_STUDY = "Study_PLAN1"
_DAILY_CT = "CT_1"
_DAILY_RTSTRUCT = "RTSTRUCT_2"


@dataclass(frozen=True)
class FractionFolders:
    """The folders of one fraction.

    Args:
        patient: Patient ID of the phantom.
        fraction: fraction number (1-based).
        scan: planning study + daily CT (a new fraction).
        approved: planning study + daily CT + approved daily RTSTRUCT, or ``None`` when the archive has no contours.
        truth: the daily label map (NIfTI) of the dataset: on the daily CT's voxel grid.
    """

    patient: str
    fraction: int
    scan: Path
    approved: Path | None
    truth: Path


def _link_tree(source: Path, target: Path) -> None:
    def link(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    shutil.copytree(source, target, copy_function=link, dirs_exist_ok=True)


def _assemble(folder: Path, parts: list[tuple[Path, Path]]) -> None:
    """``folder`` made of ``(source, relative target)`` trees, complete or not at all; kept when it exists."""
    if folder.is_dir():
        return
    partial = folder.with_name(f".{folder.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    for source, relative in parts:
        _link_tree(source, partial / relative)
    partial.rename(folder)


def fraction_folders(
    dataset_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str]
) -> dict[str, dict[int, FractionFolders]]:
    """Per patient and fraction, the hand-over folders under ``out_dir`` (made unless they exist).

    Args:
        dataset_dir: a synthetic dataset with an archive export (``dicom/archive.json``).
        out_dir: where the folders go.

    Returns:
        ``{patient: {fraction: FractionFolders}}``.

    Raises:
        FileNotFoundError: if ``dataset_dir/dicom/archive.json`` is missing.
    """
    dataset, out = Path(dataset_dir), Path(out_dir)
    manifest = dataset / "dicom" / "archive.json"
    if not manifest.is_file():
        raise FileNotFoundError(f"{manifest}: not found; expected `prostate-jrs synth ... --dicom archive` output")
    out.mkdir(parents=True, exist_ok=True)
    folders: dict[str, dict[int, FractionFolders]] = {}
    for pid, patient in json.loads(manifest.read_text())["patients"].items():
        root = dataset / "dicom" / pid
        planning = (root / _PLANNING_STUDY, Path(_PLANNING_STUDY))
        for entry in patient["fractions"]:
            k = int(entry["fraction"])
            study, relative = root / f"Study_FX{k}", Path(f"Study_FX{k}")
            scan, approved = out / f"{pid}_f{k:02d}", out / f"{pid}_f{k:02d}_approved"
            daily = (study / _DAILY_CT, relative / _DAILY_CT)
            _assemble(scan, [planning, daily])
            if entry.get("daily_rtstruct"):
                _assemble(approved, [planning, daily, (study / _DAILY_RTSTRUCT, relative / _DAILY_RTSTRUCT)])
            truth = dataset / str(entry["item"]["fixed_label"])
            has_contours = bool(entry.get("daily_rtstruct"))
            folders.setdefault(pid, {})[k] = FractionFolders(pid, k, scan, approved if has_contours else None, truth)
    return folders
