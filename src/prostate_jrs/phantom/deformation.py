"""Daily deformation with a known ground truth, composed from the components of the phantom recipe.

The recipe: docs/ARCHITECTURE.md, "Phantom recipe". Every component is a *pull-back* map (daily world point ->
the point it came from), written analytically, so the composed map can be evaluated exactly at any point.
Components, applied to a daily point in turn: rigid setup, smooth background B-spline field, rectal distension,
bladder filling, prostate and seminal vesicle motion. Non-rigid parts fade to zero at bone, so bone moves with the
setup only. A map whose Jacobian determinant falls to ``min_jacobian`` or below is damped and recomposed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage

from prostate_jrs.errors import FoldingError

from ..metrics import jacobian_determinant
from .anatomy import Anatomy
from .config import MotionRanges
from .grid import Grid
from .shapes import rotation_matrix

__all__ = [
    "BoneWeight",
    "DailyMotion",
    "FoldingError",
    "compose_ddf",
    "pull_back",
    "sample_motion",
]


@dataclass
class DailyMotion:
    """Drawn parameters of one daily deformation (all mm / degrees, LPS axes)."""

    setup_shift: np.ndarray
    setup_angles: np.ndarray
    prostate_shift: np.ndarray
    prostate_angle: float
    sv_factor: float
    sv_tip_shift: np.ndarray
    bladder_volume_ml: float
    rectum_change: float
    rectum_centre_z: float
    rectum_segment: float
    background: np.ndarray
    background_origin: np.ndarray
    background_spacing: float

    def summary(self) -> dict[str, object]:
        """JSON-friendly parameters (without the background coefficients)."""
        out = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in asdict(self).items()}
        out.pop("background")
        return out


def sample_motion(
    rng: np.random.Generator, anatomy: Anatomy, ranges: MotionRanges, lo: np.ndarray, hi: np.ndarray
) -> DailyMotion:
    """Draw one day's deformation parameters.

    Args:
        rng: random generator.
        anatomy: the planning anatomy (bladder volume, rectum).
        ranges: motion magnitudes.
        lo: world minimum corner the background field must cover.
        hi: world maximum corner.

    Returns:
        The drawn parameters.
    """
    shift = np.clip(rng.normal(0.0, ranges.setup_shift_sd, 3), -ranges.setup_shift_max, ranges.setup_shift_max)
    angles = np.clip(
        rng.normal(0.0, ranges.setup_rotation_sd, 3), -ranges.setup_rotation_max, ranges.setup_rotation_max
    )
    prostate_shift = rng.normal(0.0, np.asarray(ranges.prostate_shift_sd))
    prostate_angle = float(rng.normal(0.0, ranges.prostate_rotation_sd))
    sv_factor = float(rng.uniform(*ranges.sv_factor))
    sv_tip = rng.normal(0.0, ranges.sv_bend_sd, (2, 3))
    volume = anatomy.bladder_volume_ml * float(np.exp(rng.normal(0.0, ranges.bladder_log_sd)))
    volume = float(np.clip(volume, *ranges.bladder_volume_clip))
    # Diameter change of the phantom recipe -> radius change; the sign (distension or emptying) is drawn.
    change = 0.5 * float(rng.uniform(*ranges.rectum_change)) * float(rng.choice([-1.0, 1.0]))
    centre_z = anatomy.prostate.semi[2] + float(rng.uniform(-10.0, 15.0))
    segment = float(rng.uniform(*ranges.rectum_segment))
    spacing = ranges.background_spacing
    origin = np.asarray(lo, dtype=np.float64) - 2 * spacing
    n = np.ceil((np.asarray(hi) - origin) / spacing).astype(int) + 3
    coeffs = rng.normal(0.0, ranges.background_sd, (3, *n))
    coeffs = np.clip(coeffs, -0.4 * spacing, 0.4 * spacing).astype(np.float32)
    return DailyMotion(
        shift, angles, prostate_shift, prostate_angle, sv_factor, sv_tip, volume, change, centre_z, segment,
        coeffs, origin, float(spacing),
    )  # fmt: skip


class BoneWeight:
    """Weight in [0, 1] of non-rigid motion: 0 inside bone, rising smoothly with distance from it.

    The phantom recipe (docs/ARCHITECTURE.md) suggests ``1 - exp(-d / 10 mm)``; its kink at the bone surface
    concentrates strain there, so a Gaussian profile ``1 - exp(-d^2 / (2 s^2))`` of the same reach is used instead.
    The distance comes from an exact Euclidean distance transform of the bone shapes on a coarse planning grid.
    """

    def __init__(self, anatomy: Anatomy, lo: np.ndarray, hi: np.ndarray, scale: float, spacing: float = 4.0) -> None:
        self.origin = np.asarray(lo, dtype=np.float32) - 20.0
        self.spacing = float(spacing)
        shape = tuple(int(np.ceil((h + 20.0 - o) / spacing)) + 1 for o, h in zip(self.origin, hi, strict=True))
        axes = [o + spacing * np.arange(n, dtype=np.float32) for o, n in zip(self.origin, shape, strict=True)]
        inside = np.zeros(shape, dtype=bool)
        for bone in anatomy.bones:
            b_lo, b_hi = bone.bbox()
            sl = []
            for axis in range(3):
                i0 = max(0, int(np.floor((b_lo[axis] - self.origin[axis]) / spacing)))
                i1 = min(shape[axis], int(np.ceil((b_hi[axis] - self.origin[axis]) / spacing)) + 1)
                sl.append(slice(i0, max(i0, i1)))
            if any(s.stop <= s.start for s in sl):
                continue
            points = np.stack(np.meshgrid(*(a[s] for a, s in zip(axes, sl, strict=True)), indexing="ij"))
            inside[tuple(sl)] |= bone.sdf(points) < 0
        distance = ndimage.distance_transform_edt(~inside, sampling=spacing).astype(np.float32)
        self.weight = (1.0 - np.exp(-0.5 * (distance / scale) ** 2)).astype(np.float32)

    def __call__(self, points: np.ndarray) -> np.ndarray:
        """Weight at world points ``(3, N)``."""
        index = (points - self.origin[:, None]) / self.spacing
        return ndimage.map_coordinates(self.weight, index, order=1, mode="nearest", prefilter=False)


def _gauss(d: np.ndarray, sigma: float) -> np.ndarray:
    return np.exp(-0.5 * (np.maximum(d, 0.0) / sigma) ** 2)


def _bspline_basis(x: np.ndarray, origin: float, spacing: float, n: int) -> np.ndarray:
    """Cubic B-spline weights ``(len(x), n)`` of coefficients ``origin + spacing * m`` at coordinates ``x``."""
    t = np.abs((x[:, None] - origin) / spacing - np.arange(n)[None, :])
    return np.where(t < 1, 2 / 3 - t**2 + t**3 / 2, np.where(t < 2, (2 - t) ** 3 / 6, 0.0)).astype(np.float32)


def _background(axes: list[np.ndarray], motion: DailyMotion) -> np.ndarray:
    """The background B-spline displacement ``(3, N)`` on the grid spanned by world ``axes`` (separable)."""
    bases = [
        _bspline_basis(a, motion.background_origin[i], motion.background_spacing, motion.background.shape[i + 1])
        for i, a in enumerate(axes)
    ]
    out = np.einsum("ia,dabc->dibc", bases[0], motion.background, optimize=True)
    out = np.einsum("jb,dibc->dijc", bases[1], out, optimize=True)
    out = np.einsum("kc,dijc->dijk", bases[2], out, optimize=True)
    return out.reshape(3, -1)


def _rectum(p: np.ndarray, anatomy: Anatomy, motion: DailyMotion, ranges: MotionRanges, damping: float) -> np.ndarray:
    sdf, foot, _ = anatomy.rectum.nearest(p)
    radial = p - foot
    rho = np.sqrt((radial * radial).sum(0))
    radius = np.maximum(rho - sdf, 1.0)
    window = np.exp(-0.5 * ((p[2] - motion.rectum_centre_z) / (motion.rectum_segment / 2.5)) ** 2)
    change = damping * motion.rectum_change * window
    change = np.maximum(change, 0.6 * anatomy.params.get("rectum_wall", 3.0) + 2.0 - radius)  # never collapse
    daily_radius = radius + change
    inside = rho <= daily_radius
    source = np.where(
        inside,
        rho * radius / daily_radius,
        rho - change * _gauss(rho - daily_radius, ranges.rectum_falloff),
    )
    return radial * ((source - rho) / np.maximum(rho, 1e-3))


def _bladder(p: np.ndarray, anatomy: Anatomy, motion: DailyMotion, ranges: MotionRanges, damping: float) -> np.ndarray:
    scale = (motion.bladder_volume_ml / anatomy.bladder_volume_ml) ** (damping / 3.0)
    base = anatomy.bladder_base[:, None].astype(np.float32)
    source = base + (p - base) / scale
    outside = scale * anatomy.bladder.sdf(source)
    # Growth from the bladder neck, mostly superior and anterior: points below the neck barely move.
    below = 1.0 / (1.0 + np.exp(-(p[2] - base[2]) / 6.0))
    return (source - p) * (_gauss(outside, ranges.bladder_falloff) * below)


def _rigid_pull(p: np.ndarray, centre: np.ndarray, shift: np.ndarray, angle: float) -> np.ndarray:
    rot = rotation_matrix((angle, 0.0, 0.0)).astype(np.float32)
    c = centre[:, None].astype(np.float32)
    return rot.T @ (p - c - shift[:, None].astype(np.float32)) + c


def _prostate(p: np.ndarray, anatomy: Anatomy, motion: DailyMotion, ranges: MotionRanges, damping: float) -> np.ndarray:
    centre = np.asarray(anatomy.prostate.centre, dtype=np.float32)
    source = _rigid_pull(p, centre, damping * motion.prostate_shift, damping * motion.prostate_angle)
    weight = _gauss(anatomy.prostate.sdf(source), ranges.prostate_falloff)
    out = (source - p) * weight
    k = motion.sv_factor
    sv_source = _rigid_pull(p, centre, damping * k * motion.prostate_shift, damping * k * motion.prostate_angle)
    for tube, tip in zip(anatomy.seminal_vesicles, motion.sv_tip_shift, strict=True):
        sdf, _, t = tube.nearest(sv_source)
        bend = -damping * tip[:, None].astype(np.float32) * t
        w = _gauss(sdf, 0.7 * ranges.prostate_falloff)
        out += w * ((sv_source - source) + bend)
    return out


def _local(
    component: Callable[..., np.ndarray], box: tuple[np.ndarray, np.ndarray], p: np.ndarray, *args: object
) -> np.ndarray:
    """Evaluate a component only at points inside its region of influence (zero elsewhere)."""
    lo, hi = box
    inside = np.all((p >= lo[:, None]) & (p <= hi[:, None]), axis=0)
    out = np.zeros_like(p)
    if inside.any():
        out[:, inside] = component(p[:, inside], *args)
    return out


def _regions(anatomy: Anatomy, motion: DailyMotion, ranges: MotionRanges) -> list[tuple[np.ndarray, np.ndarray]]:
    """World boxes beyond which each component's Gaussian falloff is below 4e-4 of its size."""
    reach = 25.0
    rect_lo, rect_hi = anatomy.rectum.bbox()
    bl_lo, bl_hi = anatomy.bladder.bbox()
    scale = max(1.0, (motion.bladder_volume_ml / anatomy.bladder_volume_ml) ** (1 / 3))
    base = anatomy.bladder_base
    bl_lo, bl_hi = base + (bl_lo - base) * scale, base + (bl_hi - base) * scale
    boxes = [anatomy.prostate.bbox(), *(t.bbox() for t in anatomy.seminal_vesicles)]
    pr_lo = np.min([b[0] for b in boxes], axis=0)
    pr_hi = np.max([b[1] for b in boxes], axis=0)
    # The distension is confined to a Gaussian window in z around its centre.
    half = 4 * motion.rectum_segment / 2.5 + reach
    rect_lo, rect_hi = rect_lo - 4 * ranges.rectum_falloff - reach, rect_hi + 4 * ranges.rectum_falloff + reach
    rect_lo[2], rect_hi[2] = (
        max(rect_lo[2], motion.rectum_centre_z - half),
        min(rect_hi[2], motion.rectum_centre_z + half),
    )
    return [
        (rect_lo, rect_hi),
        (bl_lo - 4 * ranges.bladder_falloff - reach, bl_hi + 4 * ranges.bladder_falloff + reach),
        (pr_lo - 4 * ranges.prostate_falloff - reach, pr_hi + 4 * ranges.prostate_falloff + reach),
    ]


