"""QA report: volumes against planning are measured each on its own grid, in ml."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from prostate_jrs.pipeline import PipelineSettings, RigidAlignment
from prostate_jrs.qa import quality_report


def _grid(size: tuple[int, int, int], spacing: tuple[float, float, float]) -> sitk.Image:
    image = sitk.Image(size, sitk.sitkUInt8)
    image.SetSpacing(spacing)
    return image


@pytest.mark.parametrize(("daily_extent", "change_pct"), [(5, 0.0), (6, 20.0)])
def test_volume_change_uses_the_voxel_volume_of_each_grid(daily_extent: int, change_pct: float) -> None:
    # planning: 1 x 1 x 3 mm voxels, a 10 x 10 x 4 voxel prostate = 1.2 ml; daily: 2 mm voxels, 5 (or 6) x 5 x 6
    # voxels = 1.2 ml (or 1.44 ml). Counting voxels alone would give 400 vs 150: -62.5%.
    planning_grid = _grid((30, 30, 10), (1.0, 1.0, 3.0))
    planning = np.zeros((30, 30, 10), dtype=np.uint8)
    planning[5:15, 5:15, 2:6] = 1
    planning[20:25, 20:25, 2:6] = 4  # 0.3 ml of bladder, absent on the daily CT
    daily_grid = _grid((20, 20, 20), (2.0, 2.0, 2.0))
    final = np.zeros((20, 20, 20), dtype=np.uint8)
    final[2 : 2 + daily_extent, 2:7, 3:9] = 1
    report = quality_report(
        reg=final,
        seg=final,
        final=final,
        daily_grid=daily_grid,
        planning_labels=planning,
        planning_grid=planning_grid,
        model_ddf=np.zeros((3, 8, 8, 8), dtype=np.float32),
        body_mask=np.ones((8, 8, 8), dtype=bool),
        rigid=RigidAlignment(np.eye(4), 0.5),
        contour_source={"prostate": "reg", "seminal_vesicles": "reg", "rectum": "reg", "bladder": "reg"},
        settings=PipelineSettings(),
    )
    prostate = report["structures"]["prostate"]
    assert prostate["planning_volume_ml"] == pytest.approx(1.2)
    assert prostate["volume_ml"] == pytest.approx(1.2 * (1 + change_pct / 100))
    assert prostate["volume_change_pct"] == pytest.approx(change_pct)
    bladder = report["structures"]["bladder"]
    assert (bladder["planning_volume_ml"], bladder["volume_ml"], bladder["volume_change_pct"]) == (0.3, 0.0, -100.0)
    assert report["structures"]["rectum"]["volume_change_pct"] is None  # not in the planning contours
    assert "rectum: not in the planning contours" in report["flags"]
