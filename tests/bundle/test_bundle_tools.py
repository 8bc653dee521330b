"""MONAI bundle tools on the bundle: offline verify_metadata, verify_net_in_out, ckpt_export to TorchScript."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from monai.bundle import ckpt_export, verify_metadata, verify_net_in_out

from prostate_jrs.labels import LABEL_NAMES
from prostate_jrs.nets import build_network

BUNDLE = Path(__file__).resolve().parents[2] / "bundle"
CONFIGS = BUNDLE / "configs"
SCHEMA = BUNDLE / "docs" / "meta_schema_20240725.json"
ZOO_SCHEMA_URL = (
    "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20240725.json"
)


def _metadata() -> dict[str, Any]:
    return json.loads((CONFIGS / "metadata.json").read_text())


def test_verify_metadata_offline_with_local_schema(tmp_path: Path) -> None:
    """verify_metadata skips the download when the schema file exists; the copy is pinned by its md5."""
    assert _metadata()["schema"] == ZOO_SCHEMA_URL
    md5 = hashlib.md5(SCHEMA.read_bytes()).hexdigest()
    verify_metadata(meta_file=str(CONFIGS / "metadata.json"), filepath=str(SCHEMA), hash_val=md5)
    broken = _metadata()
    del broken["required_packages_version"]
    (tmp_path / "metadata.json").write_text(json.dumps(broken))
    schema = tmp_path / "schema.json"
    shutil.copy(SCHEMA, schema)
    with pytest.raises(ValueError, match="required_packages_version"):
        verify_metadata(meta_file=str(tmp_path / "metadata.json"), filepath=str(schema))


def test_metadata_documents_every_channel() -> None:
    fmt = _metadata()["network_data_format"]
    image, pred = fmt["inputs"]["image"], fmt["outputs"]["pred"]
    assert image["num_channels"] == len(image["channel_def"]) == 3
    assert pred["num_channels"] == len(pred["channel_def"]) == 8
    for label, name in LABEL_NAMES.items():
        assert name in pred["channel_def"][str(3 + label)]
        assert fmt["post_processed_outputs"]["labels"]["channel_def"][str(label)] == name
    assert "not for clinical use" in _metadata()["intended_use"].lower()


@pytest.mark.parametrize("config", ["inference.json", "train.json"])
def test_verify_net_in_out(config: str) -> None:
    verify_net_in_out(
        net_id="network_def",
        meta_file=str(CONFIGS / "metadata.json"),
        config_file=str(CONFIGS / config),
        bundle_root=str(BUNDLE),
        device="cpu",
        widths=[2, 4, 8],
        **{"_meta_#network_data_format#inputs#image#spatial_shape": [48, 48, 48]},
    )


def test_ckpt_export_torchscript_matches_eager(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = build_network("cross_stitch", widths=[4, 8, 16]).eval()
    ckpt = tmp_path / "model.pt"
    torch.save(net.state_dict(), ckpt)
    ts_file = tmp_path / "model.ts"
    ckpt_export(
        net_id="network_def",
        filepath=str(ts_file),
        ckpt_file=str(ckpt),
        meta_file=str(CONFIGS / "metadata.json"),
        config_file=str(CONFIGS / "inference.json"),
        bundle_root=str(BUNDLE),
        widths=[4, 8, 16],
    )
    scripted = torch.jit.load(str(ts_file), map_location="cpu").eval()
    x = torch.rand(1, 3, 56, 56, 56)
    x[:, 2] = torch.randint(0, 5, (56, 56, 56)).float()
    with torch.no_grad():
        eager, exported = net(x), scripted(x)
    assert exported.shape == (1, 8, 16, 16, 16)
    torch.testing.assert_close(exported, eager, rtol=1e-4, atol=1e-5)
    # the bundle's metadata and inference config travel inside the TorchScript file
    extra = {"metadata.json": "", "inference.json": ""}
    torch.jit.load(str(ts_file), _extra_files=extra)
    assert json.loads(extra["metadata.json"])["version"] == _metadata()["version"]
