"""Shared fixtures of the bundle tests: a tiny phantom dataset and overrides that shrink every workflow."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from prostate_jrs.phantom import PhantomConfig, write_dataset
from prostate_jrs.tiny_bundle import TINY_TRAINING

#: Tiny CPU run: 4 mm model grid, 56^3 patches (16^3 output), narrow cross-stitch, one epoch, no workers.
_TINY: dict[str, Any] = {
    **TINY_TRAINING,
    "epochs": 1,
    "val_interval": 1,
    "num_workers": 0,
    "cache_rate": 0.0,
    "show_progress": False,
}


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three phantom patients (one training, one validation, one test), one fraction each, 4 mm voxels."""
    root = tmp_path_factory.mktemp("phantom") / "data"
    write_dataset(root, n_patients=3, n_fractions=1, seed=0, config=PhantomConfig.tiny())
    return root


@pytest.fixture(scope="session")
def tiny() -> dict[str, Any]:
    """Overrides that shrink every bundle workflow to seconds on a CPU (copy before changing: ``{**tiny, ...}``)."""
    return dict(_TINY)


@pytest.fixture(scope="session")
def synth_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same kind of dataset made by the user-facing command ``prostate-jrs synth`` (4 mm voxels)."""
    exe = shutil.which("prostate-jrs", path=str(Path(sys.executable).parent)) or shutil.which("prostate-jrs")
    assert exe is not None, "the prostate-jrs command is not installed next to the Python interpreter"
    root = tmp_path_factory.mktemp("synth") / "data"
    args = [exe, "synth", str(root), "--patients", "3", "--fractions", "1", "--seed", "0", "--spacing", "4"]
    result = subprocess.run(args, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout + result.stderr
    return root
