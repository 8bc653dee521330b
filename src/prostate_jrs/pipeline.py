"""Plain-Python end to end: planning CT + planning contours + daily CT (volumes with geometry) -> daily contours.

Stages of :func:`run_pipeline` (each timed):

1. ``rigid``: rigid pre-alignment on bone (:func:`prostate_jrs.rigid.align_on_bone`), giving ``R``, the 4x4 map of
   daily-frame points (LPS mm) to planning-frame points. Planning and daily CT usually come from different
   sessions, frames of reference and couch positions, so their world coordinates do not correspond without it.
2. ``preprocess``: the *model grid* (:func:`prostate_jrs.preprocessing.model_inputs`, the same step the bundle's
   ``ModelGridd`` runs on datalist items): daily CT axes reoriented to RAS, isotropic ``model_spacing``, cropped to
   the planning contours (mapped into the daily frame by ``R^-1``) plus ``crop_margin_mm`` and to the daily CT's
   extent (less the network's context border, where the contours allow), grown by that border; daily CT, planning CT
   and planning label map (both through ``R``) resampled onto it once and the CTs scaled from ``[hu_min, hu_max]`` to
   ``[-1, 1]``, crop-first so a 512 x 512 CT is never resampled whole. Parameters come from the bundle
   (:func:`load_bundle`), so bundle and app agree.
3. ``network``: :class:`~prostate_jrs.inferers.ValidPatchInferer` over the model grid -> ``pred`` (3 DDF + 5 logits).
4. ``refine``: test-time instance optimisation of the DDF (:mod:`prostate_jrs.refine`) with the bundle's setting
   (``settings.refine``; ``None`` skips it), then an optional caller-supplied step ``refine(inputs, pred)``. A
   refinement that reads nothing of the network's output (the default: from the rigid alignment, unguided) runs in a
   thread beside a CPU engine's network, each on one thread: on two cores both take about as long as the refinement
   alone (same results; ``refine`` then times what it ran past the network).
5. ``restore``: :func:`prostate_jrs.evaluation.restore_to_daily_grid` with the planning contours placed in the daily
   frame by ``R^-1``: DDF, registration path (original planning contours warped once), segmentation path and the
   final contours per structure (``contour_source``) on the daily CT's own grid.
6. ``qa``: :func:`prostate_jrs.qa.quality_report`.

DDF of the result (the convention of the DSR writer, :mod:`prostate_jrs.dicom.registration`): ``(3, I, J, K)``
float32 on the daily grid, in daily voxel units, relative to the *rigidly aligned* planning scan. The planning
anatomy shown at daily voxel ``x`` lies at the planning-frame point ``R @ A_daily @ (x + ddf(x))`` (``A_daily``:
the daily grid's index-to-world matrix); with ``R = I`` this is the DDF convention of docs/ARCHITECTURE.md. Write
it with ``write_deformable_registration(ddf, daily, ..., daily_to_planning=R)``: the rigid part becomes the
pre-deformation matrix, the DDF the grid.

Safety rules checked here (no setting switches them off): the label map must lie on the planning CT's grid; where
the images carry DICOM meta-data (as :func:`prostate_jrs.dicom.ct_reader.read_ct_series` sets it), planning CT,
planning labels and daily CT must be of one patient and the labels in the planning CT's frame of reference; the
planning contours must fall inside the daily CT after the rigid alignment.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import SimpleITK as sitk
import torch
from torch import nn

from prostate_jrs.backends import BACKENDS, resolve_backend
from prostate_jrs.dicom.ct_reader import METADATA_KEYS
from prostate_jrs.errors import BundleError, PipelineError
from prostate_jrs.evaluation import DailyGridResult, resolve_contour_source, restore_to_daily_grid
from prostate_jrs.geometry import array_view, ddf_to_grid, index_to_world, label_counts, world_to_index
from prostate_jrs.hounsfield import BODY_HU
from prostate_jrs.inferers import RefiningInferer, ValidPatchInferer
from prostate_jrs.labels import NUM_CLASSES
from prostate_jrs.preprocessing import ModelInputs, PreprocessingError, box_corners, model_grid, model_inputs
from prostate_jrs.qa import DISAGREEMENT_DSC, DISAGREEMENT_HD95_MM, check_disagreement_limits, quality_report
from prostate_jrs.refine import RefineSettings, context_similarity, refine_context, refine_prediction
from prostate_jrs.rigid import RigidAlignment
from prostate_jrs.trust import model_hash_problem

if TYPE_CHECKING:
    from monai.bundle import ConfigParser

__all__ = [
    "BundleError",
    "PipelineError",
    "PipelineResult",
    "PipelineSettings",
    "RefineStep",
    "RigidAlignment",
    "load_bundle",
    "model_grid",
    "run_pipeline",
]

RefineStep = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``refine(inputs, pred) -> pred`` on the model grid: pred ``(1, 8, *S)``; inputs ``(1, 3, *(S + 2b))`` with the
network's context border ``b`` of real anatomy around pred's grid."""

