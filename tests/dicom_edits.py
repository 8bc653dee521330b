"""Edits of DICOM files that the tests of several front ends make to build bad inputs."""

from __future__ import annotations

from pathlib import Path

import pydicom

__all__ = ["edit_rois"]


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
