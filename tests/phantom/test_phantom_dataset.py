from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from monai.transforms import EnsureChannelFirstd, LoadImaged

from prostate_jrs.geometry import array_from_image, index_to_world, resample_with_ddf
from prostate_jrs.labels import STRUCTURES
from prostate_jrs.metrics import jacobian_determinant
from prostate_jrs.phantom import PhantomConfig, generate_patient, write_dataset
from prostate_jrs.phantom import dataset as dataset_module
from prostate_jrs.phantom.dataset import check_count, patient_seed, split_patients
from prostate_jrs.phantom.dicom_export import setup_transform
from prostate_jrs.rigid import RIGID_CONVENTION, RigidAlignment

IMAGE_KEYS = ["fixed_image", "moving_image", "moving_label", "fixed_label"]
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def _datalist(folder: Path) -> dict:
    return json.loads((folder / "datalist.json").read_text())


def _items(folder: Path) -> list[dict]:
    data = _datalist(folder)
    return [item for part in ("training", "validation", "test") for item in data[part]]


def _load(folder: Path, item: dict) -> dict:
    data = {k: str(folder / item[k]) for k in [*IMAGE_KEYS, "ddf"]}
    data = LoadImaged(keys=[*IMAGE_KEYS, "ddf"])(data)
    data = EnsureChannelFirstd(keys=IMAGE_KEYS, channel_dim="no_channel")(data)
    return EnsureChannelFirstd(keys="ddf", channel_dim=-1)(data)


def test_datalist_is_split_by_patient(dataset_dir: Path) -> None:
    data = _datalist(dataset_dir)
    patients = {part: {item["patient"] for item in data[part]} for part in ("training", "validation", "test")}
    assert all(patients.values())  # 3 patients: one each
    assert not (patients["training"] & patients["validation"] or patients["training"] & patients["test"])
    assert not patients["validation"] & patients["test"]
    items = _items(dataset_dir)
    assert len(items) == 6
    for item in items:
        assert set(item) >= {*IMAGE_KEYS, "ddf", "patient"}
        for key in [*IMAGE_KEYS, "ddf"]:
            assert not Path(item[key]).is_absolute() and (dataset_dir / item[key]).is_file()
    assert data["labels"] == {
        "0": "background",
        "1": "prostate",
        "2": "seminal_vesicles",
        "3": "rectum",
        "4": "bladder",
    }
    assert not list(dataset_dir.parent.glob(".D.partial-*"))


def test_items_load_with_monai(dataset_dir: Path) -> None:
    for item in _items(dataset_dir):
        data = _load(dataset_dir, item)
        fixed_shape = data["fixed_image"].shape[1:]
        assert data["fixed_label"].shape[1:] == fixed_shape
        assert data["moving_label"].shape == data["moving_image"].shape
        assert data["ddf"].shape == (3, *fixed_shape)


def test_ddf_file_matches_memory_and_affines_match(dataset_dir: Path) -> None:
    patient = generate_patient(patient_seed(1, 0), 2, PhantomConfig.tiny(), patient_id="JRS001")
    for f, fraction in enumerate(patient.fractions, start=1):
        item = next(i for i in _items(dataset_dir) if i["patient"] == "JRS001" and i["fraction"] == f)
        data = _load(dataset_dir, item)
        np.testing.assert_array_equal(data["ddf"].numpy(), fraction.ddf)
        expected = LPS_TO_RAS @ index_to_world(fraction.image)  # RAS = LPS with x, y negated
        for key in ("fixed_image", "fixed_label", "ddf"):
            np.testing.assert_allclose(data[key].affine.numpy(), expected, atol=1e-4)
        np.testing.assert_allclose(
            data["moving_image"].affine.numpy(), LPS_TO_RAS @ index_to_world(patient.planning.image), atol=1e-4
        )
        np.testing.assert_array_equal(data["fixed_image"][0].numpy(), array_from_image(fraction.image))


def test_label_maps_hold_all_structures_and_ddf_does_not_fold(dataset_dir: Path) -> None:
    expected = {0, *(s.label for s in STRUCTURES)}
    for item in _items(dataset_dir):
        data = _load(dataset_dir, item)
        assert set(np.unique(data["fixed_label"].numpy())) == expected
        assert set(np.unique(data["moving_label"].numpy())) == expected
        assert jacobian_determinant(data["ddf"].numpy()).min() > 0.2


def test_warping_planning_labels_from_files_reproduces_daily_labels(dataset_dir: Path) -> None:
    differing_grids = 0
    for item in _items(dataset_dir):
        planning = sitk.ReadImage(str(dataset_dir / item["moving_label"]))
        daily = sitk.ReadImage(str(dataset_dir / item["fixed_label"]))
        ddf = _load(dataset_dir, item)["ddf"].numpy()
        differing_grids += (planning.GetSize(), planning.GetOrigin()) != (daily.GetSize(), daily.GetOrigin())
        warped = resample_with_ddf(planning, daily, ddf, order=0)
        target = array_from_image(daily)
        for structure in STRUCTURES:
            a, b = warped == structure.label, target == structure.label
            assert 2 * (a & b).sum() / (a.sum() + b.sum()) >= 0.95, (item["fixed_image"], structure.name)
    assert differing_grids > 0