_GRID_TOLERANCE = 1e-3  # mm / direction cosine: the label map must lie on the planning CT grid


@dataclass(frozen=True)
class PipelineSettings:
    """Settings of :func:`run_pipeline`; :func:`load_bundle` reads them from the bundle's ``configs/inference.json``.

    Args:
        network_name: the bundle's ``network_name`` (forces the contour path of single-task networks).
        model_spacing: isotropic voxel size (mm) of the model grid.
        hu_min: HU mapped to -1 (values below clipped).
        hu_max: HU mapped to +1 (values above clipped).
        crop_margin_mm: margin around the planning contours of the model grid.
        patch_size: network input tile of the inferer.
        output_size: network output for one tile; ``None`` for ``patch_size - 40``.
        tile_batch_size: tiles per network call.
        max_tile_voxels: fit the tiles to the model grid with at most this many input voxels each; ``None`` for
            ``patch_size`` tiles (:class:`~prostate_jrs.inferers.ValidPatchInferer`).
        backend: what runs the network (:mod:`prostate_jrs.backends`): ``torch`` (here the default: the network
            as given), ``auto``, ``openvino`` or ``onnxruntime``; the bundle's ``backend`` (default ``auto``).
        onnx_file: the bundle's ONNX export of the network (ONNX backends); ``None`` for the cache folder.
        amp: autocast the network on CUDA (ignored on the CPU).
        contour_source: structure -> ``"reg"`` or ``"seg"`` (missing: the project default).
        device: torch device of the network.
        rigid: run the rigid pre-alignment on bone; ``False`` only when both scans share a frame of reference and
            couch position (then ``R = I``; the QA records that no alignment ran).
        disagreement_dsc: QA flag when a structure's DSC between the two paths is below this.
        disagreement_hd95_mm: QA flag when a structure's 95% Hausdorff distance (mm) between the two paths is above
            this (a local disagreement that DSC hides).
        folding_limit: QA flag when the fraction of folded DDF voxels (det J <= 0) is above this.
        volume_change_limit_pct: QA flag when a structure's volume changes by more than this against planning.
        residual_limit: QA flag when the rigid alignment's bone surface RMS residual (mm) is above this.
        body_hu: HU above which a daily voxel counts as body for the DDF statistics.
        refine: test-time refinement of the DDF after the network (:mod:`prostate_jrs.refine`); ``None``: off.
    """

    network_name: str = "cross_stitch"
    model_spacing: float = 1.0
    hu_min: float = -1000.0
    hu_max: float = 1000.0
    crop_margin_mm: float = 40.0
    patch_size: int = 96
    output_size: int | None = None
    tile_batch_size: int = 2
    max_tile_voxels: int | None = None
    backend: str = "torch"
    onnx_file: str | None = None
    amp: bool = False
    contour_source: Mapping[str, str] = field(default_factory=dict)
    device: str = "cpu"
    rigid: bool = True
    disagreement_dsc: float = DISAGREEMENT_DSC
    disagreement_hd95_mm: float = DISAGREEMENT_HD95_MM
    folding_limit: float = 0.001
    volume_change_limit_pct: float = 50.0
    residual_limit: float = 3.0
    body_hu: float = BODY_HU
    refine: RefineSettings | None = None

    def __post_init__(self) -> None:
        if self.model_spacing <= 0:
            raise ValueError(f"model_spacing must be positive, got {self.model_spacing}")
        if self.hu_max <= self.hu_min:
            raise ValueError(f"hu_max ({self.hu_max}) must exceed hu_min ({self.hu_min})")
        if self.crop_margin_mm < 0:
            raise ValueError(f"crop_margin_mm must be >= 0, got {self.crop_margin_mm}")
        resolve_contour_source(self.network_name, self.contour_source)  # raises on unknown names or paths
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        check_disagreement_limits(self.disagreement_dsc, self.disagreement_hd95_mm)

    @property
    def resolved_contour_source(self) -> dict[str, str]:
        """Per-structure contour path, forced to the one path of single-task networks."""
        return resolve_contour_source(self.network_name, self.contour_source)


