"""Pipeline on tiny phantom volumes: geometry on the daily grid, rigid offset, DDF convention, QA, refusals."""

from __future__ import annotations

import importlib.util
import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from torch import nn

from prostate_jrs.dicom.ct_reader import METADATA_KEYS
from prostate_jrs.geometry import array_from_image
from prostate_jrs.nets import build_network
from prostate_jrs.phantom import Patient, PhantomConfig, generate_patient
from prostate_jrs.pipeline import (
    BundleError,
    PipelineError,
    PipelineSettings,
    RigidAlignment,
    load_bundle,
    run_pipeline,
)
from prostate_jrs.refine import refine_settings
from prostate_jrs.trust import record_model_hash

BORDER = 20  # valid-convolution border of the JRS networks: 56^3 -> 16^3
TINY = PipelineSettings(model_spacing=4.0, crop_margin_mm=16.0, patch_size=56, output_size=16, tile_batch_size=8)
OFFSET = np.array([12.0, -8.0, 40.0])  # daily frame = planning frame + OFFSET (a couch / frame-of-reference shift)


class EchoNet(nn.Module):
    """A stand-in network: constant DDF (model voxels) and logits that echo the planning label channel."""

    def __init__(self, ddf: tuple[float, float, float] = (0.0, 0.0, 0.0)) -> None:
        super().__init__()
        self.ddf = torch.tensor(ddf, dtype=torch.float32)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        labels = image[:, 2, BORDER:-BORDER, BORDER:-BORDER, BORDER:-BORDER].round().long()
        logits = torch.nn.functional.one_hot(labels, 5).permute(0, 4, 1, 2, 3).float() * 10.0
        ddf = self.ddf[None, :, None, None, None].expand(logits.shape[0], 3, *logits.shape[2:])
        return torch.cat([ddf, logits], dim=1)


@pytest.fixture(scope="module")
def patient() -> Patient:
    return generate_patient(seed=0, n_fractions=1, config=PhantomConfig.tiny())


def _shifted(image: sitk.Image, offset: np.ndarray) -> sitk.Image:
    """The same voxels in another frame of reference: world coordinates moved by ``offset``."""
    moved = sitk.Image(image)
    moved.SetOrigin((np.asarray(image.GetOrigin()) + offset).tolist())
    return moved


def _translation(offset: np.ndarray) -> np.ndarray:
    matrix = np.eye(4)
    matrix[:3, 3] = offset
    return matrix


def _same_geometry(a: sitk.Image, b: sitk.Image) -> bool:
    return (
        a.GetSize() == b.GetSize()
        and np.allclose(a.GetOrigin(), b.GetOrigin())
        and np.allclose(a.GetSpacing(), b.GetSpacing())
        and np.allclose(a.GetDirection(), b.GetDirection())
    )


def test_rigid_offset_between_frames_is_removed(patient: Patient) -> None:
    planning = patient.planning
    daily = _shifted(planning.image, OFFSET)
    result = run_pipeline(planning.image, planning.labels, daily, EchoNet(), TINY)

    # align_on_bone finds the daily -> planning map: the inverse of the frame shift
    np.testing.assert_allclose(result.rigid.daily_to_planning[:3, :3], np.eye(3), atol=1e-2)
    np.testing.assert_allclose(result.rigid.daily_to_planning[:3, 3], -OFFSET, atol=1.0)
    # with a zero DDF the registration path is the planning contours, voxel for voxel (same voxels, shifted frame)
    reg, planned = array_from_image(result.reg), array_from_image(planning.labels)
    assert np.mean(reg == planned) > 0.995
    assert result.qa["rigid"]["method"] == "bone"
    assert result.qa["rigid"]["translation_mm"] == pytest.approx(np.linalg.norm(OFFSET), abs=1.0)
    assert result.qa["rigid"]["bone_rms_mm"] < 3.0


