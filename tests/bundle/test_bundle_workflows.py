"""train -> evaluate -> infer through MONAI's ConfigWorkflow, as the model zoo's CI runs bundles, on a phantom
dataset and on one written by ``prostate-jrs import`` from a DICOM archive."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigWorkflow

from prostate_jrs.nets import build_network

BUNDLE = Path(__file__).resolve().parents[2] / "bundle"
CONFIGS = BUNDLE / "configs"


def _workflow(config_file: str | list[str], workflow_type: str, **override: Any) -> ConfigWorkflow:
    return ConfigWorkflow(
        config_file=config_file,
        meta_file=str(CONFIGS / "metadata.json"),
        logging_file=str(CONFIGS / "logging.conf"),
        workflow_type=workflow_type,
        bundle_root=str(BUNDLE),
        **override,
    )


def _check_and_run(workflow: ConfigWorkflow) -> None:
    workflow.initialize()
    missing = workflow.check_properties()
    assert missing == [], f"missing or wrongly referenced bundle properties: {missing}"
    workflow.run()
    workflow.finalize()


@pytest.fixture(scope="module")
def trained(tiny_dataset: Path, tiny: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One epoch of train.json on the tiny dataset; returns the overrides that point at its checkpoint."""
    run = tmp_path_factory.mktemp("run")
    override = {
        **tiny,
        "dataset_dir": str(tiny_dataset),
        "ckpt_dir": str(run / "models"),
        "output_dir": str(run / "eval"),
    }
    _check_and_run(_workflow(str(CONFIGS / "train.json"), "train", **override))
    return override


def test_train_writes_checkpoints_and_logs(trained: dict[str, Any]) -> None:
    models = Path(trained["ckpt_dir"])
    assert (models / "model.pt").is_file() and (models / "model_final.pt").is_file()
    state = torch.load(models / "model.pt", map_location="cpu", weights_only=True)
    build_network("cross_stitch", widths=trained["widths"]).load_state_dict(state)  # strict: the bare network
    final = torch.load(models / "model_final.pt", map_location="cpu", weights_only=False)
    assert set(final) == {"model", "loss", "optimizer"}
    assert list(Path(trained["output_dir"]).glob("events.out.tfevents.*"))


