"""From network-grid predictions to results on the daily CT's own grid, and tables of metrics.

The bundle runs the network on a *model grid*: the daily CT reoriented (RAS), resampled to the model
spacing and cropped around the planning contours. Everything a user sees (label maps, the DDF, metrics in
mm) lives on the *daily grid*, the voxel grid of the daily CT file. The functions here move data between
the two with the world mapping carried by 4x4 index-to-world affines (MONAI/NIfTI RAS; any common world
frame works, the LPS/RAS flip cancels in every formula):

* scalar or label data: resampled through ``A_model^-1 @ A_daily``
  (:func:`prostate_jrs.geometry.resample_to_grid`, re-exported here);
* a DDF: resampled the same way *and* its vectors mapped from model-grid voxel units to daily-grid voxel
  units by ``A_daily[:3, :3]^-1 @ A_model[:3, :3]`` (:func:`prostate_jrs.geometry.ddf_to_grid`). This one matrix
  undoes the spacing ratio, axis flips and permutations of the reorientation; the crop offset is in the
  translation of the affines. A DDF is not an intensity image: ``Invertd`` would resample it but leave its
  vectors in model voxels.

Metrics use :mod:`prostate_jrs.metrics`; this module only arranges them per case, structure and path.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from monai.transforms import KeepLargestConnectedComponent

from prostate_jrs.geometry import ddf_to_grid, ddf_vector_map, field_of_view_mask, label_box, resample_to_grid
from prostate_jrs.labels import SINGLE_COMPONENT_LABELS, STRUCTURES
from prostate_jrs.metrics import deformation_quality, structure_metrics

__all__ = [
    "DEFAULT_CONTOUR_SOURCE",
    "PATHS",
    "DailyGridResult",
    "case_metrics",
    "compose_contours",
    "compose_rigid",
    "ddf_error",
    "ddf_to_grid",
    "deployed_refine",
    "field_of_view_mask",
    "keep_largest_components",
    "output_grid_affine",
    "registration_path",
    "resample_to_grid",
    "resolve_contour_source",
    "restore_to_daily_grid",
    "spacing_from_affine",
    "summarize",
    "update_eval_metrics",
    "write_csv",
]

#: Contour paths: ``reg`` = planning contours warped by the DDF, ``seg`` = argmax of the segmentation head,
#: ``final`` = per-structure choice between the two (:func:`compose_contours`).
PATHS: tuple[str, str, str] = ("reg", "seg", "final")

#: Default source of each structure's final contour. The registration path keeps the clinician's planning
#: delineation of the low-contrast targets (prostate, seminal vesicles), whose outline CT barely shows; the
#: segmentation path follows the filling changes of rectum and bladder, which a smooth DDF underestimates
#: (docs/ARCHITECTURE.md, "Per-organ contour source"; not yet confirmed against the paper).
DEFAULT_CONTOUR_SOURCE: dict[str, str] = {
    "prostate": "reg",
    "seminal_vesicles": "reg",
    "rectum": "seg",
    "bladder": "seg",
}

# Painting order of the final label map: later structures overwrite earlier ones where paths disagree, so
# the targets (prostate, then seminal vesicles) win over the organs at risk.
_PAINT_ORDER: tuple[str, ...] = ("bladder", "rectum", "seminal_vesicles", "prostate")

#: Networks with only one task; their final contours must come from that task's path.
_SINGLE_PATH: dict[str, str] = {"seg": "seg", "reg": "reg", "jrs_reg": "reg"}


def resolve_contour_source(network_name: str, contour_source: Mapping[str, str] | None = None) -> dict[str, str]:
    """Per-structure contour source, forced to the one path a single-task network has.

    Args:
        network_name: the bundle's ``network_name`` (``seg``, ``reg``, ``jrs_reg``, ``dense``, ``sedd``,
            ``cross_stitch``).
        contour_source: structure name -> ``"reg"`` or ``"seg"``; missing structures take
            :data:`DEFAULT_CONTOUR_SOURCE`.

    Raises:
        ValueError: on an unknown structure or path.
    """
    known = {s.name for s in STRUCTURES}
    source = dict(DEFAULT_CONTOUR_SOURCE)
    for name, path in dict(contour_source or {}).items():
        if name not in known:
            raise ValueError(f"contour_source names unknown structure {name!r}; expected some of {sorted(known)}")
        if path not in ("reg", "seg"):
            raise ValueError(f"contour_source[{name!r}] = {path!r}; expected 'reg' or 'seg'")
        source[name] = path
    forced = _SINGLE_PATH.get(network_name.lower().replace("-", "_"))
    if forced is not None:
        source = dict.fromkeys(source, forced)
    return source


def compose_contours(reg: np.ndarray, seg: np.ndarray, contour_source: Mapping[str, str]) -> np.ndarray:
    """Final label map taking each structure from the path named in ``contour_source``.

    Args:
        reg: label map of the registration path.
        seg: label map of the segmentation path, same shape.
        contour_source: structure name -> ``"reg"`` or ``"seg"`` (see :func:`resolve_contour_source`).

    Returns:
        uint8 label map; where two structures claim a voxel the targets win (prostate over seminal vesicles
        over rectum over bladder).

    Raises:
        ValueError: if the shapes differ.
    """
    reg, seg = np.asarray(reg), np.asarray(seg)
    if reg.shape != seg.shape:
        raise ValueError(f"registration and segmentation label maps differ in shape: {reg.shape} vs {seg.shape}")
    source = resolve_contour_source("", contour_source)
    final = np.zeros(reg.shape, dtype=np.uint8)
    labels = {s.name: s.label for s in STRUCTURES}
    for name in _PAINT_ORDER:
        path_map = reg if source[name] == "reg" else seg
        final[path_map == labels[name]] = labels[name]
    return final


def spacing_from_affine(affine: np.ndarray) -> tuple[float, float, float]:
    """Voxel size in mm along the three index axes of a 4x4 index-to-world matrix."""
    matrix = np.asarray(affine, dtype=np.float64)[:3, :3]
    return tuple(float(v) for v in np.linalg.norm(matrix, axis=0))  # type: ignore[return-value]


def output_grid_affine(input_affine: np.ndarray, input_shape: Sequence[int], output_shape: Sequence[int]) -> np.ndarray:
    """Affine of a centred valid-convolution output grid (stride 1) inside its input grid.

    A network that maps ``n`` voxels to ``n - 2b`` loses ``b`` voxels per side; its output voxel ``i`` is
    input voxel ``i + b``. For equal shapes this returns ``input_affine`` unchanged.

    Raises:
        ValueError: if an output axis is larger than the input or the difference is odd.
    """
    offsets = []
    for n_in, n_out in zip(input_shape, output_shape, strict=True):
        if n_out > n_in or (n_in - n_out) % 2:
            raise ValueError(f"output shape {tuple(output_shape)} is not a centred crop of {tuple(input_shape)}")
        offsets.append((n_in - n_out) // 2)
    shift = np.eye(4)
    shift[:3, 3] = offsets
    return np.asarray(input_affine, dtype=np.float64) @ shift


def compose_rigid(ddf: np.ndarray, affine: np.ndarray, daily_to_planning: np.ndarray, slab: int = 32) -> np.ndarray:
    """A DDF relative to the rigidly aligned planning scan, made relative to the planning scan's own coordinates.

    The network predicts ``ddf`` after the rigid pre-alignment ``R``: daily voxel ``x`` shows the planning point
    ``R @ A (x + ddf(x))``. The returned field ``full`` has ``A (x + full(x))`` equal to that point, so the DDF
    convention (docs/ARCHITECTURE.md) holds with the planning file's own affine (``R = I`` gives ``ddf`` back).
    ``det J`` is unchanged.

    Args:
        ddf: ``(3, I, J, K)`` in voxel units of the daily grid.
        affine: the daily grid's index-to-world matrix.
        daily_to_planning: ``R`` in the same world coordinates as ``affine``.
        slab: slices processed at once (bounds memory on large daily CTs).

    Returns:
        float32 ``(3, I, J, K)``.
    """
    field = np.asarray(ddf, dtype=np.float32)
    mapping = np.linalg.inv(affine) @ np.asarray(daily_to_planning, dtype=np.float64) @ np.asarray(affine)
    if np.allclose(mapping, np.eye(4), atol=1e-9):
        return field
    out = np.empty_like(field)
    shape = field.shape[1:]
    for k0 in range(0, shape[2], slab):
        k1 = min(k0 + slab, shape[2])
        grid = np.stack(
            np.meshgrid(
                np.arange(shape[0], dtype=np.float64),
                np.arange(shape[1], dtype=np.float64),
                np.arange(k0, k1, dtype=np.float64),
                indexing="ij",
            )
        )
        points = grid + field[:, :, :, k0:k1]
        out[:, :, :, k0:k1] = np.tensordot(mapping[:3, :3], points, axes=1) + mapping[:3, 3, None, None, None] - grid
    return out


def summarize(
    rows: Iterable[Mapping[str, object]], group_by: Sequence[str], metrics: Sequence[str]
) -> list[dict[str, object]]:
    """Mean, SD (population), median and count of each metric per group, NaN values left out.

    Args:
        rows: one mapping per case and group, e.g. ``{"path": "reg", "structure": "prostate", "dsc": 0.8}``.
        group_by: keys that define a group, in output order.
        metrics: keys of the numeric metrics.

    Returns:
        One row per group and metric with keys ``*group_by, metric, n, mean, sd, median``.
    """
    groups: dict[tuple, dict[str, list[float]]] = {}
    for row in rows:
        key = tuple(row[g] for g in group_by)
        bucket = groups.setdefault(key, {m: [] for m in metrics})
        for metric in metrics:
            value = float(row[metric])  # type: ignore[arg-type]
            if not math.isnan(value):
                bucket[metric].append(value)
    table: list[dict[str, object]] = []
    for key, bucket in groups.items():
        for metric in metrics:
            values = np.asarray(bucket[metric], dtype=np.float64)
            stats = (
                (float(values.mean()), float(values.std()), float(np.median(values)))
                if values.size
                else (math.nan, math.nan, math.nan)
            )
            table.append(
                {
                    **dict(zip(group_by, key, strict=True)),
                    "metric": metric,
                    "n": int(values.size),
                    "mean": stats[0],
                    "sd": stats[1],
                    "median": stats[2],
                }
            )
    return table


def write_csv(path: str | Path, rows: Sequence[Mapping[str, object]], columns: Sequence[str] | None = None) -> Path:
    """Write rows to a CSV file atomically (temporary file, then rename).

    Args:
        path: destination file; its folder is created.
        rows: the rows; all keys of the first row are the columns unless ``columns`` is given.
        columns: column order.

    Returns:
        The written path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = list(columns) if columns is not None else (list(rows[0]) if rows else [])
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    tmp.replace(path)
    return path


