from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from prostate_jrs.baselines import ElastixSettings, register_bspline, world_ddf_to_voxels
from prostate_jrs.geometry import array_from_image, image_from_array, index_to_world, resample_with_ddf

pytest.importorskip("itk")


def _blobs(
    shape: tuple[int, int, int], spacing: float, direction: tuple[float, ...], shift_mm: np.ndarray
) -> sitk.Image:
    """Smooth HU blobs fixed in world coordinates, shifted by ``shift_mm``, on a grid with ``direction``."""
    reference = sitk.Image(*shape, sitk.sitkFloat32)
    reference.SetSpacing((spacing,) * 3)
    reference.SetDirection(direction)
    centre_index = (np.asarray(shape) - 1) / 2
    matrix = np.asarray(direction).reshape(3, 3) @ np.diag((spacing,) * 3)
    reference.SetOrigin(tuple(-(matrix @ centre_index)))
    grid = np.stack(np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")).reshape(3, -1)
    affine = index_to_world(reference)
    world = (affine[:3, :3] @ grid + affine[:3, 3:4]).reshape(3, *shape) - shift_mm.reshape(3, 1, 1, 1)
    hu = np.full(shape, -1000.0, dtype=np.float32)
    for centre, radius, value in (((0, 0, 0), 22, 1000.0), ((12, -8, 6), 8, 1400.0), ((-10, 10, -8), 7, 1600.0)):
        distance = np.sqrt(sum((world[a] - c) ** 2 for a, c in enumerate(centre)))
        hu += value / (1 + np.exp((distance - radius) / 1.5))
    return image_from_array(hu, reference)


@pytest.mark.parametrize("direction", [(1, 0, 0, 0, 1, 0, 0, 0, 1), (-1, 0, 0, 0, -1, 0, 0, 0, 1)])
def test_recovers_a_known_shift_in_project_convention(
    direction: tuple[float, ...], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    shift = np.array([4.0, -3.0, 2.0])  # the daily anatomy sits 4 mm further along x, ...
    fixed = _blobs((36, 36, 32), 2.0, direction, shift)
    moving = _blobs((36, 36, 32), 2.0, direction, np.zeros(3))
    result = register_bspline(fixed, moving, ElastixSettings.tiny())
    assert result.ddf.shape == (3, 36, 36, 32) and result.ddf.dtype == np.float32
    # pull-back: the daily point x shows the planning point x - shift
    centre = result.ddf_world_mm[:, 12:24, 12:24, 10:22].reshape(3, -1).mean(axis=1)
    np.testing.assert_allclose(centre, -shift, atol=1.0)
    np.testing.assert_allclose(result.ddf, world_ddf_to_voxels(result.ddf_world_mm, fixed), rtol=1e-6)
    before = np.abs(resample_with_ddf(moving, fixed, default_value=-1000.0) - array_from_image(fixed)).mean()
    after = np.abs(resample_with_ddf(moving, fixed, result.ddf, default_value=-1000.0) - array_from_image(fixed)).mean()
    assert after < 0.5 * before
    assert result.seconds > 0
    assert not list(tmp_path.iterdir())  # elastix and transformix leave no files in the working directory


def test_world_to_voxel_conversion_follows_the_grid_direction() -> None:
    grid = sitk.Image(4, 5, 6, sitk.sitkFloat32)
    grid.SetSpacing((2.0, 1.0, 3.0))
    grid.SetDirection((-1, 0, 0, 0, -1, 0, 0, 0, 1))
    world = np.zeros((3, 4, 5, 6), dtype=np.float32)
    world[0], world[1], world[2] = 4.0, 2.0, 3.0
    voxels = world_ddf_to_voxels(world, grid)
    np.testing.assert_allclose(voxels[:, 0, 0, 0], [-2.0, -2.0, 1.0])


def test_mask_must_lie_on_the_fixed_grid() -> None:
    fixed = _blobs((20, 20, 20), 2.0, (1, 0, 0, 0, 1, 0, 0, 0, 1), np.zeros(3))
    with pytest.raises(ValueError, match="not on the fixed grid"):
        register_bspline(fixed, fixed, ElastixSettings.tiny(), fixed_mask=sitk.Image(10, 10, 10, sitk.sitkUInt8))


def test_settings_are_validated() -> None:
    with pytest.raises(ValueError, match="positive"):
        ElastixSettings(iterations=0)
    maps = ElastixSettings().parameter_maps()
    assert maps[0]["Transform"] == ["BSplineTransform"] and maps[0]["FinalGridSpacingInPhysicalUnits"] == ["10"]
