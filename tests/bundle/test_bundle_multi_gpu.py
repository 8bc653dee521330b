"""multi_gpu_train.json under torchrun: two processes with DDP (gloo on a CPU-only machine)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

pytestmark = pytest.mark.slow  # torchrun with two processes

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_multi_gpu_train_with_torchrun(tiny_dataset: Path, tiny: dict[str, Any], tmp_path: Path) -> None:
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    assert torchrun is not None, "torchrun not found next to the Python interpreter"
    values = {
        **tiny,
        "dataset_dir": str(tiny_dataset),
        "ckpt_dir": str(tmp_path / "models"),
        "output_dir": str(tmp_path / "eval"),
        "val_lists": ["validation", "test"],  # DistributedSampler needs at least one case per rank
    }
    overrides = [x for k, v in values.items() for x in (f"--{k}", v if isinstance(v, str) else repr(v))]
    configs = "['bundle/configs/train.json','bundle/configs/multi_gpu_train.json']"
    command = [torchrun, "--standalone", "--nnodes=1", "--nproc_per_node=2", "-m", "monai.bundle", "run"]
    command += ["--config_file", configs, "--bundle_root", "bundle", *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    # checkpoints hold the plain network (no DDP / multi-scale wrapper prefixes), loadable by inference.json
    state = torch.load(tmp_path / "models" / "model.pt", map_location="cpu", weights_only=True)
    assert not any(k.startswith(("module.", "network.")) for k in state)
    final = torch.load(tmp_path / "models" / "model_final.pt", map_location="cpu", weights_only=False)
    assert not any(k.startswith(("module.", "network.")) for k in final["model"])
