from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from prostate_jrs.labels import STRUCTURES
from prostate_jrs.metrics import deformation_quality, jacobian_determinant, structure_metrics


def _ball(shape, centre, radius, spacing=(1.0, 1.0, 1.0)):
    grid = np.indices(shape).astype(float) * np.asarray(spacing)[:, None, None, None]
    return np.sum((grid - np.asarray(centre)[:, None, None, None]) ** 2, axis=0) <= radius**2


def test_identical_maps_score_perfectly_and_empty_structures_are_handled():
    labels = np.zeros((30, 30, 30), np.uint8)
    labels[_ball(labels.shape, (15, 15, 15), 6)] = 1
    labels[_ball(labels.shape, (15, 15, 25), 3)] = 4
    result = structure_metrics(labels, labels, (1.0, 1.0, 1.0))
    assert result["prostate"].dsc == pytest.approx(1.0)
    assert result["prostate"].msd_mm == pytest.approx(0.0)
    assert result["prostate"].hd95_mm == pytest.approx(0.0)
    assert result["rectum"].dsc == 1.0 and math.isnan(result["rectum"].msd_mm)
    missing = labels.copy()
    missing[missing == 4] = 0
    assert structure_metrics(missing, labels, (1.0, 1.0, 1.0))["bladder"].dsc == 0.0


def test_shifted_ball_gives_expected_distances_in_mm():
    spacing = (2.0, 2.0, 2.0)
    reference = _ball((40, 40, 40), (40, 40, 40), 16, spacing).astype(np.uint8)
    shifted = np.roll(reference, 2, axis=0)  # 4 mm along i
    result = structure_metrics(shifted, reference, spacing)["prostate"]
    assert 0.5 < result.dsc < 0.95
    assert result.hd95_mm == pytest.approx(4.0, abs=0.5)
    assert 1.0 < result.msd_mm < 4.0
    assert result.volume_ml == pytest.approx(result.reference_volume_ml)
    assert result.reference_volume_ml == pytest.approx(4 / 3 * math.pi * 16**3 / 1000, rel=0.1)


def test_background_around_the_structures_does_not_change_any_metric():
    spacing = (1.5, 1.0, 3.0)
    reference = np.zeros((24, 26, 14), np.uint8)
    reference[_ball(reference.shape, (15, 12, 18), 7, spacing)] = 1
    reference[_ball(reference.shape, (15, 20, 24), 4, spacing)] = 2
    prediction = np.roll(reference, (1, -2, 1), axis=(0, 1, 2))
    prediction[0, 0, 0] = 3  # a stray voxel at the corner: the box must reach it
    small = structure_metrics(prediction, reference, spacing)
    pad = ((30, 5), (2, 40), (9, 9))
    large = structure_metrics(np.pad(prediction, pad), np.pad(reference, pad), spacing)
    for name in small:
        for key, value in small[name].as_dict().items():
            other = large[name].as_dict()[key]
            assert (math.isnan(value) and math.isnan(other)) or value == pytest.approx(other, rel=1e-6), (name, key)


def test_shape_and_spacing_are_checked():
    with pytest.raises(ValueError, match="differ in shape"):
        structure_metrics(np.zeros((4, 4, 4)), np.zeros((4, 4, 5)), (1, 1, 1))
    with pytest.raises(ValueError, match="spacing"):
        structure_metrics(np.zeros((4, 4, 4)), np.zeros((4, 4, 4)), (1, 1))


def test_jacobian_of_affine_field_is_its_determinant():
    matrix = np.array([[0.1, 0.02, 0.0], [0.0, -0.05, 0.03], [0.01, 0.0, 0.2]])
    grid = np.indices((10, 12, 14)).astype(float)
    ddf = np.tensordot(matrix, grid, axes=1)
    det = jacobian_determinant(ddf)
    assert np.allclose(det, np.linalg.det(np.eye(3) + matrix))
    quality = deformation_quality(ddf)
    assert quality.folding_fraction == 0.0 and quality.jacobian_std < 1e-6  # float32 arithmetic


def test_jacobian_of_zero_and_scaling_fields_and_bad_shapes():
    zero = np.zeros((3, 5, 6, 7), np.float32)
    assert np.allclose(jacobian_determinant(zero), 1.0)
    grid = np.indices((5, 6, 7)).astype(np.float32)
    assert np.allclose(jacobian_determinant(0.5 * grid), 1.5**3, rtol=1e-5)
    with pytest.raises(ValueError, match=r"\(3, I, J, K\)"):
        jacobian_determinant(zero[:2])


def test_folding_is_counted_inside_the_mask():
    ddf = np.zeros((3, 10, 10, 10))
    ddf[0, 5:, :, :] = -3.0 * np.arange(5)[:, None, None]  # i -> i - 3(i-5): folds for i > 5
    quality = deformation_quality(ddf)
    assert quality.folding_fraction > 0.3 and quality.jacobian_min < 0
    mask = np.zeros((10, 10, 10), bool)
    mask[:4] = True
    assert deformation_quality(ddf, mask).folding_fraction == 0.0
    with pytest.raises(ValueError, match="selects no voxel"):
        deformation_quality(ddf, np.zeros((10, 10, 10), bool))


def test_surface_metrics_equal_monais_functions_bit_for_bit() -> None:
    # MSD and HD95 come from one surface-distance computation; they must stay MONAI's values exactly
    from monai.metrics import compute_average_surface_distance, compute_hausdorff_distance
    from monai.networks.utils import one_hot

    rng = np.random.default_rng(3)
    spacing = [0.98, 0.98, 3.0]
    for _ in range(3):
        reference = np.zeros((40, 36, 20), np.uint8)
        reference[8:30, 6:28, 4:15] = rng.integers(1, 5, size=(22, 22, 11))
        reference[:4, 10:20, :3] = rng.integers(1, 5)  # a structure on the array's edge: MONAI pads its crop there
        prediction = np.roll(reference, rng.integers(-3, 4, size=3), axis=(0, 1, 2))
        prediction[rng.random(prediction.shape) < 0.05] = 0
        rows = structure_metrics(prediction, reference, spacing)
        pred = one_hot(torch.as_tensor(prediction, dtype=torch.long)[None, None], num_classes=5, dim=1)
        ref = one_hot(torch.as_tensor(reference, dtype=torch.long)[None, None], num_classes=5, dim=1)
        for structure in STRUCTURES:
            pair = (pred[:, structure.label : structure.label + 1], ref[:, structure.label : structure.label + 1])
            msd = float(
                compute_average_surface_distance(*pair, include_background=True, symmetric=True, spacing=spacing)
            )
            hd95 = float(compute_hausdorff_distance(*pair, include_background=True, percentile=95, spacing=spacing))
            assert (rows[structure.name].msd_mm, rows[structure.name].hd95_mm) == (msd, hd95)
