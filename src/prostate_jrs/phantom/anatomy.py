"""A patient's pelvis: analytic shapes with HU and texture, drawn from population ranges, and their rendering.

World coordinates are patient LPS millimetres with the prostate centre at the origin (+x left, +y posterior,
+z superior). Layers are painted in order, each over the previous ones with partial-volume occupancy, so the
order encodes anatomy: fat, then muscle, then bone, then the four delineated organs, which touch each other
and the pelvic-floor muscle with HU differences under 15.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from prostate_jrs.geometry import identity_grid
from prostate_jrs.hounsfield import AIR_HU
from prostate_jrs.labels import structure_by_name

from .config import AnatomyRanges
from .grid import Grid
from .shapes import Ellipsoid, EllipticCylinder, Shape, Tube, occupancy

__all__ = ["Anatomy", "Layer", "RenderResult", "TextureField", "bladder_semi_axes", "render", "sample_anatomy"]

PROSTATE = structure_by_name("prostate").label
SEMINAL_VESICLES = structure_by_name("seminal_vesicles").label
RECTUM = structure_by_name("rectum").label
BLADDER = structure_by_name("bladder").label

URINE_HU = 10.0
# Prostate, rectal and bladder walls (the phantom recipe: 40); muscle comes from the site profile (35 by default).
ORGAN_HU = 40.0
SOFT_TISSUE_TEXTURE = 5.0
# Chunk of slices rendered at once: bounds memory for clinical grids (512 x 512 x 16 points at a time).
_CHUNK_VOXELS = 4_000_000
_Box = tuple[slice, slice, slice]  # index box of a grid (Grid.index_box)


@dataclass
class Layer:
    """One painted tissue.

    Args:
        name: tissue name (for debugging and metadata).
        shape: where it is.
        hu: mean HU.
        texture: SD (HU) of the smooth mottle added inside it; moves with the anatomy.
        label: label-map value painted where the shape's SDF < 0 (0: not a delineated structure).
        clip: optional shape to intersect with (muscle stays under the subcutaneous fat).
        channel: texture channel, 0 tissue grain, 1 coarse faecal mottle.
        lumen: marks the rectal lumen, where gas may be painted later.
    """

    name: str
    shape: Shape
    hu: float
    texture: float = 0.0
    label: int = 0
    clip: Shape | None = None
    channel: int = 0
    lumen: bool = False


@dataclass
class Anatomy:
    """A patient's planning anatomy: painted layers and the organ shapes the deformation model needs."""

    layers: list[Layer]
    prostate: Ellipsoid
    seminal_vesicles: tuple[Tube, Tube]
    bladder: Ellipsoid
    bladder_base: np.ndarray
    bladder_volume_ml: float
    rectum: Tube
    bones: list[Shape]
    params: dict[str, float] = field(default_factory=dict)


def _u(rng: np.random.Generator, bounds: tuple[float, float]) -> float:
    return float(rng.uniform(bounds[0], bounds[1]))


def bladder_semi_axes(volume_ml: float) -> np.ndarray:
    """Semi-axes (LR, AP, SI) of a 1.3 : 1 : 1 ellipsoid of ``volume_ml`` (V = 4/3 pi a b c)."""
    b = (volume_ml * 1000.0 / (4.0 / 3.0 * np.pi * 1.3)) ** (1.0 / 3.0)
    return np.array([1.3 * b, b, b])


def _tube(points: Sequence[Sequence[float]], radii: Sequence[float], squash: Sequence[float] = (1.0, 1.0, 1.0)) -> Tube:
    """A :class:`Tube` from plain lists of vertices and radii, as the float32 arrays it makes of them itself."""
    return Tube(np.asarray(points, dtype=np.float32), np.asarray(radii, dtype=np.float32), squash=squash)


def _bone(
    layers: list[Layer], bones: list[Shape], name: str, shape: Shape, cortex: float, hu_cortex: float, hu_inner: float
) -> None:
    """Add a bone as cortical shell plus cancellous core."""
    layers.append(Layer(f"{name}_cortex", shape, hu_cortex, texture=30.0))
    layers.append(Layer(f"{name}_core", shape.shrunk(cortex), hu_inner, texture=35.0))
    bones.append(shape)


