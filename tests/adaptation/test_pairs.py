"""Training items on the model grid and the synthetic deformation of their fixed side."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from prostate_jrs.adaptation.pairs import KIND, PlanningDeformationd, grid_settings, training_items
from prostate_jrs.adaptation.sessions import read_approved_fractions
from prostate_jrs.transforms import FIXED_IMAGE, FIXED_LABEL, MOVING_IMAGE, MOVING_LABEL

GRID = {"model_spacing": 4.0, "crop_margin_mm": 16.0, "context_voxels": 20, "hu_min": -1000, "hu_max": 1000}


@pytest.fixture(scope="module")
def items(handover: dict) -> tuple[list[dict], list[dict], list]:
    fractions = read_approved_fractions([handover["JRS002"][k].approved for k in (1, 2)])
    return training_items(fractions, grid_settings(GRID))


def test_approved_pairs_and_one_planning_item_on_the_model_grid(items: tuple[list[dict], list[dict], list]) -> None:
    approved, planning, rigids = items
    assert len(approved) == 2 and len(planning) == 1 and len(rigids) == 2  # both fractions share the planning scan
    assert [i[KIND] for i in approved] == ["approved", "approved"] and planning[0][KIND] == "planning"
    for item in [*approved, *planning]:
        shapes = {tuple(item[k].shape) for k in (FIXED_IMAGE, MOVING_IMAGE, MOVING_LABEL, FIXED_LABEL)}
        assert len(shapes) == 1 and next(iter(shapes))[0] == 1
        for key in (FIXED_IMAGE, MOVING_IMAGE):
            assert float(item[key].min()) >= -1.0 and float(item[key].max()) <= 1.0
        for key in (MOVING_LABEL, FIXED_LABEL):
            assert set(torch.unique(item[key]).tolist()) == {0.0, 1.0, 2.0, 3.0, 4.0}
    # the planning item pairs the planning scan with itself; approved pairs do not
    assert torch.equal(planning[0][FIXED_IMAGE], planning[0][MOVING_IMAGE])
    assert not torch.equal(approved[0][FIXED_LABEL], approved[0][MOVING_LABEL])
    assert all(r.residual is not None and r.residual < 3.0 for r in rigids)  # aligned on bone


def test_grid_settings_name_a_missing_key() -> None:
    assert grid_settings(GRID) == {
        "spacing": 4.0,
        "margin_mm": 16.0,
        "context_voxels": 20,
        "hu_min": -1000.0,
        "hu_max": 1000.0,
    }
    with pytest.raises(KeyError, match="no 'context_voxels'"):
        grid_settings({k: v for k, v in GRID.items() if k != "context_voxels"})


def _patch(kind: str) -> dict:
    rng = np.random.default_rng(0)
    label = torch.zeros(1, 48, 48, 48)
    label[0, 12:36, 14:34, 16:30] = 4.0
    label[0, 20:26, 20:26, 20:26] = 1.0
    image = torch.from_numpy(rng.normal(size=(1, 48, 48, 48)).astype(np.float32))
    return {FIXED_IMAGE: image, FIXED_LABEL: label, MOVING_IMAGE: image.clone(), KIND: kind}


def _dice(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(2 * (a & b).sum() / (a.sum() + b.sum()))


def test_planning_patches_are_always_deformed_approved_ones_with_prob() -> None:
    deform = PlanningDeformationd(prob=0.0).set_random_state(0)  # the training defaults
    original = _patch("planning")
    planning = deform(_patch("planning"))
    assert not torch.equal(torch.as_tensor(planning[FIXED_IMAGE]), original[FIXED_IMAGE])
    assert torch.equal(torch.as_tensor(planning[MOVING_IMAGE]), original[MOVING_IMAGE])  # the planning side stays
    labels = torch.as_tensor(planning[FIXED_LABEL])
    assert set(torch.unique(labels).tolist()) == {0.0, 1.0, 4.0}  # still labels (nearest neighbour)
    moved = _dice(labels == 4, original[FIXED_LABEL] == 4)
    assert 0.6 < moved < 0.99  # a deformation of a few voxels: the bladder moved, and is still the bladder
    approved = deform(_patch("approved"))
    assert torch.equal(torch.as_tensor(approved[FIXED_IMAGE]), original[FIXED_IMAGE])
    first = PlanningDeformationd(prob=1.0).set_random_state(0)(_patch("approved"))[FIXED_IMAGE]
    second = PlanningDeformationd(prob=1.0).set_random_state(0)(_patch("approved"))[FIXED_IMAGE]
    assert not torch.equal(torch.as_tensor(first), original[FIXED_IMAGE])
    assert torch.equal(torch.as_tensor(first), torch.as_tensor(second))  # seeded: reproducible