def test_evaluate_writes_tables(trained: dict[str, Any], tmp_path: Path) -> None:
    override = {**trained, "output_dir": str(tmp_path / "eval"), "eval_lists": ["test", "validation"]}
    files = [str(CONFIGS / "train.json"), str(CONFIGS / "evaluate.json")]
    _check_and_run(_workflow(files, "eval", **override))
    out = tmp_path / "eval"
    with (out / "metrics_per_case.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert {r["path"] for r in rows} == {"reg", "seg", "final"}
    assert {r["structure"] for r in rows} == {"prostate", "seminal_vesicles", "rectum", "bladder"}
    # the bundle refines by default: the network's rows (refine=off) and the refined rows side by side
    assert {r["refine"] for r in rows} == {"off", "accurate"}
    assert len({r["case"] for r in rows}) == 2 and len(rows) == 2 * 2 * 3 * 4
    for row in rows:
        assert 0.0 <= float(row["dsc"]) <= 1.0
    seg = {r["refine"]: r["dsc"] for r in rows if r["path"] == "seg" and r["case"] == rows[0]["case"]}
    assert seg["off"] == seg["accurate"]  # refinement leaves the segmentation path alone
    with (out / "metrics_summary.csv").open() as handle:
        summary = list(csv.DictReader(handle))
    assert {"mean", "sd", "median", "n", "refine"} <= set(summary[0])
    assert any(r["path"] == "ddf" and r["metric"] == "folding_fraction" for r in summary)
    assert (out / "montage.png").stat().st_size > 1000
    with (out / "ddf_quality.csv").open() as handle:
        quality = list(csv.DictReader(handle))
    # the phantom pairs carry their true DDF: the error of the predicted one is measured in the body
    assert len(quality) == 2 * 2
    assert all(0.0 < float(r["ddf_error_mean_mm"]) <= float(r["ddf_error_p95_mm"]) for r in quality)
    error = {
        r["refine"]: sum(float(q["ddf_error_mean_mm"]) for q in quality if q["refine"] == r["refine"]) for r in quality
    }
    assert error["accurate"] < error["off"]  # refinement recovers the known deformation better than the tiny network


def test_evaluate_also_passes_train_properties(trained: dict[str, Any], tmp_path: Path) -> None:
    """The merged train+evaluate config keeps every TrainProperties id (MonaiAlgo evaluates with it)."""
    files = [str(CONFIGS / "train.json"), str(CONFIGS / "evaluate.json")]
    workflow = _workflow(files, "train", **{**trained, "output_dir": str(tmp_path)})
    workflow.initialize()
    assert workflow.check_properties() == []


def test_infer_writes_outputs_on_daily_grid(trained: dict[str, Any], tiny_dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    override = {**trained, "output_dir": str(out), "ckpt_path": str(Path(trained["ckpt_dir"]) / "model.pt")}
    override["infer_lists"] = ["test"]
    _check_and_run(_workflow(str(CONFIGS / "inference.json"), "infer", **override))
    names = [p.name for p in out.iterdir()]
    assert names == ["JRS003_f01_ct"]
    daily = nib.load(tiny_dataset / "JRS003_f01_ct.nii.gz")
    for suffix, dtype in (("labels", np.uint8), ("seg", np.uint8), ("ddf", np.float32)):
        image = nib.load(out / "JRS003_f01_ct" / f"JRS003_f01_ct_{suffix}.nii.gz")
        np.testing.assert_allclose(image.affine, daily.affine, atol=1e-5)
        assert image.shape[:3] == daily.shape and image.get_data_dtype() == dtype
    labels = np.asarray(nib.load(out / "JRS003_f01_ct" / "JRS003_f01_ct_labels.nii.gz").dataobj)
    assert set(np.unique(labels)) <= {0, 1, 2, 3, 4} and (labels > 0).any()
    refine = json.loads((out / "JRS003_f01_ct" / "JRS003_f01_ct_qa.json").read_text())["refine"]
    assert refine["mode"] == "accurate" and refine["similarity_after"] < refine["similarity_before"]


def test_infer_without_refinement(trained: dict[str, Any], tmp_path: Path) -> None:
    out = tmp_path / "out"
    override = {**trained, "output_dir": str(out), "ckpt_path": str(Path(trained["ckpt_dir"]) / "model.pt")}
    override.update({"infer_lists": ["test"], "refine#mode": "off"})
    _check_and_run(_workflow(str(CONFIGS / "inference.json"), "infer", **override))
    assert json.loads((out / "JRS003_f01_ct" / "JRS003_f01_ct_qa.json").read_text())["refine"] == {"mode": "off"}


@pytest.mark.slow
def test_train_evaluate_and_infer_on_an_imported_dataset(
    imported_archive: Path, tiny: dict[str, Any], tmp_path: Path
) -> None:
    datalist = json.loads((imported_archive / "datalist.json").read_text())
    override = {
        **tiny,
        "dataset_dir": str(imported_archive),
        "ckpt_dir": str(tmp_path / "models"),
        "output_dir": str(tmp_path / "train"),
    }
    _check_and_run(_workflow(str(CONFIGS / "train.json"), "train", **override))
    assert (tmp_path / "models" / "model.pt").is_file()  # by the validation on the imported validation list

    files = [str(CONFIGS / "train.json"), str(CONFIGS / "evaluate.json")]
    _check_and_run(_workflow(files, "eval", **{**override, "output_dir": str(tmp_path / "eval")}))
    with (tmp_path / "eval" / "metrics_per_case.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    test_cases = {Path(item["fixed_image"]).name[: -len(".nii.gz")] for item in datalist["test"]}
    assert {r["case"] for r in rows} == test_cases
    assert len(rows) == len(test_cases) * 3 * 4 * 2  # paths x structures x refine off and accurate
    assert {r["patient"] for r in rows} == {item["patient"] for item in datalist["test"]}  # pseudonyms

    # the daily scan without approved contours: the inference-only list
    out = tmp_path / "out"
    override = {**override, "output_dir": str(out), "ckpt_path": str(tmp_path / "models" / "model.pt")}
    _check_and_run(_workflow(str(CONFIGS / "inference.json"), "infer", **override, infer_lists=["inference"]))
    (item,) = datalist["inference"]
    name = Path(item["fixed_image"]).name[: -len(".nii.gz")]
    assert name in {p.name for p in out.iterdir()}
    daily = nib.load(imported_archive / item["fixed_image"])
    labels = nib.load(out / name / f"{name}_labels.nii.gz")
    np.testing.assert_allclose(labels.affine, daily.affine, atol=1e-5)
    assert labels.shape == daily.shape
