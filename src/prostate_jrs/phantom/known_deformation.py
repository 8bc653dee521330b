"""A known deformation of a real CT, drawn from the phantom's deformation model.

The model: docs/ARCHITECTURE.md, "Phantom recipe".

A real pelvic CT has no ground-truth correspondence to any other scan, but it can be deformed by a known field: a
phantom patient is placed in the real CT's world frame, its daily pull-back map (setup, background field, rectal
distension, bladder filling, prostate and seminal-vesicle motion) is evaluated at the real CT's voxels, and the
real CT is sampled through it. The result is a "daily" CT of real anatomy whose pull-back map to the real
("planning") CT is known exactly, plus planning contours (the phantom's organs, rasterised on the real grid) that a
contour-propagating pipeline needs as input.

Placement is a **translation** ``phantom point = world point + offset``, found by maximising the overlap of the
phantom's analytic bones with the real CT's bone (an exhaustive search by FFT cross-correlation). A rigid
alignment with :func:`prostate_jrs.rigid.align_on_bone` is unreliable between two different pelvises (on the
TotalSegmentator fixture it ends 30 mm RMS from bone, Dice 0.08: its centre-of-mass start is pulled up by the
real lumbar spine, which the phantom lacks), and a translation keeps the transport exact: the phantom's
axis-aligned grid of daily points *is* the real grid, shifted (and flipped along axes whose direction is -1), so
:func:`prostate_jrs.phantom.deformation.compose_ddf` evaluates the field at every real voxel with no
interpolation, and the phantom's motion directions (anterior, superior, about the left-right axis) stay the real
patient's.

Transport: with ``S(q) = q + offset``, the real-frame pull-back map is ``S^-1 o phi o S``. Bone rigidity uses the
*real* CT's bone (HU above a threshold), not the phantom's: the real skeleton must move with the setup only, as
the rigid pre-alignment on bone assumes (the phantom's own bones do not coincide with it).

Limitations: the phantom's organs are placed by bone, so its bladder, rectum and prostate only roughly coincide
with the real organs; the organ-specific components therefore deform the real tissue where the *phantom* organs
are, and the planning contours do not outline the real organs. The real scan's noise and metal streaks are
warped along with the anatomy (fresh noise is added on top; streaks are not recomputed).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import SimpleITK as sitk
from scipy import ndimage, signal

from prostate_jrs.geometry import array_from_image, identity_grid, image_from_array, index_to_world, resample_with_ddf
from prostate_jrs.hounsfield import AIR_HU

from .anatomy import Anatomy, TextureField, render, sample_anatomy
from .config import AnatomyRanges, MotionRanges, SiteProfile
from .deformation import BoneWeight, DailyMotion, compose_ddf, sample_motion
from .grid import Grid
from .imaging import add_noise
from .shapes import rotation_matrix

__all__ = [
    "ImageBoneWeight",
    "KnownDeformation",
    "PhantomPlacement",
    "bone_mask",
    "deform_real_ct",
    "from_phantom_axes",
    "phantom_grid",
    "place_phantom",
    "planning_points",
]

# Seed streams, as in generate.py (anatomy 0, texture 1, motion 3, imaging 4), so seed s draws the same anatomy
# as phantom patient s.
_ANATOMY, _TEXTURE, _MOTION, _IMAGING = 0, 1, 3, 4


def _flips(image: sitk.Image) -> tuple[bool, bool, bool]:
    """Which index axes run against the world axes; raises unless the direction is diagonal +-1."""
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    signs = np.diag(direction)
    if not (np.allclose(np.abs(direction), np.eye(3), atol=1e-6) and np.allclose(np.abs(signs), 1.0, atol=1e-6)):
        raise ValueError(
            f"the image direction must be diagonal with entries +-1 (axial, no oblique or permuted axes); got "
            f"{image.GetDirection()}"
        )
    return tuple(bool(s < 0) for s in signs)  # type: ignore[return-value]


def phantom_grid(image: sitk.Image, offset: np.ndarray) -> Grid:
    """The image's voxel grid expressed in the phantom frame (``world + offset``) as an identity-direction Grid.

    Axes whose direction is -1 are reversed (voxel ``n - 1 - i`` of the image is voxel ``i`` of the grid), so the
    grid's nodes are exactly the image's voxel centres; :func:`from_phantom_axes` converts arrays between the two.

    Raises:
        ValueError: if the image direction is not diagonal +-1.
    """
    flips = _flips(image)
    size = np.asarray(image.GetSize())
    spacing = np.asarray(image.GetSpacing(), dtype=np.float64)
    origin = np.asarray(image.GetOrigin(), dtype=np.float64)
    lowest = np.where(flips, origin - spacing * (size - 1), origin)
    return Grid(
        tuple(int(n) for n in size),  # type: ignore[arg-type]
        tuple(float(s) for s in spacing),  # type: ignore[arg-type]
        tuple(float(o) for o in lowest + np.asarray(offset, dtype=np.float64)),  # type: ignore[arg-type]
    )


def from_phantom_axes(array: np.ndarray, image: sitk.Image, is_ddf: bool = False) -> np.ndarray:
    """Convert an array between the phantom-frame grid (:func:`phantom_grid`) and the image's own index order.

    The conversion is its own inverse. For a DDF ``(3, I, J, K)`` in voxel units (``is_ddf``), a reversed axis also
    negates its component: one voxel towards +world is -1 image voxel along that axis.

    Args:
        array: ``(I, J, K)`` or, with ``is_ddf``, ``(3, I, J, K)``.
        image: the image (its direction decides which axes are reversed).
        is_ddf: the array is a displacement in voxel units.

    Returns:
        A new array in the other index order.
    """
    flips = _flips(image)
    lead = 1 if is_ddf else 0
    index = [slice(None)] * lead + [slice(None, None, -1) if f else slice(None) for f in flips]
    out = np.array(array[tuple(index)], copy=True)
    if is_ddf:
        for axis, flipped in enumerate(flips):
            if flipped:
                out[axis] *= -1.0
    return out


def bone_mask(image: sitk.Image, bone_hu: float = 200.0, min_component_ml: float = 2.0) -> np.ndarray:
    """Bone of a CT in HU: voxels above ``bone_hu``, without components under ``min_component_ml``.

    The size filter drops bright specks (calcifications, dense bowel content) that should not be held rigid.

    Returns:
        Boolean ``(I, J, K)`` in the image's index order.
    """
    mask = array_from_image(image) > bone_hu
    labelled, n = ndimage.label(mask)
    if n == 0:
        return mask
    voxel_ml = float(np.prod(image.GetSpacing())) / 1000.0
    sizes = ndimage.sum_labels(mask, labelled, index=np.arange(1, n + 1)) * voxel_ml
    keep = np.concatenate([[False], sizes >= min_component_ml])
    return keep[labelled]


class ImageBoneWeight(BoneWeight):
    """Bone rigidity weight of :func:`~prostate_jrs.phantom.deformation.pull_back` from a CT's bone mask.

    Same profile as :class:`BoneWeight` (``1 - exp(-d^2 / (2 s^2))`` of the distance ``d`` to bone) but the bone is
    a voxel mask in the phantom frame, e.g. a real CT's bone, instead of the phantom's analytic bones. Subclassed
    so it can be passed wherever a :class:`BoneWeight` is expected; spacing may be anisotropic.
    """

    def __init__(self, bone: np.ndarray, grid: Grid, scale: float) -> None:
        self.origin = np.asarray(grid.origin, dtype=np.float32)
        self.spacing_xyz = np.asarray(grid.spacing, dtype=np.float32)
        self.spacing = float(self.spacing_xyz.min())
        if bone.shape != grid.shape:
            raise ValueError(f"bone mask of shape {bone.shape} does not match the grid {grid.shape}")
        if bone.any():
            distance = ndimage.distance_transform_edt(~bone, sampling=tuple(grid.spacing)).astype(np.float32)
        else:  # no bone at all: everything may move
            distance = np.full(bone.shape, np.inf, dtype=np.float32)
        self.weight = (1.0 - np.exp(-0.5 * (distance / scale) ** 2)).astype(np.float32)

    def __call__(self, points: np.ndarray) -> np.ndarray:
        """Weight at world points ``(3, N)`` (phantom frame); the edge value beyond the grid."""
        index = (points - self.origin[:, None]) / self.spacing_xyz[:, None]
        return ndimage.map_coordinates(self.weight, index, order=1, mode="nearest", prefilter=False)


def _phantom_bone(anatomy: Anatomy, lattice: Grid, z_min: float) -> tuple[np.ndarray, np.ndarray]:
    """The phantom's bone mask (above ``z_min``) on nodes of ``lattice`` around its bones, and its origin.

    The nodes continue the lattice's, so the correlation peak is a whole number of voxels.
    """
    boxes = [bone.bbox() for bone in anatomy.bones]
    lo = np.min([b[0] for b in boxes], axis=0)
    hi = np.max([b[1] for b in boxes], axis=0)
    lo[2] = max(lo[2], z_min)
    spacing, origin = np.asarray(lattice.spacing), np.asarray(lattice.origin)
    lo = origin + spacing * np.floor((lo - origin) / spacing)
    shape = tuple(int(n) for n in np.ceil((hi - lo) / spacing).astype(int) + 1)
    axes = [lo[a] + spacing[a] * np.arange(shape[a], dtype=np.float32) for a in range(3)]
    points = np.stack(np.meshgrid(*axes, indexing="ij")).astype(np.float32)
    inside = np.zeros(shape, dtype=bool)
    for bone in anatomy.bones:
        inside |= bone.sdf(points) < 0
    return inside, lo


@dataclass(frozen=True)
class PhantomPlacement:
    """Where the phantom sits in an image's world frame.

    Attributes:
        offset: ``phantom point = world point + offset`` (mm, LPS).
        bone_overlap: fraction of the phantom's bone voxels (inside the image) that fall on the image's bone.
        method: ``bone_fft`` (found here) or ``given``.
    """

    offset: np.ndarray
    bone_overlap: float
    method: str = "bone_fft"


def place_phantom(
    image: sitk.Image, anatomy: Anatomy, bone_hu: float = 200.0, z_min: float = -45.0
) -> PhantomPlacement:
    """The translation that puts the phantom's bones on the image's bone (exhaustive, whole voxels).

    Both bone masks are laid on the image's voxel size and cross-correlated by FFT; the peak is the translation
    with the most overlapping bone voxels, a global optimum with no start point to get wrong.

    Args:
        image: CT in HU with a diagonal +-1 direction.
        anatomy: the phantom anatomy (world: prostate centre at the origin).
        bone_hu: bone threshold of the image.
        z_min: phantom bone below this (mm, the femoral shafts) is left out: a pelvic CT usually stops above it,
            so it can only add overlap with unrelated bone.

    Returns:
        The placement.

    Raises:
        ValueError: if the image has no bone or a non-diagonal direction.
    """
    real = from_phantom_axes(bone_mask(image, bone_hu), image)
    if not real.any():
        raise ValueError(f"the image has no voxel above {bone_hu:g} HU; is it a CT in HU?")
    base = phantom_grid(image, np.zeros(3))
    spacing = np.asarray(base.spacing, dtype=np.float64)
    phantom, phantom_lo = _phantom_bone(anatomy, base, z_min)
    score = signal.fftconvolve(real.astype(np.float32), phantom[::-1, ::-1, ::-1].astype(np.float32), mode="full")
    peak = np.unravel_index(int(np.argmax(score)), score.shape)
    # score[peak]: phantom voxel q lies on image-grid voxel q + shift
    shift = np.asarray(peak) - (np.asarray(phantom.shape) - 1)
    offset = phantom_lo - np.asarray(base.origin) - spacing * shift
    # overlap fraction of the phantom bone that lands inside the image
    lo = np.maximum(shift, 0)
    hi = np.minimum(shift + np.asarray(phantom.shape), np.asarray(real.shape))
    inside = phantom[tuple(slice(a - s, b - s) for a, b, s in zip(lo, hi, shift, strict=True))]
    overlap = float(score[peak]) / max(float(inside.sum()), 1.0)
    return PhantomPlacement(offset=offset, bone_overlap=overlap)


def planning_points(ddf: np.ndarray, daily: sitk.Image, daily_to_planning: np.ndarray | None = None) -> np.ndarray:
    """World points ``R @ A_daily @ (x + ddf(x))`` of every daily voxel, ``(3, I, J, K)`` float64 (mm).

    The project's DDF convention with a rigid part (:mod:`prostate_jrs.pipeline`): the planning anatomy at daily
    voxel ``x``; ``R`` (4x4, daily world -> planning world) is the identity when ``None``.
    """
    matrix = index_to_world(daily)
    if daily_to_planning is not None:
        matrix = np.asarray(daily_to_planning, dtype=np.float64) @ matrix
    points = identity_grid(tuple(daily.GetSize()), np.float64) + ddf
    return np.tensordot(matrix[:3, :3], points, axes=1) + matrix[:3, 3, None, None, None]


@dataclass
class KnownDeformation:
    """A real CT deformed by a known phantom-model field (module docstring).

    Attributes:
        planning_ct: the real CT (the planning scan), unchanged.
        planning_labels: the phantom's organs (uint8, 0..4) rasterised on the planning CT's grid.
        daily_ct: int16 HU on the planning CT's grid: the planning CT sampled through the field, fresh noise added,
            -1000 where the field points outside the planning CT.
        ddf: ``(3, I, J, K)`` float32, voxel units of that grid: daily voxel ``x`` shows the planning anatomy at
            ``A @ (x + ddf(x))`` (:mod:`prostate_jrs.geometry` convention, one shared frame of reference).
        setup: 4x4 daily world -> planning world map of the rigid setup alone (the bone's true motion).
        placement: where the phantom sits.
        anatomy: the phantom anatomy.
        info: drawn motion parameters, field statistics (damping, det J range, max displacement).
    """

    planning_ct: sitk.Image
    planning_labels: sitk.Image
    daily_ct: sitk.Image
    ddf: np.ndarray
    setup: np.ndarray
    placement: PhantomPlacement
    anatomy: Anatomy
    info: dict[str, object] = field(default_factory=dict)

    def true_points(self) -> np.ndarray:
        """Planning world point (mm) of every daily voxel, ``(3, I, J, K)`` float64."""
        return planning_points(self.ddf, self.daily_ct)

    def inside_planning(self) -> np.ndarray:
        """Boolean ``(I, J, K)``: daily voxels whose true planning point lies inside the planning CT."""
        index = planning_points(self.ddf, self.daily_ct, np.linalg.inv(index_to_world(self.planning_ct)))
        size = np.asarray(self.planning_ct.GetSize()).reshape(3, 1, 1, 1)
        return np.all((index >= -0.5) & (index <= size - 0.5), axis=0)


def _deformed_scan(image: sitk.Image, ddf: np.ndarray, noise_hu: float, rng: np.random.Generator) -> sitk.Image:
    """``image`` warped by ``ddf`` with scanner noise of ``noise_hu`` SD added, stored as int16 HU."""
    hu = resample_with_ddf(image, image, ddf, order=1, default_value=AIR_HU)
    if noise_hu > 0:
        voxel = float(np.prod(image.GetSpacing()))
        add_noise(
            rng,
            hu,
            tuple(image.GetSpacing()),
            SiteProfile(noise_sd_hu=float(noise_hu), noise_reference_voxel_mm3=voxel),
        )
    hu = np.clip(np.rint(hu), np.iinfo(np.int16).min, np.iinfo(np.int16).max).astype(np.int16)
    return image_from_array(hu, image)


def _setup_in_image_frame(drawn: DailyMotion, placement: PhantomPlacement) -> np.ndarray:
    """The setup motion alone as a 4x4 map of image points: ``phi_setup(p) = rot^T (p - shift)`` in the phantom
    frame, conjugated by the phantom's placement in the image."""
    rot = rotation_matrix(drawn.setup_angles)
    setup = np.eye(4)
    setup[:3, :3] = rot.T
    setup[:3, 3] = rot.T @ (placement.offset - drawn.setup_shift) - placement.offset
    return setup


def deform_real_ct(
    image: sitk.Image,
    seed: int = 0,
    motion: MotionRanges | None = None,
    anatomy_ranges: AnatomyRanges | None = None,
    noise_hu: float | None = None,
    offset: np.ndarray | None = None,
    bone_hu: float = 200.0,
) -> KnownDeformation:
    """Deform a real CT by a phantom patient's daily field (module docstring).

    Args:
        image: real CT in HU, direction diagonal +-1 (any spacing).
        seed: draws the phantom anatomy (the same as phantom patient ``seed``), the motion and the noise.
        motion: motion magnitudes; :class:`MotionRanges` defaults when ``None``.
        anatomy_ranges: phantom anatomy ranges; defaults when ``None``.
        noise_hu: SD of the fresh correlated noise added to the daily CT (a repeat scan has its own noise, not
            the planning scan's, warped); the phantom's site default for this voxel size when ``None``; 0 for none.
        offset: phantom placement ``phantom = world + offset``; found by :func:`place_phantom` when ``None``.
        bone_hu: bone threshold of the image (placement and rigidity).

    Returns:
        The deformation, daily CT and planning contours.

    Raises:
        ValueError: if the image direction is not diagonal +-1 or the image holds no bone.
        prostate_jrs.phantom.FoldingError: if the drawn field cannot be made folding-free.
    """
    motion = motion or MotionRanges()
    site = SiteProfile()
    anatomy = sample_anatomy(np.random.default_rng([seed, _ANATOMY]), anatomy_ranges or AnatomyRanges(), site.muscle_hu)
    if offset is None:
        placement = place_phantom(image, anatomy, bone_hu)
    else:
        placement = PhantomPlacement(np.asarray(offset, dtype=np.float64), float("nan"), "given")
    grid = phantom_grid(image, placement.offset)
    lo, hi = grid.bounds()

    # The real skeleton is what must stay rigid (the phantom's own bones are elsewhere).
    bone = ImageBoneWeight(from_phantom_axes(bone_mask(image, bone_hu), image), grid, motion.bone_distance)
    rng = np.random.default_rng([seed, _MOTION, 0])
    drawn = sample_motion(rng, anatomy, motion, lo, hi)
    # Field nodes at every voxel: no interpolation, the field is exact at the voxel centres.
    ddf_grid, stats = compose_ddf(grid, anatomy, drawn, motion, bone, field_spacing=float(min(grid.spacing)))
    ddf = from_phantom_axes(ddf_grid, image, is_ddf=True)
    del ddf_grid

    if noise_hu is None:
        noise_hu = site.noise_sd_for(image.GetSpacing())
    daily = _deformed_scan(image, ddf, noise_hu, np.random.default_rng([seed, _IMAGING, 0]))

    # Planning contours: the phantom's organs evaluated at the image's voxel centres (no resampling).
    texture = TextureField.random(np.random.default_rng([seed, _TEXTURE]), lo - 5.0, hi + 5.0, spacing=6.0)
    labels = from_phantom_axes(render(anatomy, texture, grid).labels, image)
    planning_labels = image_from_array(labels, image)

    setup = _setup_in_image_frame(drawn, placement)
    info: dict[str, object] = {
        **drawn.summary(),
        **stats,
        "phantom_offset_mm": [float(v) for v in placement.offset],
        "placement": placement.method,
        "placement_bone_overlap": placement.bone_overlap,
        "noise_hu": float(noise_hu),
    }
    return KnownDeformation(image, planning_labels, daily, ddf, setup, placement, anatomy, info)
