from __future__ import annotations

import numpy as np
import pytest

from prostate_jrs.geometry import array_from_image, index_to_world
from prostate_jrs.labels import structure_by_name
from prostate_jrs.metrics import jacobian_determinant
from prostate_jrs.phantom import FoldingError, MotionRanges, Patient, PhantomConfig
from prostate_jrs.phantom.anatomy import sample_anatomy
from prostate_jrs.phantom.config import AnatomyRanges
from prostate_jrs.phantom.deformation import BoneWeight, compose_ddf, sample_motion
from prostate_jrs.phantom.grid import planning_grid
from prostate_jrs.phantom.shapes import rotation_matrix

BLADDER = structure_by_name("bladder").label


def _world_points(image, ddf: np.ndarray) -> np.ndarray:
    """World points ``A (x + ddf(x))`` (3, N) and the daily voxel world points (3, N)."""
    shape = ddf.shape[1:]
    index = np.stack(np.meshgrid(*(np.arange(n, dtype=np.float64) for n in shape), indexing="ij")).reshape(3, -1)
    affine = index_to_world(image)
    daily = affine[:3, :3] @ index + affine[:3, 3:]
    source = affine[:3, :3] @ (index + ddf.reshape(3, -1)) + affine[:3, 3:]
    return daily, source


def test_ground_truth_ddf_has_no_folding(tiny_patient: Patient) -> None:
    for fraction in tiny_patient.fractions:
        assert fraction.ddf.dtype == np.float32
        assert fraction.ddf.shape == (3, *fraction.image.GetSize())
        det = jacobian_determinant(fraction.ddf)
        assert det.min() > 0.2
        assert fraction.info["min_det_j"] == pytest.approx(float(det.min()), abs=1e-4)


def test_displacements_are_realistic(tiny_patient: Patient) -> None:
    for fraction in tiny_patient.fractions:
        mm = fraction.ddf * np.asarray(fraction.image.GetSpacing()).reshape(3, 1, 1, 1)
        norm = np.sqrt((mm**2).sum(0))
        assert 1.0 < np.median(norm) < 12.0
        assert norm.max() < 35.0


def test_bone_moves_rigidly_with_setup(tiny_patient: Patient) -> None:
    anatomy = tiny_patient.anatomy
    for fraction in tiny_patient.fractions:
        daily, source = _world_points(fraction.image, fraction.ddf.astype(np.float64))
        deep = np.min([bone.sdf(source.astype(np.float32)) for bone in anatomy.bones], axis=0) < -6.0
        assert deep.sum() > 50
        rot = rotation_matrix(fraction.info["setup_angles"])
        rigid = rot.T @ (daily[:, deep] - np.asarray(fraction.info["setup_shift"])[:, None])
        np.testing.assert_allclose(source[:, deep], rigid, atol=0.05)  # mm; non-rigid parts are mm-sized


def test_bladder_volume_follows_drawn_volume(tiny_patient: Patient) -> None:
    spacing = np.prod(tiny_patient.fractions[0].labels.GetSpacing()) / 1000.0
    measured = []
    for fraction in tiny_patient.fractions:
        volume = (array_from_image(fraction.labels) == BLADDER).sum() * spacing
        target = fraction.info["bladder_target_ml"]
        assert abs(volume - target) < 0.15 * target
        measured.append(volume)
    assert abs(measured[0] - measured[1]) > 20.0  # varies between fractions (drawn 365 vs 230 ml for seed 0)


def test_daily_bladder_volume_distribution() -> None:
    """V_d = V_p exp(N(0, 0.35)), clamped to 80-600 ml (docs/ARCHITECTURE.md, "Phantom recipe", item 3)."""
    rng = np.random.default_rng(0)
    anatomy = sample_anatomy(rng, AnatomyRanges())
    ranges = MotionRanges()
    lo, hi = np.full(3, -100.0), np.full(3, 100.0)
    volumes = np.array([sample_motion(rng, anatomy, ranges, lo, hi).bladder_volume_ml for _ in range(400)])
    assert volumes.min() >= 80.0 and volumes.max() <= 600.0
    assert 0.28 < np.log(volumes / anatomy.bladder_volume_ml).std() < 0.42


def test_folding_field_is_damped_or_rejected() -> None:
    rng = np.random.default_rng(3)
    anatomy = sample_anatomy(rng, AnatomyRanges())
    grid = planning_grid(PhantomConfig.tiny(fov=(200.0, 160.0, 160.0)))  # around the organs only
    lo, hi = grid.bounds()
    bone = BoneWeight(anatomy, lo, hi, 10.0)
    # A 10-12 mm change of rectal radius with a 6 mm falloff squeezes the tissue around it past folding.
    wild = MotionRanges(rectum_change=(20.0, 24.0), rectum_falloff=6.0)
    motion = sample_motion(rng, anatomy, wild, lo, hi)
    ddf, stats = compose_ddf(grid, anatomy, motion, wild, bone, field_spacing=4.0)
    assert stats["damping"] < 1.0
    assert jacobian_determinant(ddf).min() > 0.2
    impossible = MotionRanges(min_jacobian=0.999)
    with pytest.raises(FoldingError, match="folds"):
        compose_ddf(grid, anatomy, sample_motion(rng, anatomy, impossible, lo, hi), impossible, bone, 4.0, max_tries=2)
