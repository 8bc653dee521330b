from __future__ import annotations

import torch
from monai.networks.blocks import Warp

from prostate_jrs.nets.warp import crop_and_decimate, labels_to_onehot, warp_patch


def test_zero_ddf_is_identity_on_each_scale() -> None:
    torch.manual_seed(0)
    moving = torch.randn(2, 3, 48, 48, 48, dtype=torch.float64)
    for border, stride, size in [(20, 1, 8), (18, 2, 6), (14, 4, 5), (0, 1, 48)]:
        ddf = torch.zeros(2, 3, size, size, size, dtype=torch.float64)
        expected = crop_and_decimate(moving, border, stride, (size, size, size))
        assert torch.allclose(warp_patch(moving, ddf, border, stride), expected, atol=1e-10)


def test_zero_ddf_identity_float32_nearest() -> None:
    labels = torch.randint(0, 5, (1, 1, 48, 48, 48)).float()
    out = warp_patch(labels, torch.zeros(1, 3, 8, 8, 8), 20, 1, mode="nearest")
    assert torch.equal(out, labels[:, :, 20:28, 20:28, 20:28])


def test_integer_shift_samples_moving_outside_the_output_crop() -> None:
    moving = torch.randn(1, 1, 48, 48, 48, dtype=torch.float64)
    ddf = torch.zeros(1, 3, 8, 8, 8, dtype=torch.float64)
    ddf[:, 0] = -7.0  # reaches 13..20 along axis 0, outside the central 8^3 crop
    ddf[:, 2] = 3.0
    out = warp_patch(moving, ddf, 20, 1)
    assert torch.allclose(out, moving[:, :, 13:21, 20:28, 23:31], atol=1e-10)


def test_stride_scales_displacement_to_input_voxels() -> None:
    moving = torch.randn(1, 1, 48, 48, 48, dtype=torch.float64)
    ddf = torch.zeros(1, 3, 5, 5, 5, dtype=torch.float64)
    ddf[:, 1] = 1.0  # one low-resolution voxel = 4 input voxels
    out = warp_patch(moving, ddf, 14, 4)
    assert torch.allclose(out, moving[:, :, 14:31:4, 18:35:4, 14:31:4], atol=1e-10)


def test_matches_monai_warp_on_whole_volume() -> None:
    torch.manual_seed(1)
    image = torch.randn(1, 2, 12, 10, 14, dtype=torch.float64)
    ddf = 2 * torch.randn(1, 3, 12, 10, 14, dtype=torch.float64)
    assert torch.allclose(warp_patch(image, ddf, 0, 1), Warp()(image, ddf), atol=1e-8)


def test_labels_to_onehot() -> None:
    labels = torch.tensor([0.0, 1.0, 4.0, 3.0]).view(1, 1, 4, 1, 1)
    onehot = labels_to_onehot(labels)
    assert onehot.shape == (1, 5, 4, 1, 1)
    assert onehot.argmax(1).flatten().tolist() == [0, 1, 4, 3]
    assert torch.equal(onehot.sum(1), torch.ones(1, 4, 1, 1))
