"""Hospital profiles and multi-site datasets (prostate_jrs.phantom.sites)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from prostate_jrs.phantom import INSTITUTES, PhantomConfig, write_multisite_dataset
from prostate_jrs.phantom.sites import site_folder_name, site_seed


def test_two_institutes_differ_like_two_manufacturers() -> None:
    a, b = INSTITUTES
    assert a.name != b.name
    assert b.site.hu_offset != a.site.hu_offset
    assert b.site.noise_sd_hu > a.site.noise_sd_hu
    assert b.site.fov_scale < a.site.fov_scale
    assert b.anatomy.bladder_volume_ml != a.anatomy.bladder_volume_ml
    assert b.anatomy.body_semi_lr[0] > a.anatomy.body_semi_lr[0]


def test_apply_keeps_grid_and_motion() -> None:
    base = PhantomConfig.tiny()
    config = INSTITUTES[1].apply(base)
    assert config.spacing == base.spacing and config.motion == base.motion
    assert config.site == INSTITUTES[1].site and config.anatomy == INSTITUTES[1].anatomy
    assert config.size[0] < base.size[0]  # smaller reconstruction diameter, same voxels


def test_site_seeds_and_names() -> None:
    assert [site_folder_name(k) for k in range(3)] == ["site-1", "site-2", "site-3"]
    assert len({site_seed(0, k) for k in range(5)}) == 5
    assert site_seed(1, 0) != site_seed(0, 0)


@pytest.fixture(scope="module")
def two_sites(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("sites") / "R"
    write_multisite_dataset(root, n_sites=2, n_patients=2, n_fractions=1, seed=3, config=PhantomConfig.tiny())
    return root


def test_multisite_layout_and_provenance(two_sites: Path) -> None:
    assert sorted(p.name for p in two_sites.iterdir()) == ["site-1", "site-2", "sites.json"]
    summary = json.loads((two_sites / "sites.json").read_text())
    assert [summary[s]["institute"] for s in ("site-1", "site-2")] == ["institute-a", "institute-b"]
    for k, site in enumerate(("site-1", "site-2")):
        data = json.loads((two_sites / site / "datalist.json").read_text())
        assert len(data["training"]) == 1 and len(data["test"]) == 1
        phantom = json.loads((two_sites / site / "phantom.json").read_text())
        assert phantom["config"]["site"]["name"] == INSTITUTES[k].name
    assert not list(two_sites.parent.glob(".R.partial-*"))


def test_sites_differ_in_image_statistics_and_field_of_view(two_sites: Path) -> None:
    images = {s: sitk.ReadImage(str(two_sites / s / "JRS001_planning_ct.nii.gz")) for s in ("site-1", "site-2")}
    assert images["site-2"].GetSize()[0] < images["site-1"].GetSize()[0]
    # The patients differ too (own seeds): no identical image files across sites.
    a = sitk.GetArrayFromImage(images["site-1"])
    b = sitk.GetArrayFromImage(images["site-2"])
    assert a.shape != b.shape or not np.array_equal(a, b)


def test_existing_output_is_refused(two_sites: Path) -> None:
    with pytest.raises(FileExistsError, match="already exists"):
        write_multisite_dataset(two_sites, n_sites=2, n_patients=1, n_fractions=1, seed=0)


@pytest.mark.parametrize("kwargs", [{"n_sites": 0}, {"seed": -1}])
def test_bad_arguments_are_rejected(tmp_path: Path, kwargs: dict) -> None:
    args = {"n_sites": 2, "n_patients": 1, "n_fractions": 1, "seed": 0, **kwargs}
    with pytest.raises(ValueError):
        write_multisite_dataset(tmp_path / "x", **args)
    assert not (tmp_path / "x").exists()
