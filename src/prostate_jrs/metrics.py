"""Contour and deformation quality: DSC, mean surface distance, 95% Hausdorff distance, Jacobian statistics.

Overlap and surface metrics use MONAI's implementations on one-hot label maps, in millimetres through the voxel
spacing. Their definitions match the paper's evaluation (docs/ARCHITECTURE.md, "Evaluation metrics"): MSD is the
mean of the pooled two-sided surface distances, HD95 the larger of the two directed 95th percentiles.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
from monai.metrics import compute_dice
from monai.metrics.utils import get_edge_surface_distance
from monai.networks.utils import one_hot

from prostate_jrs.geometry import label_box
from prostate_jrs.labels import NUM_CLASSES, STRUCTURES

__all__ = [
    "DeformationQuality",
    "StructureMetrics",
    "deformation_quality",
    "jacobian_determinant",
    "structure_metrics",
]


@dataclass(frozen=True)
class _MetricRecord:
    """Base of the metric records: named floats that tables and JSON take as a plain dictionary."""

    def as_dict(self) -> dict[str, float]:
        """Plain dictionary for tables and JSON."""
        return asdict(self)


@dataclass(frozen=True)
class StructureMetrics(_MetricRecord):
    """Agreement of one structure between a prediction and a reference.

    ``msd_mm`` and ``hd95_mm`` are NaN where either mask is empty (no surface to measure).
    """

    dsc: float
    msd_mm: float
    hd95_mm: float
    volume_ml: float
    reference_volume_ml: float


@dataclass(frozen=True)
class DeformationQuality(_MetricRecord):
    """Regularity of a displacement field.

    Attributes:
        folding_fraction: fraction of voxels with det J <= 0.
        jacobian_std: standard deviation of det J.
        jacobian_min: smallest det J.
        jacobian_max: largest det J.
    """

    folding_fraction: float
    jacobian_std: float
    jacobian_min: float
    jacobian_max: float


def _one_hot(label_map: np.ndarray | torch.Tensor) -> torch.Tensor:
    labels = torch.as_tensor(np.asarray(label_map), dtype=torch.long)
    return one_hot(labels[None, None], num_classes=NUM_CLASSES, dim=1)


def _foreground_box(prediction: np.ndarray, reference: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both label maps cropped to the box of their joint foreground plus one voxel (edges need a background rim).

    Every metric is unchanged by the crop, and a clinical daily grid is mostly background: the metrics then cost
    a fraction of the time.
    """
    box = label_box((prediction > 0) | (reference > 0), margin=1)  # projections: no index per foreground voxel
    if box is None:
        return prediction, reference
    return prediction[box], reference[box]


def structure_metrics(
    prediction: np.ndarray | torch.Tensor,
    reference: np.ndarray | torch.Tensor,
    spacing: Sequence[float],
) -> dict[str, StructureMetrics]:
    """DSC, MSD and HD95 of every structure between two label maps on the same grid.

    Args:
        prediction: label map ``(I, J, K)`` with values 0..4.
        reference: label map of the same shape (e.g. the clinician's contours).
        spacing: voxel size in mm along ``I, J, K``.

    Returns:
        Canonical structure name -> :class:`StructureMetrics`. DSC is 1 where both masks are empty and 0
        where exactly one is.

    Raises:
        ValueError: if the shapes differ or ``spacing`` does not have three entries.
    """
    prediction_array, reference_array = np.asarray(prediction), np.asarray(reference)
    if prediction_array.shape != reference_array.shape:
        raise ValueError(f"label maps differ in shape: {prediction_array.shape} vs {reference_array.shape}")
    if len(spacing) != prediction_array.ndim:
        raise ValueError(f"spacing {tuple(spacing)} does not match a {prediction_array.ndim}-D label map")
    prediction_array, reference_array = _foreground_box(prediction_array, reference_array)
    pred_onehot, ref_onehot = _one_hot(prediction_array), _one_hot(reference_array)
    voxel_ml = float(np.prod(spacing)) / 1000.0
    spacing_list = [float(s) for s in spacing]
    dice = compute_dice(pred_onehot, ref_onehot, include_background=True, ignore_empty=False)[0]
    results: dict[str, StructureMetrics] = {}
    for structure in STRUCTURES:
        channel = structure.label
        pred_count = int(pred_onehot[0, channel].sum())
        ref_count = int(ref_onehot[0, channel].sum())
        if pred_count and ref_count:
            msd, hd95 = _surface_distances(pred_onehot[0, channel], ref_onehot[0, channel], spacing_list, channel)
            dsc = float(dice[channel])
        else:
            msd = hd95 = math.nan
            dsc = 1.0 if pred_count == ref_count else 0.0
        results[structure.name] = StructureMetrics(dsc, msd, hd95, pred_count * voxel_ml, ref_count * voxel_ml)
    return results


