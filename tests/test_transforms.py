"""Datalist reading, the bundle's paired preprocessing (different planning/daily grids) and the model-grid paths."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from monai.data import MetaTensor
from monai.transforms import Compose

from prostate_jrs.evaluation import DEFAULT_CONTOUR_SOURCE
from prostate_jrs.transforms import CheckLabelsd, JRSPathsd, case_name, load_datalist

BUNDLE = Path(__file__).resolve().parents[1] / "bundle"


def _scene(shape: tuple[int, int, int], affine: np.ndarray, shift_mm: tuple[float, float, float]):
    """CT (HU) and label map of boxes fixed in world coordinates (shifted by ``shift_mm``) on a grid."""
    idx = np.stack(np.meshgrid(*(np.arange(s) for s in shape), indexing="ij")).reshape(3, -1)
    world = (affine[:3, :3] @ idx + affine[:3, 3:4]).reshape(3, *shape) - np.reshape(shift_mm, (3, 1, 1, 1))
    ct = np.full(shape, -1000.0, dtype=np.float32)
    labels = np.zeros(shape, dtype=np.uint8)
    boxes = {4: ((-20, 20), (-30, 10), (-20, 20)), 1: ((-8, 8), (10, 26), (-10, 10)), 3: ((-6, 6), (30, 42), (-24, 24))}
    for label, bounds in boxes.items():
        mask = np.all([(world[a] >= lo) & (world[a] < hi) for a, (lo, hi) in enumerate(bounds)], axis=0)
        ct[mask] = 20.0 * label
        labels[mask] = label
    return ct, labels


def _write_pair(root: Path) -> dict[str, str]:
    """A planning scan (LPS-like flipped, 3 mm) and a daily scan (RAS, 2.5 mm), same world anatomy."""
    plan_affine = np.diag([-3.0, -3.0, 3.0, 1.0])
    plan_affine[:3, 3] = [60.0, 70.0, -50.0]
    daily_affine = np.diag([2.5, 2.5, 2.5, 1.0])
    daily_affine[:3, 3] = [-55.0, -45.0, -45.0]
    files = {}
    for name, affine, shape in (("plan", plan_affine, (40, 44, 34)), ("daily", daily_affine, (44, 46, 36))):
        ct, labels = _scene(shape, affine, (0.0, 0.0, 0.0))
        nib.save(nib.Nifti1Image(ct, affine), root / f"{name}.nii.gz")
        nib.save(nib.Nifti1Image(labels, affine), root / f"{name}_label.nii.gz")
    files = {
        "fixed_image": "daily.nii.gz",
        "moving_image": "plan.nii.gz",
        "moving_label": "plan_label.nii.gz",
        "fixed_label": "daily_label.nii.gz",
        "patient": "p0",
        # boxes have no bone to align on; both scans share one world, as the record says
        "rigid": {"daily_to_planning": np.eye(4).tolist(), "residual_mm": None, "method": "none"},
    }
    (root / "datalist.json").write_text(json.dumps({"training": [files], "validation": [], "test": [files]}))
    return files


def test_load_datalist(tmp_path: Path) -> None:
    _write_pair(tmp_path)
    items = load_datalist(tmp_path, ["training", "validation", "test"], require_fixed_label=True)
    assert len(items) == 1  # the same daily image in two lists is kept once
    assert Path(items[0]["fixed_image"]).is_absolute() and items[0]["patient"] == "p0"
    with pytest.raises(ValueError, match="hold no item"):
        load_datalist(tmp_path, "validation")
    with pytest.raises(FileNotFoundError, match="no datalist"):
        load_datalist(tmp_path / "nowhere")
    content = json.loads((tmp_path / "datalist.json").read_text())
    content["training"][0]["fixed_image"] = "missing.nii.gz"
    del content["test"][0]["fixed_label"]
    (tmp_path / "datalist.json").write_text(json.dumps(content))
    with pytest.raises(FileNotFoundError, match=r"missing\.nii\.gz \(fixed_image\)"):
        load_datalist(tmp_path, "training")
    with pytest.raises(ValueError, match="lacks"):
        load_datalist(tmp_path, "test", require_fixed_label=True)
    assert len(load_datalist(tmp_path, "test")) == 1


def test_case_name() -> None:
    assert case_name("/data/p001_f02.nii.gz") == "p001_f02"
    assert case_name("a/b.nii") == "b" and case_name("x.mha") == "x"


def _bundle_preprocessing(spacing: float, margin_mm: float) -> Compose:
    parser = ConfigParser()
    parser.read_config(str(BUNDLE / "configs" / "train.json"))
    parser.update({"model_spacing": spacing, "crop_margin_mm": margin_mm})
    transforms = parser.get_parsed_content("train#deterministic_transforms") + parser.get_parsed_content(
        "train#input_transforms"
    )
    return Compose(transforms)


def test_paired_preprocessing_aligns_grids_through_the_affines(tmp_path: Path) -> None:
    """Planning and daily scans on different grids come out on one model grid, anatomy aligned."""
    files = _write_pair(tmp_path)
    item = {k: str(tmp_path / v) if k not in ("patient", "rigid") else v for k, v in files.items()}
    out = _bundle_preprocessing(spacing=2.0, margin_mm=8.0)(item)
    image, fixed_label = out["image"], out["fixed_label"]
    assert image.shape[0] == 3 and image.shape[1:] == fixed_label.shape[1:]
    np.testing.assert_allclose(np.abs(np.diag(image.affine.numpy())[:3]), [2.0, 2.0, 2.0])
    assert float(image[:2].min()) >= -1.0 and float(image[:2].max()) <= 1.0
    moving_label, daily_label = image[2].numpy(), fixed_label[0].numpy()
    for label in (1, 3, 4):
        a, b = moving_label == label, daily_label == label
        dice = 2 * (a & b).sum() / (a.sum() + b.sum())
        # 12-48 mm boxes drawn on 3 mm and 2.5 mm grids, each resampled once by nearest neighbour onto 2 mm: the two
        # discretisations differ by up to a voxel per face (the 12 mm rectum box: Dice 0.74-0.80 by grid phase); an
        # offset between the scans would show in the centroids below
        assert dice > 0.7, (label, dice)
        # no systematic offset: centroids agree within one model voxel (each grid discretises the boxes)
        np.testing.assert_allclose(np.argwhere(a).mean(axis=0), np.argwhere(b).mean(axis=0), atol=1.0)
    # same world anatomy, so the intensity channels agree too (up to interpolation)
    assert float(torch.mean(torch.abs(image[0] - image[1]))) < 0.05
    # the crop keeps the planning contours plus the margin (8 mm = 4 voxels) on every side
    nonzero = np.argwhere(moving_label > 0)
    assert nonzero.min(axis=0).min() >= 3
    assert np.all(np.array(moving_label.shape) - 1 - nonzero.max(axis=0) >= 3)
    # the daily grid is remembered for restoring outputs
    np.testing.assert_allclose(out["fixed_image"].meta["original_affine"][0, 0], 2.5)
    assert tuple(np.asarray(out["fixed_image"].meta["spatial_shape"])) == (44, 46, 36)


def test_jrs_paths_on_model_grid() -> None:
    shape = (6, 7, 5)
    planning = torch.zeros(shape)
    planning[1:3, 1:4, 1:3] = 1
    planning[3:5, 4:6, 2:4] = 4
    image = torch.stack([torch.zeros(shape), torch.zeros(shape), planning])
    pred = torch.zeros(8, *shape)
    pred[3 + 3] = 2.0  # segmentation says rectum everywhere
    daily = planning.clone()[None]
    out = JRSPathsd(keys="pred", network_name="cross_stitch", contour_source=DEFAULT_CONTOUR_SOURCE)(
        {"pred": pred, "image": image, "fixed_label": daily}
    )
    assert torch.equal(out["reg"][0].float(), planning)  # zero DDF: the planning contours
    assert set(out["seg"].unique().tolist()) == {3}
    # prostate from reg; rectum and bladder from seg (rectum everywhere else)
    final = out["final"][0]
    assert set(final.unique().tolist()) == {1, 3}
    assert out["final_onehot"].shape == (5, *shape) and out["label_onehot"].shape == (5, *shape)
    single = JRSPathsd(keys="pred", network_name="seg", onehot=False)({"pred": pred, "image": image})
    assert torch.equal(single["final"], single["seg"]) and "seg_onehot" not in single
    with pytest.raises(ValueError, match="3 DDF"):
        JRSPathsd(keys="pred")({"pred": pred[:5], "image": image})


def test_jrs_paths_crop_inputs_with_context_to_the_prediction() -> None:
    shape, border = (10, 11, 9), 2
    planning = torch.zeros(shape)
    planning[3:6, 4:7, 3:5] = 1
    image = torch.stack([torch.zeros(shape), torch.zeros(shape), planning])
    inner = tuple(s - 2 * border for s in shape)
    pred = torch.zeros(8, *inner)
    out = JRSPathsd(keys="pred", network_name="reg")({"pred": pred, "image": image, "fixed_label": planning[None]})
    # zero DDF on the inner region: the planning contours of that region, which is also the label's region
    expected = planning[border:-border, border:-border, border:-border]
    assert torch.equal(out["reg"][0].float(), expected)
    assert out["label_onehot"].shape == (5, *inner) and torch.equal(out["label_onehot"][1], expected)
    with pytest.raises(ValueError, match="image of spatial shape"):
        JRSPathsd(keys="pred")({"pred": torch.zeros(8, 9, 11, 9), "image": image})


def test_check_labels_names_the_file() -> None:
    good = MetaTensor(torch.tensor([[[[0.0, 1.0], [4.0, 0.0]]]]), meta={"filename_or_obj": "plan_label.nii.gz"})
    check = CheckLabelsd(
        keys=["moving_label", "fixed_label"], require_foreground="moving_label", allow_missing_keys=True
    )
    assert check({"moving_label": good})["moving_label"] is good
    with pytest.raises(ValueError, match=r"plan_label\.nii\.gz \(moving_label\): label values \[7\.0, 28\.0\]"):
        check({"moving_label": good * 7})
    with pytest.raises(ValueError, match="no contour on the daily grid"):
        check({"moving_label": good * 0})
    assert check({"moving_label": good, "fixed_label": good * 0})  # daily labels may be empty


def test_preprocessing_refuses_planning_contours_outside_the_daily_scan(tmp_path: Path) -> None:
    files = _write_pair(tmp_path)
    far = np.diag([-3.0, -3.0, 3.0, 1.0])
    far[:3, 3] = [60.0, 70.0, 500.0]  # the planning scan 50 cm away from the daily one
    label = nib.load(tmp_path / files["moving_label"])
    nib.save(nib.Nifti1Image(np.asarray(label.dataobj), far), tmp_path / files["moving_label"])
    item = {k: str(tmp_path / v) if k not in ("patient", "rigid") else v for k, v in files.items()}
    with pytest.raises(RuntimeError) as info:  # MONAI's Compose wraps the transform's error
        _bundle_preprocessing(spacing=2.0, margin_mm=8.0)(item)
    assert isinstance(info.value.__cause__, ValueError)
    message = str(info.value.__cause__)
    assert "daily.nii.gz with " in message and "plan_label.nii.gz" in message
    assert "planning contours lie outside the daily CT" in message