@dataclass
class DailyGridResult:
    """Network outputs brought back to the daily CT's own grid.

    Attributes:
        ddf: float32 ``(3, I, J, K)`` in voxel units of the daily grid (docs/ARCHITECTURE.md, "DDF convention").
        reg: uint8 planning label map warped by ``ddf`` (nearest neighbour) from the planning grid.
        seg: uint8 argmax of the segmentation logits (linearly resampled before the argmax), largest component of
            each single-organ label (:func:`keep_largest_components`).
        labels: uint8 final contours (:func:`compose_contours`).
        affine: the daily grid's index-to-world matrix.
        fov: boolean mask of the daily voxels the network saw (inside the model grid).
    """

    ddf: np.ndarray
    reg: np.ndarray
    seg: np.ndarray
    labels: np.ndarray
    affine: np.ndarray
    fov: np.ndarray


def keep_largest_components(label_map: np.ndarray) -> np.ndarray:
    """The label map with only the largest connected component of each :data:`SINGLE_COMPONENT_LABELS` label.

    A segmentation head now and then marks a few voxels of an organ far from it (e.g. bladder-like fluid in bowel);
    a prostate, rectum or bladder is one connected organ, so those islands are removed (MONAI
    ``KeepLargestConnectedComponent``, 26-connectivity). Removed voxels become background.

    Args:
        label_map: ``(I, J, K)`` or ``(1, I, J, K)`` integer labels.

    Returns:
        The cleaned map, same shape and dtype.
    """
    array = np.asarray(label_map)
    channel_first = array if array.ndim == 4 else array[None]
    out = np.zeros_like(channel_first)
    found = label_box(channel_first[0])
    if found is not None:  # components only within the labels' bounding box: outside it everything is background
        box = (slice(None), *found)
        kept = KeepLargestConnectedComponent(applied_labels=list(SINGLE_COMPONENT_LABELS), is_onehot=False)(
            torch.as_tensor(np.ascontiguousarray(channel_first[box]))
        )
        out[box] = np.asarray(kept).astype(array.dtype)
    return out if array.ndim == 4 else out[0]