@dataclass
class PipelineResult:
    """What :func:`run_pipeline` returns; every image lies on the daily CT's grid.

    The DDF stays on the model grid (:attr:`model_ddf`) until a grid asks for it: :meth:`ddf_on` restores it straight
    onto that grid (the registration object's, the contour masks'), in float32; :attr:`ddf` is the whole daily grid
    (about 0.4 GB at 512 x 512 x 122, made on first use).

    Attributes:
        labels: final contours, uint8 label map (0..4).
        reg: registration path (planning contours warped by the rigid part and the DDF), uint8.
        seg: segmentation path (argmax of the logits; 0 outside the network's field of view), uint8.
        model_ddf: float32 ``(3, *model grid)``: the network's (or refined) DDF in model voxel units.
        rigid: the rigid part ``R`` (daily -> planning) and its residual.
        fov: boolean ``(I, J, K)``: daily voxels inside the model grid (what the network saw).
        model_grid: geometry of the model grid (a uint8 image; only its geometry means anything).
        contour_source: the per-structure path used for ``labels``.
        qa: the QA report (:func:`prostate_jrs.qa.quality_report`).
        timings: seconds per stage (``rigid``, ``preprocess``, ``network``, ``refine``, ``restore``, ``qa``,
            ``total``). When the refinement runs beside the network (``qa["refine"]["beside_network"]``), ``refine``
            is the time it ran past the network; its own duration is ``qa["refine"]["seconds"]``.
    """

    labels: sitk.Image
    reg: sitk.Image
    seg: sitk.Image
    model_ddf: np.ndarray
    rigid: RigidAlignment
    fov: np.ndarray
    model_grid: sitk.Image
    contour_source: dict[str, str]
    qa: dict[str, Any]
    timings: dict[str, float]

    def ddf_on(self, grid: sitk.Image) -> np.ndarray:
        """The DDF on ``grid`` (any grid in the daily frame): float32 ``(3, *size)`` in voxel units of ``grid``,
        relative to the rigidly aligned planning scan (module docstring); beyond the model grid its edge values."""
        return ddf_to_grid(self.model_ddf, index_to_world(self.model_grid), index_to_world(grid), grid.GetSize())

    @cached_property
    def ddf(self) -> np.ndarray:
        """The DDF on the whole daily grid, ``ddf_on(labels)`` (made on first use)."""
        return self.ddf_on(self.labels)


# --------------------------------------------------------------------------------------------------- bundle