@dataclass(frozen=True)
class _Body:
    """The body outline: its centre, semi-axes and fat rim, and the muscle space inside the rim."""

    y: float
    semi_lr: float
    semi_ap: float
    rim: float
    inner: EllipticCylinder

    @property
    def front(self) -> float:
        """Anterior skin surface (y, mm)."""
        return self.y - self.semi_ap

    @property
    def back(self) -> float:
        """Posterior skin surface (y, mm)."""
        return self.y + self.semi_ap


def sample_anatomy(rng: np.random.Generator, ranges: AnatomyRanges, muscle_hu: float = 35.0) -> Anatomy:
    """Draw one patient's anatomy.

    The steps below draw from ``rng`` in a fixed order; a change of that order changes every phantom of a seed.

    Args:
        rng: random generator (the only source of randomness).
        ranges: population ranges.
        muscle_hu: mean HU of muscle (site profile).

    Returns:
        The anatomy with its layers in painting order.
    """
    p = _draw_sizes(rng, ranges)
    layers: list[Layer] = []
    bones: list[Shape] = []
    body = _add_body(rng, layers, p)
    hx = rng.uniform(85, 95)  # femoral head centre |x|, used by the bones but drawn here, in its place in the order
    _add_muscles(rng, layers, p, body, muscle_hu)
    _add_bowel(rng, layers, body)
    prostate_angles = _add_pelvic_floor(rng, layers, p, muscle_hu)
    hu_cortex, hu_core, sacrum_y = _add_bones(rng, layers, bones, p, hx, body.back)
    bladder, base = _add_bladder(layers, p)
    rectum, content = _add_rectum(rng, layers, p, sacrum_y)
    # Prostate: ellipsoid at the origin, slightly tilted.
    prostate = Ellipsoid(
        (0.0, 0.0, 0.0), (p["prostate_semi_lr"], p["prostate_semi_ap"], p["prostate_semi_si"]), prostate_angles
    )
    layers.append(Layer("prostate", prostate, ORGAN_HU, texture=SOFT_TISSUE_TEXTURE, label=PROSTATE))
    svs = _add_seminal_vesicles(rng, layers, p)
    p.update({"hu_cortex": hu_cortex, "hu_core": hu_core, "rectal_content_hu": content, "body_centre_y": body.y})
    return Anatomy(
        layers=layers,
        prostate=prostate,
        seminal_vesicles=svs,
        bladder=bladder,
        bladder_base=base,
        bladder_volume_ml=p["bladder_volume_ml"],
        rectum=rectum,
        bones=bones,
        params={k: float(v) for k, v in p.items()},
    )


def _draw_sizes(rng: np.random.Generator, ranges: AnatomyRanges) -> dict[str, float]:
    """The patient's body and organ sizes, drawn uniformly from the population ranges."""
    p: dict[str, float] = {}
    for name in (
        "body_semi_lr",
        "body_semi_ap",
        "fat_rim",
        "prostate_semi_lr",
        "prostate_semi_ap",
        "prostate_semi_si",
        "sv_length",
        "sv_width",
        "sv_ap",
        "bladder_volume_ml",
        "bladder_wall",
        "rectum_radius",
        "rectum_wall",
        "femoral_head_radius",
    ):
        p[name] = _u(rng, getattr(ranges, name))
    p["sv_angle_left"] = _u(rng, ranges.sv_angle)
    p["sv_angle_right"] = _u(rng, ranges.sv_angle)
    return p


def _add_body(rng: np.random.Generator, layers: list[Layer], p: dict[str, float]) -> _Body:
    """Body outline and subcutaneous fat: a mildly tapering elliptic cylinder centred behind the prostate."""
    body_y = 15.0 + rng.uniform(-4, 4)
    a_body, b_body, rim = p["body_semi_lr"], p["body_semi_ap"], p["fat_rim"]
    outline = EllipticCylinder((0.0, body_y), (a_body, b_body), taper=-0.04, z_ref=0.0)
    layers.append(Layer("fat", outline, -100.0, texture=6.0))
    inner = EllipticCylinder((0.0, body_y), (a_body - rim, b_body - rim * 0.8), taper=-0.04, z_ref=0.0)
    return _Body(body_y, a_body, b_body, rim, inner)


