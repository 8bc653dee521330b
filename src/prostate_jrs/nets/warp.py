"""Warping inside a valid-convolution patch, and per-scale targets.

A network that sees an ``n^3`` patch predicts DDFs on grids that are the patch centre-cropped by ``border``
voxels and decimated by ``stride`` (56^3: border 20, stride 1; 30^3: 18, 2; 17^3: 14, 4). DDF values are in
voxel units of their own grid, channel ``c`` along spatial axis ``c`` (MONAI ``Warp`` convention). Warped
moving data at output voxel ``i`` is the *whole* moving patch sampled at patch coordinate
``border + stride * (i + ddf(i))``: displacements up to ``border`` voxels stay inside real data. (The
authors' code samples only the central crop of the moving patch and clamps at its edge.) ``Warp`` needs the
image and the DDF on one grid, so this offset/strided sampling is hand-written on ``grid_sample``; on a whole
volume (border 0, stride 1) it is exactly ``monai.networks.blocks.Warp``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from prostate_jrs.labels import NUM_CLASSES

__all__ = ["crop_and_decimate", "labels_to_onehot", "warp_patch"]


def warp_patch(
    moving: torch.Tensor, ddf: torch.Tensor, border: int = 20, stride: int = 1, mode: str = "bilinear"
) -> torch.Tensor:
    """Sample ``moving`` (B, C, *S) at ``border + stride * (grid + ddf)``, with border padding.

    Args:
        moving: moving patch on the input grid, shape (B, C, D, H, W).
        ddf: displacement (B, 3, d, h, w) in voxel units of the output grid.
        border: offset of the output grid's first voxel in input voxels.
        stride: spacing of the output grid in input voxels.
        mode: ``"bilinear"`` (trilinear in 3-D, differentiable in ``ddf``) or ``"nearest"``.

    Returns:
        Warped moving data (B, C, d, h, w), same dtype as ``ddf``.

    Raises:
        ValueError: if the shapes do not fit.
    """
    # shape checks would be frozen into a trace as constants (TracerWarning), so they run only eagerly/scripted
    if not torch.jit.is_tracing() and (
        moving.dim() != 5
        or ddf.dim() != 5
        or ddf.shape[1] != 3
        or ddf.shape[0] != moving.shape[0]
        or min(moving.shape[2:]) < 2
    ):
        raise ValueError(f"expected moving (B, C, D>1, H>1, W>1), ddf (B, 3, d, h, w); got {moving.shape}, {ddf.shape}")
    dtype = ddf.dtype
    coords = []
    for axis in range(3):
        n_out = ddf.shape[2 + axis]
        base = torch.arange(n_out, device=ddf.device, dtype=dtype)
        shape = [1, 1, 1]
        shape[axis] = n_out
        pos = border + stride * (base.view(shape).unsqueeze(0) + ddf[:, axis])
        # grid_sample with align_corners=True maps -1/+1 to the centres of the first/last voxel; this form is
        # exact for integer positions, so a zero DDF reproduces the crop up to grid_sample's own rounding
        span = moving.shape[2 + axis] - 1  # >= 1, checked above
        coords.append((2.0 * pos - span) / span)
    grid = torch.stack([coords[2], coords[1], coords[0]], dim=-1)  # grid_sample wants (x=W, y=H, z=D)
    return F.grid_sample(moving.to(dtype), grid, mode=mode, padding_mode="border", align_corners=True)


def crop_and_decimate(x: torch.Tensor, border: int, stride: int, size: Sequence[int]) -> torch.Tensor:
    """Target for one output scale: centre crop by ``border`` and plain subsampling by ``stride`` (no smoothing)."""
    return x[
        :,
        :,
        border : border + stride * size[0] : stride,
        border : border + stride * size[1] : stride,
        border : border + stride * size[2] : stride,
    ]


def labels_to_onehot(labels: torch.Tensor, num_classes: int = NUM_CLASSES) -> torch.Tensor:
    """One-hot (B, num_classes, ...) float tensor from an integer-valued label map (B, 1, ...) of any dtype."""
    index = torch.round(labels[:, 0].float()).long().clamp(0, num_classes - 1)
    return F.one_hot(index, num_classes).permute(0, 4, 1, 2, 3).to(torch.float32)