def load_bundle(
    bundle_dir: str | os.PathLike[str],
    device: str = "cpu",
    overrides: Mapping[str, Any] | None = None,
) -> tuple[nn.Module, PipelineSettings]:
    """Network with the bundle's weights and the pipeline settings from its ``configs/inference.json``.

    Args:
        bundle_dir: the bundle folder (``configs/inference.json``, ``models/model.pt``).
        device: torch device for the network.
        overrides: config values to override (e.g. ``{"tile_batch_size": 4}``, ``{"refine#mode": "off"}``), as
            ``monai.bundle`` would.

    Returns:
        ``(network, settings)``; the network is in eval mode on ``device``.

    Raises:
        BundleError: if ``configs/inference.json`` or ``models/model.pt`` is missing, the weights are not those whose
            sha256 ``configs/metadata.json`` records, they do not fit the configured network, or a setting of
            ``inference.json`` is out of range (the message names the file and the key).
    """
    from monai.bundle import ConfigParser  # bundle parsing pulls in the config machinery; keep it off import

    root = Path(bundle_dir)
    config_file, weights = _bundle_files(root)
    parser = ConfigParser()
    parser.read_config(str(config_file))
    parser["bundle_root"] = str(root)
    for key, setting in dict(overrides or {}).items():
        parser[key] = setting
    try:
        settings = _settings_from_config(parser, device)
    except ValueError as err:  # a bad value names the config it came from
        raise BundleError(f"{config_file}: {err}") from err
    network = parser.get_parsed_content("network_def", instantiate=True)
    checkpoint = torch.load(weights, map_location="cpu", weights_only=True)
    state = checkpoint.get("model", checkpoint) if isinstance(checkpoint, dict) else checkpoint
    try:
        network.load_state_dict(state)
    except RuntimeError as err:
        raise BundleError(
            f"{weights}: the weights do not fit network {settings.network_name!r} as configured in {config_file} "
            f"(network_name / widths): {str(err).splitlines()[0]}"
        ) from err
    network.to(device).eval()
    return network, settings


def _bundle_files(root: Path) -> tuple[Path, Path]:
    """``configs/inference.json`` and ``models/model.pt`` of bundle ``root``, the weights checked against their hash.

    Raises:
        BundleError: if either file is missing or the weights are not those ``configs/metadata.json`` records.
    """
    config_file = root / "configs" / "inference.json"
    weights = root / "models" / "model.pt"
    if not config_file.is_file():
        raise BundleError(f"{config_file}: not found; expected a MONAI bundle folder (configs/inference.json)")
    if not weights.is_file():
        raise BundleError(
            f"{weights}: no model weights; train the bundle (bundle/configs/train.json) or copy a model.pt there"
        )
    if problem := model_hash_problem(root):  # the weights must be those its metadata.json records
        raise BundleError(problem)
    return config_file, weights


def _settings_from_config(parser: ConfigParser, device: str) -> PipelineSettings:
    """The pipeline settings of a parsed ``inference.json``: its values (the QA's flag limits ``qa_*``), its inferer's
    tiling and refinement."""

    def value(key: str, default: Any) -> Any:
        return parser.get_parsed_content(key) if key in parser else default

    def number(key: str, default: float) -> float:
        raw = value(key, default)
        try:
            return float(raw)
        except (TypeError, ValueError):
            raise ValueError(f"{key} must be a number, got {raw!r}") from None

    # tiling as the bundle's inferer does it (valid convolutions: any tile size works, the bundle picks one)
    inferer = parser.get_parsed_content("inferer") if "inferer" in parser else None
    refine = None
    if isinstance(inferer, RefiningInferer):  # the bundle's refinement setting is the pipeline's
        refine = inferer.settings
        inferer = inferer.inferer
    if not isinstance(inferer, ValidPatchInferer):
        inferer = ValidPatchInferer(96, None, 2, backend="auto")
    return PipelineSettings(
        network_name=str(value("network_name", "cross_stitch")),
        model_spacing=float(value("model_spacing", 1.0)),
        hu_min=float(value("hu_min", -1000.0)),
        hu_max=float(value("hu_max", 1000.0)),
        crop_margin_mm=float(value("crop_margin_mm", 40.0)),
        patch_size=int(inferer.patch_size[0]),
        output_size=int(inferer.output_size[0]),
        tile_batch_size=inferer.tile_batch_size,
        max_tile_voxels=inferer.max_tile_voxels,
        backend=inferer.backend,
        onnx_file=inferer.onnx_file,
        amp=inferer.amp,
        contour_source=dict(value("contour_source", {}) or {}),
        device=device,
        disagreement_dsc=number("qa_disagreement_dsc", DISAGREEMENT_DSC),
        disagreement_hd95_mm=number("qa_disagreement_hd95_mm", DISAGREEMENT_HD95_MM),
        refine=refine,
    )


# --------------------------------------------------------------------------------------------------- checks


def _meta(image: sitk.Image, keyword: str) -> str:
    key = METADATA_KEYS[keyword]
    return image.GetMetaData(key).strip() if image.HasMetaDataKey(key) else ""