def _add_muscles(rng: np.random.Generator, layers: list[Layer], p: dict[str, float], body: _Body, mu: float) -> None:
    """Muscle under the fat rim (gluteal, hip and thigh muscles), the fat spaces carved out of it (the true pelvis
    around the organs, the ischiorectal fossae, the abdominal cavity above the pelvis) and the named muscles."""
    body_y, a_body, b_body, rim, inner = body.y, body.semi_lr, body.semi_ap, body.rim, body.inner
    front, back = body.front, body.back
    layers.append(Layer("muscle", inner, mu, texture=8.0))
    cavity = rng.uniform(0.9, 1.1)
    fat_spaces = [
        ("abdominal_fat", (0, body_y - 8, 185), (a_body - rim - 30, b_body - rim - 12, 115), (0, 0, 0)),
        ("pelvic_fat", (0, 22, 30), (56 * cavity, 58, 80), (-10, 0, 0)),
        ("ischiorectal_fat", (30, 42, -40), (22, 34, 30), (0, 0, -20)),
        ("gluteal_plane", (92, back - 45, -5), (60, 5, 70), (0, 0, -35)),
    ]
    for name, c, s, ang in fat_spaces:
        for side in (1, -1) if c[0] else (1,):
            centre = (side * c[0], c[1], c[2])
            layers.append(Layer(name, Ellipsoid(centre, s, (ang[0], ang[1], side * ang[2])), -100.0, 6.0, clip=inner))
    muscles = [
        ("iliopsoas", (62, -18, 75), (24, 26, 90), (0, -10, 0)),
        ("psoas", (42, body_y + 40, 170), (20, 22, 70), (0, 0, 0)),
        ("obturator_internus", (54, 18, 5), (11, 36, 32), (0, 0, 0)),
        ("rectus_abdominis", (42, front + rim + 6, 130), (34, 8, 120), (0, 0, 0)),
    ]
    for name, c, s, ang in muscles:
        for side in (1, -1):
            centre = (side * c[0], c[1], c[2])
            angles = (ang[0], side * ang[1], side * ang[2])
            layers.append(Layer(name, Ellipsoid(centre, s, angles), mu, texture=8.0, clip=inner))


def _add_bowel(rng: np.random.Generator, layers: list[Layer], body: _Body) -> None:
    """Small bowel and sigmoid loops filling the abdominal cavity above the bladder: curved tubes with a wall and
    mottled content, some gas-filled (this gas belongs to the anatomy and moves with it)."""
    body_y, inner = body.y, body.inner
    cavity_semi = np.array([body.semi_lr - body.rim - 45.0, body.semi_ap - body.rim - 30.0])
    for _ in range(int(rng.integers(10, 16))):
        point = np.array(
            [rng.uniform(-1, 1) * cavity_semi[0] * 0.8, body_y - 10 + rng.uniform(-0.8, 0.5) * cavity_semi[1],
             rng.uniform(75.0, 170.0)]
        )  # fmt: skip
        heading = rng.normal(size=3)
        points = [point]
        for _ in range(5):
            heading = heading / np.linalg.norm(heading) + 0.8 * rng.normal(size=3)
            point = point + 22.0 * heading / np.linalg.norm(heading)
            point[0] = np.clip(point[0], -cavity_semi[0], cavity_semi[0])
            point[1] = np.clip(point[1], body_y - cavity_semi[1], body_y + 0.6 * cavity_semi[1])
            points.append(point)
        radius = rng.uniform(9.0, 14.0)
        loop = Tube(np.array(points), np.full(len(points), radius))
        inside = "gas" if rng.random() < 0.3 else "content"
        layers.append(Layer("bowel_wall", loop, ORGAN_HU, texture=SOFT_TISSUE_TEXTURE, clip=inner))
        hu_in = -900.0 if inside == "gas" else float(rng.uniform(-40.0, 30.0))
        layers.append(Layer(f"bowel_{inside}", loop.shrunk(2.5), hu_in, texture=35.0, channel=1, clip=inner))


