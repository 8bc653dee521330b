"""Round trip of the ground-truth DDF of a phantom through the bundle's model grid and back to the daily grid.

An oracle network that predicts the phantom's true deformation must give back, on the daily CT's grid, that
deformation and planning contours that land on the daily contours. This checks the paired preprocessing
(planning and daily scans on different grids, the rigid pre-alignment on bone), the spacing/orientation/crop and the
DDF restoration (relative to the aligned planning scan on the model grid, to the planning file on the daily grid).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monai.bundle import ConfigParser

from prostate_jrs.engines import restore_item
from prostate_jrs.evaluation import compose_rigid, ddf_to_grid
from prostate_jrs.metrics import structure_metrics
from prostate_jrs.preprocessing import DAILY_TO_PLANNING, ras_map
from prostate_jrs.transforms import JRSPathsd, load_datalist

CONFIGS = Path(__file__).resolve().parents[2] / "bundle" / "configs"


def _preprocess(item: dict[str, Any], spacing: float) -> dict[str, Any]:
    """The validation preprocessing of train.json (it also brings the daily labels onto the model grid)."""
    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "train.json"))
    parser.update({"model_spacing": spacing, "crop_margin_mm": 16.0})
    return parser.get_parsed_content("validate#preprocessing")(item)


def test_oracle_ddf_round_trip(tiny_dataset: Path) -> None:
    item = load_datalist(tiny_dataset, "test", require_fixed_label=True)[0]
    data = _preprocess(dict(item), spacing=3.0)  # 4 mm phantom -> 3 mm model grid: a non-integer ratio
    image = data["image"]
    model_affine, model_shape = image.affine.numpy(), tuple(image.shape[1:])
    daily = nib.load(item["fixed_image"])
    truth = np.moveaxis(np.asarray(nib.load(item["ddf"]).dataobj, dtype=np.float32), -1, 0)
    reference = np.asarray(nib.load(item["fixed_label"]).dataobj)

    # the network sees the planning scan through the rigid pre-alignment R: the oracle predicts what is left of the
    # truth after it, R A (x + relative(x)) = A (x + truth(x))
    daily_to_planning = ras_map(data[DAILY_TO_PLANNING].numpy())
    assert not np.allclose(daily_to_planning, np.eye(4), atol=0.5)  # the phantom's setup motion was found
    relative = compose_rigid(truth, daily.affine, np.linalg.inv(daily_to_planning))
    pred = torch.zeros(8, *model_shape)
    pred[:3] = torch.as_tensor(ddf_to_grid(relative, daily.affine, model_affine, model_shape))
    pred[3] = 1.0

    # on the model grid, the warped planning contours (Warp) match the daily contours resampled there
    paths = JRSPathsd(keys="pred", network_name="reg", onehot=False)({"pred": pred, "image": image})
    model_dsc = structure_metrics(paths["reg"][0].numpy(), data["fixed_label"][0].numpy(), (3.0, 3.0, 3.0))
    assert model_dsc["prostate"].dsc > 0.85 and model_dsc["bladder"].dsc > 0.85

    name, result = restore_item(
        data, {"pred": pred}, {s: "reg" for s in ("prostate", "seminal_vesicles", "rectum", "bladder")}
    )
    assert name == Path(item["fixed_image"]).name[: -len(".nii.gz")]
    assert result.ddf.shape == truth.shape
    # inside the field of view (away from its edge) the restored DDF is the truth up to interpolation
    inner = result.fov.copy()
    for axis in range(3):
        inner &= np.roll(result.fov, 2, axis) & np.roll(result.fov, -2, axis)
    error = np.linalg.norm(result.ddf - truth, axis=0)[inner]
    assert inner.sum() > 1000
    assert np.median(error) < 0.05 and np.percentile(error, 99) < 0.3, (np.median(error), np.percentile(error, 99))
    # and the original planning contours warped with it land on the daily contours
    dsc = structure_metrics(result.labels, reference, tuple(float(s) for s in daily.header.get_zooms()[:3]))
    assert dsc["prostate"].dsc > 0.9 and dsc["bladder"].dsc > 0.9, {k: v.dsc for k, v in dsc.items()}
    assert dsc["rectum"].dsc > 0.85 and dsc["seminal_vesicles"].dsc > 0.8, {k: v.dsc for k, v in dsc.items()}
