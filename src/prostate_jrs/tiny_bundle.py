"""A seconds-fast copy of a bundle for smoke runs: its configs with tiny settings and random narrow weights."""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from prostate_jrs.nets import build_network
from prostate_jrs.trust import write_bundle

__all__ = ["TINY_REFINE", "TINY_SETTINGS", "TINY_TRAINING", "write_tiny_bundle"]

#: Inference settings of the tiny copy: narrow cross-stitch on a 4 mm model grid, 56^3 tiles (16^3 output).
TINY_SETTINGS: dict[str, Any] = {
    "widths": [4, 8, 16],
    "model_spacing": 4.0,
    "crop_margin_mm": 16.0,
    "patch_size": 56,
    "infer_patch_size": 56,
    "tile_batch_size": 8,
}


#: Overrides of ``train.json`` (and the evaluate/inference configs merged with it) for seconds-long CPU runs: 4 mm
#: model grid, one 56^3 patch per pair (16^3 output), narrow cross-stitch; front ends add their epochs and workers.
TINY_TRAINING: dict[str, Any] = {
    "model_spacing": 4.0,
    "crop_margin_mm": 16.0,
    "patch_size": 56,
    "patches_per_pair": 1,
    "batch_size": 1,
    "tile_batch_size": 8,
    "widths": [4, 8, 16],
}

#: Refinement overrides of smoke runs: two levels, a few steps, the finer one sampled on a lattice (any mode).
TINY_REFINE: dict[str, Any] = {
    "levels": [4, 2],
    "control_spacing": [8, 4],
    "iterations": [3, 3],
    "sampling_stride": [1, 2],
}


def write_tiny_bundle(
    source: str | Path,
    target: str | Path,
    settings: Mapping[str, Any] | None = None,
    training: Mapping[str, Any] | None = None,
) -> Path:
    """Copy ``source``'s configs to ``target`` with tiny inference settings and randomly initialised weights.

    The weights are untrained (seed 0): for checking that the app, pipeline and benchmarks run, never for numbers.
    The folder appears complete or not at all (:func:`prostate_jrs.trust.write_bundle`).

    Args:
        source: a bundle folder (its ``configs/`` is copied).
        target: the new bundle folder; must not exist.
        settings: ``inference.json`` keys to override; defaults to :data:`TINY_SETTINGS`.
        training: ``train.json`` keys to override (e.g. :data:`TINY_TRAINING`, so that the copy can be fine-tuned,
            as ``prostate-jrs adapt`` does); ``None`` leaves ``train.json`` as copied.

    Returns:
        ``target``.

    Raises:
        FileExistsError: if ``target`` exists.
    """
    source = Path(source)
    values = dict(TINY_SETTINGS if settings is None else settings)

    def fill(staging: Path) -> None:
        shutil.copytree(source / "configs", staging / "configs")
        config_file = staging / "configs" / "inference.json"
        config = json.loads(config_file.read_text())
        config.update(values)
        config_file.write_text(json.dumps(config, indent=4))
        if training is not None:
            train_file = staging / "configs" / "train.json"
            train_file.write_text(json.dumps({**json.loads(train_file.read_text()), **training}, indent=4))
        (staging / "models").mkdir()
        torch.manual_seed(0)
        network = build_network(str(config.get("network_name", "cross_stitch")), config["widths"])
        torch.save(network.state_dict(), staging / "models" / "model.pt")

    # the copied metadata.json names the shipped weights' hash: write_bundle records the new one
    return write_bundle(target, fill, "a tiny bundle")
