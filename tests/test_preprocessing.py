"""One preprocessing: the app's pipeline and the bundle's transforms give the network the same input for one pair."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from monai.bundle import ConfigParser
from monai.transforms import LoadImage

from prostate_jrs.dicom_session import load_session
from prostate_jrs.errors import PreprocessingError
from prostate_jrs.pipeline import load_bundle, run_pipeline
from prostate_jrs.preprocessing import DAILY_TO_PLANNING, model_grid, model_inputs, ras_affine
from prostate_jrs.rigid import RigidAlignment
from prostate_jrs.tiny_bundle import write_tiny_bundle
from prostate_jrs.transforms import ModelGridd, image_from_metatensor, load_datalist

BUNDLE = Path(__file__).resolve().parents[1] / "bundle"
PATIENT, FRACTION = "JRS002", 2


def _session_folder(archive: Path, target: Path) -> Path:
    """What the app gets for one fraction: planning CT, planning RTSTRUCT and that day's CT, from the archive."""
    source = archive / "dicom" / PATIENT
    for part in ("Study_PLAN1/CT_2", "Study_PLAN1/RTSTRUCT_3", f"Study_FX{FRACTION}/CT_1"):
        shutil.copytree(source / part, target / part)
    return target


def _item(dataset: Path) -> dict[str, Any]:
    """The imported datalist item of the same fraction (absolute paths)."""
    key = (dataset.parent / f"{dataset.name}-private" / "pseudonym_key.csv").read_text().splitlines()
    pseudonym = next(line.split(",")[1] for line in key if line.startswith(f"{PATIENT},"))
    items = load_datalist(dataset, ["training", "validation", "test"])
    return next(i for i in items if i["patient"] == pseudonym and i["fraction"] == FRACTION)


