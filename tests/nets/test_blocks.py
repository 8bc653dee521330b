from __future__ import annotations

import pytest
import torch

from prostate_jrs.nets.blocks import BORDERS, STRIDES, MultiScaleHead, ValidUNet, center_crop, output_sizes


def test_output_sizes_for_paper_patch() -> None:
    assert output_sizes(96) == (56, 30, 17)
    assert output_sizes(64) == (24, 14, 9)


@pytest.mark.parametrize("size", [47, 98, 44])
def test_output_sizes_rejects_unsupported(size: int) -> None:
    with pytest.raises(ValueError, match="input size"):
        output_sizes(size)


@pytest.mark.parametrize("size", [48, 64, 96])
def test_unet_outputs_are_crops_by_borders_and_strides(size: int) -> None:
    body = ValidUNet(2, (2, 3, 4)).eval()
    with torch.no_grad():
        feats = body(torch.randn(1, 2, size, size, size))
    expected = output_sizes(size)
    assert [tuple(f.shape[2:]) for f in feats] == [(n, n, n) for n in expected]
    assert [f.shape[1] for f in feats] == [2, 3, 4]
    for n, border, stride in zip(expected, BORDERS, STRIDES, strict=True):
        assert (size - 2 * border + stride - 1) // stride == n


def test_unet_accepts_anisotropic_input() -> None:
    with torch.no_grad():
        feats = ValidUNet(1, (2, 2, 2)).eval()(torch.randn(1, 1, 48, 56, 64))
    assert tuple(feats[0].shape[2:]) == (8, 16, 24)


def test_unet_layer_order_is_conv_lrelu_bn() -> None:
    conv = ValidUNet(1, (2, 3, 4)).enc1[0]
    kinds = [type(m).__name__ for m in conv.modules()]
    assert kinds.index("Conv3d") < kinds.index("LeakyReLU") < kinds.index("BatchNorm3d")
    assert conv.conv.padding == (0, 0, 0)
    down = ValidUNet(1, (2, 3, 4)).down1
    assert down.conv.stride == (2, 2, 2)


def test_center_crop() -> None:
    x = torch.arange(10.0).view(1, 1, 10, 1, 1).expand(1, 1, 10, 4, 4)
    out = center_crop(x, torch.zeros(1, 1, 6, 2, 2))
    assert out.shape == (1, 1, 6, 2, 2)
    assert out[0, 0, :, 0, 0].tolist() == [2.0, 3.0, 4.0, 5.0, 6.0, 7.0]


def test_multiscale_head_channels() -> None:
    head = MultiScaleHead((2, 3, 4), 5)
    outs = head([torch.zeros(1, 2, 4, 4, 4), torch.zeros(1, 3, 3, 3, 3), torch.zeros(1, 4, 2, 2, 2)])
    assert [o.shape[1] for o in outs] == [5, 5, 5]
