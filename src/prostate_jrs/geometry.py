"""Image geometry shared by every part of the project: array order, affines and warping with a DDF.

Conventions (docs/ARCHITECTURE.md, "DDF convention"):

* Volumes with geometry travel as :class:`SimpleITK.Image` (world = DICOM patient coordinates, LPS, mm).
* Voxel arrays are in NIfTI/MONAI index order ``(I, J, K)`` (the first axis is SimpleITK's x index),
  which is what ``monai.transforms.LoadImage`` returns for the NIfTI files the project writes.
* A DDF is an array ``(3, I, J, K)`` on the fixed (daily) grid in voxel units of that grid; channel ``c``
  is the displacement along index axis ``c``. Warped moving data at fixed voxel ``x`` is the moving
  image sampled at the world point ``A_fixed @ (x + ddf(x))``, where ``A_fixed`` is the fixed image's
  index-to-world matrix. When both images share a grid this is exactly ``monai.networks.blocks.Warp``.

Resampling has one implementation, :func:`resample_to_grid` (``torch.nn.functional.grid_sample``, float32, every
channel through one set of sampling points); :func:`resample_with_ddf` (images), :func:`ddf_to_grid` (a DDF onto
another grid, vectors converted) and :func:`field_of_view_mask` are built on it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

__all__ = [
    "affine_transform",
    "array_from_image",
    "array_view",
    "ddf_to_grid",
    "ddf_vector_map",
    "field_of_view_mask",
    "identity_grid",
    "image_from_array",
    "index_to_world",
    "label_box",
    "label_counts",
    "resample_to_grid",
    "resample_with_ddf",
    "world_to_index",
]

_SLAB_POINTS = 1 << 22  # destination voxels sampled at once: bounds the coordinate arrays to ~100 MB


def array_from_image(image: sitk.Image) -> np.ndarray:
    """Voxel array of ``image`` in ``(I, J, K)`` order (vector images: ``(I, J, K, C)``)."""
    array = sitk.GetArrayFromImage(image)
    spatial = image.GetDimension()
    order = tuple(range(spatial - 1, -1, -1)) + tuple(range(spatial, array.ndim))
    return np.ascontiguousarray(array.transpose(order))


def array_view(image: sitk.Image) -> np.ndarray:
    """Read-only ``(I, J, K)`` view of a scalar image's voxels, without a copy; valid while ``image`` lives."""
    return sitk.GetArrayViewFromImage(image).transpose(2, 1, 0)


def label_counts(labels: np.ndarray, chunk: int = 1 << 20) -> np.ndarray:
    """Voxels per value of an integer map: ``counts[v]`` for ``v`` in ``0..max``.

    uint8 maps are counted chunk by chunk (``np.bincount`` would widen the whole map to int64 first: 8 bytes per
    voxel, 256 MB for a 512 x 512 x 122 CT); other integer types through ``np.unique``.

    Raises:
        ValueError: on negative values.
    """
    array = np.asarray(labels)
    if array.dtype != np.uint8:
        values, counts = np.unique(array, return_counts=True)
        if values.size and values[0] < 0:
            raise ValueError(f"negative label value {values[0]}")
        out = np.zeros(int(values.max(initial=0)) + 1, dtype=np.int64)
        out[values.astype(np.int64)] = counts
        return out
    # only the labelled box is counted (a contour map is mostly background): the rest is zeros
    box = label_box(array) if array.ndim == 3 else None
    inside = array[box] if box is not None else array
    flat = inside.T.ravel() if inside.T.flags.c_contiguous else inside.ravel()  # a view for SimpleITK's buffers
    counts = np.zeros(256, dtype=np.int64)
    for start in range(0, flat.size, chunk):
        counts += np.bincount(flat[start : start + chunk], minlength=256)
    counts[0] += array.size - inside.size
    return counts[: int(np.flatnonzero(counts).max(initial=0)) + 1]