def _same_grid(a: sitk.Image, b: sitk.Image) -> bool:
    return (
        a.GetSize() == b.GetSize()
        and np.allclose(a.GetSpacing(), b.GetSpacing(), atol=_GRID_TOLERANCE)
        and np.allclose(a.GetOrigin(), b.GetOrigin(), atol=_GRID_TOLERANCE)
        and np.allclose(a.GetDirection(), b.GetDirection(), atol=_GRID_TOLERANCE)
    )


def _check_inputs(planning_ct: sitk.Image, planning_labels: sitk.Image, daily_ct: sitk.Image) -> np.ndarray:
    """Safety checks; returns the planning label array ``(I, J, K)`` uint8."""
    for name, image in (("planning CT", planning_ct), ("planning labels", planning_labels), ("daily CT", daily_ct)):
        if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
            raise PipelineError(f"the {name} must be a scalar 3-D image, got {image.GetDimension()}-D")
    if not _same_grid(planning_ct, planning_labels):
        raise PipelineError(
            "the planning label map is not on the planning CT's grid (size, spacing, origin, direction: "
            f"{planning_labels.GetSize()} vs {planning_ct.GetSize()}, {planning_labels.GetOrigin()} vs "
            f"{planning_ct.GetOrigin()}); contours are only used on the CT they were drawn on"
        )
    patients = {
        name: _meta(image, "PatientID")
        for name, image in (("planning CT", planning_ct), ("planning labels", planning_labels), ("daily CT", daily_ct))
    }
    known = {name: pid for name, pid in patients.items() if pid}
    if len(set(known.values())) > 1:
        raise PipelineError(
            "the inputs belong to different patients ("
            + ", ".join(f"{name}: PatientID {pid!r}" for name, pid in known.items())
            + "); series of different patients are never combined"
        )
    frame_ct, frame_labels = _meta(planning_ct, "FrameOfReferenceUID"), _meta(planning_labels, "FrameOfReferenceUID")
    if frame_ct and frame_labels and frame_ct != frame_labels:
        raise PipelineError(
            f"the planning labels are in frame of reference {frame_labels}, the planning CT in {frame_ct}; contours "
            "are only used in their own frame of reference"
        )
    labels = array_view(planning_labels)  # no copy: the label map is read, never written
    if not np.issubdtype(labels.dtype, np.integer):
        rounded = np.rint(labels)
        if not np.array_equal(rounded, labels):
            raise PipelineError("the planning label map has non-integer values; expected labels 0..4")
        labels = rounded
    values = np.flatnonzero(label_counts(labels)) if labels.dtype == np.uint8 else np.unique(labels)
    bad = [int(v) for v in values if not 0 <= v < NUM_CLASSES]
    if bad:
        raise PipelineError(
            f"the planning label map has values {bad[:5]}; expected 0 background, 1 prostate, 2 seminal_vesicles, "
            "3 rectum, 4 bladder"
        )
    if values.max(initial=0) == 0:
        raise PipelineError("the planning label map is empty: no planning contour to propagate")
    return labels.astype(np.uint8, copy=False)


# --------------------------------------------------------------------------------------------------- rigid


def _align(daily_ct: sitk.Image, planning_ct: sitk.Image) -> RigidAlignment:
    """Rigid alignment on bone (:func:`prostate_jrs.rigid.align_on_bone`: daily = fixed, planning = moving)."""
    from prostate_jrs.rigid import NoBoneError, align_on_bone

    try:
        result = align_on_bone(daily_ct, planning_ct)
    except NoBoneError as err:
        raise PipelineError(f"rigid pre-alignment on bone failed: {err}") from err
    return RigidAlignment(
        daily_to_planning=np.asarray(result.matrix, dtype=np.float64),
        residual=float(result.bone_rms_mm),
        method="bone",
        bone_overlap=float(result.bone_overlap),
    )


# --------------------------------------------------------------------------------------------------- restore


