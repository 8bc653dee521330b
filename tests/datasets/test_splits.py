"""Patient splits, and the datalist of an imported dataset across runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from prostate_jrs.datasets.importer import PATIENTS, ImportSettings, dataset_split, write_datalist
from prostate_jrs.datasets.splits import split_patients


def test_split_sizes_and_errors() -> None:
    ids = [f"P{i}" for i in range(10)]
    split = split_patients(ids, 0, validation_fraction=0.1, test_fraction=0.3)
    assert [len(split[p]) for p in ("training", "validation", "test")] == [6, 1, 3]
    assert sorted(p for part in split.values() for p in part) == ids
    assert split_patients(["A"], 0) == {"test": [], "validation": [], "training": ["A"]}
    assert split_patients(["A", "B", "C"], 1, validation_fraction=0.0)["validation"] == []
    with pytest.raises(ValueError, match="leave patients"):
        split_patients(ids, 0, validation_fraction=0.5, test_fraction=0.5)


def _patient(dataset: Path, pseudonym: str, contoured: bool = True) -> None:
    folder = dataset / PATIENTS / pseudonym
    folder.mkdir(parents=True)
    item = {"fixed_image": f"{PATIENTS}/{pseudonym}/{pseudonym}_f01_ct.nii.gz", "patient": pseudonym, "fraction": 1}
    inference = {**item, "fixed_image": f"{PATIENTS}/{pseudonym}/{pseudonym}_f02_ct.nii.gz", "fraction": 2}
    items = [{**item, "fixed_label": "x"}, inference] if contoured else [inference]
    (folder / "items.json").write_text(json.dumps({"patient": pseudonym, "items": items}))


def test_patients_keep_their_list_and_new_ones_are_split(tmp_path: Path) -> None:
    settings = ImportSettings(seed=3)
    for k in range(5):
        _patient(tmp_path, f"P{k}")
    _patient(tmp_path, "PNOCONTOURS", contoured=False)
    first = json.loads(write_datalist(tmp_path, settings).read_text())
    assert [len(first[p]) for p in ("training", "validation", "test")] == [3, 1, 1]
    assert len(first["inference"]) == 6  # every second fraction, and the patient without contours
    before = dataset_split(tmp_path)
    assert "PNOCONTOURS" not in before
    for k in range(5, 10):
        _patient(tmp_path, f"P{k}")
    write_datalist(tmp_path, settings, keep=before)
    after = dataset_split(tmp_path)
    assert all(after[p] == part for p, part in before.items())  # nobody moves, e.g. from test into training
    new = [after[f"P{k}"] for k in range(5, 10)]
    assert sorted(new) == ["test", "training", "training", "training", "validation"]
    mtime = (tmp_path / "datalist.json").stat().st_mtime_ns
    write_datalist(tmp_path, settings, keep=after)
    assert (tmp_path / "datalist.json").stat().st_mtime_ns == mtime  # unchanged content is not rewritten
