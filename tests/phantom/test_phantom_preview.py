from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.image import imread

from prostate_jrs.labels import STRUCTURES
from prostate_jrs.phantom import Patient
from prostate_jrs.phantom.preview import save_preview


def test_preview_png_shows_scans_and_all_contours(tiny_patient: Patient, tmp_path: Path) -> None:
    path = save_preview(tiny_patient, tmp_path / "preview.png")
    pixels = imread(path)[..., :3]
    assert pixels.shape[0] > 600 and pixels.shape[1] > 1000  # 3 rows (planning + 2 fractions) x 4 views
    grey = (np.ptp(pixels, axis=-1) < 0.02) & (pixels.mean(-1) > 0.3)
    assert grey.mean() > 0.05  # CT pixels
    for structure in STRUCTURES:
        colour = np.asarray(structure.color) / 255.0
        near = np.abs(pixels - colour).max(-1) < 0.12
        assert near.sum() > 20, f"no {structure.name} contour in the preview"