def _daily_box(grid: sitk.Image, daily_ct: sitk.Image) -> tuple[np.ndarray, np.ndarray]:
    """Index box ``[lo, hi)`` of the daily voxels around the model grid (one voxel of margin), inside the daily CT."""
    size = np.asarray(grid.GetSize(), dtype=np.float64)
    corners = box_corners(grid, np.full(3, -0.5), size - 0.5)
    index = (world_to_index(daily_ct) @ np.c_[corners, np.ones(len(corners))].T).T[:, :3]
    lo = np.maximum(np.floor(index.min(axis=0)).astype(int) - 1, 0)
    hi = np.minimum(np.ceil(index.max(axis=0)).astype(int) + 2, np.asarray(daily_ct.GetSize()))
    return lo, hi


@dataclass
class _Restored:
    """Both contour paths, the final contours and the field of view in the daily box around the model grid (a
    :class:`DailyGridResult` on the daily voxels from index ``lo`` on); outside the box everything is background."""

    box: DailyGridResult
    lo: np.ndarray

    def _slices(self, shape: tuple[int, ...]) -> tuple[slice, ...]:
        return tuple(slice(int(a), int(a) + n) for a, n in zip(self.lo, shape, strict=True))

    def image(self, name: str, reference: sitk.Image) -> sitk.Image:
        """The map ``name`` (``labels``, ``reg``, ``seg``) on the daily grid: one conversion, made straight in
        SimpleITK's (K, J, I) order."""
        box = getattr(self.box, name)
        array = np.zeros(reference.GetSize()[::-1], dtype=np.uint8)
        array[self._slices(box.shape)[::-1]] = box.transpose(2, 1, 0)
        image = sitk.GetImageFromArray(array)
        image.CopyInformation(reference)
        return image

    def fov(self, size: tuple[int, ...]) -> np.ndarray:
        """The field-of-view mask on the whole daily grid."""
        mask = np.zeros(size, dtype=bool)
        mask[self._slices(self.box.fov.shape)] = self.box.fov
        return mask


def _restore(
    pred: np.ndarray,
    grid: sitk.Image,
    daily_ct: sitk.Image,
    labels: np.ndarray,
    planning_affine: np.ndarray,
    contour_source: Mapping[str, str],
) -> _Restored:
    """:func:`restore_to_daily_grid`, computed only in the daily voxels around the model grid.

    A 512 x 512 daily CT has ~10x more voxels than the box the network saw; resampling them all cost most of the
    run time. Outside the box both contour paths are empty: the box holds the planning contours plus
    ``crop_margin_mm``, so a contour could only reach beyond it with a displacement larger than the margin. The DDF is
    not kept at daily resolution: :meth:`PipelineResult.ddf_on` restores it onto the grids that are written.
    """
    lo, hi = _daily_box(grid, daily_ct)
    shift = np.eye(4)
    shift[:3, 3] = lo
    box = restore_to_daily_grid(
        pred,
        index_to_world(grid),
        index_to_world(daily_ct) @ shift,
        tuple(hi - lo),
        labels,
        planning_affine,
        contour_source,
    )
    return _Restored(box, lo)


# --------------------------------------------------------------------------------------------------- pipeline