def _add_pelvic_floor(
    rng: np.random.Generator, layers: list[Layer], p: dict[str, float], mu: float
) -> tuple[float, float, float]:
    """Pelvic floor (levator ani), on which the prostate apex and the anorectum rest, and the penile bulb below it.

    Returns:
        The prostate's rotation angles (degrees), drawn here because the muscle hugs the tilted gland.
    """
    a_p, b_p, c_p = p["prostate_semi_lr"], p["prostate_semi_ap"], p["prostate_semi_si"]
    layers.append(Layer("levator_ani", Ellipsoid((0, 18, -c_p - 10), (40, 38, 12)), mu + 2, texture=6.0))
    # Its lateral parts hug the lower prostate (a 7 mm shell around the gland, kept to its lower sides), so
    # the gland's sides meet muscle, not fat, there.
    prostate_angles = (float(rng.uniform(-8, 8)), 0.0, 0.0)
    shell = Ellipsoid((0.0, 0.0, 0.0), (a_p + 7.0, b_p + 7.0, c_p + 7.0), prostate_angles)
    for side in (1, -1):
        region = Ellipsoid((side * (a_p + 18.0), 0.0, -0.6 * c_p), (30.0, 2.0 * b_p, c_p))
        layers.append(Layer("levator_ani", shell, mu + 2, texture=6.0, clip=region))
    layers.append(Layer("penile_bulb", Ellipsoid((0, -38, -c_p - 30), (12, 12, 16)), mu + 5, texture=5.0))
    return prostate_angles


def _add_bones(
    rng: np.random.Generator, layers: list[Layer], bones: list[Shape], p: dict[str, float], hx: float, back: float
) -> tuple[float, float, float]:
    """Bones: cortical shell + cancellous core; femoral heads in their acetabula, pubis, ischium, ilium, sacrum.

    Returns:
        Cortical and cancellous HU, and the sacrum's anterior-posterior position (the rectum follows it).
    """
    hu_cortex = rng.uniform(800, 1100)
    hu_core = rng.uniform(200, 320)
    r_head = p["femoral_head_radius"]
    head_y, head_z = rng.uniform(0, 10), rng.uniform(15, 25)
    pubis_y = rng.uniform(-58, -50)
    for side in (1, -1):
        sx = side
        _bone(
            layers, bones, "ilium",
            Ellipsoid((sx * (hx - 2), 38, head_z + 80), (7, 68, 62), (0, sx * -12, sx * 37)),
            2.0, hu_cortex, hu_core,
        )  # fmt: skip
        _bone(
            layers, bones, "acetabulum",
            Ellipsoid((sx * (hx - 8), head_y + 8, head_z + 4), (r_head + 9, r_head + 13, r_head + 14)),
            2.5, hu_cortex, hu_core,
        )  # fmt: skip
        _bone(
            layers, bones, "ischium",
            _tube([(sx * (hx - 12), head_y + 22, head_z - 5), (sx * 52, 42, -45)], [14, 12], squash=(1.3, 1.0, 1.0)),
            2.5, hu_cortex, hu_core,
        )  # fmt: skip
        _bone(
            layers, bones, "superior_ramus",
            _tube([(sx * 12, pubis_y + 4, 22), (sx * (hx - 20), head_y - 12, head_z + 10)], [9, 11]),
            2.0, hu_cortex, hu_core,
        )  # fmt: skip
        _bone(
            layers, bones, "inferior_ramus",
            _tube([(sx * 10, pubis_y, 2), (sx * 50, 40, -42)], [8, 9]),
            2.0, hu_cortex, hu_core,
        )  # fmt: skip
        _bone(
            layers, bones, "symphysis",
            Ellipsoid((sx * 9, pubis_y, 14), (8, 10, 22)),
            2.0, hu_cortex, hu_core,
        )  # fmt: skip
        layers.append(Layer("hip_joint", Ellipsoid((sx * hx, head_y, head_z), (r_head + 1.5,) * 3), 35.0, 4.0))
        _bone(
            layers, bones, "femoral_neck",
            _tube([(sx * hx, head_y, head_z), (sx * (hx + 38), head_y + 8, head_z - 28)], [15, 16]),
            3.0, hu_cortex + 100, hu_core,
        )  # fmt: skip
        _bone(
            layers, bones, "femoral_head",
            Ellipsoid((sx * hx, head_y, head_z), (r_head,) * 3),
            2.5, hu_cortex + 100, hu_core + 30,
        )  # fmt: skip
        _bone(
            layers, bones, "trochanter",
            Ellipsoid((sx * (hx + 45), head_y + 12, head_z - 30), (17, 22, 26)),
            2.5, hu_cortex, hu_core,
        )  # fmt: skip
        _bone(
            layers, bones, "femoral_shaft",
            _tube([(sx * (hx + 40), head_y + 10, head_z - 40), (sx * (hx + 22), head_y, -260)], [14, 13]),
            5.0, hu_cortex + 200, 120.0,
        )  # fmt: skip
    sacrum_y = back - rng.uniform(30, 40)
    _bone(
        layers, bones, "sacrum",
        _tube(
            [(0, sacrum_y - 12, 170), (0, sacrum_y - 4, 120), (0, sacrum_y, 70), (0, sacrum_y - 6, 25)],
            [52, 48, 38, 24],
            squash=(1.0, 3.6, 1.0),
        ),
        3.0, hu_cortex, hu_core + 80,
    )  # fmt: skip
    _bone(
        layers, bones, "coccyx",
        _tube(
            [(0, sacrum_y - 6, 25), (0, sacrum_y - 16, -10), (0, sacrum_y - 30, -30)], [14, 9, 6], squash=(1, 1.6, 1)
        ),
        2.0, hu_cortex, hu_core + 80,
    )  # fmt: skip
    return hu_cortex, hu_core, sacrum_y


