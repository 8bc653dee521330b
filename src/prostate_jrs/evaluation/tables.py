"""Per-case and summary metric tables of an evaluation: rows per case, structure and path, their summary, CSV.

Metrics use :mod:`prostate_jrs.metrics`; this module only arranges them per case, structure and path. The tables are
written by :func:`write_csv`, not MONAI's ``write_metrics_reports``: that one writes tab-separated files with its own
columns and statistics, not the comma-separated, refine/path/structure-grouped tables the bundle documents.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

from prostate_jrs.evaluation.restore import DailyGridResult, spacing_from_affine
from prostate_jrs.hounsfield import BODY_HU
from prostate_jrs.metrics import deformation_quality, structure_metrics

__all__ = ["BODY_HU", "case_metrics", "ddf_error", "deployed_refine", "summarize", "write_csv"]

#: HU above which a daily voxel counts as body for the DDF error (air and couch below).


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