@pytest.fixture(scope="module")
def paths(synthetic_archive: Path, imported_archive: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The app path (pipeline on the DICOM session) and the bundle path (inference.json on the imported item)."""
    root = tmp_path_factory.mktemp("one_preprocessing")
    bundle = write_tiny_bundle(BUNDLE, root / "bundle")
    network, settings = load_bundle(bundle)
    session = load_session(_session_folder(synthetic_archive, root / "session"))
    seen: dict[str, torch.Tensor] = {}

    def keep_inputs(inputs: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
        seen["inputs"] = inputs
        return pred

    result = run_pipeline(
        session.planning.image, session.planning_labels, session.daily.image, network, settings, keep_inputs
    )
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    parser.update({"bundle_root": str(bundle), "dataset_dir": str(imported_archive)})
    data = parser.get_parsed_content("preprocessing")(_item(imported_archive))
    return {"session": session, "settings": settings, "result": result, "inputs": seen["inputs"][0], "data": data}


def test_app_and_bundle_give_the_network_the_same_input(paths: dict[str, Any]) -> None:
    result, data, settings = paths["result"], paths["data"], paths["settings"]
    image = data["image"]
    border = (settings.patch_size - settings.output_size) // 2
    # the same rigid pre-alignment (the app computes it; the bundle reads what import recorded)
    np.testing.assert_allclose(data[DAILY_TO_PLANNING].numpy(), result.rigid.daily_to_planning, atol=1e-5)
    # the same model grid: the bundle's input is the app's grid grown by the network's context border
    shift = np.eye(4)
    shift[:3, 3] = border
    np.testing.assert_allclose(image.affine.numpy() @ shift, ras_affine(result.model_grid), atol=1e-4)
    assert tuple(image.shape[1:]) == tuple(n + 2 * border for n in result.model_grid.GetSize())
    # the same values, context border included (the refine step receives the network's whole input)
    difference = (image.as_tensor() - paths["inputs"]).abs()
    print(f"app vs bundle input, model grid {tuple(paths['inputs'].shape[1:])}: max |diff| {difference.max():.2e}")
    assert float(difference[:2].max()) <= 1e-3  # CT channels in scaled units
    inner = (slice(None), *(slice(border, -border),) * 3)
    assert torch.equal(image[inner][2].as_tensor(), paths["inputs"][inner][2])  # planning labels
    # ... and exactly what model_inputs (the pipeline's preprocess stage) gives the network
    session = paths["session"]
    app = model_inputs(
        session.daily.image,
        session.planning.image,
        session.planning_labels,
        result.rigid.daily_to_planning,
        spacing=settings.model_spacing,
        margin_mm=settings.crop_margin_mm,
        context_voxels=border,
        hu_min=settings.hu_min,
        hu_max=settings.hu_max,
    )
    np.testing.assert_array_equal(app.image, paths["inputs"].numpy())
    assert float(np.abs(image.numpy() - app.image).max()) <= 1e-3


def test_model_grid_outputs_keep_the_daily_grid_for_restoring(paths: dict[str, Any], imported_archive: Path) -> None:
    data = paths["data"]
    item = _item(imported_archive)
    daily = LoadImage(image_only=True, ensure_channel_first=True)(item["fixed_image"])
    for key in ("fixed_image", "moving_image", "moving_label"):
        assert torch.equal(data[key].affine, data["image"].affine)  # all on the grown model grid
    fixed = data["fixed_image"]
    assert fixed.meta["filename_or_obj"] == item["fixed_image"]
    np.testing.assert_allclose(fixed.meta["original_affine"], daily.affine)
    assert tuple(np.asarray(fixed.meta["spatial_shape"])) == tuple(daily.shape[1:])
    assert "rigid" not in data and data[DAILY_TO_PLANNING].dtype == torch.float64


def test_image_from_metatensor_is_the_file_on_its_own_grid(imported_archive: Path) -> None:
    path = _item(imported_archive)["fixed_image"]
    image = image_from_metatensor(LoadImage(image_only=True, ensure_channel_first=True)(path))
    reference = sitk.ReadImage(path)
    np.testing.assert_allclose(image.GetOrigin(), reference.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(image.GetSpacing(), reference.GetSpacing(), atol=1e-5)
    np.testing.assert_allclose(image.GetDirection(), reference.GetDirection(), atol=1e-6)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(reference))
    with pytest.raises(ValueError, match="expected a MetaTensor of shape"):
        image_from_metatensor(torch.zeros(2, 3, 3, 3))


def test_rigid_record_round_trip_and_refusal() -> None:
    matrix = np.eye(4)
    matrix[:3, :3] = [[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]
    matrix[:3, 3] = [10.0, -5.0, 250.0]
    record = RigidAlignment(matrix, 0.8123456, "bone", 0.91).to_record()
    assert json.loads(json.dumps(record)) == record
    back = RigidAlignment.from_record(record)
    np.testing.assert_allclose(back.daily_to_planning, matrix) and back.residual == 0.8123
    assert back.rotation_deg == pytest.approx(90.0)
    sheared = {**record, "daily_to_planning": (matrix @ np.diag([1.0, 2.0, 1.0, 1.0])).tolist()}
    with pytest.raises(ValueError, match="item 7: daily_to_planning must be a 4x4 rigid transform"):
        RigidAlignment.from_record(sheared, "item 7")
    with pytest.raises(ValueError, match="expected a record with a 4x4"):
        RigidAlignment.from_record({"matrix": []})


def test_an_item_without_rigid_record_is_aligned_or_refused(imported_archive: Path) -> None:
    item = _item(imported_archive)
    record = item.pop("rigid")
    loaded = LoadImage(image_only=True, ensure_channel_first=True)
    data = {k: loaded(item[k]) for k in ("fixed_image", "moving_image", "moving_label")}
    keys = ("fixed_image", "moving_image", "moving_label")
    aligned = ModelGridd(keys, model_spacing=4.0, crop_margin_mm=16.0)(data)
    # the same alignment as import found on the DICOM volumes, up to the NIfTI header's float32 geometry (mm)
    np.testing.assert_allclose(aligned[DAILY_TO_PLANNING].numpy(), record["daily_to_planning"], atol=0.01)
    with pytest.raises(ValueError, match=r"_ct\.nii\.gz: the datalist item has no 'rigid' record"):
        ModelGridd(keys, model_spacing=4.0, crop_margin_mm=16.0, align_missing=False)(data)


def test_model_grid_takes_the_contours_box_of_a_transposed_view() -> None:
    # the box comes from per-axis projections; a strided (I, J, K) view gives the box of every labelled voxel
    grid = sitk.Image([40, 30, 20], sitk.sitkUInt8)
    grid.SetSpacing([1.0, 2.0, 3.0])
    array = np.zeros((20, 30, 40), np.uint8)  # (K, J, I)
    array[3, 7, 11] = array[15, 22, 30] = 2
    view = array.transpose(2, 1, 0)
    copy = np.ascontiguousarray(view)
    daily = sitk.Image([100, 100, 100], sitk.sitkInt16)
    for labels in (view, copy):
        box = model_grid(daily, labels, grid, np.eye(4), 1.0, 0.0)
        # voxels 11..30 (I), 7..22 (J), 3..15 (K), half a voxel beyond each: (20, 32, 39) mm, floor + 1 voxels
        assert box.GetSize() == (21, 33, 40)
    with pytest.raises(PreprocessingError, match="label map is empty"):
        model_grid(daily, np.zeros_like(view), grid, np.eye(4), 1.0, 0.0)
