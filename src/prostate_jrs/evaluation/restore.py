"""From network-grid predictions to results on the daily CT's own grid.

The bundle runs the network on a *model grid*: the daily CT reoriented (RAS), resampled to the model
spacing and cropped around the planning contours. Everything a user sees (label maps, the DDF, metrics in
mm) lives on the *daily grid*, the voxel grid of the daily CT file. The functions here move data between
the two with the world mapping carried by 4x4 index-to-world affines (MONAI/NIfTI RAS; any common world
frame works, the LPS/RAS flip cancels in every formula):

* scalar or label data: resampled through ``A_model^-1 @ A_daily``
  (:func:`prostate_jrs.geometry.resample_to_grid`);
* a DDF: resampled the same way *and* its vectors mapped from model-grid voxel units to daily-grid voxel
  units by ``A_daily[:3, :3]^-1 @ A_model[:3, :3]`` (:func:`prostate_jrs.geometry.ddf_to_grid`). This one matrix
  undoes the spacing ratio, axis flips and permutations of the reorientation; the crop offset is in the
  translation of the affines. A DDF is not an intensity image: ``Invertd`` would resample it but leave its
  vectors in model voxels.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from monai.transforms import KeepLargestConnectedComponent

from prostate_jrs.evaluation.contours import compose_contours
from prostate_jrs.geometry import ddf_vector_map, field_of_view_mask, identity_grid, label_box, resample_to_grid
from prostate_jrs.labels import SINGLE_COMPONENT_LABELS

__all__ = [
    "DailyGridResult",
    "compose_rigid",
    "keep_largest_components",
    "label_argmax",
    "output_grid_affine",
    "registration_path",
    "restore_to_daily_grid",
    "spacing_from_affine",
]


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
        grid = identity_grid((shape[0], shape[1], k1 - k0), np.float64, start=(0, 0, k0))
        points = grid + field[:, :, :, k0:k1]
        out[:, :, :, k0:k1] = np.tensordot(mapping[:3, :3], points, axes=1) + mapping[:3, 3, None, None, None] - grid
    return out


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


def label_argmax(logits: torch.Tensor) -> torch.Tensor:
    """uint8 index of the first maximum along the channel axis of ``(C, ...)`` logits, as ``argmax(dim=0)``.

    torch reduces over the outer axis slowly (0.4 s for 5 x 3 M logits on 2 cores); a running maximum over the
    channels, a few elementwise passes each, is about 3x faster and gives the same first maximum. A NaN (argmax's
    maximum) leaves the running maximum NaN; then argmax itself decides.
    """
    best = logits[0].clone()
    index = torch.zeros(logits.shape[1:], dtype=torch.uint8)
    for channel in range(1, logits.shape[0]):
        index.masked_fill_(logits[channel] > best, channel)  # strictly greater: the first maximum stays
        torch.maximum(best, logits[channel], out=best)
    if torch.isnan(best).any():
        return logits.argmax(dim=0).to(torch.uint8)
    return index


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
    seg = label_argmax(torch.from_numpy(restored[3:])).numpy()
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
