"""Fixtures of the app tests: a tiny bundle, and the app run as users run it (``python app ...``, a subprocess)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from prostate_jrs.nets import build_network

REPO = Path(__file__).resolve().parents[2]

RunApp = Callable[[list[str], Path], subprocess.CompletedProcess[str]]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The repo's bundle configs with tiny settings and randomly initialised weights."""
    root = tmp_path_factory.mktemp("bundle") / "tiny_bundle"
    shutil.copytree(REPO / "bundle" / "configs", root / "configs")
    config = json.loads((root / "configs" / "inference.json").read_text())
    config.update(
        {
            "widths": [4, 8, 16],
            "model_spacing": 4.0,
            "crop_margin_mm": 16.0,
            "patch_size": 56,
            "infer_patch_size": 56,
            "tile_batch_size": 8,
        }
    )
    (root / "configs" / "inference.json").write_text(json.dumps(config, indent=4))
    (root / "models").mkdir()
    torch.manual_seed(0)
    torch.save(build_network("cross_stitch", [4, 8, 16]).state_dict(), root / "models" / "model.pt")
    return root


def _run_app(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, str(REPO / "app"), *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=300
    )


@pytest.fixture(scope="session")
def run_app() -> RunApp:
    """``run_app(args, cwd)``: ``python app *args`` in a subprocess, output captured."""
    return _run_app
