"""Trainer/evaluator glue: batch preparation, multi-scale forward, loss bookkeeping with DWA, and the writers."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from ignite.engine import Engine
from monai.data import MetaTensor

from prostate_jrs.engines import (
    EvaluationWriter,
    InferenceWriter,
    JRSPrepareBatch,
    JRSTrainingLoss,
    LossTermsHandler,
    MultiScaleInferer,
    MultiScaleNetwork,
    restore_item,
)
from prostate_jrs.evaluation import DEFAULT_CONTOUR_SOURCE, DailyGridResult
from prostate_jrs.inferers import RefiningInferer
from prostate_jrs.losses import JRSLoss
from prostate_jrs.nets import build_network
from prostate_jrs.refine import RefineReport

PATCH = 48  # the smallest input the valid-convolution U-Net takes (-> 8^3 output)


def test_prepare_batch_splits_targets() -> None:
    image = torch.rand(2, 3, 4, 5, 6)
    label = torch.randint(0, 5, (2, 1, 4, 5, 6)).float()
    inputs, targets = JRSPrepareBatch()({"image": image, "fixed_label": label}, torch.device("cpu"))
    assert torch.equal(inputs, image)
    assert set(targets) == {"fixed_image", "moving_image", "moving_label", "fixed_label"}
    assert torch.equal(targets["moving_label"], image[:, 2:3]) and torch.equal(targets["fixed_label"], label)
    # an inference datalist may name a daily label file that was never loaded
    _, targets = JRSPrepareBatch()({"image": image, "fixed_label": ["a.nii.gz", "b.nii.gz"]})
    assert "fixed_label" not in targets
    with pytest.raises(KeyError, match="image"):
        JRSPrepareBatch()({"fixed_label": label})


def test_multiscale_inferer_plain_and_wrapped() -> None:
    net = build_network("cross_stitch", widths=[2, 4, 8]).eval()
    x = torch.rand(1, 3, PATCH, PATCH, PATCH)
    with torch.no_grad():
        direct = MultiScaleInferer()(x, net)
        wrapped = MultiScaleInferer()(x, MultiScaleNetwork(net))
    assert [tuple(t.shape[2:]) for t in direct["ddf"]] == [(8, 8, 8), (6, 6, 6), (5, 5, 5)]
    assert torch.allclose(direct["logits"][0], wrapped["logits"][0])
    with pytest.raises(TypeError, match="multi-scale dict"):
        MultiScaleInferer()(x, torch.nn.Identity())


def _targets(batch: int = 1) -> dict[str, torch.Tensor]:
    labels = torch.zeros(batch, 1, PATCH, PATCH, PATCH)
    labels[:, :, 16:32, 16:32, 16:32] = 1
    labels[:, :, 20:28, 20:28, 30:40] = 4
    image = torch.rand(batch, 1, PATCH, PATCH, PATCH)
    return {"fixed_image": image, "moving_image": image.roll(1, 2), "moving_label": labels, "fixed_label": labels}


def test_training_loss_and_terms_handler_with_dwa() -> None:
    torch.manual_seed(0)
    net = build_network("dense", widths=[2, 4, 8])
    loss = JRSTrainingLoss(JRSLoss("dense", weighting="dwa"))
    targets = _targets()
    inputs = torch.cat([targets["fixed_image"], targets["moving_image"], targets["moving_label"]], dim=1)
    optimizer = torch.optim.Adam(list(net.parameters()) + list(loss.parameters()), lr=1e-3)

    def step(engine: Engine, _batch: object) -> float:
        optimizer.zero_grad()
        value = loss(MultiScaleInferer()(inputs, net), targets)
        value.backward()
        optimizer.step()
        return float(value.detach())

    engine = Engine(step)
    LossTermsHandler(loss).attach(engine)
    engine.run([0, 1], max_epochs=3)
    metrics = engine.state.metrics
    for term in ("seg", "reg", "seg_reg", "ncc", "bending", "loss", "weight_seg"):
        assert np.isfinite(metrics[f"train_{term}"]), term
    # DWA: equal weights until two epochs are complete, then softmax of loss ratios summing to K
    assert int(loss.loss.dwa_epochs) == 3
    weights = [metrics[f"train_next_weight_{t}"] for t in loss.loss.terms]
    assert sum(weights) == pytest.approx(3.0) and weights != [1.0, 1.0, 1.0]
    assert set(loss.last_terms) >= {"loss", "seg", "reg", "seg_reg"}


def _daily_files(root: Path) -> tuple[Path, Path, np.ndarray]:
    affine = np.diag([-2.0, 2.0, 3.0, 1.0])
    affine[:3, 3] = [30.0, -20.0, 10.0]
    labels = np.zeros((16, 14, 10), dtype=np.uint8)
    labels[4:10, 4:9, 3:7] = 1
    labels[9:13, 3:8, 2:8] = 4
    daily, planning = root / "p0_f1.nii.gz", root / "p0_plan_label.nii.gz"
    nib.save(nib.Nifti1Image(np.full(labels.shape, 30.0, np.float32), affine), daily)
    nib.save(nib.Nifti1Image(labels, affine), planning)
    return daily, planning, affine


def _items(daily: Path, planning: Path, affine: np.ndarray, with_reference: bool = False):
    """One decollated (batch item, output item) pair: model grid = daily grid at identity, 1 voxel offset."""
    model_affine = affine.copy()
    model_affine[:3, 3] += affine[:3, :3] @ np.array([1.0, 1.0, 0.0])  # the crop removed one voxel
    fixed = MetaTensor(
        torch.zeros(1, 14, 12, 10),
        affine=torch.as_tensor(model_affine),
        meta={"filename_or_obj": str(daily), "original_affine": affine, "spatial_shape": np.array([16, 14, 10])},
    )
    moving_label = MetaTensor(torch.zeros(1, 14, 12, 10), meta={"filename_or_obj": str(planning)})
    image = MetaTensor(torch.zeros(3, 14, 12, 10), affine=torch.as_tensor(model_affine))
    batch = {"image": image, "fixed_image": fixed, "moving_label": moving_label, "patient": "p0"}
    if with_reference:
        batch["fixed_label"] = MetaTensor(torch.zeros(1, 14, 12, 10), meta={"filename_or_obj": str(planning)})
    pred = torch.zeros(8, 14, 12, 10)
    pred[3] = 1.0  # segmentation: background everywhere
    return batch, {"pred": pred}


def _engine(batch: dict, output: dict) -> Engine:
    """An engine whose iteration leaves a decollated evaluator state (lists of items) behind."""

    def process(engine: Engine, _data: object) -> list[dict]:
        engine.state.batch = [batch]
        return [output]

    return Engine(process)


def test_restore_item_and_inference_writer(tmp_path: Path) -> None:
    daily, planning, affine = _daily_files(tmp_path)
    batch, output = _items(daily, planning, affine)
    name, result = restore_item(batch, output, DEFAULT_CONTOUR_SOURCE)
    assert name == "p0_f1" and result.labels.shape == (16, 14, 10)
    planning_labels = np.asarray(nib.load(planning).dataobj)
    assert np.array_equal(result.reg, planning_labels)  # zero DDF on the same world grid
    assert result.fov.sum() == 14 * 12 * 10

    engine = _engine(batch, output)
    InferenceWriter(tmp_path / "out").attach(engine)
    engine.run([0], max_epochs=1)
    folder = tmp_path / "out" / "p0_f1"
    files = sorted(p.name for p in folder.iterdir())
    assert files == ["p0_f1_ddf.nii.gz", "p0_f1_labels.nii.gz", "p0_f1_qa.json", "p0_f1_seg.nii.gz"]
    qa = json.loads((folder / "p0_f1_qa.json").read_text())
    # reg = planning contours, seg = background: the paths disagree completely on the prostate
    assert qa["structures"]["prostate"]["dsc"] == 0.0 and qa["structures"]["prostate"]["msd_mm"] is None
    assert qa["structures"]["prostate"]["source"] == "reg" and qa["ddf"]["folding_fraction"] == 0.0
    assert (
        "prostate: registration and segmentation paths disagree (DSC 0.00 < 0.70); review this structure" in qa["flags"]
    )
    labels = nib.load(folder / "p0_f1_labels.nii.gz")
    ddf = nib.load(folder / "p0_f1_ddf.nii.gz")
    np.testing.assert_allclose(labels.affine, affine)
    assert labels.get_data_dtype() == np.uint8 and ddf.shape == (16, 14, 10, 3)
    # prostate from reg (planning), bladder from seg (background) -> only the prostate remains
    assert set(np.unique(np.asarray(labels.dataobj))) == {0, 1}
    assert not list((tmp_path / "out").glob(".*"))  # no partial folder left behind


def test_inference_writer_refuses_limits_that_would_flag_everything_or_nothing(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="qa_disagreement_hd95_mm must be a positive distance"):
        InferenceWriter(tmp_path / "out", disagreement_hd95_mm=float("nan"))
    with pytest.raises(ValueError, match="qa_disagreement_dsc must be a DSC"):
        InferenceWriter(tmp_path / "out", disagreement_dsc=-0.1)


def test_inference_writer_replaces_a_previous_result(tmp_path: Path) -> None:
    daily, _, affine = _daily_files(tmp_path)
    zeros = np.zeros((16, 14, 10), dtype=np.uint8)
    result = DailyGridResult(
        ddf=np.zeros((3, 16, 14, 10), np.float32), reg=zeros, seg=zeros, labels=zeros, affine=affine, fov=zeros > 0
    )
    writer = InferenceWriter(tmp_path / "out", write_qa=False)
    (tmp_path / "out" / "p0_f1").mkdir(parents=True)
    (tmp_path / "out" / "p0_f1" / "stale.txt").write_text("old")
    folder = writer.write("p0_f1", result, daily)
    assert sorted(p.name for p in folder.iterdir())[0] == "p0_f1_ddf.nii.gz"
    assert not (folder / "stale.txt").exists()


def test_evaluation_writer_tables_and_montage(tmp_path: Path) -> None:
    daily, planning, affine = _daily_files(tmp_path)
    batch, output = _items(daily, planning, affine, with_reference=True)
    engine = _engine(batch, output)
    EvaluationWriter(tmp_path / "eval", num_montage_cases=1).attach(engine)
    engine.run([0], max_epochs=1)
    names = sorted(p.name for p in (tmp_path / "eval").iterdir())
    assert names == ["ddf_quality.csv", "metrics_per_case.csv", "metrics_summary.csv", "montage.png"]
    per_case = (tmp_path / "eval" / "metrics_per_case.csv").read_text().splitlines()
    assert per_case[0].startswith("case,patient,refine,path,structure,dsc,msd_mm,hd95_mm")
    assert len(per_case) == 1 + 3 * 4
    assert any(line.startswith("p0_f1,p0,off,reg,prostate,1,0,0") for line in per_case)
    summary = (tmp_path / "eval" / "metrics_summary.csv").read_text()
    assert "off,final,bladder,dsc,1,0," in summary and "off,ddf,all,folding_fraction" in summary
    assert engine.state.metrics["final_dsc_prostate"] == pytest.approx(1.0)


def test_evaluation_writer_scores_network_and_refined_side_by_side(tmp_path: Path) -> None:
    """With a refining inferer the tables hold the network's rows (refine=off) and the refined ones (its mode)."""
    daily, planning, affine = _daily_files(tmp_path)
    batch, output = _items(daily, planning, affine, with_reference=True)
    refiner = RefiningInferer(lambda inputs, network: inputs, mode="fast")
    network_pred = output["pred"].clone()
    network_pred[0] = 2.0  # the network's DDF: two voxels off; the refined one (output) is the identity
    refiner.network_pred = network_pred[None]
    engine = _engine(batch, output)
    EvaluationWriter(tmp_path / "eval", num_montage_cases=1, refiner=refiner).attach(engine)
    engine.run([0], max_epochs=1)
    with (tmp_path / "eval" / "metrics_per_case.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert {r["refine"] for r in rows} == {"off", "fast"} and len(rows) == 2 * 3 * 4
    dsc = {r["refine"]: float(r["dsc"]) for r in rows if r["path"] == "reg" and r["structure"] == "prostate"}
    assert dsc["fast"] == pytest.approx(1.0) and dsc["off"] < 0.9
    assert engine.state.metrics["final_dsc_prostate"] == pytest.approx(1.0)  # the deployed (refined) rows


def test_inference_writer_records_the_refinement(tmp_path: Path) -> None:
    daily, planning, affine = _daily_files(tmp_path)
    batch, output = _items(daily, planning, affine)
    refiner = RefiningInferer(lambda inputs, network: inputs, mode="fast")
    refiner.reports = [RefineReport(refiner.settings, 0.5, 0.25, [3, 2], 1.5)]  # type: ignore[arg-type]
    engine = _engine(batch, output)
    InferenceWriter(tmp_path / "out", refiner=refiner).attach(engine)
    engine.run([0], max_epochs=1)
    qa = json.loads((tmp_path / "out" / "p0_f1" / "p0_f1_qa.json").read_text())
    assert qa["refine"]["mode"] == "fast" and qa["refine"]["similarity_after"] == 0.25
    assert qa["refine"]["iterations"] == [3, 2]
