"""Model grid <-> daily grid: DDF vectors, resampling, warping, contour composition and tables."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import SimpleITK as sitk

from prostate_jrs.evaluation import (
    DEFAULT_CONTOUR_SOURCE,
    case_metrics,
    compose_contours,
    compose_rigid,
    ddf_error,
    ddf_to_grid,
    field_of_view_mask,
    keep_largest_components,
    output_grid_affine,
    resample_to_grid,
    resolve_contour_source,
    restore_to_daily_grid,
    spacing_from_affine,
    summarize,
    update_eval_metrics,
    write_csv,
)
from prostate_jrs.geometry import identity_grid, resample_with_ddf

# A daily grid with anisotropic voxels, a flipped first axis and an off-centre origin (RAS world, mm).
DAILY_AFFINE = np.array([[-1.0, 0.0, 0.0, 40.0], [0.0, 1.2, 0.0, -10.0], [0.0, 0.0, 1.5, 5.0], [0.0, 0.0, 0.0, 1.0]])
DAILY_SHAPE = (30, 28, 26)
# A model grid as Orientationd(RAS) + Spacingd(2 mm) + a crop would give: axes unflipped, 2 mm, shifted origin.
MODEL_AFFINE = np.array([[2.0, 0.0, 0.0, 14.0], [0.0, 2.0, 0.0, -6.0], [0.0, 0.0, 2.0, 9.0], [0.0, 0.0, 0.0, 1.0]])
MODEL_SHAPE = (12, 13, 14)


def _world_displacement(points: np.ndarray) -> np.ndarray:
    """An affine world displacement field u(p) = c + B p, (3, ...) mm."""
    c = np.array([1.5, -2.0, 0.7])
    b = np.array([[0.02, 0.01, 0.0], [0.0, -0.03, 0.01], [0.01, 0.0, 0.02]])
    return c.reshape(3, 1, 1, 1) + np.tensordot(b, points, axes=1)


def _world_points(affine: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    return np.tensordot(affine[:3, :3], identity_grid(shape, np.float64), axes=1) + affine[:3, 3, None, None, None]


def _ddf_on(affine: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """Voxel-unit DDF of the world field on a grid: inv(L) u(A x)."""
    return np.tensordot(np.linalg.inv(affine[:3, :3]), _world_displacement(_world_points(affine, shape)), axes=1)


def _inside_model(shape: tuple[int, int, int]) -> np.ndarray:
    mapping = np.linalg.inv(MODEL_AFFINE) @ DAILY_AFFINE
    idx = np.tensordot(mapping[:3, :3], identity_grid(shape, np.float64), axes=1) + mapping[:3, 3, None, None, None]
    upper = np.array(MODEL_SHAPE).reshape(3, 1, 1, 1) - 1
    return np.all((idx >= 0) & (idx <= upper), axis=0)


def _sitk_image(array: np.ndarray, affine: np.ndarray) -> sitk.Image:
    """SimpleITK image (LPS) of an (I, J, K) array with a RAS affine."""
    lps = np.diag([-1.0, -1.0, 1.0]) @ affine[:3, :3]
    spacing = np.linalg.norm(lps, axis=0)
    image = sitk.GetImageFromArray(np.ascontiguousarray(array.transpose(2, 1, 0)))
    image.SetSpacing(tuple(float(s) for s in spacing))
    image.SetDirection(tuple(float(v) for v in (lps / spacing).ravel()))
    image.SetOrigin(tuple(float(v) for v in np.diag([-1.0, -1.0, 1.0]) @ affine[:3, 3]))
    return image


def test_ddf_to_grid_rescales_vectors_and_undoes_crop_and_flip() -> None:
    model_ddf = _ddf_on(MODEL_AFFINE, MODEL_SHAPE)
    daily_ddf = ddf_to_grid(model_ddf, MODEL_AFFINE, DAILY_AFFINE, DAILY_SHAPE)
    expected = _ddf_on(DAILY_AFFINE, DAILY_SHAPE)
    inside = _inside_model(DAILY_SHAPE)
    assert inside.sum() > 1000
    assert daily_ddf.shape == (3, *DAILY_SHAPE)
    np.testing.assert_allclose(daily_ddf[:, inside], expected[:, inside], atol=1e-4)
    # the flip of axis 0 turns the sign, the spacing ratio 2/1.2 scales axis 1
    constant = ddf_to_grid(np.ones((3, *MODEL_SHAPE)), MODEL_AFFINE, DAILY_AFFINE, DAILY_SHAPE)
    np.testing.assert_allclose(constant[:, 0, 0, 0], [-2.0, 2.0 / 1.2, 2.0 / 1.5], rtol=1e-6)


def test_ddf_to_grid_identity_when_grids_match() -> None:
    ddf = np.random.default_rng(0).normal(size=(3, *MODEL_SHAPE)).astype(np.float32)
    np.testing.assert_allclose(ddf_to_grid(ddf, MODEL_AFFINE, MODEL_AFFINE, MODEL_SHAPE), ddf, atol=1e-5)


def test_resample_with_ddf_matches_geometry_helper() -> None:
    rng = np.random.default_rng(1)
    planning_affine = np.array(
        [[0.9, 0.0, 0.0, 10.0], [0.0, 1.1, 0.0, -8.0], [0.0, 0.0, 2.5, 2.0], [0.0, 0.0, 0.0, 1.0]]
    )
    planning = np.zeros((34, 30, 16), dtype=np.uint8)
    planning[8:20, 6:18, 4:10] = 1
    planning[15:28, 12:25, 6:13] = 4
    ddf = rng.normal(scale=0.8, size=(3, *DAILY_SHAPE))
    ours = resample_to_grid(
        planning[None], planning_affine, DAILY_AFFINE, DAILY_SHAPE, order=0, mode="constant", ddf=ddf
    )
    theirs = resample_with_ddf(
        _sitk_image(planning, planning_affine),
        _sitk_image(np.zeros(DAILY_SHAPE, np.float32), DAILY_AFFINE),
        ddf,
        order=0,
    )
    assert np.array_equal(ours[0], theirs)
    assert (ours[0] == 4).sum() > 0


def test_resample_to_grid_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match="channel-first"):
        resample_to_grid(np.zeros((4, 4, 4)), np.eye(4), np.eye(4), (4, 4, 4))
    with pytest.raises(ValueError, match="does not fit"):
        resample_to_grid(np.zeros((1, 4, 4, 4)), np.eye(4), np.eye(4), (4, 4, 4), ddf=np.zeros((3, 2, 2, 2)))
    with pytest.raises(ValueError, match="DDF"):
        ddf_to_grid(np.zeros((2, 4, 4, 4)), np.eye(4), np.eye(4), (4, 4, 4))


def test_output_grid_affine_and_fov() -> None:
    affine = output_grid_affine(MODEL_AFFINE, (52, 52, 52), (12, 12, 12))
    np.testing.assert_allclose(affine[:3, 3], MODEL_AFFINE[:3, 3] + 2.0 * 20)
    np.testing.assert_allclose(output_grid_affine(MODEL_AFFINE, (8, 8, 8), (8, 8, 8)), MODEL_AFFINE)
    with pytest.raises(ValueError, match="centred crop"):
        output_grid_affine(MODEL_AFFINE, (8, 8, 8), (5, 8, 8))
    fov = field_of_view_mask(MODEL_AFFINE, MODEL_SHAPE, DAILY_AFFINE, DAILY_SHAPE)
    assert fov.shape == DAILY_SHAPE and 0 < fov.sum() < fov.size
    assert spacing_from_affine(DAILY_AFFINE) == pytest.approx((1.0, 1.2, 1.5))


def test_contour_source_and_composition() -> None:
    assert resolve_contour_source("cross_stitch", None) == DEFAULT_CONTOUR_SOURCE
    assert set(resolve_contour_source("seg", {"prostate": "reg"}).values()) == {"seg"}
    assert set(resolve_contour_source("jrs_reg", None).values()) == {"reg"}
    assert resolve_contour_source("dense", {"bladder": "reg"})["bladder"] == "reg"
    with pytest.raises(ValueError, match="unknown structure"):
        resolve_contour_source("dense", {"liver": "reg"})
    with pytest.raises(ValueError, match="expected 'reg' or 'seg'"):
        resolve_contour_source("dense", {"bladder": "both"})
    reg = np.array([1, 1, 2, 0, 4, 3], dtype=np.uint8)
    seg = np.array([0, 4, 4, 3, 4, 0], dtype=np.uint8)
    final = compose_contours(reg, seg, DEFAULT_CONTOUR_SOURCE)
    # prostate/SV from reg, rectum/bladder from seg; prostate wins where bladder (seg) overlaps it
    assert final.tolist() == [1, 1, 2, 3, 4, 0]


def test_restore_to_daily_grid_end_to_end() -> None:
    """A model-grid pred built from a known field gives the same warped contours as warping directly."""
    planning_affine = DAILY_AFFINE.copy()
    planning = np.zeros(DAILY_SHAPE, dtype=np.uint8)
    planning[10:20, 8:18, 8:16] = 1
    planning[12:16, 18:22, 10:14] = 3
    out_shape = MODEL_SHAPE
    pred = np.zeros((8, *out_shape), dtype=np.float32)
    pred[:3] = _ddf_on(MODEL_AFFINE, out_shape)
    pred[3 + 4] = 5.0  # the segmentation head says "bladder" everywhere
    result = restore_to_daily_grid(
        pred, MODEL_AFFINE, DAILY_AFFINE, DAILY_SHAPE, planning, planning_affine, DEFAULT_CONTOUR_SOURCE
    )
    inside = _inside_model(DAILY_SHAPE)
    np.testing.assert_allclose(result.ddf[:, inside], _ddf_on(DAILY_AFFINE, DAILY_SHAPE)[:, inside], atol=1e-4)
    assert set(np.unique(result.seg[~result.fov])) == {0}
    assert set(np.unique(result.seg[result.fov])) == {4}
    expected_reg = resample_to_grid(
        planning[None], planning_affine, DAILY_AFFINE, DAILY_SHAPE, order=0, mode="constant", ddf=result.ddf
    )[0]
    assert np.array_equal(result.reg, expected_reg)
    # prostate from reg, bladder from seg, rectum from seg (absent there) -> no rectum in the final map
    assert set(np.unique(result.labels)) == {0, 1, 4}
    rows, ddf_row = case_metrics(result, expected_reg, case="p0_f1", patient="p0")
    by_key = {(r["path"], r["structure"]): r for r in rows}
    assert by_key[("reg", "prostate")]["dsc"] == pytest.approx(1.0)
    assert by_key[("reg", "rectum")]["dsc"] == pytest.approx(1.0)
    assert by_key[("seg", "rectum")]["dsc"] == 0.0
    assert len(rows) == 3 * 4
    assert ddf_row["folding_fraction"] == 0.0 and ddf_row["case"] == "p0_f1"
    with pytest.raises(ValueError, match="8, I, J, K"):
        restore_to_daily_grid(pred[:5], MODEL_AFFINE, DAILY_AFFINE, DAILY_SHAPE, planning, DAILY_AFFINE, {})
    with pytest.raises(ValueError, match="daily grid"):
        case_metrics(result, planning[:5], case="x")


def test_summarize_and_write_csv(tmp_path) -> None:
    rows = [
        {"path": "reg", "structure": "prostate", "dsc": 0.8, "msd_mm": 1.0},
        {"path": "reg", "structure": "prostate", "dsc": 0.6, "msd_mm": math.nan},
        {"path": "seg", "structure": "prostate", "dsc": 0.5, "msd_mm": 2.0},
    ]
    table = summarize(rows, ["path", "structure"], ["dsc", "msd_mm"])
    reg_dsc = next(r for r in table if r["path"] == "reg" and r["metric"] == "dsc")
    assert reg_dsc["mean"] == pytest.approx(0.7) and reg_dsc["sd"] == pytest.approx(0.1)
    assert reg_dsc["median"] == pytest.approx(0.7) and reg_dsc["n"] == 2
    reg_msd = next(r for r in table if r["path"] == "reg" and r["metric"] == "msd_mm")
    assert reg_msd["n"] == 1
    path = write_csv(tmp_path / "sub" / "summary.csv", table)
    with path.open() as handle:
        read = list(csv.DictReader(handle))
    assert len(read) == 4 and read[0]["metric"] == "dsc"
    assert not list(tmp_path.glob("sub/.*tmp"))


def test_update_eval_metrics(tmp_path) -> None:
    rows = [
        {"path": "final", "structure": "prostate", "dsc": 0.81234, "msd_mm": 1.2},
        {"path": "final", "structure": "prostate", "dsc": 0.7, "msd_mm": 1.4},
    ]
    table = summarize(rows, ["path", "structure"], ["dsc", "msd_mm"])
    table += summarize(
        [{"path": "ddf", "structure": "all", "folding_fraction": 0.0, "ddf_error_mean_mm": 2.5}],
        ["path", "structure"],
        ["folding_fraction", "ddf_error_mean_mm"],
    )
    summary = write_csv(tmp_path / "summary.csv", table)
    meta = tmp_path / "metadata.json"
    meta.write_text(json.dumps({"version": "0.1.0", "eval_metrics": {}}))
    metrics = update_eval_metrics(meta, summary)
    assert metrics["final_dsc_prostate"] == pytest.approx(0.7562) and metrics["ddf_folding_fraction"] == 0.0
    assert metrics["num_cases"] == 2 and metrics["ddf_error_mean_mm"] == 2.5
    assert json.loads(meta.read_text())["eval_metrics"] == metrics


def test_ddf_error_is_the_world_distance_of_the_mapped_points() -> None:
    affine = np.diag([2.0, 1.0, 3.0, 1.0])
    truth = np.zeros((3, 4, 5, 6), dtype=np.float32)
    ddf = truth.copy()
    ddf[0] += 1.5  # 3 mm along the first axis everywhere
    ddf[2, 0] += 1.0  # and 3 mm more along the third in the first slab
    mask = np.ones((4, 5, 6), dtype=bool)
    error = ddf_error(ddf, truth, affine, mask)
    expected = np.r_[np.full(30, np.hypot(3.0, 3.0)), np.full(90, 3.0)]
    assert error["ddf_error_mean_mm"] == pytest.approx(expected.mean())
    assert error["ddf_error_max_mm"] == pytest.approx(np.hypot(3.0, 3.0))
    assert error["ddf_error_p95_mm"] == pytest.approx(np.percentile(expected, 95))
    assert math.isnan(ddf_error(ddf, truth, affine, ~mask)["ddf_error_mean_mm"])
    with pytest.raises(ValueError, match="must both be"):
        ddf_error(ddf[:2], truth[:2], affine)
    with pytest.raises(ValueError, match="mask"):
        ddf_error(ddf, truth, affine, mask[:2])


def test_islands_of_single_organs_are_removed_but_not_seminal_vesicle_lobes() -> None:
    labels = np.zeros((20, 20, 20), dtype=np.uint8)
    labels[2:10, 2:10, 2:10] = 4  # bladder
    labels[15:17, 15:17, 15:17] = 4  # a stray bladder island
    labels[12:14, 2:4, 2:4] = 2  # left seminal vesicle
    labels[12:14, 8:10, 2:4] = 2  # right seminal vesicle, not touching the left
    cleaned = keep_largest_components(labels)
    assert cleaned.dtype == np.uint8 and cleaned.shape == labels.shape
    assert (cleaned == 4).sum() == 8**3 and (cleaned == 2).sum() == (labels == 2).sum()
    np.testing.assert_array_equal(keep_largest_components(labels[None])[0], cleaned)


def test_compose_rigid_expresses_the_ddf_against_the_planning_file() -> None:
    affine = np.diag([2.0, 2.0, 3.0, 1.0])
    affine[:3, 3] = [-10.0, 5.0, 100.0]
    ddf = np.random.default_rng(0).normal(size=(3, 4, 5, 6)).astype(np.float32)
    np.testing.assert_array_equal(compose_rigid(ddf, affine, np.eye(4)), ddf)
    shift = np.eye(4)
    shift[:3, 3] = [4.0, -2.0, 9.0]  # mm: a pure translation adds itself in voxel units of the grid
    np.testing.assert_allclose(
        compose_rigid(ddf, affine, shift), ddf + np.array([2.0, -1.0, 3.0])[:, None, None, None], atol=1e-5
    )
    rotation = np.eye(4)
    rotation[:2, :2] = [[0.0, -1.0], [1.0, 0.0]]
    full = compose_rigid(ddf, affine, rotation, slab=2)  # slabs give what one pass gives
    x = np.array([1, 2, 3])
    point = affine @ np.r_[x + ddf[:, 1, 2, 3], 1.0]
    np.testing.assert_allclose(affine @ np.r_[x + full[:, 1, 2, 3], 1.0], rotation @ point, atol=1e-4)


def test_label_argmax_is_torchs_first_maximum_also_with_ties_and_nan() -> None:
    import torch

    from prostate_jrs.evaluation.restore import label_argmax

    rng = np.random.default_rng(0)
    logits = torch.from_numpy(rng.integers(0, 3, (5, 6, 7, 8)).astype(np.float32))  # many ties
    expected = logits.argmax(dim=0).to(torch.uint8)
    assert torch.equal(label_argmax(logits), expected)
    logits[3, 1, 2, 3] = float("nan")
    assert torch.equal(label_argmax(logits), logits.argmax(dim=0).to(torch.uint8))