def pull_back(
    axes: list[np.ndarray],
    anatomy: Anatomy,
    motion: DailyMotion,
    ranges: MotionRanges,
    bone: BoneWeight,
    damping: float = 1.0,
) -> np.ndarray:
    """Map the daily world points of a grid to the planning world points they show.

    Args:
        axes: world coordinates (mm) along x, y and z of the daily points (a regular grid of nodes).
        anatomy: planning anatomy.
        motion: drawn parameters.
        ranges: motion settings (falloffs).
        bone: bone rigidity weight.
        damping: factor in (0, 1] on every non-rigid component (1: as drawn).

    Returns:
        Planning world points ``(3, N)`` (``N`` nodes in C order), float32.
    """
    p = np.stack(np.meshgrid(*axes, indexing="ij")).reshape(3, -1).astype(np.float32)
    rot = rotation_matrix(motion.setup_angles).astype(np.float32)
    shift = motion.setup_shift[:, None].astype(np.float32)
    # The background field is random, so it may as well be defined in the daily frame, where the nodes form a
    # grid and the B-spline is separable; its bone weight is taken where the point sits in the patient.
    weight = bone(rot.T @ (p - shift))
    p = rot.T @ (p + weight * damping * _background(axes, motion) - shift)
    for component, box in zip((_rectum, _bladder, _prostate), _regions(anatomy, motion, ranges), strict=True):
        p = p + bone(p) * _local(component, box, p, anatomy, motion, ranges, damping)
    return p.astype(np.float32)