def test_bladder_volume_varies_in_files(dataset_dir: Path) -> None:
    volumes = {}
    for item in _items(dataset_dir):
        image = sitk.ReadImage(str(dataset_dir / item["fixed_label"]))
        volumes[item["fixed_image"]] = (array_from_image(image) == 4).sum() * np.prod(image.GetSpacing()) / 1000
    provenance = json.loads((dataset_dir / "phantom.json").read_text())["patients"]
    for pid, record in provenance.items():
        for f, info in enumerate(record["fractions"], start=1):
            assert (
                abs(volumes[f"{pid}_f{f:02d}_ct.nii.gz"] - info["bladder_target_ml"]) < 0.15 * info["bladder_target_ml"]
            )
    assert np.std(list(volumes.values())) > 20.0


def test_same_seed_identical_files_other_seed_other_anatomy(tmp_path: Path) -> None:
    config = PhantomConfig.tiny()
    for name, seed in (("a", 7), ("b", 7), ("c", 8)):
        write_dataset(tmp_path / name, 1, 1, seed, config=config)
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "b").iterdir())
    for name in files:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert (tmp_path / "a" / "JRS001_planning_ct.nii.gz").read_bytes() != (
        tmp_path / "c" / "JRS001_planning_ct.nii.gz"
    ).read_bytes()
    labels_a = array_from_image(sitk.ReadImage(str(tmp_path / "a" / "JRS001_planning_labels.nii.gz")))
    labels_c = array_from_image(sitk.ReadImage(str(tmp_path / "c" / "JRS001_planning_labels.nii.gz")))
    assert (labels_a != labels_c).mean() > 0.001


def test_existing_folder_is_refused(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not an empty folder"):
        write_dataset(tmp_path / "out", 1, 1, 0, config=PhantomConfig.tiny())
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]


def test_failure_leaves_nothing_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = dataset_module.generate_patient

    def failing(*args: object, **kwargs: object):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom")
        return real(*args, **kwargs)

    monkeypatch.setattr(dataset_module, "generate_patient", failing)
    with pytest.raises(RuntimeError, match="boom"):
        write_dataset(tmp_path / "out", 2, 1, 0, config=PhantomConfig.tiny())
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "args, message",
    [((0, 1, 0), "n_patients"), ((1, 0, 0), "n_fractions"), ((1, 1, -3), "seed")],
)
def test_bad_arguments(tmp_path: Path, args: tuple[int, int, int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        write_dataset(tmp_path / "out", *args, config=PhantomConfig.tiny())


def test_split_sizes() -> None:
    assert split_patients(["A"], 0) == {"test": [], "validation": [], "training": ["A"]}
    two = split_patients(["A", "B"], 0)
    assert len(two["test"]) == 1 and len(two["training"]) == 1
    ten = split_patients([f"P{i}" for i in range(10)], 0)
    assert (len(ten["training"]), len(ten["validation"]), len(ten["test"])) == (6, 2, 2)


def test_items_record_the_rigid_alignment_on_bone(dataset_dir: Path) -> None:
    """Each item's ``rigid`` is what the app would find: the phantom's setup motion of the bone."""
    assert _datalist(dataset_dir)["rigid_convention"] == RIGID_CONVENTION
    provenance = json.loads((dataset_dir / "phantom.json").read_text())["patients"]
    for item in _items(dataset_dir):
        rigid = RigidAlignment.from_record(item["rigid"])
        exact = setup_transform(provenance[item["patient"]]["fractions"][item["fraction"] - 1])
        daily = sitk.ReadImage(str(dataset_dir / item["fixed_image"]))
        prostate = np.argwhere(array_from_image(sitk.ReadImage(str(dataset_dir / item["fixed_label"]))) == 1)
        centre = index_to_world(daily) @ np.r_[prostate.mean(axis=0), 1.0]
        assert np.linalg.norm((rigid.daily_to_planning - exact) @ centre) < 1.5  # mm, at the prostate
        assert rigid.method == "bone" and rigid.residual < 3.0


@pytest.mark.parametrize(
    "value, minimum, message",
    [(0, 1, "n must be a positive integer, got 0"), (-1, 0, "n must be a non-negative integer, got -1"),
     (1.0, 1, "n must be a positive integer, got 1.0"), ("2", 0, "n must be a non-negative integer, got '2'")],
)  # fmt: skip
def test_check_count(value: object, minimum: int, message: str) -> None:
    check_count("n", 3, minimum)
    with pytest.raises(ValueError, match=f"^{message}$"):
        check_count("n", value, minimum)
