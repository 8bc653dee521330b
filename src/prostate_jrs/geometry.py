"""Image geometry shared by every part of the project: array order, affines and warping with a DDF.

Conventions (see DESIGN.md):

* Volumes with geometry travel as :class:`SimpleITK.Image` (world = DICOM patient coordinates, LPS, mm).
* Voxel arrays are in NIfTI/MONAI index order ``(I, J, K)`` (the first axis is SimpleITK's x index),
  which is what ``monai.transforms.LoadImage`` returns for the NIfTI files the project writes.
* A DDF is an array ``(3, I, J, K)`` on the fixed (daily) grid in voxel units of that grid; channel ``c``
  is the displacement along index axis ``c``. Warped moving data at fixed voxel ``x`` is the moving
  image sampled at the world point ``A_fixed @ (x + ddf(x))``, where ``A_fixed`` is the fixed image's
  index-to-world matrix. When both images share a grid this is exactly ``monai.networks.blocks.Warp``.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

__all__ = [
    "affine_transform",
    "array_from_image",
    "identity_grid",
    "image_from_array",
    "index_to_world",
    "resample_with_ddf",
    "world_to_index",
]


def array_from_image(image: sitk.Image) -> np.ndarray:
    """Voxel array of ``image`` in ``(I, J, K)`` order (vector images: ``(I, J, K, C)``)."""
    array = sitk.GetArrayFromImage(image)
    spatial = image.GetDimension()
    order = tuple(range(spatial - 1, -1, -1)) + tuple(range(spatial, array.ndim))
    return np.ascontiguousarray(array.transpose(order))


def image_from_array(array: np.ndarray, reference: sitk.Image, is_vector: bool = False) -> sitk.Image:
    """SimpleITK image from an ``(I, J, K)`` (or ``(I, J, K, C)`` with ``is_vector``) array on ``reference``'s grid.

    Raises:
        ValueError: if the array's spatial shape differs from the reference size.
    """
    spatial = array.shape[:3]
    if tuple(spatial) != tuple(reference.GetSize()):
        raise ValueError(f"array of spatial shape {spatial} does not fit a grid of size {reference.GetSize()}")
    order = (2, 1, 0, 3) if is_vector else (2, 1, 0)
    image = sitk.GetImageFromArray(np.ascontiguousarray(array.transpose(order)), isVector=is_vector)
    image.CopyInformation(reference)
    return image


def affine_transform(matrix: np.ndarray) -> sitk.AffineTransform:
    """A 4x4 world map (e.g. daily -> planning) as the transform ``sitk.Resample`` takes (output -> input points)."""
    matrix = np.asarray(matrix, dtype=np.float64)
    transform = sitk.AffineTransform(3)
    transform.SetMatrix(matrix[:3, :3].ravel().tolist())
    transform.SetTranslation(matrix[:3, 3].tolist())
    return transform


def index_to_world(image: sitk.Image) -> np.ndarray:
    """4x4 matrix mapping continuous index ``(i, j, k, 1)`` to LPS world millimetres."""
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    matrix = np.eye(4)
    matrix[:3, :3] = direction @ np.diag(image.GetSpacing())
    matrix[:3, 3] = image.GetOrigin()
    return matrix


def world_to_index(image: sitk.Image) -> np.ndarray:
    """4x4 matrix mapping LPS world millimetres to continuous index; the inverse of :func:`index_to_world`."""
    return np.linalg.inv(index_to_world(image))


def identity_grid(shape: tuple[int, int, int], dtype: np.dtype | type = np.float32) -> np.ndarray:
    """Index coordinates of every voxel, shape ``(3, *shape)``."""
    return np.stack(np.meshgrid(*(np.arange(n, dtype=dtype) for n in shape), indexing="ij"))


def resample_with_ddf(
    moving: sitk.Image,
    fixed: sitk.Image,
    ddf: np.ndarray | None = None,
    order: int = 1,
    default_value: float = 0.0,
) -> np.ndarray:
    """Sample ``moving`` on the grid of ``fixed`` at ``A_fixed @ (x + ddf(x))``.

    Args:
        moving: image to sample (e.g. planning CT or planning label map).
        fixed: image whose grid the result lives on (e.g. daily CT).
        ddf: displacement ``(3, I, J, K)`` in voxel units of ``fixed``; ``None`` for zero (pure resampling).
        order: spline order, 0 for nearest neighbour (label maps), 1 for linear.
        default_value: value outside ``moving``.

    Returns:
        Array ``(I, J, K)`` on the fixed grid, of the moving array's dtype for ``order == 0``, float32 otherwise.

    Raises:
        ValueError: if ``ddf`` does not match the fixed grid.
    """
    shape = tuple(fixed.GetSize())
    points = identity_grid(shape, np.float64)
    if ddf is not None:
        if ddf.shape != (3, *shape):
            raise ValueError(f"ddf of shape {ddf.shape} does not match fixed grid (3, {shape})")
        points += ddf
    mapping = world_to_index(moving) @ index_to_world(fixed)
    moving_index = np.tensordot(mapping[:3, :3], points, axes=1) + mapping[:3, 3, None, None, None]
    moving_array = array_from_image(moving)
    out = ndimage.map_coordinates(
        moving_array.astype(np.float32) if order > 0 else moving_array,
        moving_index,
        order=order,
        mode="constant",
        cval=default_value,
        prefilter=False,
    )
    return out if order == 0 else out.astype(np.float32)
