"""Building blocks of the paper's 3-level valid-convolution U-Net (TF@ad938ce).

Architecture: docs/ARCHITECTURE.md, "Network architecture".

Every convolution is ``Conv3d -> LeakyReLU(0.2) -> BatchNorm`` (the TF order), 3x3x3 and unpadded, except the
strided downsampling convolution, which is padded by one voxel. Skips are centre-cropped before concatenation.
For an input of ``n`` voxels per axis (``n`` divisible by 4, ``n >= 48``) the three outputs have ``n - 40``,
``n / 2 - 18`` and ``n / 4 - 7`` voxels (56, 30, 17 for 96), i.e. they are the input centre-cropped by
:data:`BORDERS` voxels and decimated by :data:`STRIDES`.

MONAI has no valid-convolution U-Net with multi-scale heads, so the U-Net itself is hand-written from MONAI
``Convolution`` blocks.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.blocks import Convolution
from torch import nn

__all__ = [
    "BORDERS",
    "STRIDES",
    "MultiScaleHead",
    "ValidUNet",
    "center_crop",
    "double_conv",
    "down_conv",
    "init_weights",
    "merge_skip",
    "output_sizes",
    "valid_conv",
]

#: Border (voxels per side) that each output scale lacks relative to the input: high, mid, low resolution.
BORDERS: tuple[int, int, int] = (20, 18, 14)
#: Stride of each output scale relative to the input grid: high, mid, low resolution.
STRIDES: tuple[int, int, int] = (1, 2, 4)

_ACT = ("leakyrelu", {"negative_slope": 0.2})


def valid_conv(in_channels: int, out_channels: int, strides: int = 1) -> Convolution:
    """3x3x3 ``Conv -> LeakyReLU(0.2) -> BatchNorm``; unpadded, or padded by one voxel when strided.

    The strided convolution uses PyTorch's symmetric padding of 1, not TF's 'same' (0, 1) padding: the
    parameter count is identical and the 17^3 and 30^3 outputs then sit exactly on the
    ``BORDERS``/``STRIDES`` target grids (TF's padding shifts the low-resolution grid by 3/4 voxel).
    """
    return Convolution(
        spatial_dims=3,
        in_channels=in_channels,
        out_channels=out_channels,
        strides=strides,
        kernel_size=3,
        adn_ordering="AN",
        act=_ACT,
        norm="batch",
        bias=True,
        padding=1 if strides > 1 else 0,
    )


def double_conv(in_channels: int, out_channels: int) -> nn.Sequential:
    """Two unpadded convolutions (``n -> n - 4`` voxels)."""
    return nn.Sequential(valid_conv(in_channels, out_channels), valid_conv(out_channels, out_channels))


def down_conv(channels: int) -> Convolution:
    """Strided (x0.5) 3x3x3 convolution keeping the channel count, as in TF@ad938ce."""
    return valid_conv(channels, channels, strides=2)


def center_crop(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Centre-crop the spatial dims of ``x`` (B, C, D, H, W) to those of ``like``."""
    d0 = (x.shape[2] - like.shape[2]) // 2
    h0 = (x.shape[3] - like.shape[3]) // 2
    w0 = (x.shape[4] - like.shape[4]) // 2
    return x[:, :, d0 : d0 + like.shape[2], h0 : h0 + like.shape[3], w0 : w0 + like.shape[4]]


def merge_skip(upsampled: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
    """Concatenate ``upsampled`` with the centre-cropped ``skip`` (upsampled channels first, as in TF)."""
    return torch.cat([upsampled, center_crop(skip, upsampled)], dim=1)


def init_weights(module: nn.Module) -> None:
    """TF@ad938ce initialisation: conv weights from N(0, 0.02), biases 0; BatchNorm keeps gamma=1, beta=0."""
    for m in module.modules():
        if isinstance(m, nn.Conv3d):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def output_sizes(input_size: int) -> tuple[int, int, int]:
    """Output sizes (high, mid, low resolution) for an input of ``input_size`` voxels per axis.

    Raises:
        ValueError: if the U-Net cannot process that size (not divisible by 4, or below 48).
    """
    if input_size % 4 != 0 or input_size < 48:
        raise ValueError(f"input size {input_size} not supported: must be divisible by 4 and at least 48")
    return input_size - 40, input_size // 2 - 18, input_size // 4 - 7


class ValidUNet(nn.Module):
    """Head-less 3-level valid-convolution U-Net body returning features at three resolutions.

    The stages are public attributes so that multi-branch networks (SEDD, cross-stitch) can interleave them.

    Args:
        in_channels: number of input channels.
        widths: feature maps per level, e.g. ``(23, 45, 91)``.
    """

    def __init__(self, in_channels: int, widths: Sequence[int]) -> None:
        super().__init__()
        f1, f2, f3 = (int(w) for w in widths)
        self.widths = (f1, f2, f3)
        self.enc1 = double_conv(in_channels, f1)
        self.down1 = down_conv(f1)
        self.enc2 = double_conv(f1, f2)
        self.down2 = down_conv(f2)
        self.bottleneck = double_conv(f2, f3)
        self.up = nn.Upsample(scale_factor=2.0, mode="nearest")
        self.dec2 = double_conv(f3 + f2, f2)
        self.dec1 = double_conv(f2 + f1, f1)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Return features ``[high (n-40), mid (n/2-18), low (n/4-7)]`` with ``widths[0], [1], [2]`` channels."""
        skip1 = self.enc1(x)
        skip2 = self.enc2(self.down1(skip1))
        low = self.bottleneck(self.down2(skip2))
        mid = self.dec2(merge_skip(self.up(low), skip2))
        high = self.dec1(merge_skip(self.up(mid), skip1))
        return [high, mid, low]


class MultiScaleHead(nn.Module):
    """Three 1x1x1 convolutions with bias and no activation, one per output resolution.

    Args:
        widths: feature maps per level (high, mid, low resolution input features).
        out_channels: output channels (5 segmentation logits or 3 DDF components).
    """

    def __init__(self, widths: Sequence[int], out_channels: int) -> None:
        super().__init__()
        f1, f2, f3 = (int(w) for w in widths)
        self.high = nn.Conv3d(f1, out_channels, kernel_size=1)
        self.mid = nn.Conv3d(f2, out_channels, kernel_size=1)
        self.low = nn.Conv3d(f3, out_channels, kernel_size=1)

    def forward(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        """Map ``[high, mid, low]`` features to ``[high, mid, low]`` outputs."""
        return [self.high(features[0]), self.mid(features[1]), self.low(features[2])]