def restore_to_daily_grid(
    pred: np.ndarray,
    pred_affine: np.ndarray,
    daily_affine: np.ndarray,
    daily_shape: Sequence[int],
    planning_labels: np.ndarray,
    planning_affine: np.ndarray,
    contour_source: Mapping[str, str],
) -> DailyGridResult:
    """Turn ``pred`` on the model grid into DDF, both contour paths and final contours on the daily grid.

    The registration path warps the *original* planning label map (its own grid, no intermediate
    resampling) with the daily-grid DDF. The segmentation path is zero outside the model grid's field of view,
    where the network saw nothing.

    Args:
        pred: ``(8, *model_shape)``: 3 DDF channels (model voxel units) and 5 segmentation logits.
        pred_affine: index-to-world matrix of ``pred``'s grid.
        daily_affine: index-to-world matrix of the daily CT.
        daily_shape: spatial shape of the daily CT.
        planning_labels: planning label map on its own grid, ``(I, J, K)`` or ``(1, I, J, K)``.
        planning_affine: index-to-world matrix of the planning label map.
        contour_source: structure name -> ``"reg"`` or ``"seg"``.

    Raises:
        ValueError: if ``pred`` does not have 8 channels.
    """
    pred = np.asarray(pred, dtype=np.float32)
    if pred.ndim != 4 or pred.shape[0] != 8:
        raise ValueError(f"expected pred of shape (8, I, J, K) (3 DDF + 5 logits), got {pred.shape}")
    shape = tuple(int(v) for v in daily_shape)
    fov = field_of_view_mask(pred_affine, pred.shape[1:], daily_affine, shape)
    # DDF and logits through one set of sampling points; the DDF's vectors are mapped to daily voxel units first (a
    # linear map commutes with the interpolation), as ddf_to_grid does
    converted = pred.copy()
    converted[:3] = np.tensordot(ddf_vector_map(pred_affine, daily_affine), pred[:3], axes=1)
    restored = resample_to_grid(converted, pred_affine, daily_affine, shape, order=1, mode="nearest")
    ddf = restored[:3]
    # torch's argmax: the first maximum, as numpy's, but without numpy's copy to put the channel axis last
    seg = torch.from_numpy(restored[3:]).argmax(dim=0).to(torch.uint8).numpy()
    del restored
    seg[~fov] = 0
    seg = keep_largest_components(seg)
    reg = registration_path(planning_labels, planning_affine, daily_affine, ddf)
    labels = compose_contours(reg, seg, contour_source)
    return DailyGridResult(ddf=ddf, reg=reg, seg=seg, labels=labels, affine=np.asarray(daily_affine), fov=fov)


