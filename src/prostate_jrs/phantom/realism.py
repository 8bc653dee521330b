"""HU statistics that compare a CT (phantom or real) with a real pelvic CT, computed the same way on both.

No labels are used, so the real scan (which has none) and the phantom are measured identically:

* ``fat_peak_hu`` / ``soft_tissue_peak_hu``: modes of the smoothed HU histogram inside the body, in
  [-200, -40] and [-20, 100] HU;
* ``urine_mean_hu`` / ``noise_sd_hu``: median and outlier-trimmed SD of the largest homogeneous fluid
  region (the bladder): voxels whose local mean is in [-5, 25] HU and local SD is low; its SD is noise plus
  fine texture.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from prostate_jrs.geometry import array_from_image
from prostate_jrs.hounsfield import BODY_OUTLINE_HU

__all__ = ["hu_statistics"]


def _largest_component(mask: np.ndarray) -> np.ndarray:
    labelled, n = ndimage.label(mask)
    if n == 0:
        return mask
    sizes = ndimage.sum_labels(mask, labelled, index=np.arange(1, n + 1))
    return labelled == (int(np.argmax(sizes)) + 1)


def _mode(values: np.ndarray, lo: float, hi: float) -> float:
    counts, edges = np.histogram(values, bins=np.arange(-300.0, 202.0, 2.0))
    centres = (edges[:-1] + edges[1:]) / 2
    smooth = ndimage.gaussian_filter1d(counts.astype(np.float64), 2.0)
    window = (centres >= lo) & (centres <= hi)
    return float(centres[window][np.argmax(smooth[window])])


def hu_statistics(image: sitk.Image, local_mm: float = 9.0, max_local_sd: float | None = None) -> dict[str, float]:
    """Fat and soft-tissue peaks, urine mean and noise SD of a CT.

    Args:
        image: CT in HU.
        local_mm: edge of the cube (mm) for local mean and SD.
        max_local_sd: local-SD limit of the homogeneous fluid region; by default 1.5x the median local SD of
            soft-tissue voxels whose local SD is in its lowest quartile (adapts to the noise level).

    Returns:
        ``fat_peak_hu``, ``soft_tissue_peak_hu``, ``urine_mean_hu``, ``noise_sd_hu``, ``urine_volume_ml``.

    Raises:
        ValueError: if no body or no homogeneous fluid region is found.
    """
    hu = array_from_image(image).astype(np.float32)
    spacing = np.asarray(image.GetSpacing())
    body = _largest_component(hu > BODY_OUTLINE_HU)
    if not body.any():
        raise ValueError(f"no body (HU > {BODY_OUTLINE_HU:g}) found in the image")
    body = ndimage.binary_erosion(ndimage.binary_fill_holes(body), iterations=2)
    inside = hu[body]
    size = [max(3, round(local_mm / s) | 1) for s in spacing]
    mean = ndimage.uniform_filter(hu, size)
    sd = np.sqrt(np.maximum(ndimage.uniform_filter(hu * hu, size) - mean * mean, 0.0))
    fluid_like = body & (mean > -5) & (mean < 25)
    if not fluid_like.any():
        raise ValueError("no water-like region (local mean in [-5, 25] HU) found")
    if max_local_sd is None:
        soft_sd = sd[body & (mean > 0) & (mean < 80)]
        max_local_sd = 1.5 * float(np.median(soft_sd[soft_sd <= np.percentile(soft_sd, 25)]))
    fluid = ndimage.binary_opening(fluid_like & (sd < max_local_sd), iterations=1)
    if not fluid.any():
        raise ValueError("no homogeneous fluid region found")
    urine = _largest_component(fluid)
    # Median, and SD after rejecting values beyond 4 robust SDs (1.4826 MAD): robust to the few edge voxels of
    # neighbouring tissue the region may include, yet not quantised like the MAD of integer HU.
    values = hu[urine]
    centre = float(np.median(values))
    spread = 1.4826 * float(np.median(np.abs(values - centre)))
    kept = values[np.abs(values - centre) <= 4.0 * max(spread, 1.0)]
    return {
        "fat_peak_hu": _mode(inside, -200.0, -40.0),
        "soft_tissue_peak_hu": _mode(inside, -20.0, 100.0),
        "urine_mean_hu": centre,
        "noise_sd_hu": float(kept.std()),
        "urine_volume_ml": float(urine.sum() * np.prod(spacing) / 1000.0),
    }