def _add_bladder(layers: list[Layer], p: dict[str, float]) -> tuple[Ellipsoid, np.ndarray]:
    """Bladder: 1.3 : 1 : 1 ellipsoid of the drawn volume, its base on the prostate; also that base point."""
    semi = bladder_semi_axes(p["bladder_volume_ml"])
    base = np.array([0.0, -4.0, p["prostate_semi_si"] - 3.0])
    bladder = Ellipsoid(base + np.array([0.0, -0.15 * semi[1], 0.92 * semi[2]]), semi)
    layers.append(Layer("bladder_wall", bladder, ORGAN_HU, texture=SOFT_TISSUE_TEXTURE, label=BLADDER))
    layers.append(Layer("urine", bladder.shrunk(p["bladder_wall"]), URINE_HU, texture=2.0))
    return bladder, base


def _add_rectum(
    rng: np.random.Generator, layers: list[Layer], p: dict[str, float], sacrum_y: float
) -> tuple[Tube, float]:
    """Rectum: wall plus mottled faecal content; its anterior wall presses on the prostate. Also the content's HU."""
    b_p, c_p = p["prostate_semi_ap"], p["prostate_semi_si"]
    r = p["rectum_radius"]
    y_touch = b_p + r - 2.0
    rectum = _tube(
        [
            (0, 30, -c_p - 40),
            (0, y_touch - 4, -c_p + 2),
            (0, y_touch, 0),
            (0, y_touch + 6, c_p + 6),
            (0, sacrum_y - 30, 55),
            (4, sacrum_y - 26, 80),
            (14, sacrum_y - 34, 102),
            (30, sacrum_y - 55, 118),
        ],
        [7, 0.85 * r, r, r, 1.05 * r, r, 0.9 * r, 0.8 * r],
        squash=(0.85, 1.0, 1.0),
    )
    layers.append(Layer("rectal_wall", rectum, ORGAN_HU, texture=SOFT_TISSUE_TEXTURE, label=RECTUM))
    content = rng.uniform(-60.0, 10.0)
    layers.append(Layer("rectal_content", rectum.shrunk(p["rectum_wall"]), content, 40.0, channel=1, lumen=True))
    return rectum, content


