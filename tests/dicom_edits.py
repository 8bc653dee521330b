"""Edits of DICOM files that the tests of several front ends make to build bad inputs."""

from __future__ import annotations

import shutil
from pathlib import Path

import pydicom

__all__ = ["copy_patients", "cut_inside", "edit_rois", "set_patient"]


def edit_rois(path: Path, rename: dict[str, str] | None = None, remove: tuple[str, ...] = ()) -> None:
    """Rename ROIs and remove ROIs (with their contours and observations) in an RTSTRUCT."""
    ds = pydicom.dcmread(path)
    removed = {int(r.ROINumber) for r in ds.StructureSetROISequence if r.ROIName in remove}
    for roi in ds.StructureSetROISequence:
        roi.ROIName = (rename or {}).get(roi.ROIName, roi.ROIName)
    ds.StructureSetROISequence = [r for r in ds.StructureSetROISequence if int(r.ROINumber) not in removed]
    ds.ROIContourSequence = [c for c in ds.ROIContourSequence if int(c.ReferencedROINumber) not in removed]
    ds.RTROIObservationsSequence = [
        o for o in ds.RTROIObservationsSequence if int(o.ReferencedROINumber) not in removed
    ]
    ds.save_as(path)


def cut_inside(path: Path, keyword: str) -> None:
    """Truncate ``path`` in the middle of the value of ``keyword`` (elements before it stay intact)."""
    element = pydicom.dcmread(path, stop_before_pixels=True).get_item(pydicom.datadict.tag_for_keyword(keyword))
    data = path.read_bytes()
    path.write_bytes(data[: element.value_tell + element.length // 2])


def set_patient(path: Path, patient_id: str, name: str) -> None:
    """File an instance under another patient (Patient ID and Patient's Name), as a misfiled export does."""
    ds = pydicom.dcmread(path)
    ds.PatientID, ds.PatientName = patient_id, name
    ds.save_as(path)


def copy_patients(archive: Path, patients: list[str], target: Path) -> Path:
    """A new archive export holding only the folders of ``patients`` (e.g. one site's share of an archive)."""
    target.mkdir(parents=True)
    for patient in patients:
        shutil.copytree(archive / patient, target / patient)
    return target
