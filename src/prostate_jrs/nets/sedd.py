"""Shared encoder, double decoder (``sedd``), as in TF@ad938ce (docs/ARCHITECTURE.md, "Network architecture", 5).

Levels 1 and 2 of the encoder (with the first strided convolution) are shared; from the second strided
downsampling on, bottleneck and decoder are task-specific, and both decoders read the shared skips. (The
authors' later PyTorch code shares the bottleneck too; we follow the TF model the paper used.)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from prostate_jrs.nets.base import NUM_CLASSES, NUM_DDF_CHANNELS, OneInputNetwork
from prostate_jrs.nets.blocks import MultiScaleHead, double_conv, down_conv, init_weights, merge_skip

__all__ = ["SEDDNet"]


class _TaskTail(nn.Module):
    """Task-specific part of SEDD: second strided conv, bottleneck, decoder."""

    def __init__(self, widths: tuple[int, int, int]) -> None:
        super().__init__()
        f1, f2, f3 = widths
        self.down2 = down_conv(f2)
        self.bottleneck = double_conv(f2, f3)
        self.up = nn.Upsample(scale_factor=2.0, mode="nearest")
        self.dec2 = double_conv(f3 + f2, f2)
        self.dec1 = double_conv(f2 + f1, f1)

    def forward(self, skip1: torch.Tensor, skip2: torch.Tensor) -> list[torch.Tensor]:
        low = self.bottleneck(self.down2(skip2))
        mid = self.dec2(merge_skip(self.up(low), skip2))
        high = self.dec1(merge_skip(self.up(mid), skip1))
        return [high, mid, low]


class SEDDNet(OneInputNetwork):
    """Shared encoder (levels 1-2), separate bottleneck and decoder per task.

    Args:
        widths: feature maps per level (paper: ``(16, 32, 64)``).
        inputs: channels of ``image`` the shared encoder sees (paper: ``If_Im_Sm``).
    """

    name = "sedd"
    tasks = ("seg", "reg")

    def __init__(
        self,
        widths: Sequence[int] = (16, 32, 64),
        inputs: Sequence[str] | str = ("fixed", "moving", "moving_label"),
    ) -> None:
        super().__init__(inputs)
        f1, f2, f3 = (int(w) for w in widths)
        self.enc1 = double_conv(len(self.input_index), f1)
        self.down1 = down_conv(f1)
        self.enc2 = double_conv(f1, f2)
        self.seg_tail = _TaskTail((f1, f2, f3))
        self.reg_tail = _TaskTail((f1, f2, f3))
        self.seg_head = MultiScaleHead((f1, f2, f3), NUM_CLASSES)
        self.ddf_head = MultiScaleHead((f1, f2, f3), NUM_DDF_CHANNELS)
        init_weights(self)

    def forward_multiscale(self, image: torch.Tensor) -> dict[str, list[torch.Tensor]]:
        """``{"ddf": [high, mid, low], "logits": [high, mid, low]}``."""
        skip1 = self.enc1(self.select_inputs(image))
        skip2 = self.enc2(self.down1(skip1))
        return {
            "ddf": self.ddf_head(self.reg_tail(skip1, skip2)),
            "logits": self.seg_head(self.seg_tail(skip1, skip2)),
        }
