from __future__ import annotations

import pytest

from prostate_jrs.phantom import AnatomyRanges, PhantomConfig, SiteProfile


def test_default_grid_is_clinical() -> None:
    config = PhantomConfig()
    assert config.size == (512, 512, 90)
    assert config.spacing == (0.9765625, 0.9765625, 3.0)


def test_tiny_is_small_and_overridable() -> None:
    tiny = PhantomConfig.tiny()
    assert tiny.spacing == (4.0, 4.0, 4.0)
    assert tiny.size == (96, 72, 48)
    assert PhantomConfig.tiny(daily_gas_probability=0.0).daily_gas_probability == 0.0


def test_with_spacing_keeps_fov() -> None:
    config = PhantomConfig().with_spacing(2.0)
    assert config.spacing == (2.0, 2.0, 2.0)
    assert config.size == (250, 250, 135)
    assert PhantomConfig().with_spacing([1.0, 1.0, 2.5]).spacing == (1.0, 1.0, 2.5)


def test_site_profile_scales_fov_and_noise() -> None:
    site = SiteProfile(fov_scale=0.9, noise_sd_hu=20.0)
    assert PhantomConfig(site=site).size[:2] == (461, 461)
    assert site.noise_sd_for((0.977, 0.977, 3.0)) == pytest.approx(20.0, rel=1e-3)
    assert site.noise_sd_for((3.0, 3.0, 3.0)) < site.noise_sd_for((1.0, 1.0, 3.0))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"spacing": (1.0, 0.0, 1.0)}, "spacing"),
        ({"fov": (100.0, 100.0)}, "fov"),
        ({"daily_gas_probability": 1.5}, "daily_gas_probability"),
        ({"daily_labels": "smooth"}, "daily_labels"),
        ({"anatomy": AnatomyRanges(bladder_volume_ml=(400.0, 200.0))}, "bladder_volume_ml"),
        ({"site": SiteProfile(fov_scale=0.0)}, "fov_scale"),
    ],
)
def test_bad_config_is_rejected(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PhantomConfig(**kwargs)


def test_bad_spacing_override_is_rejected() -> None:
    with pytest.raises(ValueError, match="spacing"):
        PhantomConfig().with_spacing([1.0, 2.0])
