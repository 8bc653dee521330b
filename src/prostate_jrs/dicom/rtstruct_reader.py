"""Read an RTSTRUCT into masks on the grid of the CT it references.

Each CLOSED_PLANAR contour is mapped from patient coordinates (mm, LPS) into the continuous index space of the
reference CT, assigned to the slice it lies on (within half a slice spacing) and filled with the even-odd rule;
all contours of one ROI on one slice are combined by the same rule, so an inner contour cuts a hole into an outer
one. A voxel belongs to the ROI when its centre is inside or on a contour.

ROI names map to the four structures through a :class:`~prostate_jrs.labels.SynonymTable`. The combined label
map uses the label numbers of :mod:`prostate_jrs.labels`; where structures overlap the lower label wins
(prostate > seminal vesicles > rectum > bladder), so the target is never cut by an organ at risk.

Safety rule (no option switches it off): the RTSTRUCT's frame of reference must be the reference CT's, and every
contour must lie on the CT's slices; otherwise :class:`RTStructError` is raised.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.dataset import Dataset

from prostate_jrs.dicom.ct_reader import METADATA_KEYS, CTVolume
from prostate_jrs.dicom.files import read_whole
from prostate_jrs.errors import RTStructError
from prostate_jrs.geometry import image_from_array, world_to_index
from prostate_jrs.labels import STRUCTURES, Structure, SynonymTable

__all__ = [
    "ROIInfo",
    "RTStructContents",
    "RTStructError",
    "fill_even_odd",
    "read_rtstruct",
]

_PLANE_TOLERANCE = 0.1
"""Largest spread of a contour's points along the slice normal, in slices, for it to count as on one slice."""


@dataclass
class ROIInfo:
    """One ROI of the structure set.

    Args:
        number: ROI Number.
        name: ROI Name.
        structure: the canonical structure it maps to, or ``None``.
        interpreted_type: RT ROI Interpreted Type (may be empty).
        color: ROI Display Color, if given.
        num_contours: number of CLOSED_PLANAR contours.
        num_ignored: number of other contours (POINT, OPEN_PLANAR, ...), which are not rasterised.
        mask: boolean ``(I, J, K)`` mask on the reference grid, or ``None`` when not rasterised.
    """

    number: int
    name: str
    structure: Structure | None
    interpreted_type: str = ""
    color: tuple[int, int, int] | None = None
    num_contours: int = 0
    num_ignored: int = 0
    mask: np.ndarray | None = None

    @property
    def empty(self) -> bool:
        """Whether the ROI has no closed contour (or its rasterised mask has no voxel)."""
        return self.num_contours == 0 or (self.mask is not None and not self.mask.any())


@dataclass
class RTStructContents:
    """What :func:`read_rtstruct` found.

    Args:
        path: the RTSTRUCT file.
        sop_instance_uid: its SOP Instance UID.
        frame_of_reference_uid: the frame of reference of the contours (= the reference CT's).
        rois: every ROI, in Structure Set ROI Sequence order.
        structure_rois: canonical structure name -> the ROI used for it.
        label_map: ``uint8`` ``(I, J, K)`` label map 0..4 on the reference grid (lower label wins on overlap).
        unmapped_rois: names of ROIs that map to none of the four structures.
        missing_structures: canonical names of structures with no non-empty ROI.
        empty_rois: names of ROIs without contours (or without a voxel on the grid).
        notes: what was ignored, clipped or resolved, for the log.
        reference: the reference image (its grid is the grid of the masks).
    """

    path: Path
    sop_instance_uid: str
    frame_of_reference_uid: str
    rois: list[ROIInfo]
    structure_rois: dict[str, ROIInfo]
    label_map: np.ndarray
    unmapped_rois: list[str]
    missing_structures: list[str]
    empty_rois: list[str]
    notes: list[str] = field(default_factory=list)
    reference: sitk.Image | None = None

    @property
    def roi_to_structure(self) -> dict[str, str | None]:
        """ROI name -> canonical structure name (``None`` when unmapped)."""
        return {roi.name: None if roi.structure is None else roi.structure.name for roi in self.rois}

    def structure_mask(self, name: str) -> np.ndarray | None:
        """Boolean ``(I, J, K)`` mask of a canonical structure, ``None`` when the structure is missing."""
        roi = self.structure_rois.get(name)
        return None if roi is None else roi.mask

    def label_image(self) -> sitk.Image:
        """The label map as a ``uint8`` image on the reference grid."""
        if self.reference is None:
            raise ValueError("no reference grid stored")
        return image_from_array(self.label_map, self.reference)