def _det_range(ddf: np.ndarray, slab: int = 16) -> tuple[float, float]:
    """Min and max of :func:`jacobian_determinant` computed in z-slabs (a one-slice halo keeps it exact)."""
    n = ddf.shape[3]
    low, high = np.inf, -np.inf
    for k0 in range(0, n, slab):
        a, b = max(0, k0 - 1), min(n, k0 + slab + 1)
        det = jacobian_determinant(ddf[..., a:b])[..., k0 - a : k0 - a + min(slab, n - k0)]
        low, high = min(low, float(det.min())), max(high, float(det.max()))
    return low, high


def _upsample(coarse: np.ndarray, factors: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """Separable linear interpolation of ``coarse`` (nodes every ``factors`` voxels) onto ``shape``."""
    out = coarse
    for axis in (2, 1, 0):
        position = np.arange(shape[axis], dtype=np.float32) / factors[axis]
        i0 = np.clip(np.floor(position).astype(int), 0, out.shape[axis] - 2) if out.shape[axis] > 1 else None
        if i0 is None:
            out = np.repeat(out, shape[axis], axis=axis)
            continue
        frac = (position - i0).reshape([-1 if a == axis else 1 for a in range(3)])
        out = np.take(out, i0, axis=axis) * (1.0 - frac) + np.take(out, i0 + 1, axis=axis) * frac
    return out.astype(np.float32)


def compose_ddf(
    grid: Grid,
    anatomy: Anatomy,
    motion: DailyMotion,
    ranges: MotionRanges,
    bone: BoneWeight,
    field_spacing: float,
    max_tries: int = 6,
) -> tuple[np.ndarray, dict[str, float]]:
    """Ground-truth DDF of one daily scan on ``grid`` (geometry.py convention), folding-free.

    The pull-back map is evaluated on nodes every ``field_spacing`` mm and linearly interpolated to the voxels
    (the map is smooth at that scale); the images are then rendered through this very field, so it is exact
    ground truth for them. If the minimum Jacobian determinant is ``<= ranges.min_jacobian`` the non-rigid
    part is damped by 0.75 and recomposed.

    Returns:
        ``ddf`` ``(3, I, J, K)`` float32 in daily voxel units, and statistics (damping, min/max det J, max |u| mm).

    Raises:
        FoldingError: if ``max_tries`` dampings do not remove the folding.
    """
    shape = grid.shape
    spacing = np.asarray(grid.spacing, dtype=np.float32)
    factors = np.maximum(1, np.round(field_spacing / spacing)).astype(int)
    nodes = [np.arange(0, n - 1 + f, f, dtype=np.float32) if n > 1 else np.zeros(1, np.float32) for n, f in
             zip(shape, factors, strict=True)]  # fmt: skip
    axes = [grid.origin[a] + grid.spacing[a] * nodes[a] for a in range(3)]
    world = np.stack(np.meshgrid(*axes, indexing="ij")).reshape(3, -1)
    damping = 1.0
    coarse_shape = tuple(len(n) for n in nodes)
    for _ in range(max_tries):
        source = pull_back(axes, anatomy, motion, ranges, bone, damping)
        coarse = ((source - world) / spacing[:, None]).reshape(3, *coarse_shape)
        # Cheap screen on the nodes (in node units), then the exact check on the voxel field that is returned.
        low, _ = _det_range(coarse / factors.reshape(3, 1, 1, 1))
        if low > ranges.min_jacobian:
            ddf = np.empty((3, *shape), dtype=np.float32)
            for c in range(3):
                # Quantised to 1/1024 voxel (< 0.003 mm): the file compresses twice as well, and the images are
                # rendered through this very array, so it stays exact ground truth.
                ddf[c] = np.round(_upsample(coarse[c], factors, shape) * 1024.0) / 1024.0
            low, high = _det_range(ddf)
            stats = {"damping": damping, "min_det_j": low, "max_det_j": high}
            if low > ranges.min_jacobian:
                norm = np.sqrt(((coarse * spacing.reshape(3, 1, 1, 1)) ** 2).sum(0))
                stats["max_displacement_mm"] = float(norm.max())
                return ddf, stats
        damping *= 0.75
    raise FoldingError(
        f"deformation still folds (min det J {low:.3f} <= {ranges.min_jacobian}) after {max_tries} "
        "dampings; reduce the motion ranges"
    )
