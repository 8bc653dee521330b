"""Voxel grids of planning and daily scans (axial, LPS, identity direction) and their world mappings."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from prostate_jrs.geometry import image_from_array

from .config import PhantomConfig

__all__ = ["Grid", "daily_grid", "planning_grid"]


@dataclass(frozen=True)
class Grid:
    """An axial CT grid: ``size`` voxels (x, y, z) of ``spacing`` mm, voxel 0 centred at ``origin`` (LPS mm)."""

    size: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]

    @property
    def shape(self) -> tuple[int, int, int]:
        """Array shape ``(I, J, K)``."""
        return tuple(int(n) for n in self.size)  # type: ignore[return-value]

    def index_to_world(self) -> np.ndarray:
        """4x4 index-to-world matrix (identity direction)."""
        matrix = np.diag([*self.spacing, 1.0])
        matrix[:3, 3] = self.origin
        return matrix

    def world_to_index(self) -> np.ndarray:
        """4x4 world-to-index matrix."""
        return np.linalg.inv(self.index_to_world())

    def axis_coords(self, axis: int) -> np.ndarray:
        """World coordinate (mm) of every voxel centre along one axis."""
        return (self.origin[axis] + self.spacing[axis] * np.arange(self.size[axis])).astype(np.float32)

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """World (min, max) of the voxel centres."""
        lo = np.asarray(self.origin, dtype=np.float64)
        return lo, lo + np.asarray(self.spacing) * (np.asarray(self.size) - 1)

    def index_box(self, lo: np.ndarray, hi: np.ndarray) -> tuple[slice, slice, slice] | None:
        """Index slices of the voxels whose centres lie in the world box ``[lo, hi]``; ``None`` when empty."""
        first = np.ceil((np.asarray(lo) - self.origin) / self.spacing).astype(int)
        last = np.floor((np.asarray(hi) - self.origin) / self.spacing).astype(int) + 1
        first = np.clip(first, 0, self.size)
        last = np.clip(last, 0, self.size)
        if np.any(last <= first):
            return None
        return tuple(slice(int(a), int(b)) for a, b in zip(first, last, strict=True))  # type: ignore[return-value]

    def image(self, array: np.ndarray, is_vector: bool = False) -> sitk.Image:
        """SimpleITK image of an ``(I, J, K)`` array on this grid."""
        reference = sitk.Image([int(n) for n in self.size], sitk.sitkUInt8)
        reference.SetSpacing([float(s) for s in self.spacing])
        reference.SetOrigin([float(o) for o in self.origin])
        return image_from_array(array, reference, is_vector=is_vector)

    @classmethod
    def from_image(cls, image: sitk.Image) -> Grid:
        """Grid of a SimpleITK image.

        Raises:
            ValueError: if the image direction is not the identity (axial LPS).
        """
        if not np.allclose(image.GetDirection(), np.eye(3).ravel(), atol=1e-6):
            raise ValueError(f"phantom grids are axial with identity direction; got direction {image.GetDirection()}")
        return cls(tuple(image.GetSize()), tuple(image.GetSpacing()), tuple(image.GetOrigin()))


def planning_grid(config: PhantomConfig) -> Grid:
    """The planning grid: ``config.size`` voxels centred on ``config.fov_centre``."""
    size = np.asarray(config.size)
    spacing = np.asarray(config.spacing, dtype=np.float64)
    origin = np.asarray(config.fov_centre) - spacing * (size - 1) / 2.0
    return Grid(tuple(int(n) for n in size), tuple(float(s) for s in spacing), tuple(float(o) for o in origin))  # type: ignore[arg-type]


def daily_grid(planning: Grid, config: PhantomConfig, rng: np.random.Generator) -> Grid:
    """A daily grid: same pixel size and matrix, another couch position and scan length.

    The in-plane offset models couch height and lateral position; each end of the scan moves by up to
    ``config.scan_length_change`` mm, so slice count and slice positions differ from the planning scan.
    """
    if not config.vary_daily_grid:
        return planning
    spacing = np.asarray(planning.spacing)
    origin = np.asarray(planning.origin, dtype=np.float64).copy()
    shift = np.clip(rng.normal(0.0, config.couch_shift_sd, 2), -3 * config.couch_shift_sd, 3 * config.couch_shift_sd)
    origin[:2] += shift
    z_lo, z_hi = planning.bounds()[0][2], planning.bounds()[1][2]
    z_lo += rng.uniform(-config.scan_length_change, config.scan_length_change)
    z_hi += rng.uniform(-config.scan_length_change, config.scan_length_change)
    n_z = max(8, round((z_hi - z_lo) / spacing[2]) + 1)
    origin[2] = z_lo
    size = (planning.size[0], planning.size[1], int(n_z))
    return Grid(size, planning.spacing, tuple(float(o) for o in origin))  # type: ignore[arg-type]
