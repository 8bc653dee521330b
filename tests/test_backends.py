"""Network backends: ONNX export, OpenVINO and ONNX Runtime against torch, the engine cache, fitted tiles."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from prostate_jrs import backends
from prostate_jrs.backends import (
    ONNX_EXPORT_KWARGS,
    TOLERANCE,
    EngineNetwork,
    export_onnx,
    inference_network,
    onnx_file_for,
    resolve_backend,
    weights_digest,
)
from prostate_jrs.inferers import ValidPatchInferer
from prostate_jrs.nets import build_network
from prostate_jrs.tiny_bundle import write_tiny_bundle

REPO = Path(__file__).resolve().parents[1]


def _installed(module: str) -> bool:
    """Whether ``module`` is installed, without importing it: importing OpenVINO while pytest collects (its global
    capture active) left that capture's stderr file closed for the in-process app runs of ``test_app_fuzz.py``, which
    failed the rest of the session."""
    return importlib.util.find_spec(module) is not None and importlib.util.find_spec("onnx") is not None


ENGINES = [
    pytest.param("openvino", marks=pytest.mark.skipif(not _installed("openvino"), reason="no OpenVINO")),
    pytest.param("onnxruntime", marks=pytest.mark.skipif(not _installed("onnxruntime"), reason="no ORT")),
]


@pytest.fixture(scope="module")
def network() -> torch.nn.Module:
    torch.manual_seed(0)
    net = build_network("cross_stitch", [4, 8, 16]).eval()
    for module in net.modules():  # non-trivial batch-norm statistics, so that their export is checked too
        if isinstance(module, torch.nn.BatchNorm3d):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 1.5)
    return net


@pytest.fixture(scope="module")
def exported(network: torch.nn.Module, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_onnx(network, tmp_path_factory.mktemp("onnx") / "model.onnx")


def _tiles(shape: tuple[int, ...], seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    tiles = torch.rand(*shape, generator=generator) * 2 - 1
    tiles[:, 2] = torch.randint(0, 5, (shape[0], *shape[2:]), generator=generator).float()
    return tiles


def test_resolve_backend() -> None:
    assert resolve_backend("torch", "cpu") == "torch"
    assert resolve_backend("auto", "cuda:0") == "torch"  # the GPU path stays torch
    expected = "openvino" if _installed("openvino") else "onnxruntime"
    assert resolve_backend("auto", "cpu") in (expected, "torch")
    with pytest.raises(ValueError, match="unknown network backend"):
        resolve_backend("tensorrt", "cpu")
    with pytest.raises(ValueError, match="runs on the CPU"):
        resolve_backend("openvino", "cuda")


@pytest.mark.parametrize("engine", ENGINES)
def test_engine_equals_torch_within_tolerance(engine: str, network: torch.nn.Module, exported: Path) -> None:
    run = EngineNetwork(exported, engine)
    for shape in [(2, 3, 56, 60, 64), (1, 3, 48, 52, 56)]:  # one graph, any batch and tile shape
        tiles = _tiles(shape)
        with torch.inference_mode():
            expected = network(tiles)
        out = run(tiles)
        assert out.shape == expected.shape and out.dtype == torch.float32
        assert float((out - expected).abs().max()) <= TOLERANCE


@pytest.mark.parametrize("engine", ENGINES)
def test_stitched_volume_equals_torch(engine: str, network: torch.nn.Module, tmp_path: Path) -> None:
    volume = _tiles((1, 3, 100, 84, 92), seed=2)
    kwargs = {"includes_context": True, "max_tile_voxels": 300_000, "onnx_file": str(tmp_path / "model.onnx")}
    with torch.inference_mode():
        expected = ValidPatchInferer(56, 16, 2, backend="torch", **kwargs)(volume, network)
        out = ValidPatchInferer(56, 16, 2, backend=engine, **kwargs)(volume, network)
    assert out.shape == expected.shape == (1, 8, 60, 44, 52)
    assert float((out - expected).abs().max()) <= TOLERANCE


def test_fitted_tiles_cover_the_volume_within_the_budget() -> None:
    inferer = ValidPatchInferer(112, 72, includes_context=True, max_tile_voxels=2_000_000)
    counts, output = inferer.tile_layout((84, 104, 130))
    assert counts == (1, 1, 2) and output == (84, 104, 68)  # 3.9 M voxels computed instead of 8 x 112^3 = 11.2 M
    for spatial in [(84, 104, 130), (8, 9, 10), (150, 151, 152), (40, 200, 41)]:
        counts, output = inferer.tile_layout(spatial)
        assert all(o % 4 == 0 for o in output)
        assert all(n * o >= s > (n - 1) * o for n, o, s in zip(counts, output, spatial, strict=True))
        assert (output[0] + 40) * (output[1] + 40) * (output[2] + 40) <= 2_000_000
    with pytest.raises(ValueError, match="smallest tile"):
        ValidPatchInferer(112, 72, max_tile_voxels=1000).tile_layout((84, 104, 130))
    assert ValidPatchInferer(112, 72).tile_layout((84, 104, 130)) == ((2, 2, 2), (72, 72, 72))


def test_one_fitted_tile_is_the_network_on_the_whole_crop(network: torch.nn.Module) -> None:
    # tiles start at multiples of their output (and of 4): a volume in one tile is the network on the volume
    volume = _tiles((1, 3, 88, 92, 96), seed=3)
    with torch.inference_mode():
        out = ValidPatchInferer(56, 16, includes_context=True, max_tile_voxels=10**6)(volume, network)
        expected = network(volume)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_exports_are_made_once_per_weights(network: torch.nn.Module, tmp_path: Path, monkeypatch) -> None:
    pytest.importorskip("onnxruntime")
    monkeypatch.setenv("PROSTATE_JRS_CACHE", str(tmp_path / "cache"))
    target = tmp_path / "bundle" / "model.onnx"
    first = onnx_file_for(network, "onnxruntime", target)
    assert first == target and backends._recorded_digest(target) == weights_digest(network)
    stamp = target.stat().st_mtime_ns
    assert onnx_file_for(network, "onnxruntime", target) == target and target.stat().st_mtime_ns == stamp
    # other weights: the stale file is replaced
    changed = build_network("cross_stitch", [4, 8, 16]).eval()
    onnx_file_for(changed, "onnxruntime", target)
    assert backends._recorded_digest(target) == weights_digest(changed) != weights_digest(network)
    # a place that cannot be written (here: below a file): the export goes to the cache folder
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("")
    cached = onnx_file_for(network, "onnxruntime", blocked / "model.onnx")
    assert cached.parent == tmp_path / "cache" / "onnx"
    assert backends._recorded_digest(cached) == weights_digest(network)


def test_engines_are_built_once_per_network_and_weights(network: torch.nn.Module, tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    first = inference_network(network, "onnxruntime", "cpu", tmp_path / "model.onnx")
    assert isinstance(first, EngineNetwork)
    assert inference_network(network, "onnxruntime", "cpu", tmp_path / "model.onnx") is first
    assert inference_network(network, "torch", "cpu") is network


def test_monai_bundle_onnx_export_makes_a_file_the_backend_takes(tmp_path: Path) -> None:
    """``python -m monai.bundle onnx_export`` with the bundle's args file; the file (without the weights' digest) is
    checked against torch once and then used."""
    pytest.importorskip("onnxruntime")
    bundle = write_tiny_bundle(REPO / "bundle", tmp_path / "bundle")
    args = json.loads((REPO / "bundle" / "configs" / "onnx_export.json").read_text())
    assert args["converter_kwargs"] == {k: v for k, v in ONNX_EXPORT_KWARGS.items() if k != "use_trace"}
    assert args["use_trace"] is ONNX_EXPORT_KWARGS["use_trace"]  # an onnx_export argument of its own
    target = bundle / "models" / "model.onnx"
    command = [
        sys.executable, "-m", "monai.bundle", "onnx_export",
        "--args_file", str(REPO / "bundle" / "configs" / "onnx_export.json"),
        "--config_file", str(bundle / "configs" / "inference.json"),
        "--ckpt_file", str(bundle / "models" / "model.pt"),
        "--filepath", str(target),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert backends._recorded_digest(target) is None
    from prostate_jrs.pipeline import load_bundle

    network, settings = load_bundle(bundle)
    assert settings.backend == "auto" and settings.onnx_file == str(target)
    assert onnx_file_for(network, "onnxruntime", target) == target  # adopted: it computes what the weights compute
    assert backends._recorded_digest(target) == weights_digest(network)