def label_box(labels: np.ndarray, margin: int = 0) -> tuple[slice, slice, slice] | None:
    """Bounding box of the non-zero voxels of an ``(I, J, K)`` map, grown by ``margin`` voxels (clipped to the
    array); ``None`` when all are zero. Three projections of the map, no per-voxel coordinates."""
    nonzero = np.asarray(labels) != 0
    box = []
    for axis, size in enumerate(nonzero.shape):
        hits = np.flatnonzero(nonzero.any(axis=tuple(a for a in range(3) if a != axis)))
        if hits.size == 0:
            return None
        box.append(slice(max(int(hits[0]) - margin, 0), min(int(hits[-1]) + 1 + margin, size)))
    return tuple(box)  # type: ignore[return-value]


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


def identity_grid(
    shape: tuple[int, int, int], dtype: np.dtype | type = np.float32, start: Sequence[int] = (0, 0, 0)
) -> np.ndarray:
    """Index coordinates of every voxel of a block, shape ``(3, *shape)``.

    Args:
        shape: the block's size.
        dtype: of the coordinates.
        start: index of the block's first voxel (e.g. ``(0, 0, k0)`` for a slab of slices from ``k0`` on).
    """
    return np.stack(
        np.meshgrid(*(np.arange(a, a + n, dtype=dtype) for a, n in zip(start, shape, strict=True)), indexing="ij")
    )


def _sampling_grid(
    mapping: np.ndarray, source_shape: Sequence[int], shape: Sequence[int], k0: int, k1: int, ddf: np.ndarray | None
) -> torch.Tensor:
    """``grid_sample``'s grid ``(1, I, J, k1 - k0, 3)`` for destination voxels ``x + ddf(x)`` in slices ``k0:k1``.

    The source index ``p = mapping @ (x + ddf(x))`` and grid_sample's normalisation ``(2 p + 1) / n - 1``
    (``align_corners=False``) are one affine map, applied in float32 by torch (threaded); the grid's last axis is
    ``(K, J, I)``, as grid_sample indexes ``(W, H, D)``.
    """
    sizes = np.asarray(source_shape, dtype=np.float64)
    normalise = np.eye(4)
    normalise[:3, :3] = np.diag(2.0 / sizes)
    normalise[:3, 3] = 1.0 / sizes - 1.0
    affine = (normalise @ mapping)[[2, 1, 0, 3]]  # rows in grid_sample's (K, J, I) order
    linear = torch.from_numpy(affine[:3, :3].T.astype(np.float32))  # row a: what index axis a adds to (K, J, I)
    axes = [torch.arange(int(shape[0])), torch.arange(int(shape[1])), torch.arange(k0, k1)]
    grid = torch.from_numpy(affine[:3, 3].astype(np.float32)).expand(len(axes[0]), len(axes[1]), len(axes[2]), 3)
    grid = grid + axes[0].float()[:, None, None, None] * linear[0]
    grid += axes[1].float()[None, :, None, None] * linear[1]
    grid += axes[2].float()[None, None, :, None] * linear[2]
    if ddf is not None:
        displacement = torch.from_numpy(np.ascontiguousarray(ddf[:, :, :, k0:k1], dtype=np.float32))
        grid += (displacement.permute(1, 2, 3, 0).reshape(-1, 3) @ linear).reshape(grid.shape)
    return grid[None]


def _inside_normalised(grid: torch.Tensor, source_shape: Sequence[int], tolerance: float = 1e-4) -> np.ndarray:
    """Grid points within the source's outer voxel centres (``scipy.ndimage``'s ``mode="constant"``), give or take
    ``tolerance`` voxels; ``grid`` as :func:`_sampling_grid` makes it."""
    inside = torch.ones(grid.shape[1:4], dtype=torch.bool)
    for column, size in zip(range(3), reversed(list(source_shape)), strict=True):
        limit = 1.0 - (1.0 - 2.0 * tolerance) / size  # centres of the first and last voxel, normalised
        inside &= grid[0, ..., column].abs() <= limit
    return inside.numpy()


