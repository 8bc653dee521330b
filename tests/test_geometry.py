from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from monai.networks.blocks import Warp

from prostate_jrs.geometry import (
    array_from_image,
    array_view,
    identity_grid,
    image_from_array,
    index_to_world,
    label_counts,
    resample_with_ddf,
    world_to_index,
)


def _image(size, spacing, origin, direction=None, seed=0):
    array = np.random.default_rng(seed).normal(size=size).astype(np.float32)
    image = image_from_array(array, _grid(size, spacing, origin, direction))
    return image, array


def _grid(size, spacing, origin, direction=None):
    grid = sitk.Image(list(size), sitk.sitkFloat32)
    grid.SetSpacing(spacing)
    grid.SetOrigin(origin)
    if direction is not None:
        grid.SetDirection(direction)
    return grid


def test_array_order_is_ijk():
    image, array = _image((5, 4, 3), (1.0, 2.0, 3.0), (0.0, 0.0, 0.0))
    assert array_from_image(image).shape == (5, 4, 3)
    assert image.GetPixel(4, 1, 2) == pytest.approx(array[4, 1, 2])
    vector = image_from_array(np.zeros((5, 4, 3, 3), np.float32), image, is_vector=True)
    assert vector.GetNumberOfComponentsPerPixel() == 3
    assert array_from_image(vector).shape == (5, 4, 3, 3)


def test_index_to_world_matches_simpleitk_for_oblique_grids():
    # FFS-like direction (x and z flipped) plus a small rotation about z
    angle = np.deg2rad(7.0)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    direction = (rotation @ np.diag([-1.0, 1.0, -1.0])).ravel().tolist()
    image, _ = _image((6, 5, 4), (0.9, 1.1, 2.5), (-10.0, 20.0, 5.0), direction)
    matrix = index_to_world(image)
    for index in [(0, 0, 0), (5, 4, 3), (2, 3, 1)]:
        assert np.allclose(matrix @ (*index, 1.0), (*image.TransformIndexToPhysicalPoint(index), 1.0))
    assert np.allclose(world_to_index(image) @ matrix, np.eye(4))


def test_zero_ddf_on_same_grid_is_identity_and_matches_monai_warp():
    image, array = _image((12, 10, 8), (2.0, 2.0, 3.0), (1.0, 2.0, 3.0))
    assert np.allclose(resample_with_ddf(image, image, None), array, atol=1e-5)
    ddf = np.random.default_rng(1).uniform(-1.5, 1.5, size=(3, 12, 10, 8)).astype(np.float32)
    ours = resample_with_ddf(image, image, ddf, order=1)
    theirs = Warp(mode="bilinear", padding_mode="zeros")(
        torch.from_numpy(array)[None, None], torch.from_numpy(ddf)[None]
    )
    inside = np.all(
        (np.indices(array.shape) + ddf >= 0)
        & (np.indices(array.shape) + ddf <= np.array(array.shape)[:, None, None, None] - 1),
        axis=0,
    )
    assert np.allclose(ours[inside], theirs[0, 0].numpy()[inside], atol=1e-4)


def test_resampling_across_grids_goes_through_world_coordinates():
    moving, moving_array = _image((20, 20, 10), (1.0, 1.0, 2.0), (0.0, 0.0, 0.0))
    # fixed grid shifted by exactly 3 moving voxels along i and 1 slice along k, with double spacing in-plane
    fixed = _grid((8, 8, 4), (2.0, 2.0, 2.0), (3.0, 0.0, 2.0))
    out = resample_with_ddf(moving, fixed, None, order=0)
    assert out[0, 0, 0] == moving_array[3, 0, 1]
    assert out[2, 1, 1] == moving_array[7, 2, 2]
    shift = np.zeros((3, 8, 8, 4), np.float32)
    shift[0] = 1.0  # one fixed voxel along i = 2 mm = 2 moving voxels
    assert resample_with_ddf(moving, fixed, shift, order=0)[0, 0, 0] == moving_array[5, 0, 1]
    with pytest.raises(ValueError, match="does not match fixed grid"):
        resample_with_ddf(moving, fixed, shift[:, :4])


def test_label_counts_match_bincount_for_every_layout() -> None:
    """Chunked uint8 histogram (SimpleITK views, C order, strided) and the np.unique path for other integers."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 5, (30, 40, 20)).astype(np.uint8)
    expected = np.bincount(labels.ravel())
    image = sitk.GetImageFromArray(labels)
    assert np.array_equal(label_counts(array_view(image)), expected)  # (I, J, K) view of SimpleITK's buffer
    assert np.array_equal(label_counts(labels, chunk=7), expected)
    assert np.array_equal(label_counts(labels[::2]), np.bincount(labels[::2].ravel()))
    assert np.array_equal(label_counts(labels.astype(np.int16)), expected)
    assert label_counts(np.zeros((2, 2, 2), dtype=np.uint8)).tolist() == [8]
    sparse = np.zeros((30, 40, 20), np.uint8)  # labels in a small box: only the box is counted, the rest is zeros
    sparse[5:9, 30:40, 2:3] = labels[5:9, 30:40, 2:3]
    sparse_image = sitk.GetImageFromArray(sparse)
    for layout in (sparse, array_view(sparse_image), sparse[::2]):
        assert np.array_equal(label_counts(layout, chunk=7), np.bincount(np.ravel(layout)))
    with pytest.raises(ValueError, match="negative"):
        label_counts(np.full((2, 2, 2), -1, dtype=np.int16))


def test_identity_grid_of_a_slab_is_that_part_of_the_whole_grid() -> None:
    whole = identity_grid((4, 3, 10), np.float64)
    slab = identity_grid((4, 3, 5), np.float64, start=(0, 0, 3))
    assert slab.dtype == np.float64 and slab.shape == (3, 4, 3, 5)
    np.testing.assert_array_equal(slab, whole[:, :, :, 3:8])


@pytest.mark.parametrize(("order", "mode"), [(0, "constant"), (1, "nearest")])
def test_resample_to_grid_one_slab_is_the_slab_loop(monkeypatch: pytest.MonkeyPatch, order: int, mode: str) -> None:
    import prostate_jrs.geometry as geometry

    rng = np.random.default_rng(0)
    data = rng.integers(0, 5, (2, 6, 7, 8)).astype(np.uint8 if order == 0 else np.float32)
    src = np.diag([1.5, 1.0, 2.0, 1.0])
    src[:3, 3] = [0.3, -0.2, 0.5]
    dst = np.eye(4)
    ddf = rng.normal(0, 0.7, (3, 9, 8, 10)).astype(np.float32)
    whole = geometry.resample_to_grid(data, src, dst, (9, 8, 10), order=order, mode=mode, ddf=ddf)
    monkeypatch.setattr(geometry, "_SLAB_POINTS", 9 * 8 * 3)  # slabs of 3 slices
    slabs = geometry.resample_to_grid(data, src, dst, (9, 8, 10), order=order, mode=mode, ddf=ddf)
    assert whole.dtype == slabs.dtype == data.dtype
    np.testing.assert_array_equal(whole, slabs)