def test_results_lie_on_daily_grid(patient: Patient) -> None:
    torch.manual_seed(0)
    network = build_network("cross_stitch", [4, 8, 16])
    planning, daily = patient.planning, _shifted(patient.fractions[0].image, OFFSET)
    result = run_pipeline(planning.image, planning.labels, daily, network, TINY)

    for image in (result.labels, result.reg, result.seg):
        assert _same_geometry(image, daily)
        assert image.GetPixelID() == sitk.sitkUInt8
        assert set(np.unique(array_from_image(image)).tolist()) <= {0, 1, 2, 3, 4}
    assert result.ddf.shape == (3, *daily.GetSize()) and result.ddf.dtype == np.float32
    assert result.fov.shape == tuple(daily.GetSize()) and result.fov.any() and not result.fov.all()
    assert not array_from_image(result.seg)[~result.fov].any()  # nothing segmented where the network saw nothing
    assert np.allclose(result.model_grid.GetSpacing(), 4.0)
    assert set(result.timings) == {"rigid", "preprocess", "network", "refine", "restore", "qa", "total"}
    qa = json.loads(json.dumps(result.qa, allow_nan=False))  # JSON-ready
    assert set(qa["structures"]) == {"prostate", "seminal_vesicles", "rectum", "bladder"}
    row = qa["structures"]["prostate"]
    for key in ("source", "dsc_reg_seg", "msd_mm_reg_seg", "volume_ml", "planning_volume_ml", "volume_change_pct"):
        assert key in row
    assert row["source"] == "reg" and qa["structures"]["bladder"]["source"] == "seg"
    assert row["planning_volume_ml"] > 0
    assert set(qa["ddf"]) >= {"folding_fraction", "jacobian_std", "region"}
    assert isinstance(qa["flags"], list)


