"""The three bundle commands, run from the repository root exactly as users type them.

The commands: docs/ARCHITECTURE.md, "Command-line contract".

Only tiny-size overrides are appended (and checkpoint/log folders in a temporary directory, so the repository's
``bundle/models`` is never written by tests).
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]


def _overrides(values: dict[str, Any]) -> list[str]:
    """``--key value`` pairs as python-fire parses them (Python literals)."""
    args: list[str] = []
    for key, value in values.items():
        args += [f"--{key}", value if isinstance(value, str) else repr(value)]
    return args


def _run(args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "run", *args], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, f"{' '.join(args)}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.mark.slow  # five bundle CLI processes
def test_design_commands(synth_dataset: Path, tiny: dict[str, Any], tmp_path: Path) -> None:
    """train -> evaluate -> infer on a ``prostate-jrs synth`` dataset."""
    shrink = _overrides({**tiny, "ckpt_dir": str(tmp_path / "models"), "output_dir": str(tmp_path / "eval")})
    data = ["--dataset_dir", str(synth_dataset)]

    _run(["--config_file", "bundle/configs/train.json", "--bundle_root", "bundle", *data, *shrink])
    assert (tmp_path / "models" / "model.pt").is_file()

    configs = "['bundle/configs/train.json','bundle/configs/evaluate.json']"
    _run(["--config_file", configs, "--bundle_root", "bundle", *data, *shrink])
    with (tmp_path / "eval" / "metrics_per_case.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert {(r["path"], r["structure"]) for r in rows} == {
        (p, s) for p in ("reg", "seg", "final") for s in ("prostate", "seminal_vesicles", "rectum", "bladder")
    }
    assert (tmp_path / "eval" / "metrics_summary.csv").is_file()

    out = tmp_path / "out"
    infer = _overrides(
        {k: v for k, v in tiny.items() if k in ("model_spacing", "crop_margin_mm", "patch_size", "widths")}
    )
    command = ["--config_file", "bundle/configs/inference.json", "--bundle_root", "bundle", *data]
    _run([*command, "--output_dir", str(out), "--ckpt_dir", str(tmp_path / "models"), "--num_workers", "0", *infer])
    daily_names = sorted(p.name[: -len(".nii.gz")] for p in synth_dataset.glob("JRS*_f*_ct.nii.gz"))
    assert sorted(p.name for p in out.iterdir()) == daily_names  # every datalist item
    for name in daily_names:
        daily = nib.load(synth_dataset / f"{name}.nii.gz")
        for suffix in ("labels", "ddf", "seg"):
            image = nib.load(out / name / f"{name}_{suffix}.nii.gz")
            assert image.shape[:3] == daily.shape
            np.testing.assert_allclose(image.affine, daily.affine, atol=1e-5)
