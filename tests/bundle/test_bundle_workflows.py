"""train -> evaluate -> infer through MONAI's ConfigWorkflow, as the model zoo's CI runs bundles."""

from __future__ import annotations

import csv
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
    assert len({r["case"] for r in rows}) == 2 and len(rows) == 2 * 3 * 4
    for row in rows:
        assert 0.0 <= float(row["dsc"]) <= 1.0
    with (out / "metrics_summary.csv").open() as handle:
        summary = list(csv.DictReader(handle))
    assert {"mean", "sd", "median", "n"} <= set(summary[0])
    assert any(r["path"] == "ddf" and r["metric"] == "folding_fraction" for r in summary)
    assert (out / "montage.png").stat().st_size > 1000
    with (out / "ddf_quality.csv").open() as handle:
        quality = list(csv.DictReader(handle))
    # the phantom pairs carry their true DDF: the error of the predicted one is measured in the body
    assert len(quality) == 2
    assert all(0.0 < float(r["ddf_error_mean_mm"]) <= float(r["ddf_error_p95_mm"]) for r in quality)


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