def run_pipeline(
    planning_ct: sitk.Image,
    planning_labels: sitk.Image,
    daily_ct: sitk.Image,
    network: nn.Module,
    settings: PipelineSettings,
    refine: RefineStep | None = None,
    *,
    rigid: RigidAlignment | None = None,
) -> PipelineResult:
    """Propagate the planning contours to the daily CT and segment it; results on the daily grid.

    Args:
        planning_ct: planning CT in HU (LPS geometry).
        planning_labels: planning label map (0..4) on the planning CT's grid.
        daily_ct: daily CT in HU.
        network: maps ``(n, 3, P, P, P)`` to ``(n, 8, P - 40, ...)`` (``pred`` = 3 DDF + 5 logits).
        settings: preprocessing, inference and QA settings (:func:`load_bundle`).
        refine: optional step ``refine(inputs, pred) -> pred`` on the model grid, run after the network.
        rigid: a rigid pre-alignment to use instead of computing one (e.g. one a user approved).

    Returns:
        Contours, both paths, the DDF, the rigid part, QA and timings (see :class:`PipelineResult`).

    Raises:
        PipelineError: if the inputs break a safety rule or the contours do not fit the daily CT.
    """
    clock = _StageClock()
    labels = _check_inputs(planning_ct, planning_labels, daily_ct)
    if rigid is None:
        rigid = _align(daily_ct, planning_ct) if settings.rigid else RigidAlignment(np.eye(4), None, "none")
    clock.lap("rigid")

    inferer = _inferer(settings)
    # the network sees real anatomy, not padding, for its border around the grid (ValidPatchInferer.includes_context)
    model = _model_inputs(planning_ct, planning_labels, daily_ct, rigid, settings, context_voxels=inferer.border[0])
    clock.lap("preprocess")

    network.eval()
    context_tensor = torch.from_numpy(model.image)[None].to(torch.device(settings.device))
    if _refines_beside_network(settings):
        pred, refine_report = _network_beside_refinement(context_tensor, network, inferer, settings, clock)
    else:
        with torch.inference_mode():
            pred = inferer(context_tensor, network)
        clock.lap("network")
        pred, refine_report = _refine(context_tensor, pred, settings)
    pred = _caller_refine(context_tensor, pred, refine)
    clock.lap("refine")

    contour_source = settings.resolved_contour_source
    planning_affine = np.linalg.inv(rigid.daily_to_planning) @ index_to_world(planning_labels)
    model_ddf = pred[0, :3].detach().cpu().numpy()
    restored = _restore(pred[0].detach().cpu().numpy(), model.grid, daily_ct, labels, planning_affine, contour_source)
    images = {name: restored.image(name, daily_ct) for name in ("labels", "reg", "seg")}  # fields of the result
    clock.lap("restore")

    qa = _quality(restored, model, model_ddf, labels, planning_ct, daily_ct, rigid, settings)
    qa["refine"] = refine_report
    clock.lap("qa")
    timings = clock.finish()
    qa["timings_s"] = dict(timings)
    return PipelineResult(
        **images,
        model_ddf=model_ddf,
        rigid=rigid,
        fov=restored.fov(daily_ct.GetSize()),
        model_grid=model.grid,
        contour_source=contour_source,
        qa=qa,
        timings=timings,
    )


def _quality(
    restored: _Restored,
    model: ModelInputs,
    model_ddf: np.ndarray,
    planning_labels: np.ndarray,
    planning_ct: sitk.Image,
    daily_ct: sitk.Image,
    rigid: RigidAlignment,
    settings: PipelineSettings,
) -> dict[str, Any]:
    """:func:`prostate_jrs.qa.quality_report` of a run, on the restored box: every contour voxel lies in it."""
    return quality_report(
        reg=restored.box.reg,
        seg=restored.box.seg,
        final=restored.box.labels,
        daily_grid=daily_ct,
        planning_labels=planning_labels,
        planning_grid=planning_ct,
        model_ddf=model_ddf,
        body_mask=model.daily_hu[model.inner] > settings.body_hu,
        rigid=rigid,
        contour_source=settings.resolved_contour_source,
        settings=settings,
    )


class _StageClock:
    """Seconds per stage of one run (rounded to ms), and the total."""

    def __init__(self) -> None:
        self.timings: dict[str, float] = {}
        self.start = self.clock = time.perf_counter()

    def lap(self, stage: str) -> None:
        """Record the time since the previous lap (or the start) as ``stage``."""
        now = time.perf_counter()
        self.timings[stage] = round(now - self.clock, 3)
        self.clock = now

    def finish(self) -> dict[str, float]:
        """The stages' times with ``total``, the time since the start."""
        self.timings["total"] = round(time.perf_counter() - self.start, 3)
        return self.timings


def _inferer(settings: PipelineSettings) -> ValidPatchInferer:
    """The tiling inferer of ``settings``; its inputs carry real context (``includes_context``), its output is on
    the CPU. ``output_size`` ``None`` is the inferer's default, ``patch_size - 40``."""
    return ValidPatchInferer(
        patch_size=settings.patch_size,
        output_size=settings.output_size,
        tile_batch_size=settings.tile_batch_size,
        amp=settings.amp,
        sw_device=torch.device(settings.device),
        device="cpu",
        includes_context=True,
        max_tile_voxels=settings.max_tile_voxels,
        backend=settings.backend,
        onnx_file=settings.onnx_file,
    )


