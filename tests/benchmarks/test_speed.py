"""Smoke test of benchmarks/speed.py in its tiny mode: it runs end to end and writes a complete report; its CUDA rows
(amp, GPU memory) are checked through the report functions, as far as a CPU can.

The script runs in a subprocess, as users run it: it forks its measurements, which is only safe from a process that
has run no torch operation yet, and a pytest session may have run some. No timing thresholds (docs/ARCHITECTURE.md).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import SimpleITK as sitk
from script_loader import load_script

from prostate_jrs.geometry import affine_transform, array_from_image, resample_with_ddf

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "speed.py"

pytest.importorskip("itk")


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("speed")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # two fields of view and the variants that bracket the others: today's torch path and the shipped default
    arguments = ["--tiny", "--fov-scales", "0.5", "1", "--variants", "torch-eager", "default", "--out", str(out)]
    result = subprocess.run(
        [sys.executable, str(SCRIPT), *arguments],
        capture_output=True,
        text=True,
        cwd=out,
        env=env,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (out / "speed.md").read_text() in result.stdout  # the table printed is the table written
    return out


@pytest.mark.slow  # the tiny run: about a minute and a half on two idle cores, minutes on a busy machine
def test_writes_table_json_and_plot(report: Path) -> None:
    stages = json.loads((report / "speed.json").read_text())["stages"]
    assert {
        "load",
        "rigid",
        "preprocess",
        "network",
        "refine",
        "restore",
        "qa",
        "rtstruct",
        "seg",
        "registration",
    } <= set(stages)
    table = (report / "speed.md").read_text()
    header = next(line for line in table.splitlines() if line.startswith("| FOV | daily CT"))
    for title in stages.values():
        assert f"| {title} |" in header
    for column in ("backend", "total s", "peak MiB", "refine it/budget", "x network", "elastix reg s", "x fraction"):
        assert f"| {column} |" in header
    rows = [line.split(" | ") for line in table.splitlines() if line.startswith("| ") and "| cpu |" in line]
    assert [(row[0].lstrip("| "), row[3]) for row in rows] == [
        ("0.5", "torch-eager"), ("0.5", "default"), ("1", "torch-eager"), ("1", "default")
    ]  # fmt: skip
    assert all("error" not in "|".join(row) for row in rows)
    assert "1-min load average" in table.splitlines()[0]
    assert (report / "speed_scaling.png").stat().st_size > 1000


@pytest.mark.slow
def test_json_numbers_are_positive(report: Path) -> None:
    document = json.loads((report / "speed.json").read_text())
    assert document["tiny"] is True and document["devices"][0] == "cpu"  # plus cuda where there is a GPU
    assert document["hardware"]["cpu_model"] and document["hardware"]["logical_cores"] >= 1
    assert document["versions"]["torch"] and document["versions"]["itk-elastix"]
    assert document["export"]["cpu"]["backend"] in ("openvino", "onnxruntime", "torch")
    voxels = [row["study"]["daily_voxels"] for row in document["rows"]]
    assert voxels == sorted(voxels) and voxels[0] > 0
    for row in document["rows"]:
        fraction, elastix = row["fraction"], row["elastix"]
        assert set(fraction["stages_s"]) >= set(document["stages"])
        assert all(seconds >= 0 for seconds in fraction["stages_s"].values())
        assert fraction["total_s"] > 0 and fraction["stages_s"]["network"] > 0
        assert fraction["total_s"] >= sum(fraction["stages_s"].values()) - 0.05  # stages lie inside the total
        assert fraction["peak_rss_growth_mib"] > 0 and fraction["peak_rss_mib"] >= fraction["peak_rss_growth_mib"]
        assert all(size > 0 for size in fraction["output_bytes"].values()) and len(fraction["output_bytes"]) == 5
        assert all(load >= 0 for run in fraction["runs"] for load in run["load_average"])
        assert elastix["stages_s"]["register"] > 0 and elastix["total_s"] > 0 and elastix["crop_voxels"] > 0
        assert elastix["warped_label_voxels"] > 0  # the planning contours came through the warp
        assert row["ratio_registration"] > 0 and row["ratio_fraction"] > 0 and row["elastix_fraction_s"] > 0
        assert row["ratio_network"] > 0
        if row["variant"] == "torch-eager":
            assert fraction["backend"] == "torch" and fraction["refine"]["mode"] == "off"
            assert fraction["settings"]["max_tile_voxels"] is None and row["ratio_network"] == 1.0
        else:  # the shipped bundle: its backend, fitted tiles and its refinement with its iteration budget
            assert fraction["backend"] == document["export"]["cpu"]["backend"]
            assert fraction["settings"]["max_tile_voxels"] > 0
            assert fraction["refine"]["mode"] != "off" and fraction["refine"]["budget"] > 0
            assert fraction["stages_s"]["refine"] > 0


def test_cuda_rows_are_reported(speed: ModuleType) -> None:
    """The GPU rows, as far as a CPU can check them: the amp variant only on CUDA, GPU memory in the table."""
    assert "amp" in speed._variants("cuda", None) and "amp" not in speed._variants("cpu", None)
    assert speed._variants("cpu", ["amp", "default"]) == ["default"]
    assert speed.VARIANTS["amp"]["amp"] is True
    study = {"scale": 1.0, "daily_size": [8, 8, 8], "daily_voxels": 512, "planning_size": [8, 8, 8], "reused": True}
    stages = {key: 1.0 for key, _ in speed.STAGES}
    grid = {"size": [4, 4, 4]}

    def fraction(network: float, gpu: float) -> dict:
        return {
            "stages_s": {**stages, "network": network}, "total_s": 20.0, "peak_rss_growth_mib": 100.0,
            "gpu_peak_mib": gpu, "backend": "torch", "refine": {"mode": "off"}, "model_grid": grid, "runs": [],
        }  # fmt: skip

    fractions = {"cuda": {"torch-eager": [fraction(4.0, 500.0)], "amp": [fraction(1.0, 250.0)]}}
    elastix = [{"stages_s": {"register": 30.0, "prep": 0.1, "warp": 0.2}, "total_s": 30.3, "crop_size": [4, 4, 4],
                "crop_voxels": 64, "peak_rss_growth_mib": 10.0}]  # fmt: skip
    rows = speed.build_rows([study], fractions, elastix)
    amp = next(row for row in rows if row["variant"] == "amp")
    assert amp["ratio_network"] == 4.0 and amp["elastix_fraction_s"] == pytest.approx(20.0 - 4.0 + 30.3)
    table = speed.markdown(rows, "header")
    assert "| cuda | amp | torch |" in table and "(GPU 250)" in table

    # --no-elastix (a GPU machine without itk-elastix): no ratios, '-' in its cells, and not a failure
    skipped = speed.build_rows([study], fractions, [dict(speed.NOT_MEASURED)])
    assert all("ratio_fraction" not in row and "ratio_network" in row for row in skipped)
    assert not speed._failed(skipped[0]["elastix"]) and speed._failed({"error": "boom"})
    assert "error" not in speed.markdown(skipped, "header")


def _load_script() -> ModuleType:
    return load_script(SCRIPT, "benchmark_speed")


def _rotation(degrees: tuple[float, float, float]) -> np.ndarray:
    rx, ry, rz = np.radians(degrees)
    x = np.array([[1, 0, 0], [0, np.cos(rx), -np.sin(rx)], [0, np.sin(rx), np.cos(rx)]])
    y = np.array([[np.cos(ry), 0, np.sin(ry)], [0, 1, 0], [-np.sin(ry), 0, np.cos(ry)]])
    z = np.array([[np.cos(rz), -np.sin(rz), 0], [np.sin(rz), np.cos(rz), 0], [0, 0, 1]])
    return z @ y @ x


@pytest.fixture(scope="module")
def speed() -> ModuleType:
    return _load_script()


def _daily() -> sitk.Image:
    daily = sitk.Image(30, 26, 18, sitk.sitkFloat32)
    daily.SetSpacing((2.0, 2.0, 3.0))
    daily.SetOrigin((32.0, 28.0, -24.0))
    daily.SetDirection((-1, 0, 0, 0, -1, 0, 0, 0, 1))
    return daily


def test_planning_images_are_placed_in_the_daily_frame_as_the_pipeline_resamples_them(speed: ModuleType) -> None:
    # a linear ramp on a planning grid: linear interpolation reproduces it exactly inside the grid
    ramp = np.add.outer(np.add.outer(np.arange(28.0), 2 * np.arange(24.0)), 3 * np.arange(20.0)) + 1.0
    planning = sitk.GetImageFromArray(ramp.T.astype(np.float32))  # (K, J, I) -> 28 x 24 x 20
    planning.SetSpacing((2.0, 2.5, 3.0))
    planning.SetOrigin((-30.0, -25.0, -20.0))
    rigid = np.eye(4)
    rigid[:3, :3], rigid[:3, 3] = _rotation((3.0, -2.0, 4.0)), (4.0, -3.0, 6.0)
    daily = _daily()
    # the planning image placed in the daily frame, sampled on the daily grid without a field, is the image resampled
    # through the rigid transform (what the pipeline feeds the network)
    placed = resample_with_ddf(speed.in_daily_frame(planning, rigid), daily, order=1)
    resampled = array_from_image(sitk.Resample(planning, daily, affine_transform(rigid), sitk.sitkLinear, 0.0))
    inside = (placed > 0) & (resampled > 0)
    assert inside.mean() > 0.3
    np.testing.assert_allclose(placed[inside], resampled[inside], rtol=1e-4)


def test_the_crop_holds_the_daily_voxels_in_the_model_grids_box(speed: ModuleType) -> None:
    daily = _daily()
    grid = sitk.Image(10, 8, 6, sitk.sitkUInt8)
    grid.SetSpacing((3.0, 3.0, 3.0))
    grid.SetDirection((-1, 0, 0, 0, -1, 0, 0, 0, 1))
    grid.SetOrigin((10.0, 5.0, -6.0))
    crop = speed.crop_to_grid(daily, grid)
    assert crop.GetSpacing() == daily.GetSpacing() and crop.GetDirection() == daily.GetDirection()
    centres = np.array(
        [crop.TransformIndexToPhysicalPoint((i, j, k)) for i in (0, crop.GetSize()[0] - 1)
         for j in (0, crop.GetSize()[1] - 1) for k in (0, crop.GetSize()[2] - 1)]
    )  # fmt: skip
    box = np.array([grid.TransformContinuousIndexToPhysicalPoint(c) for c in [(-0.5,) * 3, (9.5, 7.5, 5.5)]])
    assert np.all(centres >= box.min(axis=0) - 1e-6) and np.all(centres <= box.max(axis=0) + 1e-6)
    # one more voxel on any side would leave the box
    assert np.all(
        np.abs(centres.max(axis=0) - centres.min(axis=0)) > np.ptp(box, axis=0) - 2 * np.asarray(daily.GetSpacing())
    )
