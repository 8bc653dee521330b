"""Fine-tuning through the bundle's trainer lowers the loss on the patient's pairs; what it cannot use is refused."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from monai.data import list_data_collate
from monai.transforms import Compose
from torch import nn

from prostate_jrs.adaptation.finetune import AdaptSettings, finetune, model_grid_settings, trainer_config
from prostate_jrs.adaptation.pairs import KIND, grid_settings, training_items
from prostate_jrs.adaptation.sessions import read_approved_fractions
from prostate_jrs.pipeline import BundleError
from prostate_jrs.trust import MODEL_FILE, record_model_hash


@pytest.fixture(scope="module")
def items(handover: dict, trainable_tiny_bundle: Path) -> tuple[list[dict], list[dict]]:
    fractions = read_approved_fractions([handover["JRS003"][1].approved])
    approved, planning, _ = training_items(fractions, model_grid_settings(trainable_tiny_bundle))
    return approved, planning


@pytest.fixture(scope="module")
def calibrated_bundle(
    trainable_tiny_bundle: Path, items: tuple[list, list], tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """The tiny bundle with batch-norm statistics of the patient's patches (its random weights otherwise have the
    initial statistics, so that its eval-mode loss would measure the statistics, not the weights)."""
    bundle = Path(shutil.copytree(trainable_tiny_bundle, tmp_path_factory.mktemp("calibrated") / "bundle"))
    parser = trainer_config(bundle, {"device": torch.device("cpu")})
    network = parser.get_parsed_content("network_def")
    network.load_state_dict(torch.load(bundle / MODEL_FILE, weights_only=True))
    norms = [m for m in network.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # a plain average over the calibration patches
    crop = Compose([t for part in ("random", "input") for t in parser.get_parsed_content(f"train#{part}_transforms")])
    crop.set_random_state(7)
    prepare, inferer = parser.get_parsed_content("prepare_batch"), parser.get_parsed_content("train#inferer")
    network.train()
    with torch.no_grad():
        for item in [*items[0], *items[0]]:
            for patch in crop({k: v for k, v in item.items() if k != KIND}):
                inputs, _ = prepare(list_data_collate([patch]), torch.device("cpu"))
                inferer(inputs, network)
    for norm in norms:
        norm.momentum = 0.1
    torch.save(network.state_dict(), bundle / MODEL_FILE)
    record_model_hash(bundle)
    return bundle


def test_adaptation_lowers_the_loss_on_the_patients_pairs(calibrated_bundle: Path, items: tuple[list, list]) -> None:
    approved, planning = items
    before = {k: v.clone() for k, v in torch.load(calibrated_bundle / MODEL_FILE, weights_only=True).items()}
    # the approved pair only, its batch-norm statistics kept; planning items are still counted
    settings = AdaptSettings(
        steps=8, learning_rate=1e-3, batch_size=1, planning_share=0.0, deform_prob=0.0, freeze_norm=True, seed=1
    )
    lines: list[str] = []
    network, record = finetune(calibrated_bundle, approved, planning, settings, progress=lines.append)
    # measured on the same fixed patches of the approved pair, in eval mode, before and after
    assert record.loss_after < record.loss_before, (record.loss_before, record.loss_after)
    curve = record.loss_curve
    assert len(curve) == 8 and all(math.isfinite(v) for v in curve)
    assert record.approved_pairs == 1 and record.planning_items == 1 and record.patch_size == 56
    assert record.settings["device"] == "cpu" and record.settings["batch_size"] == 1 and record.train_seconds > 0
    assert lines[-1] == f"step 8/8: training loss {curve[-1]:.4f}"
    changed = [
        k for k, v in network.state_dict().items() if v.dtype.is_floating_point and not torch.equal(v.cpu(), before[k])
    ]
    assert changed and set(before) == set(network.state_dict())
    json.dumps(record.as_dict())  # the record goes into the bundle's metadata


def test_settings_and_bundles_that_cannot_be_used_are_refused(trainable_tiny_bundle: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="steps must be at least 1"):
        AdaptSettings(steps=0)
    with pytest.raises(ValueError, match=r"planning_share must be in \[0, 1\)"):
        AdaptSettings(planning_share=1.0)
    with pytest.raises(ValueError, match="no approved pair"):
        finetune(trainable_tiny_bundle, [], [])
    damaged = Path(shutil.copytree(trainable_tiny_bundle, tmp_path / "damaged"))
    (damaged / "models" / "model.pt").write_bytes(b"not the weights")
    with pytest.raises(BundleError, match="does not match model_sha256"):
        finetune(damaged, [{}], [])
    no_config = Path(shutil.copytree(trainable_tiny_bundle, tmp_path / "no_config"))
    (no_config / "configs" / "train.json").unlink()
    with pytest.raises(BundleError, match=r"train.json: not found; adaptation fine-tunes with the bundle's own"):
        finetune(no_config, [{}], [])


def test_the_grid_comes_from_the_bundles_training_config(trainable_tiny_bundle: Path) -> None:
    assert model_grid_settings(trainable_tiny_bundle) == grid_settings(
        {"model_spacing": 4.0, "crop_margin_mm": 16.0, "context_voxels": 20, "hu_min": -1000, "hu_max": 1000}
    )