def resample_to_grid(
    array: np.ndarray,
    src_affine: np.ndarray,
    dst_affine: np.ndarray,
    dst_shape: Sequence[int],
    order: int = 1,
    mode: str = "nearest",
    cval: float = 0.0,
    ddf: np.ndarray | None = None,
) -> np.ndarray:
    """Resample channel-first data ``(C, *src_shape)`` onto another grid through the world mapping.

    Destination voxel ``x`` takes the source value at the world point ``dst_affine @ (x + ddf(x))`` (the project's
    DDF convention; without ``ddf`` plain resampling). All channels share one set of sampling points; destination
    slices are done in slabs so that a 512 x 512 daily CT never needs full-size coordinate arrays.

    Args:
        array: data on the source grid, shape ``(C, I, J, K)``.
        src_affine: source index-to-world matrix.
        dst_affine: destination index-to-world matrix (same world frame).
        dst_shape: destination spatial shape.
        order: 0 nearest (labels), 1 linear.
        mode: outside the source: ``"nearest"`` repeats the edge value, ``"constant"`` uses ``cval``.
        cval: value outside the source for ``mode="constant"``.
        ddf: optional displacement ``(3, *dst_shape)`` in voxel units of the destination grid.

    Returns:
        ``(C, *dst_shape)``, the input dtype for ``order == 0`` and float32 otherwise.

    Raises:
        ValueError: if ``array`` is not 4-D, ``ddf`` does not fit the destination grid, or order or mode is unknown.
    """
    data = np.asarray(array)
    if data.ndim != 4:
        raise ValueError(f"expected channel-first 3-D data (C, I, J, K), got shape {data.shape}")
    if order not in (0, 1) or mode not in ("nearest", "constant"):
        raise ValueError(f"order must be 0 or 1 and mode 'nearest' or 'constant', got {order}, {mode!r}")
    mapping = np.linalg.inv(np.asarray(src_affine, dtype=np.float64)) @ np.asarray(dst_affine, dtype=np.float64)
    shape = tuple(int(s) for s in dst_shape)
    if ddf is not None and np.shape(ddf) != (3, *shape):
        raise ValueError(f"ddf of shape {np.shape(ddf)} does not fit the destination grid (3, {shape})")
    displacement = None if ddf is None else np.asarray(ddf, dtype=np.float32)
    source = torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32))[None]
    dtype = data.dtype if order == 0 else np.float32

    def sample(k0: int, k1: int) -> np.ndarray:
        grid = _sampling_grid(mapping, data.shape[1:], shape, k0, k1, displacement)
        sampled = F.grid_sample(
            source, grid, mode="nearest" if order == 0 else "bilinear", padding_mode="border", align_corners=False
        )[0].numpy()
        if mode == "constant":
            sampled[:, ~_inside_normalised(grid, data.shape[1:])] = cval
        return sampled  # nearest: exact source values (float32 holds integers up to 2^24)

    slab = max(1, _SLAB_POINTS // max(1, shape[0] * shape[1]))
    if 0 < shape[2] <= slab:  # one slab (the box around a model grid): grid_sample's result is the result, not copied
        return sample(0, shape[2]).astype(dtype, copy=False)
    out = np.empty((data.shape[0], *shape), dtype=dtype)
    for k0 in range(0, shape[2], slab):
        k1 = min(k0 + slab, shape[2])
        out[:, :, :, k0:k1] = sample(k0, k1)
    return out


def ddf_vector_map(src_affine: np.ndarray, dst_affine: np.ndarray) -> np.ndarray:
    """``A_dst[:3, :3]^-1 @ A_src[:3, :3]`` (float32): DDF vectors from source to destination voxel units."""
    return (
        np.linalg.inv(np.asarray(dst_affine, dtype=np.float64)[:3, :3])
        @ np.asarray(src_affine, dtype=np.float64)[:3, :3]
    ).astype(np.float32)


def ddf_to_grid(
    ddf: np.ndarray, src_affine: np.ndarray, dst_affine: np.ndarray, dst_shape: Sequence[int]
) -> np.ndarray:
    """Bring a DDF to another grid, in voxel units of that grid (outside the source: its edge values).

    The world displacement ``A[:3, :3] @ ddf`` is what both grids share, so the vectors are mapped by
    ``A_dst[:3, :3]^-1 @ A_src[:3, :3]`` (undoing spacing ratio, axis flips and permutations) and resampled.

    Args:
        ddf: ``(3, *src_shape)`` in voxel units of the source grid, channel ``c`` along index axis ``c``.
        src_affine: index-to-world matrix of the source (e.g. model) grid.
        dst_affine: index-to-world matrix of the destination (e.g. daily or registration) grid.
        dst_shape: spatial shape of the destination grid.

    Returns:
        float32 ``(3, *dst_shape)`` in voxel units of the destination grid.

    Raises:
        ValueError: if ``ddf`` is not a 3-channel 3-D field.
    """
    field = np.asarray(ddf, dtype=np.float32)
    if field.ndim != 4 or field.shape[0] != 3:
        raise ValueError(f"expected a DDF of shape (3, I, J, K), got {field.shape}")
    # the vector map is linear, so it commutes with interpolation: apply it on the (smaller) source grid
    converted = np.tensordot(ddf_vector_map(src_affine, dst_affine), field, axes=1)
    return resample_to_grid(converted, src_affine, dst_affine, dst_shape, order=1, mode="nearest")


def field_of_view_mask(
    src_affine: np.ndarray, src_shape: Sequence[int], dst_affine: np.ndarray, dst_shape: Sequence[int]
) -> np.ndarray:
    """Boolean mask of the destination voxels that lie within the source grid's outer voxel centres.

    Computed in float64 without tolerance, as the scipy restore before issue 15 did: a daily voxel on the model grid's
    last centre plane stays in or out as it was. Grids whose axes are parallel (the model grid is the daily grid
    reoriented) take one 1-D test per axis.
    """
    mapping = np.linalg.inv(np.asarray(src_affine, dtype=np.float64)) @ np.asarray(dst_affine, dtype=np.float64)
    shape = tuple(int(s) for s in dst_shape)
    linear = mapping[:3, :3]
    if np.all(np.count_nonzero(linear, axis=1) == 1):  # each source axis follows one destination axis
        mask = np.ones(shape, dtype=bool)
        for axis, size in enumerate(src_shape):
            along = int(np.flatnonzero(linear[axis])[0])
            p = linear[axis, along] * np.arange(shape[along], dtype=np.float64) + mapping[axis, 3]
            inside = (p >= 0) & (p <= size - 1)
            mask &= inside.reshape([-1 if a == along else 1 for a in range(3)])
        return mask
    mask = np.empty(shape, dtype=bool)
    for k in range(shape[2]):  # oblique grids: slice by slice, in float64
        index = identity_grid((shape[0], shape[1], 1), np.float64, start=(0, 0, k))
        points = np.tensordot(linear, index, axes=1) + mapping[:3, 3, None, None, None]
        mask[:, :, k : k + 1] = np.all([(points[a] >= 0) & (points[a] <= n - 1) for a, n in enumerate(src_shape)], 0)
    return mask


def resample_with_ddf(
    moving: sitk.Image,
    fixed: sitk.Image,
    ddf: np.ndarray | None = None,
    order: int = 1,
    default_value: float = 0.0,
) -> np.ndarray:
    """Sample ``moving`` on the grid of ``fixed`` at ``A_fixed @ (x + ddf(x))`` (:func:`resample_to_grid`).

    Args:
        moving: image to sample (e.g. planning CT or planning label map).
        fixed: image whose grid the result lives on (e.g. daily CT).
        ddf: displacement ``(3, I, J, K)`` in voxel units of ``fixed``; ``None`` for zero (pure resampling).
        order: 0 for nearest neighbour (label maps), 1 for linear.
        default_value: value outside ``moving``.

    Returns:
        Array ``(I, J, K)`` on the fixed grid, of the moving array's dtype for ``order == 0``, float32 otherwise.

    Raises:
        ValueError: if ``ddf`` does not match the fixed grid.
    """
    shape = tuple(fixed.GetSize())
    if ddf is not None and ddf.shape != (3, *shape):
        raise ValueError(f"ddf of shape {ddf.shape} does not match fixed grid (3, {shape})")
    return resample_to_grid(
        array_view(moving)[None],
        index_to_world(moving),
        index_to_world(fixed),
        shape,
        order=order,
        mode="constant",
        cval=default_value,
        ddf=ddf,
    )[0]