def registration_path(
    planning_labels: np.ndarray, planning_affine: np.ndarray, daily_affine: np.ndarray, ddf: np.ndarray
) -> np.ndarray:
    """The registration path: the planning label map (its own grid) warped once by a daily-grid DDF, uint8.

    Only the labels' bounding box is resampled (outside it every label is 0, which is also the value outside the
    planning grid), so a 512 x 512 planning CT costs no more than its contours.

    Args:
        planning_labels: ``(I, J, K)`` or ``(1, I, J, K)`` labels on the planning grid.
        planning_affine: index-to-world matrix of the planning grid (in the daily frame).
        daily_affine: index-to-world matrix of the grid ``ddf`` lives on.
        ddf: ``(3, *daily_shape)`` in voxel units of that grid.
    """
    planning = np.asarray(planning_labels)
    planning = planning[0] if planning.ndim == 4 else planning
    planning = planning if planning.dtype == np.uint8 else np.rint(planning).astype(np.uint8)
    found = label_box(planning, margin=1)
    if found is None:
        return np.zeros(ddf.shape[1:], dtype=np.uint8)
    shift = np.eye(4)
    shift[:3, 3] = [box.start for box in found]
    box = planning[found]
    affine = np.asarray(planning_affine, dtype=np.float64) @ shift
    return resample_to_grid(box[None], affine, daily_affine, ddf.shape[1:], order=0, mode="constant", ddf=ddf)[0]


