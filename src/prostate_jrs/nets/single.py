"""One-branch networks: ``seg``, ``reg``/``jrs_reg`` and ``dense``.

Networks 1-4 of docs/ARCHITECTURE.md, "Network architecture". All three are one :class:`ValidUNet` with
multi-scale heads; they differ only in which heads they have (:class:`_HeadedUNet`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from prostate_jrs.nets.base import NUM_CLASSES, NUM_DDF_CHANNELS, OneInputNetwork
from prostate_jrs.nets.blocks import MultiScaleHead, ValidUNet, init_weights

__all__ = ["DenseJRSNet", "RegNet", "SegNet"]

_ALL_INPUTS = ("fixed", "moving", "moving_label")


class _HeadedUNet(OneInputNetwork):
    """One U-Net body with a segmentation head (``seg_head``) and/or a DDF head (``ddf_head``).

    The heads are created segmentation first, so that :func:`init_weights` draws their weights in the order the
    released checkpoints were made with.

    Args:
        widths: feature maps per level.
        inputs: channels of ``image`` it sees.
        seg: whether it has a segmentation head.
        reg: whether it has a DDF head.
    """

    def __init__(self, widths: Sequence[int], inputs: Sequence[str] | str, seg: bool, reg: bool) -> None:
        super().__init__(inputs)
        self.body = ValidUNet(len(self.input_index), widths)
        if seg:
            self.seg_head = MultiScaleHead(widths, NUM_CLASSES)
        if reg:
            self.ddf_head = MultiScaleHead(widths, NUM_DDF_CHANNELS)
        init_weights(self)


class SegNet(_HeadedUNet):
    """Single-task segmentation U-Net; ``pred`` carries a zero DDF.

    Args:
        widths: feature maps per level (paper: ``(23, 45, 91)``).
        inputs: channels of ``image`` it sees (paper variants ``If``, ``If_Sm``, ``If_Im_Sm``).
    """

    name = "seg"
    tasks = ("seg",)

    def __init__(self, widths: Sequence[int] = (23, 45, 91), inputs: Sequence[str] | str = ("fixed",)) -> None:
        super().__init__(widths, inputs, seg=True, reg=False)

    def forward_multiscale(self, image: torch.Tensor) -> dict[str, list[torch.Tensor]]:
        """``{"logits": [high, mid, low]}``."""
        return {"logits": self.seg_head(self.body(self.select_inputs(image)))}


class RegNet(_HeadedUNet):
    """Single-task registration U-Net, also the ``jrs_reg`` network (same net, extra loss term).

    ``pred`` logits come from the planning labels warped with the predicted DDF (see :class:`JRSNetwork`).

    Args:
        widths: feature maps per level (paper: ``(23, 45, 91)``).
        inputs: channels of ``image`` it sees (paper variants ``If_Im``, ``If_Im_Sm``).
    """

    name = "reg"
    tasks = ("reg",)

    def __init__(self, widths: Sequence[int] = (23, 45, 91), inputs: Sequence[str] | str = _ALL_INPUTS) -> None:
        super().__init__(widths, inputs, seg=False, reg=True)

    def forward_multiscale(self, image: torch.Tensor) -> dict[str, list[torch.Tensor]]:
        """``{"ddf": [high, mid, low]}``."""
        return {"ddf": self.ddf_head(self.body(self.select_inputs(image)))}


class DenseJRSNet(_HeadedUNet):
    """Hard parameter sharing (early fusion): one U-Net, a segmentation and a DDF head at each scale.

    Args:
        widths: feature maps per level (TF@ad938ce: ``(23, 45, 91)``).
        inputs: channels of ``image`` it sees (paper: ``If_Im_Sm``).
    """

    name = "dense"
    tasks = ("seg", "reg")

    def __init__(self, widths: Sequence[int] = (23, 45, 91), inputs: Sequence[str] | str = _ALL_INPUTS) -> None:
        super().__init__(widths, inputs, seg=True, reg=True)

    def forward_multiscale(self, image: torch.Tensor) -> dict[str, list[torch.Tensor]]:
        """``{"ddf": [high, mid, low], "logits": [high, mid, low]}``."""
        features = self.body(self.select_inputs(image))
        return {"ddf": self.ddf_head(features), "logits": self.seg_head(features)}
