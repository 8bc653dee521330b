"""One synthetic patient: a planning scan and daily scans with known ground-truth deformation."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import SimpleITK as sitk

from prostate_jrs.geometry import array_from_image, resample_with_ddf

from .anatomy import Anatomy, TextureField, render, sample_anatomy
from .config import PhantomConfig
from .deformation import BoneWeight, DailyMotion, compose_ddf, sample_motion
from .grid import Grid, daily_grid, planning_grid
from .imaging import add_noise, apply_psf, paint_gas, to_hu

__all__ = ["Fraction", "Patient", "Scan", "generate_patient", "warp_labels"]

# Seed streams: anatomy, planning imaging, then per fraction (motion/grid, imaging). Fraction f depends only on
# (seed, f), so asking for more fractions leaves the earlier ones unchanged.
_ANATOMY, _TEXTURE, _PLANNING, _MOTION, _IMAGING = range(5)
_REACH = 60.0  # mm beyond the planning field of view that daily points may need (couch, scan length, motion)


@dataclass
class Scan:
    """One CT scan of the phantom.

    Attributes:
        image: int16 HU, LPS geometry.
        labels: uint8 label map (0..4, :mod:`prostate_jrs.labels`) on the image grid.
        gas_mask: ``(I, J, K)`` bool, voxels painted with rectal gas (no correspondence to other scans).
    """

    image: sitk.Image
    labels: sitk.Image
    gas_mask: np.ndarray


@dataclass
class Fraction(Scan):
    """A daily scan with its ground truth.

    Attributes:
        ddf: ``(3, I, J, K)`` float32 on the daily grid, daily voxel units: daily voxel ``x`` shows the planning
            anatomy at the world point of ``x + ddf(x)`` (:mod:`prostate_jrs.geometry` convention).
        info: drawn motion parameters and field statistics (bladder volume, damping, min det J, ...).
    """

    ddf: np.ndarray = field(default_factory=lambda: np.zeros((3, 0, 0, 0), np.float32))
    info: dict[str, object] = field(default_factory=dict)


@dataclass
class Patient:
    """A synthetic patient: planning scan, daily fractions, the anatomy they came from."""

    patient_id: str
    seed: int
    planning: Scan
    fractions: list[Fraction]
    anatomy: Anatomy


def warp_labels(
    planning_labels: sitk.Image, grid: Grid, ddf: np.ndarray, fallback: np.ndarray, margin: float
) -> np.ndarray:
    """Nearest-neighbour warp of the planning label map onto a daily grid through the ground-truth DDF.

    Only the daily voxels that can reach a labelled planning voxel (its bounding box grown by ``margin`` mm,
    the largest displacement) are resampled, in slabs of slices, because
    :func:`prostate_jrs.geometry.resample_with_ddf` holds float64 coordinates for every voxel it samples.
    Daily voxels that map outside the planning grid take ``fallback`` (the analytic labels).
    """
    out = np.zeros(grid.shape, dtype=np.uint8)
    labelled = np.argwhere(array_from_image(planning_labels) > 0)
    if len(labelled) == 0:
        return out
    plan = Grid.from_image(planning_labels)
    lo = np.asarray(plan.origin) + labelled.min(0) * np.asarray(plan.spacing) - margin
    hi = np.asarray(plan.origin) + labelled.max(0) * np.asarray(plan.spacing) + margin
    box = grid.index_box(lo, hi)
    if box is None:
        return out
    outside = 255
    step = max(1, 2_000_000 // ((box[0].stop - box[0].start) * (box[1].stop - box[1].start)))
    for k0 in range(box[2].start, box[2].stop, step):
        k1 = min(box[2].stop, k0 + step)
        sub = (box[0], box[1], slice(k0, k1))
        start = [s.start for s in sub]
        reference = sitk.Image([s.stop - s.start for s in sub], sitk.sitkUInt8)
        reference.SetSpacing(grid.spacing)
        reference.SetOrigin([o + i * d for o, i, d in zip(grid.origin, start, grid.spacing, strict=True)])
        # The slab's own voxel index differs from the full grid's by a constant; the DDF is a displacement,
        # so it carries over unchanged.
        out[sub] = resample_with_ddf(
            planning_labels, reference, np.ascontiguousarray(ddf[(slice(None), *sub)]), order=0,
            default_value=outside,
        )  # fmt: skip
    missing = out == outside
    out[missing] = fallback[missing]
    return out


def _finish(
    rng: np.random.Generator, scene_hu: np.ndarray, lumen: np.ndarray, grid: Grid, config: PhantomConfig, gas_p: float
) -> tuple[np.ndarray, np.ndarray]:
    """Gas (sometimes), PSF, fresh noise, HU storage."""
    painted = rng.random() < gas_p
    gas = paint_gas(rng, scene_hu, lumen, grid) if painted else np.zeros(scene_hu.shape, dtype=bool)
    hu = apply_psf(scene_hu, grid.spacing, config.site)
    add_noise(rng, hu, grid.spacing, config.site)
    return to_hu(hu, config.site), gas


def generate_patient(
    seed: int, n_fractions: int, config: PhantomConfig | None = None, patient_id: str | None = None
) -> Patient:
    """Generate one patient deterministically from ``seed``.

    Args:
        seed: non-negative integer; the same seed and config give identical scans.
        n_fractions: number of daily scans (>= 0).
        config: grid, site and ranges; the clinical-looking default when ``None``.
        patient_id: identifier; ``f"JRS{seed:03d}"`` when ``None``.

    Returns:
        The patient.

    Raises:
        ValueError: for a negative seed or fraction count.
        FoldingError: if a drawn deformation cannot be made folding-free (see :func:`compose_ddf`).
    """
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if not isinstance(n_fractions, (int, np.integer)) or n_fractions < 0:
        raise ValueError(f"n_fractions must be a non-negative integer, got {n_fractions!r}")
    config = config or PhantomConfig()
    seed = int(seed)
    anatomy = sample_anatomy(np.random.default_rng([seed, _ANATOMY]), config.anatomy, config.site.muscle_hu)
    plan_grid = planning_grid(config)
    lo, hi = plan_grid.bounds()
    lo, hi = lo - _REACH, hi + _REACH
    # Texture grain of about 3 mm, never finer than the voxels (it would be averaged away anyway).
    grain = max(3.0, float(min(config.spacing)))
    texture = TextureField.random(np.random.default_rng([seed, _TEXTURE]), lo, hi, spacing=grain)
    scene = render(anatomy, texture, plan_grid)
    hu, gas = _finish(
        np.random.default_rng([seed, _PLANNING]), scene.hu, scene.lumen, plan_grid, config,
        config.planning_gas_probability,
    )  # fmt: skip
    planning = Scan(plan_grid.image(hu), plan_grid.image(scene.labels), gas)
    del scene, hu

    fractions = []
    bone = BoneWeight(anatomy, lo + _REACH / 2, hi - _REACH / 2, config.motion.bone_distance) if n_fractions else None
    for f in range(n_fractions):
        assert bone is not None
        fractions.append(_daily_scan(seed, f, config, anatomy, texture, planning, plan_grid, bone, (lo, hi)))
    return Patient(patient_id or f"JRS{seed:03d}", seed, planning, fractions, anatomy)


def _daily_scan(
    seed: int,
    f: int,
    config: PhantomConfig,
    anatomy: Anatomy,
    texture: TextureField,
    planning: Scan,
    plan_grid: Grid,
    bone: BoneWeight,
    box: tuple[np.ndarray, np.ndarray],
) -> Fraction:
    """Daily scan ``f`` (0-based): its own grid, motion, known deformation, rendering and imaging.

    Its random draws come from generators seeded by ``(seed, f)``, so a fraction does not depend on the others.
    """
    lo, hi = box
    rng = np.random.default_rng([seed, _MOTION, f])
    grid = daily_grid(plan_grid, config, rng)
    motion: DailyMotion = sample_motion(rng, anatomy, config.motion, lo, hi)
    ddf, stats = compose_ddf(grid, anatomy, motion, config.motion, bone, config.field_spacing)
    scene = render(anatomy, texture, grid, ddf, margin=stats["max_displacement_mm"] + 2.0)
    hu, gas = _finish(
        np.random.default_rng([seed, _IMAGING, f]), scene.hu, scene.lumen, grid, config,
        config.daily_gas_probability,
    )  # fmt: skip
    # Damping scales log(bladder volume ratio) too: this is the volume the field actually aims at.
    target = anatomy.bladder_volume_ml * (motion.bladder_volume_ml / anatomy.bladder_volume_ml) ** stats["damping"]
    info: dict[str, object] = {
        **motion.summary(),
        **stats,
        "bladder_target_ml": target,
        "grid_size": list(grid.size),
        "grid_origin": list(grid.origin),
    }
    if config.daily_labels == "warped":
        labels = warp_labels(planning.labels, grid, ddf, scene.labels, stats["max_displacement_mm"] + 5.0)
    else:
        labels = scene.labels
    return Fraction(grid.image(hu), grid.image(labels), gas, ddf=ddf, info=info)