def _add_seminal_vesicles(rng: np.random.Generator, layers: list[Layer], p: dict[str, float]) -> tuple[Tube, Tube]:
    """Seminal vesicles: thin bent tubes from the posterior-superior base, laterally and upward, between bladder
    and rectum."""
    b_p, c_p = p["prostate_semi_ap"], p["prostate_semi_si"]
    svs = []
    width, ap, length = p["sv_width"], p["sv_ap"], p["sv_length"]
    for side, angle in ((1, p["sv_angle_left"]), (-1, p["sv_angle_right"])):
        bend = rng.uniform(20.0, 40.0)
        heading = np.deg2rad(angle)
        point = np.array([side * 6.0, 0.75 * b_p, c_p - 4.0])
        points = [point.copy()]
        n = 5
        for i in range(n):
            h = heading + np.deg2rad(bend) * (i / (n - 1))
            step = np.array([side * np.sin(h), 0.28, np.cos(h)])
            point = point + step / np.linalg.norm(step) * length / n
            points.append(point.copy())
        radii = np.array([0.35, 0.45, 0.5, 0.5, 0.48, 0.4]) * width
        tube = Tube(np.array(points), radii, squash=(1.0, width / ap, 1.0))
        svs.append(tube)
        layers.append(Layer("seminal_vesicle", tube, ORGAN_HU - 5, texture=SOFT_TISSUE_TEXTURE, label=SEMINAL_VESICLES))
    return svs[0], svs[1]


@dataclass
class TextureField:
    """Smooth random fields fixed to the planning anatomy (they move with it), unit SD.

    Channel 0 is a fine tissue grain, channel 1 a coarser mottle for faecal content.
    """

    data: np.ndarray
    origin: np.ndarray
    spacing: float

    @classmethod
    def random(cls, rng: np.random.Generator, lo: np.ndarray, hi: np.ndarray, spacing: float = 3.0) -> TextureField:
        """Draw both channels on a ``spacing`` mm grid covering the world box ``[lo, hi]``."""
        shape = tuple(int(np.ceil((h - lo_) / spacing)) + 2 for lo_, h in zip(lo, hi, strict=True))
        data = np.empty((2, *shape), dtype=np.float32)
        for channel, sigma in enumerate((0.8, 1.6)):
            noise = ndimage.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), sigma, mode="wrap")
            data[channel] = noise / max(float(noise.std()), 1e-6)
        return cls(data, np.asarray(lo, dtype=np.float32), float(spacing))

    def sample(self, points: np.ndarray, channel: int) -> np.ndarray:
        """Linear interpolation of one channel at world points ``(3, ...)``."""
        index = (points - self.origin.reshape((3,) + (1,) * (points.ndim - 1))) / self.spacing
        return ndimage.map_coordinates(self.data[channel], index, order=1, mode="nearest", prefilter=False)


@dataclass
class RenderResult:
    """Noise-free scene on a grid: HU before imaging, label map, rectal-lumen occupancy."""

    hu: np.ndarray
    labels: np.ndarray
    lumen: np.ndarray


