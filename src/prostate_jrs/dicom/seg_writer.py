"""Write a label map on a CT series as a DICOM Segmentation (highdicom), with SNOMED CT codes per structure."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import highdicom as hd
import numpy as np
import SimpleITK as sitk
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from prostate_jrs.dicom.files import atomic_write
from prostate_jrs.dicom.label_maps import known_label_values
from prostate_jrs.dicom.modules import EquipmentInfo
from prostate_jrs.dicom.slices import match_slices
from prostate_jrs.dicom.uids import make_uid, package_version
from prostate_jrs.labels import STRUCTURES, Structure

__all__ = [
    "ANATOMICAL_STRUCTURE",
    "STRUCTURE_CODES",
    "SegOptions",
    "write_seg",
]

ANATOMICAL_STRUCTURE: Code = codes.SCT.AnatomicalStructure
"""Segmented Property Category of all four structures (SCT 91723000)."""

STRUCTURE_CODES: dict[str, Code] = {
    "prostate": codes.SCT.Prostate,  # 41216001
    "seminal_vesicles": codes.SCT.SeminalVesicle,  # 64739004
    "rectum": codes.SCT.Rectum,  # 34402009
    "bladder": codes.SCT.Bladder,  # 89837001 (urinary bladder)
}
"""Segmented Property Type (SNOMED CT) of each canonical structure."""


@dataclass(frozen=True)
class SegOptions:
    """Descriptive attributes of a written Segmentation.

    Args:
        algorithm_name: model name (Segment Algorithm Name and Algorithm Identification).
        algorithm_version: model version.
        segmentation_type: ``BINARY`` (Segmentation Storage; validates with Debian's dciodvfy) or ``LABELMAP``
            (Label Map Segmentation Storage, DICOM 2024; newer than the dciodvfy in Debian 12).
        series_description: Series Description.
        series_number: Series Number.
        series_instance_uid: Series Instance UID; ``None`` for a new one.
        sop_instance_uid: SOP Instance UID; ``None`` for a new one.
        content_label: Content Label (upper case, at most 16 characters).
        content_description: Content Description.
        content_creator_name: Content Creator's Name.
        equipment: Manufacturer, model, serial number and software versions of the writer.
        omit_empty_frames: leave out frames without any segmented pixel (keeps the file small).
    """

    algorithm_name: str = "prostate-jrs"
    algorithm_version: str = field(default_factory=package_version)
    segmentation_type: Literal["BINARY", "LABELMAP"] = "BINARY"
    series_description: str = "prostate-jrs segmentation"
    series_number: int = 902
    series_instance_uid: str | None = None
    sop_instance_uid: str | None = None
    content_label: str = "JRS"
    content_description: str = "Automatic segmentation of prostate, SVs, rectum, bladder"
    content_creator_name: str = ""
    equipment: EquipmentInfo = field(default_factory=EquipmentInfo)
    omit_empty_frames: bool = True

    def __post_init__(self) -> None:
        if self.segmentation_type not in ("BINARY", "LABELMAP"):
            raise ValueError(f"segmentation_type must be BINARY or LABELMAP, got {self.segmentation_type!r}")


def _segment_description(number: int, structure: Structure, options: SegOptions) -> hd.seg.SegmentDescription:
    if structure.name not in STRUCTURE_CODES:
        raise ValueError(f"no SNOMED CT code for structure {structure.name!r}; expected one of {list(STRUCTURE_CODES)}")
    algorithm = hd.AlgorithmIdentificationSequence(
        name=options.algorithm_name,
        family=codes.cid7162.ArtificialIntelligence,
        version=options.algorithm_version,
    )
    return hd.seg.SegmentDescription(
        segment_number=number,
        segment_label=structure.display_name,
        segmented_property_category=ANATOMICAL_STRUCTURE,
        segmented_property_type=STRUCTURE_CODES[structure.name],
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm,
        tracking_uid=make_uid(),
        tracking_id=f"{structure.display_name} ({options.algorithm_name})",
        display_color=hd.color.CIELabColor.from_rgb(*structure.color),
    )


def write_seg(
    label_map: sitk.Image,
    reference_series: Sequence[Dataset],
    out_path: str | os.PathLike[str],
    *,
    structures: Sequence[Structure] = STRUCTURES,
    options: SegOptions | None = None,
) -> Path:
    """Write ``label_map`` as a DICOM Segmentation of the CT series ``reference_series``.

    Segment numbers follow ``structures`` (1 for the first); with the default that is the project's label numbers.

    Args:
        label_map: integer label map (labels as in :mod:`prostate_jrs.labels`) exactly on the CT grid.
        reference_series: the CT images segmented, as read from disk (with pixel data: highdicom copies
            attributes from them). Patient, study and frame of reference come from them.
        out_path: the file to write (written completely or not at all).
        structures: the structures to write as segments, in segment order.
        options: descriptive attributes.

    Returns:
        The written path.

    Raises:
        ValueError: if the label map is not on the CT grid, has unknown labels, or a structure has no code.
    """
    options = options or SegOptions()
    if label_map.GetDimension() != 3 or label_map.GetNumberOfComponentsPerPixel() != 1:
        raise ValueError("label_map must be a scalar 3D image of integer labels")
    slices = match_slices(reference_series, label_map)
    # (K, J, I) = (frame, row, column), frames in slice order; a view: highdicom copies what it keeps
    labels = sitk.GetArrayViewFromImage(label_map)
    values = known_label_values(labels, label_map, structures)
    numbering = {structure.label: number for number, structure in enumerate(structures, start=1)}
    if labels.dtype == np.uint8 and all(numbering.get(v, 0) == v for v in values if v):
        segments = labels  # segment numbers are the labels already (the default structures): no remapped copy
    else:
        segments = np.zeros(labels.shape, dtype=np.uint8)
        for label, number in numbering.items():
            segments[labels == label] = number
    equipment = options.equipment
    seg = hd.seg.Segmentation(
        source_images=slices,
        pixel_array=segments,
        segmentation_type=options.segmentation_type,
        segment_descriptions=[_segment_description(n, s, options) for n, s in enumerate(structures, start=1)],
        series_instance_uid=options.series_instance_uid or make_uid(),
        series_number=options.series_number,
        sop_instance_uid=options.sop_instance_uid or make_uid(),
        instance_number=1,
        manufacturer=equipment.manufacturer,
        manufacturer_model_name=equipment.model_name,
        software_versions=equipment.software_versions,
        device_serial_number=equipment.device_serial_number,
        content_label=options.content_label,
        content_description=options.content_description,
        content_creator_name=options.content_creator_name or None,
        omit_empty_frames=options.omit_empty_frames,
        series_description=options.series_description,
    )
    return atomic_write(seg, out_path)
