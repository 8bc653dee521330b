"""Training patch sampling of train.json: ``patch_class_ratios`` steers the patch centres over the daily labels."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from monai.bundle import ConfigParser
from monai.transforms import RandCropByLabelClassesd
from monai.utils import set_determinism

from prostate_jrs.transforms import load_datalist

CONFIGS = Path(__file__).resolve().parents[2] / "bundle" / "configs"


def _parser(overrides: dict[str, Any]) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "train.json"))
    parser.update(overrides)
    return parser


@pytest.mark.parametrize("ratios", [None, [4.0, 1.0, 1.0, 1.0, 1.0]])
def test_ratios_reach_the_patch_sampler(ratios: list[float] | None) -> None:
    transforms = _parser({"patch_class_ratios": ratios}).get_parsed_content("train#random_transforms")
    (sampler,) = [t for t in transforms if isinstance(t, RandCropByLabelClassesd)]
    assert sampler.cropper.ratios == ratios and sampler.cropper.num_classes == 5


def test_default_balances_the_centres_over_the_labels(tiny_dataset: Path, tiny: dict[str, Any]) -> None:
    item = load_datalist(tiny_dataset, "training", require_fixed_label=True)[0]
    set_determinism(seed=0)
    try:
        patches = _parser({**tiny, "patches_per_pair": 8}).get_parsed_content("train#preprocessing")(dict(item))
    finally:
        set_determinism(seed=None)
    centre = patches[0]["fixed_label"].shape[-1] // 2
    assert len({int(p["fixed_label"][0, centre, centre, centre]) for p in patches}) >= 3