def _surface_distances(
    prediction: torch.Tensor, reference: torch.Tensor, spacing: list[float], channel: int
) -> tuple[float, float]:
    """MSD and HD95 (mm) of two non-empty masks, as MONAI's ``compute_average_surface_distance(symmetric=True)``
    and ``compute_hausdorff_distance(percentile=95)`` give them, from one computation of the surface distances
    (each of those functions computes the same two-sided distances again: the larger share of the QA's time)."""
    # MONAI crops the pair to its joint box plus one voxel (padding where that leaves the array) before finding
    # edges; cropping to that box first (clipped to the array) leaves its crop identical and far cheaper
    box = label_box(((prediction > 0) | (reference > 0)).numpy(), margin=1)
    if box is not None:
        prediction, reference = prediction[box], reference[box]
    _, distances, _ = get_edge_surface_distance(
        prediction.float(), reference.float(), spacing=spacing, symmetric=True, class_index=channel
    )
    # MONAI stores both results in float32 tensors; so do these
    msd = torch.cat(distances).mean().to(torch.float32)
    hd95 = torch.max(torch.stack([torch.quantile(d, 0.95) for d in distances])).to(torch.float32)
    return float(msd), float(hd95)


def jacobian_determinant(ddf: np.ndarray) -> np.ndarray:
    """Jacobian determinant of ``x -> x + ddf(x)`` by central differences.

    The DDF is in voxel units along each index axis, so the determinant equals the physical one for any
    (anisotropic) voxel spacing. Hand-written: MONAI has no Jacobian metric for displacement fields.

    Args:
        ddf: displacement ``(3, I, J, K)`` in voxel units, channel ``c`` along index axis ``c``.

    Returns:
        det J, float32, shape ``(I, J, K)``.

    Raises:
        ValueError: if ``ddf`` is not a 3-channel 3-D field.
    """
    field = np.asarray(ddf)
    if field.ndim != 4 or field.shape[0] != 3:
        raise ValueError(f"expected a displacement field of shape (3, I, J, K), got {field.shape}")
    # explicit cofactor expansion: a (3, 3, I, J, K) stack for np.linalg.det would need ~9x the field's memory
    j = [list(np.gradient(field[c].astype(np.float32))) for c in range(3)]
    for c in range(3):
        j[c][c] += 1.0
    return (
        j[0][0] * (j[1][1] * j[2][2] - j[1][2] * j[2][1])
        - j[0][1] * (j[1][0] * j[2][2] - j[1][2] * j[2][0])
        + j[0][2] * (j[1][0] * j[2][1] - j[1][1] * j[2][0])
    )


def deformation_quality(ddf: np.ndarray, mask: np.ndarray | None = None) -> DeformationQuality:
    """Folding fraction and spread of det J of a DDF, optionally inside a mask (e.g. the body).

    Args:
        ddf: displacement ``(3, I, J, K)`` in voxel units.
        mask: boolean ``(I, J, K)``; all voxels when ``None``.

    Raises:
        ValueError: if the mask does not match the field or selects no voxel.
    """
    determinant = jacobian_determinant(ddf)
    if mask is not None:
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != determinant.shape:
            raise ValueError(f"mask of shape {mask.shape} does not match the field's grid {determinant.shape}")
        determinant = determinant[mask]
    if determinant.size == 0:
        raise ValueError("the mask selects no voxel")
    return DeformationQuality(
        folding_fraction=float(np.mean(determinant <= 0)),
        jacobian_std=float(np.std(determinant)),
        jacobian_min=float(np.min(determinant)),
        jacobian_max=float(np.max(determinant)),
    )