def test_ddf_is_in_daily_voxels_relative_to_aligned_planning(patient: Patient) -> None:
    """Model axis 0 points to patient right (RAS), daily axis 0 to patient left (LPS): the sign must flip."""
    planning = patient.planning
    daily = _shifted(planning.image, OFFSET)
    rigid = RigidAlignment(_translation(-OFFSET), None, "given")
    result = run_pipeline(planning.image, planning.labels, daily, EchoNet((1.0, 0.0, 0.0)), TINY, rigid=rigid)

    inside = result.ddf[:, result.fov]
    np.testing.assert_allclose(inside[0], -1.0, atol=1e-5)  # 1 model voxel (4 mm) to the right = -1 daily voxel
    np.testing.assert_allclose(inside[1:], 0.0, atol=1e-5)
    # warped planning at daily voxel x = aligned planning at x + ddf(x): shifted by one voxel along I
    reg, planned = array_from_image(result.reg), array_from_image(planning.labels)
    box = np.argwhere(planned > 0)
    lo, hi = box.min(axis=0), box.max(axis=0) + 1
    np.testing.assert_array_equal(
        reg[lo[0] + 1 : hi[0] + 1, lo[1] : hi[1], lo[2] : hi[2]], planned[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
    )


def test_refine_step_is_called_on_the_model_grid(patient: Patient) -> None:
    calls: list[tuple[tuple[int, ...], tuple[int, ...]]] = []

    def zero_ddf(inputs: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
        calls.append((tuple(inputs.shape), tuple(pred.shape)))
        pred = pred.clone()
        pred[:, :3] = 0.0
        return pred

    planning = patient.planning
    rigid = RigidAlignment(np.eye(4), None, "given")
    result = run_pipeline(
        planning.image, planning.labels, planning.image, EchoNet((2.0, 1.0, 0.0)), TINY, zero_ddf, rigid=rigid
    )
    assert len(calls) == 1
    border = (TINY.patch_size - TINY.output_size) // 2  # inputs carry the network's context around pred's grid
    assert calls[0][0][1] == 3 and calls[0][1][1] == 8
    assert calls[0][0][2:] == tuple(n + 2 * border for n in calls[0][1][2:])
    assert calls[0][1][2:] == tuple(result.model_grid.GetSize())
    assert not result.ddf.any()
    assert result.qa["refine"] == {"mode": "off"}


def test_built_in_refinement_runs_and_is_reported(patient: Patient) -> None:
    """``settings.refine`` optimises the network's DDF; QA records mode, budget, losses and time."""
    planning = patient.planning
    daily = _shifted(planning.image, OFFSET)
    rigid = RigidAlignment(_translation(-OFFSET * 0.5), None, "given")  # half the shift left for the DDF
    refine = refine_settings("fast", {"levels": [2, 1], "control_spacing": [4, 2], "iterations": [20, 10]})
    settings = replace(TINY, refine=refine)
    result = run_pipeline(planning.image, planning.labels, daily, EchoNet((0.0, 0.0, 0.0)), settings, rigid=rigid)
    report = result.qa["refine"]
    assert report["mode"] == "fast" and report["budget"] == sum(settings.refine.iterations)
    assert report["similarity_after"] < report["similarity_before"]
    assert sum(report["iterations"]) > 0 and report["seconds"] > 0
    assert result.timings["refine"] > 0
    assert result.ddf[:, result.fov].any()  # the zero network DDF was changed


def test_folding_is_flagged(patient: Patient) -> None:
    class Folding(EchoNet):
        def forward(self, image: torch.Tensor) -> torch.Tensor:
            pred = super().forward(image)
            pred[:, 0] = -2.0 * torch.arange(pred.shape[2], dtype=torch.float32)[:, None, None]  # det J = -1
            return pred

    planning = patient.planning
    rigid = RigidAlignment(np.eye(4), None, "given")
    result = run_pipeline(planning.image, planning.labels, planning.image, Folding(), TINY, rigid=rigid)
    assert result.qa["ddf"]["folding_fraction"] > 0.5
    assert any("folds" in flag for flag in result.qa["flags"])


def test_labels_off_the_planning_grid_are_refused(patient: Patient) -> None:
    planning = patient.planning
    labels = _shifted(planning.labels, np.array([2.0, 0.0, 0.0]))
    with pytest.raises(PipelineError, match="not on the planning CT's grid"):
        run_pipeline(planning.image, labels, planning.image, EchoNet(), TINY)


def test_different_patients_are_refused(patient: Patient) -> None:
    planning = patient.planning
    planning_ct, daily = sitk.Image(planning.image), sitk.Image(patient.fractions[0].image)
    planning_ct.SetMetaData(METADATA_KEYS["PatientID"], "JRS001")
    daily.SetMetaData(METADATA_KEYS["PatientID"], "JRS002")
    with pytest.raises(PipelineError, match="different patients"):
        run_pipeline(planning_ct, planning.labels, daily, EchoNet(), TINY)


def test_labels_of_another_frame_of_reference_are_refused(patient: Patient) -> None:
    planning = patient.planning
    planning_ct, labels = sitk.Image(planning.image), sitk.Image(planning.labels)
    planning_ct.SetMetaData(METADATA_KEYS["FrameOfReferenceUID"], "1.2.3")
    labels.SetMetaData(METADATA_KEYS["FrameOfReferenceUID"], "1.2.4")
    with pytest.raises(PipelineError, match="frame of reference"):
        run_pipeline(planning_ct, labels, planning.image, EchoNet(), TINY)


def test_contours_outside_the_daily_ct_are_refused(patient: Patient) -> None:
    planning = patient.planning
    far = _shifted(planning.image, np.array([0.0, 0.0, 2000.0]))  # a frame shift nobody corrected
    with pytest.raises(PipelineError, match="outside the daily CT"):
        run_pipeline(planning.image, planning.labels, far, EchoNet(), TINY, rigid=RigidAlignment(np.eye(4)))


def test_empty_or_foreign_labels_are_refused(patient: Patient) -> None:
    planning = patient.planning
    empty = sitk.Image(planning.labels) * 0
    with pytest.raises(PipelineError, match="empty"):
        run_pipeline(planning.image, empty, planning.image, EchoNet(), TINY)
    with pytest.raises(PipelineError, match="values"):
        run_pipeline(planning.image, sitk.Image(planning.labels) * 3, planning.image, EchoNet(), TINY)


def _tiny_bundle(root: Path) -> Path:
    repo_configs = Path(__file__).resolve().parents[1] / "bundle" / "configs"
    shutil.copytree(repo_configs, root / "configs")
    config = json.loads((root / "configs" / "inference.json").read_text())
    config.update(
        {"widths": [4, 8, 16], "model_spacing": 4.0, "crop_margin_mm": 16.0, "patch_size": 56, "infer_patch_size": 56}
    )
    config["contour_source"] = {**config.get("contour_source", {}), "rectum": "seg"}  # differs from the default
    (root / "configs" / "inference.json").write_text(json.dumps(config))
    return root


def test_load_bundle_reads_settings_and_weights(tmp_path: Path) -> None:
    bundle = _tiny_bundle(tmp_path / "bundle")
    with pytest.raises(BundleError, match=r"models/model\.pt"):
        load_bundle(bundle)
    (bundle / "models").mkdir()
    torch.manual_seed(1)
    reference = build_network("cross_stitch", [4, 8, 16])
    torch.save(reference.state_dict(), bundle / "models" / "model.pt")
    with pytest.raises(BundleError, match="does not match model_sha256"):  # not the weights metadata.json names
        load_bundle(bundle)
    record_model_hash(bundle)
    network, settings = load_bundle(bundle)
    assert settings.model_spacing == 4.0 and settings.crop_margin_mm == 16.0
    assert settings.patch_size == 56 and settings.output_size == 16
    assert settings.network_name == "cross_stitch" and settings.resolved_contour_source["rectum"] == "seg"
    assert (settings.disagreement_dsc, settings.disagreement_hd95_mm) == (0.7, 7.0)  # the QA limits of the bundle
    assert load_bundle(bundle, overrides={"qa_disagreement_hd95_mm": 5})[1].disagreement_hd95_mm == 5.0
    for key, bad in (
        ("qa_disagreement_hd95_mm", "far"),
        ("qa_disagreement_hd95_mm", float("nan")),
        ("qa_disagreement_hd95_mm", -1),
        ("qa_disagreement_dsc", 1.5),
        ("qa_disagreement_dsc", None),
    ):
        with pytest.raises(BundleError, match=rf"inference\.json: {key} must be"):
            load_bundle(bundle, overrides={key: bad})
    assert not network.training
    for name, value in reference.state_dict().items():
        torch.testing.assert_close(network.state_dict()[name], value)

    torch.save({"model": build_network("cross_stitch", [4, 8, 8]).state_dict()}, bundle / "models" / "model.pt")
    record_model_hash(bundle)
    with pytest.raises(ValueError, match="do not fit network"):
        load_bundle(bundle)


def test_restoring_around_the_model_grid_matches_the_whole_daily_grid(patient: Patient) -> None:
    from prostate_jrs.evaluation import restore_to_daily_grid
    from prostate_jrs.geometry import index_to_world
    from prostate_jrs.pipeline import _restore, model_grid

    torch.manual_seed(0)
    planning, daily = patient.planning, patient.fractions[0].image
    labels = array_from_image(planning.labels)
    grid = model_grid(daily, labels, planning.image, np.eye(4), 4.0, 16.0)
    pred = np.random.default_rng(0).normal(size=(8, *grid.GetSize())).astype(np.float32)
    source = TINY.resolved_contour_source
    args = (index_to_world(planning.labels), source)
    whole = restore_to_daily_grid(pred, index_to_world(grid), index_to_world(daily), daily.GetSize(), labels, *args)
    boxed = _restore(pred, grid, daily, labels, *args)
    for name in ("reg", "seg", "labels"):
        np.testing.assert_array_equal(array_from_image(boxed.image(name, daily)), getattr(whole, name), err_msg=name)
    np.testing.assert_array_equal(boxed.fov(daily.GetSize()), whole.fov)


def test_default_settings_derive_the_tile_output_size(patient: Patient) -> None:
    planning, daily = patient.planning, patient.fractions[0].image
    derived = run_pipeline(planning.image, planning.labels, daily, EchoNet(), replace(TINY, output_size=None))
    given = run_pipeline(planning.image, planning.labels, daily, EchoNet(), TINY)
    for name in ("labels", "reg", "seg"):
        assert np.array_equal(array_from_image(getattr(derived, name)), array_from_image(getattr(given, name)))
    assert np.array_equal(derived.model_ddf, given.model_ddf)

    result = run_pipeline(planning.image, planning.labels, daily, EchoNet(), PipelineSettings())  # 96^3 tiles, 1 mm
    assert _same_geometry(result.labels, daily)
    assert result.model_grid.GetSpacing() == pytest.approx((1.0, 1.0, 1.0))


@pytest.mark.skipif(importlib.util.find_spec("openvino") is None, reason="no OpenVINO")
def test_refinement_beside_the_network_gives_the_results_of_one_after_the_other(patient: Patient) -> None:
    """On a CPU engine, a refinement that needs nothing from the network runs in a thread beside it (each on one
    thread); contours, DDF and the refinement's report are those of the same run one stage after the other."""
    planning = patient.planning
    daily = _shifted(planning.image, OFFSET)
    rigid = RigidAlignment(_translation(-OFFSET * 0.5), None, "given")
    torch.manual_seed(0)
    network = build_network("cross_stitch", [4, 8, 16]).eval()
    refine = refine_settings("accurate", {"iterations": [10, 5, 5]})
    settings = replace(TINY, backend="openvino", refine=refine)
    threads = torch.get_num_threads()
    results = {}
    try:
        for beside, count in ((False, 1), (True, 2)):
            torch.set_num_threads(count)  # one thread: no room beside the network; two: one each
            results[beside] = run_pipeline(planning.image, planning.labels, daily, network, settings, rigid=rigid)
            assert torch.get_num_threads() == count  # restored after the thread
    finally:
        torch.set_num_threads(threads)
    alone, beside = results[False].qa["refine"], results[True].qa["refine"]
    assert beside.pop("beside_network") is True and "beside_network" not in alone
    for report in (alone, beside):
        report.pop("seconds"), report.pop("cpu_seconds")
    assert beside == alone  # similarity_before: the network's DDF in both
    assert np.array_equal(results[True].model_ddf, results[False].model_ddf)
    for name in ("labels", "reg", "seg"):
        assert np.array_equal(
            array_from_image(getattr(results[True], name)), array_from_image(getattr(results[False], name))
        )
