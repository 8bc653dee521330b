"""Cross-stitch network (``cross_stitch``; MIDL 2020), as in TF@ad938ce.

Network 6 of docs/ARCHITECTURE.md, "Network architecture".

Two full U-Nets, a segmentation and a registration branch, joined by four cross-stitch units (Misra et al.,
CVPR 2016): after each of the two strided downsamplings and right after each of the two upsamplings (before
the skip concatenation). The cross-stitch unit is hand-written: MONAI has none.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from prostate_jrs.nets.base import NUM_CLASSES, NUM_DDF_CHANNELS, JRSNetwork
from prostate_jrs.nets.blocks import MultiScaleHead, ValidUNet, init_weights, merge_skip

__all__ = ["CrossStitchNet", "CrossStitchUnit"]


class CrossStitchUnit(nn.Module):
    """Per-channel learned 2x2 mixing of two tasks' activations.

    ``a' = alpha[0, 0] * a + alpha[0, 1] * b`` and ``b' = alpha[1, 0] * a + alpha[1, 1] * b``, channel-wise.

    Args:
        channels: channels of each of the two activations.
        init: ``"truncated_normal"`` (TF@ad938ce: N(mean, std) truncated to mean +- 2 std, i.e. [0, 1]) or
            ``"constant"`` (every alpha = ``mean``, as in the authors' PyTorch code).
        mean: mean of the initial alphas.
        std: standard deviation of the initial alphas (truncated normal only).

    Raises:
        ValueError: on an unknown ``init``.
    """

    def __init__(self, channels: int, init: str = "truncated_normal", mean: float = 0.5, std: float = 0.25) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.empty(2, 2, channels))
        if init == "truncated_normal":
            nn.init.trunc_normal_(self.alpha, mean=mean, std=std, a=mean - 2 * std, b=mean + 2 * std)
        elif init == "constant":
            nn.init.constant_(self.alpha, mean)
        else:
            raise ValueError(f"unknown cross-stitch init {init!r}; expected 'truncated_normal' or 'constant'")

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mix ``a`` and ``b`` (both (B, C, ...)); returns the mixed pair."""
        alpha = self.alpha.view(2, 2, 1, -1, 1, 1, 1).to(a.dtype)
        return alpha[0, 0] * a + alpha[0, 1] * b, alpha[1, 0] * a + alpha[1, 1] * b


class CrossStitchNet(JRSNetwork):
    """Segmentation and registration U-Nets joined by four cross-stitch units.

    Args:
        widths: feature maps per level of each branch (paper: ``(16, 32, 64)``).
        seg_inputs: channels of ``image`` the segmentation branch sees (TF@ad938ce: ``If``).
        reg_inputs: channels the registration branch sees (TF@ad938ce: ``If_Im_Sm``).
        alpha_init: cross-stitch initialisation, see :class:`CrossStitchUnit`.
        alpha_mean: mean of the initial alphas.
        alpha_std: standard deviation of the initial alphas.
    """

    name = "cross_stitch"
    tasks = ("seg", "reg")
    if TYPE_CHECKING:  # the buffers, declared for the type checker only (TorchScript would read the annotations)
        seg_index: torch.Tensor
        reg_index: torch.Tensor

    def __init__(
        self,
        widths: Sequence[int] = (16, 32, 64),
        seg_inputs: Sequence[str] | str = ("fixed",),
        reg_inputs: Sequence[str] | str = ("fixed", "moving", "moving_label"),
        alpha_init: str = "truncated_normal",
        alpha_mean: float = 0.5,
        alpha_std: float = 0.25,
    ) -> None:
        super().__init__()
        f1, f2, f3 = (int(w) for w in widths)
        self.register_buffer("seg_index", self._index(seg_inputs), persistent=False)
        self.register_buffer("reg_index", self._index(reg_inputs), persistent=False)
        self.seg_body = ValidUNet(len(self.seg_index), (f1, f2, f3))
        self.reg_body = ValidUNet(len(self.reg_index), (f1, f2, f3))
        self.seg_head = MultiScaleHead((f1, f2, f3), NUM_CLASSES)
        self.ddf_head = MultiScaleHead((f1, f2, f3), NUM_DDF_CHANNELS)
        init_weights(self)
        # created after init_weights, which only touches convolutions anyway
        self.stitch_down1 = CrossStitchUnit(f1, alpha_init, alpha_mean, alpha_std)
        self.stitch_down2 = CrossStitchUnit(f2, alpha_init, alpha_mean, alpha_std)
        self.stitch_up1 = CrossStitchUnit(f3, alpha_init, alpha_mean, alpha_std)
        self.stitch_up2 = CrossStitchUnit(f2, alpha_init, alpha_mean, alpha_std)

    def forward_multiscale(self, image: torch.Tensor) -> dict[str, list[torch.Tensor]]:
        """``{"ddf": [high, mid, low], "logits": [high, mid, low]}``."""
        # s_* = segmentation branch, r_* = registration branch; submodules are not aliased to locals because
        # TorchScript cannot call a module held in a local variable
        s_skip1 = self.seg_body.enc1(torch.index_select(image, 1, self.seg_index))
        r_skip1 = self.reg_body.enc1(torch.index_select(image, 1, self.reg_index))
        s_x, r_x = self.stitch_down1(self.seg_body.down1(s_skip1), self.reg_body.down1(r_skip1))
        s_skip2, r_skip2 = self.seg_body.enc2(s_x), self.reg_body.enc2(r_x)
        s_x, r_x = self.stitch_down2(self.seg_body.down2(s_skip2), self.reg_body.down2(r_skip2))
        s_low, r_low = self.seg_body.bottleneck(s_x), self.reg_body.bottleneck(r_x)
        s_x, r_x = self.stitch_up1(self.seg_body.up(s_low), self.reg_body.up(r_low))
        s_mid = self.seg_body.dec2(merge_skip(s_x, s_skip2))
        r_mid = self.reg_body.dec2(merge_skip(r_x, r_skip2))
        s_x, r_x = self.stitch_up2(self.seg_body.up(s_mid), self.reg_body.up(r_mid))
        s_high = self.seg_body.dec1(merge_skip(s_x, s_skip1))
        r_high = self.reg_body.dec1(merge_skip(r_x, r_skip1))
        return {
            "ddf": self.ddf_head([r_high, r_mid, r_low]),
            "logits": self.seg_head([s_high, s_mid, s_low]),
        }