#: HU above which a daily voxel counts as body for the DDF error (air and couch below).
BODY_HU = -500.0


def ddf_error(
    ddf: np.ndarray, true_ddf: np.ndarray, affine: np.ndarray, mask: np.ndarray | None = None
) -> dict[str, float]:
    """Distance (mm) between the planning points a DDF and the ground-truth DDF assign to each daily voxel.

    Args:
        ddf: ``(3, I, J, K)`` in voxel units of the daily grid.
        true_ddf: the known DDF, same layout (phantoms: the datalist's ``ddf``).
        affine: the daily grid's index-to-world matrix (mm).
        mask: voxels to measure (e.g. body inside the network's field of view); ``None`` for all.

    Returns:
        ``ddf_error_mean_mm``, ``ddf_error_p95_mm`` and ``ddf_error_max_mm``; NaN for an empty mask.

    Raises:
        ValueError: if the fields or the mask differ in shape.
    """
    ddf, true_ddf = np.asarray(ddf, dtype=np.float32), np.asarray(true_ddf, dtype=np.float32)
    if ddf.shape != true_ddf.shape or ddf.ndim != 4 or ddf.shape[0] != 3:
        raise ValueError(f"DDFs must both be (3, I, J, K), got {ddf.shape} and {true_ddf.shape}")
    if mask is not None and tuple(mask.shape) != ddf.shape[1:]:
        raise ValueError(f"mask of shape {tuple(mask.shape)} does not match the DDF grid {ddf.shape[1:]}")
    linear = np.asarray(affine, dtype=np.float64)[:3, :3].astype(np.float32)
    error = np.linalg.norm(np.tensordot(linear, ddf - true_ddf, axes=1), axis=0)
    values = error[mask] if mask is not None else error.ravel()
    if values.size == 0:
        return {"ddf_error_mean_mm": math.nan, "ddf_error_p95_mm": math.nan, "ddf_error_max_mm": math.nan}
    return {
        "ddf_error_mean_mm": float(values.mean()),
        "ddf_error_p95_mm": float(np.percentile(values, 95)),
        "ddf_error_max_mm": float(values.max()),
    }


