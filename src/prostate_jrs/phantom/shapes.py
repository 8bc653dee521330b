"""Analytic shapes as approximate signed distance functions (SDF, mm; negative inside).

A shape is evaluated at arbitrary world points, so the same description renders the planning scan (points on
its grid) and a daily scan (grid points pulled back through the deformation). Partial volume comes from a
linear ramp of the SDF across one voxel instead of supersampling.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

__all__ = [
    "Ellipsoid",
    "EllipticCylinder",
    "Shape",
    "Tube",
    "occupancy",
    "rotation_matrix",
]


def rotation_matrix(angles_deg: Sequence[float] | np.ndarray) -> np.ndarray:
    """Rotation about x, then y, then z (degrees), as a 3x3 matrix ``R = Rz @ Ry @ Rx``."""
    ax, ay, az = np.deg2rad(np.asarray(angles_deg, dtype=np.float64))
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def occupancy(sdf: np.ndarray, width: float) -> np.ndarray:
    """Fraction of a voxel inside the shape: a linear ramp of the SDF over ``width`` mm centred on the surface."""
    return np.clip(0.5 - sdf / width, 0.0, 1.0)


def _ellipse_distance(k0: np.ndarray, k1: np.ndarray, r_min: float | np.ndarray) -> np.ndarray:
    """Approximate signed distance to an ellipse/ellipsoid from ``k0 = |q / r|`` and ``k1 = |q / r^2|``.

    Quilez's first-order estimate ``k0 (k0 - 1) / k1`` is exact on the surface and good near it, but tends to 0
    at the centre; inside, ``(k0 - 1) r_min`` bounds the depth and takes over there.
    """
    estimate = k0 * (k0 - 1.0) / np.maximum(k1, 1e-6)
    return np.where(k0 < 1.0, np.minimum(estimate, (k0 - 1.0) * r_min), estimate)


@dataclass
class Shape:
    """Base class: an SDF plus a world bounding box used to skip voxels far from the shape.

    Args:
        grow: mm added to the SDF's zero level (negative shrinks, positive grows), e.g. to get a wall's lumen.
    """

    grow: float = field(default=0.0, kw_only=True)

    def sdf(self, p: np.ndarray) -> np.ndarray:
        """Signed distance (mm) at points ``p`` of shape ``(3, ...)`` (world LPS mm)."""
        return self._sdf(p) - self.grow

    def _sdf(self, p: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def bbox(self) -> tuple[np.ndarray, np.ndarray]:
        """World (min, max) corners of a box that holds the shape."""
        raise NotImplementedError

    def shrunk(self, mm: float) -> Shape:
        """Copy whose surface lies ``mm`` inside this one (walls: the lumen)."""
        copy = self.__class__.__new__(self.__class__)
        copy.__dict__.update(self.__dict__)
        copy.grow = self.grow - mm
        copy.geometry_key = self.geometry_key
        return copy

    @property
    def geometry_key(self) -> int:
        """Identifies the underlying geometry: a shape and its shrunk copies share it (and their raw SDF)."""
        return self.__dict__.get("_geometry_key", id(self))

    @geometry_key.setter
    def geometry_key(self, value: int) -> None:
        self.__dict__["_geometry_key"] = value

    def raw_sdf(self, p: np.ndarray) -> np.ndarray:
        """SDF without ``grow`` (shared by a shape and its shrunk copies)."""
        return self._sdf(p)


@dataclass
class Ellipsoid(Shape):
    """Ellipsoid with centre, semi-axes and rotation (degrees about x, y, z)."""

    centre: Sequence[float] | np.ndarray
    semi: Sequence[float] | np.ndarray
    angles: Sequence[float] = (0.0, 0.0, 0.0)

    def __post_init__(self) -> None:
        self._c = np.asarray(self.centre, dtype=np.float32).reshape(3, 1)
        self._r = np.asarray(self.semi, dtype=np.float32)
        if np.any(self._r <= 0):
            raise ValueError(f"ellipsoid semi-axes must be positive, got {self.semi}")
        self._rt = rotation_matrix(self.angles).T.astype(np.float32)

    def _sdf(self, p: np.ndarray) -> np.ndarray:
        shape = p.shape[1:]
        q = self._rt @ (p.reshape(3, -1) - self._c)
        q /= self._r[:, None]
        k0 = np.sqrt(np.einsum("ij,ij->j", q, q))
        q /= self._r[:, None]
        k1 = np.sqrt(np.einsum("ij,ij->j", q, q))
        return _ellipse_distance(k0, k1, float(self._r.min())).reshape(shape)

    def bbox(self) -> tuple[np.ndarray, np.ndarray]:
        # Half-extent of a rotated ellipsoid along each world axis.
        rot = rotation_matrix(self.angles)
        half = np.sqrt((rot**2) @ (np.asarray(self.semi, dtype=np.float64) ** 2)) + max(0.0, self.grow)
        centre = np.asarray(self.centre, dtype=np.float64)
        return centre - half, centre + half


@dataclass
class EllipticCylinder(Shape):
    """Cylinder along z with an elliptic cross-section whose semi-axes taper linearly with z.

    Args:
        centre: (x, y) of the axis.
        semi: (x, y) semi-axes at ``z = z_ref``.
        taper: relative change of the semi-axes per 100 mm of z.
        z_range: (min, max) z extent.
    """

    centre: Sequence[float]
    semi: Sequence[float]
    taper: float = 0.0
    z_ref: float = 0.0
    z_range: Sequence[float] = (-1e4, 1e4)

    def _sdf(self, p: np.ndarray) -> np.ndarray:
        scale = 1.0 + self.taper * (p[2] - self.z_ref) / 100.0
        ax = self.semi[0] * scale
        ay = self.semi[1] * scale
        qx = (p[0] - self.centre[0]) / ax
        qy = (p[1] - self.centre[1]) / ay
        k0 = np.sqrt(qx * qx + qy * qy)
        k1 = np.sqrt((qx / ax) ** 2 + (qy / ay) ** 2)
        radial = _ellipse_distance(k0, k1, min(self.semi) * scale)
        axial = np.maximum(self.z_range[0] - p[2], p[2] - self.z_range[1])
        return np.maximum(radial, axial)

    def bbox(self) -> tuple[np.ndarray, np.ndarray]:
        grow = 1.0 + abs(self.taper) * 10.0
        half = np.array([self.semi[0] * grow, self.semi[1] * grow]) + max(0.0, self.grow)
        lo = np.array([self.centre[0] - half[0], self.centre[1] - half[1], self.z_range[0]])
        hi = np.array([self.centre[0] + half[0], self.centre[1] + half[1], self.z_range[1]])
        return lo, hi


@dataclass
class Tube(Shape):
    """Tube around a polyline with radius interpolated along it (a chain of tapered capsules).

    Args:
        points: ``(n, 3)`` centreline vertices.
        radii: ``(n,)`` radius at each vertex.
        squash: (x, y, z) factors > 1 make the cross-section thinner along that axis (distances there count
            ``squash`` times more), e.g. seminal vesicles thinner antero-posteriorly than wide.
    """

    points: np.ndarray
    radii: np.ndarray
    squash: Sequence[float] = (1.0, 1.0, 1.0)

    def __post_init__(self) -> None:
        self.points = np.asarray(self.points, dtype=np.float32)
        self.radii = np.asarray(self.radii, dtype=np.float32)
        if self.points.ndim != 2 or self.points.shape[1] != 3 or len(self.points) < 2:
            raise ValueError(f"tube points must be (n >= 2, 3), got {self.points.shape}")
        if self.radii.shape != (len(self.points),) or np.any(self.radii <= 0):
            raise ValueError("tube radii must be positive, one per point")
        self._s = np.asarray(self.squash, dtype=np.float32).reshape(3, 1)

    def nearest(self, p: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Signed distance, nearest centreline point ``(3, ...)`` and arc parameter in [0, 1] at points ``p``."""
        shape = p.shape[1:]
        q = p.reshape(3, -1) * self._s
        verts = self.points.T * self._s
        lengths = np.linalg.norm(np.diff(verts, axis=1), axis=0)
        cum = np.concatenate([[0.0], np.cumsum(lengths)]) / max(float(lengths.sum()), 1e-6)
        best = np.full(q.shape[1], np.inf, dtype=np.float32)
        best_segment = np.zeros(q.shape[1], dtype=np.intp)
        best_t = np.zeros(q.shape[1], dtype=np.float32)
        starts = verts[:, :-1]
        edges = np.diff(verts, axis=1)
        for i in range(edges.shape[1]):
            a, ab = starts[:, i : i + 1], edges[:, i : i + 1]
            t = np.clip(((q - a) * ab).sum(0) / max(float((ab * ab).sum()), 1e-9), 0.0, 1.0)
            d = np.sqrt(((q - a - ab * t) ** 2).sum(0)) - (self.radii[i] + t * (self.radii[i + 1] - self.radii[i]))
            closer = d < best
            best = np.where(closer, d, best)
            best_segment = np.where(closer, i, best_segment)
            best_t = np.where(closer, t, best_t)
        foot = (starts[:, best_segment] + edges[:, best_segment] * best_t) / self._s
        arc = cum[best_segment] + best_t * (cum[best_segment + 1] - cum[best_segment])
        return (best - self.grow).reshape(shape), foot.reshape(p.shape), arc.astype(np.float32).reshape(shape)

    def _sdf(self, p: np.ndarray) -> np.ndarray:
        return self.nearest(p)[0] + self.grow

    def bbox(self) -> tuple[np.ndarray, np.ndarray]:
        r = float(self.radii.max()) + max(0.0, self.grow)
        return self.points.min(0).astype(np.float64) - r, self.points.max(0).astype(np.float64) + r
