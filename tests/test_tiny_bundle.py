from __future__ import annotations

import json
from pathlib import Path

import pytest

from prostate_jrs.pipeline import load_bundle
from prostate_jrs.tiny_bundle import TINY_SETTINGS, write_tiny_bundle

REPO = Path(__file__).resolve().parents[1]


def test_tiny_copy_loads_with_its_settings(tmp_path: Path) -> None:
    bundle = write_tiny_bundle(REPO / "bundle", tmp_path / "tiny", {**TINY_SETTINGS, "model_spacing": 6.0})
    config = json.loads((bundle / "configs" / "inference.json").read_text())
    assert config["widths"] == [4, 8, 16] and config["model_spacing"] == 6.0
    network, settings = load_bundle(bundle)
    assert settings.model_spacing == 6.0 and settings.patch_size == 56
    assert sum(p.numel() for p in network.parameters()) < 100_000
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        write_tiny_bundle(REPO / "bundle", bundle)
