from __future__ import annotations

import pytest
import torch

from prostate_jrs.losses import JRSLoss
from prostate_jrs.nets import CrossStitchUnit, build_network


def test_unit_mixes_per_channel() -> None:
    unit = CrossStitchUnit(2, init="constant", mean=0.5)
    with torch.no_grad():
        unit.alpha.copy_(torch.tensor([[[1.0, 0.0], [2.0, 3.0]], [[4.0, 5.0], [6.0, 7.0]]]))
    a = torch.ones(1, 2, 1, 1, 1)
    b = 10 * torch.ones(1, 2, 1, 1, 1)
    out_a, out_b = unit(a, b)
    # channel 0: a' = 1*1 + 2*10, b' = 4*1 + 6*10; channel 1: a' = 0*1 + 3*10, b' = 5*1 + 7*10
    assert out_a.flatten().tolist() == [21.0, 30.0]
    assert out_b.flatten().tolist() == [64.0, 75.0]


def test_truncated_normal_init_around_half() -> None:
    torch.manual_seed(0)
    alpha = CrossStitchUnit(2000).alpha
    assert alpha.min() >= 0.0 and alpha.max() <= 1.0
    assert abs(alpha.mean().item() - 0.5) < 0.02
    assert alpha.std().item() > 0.1
    assert torch.all(CrossStitchUnit(4, init="constant").alpha == 0.5)
    with pytest.raises(ValueError, match="init"):
        CrossStitchUnit(4, init="eye")


def test_units_sit_at_paper_positions() -> None:
    net = build_network("cross_stitch", (4, 8, 16))
    assert [net.stitch_down1.alpha.shape[-1], net.stitch_down2.alpha.shape[-1]] == [4, 8]
    assert [net.stitch_up1.alpha.shape[-1], net.stitch_up2.alpha.shape[-1]] == [16, 8]


def test_gradients_reach_both_branches_and_every_alpha() -> None:
    torch.manual_seed(0)
    net = build_network("cross_stitch", (4, 8, 16))
    image = torch.randn(2, 3, 48, 48, 48)
    image[:, 2] = torch.randint(0, 5, (2, 48, 48, 48)).float()
    fixed_label = torch.randint(0, 5, (2, 1, 48, 48, 48)).float()
    loss = JRSLoss("cross_stitch")
    loss(net.forward_multiscale(image), *loss.split_image(image), fixed_label)["loss"].backward()
    for prefix in ("seg_body.", "reg_body.", "seg_head.", "ddf_head."):
        grads = [p.grad for n, p in net.named_parameters() if n.startswith(prefix)]
        assert grads and all(g is not None and g.abs().sum() > 0 for g in grads), prefix
    for name, param in net.named_parameters():
        if "stitch" in name:
            assert param.grad is not None and torch.all(param.grad != 0), name