def case_metrics(
    result: DailyGridResult,
    reference: np.ndarray,
    case: str,
    patient: str = "",
    true_ddf: np.ndarray | None = None,
    daily_ct: np.ndarray | None = None,
) -> tuple[list[dict[str, object]], dict[str, object]]:
    """DSC, MSD and HD95 (mm) per structure and path, and DDF quality, of one case on the daily grid.

    Args:
        result: the case's outputs on the daily grid.
        reference: the daily CT's reference label map ``(I, J, K)`` (or ``(1, I, J, K)``).
        case: case name (the daily image's file name without extension).
        patient: patient id, if known.

    Returns:
        ``(rows, ddf_row)``: one row per path and structure with keys ``case, patient, path, structure, dsc,
        msd_mm, hd95_mm, volume_ml, reference_volume_ml``; and one row with ``case, patient`` and the
        :class:`~prostate_jrs.metrics.DeformationQuality` fields, computed inside the field of view, and, with
        ``true_ddf`` (``(3, I, J, K)``, daily voxel units) and ``daily_ct`` (HU on the daily grid), the
        :func:`ddf_error` inside the body (HU > :data:`BODY_HU`) within the field of view (NaN without them).

    Raises:
        ValueError: if the reference does not lie on the daily grid.
    """
    ref = np.asarray(reference)
    ref = ref[0] if ref.ndim == 4 else ref
    if ref.shape != result.labels.shape:
        raise ValueError(f"reference label map of shape {ref.shape} is not on the daily grid {result.labels.shape}")
    ref = np.rint(ref).astype(np.uint8)
    spacing = spacing_from_affine(result.affine)
    rows: list[dict[str, object]] = []
    for path, label_map in (("reg", result.reg), ("seg", result.seg), ("final", result.labels)):
        for name, values in structure_metrics(label_map, ref, spacing).items():
            rows.append({"case": case, "patient": patient, "path": path, "structure": name, **values.as_dict()})
    quality = deformation_quality(result.ddf, mask=result.fov if result.fov.any() else None)
    error = {"ddf_error_mean_mm": math.nan, "ddf_error_p95_mm": math.nan, "ddf_error_max_mm": math.nan}
    if true_ddf is not None and daily_ct is not None:
        body = np.asarray(daily_ct)
        body = (body[0] if body.ndim == 4 else body) > BODY_HU
        error = ddf_error(result.ddf, true_ddf, result.affine, body & result.fov)
    return rows, {"case": case, "patient": patient, **quality.as_dict(), **error}


def deployed_refine(rows: Iterable[Mapping[str, object]]) -> str:
    """The ``refine`` value of evaluation rows that describes what runs in deployment: the refined rows if any.

    Rows without a ``refine`` key (tables written before refinement existed) count as ``off``.
    """
    labels = {str(row.get("refine", "off")) for row in rows}
    refined = sorted(labels - {"off"})
    return refined[0] if refined else "off"


def update_eval_metrics(metadata_file: str | Path, summary_csv: str | Path) -> dict[str, float | str]:
    """Fill the bundle metadata's ``eval_metrics`` with the means of an evaluation summary.

    Keys are ``<path>_<metric>_<structure>`` (e.g. ``final_dsc_prostate``, ``reg_msd_mm_bladder``) and
    ``ddf_<metric>`` for the DDF quality; values are the means over cases, rounded to 4 significant digits. Only
    the deployed rows count (:func:`deployed_refine`); ``refine`` records which.
    The metadata file is rewritten atomically.

    Args:
        metadata_file: ``bundle/configs/metadata.json``.
        summary_csv: ``metrics_summary.csv`` written by the bundle's ``evaluate.json``.

    Returns:
        The new ``eval_metrics``.

    Raises:
        ValueError: if the summary has no rows.
    """
    with Path(summary_csv).open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    if not rows:
        raise ValueError(f"{summary_csv}: no rows; run the bundle's evaluate.json first")
    deployed = deployed_refine(rows)
    rows = [row for row in rows if row.get("refine", "off") == deployed]
    metrics: dict[str, float | str] = {"refine": deployed}
    for row in rows:
        metric = str(row["metric"])
        if row["path"] == "ddf":
            key = metric if metric.startswith("ddf_") else f"ddf_{metric}"
        else:
            key = f"{row['path']}_{metric}_{row['structure']}"
        value = float(row["mean"])
        metrics[key] = value if math.isnan(value) else float(f"{value:.4g}")
    metrics["num_cases"] = max(int(row["n"]) for row in rows)
    path = Path(metadata_file)
    metadata = json.loads(path.read_text(encoding="utf-8"))
    metadata["eval_metrics"] = metrics
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(metadata, indent=4) + "\n", encoding="utf-8")
    tmp.replace(path)
    return metrics
