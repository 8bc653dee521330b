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


def _report(
    reg: np.ndarray,
    seg: np.ndarray,
    settings: PipelineSettings,
    daily_spacing: tuple[float, float, float] = (1.0, 1.0, 1.0),
    planning: tuple[np.ndarray, sitk.Image] | None = None,
) -> dict:
    """QA of ``reg`` as the final contours (planning: ``reg`` on the daily grid unless given with its grid)."""
    daily_grid = _grid(reg.shape, daily_spacing)
    planning_labels, planning_grid = planning if planning is not None else (reg, daily_grid)
    return quality_report(
        reg=reg,
        seg=seg,
        final=reg,
        daily_grid=daily_grid,
        planning_labels=planning_labels,
        planning_grid=planning_grid,
        model_ddf=np.zeros((3, 8, 8, 8), dtype=np.float32),
        body_mask=np.ones((8, 8, 8), dtype=bool),
        rigid=RigidAlignment(np.eye(4), 0.5),
        contour_source={"prostate": "reg", "seminal_vesicles": "reg", "rectum": "reg", "bladder": "reg"},
        settings=settings,
    )


@pytest.mark.parametrize(("daily_extent", "change_pct"), [(5, 0.0), (6, 20.0)])
def test_volume_change_uses_the_voxel_volume_of_each_grid(daily_extent: int, change_pct: float) -> None:
    # planning: 1 x 1 x 3 mm voxels, a 10 x 10 x 4 voxel prostate = 1.2 ml; daily: 2 mm voxels, 5 (or 6) x 5 x 6
    # voxels = 1.2 ml (or 1.44 ml). Counting voxels alone would give 400 vs 150: -62.5%.
    planning_grid = _grid((30, 30, 10), (1.0, 1.0, 3.0))
    planning = np.zeros((30, 30, 10), dtype=np.uint8)
    planning[5:15, 5:15, 2:6] = 1
    planning[20:25, 20:25, 2:6] = 4  # 0.3 ml of bladder, absent on the daily CT
    final = np.zeros((20, 20, 20), dtype=np.uint8)
    final[2 : 2 + daily_extent, 2:7, 3:9] = 1
    report = _report(final, final, PipelineSettings(), (2.0, 2.0, 2.0), (planning, planning_grid))
    prostate = report["structures"]["prostate"]
    assert prostate["planning_volume_ml"] == pytest.approx(1.2)
    assert prostate["volume_ml"] == pytest.approx(1.2 * (1 + change_pct / 100))
    assert prostate["volume_change_pct"] == pytest.approx(change_pct)
    bladder = report["structures"]["bladder"]
    assert (bladder["planning_volume_ml"], bladder["volume_ml"], bladder["volume_change_pct"]) == (0.3, 0.0, -100.0)
    assert report["structures"]["rectum"]["volume_change_pct"] is None  # not in the planning contours
    assert "rectum: not in the planning contours" in report["flags"]


def test_a_local_disagreement_that_overlap_hides_is_flagged_by_distance() -> None:
    # a 20 x 20 x 20 mm prostate on both paths; the registration path also covers a 12 x 12 x 14 mm bulge at one end:
    # DSC about 0.9 (above 0.70), but a quarter of its surface is up to 14 mm from the other path's
    seg = np.zeros((48, 48, 48), dtype=np.uint8)
    seg[10:30, 10:30, 10:30] = 1
    reg = seg.copy()
    reg[14:26, 14:26, 30:44] = 1
    report = _report(reg, seg, PipelineSettings())
    prostate = report["structures"]["prostate"]
    assert prostate["dsc_reg_seg"] > 0.85 and prostate["hd95_mm_reg_seg"] > 7.0
    flags = [f for f in report["flags"] if f.startswith("prostate:")]
    assert len(flags) == 1 and "HD95" in flags[0] and "> 7.0 mm" in flags[0]
    # the same fraction under a looser limit, and a clean one under the default: no disagreement flag
    assert not any(
        f.startswith("prostate:") for f in _report(reg, seg, PipelineSettings(disagreement_hd95_mm=20.0))["flags"]
    )
    assert not any(f.startswith("prostate:") for f in _report(seg, seg, PipelineSettings())["flags"])


def test_poor_overlap_is_flagged_once_by_dsc() -> None:
    seg = np.zeros((48, 48, 48), dtype=np.uint8)
    seg[10:30, 10:30, 10:30] = 1
    reg = np.zeros_like(seg)
    reg[22:42, 10:30, 10:30] = 1  # shifted by 12 mm: DSC 0.4 and HD95 12 mm
    flags = [f for f in _report(reg, seg, PipelineSettings())["flags"] if f.startswith("prostate:")]
    assert len(flags) == 1 and "DSC" in flags[0]


def test_the_bundle_and_the_app_flag_the_same_disagreements() -> None:
    from prostate_jrs.evaluation.restore import DailyGridResult
    from prostate_jrs.evaluation.writers import path_agreement

    seg = np.zeros((48, 48, 48), dtype=np.uint8)
    seg[10:30, 10:30, 10:30] = 1
    seg[30:40, 10:30, 10:30] = 4
    reg = seg.copy()
    reg[14:26, 14:26, 30:44] = 1  # a local disagreement of the prostate (distance), none of the bladder
    app = [f for f in _report(reg, seg, PipelineSettings())["flags"] if "disagree" in f]
    result = DailyGridResult(
        ddf=np.zeros((3, *seg.shape), np.float32), reg=reg, seg=seg, labels=reg, affine=np.eye(4), fov=seg > 0
    )
    source = {"prostate": "reg", "seminal_vesicles": "reg", "rectum": "reg", "bladder": "reg"}
    assert path_agreement(result, source)["flags"] == app and len(app) == 1 and app[0].startswith("prostate:")
    assert path_agreement(result, source, disagreement_hd95_mm=20.0)["flags"] == []
