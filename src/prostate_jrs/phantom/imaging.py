"""Image formation: rectal gas painted in the scan's own frame, scanner blur, correlated noise, HU storage."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from prostate_jrs.hounsfield import AIR_HU

from .config import SiteProfile
from .grid import Grid
from .shapes import Ellipsoid, occupancy

__all__ = ["HU_MAX", "HU_MIN", "add_noise", "apply_psf", "paint_gas", "to_hu"]

HU_MIN, HU_MAX = -1024, 3071
GAS_HU = AIR_HU


def paint_gas(
    rng: np.random.Generator, hu: np.ndarray, lumen: np.ndarray, grid: Grid, max_pockets: int = 3
) -> np.ndarray:
    """Paint 1..``max_pockets`` gas pockets (ellipsoids, 10-30 mm) into the rectal lumen, in place.

    Gas has no correspondence between scans, so it is painted after warping and only where the lumen is;
    pockets sit towards the anterior (non-dependent, the patient lies supine) side of the lumen.

    Args:
        rng: random generator.
        hu: noise-free HU array to paint into.
        lumen: lumen occupancy in [0, 1] on the same grid.
        grid: the grid.
        max_pockets: most pockets.

    Returns:
        Boolean gas mask (more than half a voxel of gas).
    """
    candidates = np.argwhere(lumen > 0.5)
    gas = np.zeros(hu.shape, dtype=np.float32)
    if len(candidates) == 0:
        return gas > 0.5
    width = float(min(grid.spacing))
    for _ in range(int(rng.integers(1, max_pockets + 1))):
        voxel = candidates[rng.integers(len(candidates))]
        semi = rng.uniform(7.0, 15.0, 3) * np.array([1.0, 0.8, 1.0])
        centre = np.asarray(grid.origin) + np.asarray(grid.spacing) * voxel - np.array([0.0, 0.3 * semi[1], 0.0])
        shape = Ellipsoid(centre, semi)
        box = grid.index_box(centre - semi - width, centre + semi + width)
        if box is None:
            continue
        axes = [grid.axis_coords(a)[box[a]] for a in range(3)]
        occ = occupancy(shape.sdf(np.stack(np.meshgrid(*axes, indexing="ij"))), width) * lumen[box]
        gas[box] = np.maximum(gas[box], occ)
    hu += gas * (GAS_HU - hu)
    return gas > 0.5


def apply_psf(hu: np.ndarray, spacing: tuple[float, float, float], site: SiteProfile) -> np.ndarray:
    """Gaussian point-spread function: ``site.psf_sigma_mm`` in-plane, ``site.psf_sigma_slices`` through-plane."""
    sigma = (site.psf_sigma_mm / spacing[0], site.psf_sigma_mm / spacing[1], site.psf_sigma_slices)
    return ndimage.gaussian_filter(hu, sigma, mode="nearest")


def add_noise(rng: np.random.Generator, hu: np.ndarray, spacing: tuple[float, float, float], site: SiteProfile) -> None:
    """Add correlated Gaussian noise in place: white noise coloured in-plane, rescaled to the site's SD."""
    noise = rng.standard_normal(hu.shape, dtype=np.float32)
    sigma = site.noise_correlation_px
    if sigma > 0:
        noise = ndimage.gaussian_filter(noise, (sigma, sigma, 0.0), mode="wrap")
    noise *= site.noise_sd_for(spacing) / max(float(noise.std()), 1e-6)
    hu += noise


def to_hu(hu: np.ndarray, site: SiteProfile) -> np.ndarray:
    """Apply the site's HU offset, round and clip to the stored int16 range [-1024, 3071]."""
    return np.clip(np.rint(hu + site.hu_offset), HU_MIN, HU_MAX).astype(np.int16)