def _model_inputs(
    planning_ct: sitk.Image,
    planning_labels: sitk.Image,
    daily_ct: sitk.Image,
    rigid: RigidAlignment,
    settings: PipelineSettings,
    context_voxels: int,
) -> ModelInputs:
    """:func:`prostate_jrs.preprocessing.model_inputs` with the settings; contours that miss the daily CT are a
    :class:`PipelineError`."""
    try:
        return model_inputs(
            daily_ct,
            planning_ct,
            planning_labels,
            rigid.daily_to_planning,
            spacing=settings.model_spacing,
            margin_mm=settings.crop_margin_mm,
            context_voxels=context_voxels,
            hu_min=settings.hu_min,
            hu_max=settings.hu_max,
        )
    except PreprocessingError as err:
        raise PipelineError(str(err)) from err


def _refine(
    context_tensor: torch.Tensor, pred: torch.Tensor, settings: PipelineSettings
) -> tuple[torch.Tensor, dict[str, Any]]:
    """The bundle's refinement (``settings.refine``) after the network; returns ``pred`` and the report."""
    if settings.refine is None:
        return pred, {"mode": "off"}
    pred, refined = refine_prediction(context_tensor, pred.to(context_tensor.device), settings.refine)
    return pred, refined.as_dict()


def _refines_beside_network(settings: PipelineSettings) -> bool:
    """Whether the refinement can run in a thread beside the network: it reads nothing the network makes (it starts
    from the rigid alignment, unguided), both run on the CPU, the network on an engine (OpenVINO, ONNX Runtime: torch
    eager on the refinement's threads would be slower than alone on all of them) and there are threads for both."""
    refine = settings.refine
    return (
        refine is not None
        and not refine.needs_network
        and refine.cpu_threads is not None
        and torch.device(settings.device).type == "cpu"
        and resolve_backend(settings.backend, settings.device) != "torch"
        and torch.get_num_threads() >= 2 * refine.cpu_threads
    )


def _network_beside_refinement(
    context_tensor: torch.Tensor,
    network: nn.Module,
    inferer: ValidPatchInferer,
    settings: PipelineSettings,
    clock: _StageClock,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """The network and the refinement at once, each on the refinement's ``cpu_threads``; laps ``network`` when the
    network is done (``refine`` is then the time the refinement runs past it). Same results as one after the other.

    On two cores the refinement (one thread) and the network (otherwise two) take about as long as the refinement
    alone. torch's thread count is one per process, so it is set for both before the thread starts (the network's
    engine takes its threads from it) and restored after.
    """
    assert settings.refine is not None and settings.refine.cpu_threads is not None
    grid = tuple(n - 2 * b for n, b in zip(context_tensor.shape[2:], inferer.border, strict=True))
    threads = torch.get_num_threads()
    torch.set_num_threads(settings.refine.cpu_threads)
    try:
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="refine") as pool:
            refining = pool.submit(refine_context, context_tensor, torch.zeros(1, 3, *grid), settings.refine)
            with torch.inference_mode():
                pred = inferer(context_tensor, network)
            clock.lap("network")
            # what the report says of the network's field, measured while the refinement is still running
            network_similarity = context_similarity(context_tensor, pred[:, :3], settings.refine)
            ddf, refined = refining.result()
    finally:
        torch.set_num_threads(threads)
    refined.similarity_before = network_similarity
    report = {**refined.as_dict(), "beside_network": True}
    return torch.cat([ddf.to(pred.dtype), pred[:, 3:]], dim=1), report


def _caller_refine(context_tensor: torch.Tensor, pred: torch.Tensor, refine: RefineStep | None) -> torch.Tensor:
    """The caller's ``refine(inputs, pred)`` step, if any.

    Raises:
        ValueError: if it changes the shape of ``pred``.
    """
    if refine is None:
        return pred
    expected = tuple(pred.shape)
    pred = refine(context_tensor.clone(), pred.clone())
    if tuple(pred.shape) != expected:
        raise ValueError(f"refine returned pred of shape {tuple(pred.shape)}; expected that of its input")
    return pred