def _spans(low: np.ndarray, high: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Integers ``low[e] <= n < high[e]`` of every item ``e``, flattened: (item index, integer)."""
    counts = np.maximum(high - low, 0)
    item = np.repeat(np.arange(len(low)), counts)
    return item, np.repeat(low, counts) + (np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts))


def fill_even_odd(polygons: list[np.ndarray], shape: tuple[int, int]) -> np.ndarray:
    """Rasterise polygons on one slice with the even-odd rule (pixel centres at integer coordinates).

    Hand-written: matplotlib's ``Path`` fills compound paths with the non-zero rule, and scikit-image's
    ``draw.polygon`` / ``measure.grid_points_in_poly`` take one polygon at a time over the whole slice and test edges
    exactly, so centres a rounding error off an edge (world -> index) would fall out; this one is vectorised over all
    edges and counts centres within 1e-6 of an edge as on it.

    A pixel whose centre lies on an edge counts as inside, on every side alike: contour extractors such as
    plastimatch's run along the centres of the voxels at the border of the image.

    Args:
        polygons: vertices ``(N, 2)`` in continuous ``(i, j)`` index coordinates, implicitly closed.
        shape: ``(I, J)`` slice size.

    Returns:
        Boolean ``(I, J)`` mask: a pixel is set when a ray from its centre crosses the edges an odd number of times,
        or its centre lies on an edge.
    """
    size_i, size_j = shape
    eps = 1e-6
    starts = np.concatenate([p for p in polygons if len(p) >= 3] or [np.zeros((0, 2))])
    ends = np.concatenate([np.roll(p, -1, axis=0) for p in polygons if len(p) >= 3] or [np.zeros((0, 2))])
    i0, j0, i1, j1 = starts[:, 0], starts[:, 1], ends[:, 0], ends[:, 1]
    # rows j with min(j0, j1) <= j < max(j0, j1): half-open, so a vertex on a row is counted once
    low = np.clip(np.ceil(np.minimum(j0, j1)), 0, size_j).astype(np.int64)
    high = np.clip(np.ceil(np.maximum(j0, j1)), 0, size_j).astype(np.int64)
    edge, rows = _spans(low, high)
    crossing = i0[edge] + (rows - j0[edge]) * (i1[edge] - i0[edge]) / (j1[edge] - j0[edge])
    # a crossing at x toggles every pixel i < x of its row: mark the toggle at 0 and at ceil(x), then XOR-scan
    toggles = np.zeros((size_j, size_i + 1), dtype=np.int64)
    np.add.at(toggles, (rows, 0), 1)  # type: ignore[arg-type]  # numpy takes an (array, int) index; its stub does not
    np.add.at(toggles, (rows, np.clip(np.ceil(crossing), 0, size_i).astype(np.int64)), 1)
    inside = (np.cumsum(toggles, axis=1)[:, :size_i] % 2).astype(bool)

    # pixel centres on an edge: on a sloped edge, rows where the crossing is an integer; on a horizontal edge lying
    # on a row, every integer between its ends
    sloped = np.abs(j1 - j0) > eps
    low = np.clip(np.ceil(np.minimum(j0, j1) - eps), 0, size_j).astype(np.int64)
    high = np.clip(np.floor(np.maximum(j0, j1) + eps) + 1, 0, size_j).astype(np.int64)
    edge, rows = _spans(np.where(sloped, low, 0), np.where(sloped, high, 0))
    x = i0[edge] + (rows - j0[edge]) * (i1[edge] - i0[edge]) / (j1[edge] - j0[edge])
    hit = (np.abs(x - np.round(x)) < eps) & (np.round(x) >= 0) & (np.round(x) < size_i)
    inside[rows[hit], np.round(x[hit]).astype(np.int64)] = True
    row = np.round(j0)
    flat = ~sloped & (np.abs(j0 - row) < eps) & (row >= 0) & (row < size_j)
    low = np.clip(np.ceil(np.minimum(i0, i1) - eps), 0, size_i).astype(np.int64)
    high = np.clip(np.floor(np.maximum(i0, i1) + eps) + 1, 0, size_i).astype(np.int64)
    edge, columns = _spans(np.where(flat, low, 0), np.where(flat, high, 0))
    inside[row[edge].astype(np.int64), columns] = True
    return inside.T


def _contour_points(contour: Dataset) -> np.ndarray:
    """Contour Data as ``(N, 3)`` floats; parses the raw bytes when possible (much faster than pydicom's DS)."""
    element = contour.get_item(0x30060050)
    if element is None:
        return np.zeros(0)  # no ContourData: reported by the caller as a contour without points
    value = getattr(element, "value", None)
    if isinstance(value, bytes | bytearray):
        text = value.decode("ascii", errors="replace").strip("\x00 ")
        flat = np.array([float(v) for v in text.split("\\") if v.strip()], dtype=np.float64)
    else:
        flat = np.asarray([float(v) for v in contour.ContourData], dtype=np.float64)
    return flat


def _place_contour(contour: Dataset, image: sitk.Image, to_index: np.ndarray, what: str) -> tuple[float, np.ndarray]:
    """Continuous slice coordinate and ``(N, 2)`` in-plane index coordinates of one contour.

    Raises:
        RTStructError: if the contour data are malformed, not parallel to the slices, or off the slices.
    """
    try:
        flat = _contour_points(contour)
    except (TypeError, ValueError):  # text that is no number (a garbled value, or another VR)
        raise RTStructError(f"{what}: ContourData (3006,0050) holds text that is no number; expected x, y, z") from None
    if flat.size == 0 or flat.size % 3 or not np.isfinite(flat).all():
        raise RTStructError(f"{what}: ContourData (3006,0050) has {flat.size} values; expected finite x, y, z triplets")
    points = flat.reshape(-1, 3)
    index = points @ to_index[:3, :3].T + to_index[:3, 3]
    spread = float(np.ptp(index[:, 2]))
    if spread > _PLANE_TOLERANCE:
        raise RTStructError(
            f"{what} is not parallel to the CT slices (its points span {spread:.2f} slice spacings along the slice "
            "normal); expected planar contours on the CT slices"
        )
    k = float(np.mean(index[:, 2]))
    num_slices = image.GetSize()[2]
    if not -0.5 <= k < num_slices - 0.5:
        normal = np.asarray(image.GetDirection()).reshape(3, 3)[:, 2]
        first = float(np.asarray(image.GetOrigin()) @ normal)
        last = first + (num_slices - 1) * image.GetSpacing()[2]
        raise RTStructError(
            f"{what} lies at {float(np.mean(points @ normal)):.2f} mm along the slice normal, off the CT's "
            f"{num_slices} slice(s) ({first:.2f} to {last:.2f} mm); expected the complete CT series the RTSTRUCT was "
            "drawn on"
        )
    return k, index[:, :2]


def _reference_frame(reference: sitk.Image | CTVolume, frame_of_reference_uid: str | None) -> tuple[sitk.Image, str]:
    if isinstance(reference, CTVolume):
        return reference.image, reference.frame_of_reference_uid
    if frame_of_reference_uid is None and reference.HasMetaDataKey(METADATA_KEYS["FrameOfReferenceUID"]):
        frame_of_reference_uid = reference.GetMetaData(METADATA_KEYS["FrameOfReferenceUID"]).strip()
    if not frame_of_reference_uid:
        raise RTStructError(
            "the reference image has no Frame of Reference UID (meta-data key 0020|0052); pass the CTVolume from "
            "read_ct_series or frame_of_reference_uid, so that the contours can be checked to fit it"
        )
    return reference, frame_of_reference_uid


def read_rtstruct(
    path: str | os.PathLike[str],
    reference: sitk.Image | CTVolume,
    synonyms: SynonymTable | None = None,
    *,
    frame_of_reference_uid: str | None = None,
    roi_names: Collection[str] | None = None,
    all_rois: bool = False,
) -> RTStructContents:
    """Read an RTSTRUCT and rasterise its ROIs on the reference CT's grid.

    Args:
        path: the RTSTRUCT file.
        reference: the CT the RTSTRUCT references: a :class:`CTVolume`, or an image carrying its Frame of
            Reference UID as meta-data (as :func:`~prostate_jrs.dicom.ct_reader.read_ct_series` sets it).
        synonyms: ROI name -> structure table; ``None`` for the default table.
        frame_of_reference_uid: the reference's Frame of Reference UID, for an image without that meta-data.
        roi_names: ROIs to rasterise besides the ones that map to a structure; ``None`` for none (an ROI mask
            costs a byte per voxel).
        all_rois: rasterise every ROI.

    Returns:
        Masks, mapping, label map and what is unmapped, missing or empty.

    Raises:
        RTStructError: if the file is no RTSTRUCT, its frame of reference is not the reference's, a contour lies
            off the CT's slices or in a plane not parallel to them (for ROIs that are rasterised; other ROIs get a
            note), or two non-empty ROIs map to one structure.
    """
    path = Path(path)
    synonyms = synonyms or SynonymTable()
    image, reference_frame = _reference_frame(reference, frame_of_reference_uid)
    ds = read_whole(path, RTStructError, "a complete RTSTRUCT: re-export it")
    if ds.get("Modality") != "RTSTRUCT":
        raise RTStructError(f"{path}: Modality is {ds.get('Modality')!r}; expected 'RTSTRUCT'")
    _check_frame_of_reference(ds, path, reference_frame)
    notes: list[str] = []
    if isinstance(reference, CTVolume):
        _check_contour_images(ds, reference, path, notes)

    size = tuple(int(n) for n in image.GetSize())
    observations, contours_by_roi = _by_roi_number(ds, path)
    wanted = set(roi_names or ())

    rois: list[ROIInfo] = []
    for n, roi in enumerate(ds.get("StructureSetROISequence", []), start=1):
        number = _roi_number(roi, "ROINumber", path, f"StructureSetROISequence (3006,0020) item {n}")
        name = str(roi.get("ROIName", "")).strip()
        info = ROIInfo(number=number, name=name, structure=synonyms.match(name))
        info.interpreted_type = observations.get(number, "")
        item = contours_by_roi.pop(number, None)
        if item is not None and item.get("ROIDisplayColor"):
            with contextlib.suppress(TypeError, ValueError):  # a colour that is no three numbers is only left out
                info.color = tuple(int(c) for c in item.ROIDisplayColor)  # type: ignore[assignment]
        rasterise = all_rois or info.structure is not None or name in wanted
        by_slice = _contours_by_slice(info, item, image, path, rasterise, notes)
        if rasterise:
            info.mask = _rasterise(name, by_slice, image, path, notes)
        rois.append(info)
    for number in contours_by_roi:
        notes.append(f"ROIContourSequence item for ROI number {number}, which StructureSetROISequence lacks; ignored")

    structure_rois = _assign_structures(rois, path, notes)
    return RTStructContents(
        path=path,
        sop_instance_uid=str(ds.get("SOPInstanceUID", "")),
        frame_of_reference_uid=reference_frame,
        rois=rois,
        structure_rois=structure_rois,
        label_map=_label_map(structure_rois, size, notes),
        unmapped_rois=[r.name for r in rois if r.structure is None],
        missing_structures=[s.name for s in STRUCTURES if s.name not in structure_rois],
        empty_rois=[r.name for r in rois if r.empty],
        notes=notes,
        reference=image,
    )


def _by_roi_number(ds: Dataset, path: Path) -> tuple[dict[int, str], dict[int, Dataset]]:
    """RT ROI Interpreted Type and ROI Contour item of each ROI number.

    Raises:
        RTStructError: if an item's ROI number is missing or invalid.
    """
    observations = {
        _roi_number(o, "ReferencedROINumber", path, f"RTROIObservationsSequence (3006,0080) item {n}"): str(
            o.get("RTROIInterpretedType", "") or ""
        )
        for n, o in enumerate(ds.get("RTROIObservationsSequence", []), start=1)
        if "ReferencedROINumber" in o
    }
    contours_by_roi: dict[int, Dataset] = {}
    for n, item in enumerate(ds.get("ROIContourSequence", []), start=1):
        number = _roi_number(item, "ReferencedROINumber", path, f"ROIContourSequence (3006,0039) item {n}")
        contours_by_roi[number] = item
    return observations, contours_by_roi


def _check_frame_of_reference(ds: Dataset, path: Path, reference_frame: str) -> None:
    """Safety rule: contours only on a CT in their own frame of reference.

    Raises:
        RTStructError: if the RTSTRUCT names no frame of reference, or not the reference CT's.
    """
    frames = {str(f.get("FrameOfReferenceUID", "")) for f in ds.get("ReferencedFrameOfReferenceSequence", [])}
    frames |= {str(r.get("ReferencedFrameOfReferenceUID", "")) for r in ds.get("StructureSetROISequence", [])}
    frames.discard("")
    if not frames:
        raise RTStructError(
            f"{path}: no Frame of Reference UID (ReferencedFrameOfReferenceSequence (3006,0010)); cannot check that "
            "the contours fit the CT"
        )
    if reference_frame not in frames:
        raise RTStructError(
            f"{path}: the contours are in frame of reference {', '.join(sorted(frames))}, the CT in "
            f"{reference_frame}; contours are never put on a CT of another frame of reference"
        )


def _contours_by_slice(
    info: ROIInfo, item: Dataset | None, image: sitk.Image, path: Path, rasterise: bool, notes: list[str]
) -> dict[int, list[tuple[float, np.ndarray]]]:
    """The closed planar contours of one ROI, placed on the CT's slices: slice -> (plane, in-plane polygon).

    Counts the ROI's contours into ``info``. Contours of an ROI that is not rasterised are only checked: one that
    cannot be placed is noted, not raised, and none is returned.

    Raises:
        RTStructError: if a contour of a rasterised ROI cannot be placed (see :func:`_place_contour`).
    """
    name = info.name
    size = image.GetSize()
    to_index = world_to_index(image)
    by_slice: dict[int, list[tuple[float, np.ndarray]]] = {}
    for n, contour in enumerate(item.get("ContourSequence", []) if item is not None else [], start=1):
        kind = str(contour.get("ContourGeometricType", "")).strip()
        if kind != "CLOSED_PLANAR":
            info.num_ignored += 1
            continue
        info.num_contours += 1
        try:
            k, polygon = _place_contour(contour, image, to_index, f"{path}: ROI {name!r} contour {n}")
        except RTStructError as err:
            if rasterise:
                raise
            notes.append(f"{err} (ROI not used)")
            continue
        if rasterise:
            by_slice.setdefault(int(np.floor(k + 0.5)), []).append((k, polygon))
            if polygon.min() < -0.5 or (polygon > np.asarray(size[:2]) - 0.5).any():
                notes.append(f"ROI {name!r} contour {n} extends beyond the CT's field of view; clipped")
    if info.num_ignored:
        notes.append(f"ROI {name!r}: ignored {info.num_ignored} contour(s) that are not CLOSED_PLANAR")
    return by_slice


def _rasterise(
    name: str, by_slice: dict[int, list[tuple[float, np.ndarray]]], image: sitk.Image, path: Path, notes: list[str]
) -> np.ndarray:
    """Boolean ``(I, J, K)`` mask of one ROI: each slice's contours filled with the even-odd rule.

    Raises:
        RTStructError: if contours of two different planes fall on one CT slice.
    """
    size = tuple(int(n) for n in image.GetSize())
    mask = _kji_zeros(size, bool)
    off_centre = 0.0
    for k, placed in by_slice.items():
        planes = np.asarray([p[0] for p in placed])
        if np.ptp(planes) > _PLANE_TOLERANCE:
            # contours from two planes XOR'ed on one slice would cut rings into the ROI
            raise RTStructError(
                f"{path}: ROI {name!r} has contours in {len(np.unique(planes.round(2)))} different planes "
                f"that all fall on CT slice {k}; expected contours drawn on this CT's slices"
            )
        off_centre = max(off_centre, float(np.abs(planes - k).max()))
        mask[:, :, k] = fill_even_odd([p[1] for p in placed], (size[0], size[1]))
    if off_centre > _PLANE_TOLERANCE:
        notes.append(
            f"ROI {name!r}: contours lie up to {off_centre * image.GetSpacing()[2]:.2f} mm off the CT slice "
            "centres; each was put on the nearest slice"
        )
    return mask


def _label_map(structure_rois: dict[str, ROIInfo], size: tuple[int, ...], notes: list[str]) -> np.ndarray:
    """``uint8`` label map of the structures' masks; where they overlap the lower label wins (noted)."""
    label_map = _kji_zeros(size, np.uint8)
    for structure in sorted(STRUCTURES, key=lambda s: -s.label):  # paint high labels first: lower labels win
        roi = structure_rois.get(structure.name)
        if roi is not None and roi.mask is not None:
            # through the transposes: the (K, J, I) memory order, in which the masks are contiguous
            overlap = int((label_map.T[roi.mask.T] != 0).sum())
            if overlap:
                notes.append(f"{structure.name} overlaps higher-numbered structures in {overlap} voxel(s); it wins")
            label_map.T[roi.mask.T] = structure.label
    return label_map


def _kji_zeros(size: tuple[int, ...], dtype: type) -> np.ndarray:
    """Zeros of shape ``(I, J, K)`` stored in SimpleITK's (K, J, I) order: a slice ``[:, :, k]`` is contiguous (the
    rasteriser fills slice by slice) and the label image is made without a transposing copy."""
    return np.zeros(size[::-1], dtype=dtype).T


def _roi_number(item: Dataset, keyword: str, path: Path, what: str) -> int:
    """The ROI number ``keyword`` of a sequence item, as an int.

    Raises:
        RTStructError: if it is missing or not an integer (without it contours cannot be matched to their ROI).
    """
    value = item.get(keyword)
    try:
        return int(value)
    except (TypeError, ValueError):
        tag = pydicom.datadict.tag_for_keyword(keyword) or 0
        raise RTStructError(
            f"{path}: {what} has {'no' if value is None else f'an invalid ({value!r})'} {keyword} "
            f"({tag >> 16:04X},{tag & 0xFFFF:04X}); expected the ROI number that links contours to their ROI"
        ) from None


def _assign_structures(rois: list[ROIInfo], path: Path, notes: list[str]) -> dict[str, ROIInfo]:
    """Pick one ROI per structure: the only non-empty one; refuse when two non-empty ROIs claim a structure."""
    chosen: dict[str, ROIInfo] = {}
    for structure in STRUCTURES:
        claims = [r for r in rois if r.structure is structure]
        filled = [r for r in claims if not r.empty]
        if len(filled) > 1:
            raise RTStructError(
                f"{path}: ROIs {', '.join(repr(r.name) for r in filled)} all map to {structure.name}; expected one. "
                "Rename the ROIs or remove a name from the synonym table"
            )
        if filled:
            chosen[structure.name] = filled[0]
        for roi in claims:
            if roi.empty:
                notes.append(f"ROI {roi.name!r} maps to {structure.name} but is empty")
    return chosen


def _check_contour_images(ds: Dataset, reference: CTVolume, path: Path, notes: list[str]) -> None:
    """Note contours that name images outside the reference series (same frame of reference, so they still fit)."""
    known = set(reference.sop_instance_uids)
    foreign = {
        str(image.ReferencedSOPInstanceUID)
        for item in ds.get("ROIContourSequence", [])
        for contour in item.get("ContourSequence", [])
        for image in contour.get("ContourImageSequence", [])
        if "ReferencedSOPInstanceUID" in image
    } - known
    if foreign:
        notes.append(
            f"{path.name}: contours reference {len(foreign)} image(s) not in CT series "
            f"{reference.series_instance_uid} (missing slices, or another series in the same frame of reference); "
            "contours are placed by their coordinates"
        )
