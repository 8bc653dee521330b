from __future__ import annotations

import pytest
import torch

from prostate_jrs.nets import NETWORKS, build_network, resolve_inputs
from prostate_jrs.nets.single import RegNet, SegNet

TINY = (4, 8, 16)


def _image(size: int, batch: int = 1, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    image = torch.randn(batch, 3, size, size, size, generator=gen)
    image[:, 2] = torch.randint(0, 5, (batch, size, size, size), generator=gen).float()
    return image


@pytest.fixture(scope="module")
def image96() -> torch.Tensor:
    return _image(96)


@pytest.mark.parametrize("name", list(NETWORKS))
def test_output_shapes_at_96(name: str, image96: torch.Tensor) -> None:
    net = build_network(name, TINY).eval()
    with torch.no_grad():
        multi = net.forward_multiscale(image96)
        pred = net.compose(image96, multi)
    assert pred.shape == (1, 8, 56, 56, 56)
    expected_keys = {"seg": {"logits"}, "reg": {"ddf"}, "jrs_reg": {"ddf"}}.get(name, {"ddf", "logits"})
    assert set(multi) == expected_keys
    for key, channels in (("ddf", 3), ("logits", 5)):
        if key in multi:
            assert [tuple(t.shape) for t in multi[key]] == [
                (1, channels, 56, 56, 56),
                (1, channels, 30, 30, 30),
                (1, channels, 17, 17, 17),
            ]
    assert torch.isfinite(pred).all()


def test_seg_fills_zero_ddf() -> None:
    net = build_network("seg", TINY).eval()
    with torch.no_grad():
        pred = net(_image(48))
    assert torch.equal(pred[:, :3], torch.zeros_like(pred[:, :3]))
    assert pred[:, 3:].abs().sum() > 0


def test_reg_logits_are_warped_planning_labels() -> None:
    net = build_network("reg", TINY).eval()
    # a zero DDF head makes the warp the identity: logits must give back the central crop of the labels
    for conv in (net.ddf_head.high, net.ddf_head.mid, net.ddf_head.low):
        torch.nn.init.zeros_(conv.weight)
        torch.nn.init.zeros_(conv.bias)
    image = _image(48, batch=2)
    with torch.no_grad():
        pred = net(image)
    assert torch.equal(pred[:, :3], torch.zeros_like(pred[:, :3]))
    assert torch.equal(pred[:, 3:].argmax(1), image[:, 2, 20:28, 20:28, 20:28].long())
    assert torch.allclose(pred[:, 3:].softmax(1).max(1).values, torch.ones(2, 8, 8, 8), atol=1e-4)


def test_jrs_reg_is_reg_network() -> None:
    net = build_network("jrs_reg", TINY)
    assert isinstance(net, RegNet)
    assert net.name == "jrs_reg"


def test_inputs_are_configurable() -> None:
    net = build_network("seg", TINY, inputs="If_Sm")
    assert net.input_index.tolist() == [0, 2]
    assert net.body.enc1[0].conv.in_channels == 2
    cs = build_network("cross_stitch", TINY, seg_inputs=["fixed", "moving_label"], reg_inputs="If+Im")
    assert cs.seg_index.tolist() == [0, 2] and cs.reg_index.tolist() == [0, 1]
    # the seg branch must not see the planning CT when it is not selected
    net = SegNet(TINY, inputs=("fixed",)).eval()
    image = _image(48)
    changed = image.clone()
    changed[:, 1] = 100.0
    with torch.no_grad():
        assert torch.equal(net(image), net(changed))


def test_default_inputs_follow_paper() -> None:
    assert build_network("seg", TINY).input_index.tolist() == [0]
    assert build_network("reg", TINY).input_index.tolist() == [0, 1, 2]
    assert build_network("cross_stitch", TINY).seg_index.tolist() == [0]
    assert build_network("cross_stitch", TINY).reg_index.tolist() == [0, 1, 2]


@pytest.mark.parametrize(
    ("inputs", "match"), [(("fixed", "ct"), "unknown network input"), (("If", "fixed"), "twice"), ((), "at least")]
)
def test_resolve_inputs_errors(inputs: tuple[str, ...], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        resolve_inputs(inputs)


def test_factory_errors() -> None:
    with pytest.raises(ValueError, match="unknown network"):
        build_network("unet")
    with pytest.raises(ValueError, match="widths"):
        build_network("seg", (4, 8))
    with pytest.raises(ValueError, match="does not take"):
        build_network("seg", TINY, seg_inputs="If")


def test_factory_name_normalisation() -> None:
    assert build_network("Cross-Stitch", TINY).name == "cross_stitch"