def render(
    anatomy: Anatomy,
    texture: TextureField,
    grid: Grid,
    ddf: np.ndarray | None = None,
    margin: float = 0.0,
) -> RenderResult:
    """Paint the anatomy on ``grid`` at the world points ``A (x + ddf(x))`` (planning scan: ``ddf=None``).

    Args:
        anatomy: planning anatomy.
        texture: the patient's texture field.
        grid: output grid.
        ddf: ``(3, I, J, K)`` displacement in voxel units of ``grid`` (geometry.py convention), or ``None``.
        margin: upper bound (mm) of ``|ddf|`` in world units, to find which voxels can see a shape.

    Returns:
        HU (float32), labels (uint8) and lumen occupancy (float32), each ``(I, J, K)``.

    Raises:
        ValueError: if ``ddf`` does not match ``grid``.
    """
    shape = grid.shape
    if ddf is not None and ddf.shape != (3, *shape):
        raise ValueError(f"ddf of shape {ddf.shape} does not match grid (3, {shape})")
    hu = np.full(shape, AIR_HU, dtype=np.float32)
    labels = np.zeros(shape, dtype=np.uint8)
    lumen = np.zeros(shape, dtype=np.float32)
    width = float(min(grid.spacing))
    boxes = _layer_boxes(anatomy, grid, margin + width)
    step = max(1, _CHUNK_VOXELS // (shape[0] * shape[1]))
    for k0 in range(0, shape[2], step):
        k1 = min(shape[2], k0 + step)
        slab = RenderResult(hu[:, :, k0:k1], labels[:, :, k0:k1], lumen[:, :, k0:k1])
        _paint_slab(anatomy, texture, boxes, _world_points(grid, ddf, k0, k1), width, k0, slab)
    return RenderResult(hu, labels, lumen)


def _layer_boxes(anatomy: Anatomy, grid: Grid, reach: float) -> list[_Box | None]:
    """Index box of ``grid`` in which each layer (within its clip) can be seen, ``reach`` mm beyond its bounds."""
    boxes = []
    for layer in anatomy.layers:
        lo, hi = layer.shape.bbox()
        if layer.clip is not None:
            clo, chi = layer.clip.bbox()
            lo, hi = np.maximum(lo, clo), np.minimum(hi, chi)
        boxes.append(grid.index_box(lo - reach, hi + reach))
    return boxes


def _world_points(grid: Grid, ddf: np.ndarray | None, k0: int, k1: int) -> np.ndarray:
    """World points ``A (x + ddf(x))`` of the voxels of slices ``k0:k1``, float32 ``(3, I, J, k1 - k0)``."""
    shape = grid.shape
    index = identity_grid((shape[0], shape[1], k1 - k0))
    index[2] += k0
    if ddf is not None:
        index += ddf[:, :, :, k0:k1]
    spacing = np.asarray(grid.spacing, dtype=np.float32).reshape(3, 1, 1, 1)
    origin = np.asarray(grid.origin, dtype=np.float32).reshape(3, 1, 1, 1)
    return index * spacing + origin


def _paint_slab(
    anatomy: Anatomy,
    texture: TextureField,
    boxes: list[_Box | None],
    points: np.ndarray,
    width: float,
    k0: int,
    slab: RenderResult,
) -> None:
    """Paint every layer, in order, into ``slab`` (views of slices ``k0:`` of the output) at world ``points``."""
    k1 = k0 + points.shape[3]
    # Texture is only needed inside the body (the first layer); the air around it is most of the grid.
    body = boxes[0] or tuple(slice(0, n) for n in slab.hu.shape)
    grain_box = (body[0], body[1], slice(None))
    grain = np.zeros(points.shape[1:], dtype=np.float32)
    grain[grain_box] = texture.sample(points[(slice(None), *grain_box)], 0)
    cache: dict[int, tuple[tuple[slice, ...], np.ndarray]] = {}
    for layer, box in zip(anatomy.layers, boxes, strict=True):
        if box is None or box[2].stop <= k0 or box[2].start >= k1:
            continue
        sl = (box[0], box[1], slice(max(box[2].start, k0) - k0, min(box[2].stop, k1) - k0))
        p = points[(slice(None), *sl)]
        # A wall and its lumen share the raw SDF; compute it once per box.
        key = layer.shape.geometry_key
        hit = cache.get(key)
        if hit is None or hit[0] != sl:
            hit = (sl, layer.shape.raw_sdf(p))
            cache[key] = hit
        sdf = hit[1] - layer.shape.grow
        if layer.clip is not None:
            sdf = np.maximum(sdf, layer.clip.sdf(p))
        occ = occupancy(sdf, width)
        if not occ.any():
            continue
        value = layer.hu + layer.texture * (grain[sl] if layer.channel == 0 else texture.sample(p, layer.channel))
        target = slab.hu[sl]
        target += occ * (value - target)
        if layer.label:
            slab.labels[sl][sdf < 0] = layer.label
        if layer.lumen:
            slab.lumen[sl] = np.maximum(slab.lumen[sl], occ)
