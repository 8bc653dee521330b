"""Write an RT Structure Set on a CT series from a label map or per-structure masks.

Hand-written with pydicom because no maintained library writes a conformant RTSTRUCT: highdicom has no
RTSTRUCT writer and rt-utils' output fails ``dciodvfy`` (see docs/ARCHITECTURE.md, "Hand-written DICOM
writers").

Contours are sub-voxel closed planar polygons, one set per image slice: the 0.5 iso-line of the binary mask
(marching squares, :func:`skimage.measure.find_contours`) in patient coordinates, each referencing its CT slice.
A pixel lies inside the structure exactly when its centre lies inside an odd number of the slice's contours:
by default holes are separate contours (even-odd rule, as Eclipse, 3D Slicer, rt-utils' ``cv2.fillPoly`` and
:mod:`prostate_jrs.dicom.rtstruct_reader` read them). Readers that take the union of a slice's contours
(plastimatch 1.9) fill such holes; for them ``RTStructOptions(holes="keyhole")`` joins every hole to its outer
border through a zero-width channel, which even-odd readers read the same way.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import SimpleITK as sitk
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.sr.codedict import codes
from pydicom.tag import Tag
from pydicom.uid import RTStructureSetStorage
from skimage import measure

from prostate_jrs.dicom.files import atomic_write
from prostate_jrs.dicom.label_maps import known_label_values
from prostate_jrs.dicom.modules import NewSeriesOptions, image_reference, new_series_instance
from prostate_jrs.dicom.slices import match_slices
from prostate_jrs.dicom.values import code_item, dicom_date, dicom_time, ds_list
from prostate_jrs.geometry import array_view, index_to_world, label_box
from prostate_jrs.labels import STRUCTURES, Structure, structure_by_name

__all__ = [
    "RTStructOptions",
    "contours_for_slice",
    "write_rtstruct",
]

GenerationAlgorithm = Literal["AUTOMATIC", "SEMIAUTOMATIC", "MANUAL"]

# Detached Study Management SOP Class (retired), the value TPSs write as RT Referenced Study's Referenced SOP Class
_STUDY_REFERENCE_SOP_CLASS = "1.2.840.10008.3.1.2.3.1"
_POSITION_TOLERANCE_MM = 1e-3


@dataclass(frozen=True, kw_only=True)
class RTStructOptions(NewSeriesOptions):
    """Descriptive attributes of a written RT Structure Set (and those of :class:`NewSeriesOptions`).

    Args:
        generation: ROI Generation Algorithm of every ROI: ``AUTOMATIC`` (model output), ``SEMIAUTOMATIC`` or
            ``MANUAL`` (a clinician's planning contours, e.g. for synthetic planning data).
        algorithm_name: model name, written into ROI Generation Description and (for AUTOMATIC and SEMIAUTOMATIC)
            the ROI Derivation Algorithm Identification.
        structure_set_label: Structure Set Label (at most 16 characters).
        structure_set_name: Structure Set Name.
        content_datetime: Structure Set Date/Time and Series Date/Time; ``None`` for now.
        operators_name: Operators' Name (Type 2; may be empty).
        roi_interpreter: ROI Interpreter of every ROI (Type 2; may be empty).
        approval_status: ``UNAPPROVED`` (model output awaiting review), ``APPROVED`` or ``REJECTED``.
        reviewer_name: Reviewer Name, required when ``approval_status`` is not ``UNAPPROVED``.
        skip_empty: leave out structures without any voxel instead of writing them as ROIs without contours.
        holes: how holes in a slice are written (see :func:`contours_for_slice`): ``"separate"`` contours (even-odd
            rule; Eclipse, rt-utils, 3D Slicer) or ``"keyhole"`` (joined to the outer border; also read correctly
            by readers that take the union of a slice's contours, such as plastimatch).
    """

    generation: GenerationAlgorithm = "AUTOMATIC"
    structure_set_label: str = "JRS"
    structure_set_name: str = "prostate-jrs contours"
    series_description: str = "prostate-jrs contours"
    series_number: int = 901
    operators_name: str = ""
    roi_interpreter: str = ""
    approval_status: Literal["UNAPPROVED", "APPROVED", "REJECTED"] = "UNAPPROVED"
    reviewer_name: str = ""
    skip_empty: bool = False
    holes: Literal["separate", "keyhole"] = "separate"

    def __post_init__(self) -> None:
        if self.generation not in ("AUTOMATIC", "SEMIAUTOMATIC", "MANUAL"):
            raise ValueError(f"generation must be AUTOMATIC, SEMIAUTOMATIC or MANUAL, got {self.generation!r}")
        if not 0 < len(self.structure_set_label) <= 16:
            raise ValueError(f"structure_set_label must have 1 to 16 characters, got {self.structure_set_label!r}")
        if self.approval_status not in ("UNAPPROVED", "APPROVED", "REJECTED"):
            raise ValueError(f"approval_status must be UNAPPROVED, APPROVED or REJECTED, got {self.approval_status!r}")
        if self.approval_status != "UNAPPROVED" and not self.reviewer_name:
            raise ValueError(f"approval_status {self.approval_status} needs a reviewer_name")
        if self.holes not in ("separate", "keyhole"):
            raise ValueError(f"holes must be 'separate' or 'keyhole', got {self.holes!r}")


def _contour_data(world: np.ndarray) -> RawDataElement:
    """Contour Data (3006,0050) of ``(n, 3)`` points, encoded once: :func:`ds_list` makes valid Decimal Strings, so
    pydicom need not convert and check each of the ~20,000 numbers of a structure set (a second on two cores)."""
    text = "\\".join(ds_list(world.ravel()))
    text += " " * (len(text) % 2)  # even length, padded with a space (PS3.5 6.2)
    return RawDataElement(Tag(0x30060050), "DS", len(text), text.encode("ascii"), 0, False, True)


def _drop_collinear(points: np.ndarray) -> np.ndarray:
    """Remove vertices of a closed polygon that lie on the straight line through their neighbours (lossless)."""
    if len(points) < 4:
        return points
    previous, following = np.roll(points, 1, axis=0), np.roll(points, -1, axis=0)
    a, b = points - previous, following - points
    cross = a[:, 0] * b[:, 1] - a[:, 1] * b[:, 0]
    keep = np.abs(cross) > 1e-9
    return points[keep] if keep.sum() >= 3 else points


def _signed_area(points: np.ndarray) -> float:
    """Shoelace area of a closed polygon; its sign gives the winding direction."""
    x, y = points[:, 0], points[:, 1]
    return 0.5 * float(np.dot(x, np.roll(y, -1)) - np.dot(np.roll(x, -1), y))


# find_contours winds outer borders and hole borders in opposite directions; learn which sign is "outer" once
_OUTER_SIGN = np.sign(_signed_area(measure.find_contours(np.pad(np.ones((2, 2)), 1), 0.5)[0][:-1]))


def _keyhole(outer: np.ndarray, holes: list[np.ndarray]) -> np.ndarray:
    """Merge ``holes`` into ``outer`` through zero-width channels, giving one simple-as-possible polygon.

    Holes are merged greedily, nearest first, each at the closest vertex pair, so no channel crosses a border.
    """
    merged = outer
    remaining = list(holes)
    while remaining:
        best: tuple[float, int, int, int] | None = None
        for h, hole in enumerate(remaining):
            distances = np.linalg.norm(merged[:, None, :] - hole[None, :, :], axis=-1)
            i, j = np.unravel_index(np.argmin(distances), distances.shape)
            if best is None or distances[i, j] < best[0]:
                best = (float(distances[i, j]), h, int(i), int(j))
        assert best is not None
        _, h, a, b = best
        hole = remaining.pop(h)
        merged = np.concatenate([merged[: a + 1], hole[b:], hole[: b + 1], merged[a:]])
    return merged


def contours_for_slice(mask: np.ndarray, holes: Literal["separate", "keyhole"] = "separate") -> list[np.ndarray]:
    """Closed sub-voxel contours of a 2D binary mask in ``(I, J)`` order.

    Args:
        mask: boolean array ``(I, J)``.
        holes: ``"separate"``: outer and hole borders are separate polygons, and the mask is the pixel centres
            inside an odd number of them (even-odd rule). ``"keyhole"``: each hole border is joined to its
            enclosing outer border by a zero-width channel, so readers that take the union of polygons
            (plastimatch) also get the holes; islands inside holes stay separate polygons.

    Returns:
        Polygons ``(n, 2)`` of continuous ``(i, j)`` indices, without the repeated closing vertex.
    """
    if not mask.any():
        return []
    padded = np.pad(mask.astype(np.float32), 1)  # zero border, so every iso-line closes
    polygons = []
    for contour in measure.find_contours(padded, 0.5):
        points = _drop_collinear(contour[:-1] - 1.0)
        if len(points) >= 3:
            polygons.append(points)
    if holes == "separate" or len(polygons) < 2:
        return polygons
    outers = [p for p in polygons if np.sign(_signed_area(p)) == _OUTER_SIGN]
    inners = [p for p in polygons if np.sign(_signed_area(p)) != _OUTER_SIGN]
    outer_areas = [abs(_signed_area(p)) for p in outers]
    holes_of: list[list[np.ndarray]] = [[] for _ in outers]
    for hole in inners:
        # the enclosing outer border is the smallest one containing the hole
        enclosing = [n for n, outer in enumerate(outers) if measure.points_in_poly(hole[:1], outer)[0]]
        if not enclosing:
            raise AssertionError("a hole border lies outside every outer border")  # cannot happen for a mask
        holes_of[min(enclosing, key=lambda n: outer_areas[n])].append(hole)
    return [
        _keyhole(outer, hole_list) if hole_list else outer for outer, hole_list in zip(outers, holes_of, strict=True)
    ]


@dataclass(frozen=True)
class _Mask:
    """One structure's mask inside its bounding box, which starts at voxel ``offset`` of the grid."""

    structure: Structure
    offset: tuple[int, int, int]
    mask: np.ndarray


def _cropped(structure: Structure, mask: np.ndarray) -> _Mask:
    """``mask`` cut to its bounding box: contours are only looked for there (a structure covers a few percent of a
    512 x 512 slice)."""
    box = label_box(mask)
    if box is None:
        return _Mask(structure, (0, 0, 0), np.zeros((0, 0, 0), dtype=bool))
    return _Mask(structure, (box[0].start, box[1].start, box[2].start), np.ascontiguousarray(mask[box]))


def _masks_from_input(
    label_map: sitk.Image | Mapping[str, sitk.Image], structures: Sequence[Structure]
) -> tuple[sitk.Image, list[_Mask]]:
    """The grid and each structure's mask, cut to its bounding box."""
    if isinstance(label_map, sitk.Image):
        if label_map.GetDimension() != 3 or label_map.GetNumberOfComponentsPerPixel() != 1:
            raise ValueError("label_map must be a scalar 3D image of integer labels")
        labels = array_view(label_map)
        known_label_values(labels, label_map, structures)
        outer = label_box(labels)  # all structures lie in here: each mask is made from this box only
        if outer is None:
            return label_map, [_cropped(s, np.zeros((0, 0, 0), dtype=bool)) for s in structures]
        inside = labels[outer]
        start = np.array([b.start for b in outer])
        masks = []
        for structure in structures:
            found = _cropped(structure, inside == structure.label)
            offset = tuple(int(v) for v in start + found.offset)
            masks.append(_Mask(structure, offset, found.mask))  # type: ignore[arg-type]
        return label_map, masks
    by_name = {s.name: s for s in structures}
    grid: sitk.Image | None = None
    masks = []
    for name, image in label_map.items():
        structure = by_name.get(name) or structure_by_name(name)
        if grid is None:
            grid = image
        elif image.GetSize() != grid.GetSize() or not np.allclose(
            index_to_world(image), index_to_world(grid), atol=_POSITION_TOLERANCE_MM
        ):
            raise ValueError(f"mask {name!r} is not on the same grid as the other masks")
        masks.append(_cropped(structure, array_view(image) != 0))
    if grid is None:
        raise ValueError("no masks given; expected a label map or a mapping of structure name to mask")
    return grid, masks


def _roi_items(
    structure: Structure, number: int, frame_of_reference_uid: str, options: RTStructOptions
) -> tuple[Dataset, Dataset]:
    """Structure Set ROI item and RT ROI Observations item of one ROI."""
    roi = Dataset()
    roi.ROINumber = number
    roi.ReferencedFrameOfReferenceUID = frame_of_reference_uid
    roi.ROIName = structure.display_name
    roi.ROIGenerationAlgorithm = options.generation
    if options.generation == "MANUAL":
        roi.ROIGenerationDescription = f"delineated with {options.algorithm_name} {options.algorithm_version}"[:64]
    else:
        roi.ROIGenerationDescription = f"{options.algorithm_name} {options.algorithm_version}"[:64]
        algorithm = Dataset()
        family = codes.cid7162.ArtificialIntelligence
        algorithm.AlgorithmFamilyCodeSequence = [code_item(family.value, family.scheme_designator, family.meaning)]
        algorithm.AlgorithmName = options.algorithm_name
        algorithm.AlgorithmVersion = options.algorithm_version
        roi.ROIDerivationAlgorithmIdentificationSequence = [algorithm]
    observation = Dataset()
    observation.ObservationNumber = number
    observation.ReferencedROINumber = number
    observation.ROIObservationLabel = structure.display_name
    observation.RTROIInterpretedType = structure.interpreted_type
    observation.ROIInterpreter = options.roi_interpreter
    return roi, observation


def _referenced_frame(slices: Sequence[Dataset]) -> Dataset:
    """Referenced Frame of Reference item: the CT series, its study and every image the contours may lie on."""
    first = slices[0]
    referenced_series = Dataset()
    referenced_series.SeriesInstanceUID = first.SeriesInstanceUID
    referenced_series.ContourImageSequence = [image_reference(image) for image in slices]
    referenced_study = Dataset()
    referenced_study.ReferencedSOPClassUID = _STUDY_REFERENCE_SOP_CLASS
    referenced_study.ReferencedSOPInstanceUID = first.StudyInstanceUID
    referenced_study.RTReferencedSeriesSequence = [referenced_series]
    referenced_frame = Dataset()
    referenced_frame.FrameOfReferenceUID = str(first.FrameOfReferenceUID)
    referenced_frame.RTReferencedStudySequence = [referenced_study]
    return referenced_frame


def _roi_contour(
    item: _Mask, number: int, slices: list[Dataset], to_world: np.ndarray, holes: Literal["separate", "keyhole"]
) -> Dataset:
    """ROI Contour item of one structure: its closed planar contours, slice by slice, in patient coordinates."""
    mask, (i0, j0, k0) = item.mask, item.offset
    roi_contour = Dataset()
    roi_contour.ReferencedROINumber = number
    roi_contour.ROIDisplayColor = list(item.structure.color)
    contour_items: list[Dataset] = []
    for k in np.flatnonzero(mask.any(axis=(0, 1))):
        for polygon in contours_for_slice(mask[:, :, k], holes):
            ones = np.ones(len(polygon))
            index = np.column_stack([polygon[:, 0] + i0, polygon[:, 1] + j0, (k0 + k) * ones, ones])
            world = (index @ to_world.T)[:, :3]
            contour = Dataset()
            contour.ContourNumber = len(contour_items) + 1
            contour.ContourImageSequence = [image_reference(slices[k0 + k])]
            contour.ContourGeometricType = "CLOSED_PLANAR"
            contour.NumberOfContourPoints = len(world)
            contour[0x30060050] = _contour_data(world)
            contour_items.append(contour)
    if contour_items:
        roi_contour.ContourSequence = DicomSequence(contour_items)
    return roi_contour


def write_rtstruct(
    label_map: sitk.Image | Mapping[str, sitk.Image],
    reference_series: Sequence[Dataset],
    out_path: str | os.PathLike[str],
    *,
    structures: Sequence[Structure] = STRUCTURES,
    options: RTStructOptions | None = None,
) -> Path:
    """Write an RT Structure Set of ``structures`` drawn on the CT series ``reference_series``.

    Args:
        label_map: integer label map (labels as in :mod:`prostate_jrs.labels`), or canonical structure name ->
            binary mask (structures may then overlap). Either must lie exactly on the reference series' grid.
        reference_series: the CT images the contours are drawn on, as read from disk (pixel data not needed).
            Patient, study and frame of reference are copied from them.
        out_path: the file to write (written completely or not at all).
        structures: the structures to write, in ROI order; their ``display_name``, ``color`` and
            ``interpreted_type`` become ROI Name, ROI Display Color and RT ROI Interpreted Type.
        options: descriptive attributes (generation algorithm, model name and version, labels, approval).

    Returns:
        The written path.

    Raises:
        ValueError: if the label map or masks are not on the reference series' grid, the series is not one
            series of one patient, or the labels are unknown.
    """
    options = options or RTStructOptions()
    grid, masks = _masks_from_input(label_map, structures)
    slices = match_slices(reference_series, grid)
    if options.skip_empty:
        masks = [m for m in masks if m.mask.any()]
    first = slices[0]
    frame_of_reference_uid = str(first.FrameOfReferenceUID)
    # RT Series, Frame of Reference (the CT's), General Equipment
    ds, when = new_series_instance(RTStructureSetStorage, "RTSTRUCT", first, options, options.operators_name)
    # Structure Set
    ds.StructureSetLabel = options.structure_set_label
    ds.StructureSetName = options.structure_set_name
    ds.InstanceNumber = 1
    ds.StructureSetDate, ds.StructureSetTime = dicom_date(when), dicom_time(when)
    ds.ReferencedFrameOfReferenceSequence = [_referenced_frame(slices)]
    to_world = index_to_world(grid)
    rois, observations, roi_contours = [], [], []
    for number, item in enumerate(masks, start=1):
        roi, observation = _roi_items(item.structure, number, frame_of_reference_uid, options)
        rois.append(roi)
        observations.append(observation)
        roi_contours.append(_roi_contour(item, number, slices, to_world, options.holes))
    ds.StructureSetROISequence = rois
    ds.ROIContourSequence = roi_contours
    ds.RTROIObservationsSequence = observations
    # Approval
    ds.ApprovalStatus = options.approval_status
    if options.approval_status != "UNAPPROVED":
        ds.ReviewDate, ds.ReviewTime = dicom_date(when), dicom_time(when)
        ds.ReviewerName = options.reviewer_name
    return atomic_write(ds, out_path)
