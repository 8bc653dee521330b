"""One-branch networks: ``seg``, ``reg``/``jrs_reg`` and ``dense``.

Networks 1-4 of docs/ARCHITECTURE.md, "Network architecture".
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from prostate_jrs.nets.base import NUM_CLASSES, NUM_DDF_CHANNELS, JRSNetwork
from prostate_jrs.nets.blocks import MultiScaleHead, ValidUNet, init_weights

__all__ = ["DenseJRSNet", "RegNet", "SegNet"]


class SegNet(JRSNetwork):
    """Single-task segmentation U-Net; ``pred`` carries a zero DDF.

    Args:
        widths: feature maps per level (paper: ``(23, 45, 91)``).
        inputs: channels of ``image`` it sees (paper variants ``If``, ``If_Sm``, ``If_Im_Sm``).
    """

    name = "seg"
    tasks = ("seg",)
    if TYPE_CHECKING:  # the buffer, declared for the type checker only (TorchScript would read the annotation)
        input_index: torch.Tensor

    def __init__(self, widths: Sequence[int] = (23, 45, 91), inputs: Sequence[str] | str = ("fixed",)) -> None:
        super().__init__()
        self.register_buffer("input_index", self._index(inputs), persistent=False)
        self.body = ValidUNet(len(self.input_index), widths)
        self.seg_head = MultiScaleHead(widths, NUM_CLASSES)
        init_weights(self)

    def forward_multiscale(self, image: torch.Tensor) -> dict[str, list[torch.Tensor]]:
        """``{"logits": [high, mid, low]}``."""
        features = self.body(torch.index_select(image, 1, self.input_index))
        return {"logits": self.seg_head(features)}


class RegNet(JRSNetwork):
    """Single-task registration U-Net, also the ``jrs_reg`` network (same net, extra loss term).

    ``pred`` logits come from the planning labels warped with the predicted DDF (see :class:`JRSNetwork`).

    Args:
        widths: feature maps per level (paper: ``(23, 45, 91)``).
        inputs: channels of ``image`` it sees (paper variants ``If_Im``, ``If_Im_Sm``).
    """

    name = "reg"
    tasks = ("reg",)
    if TYPE_CHECKING:  # the buffer, declared for the type checker only (TorchScript would read the annotation)
        input_index: torch.Tensor

    def __init__(
        self,
        widths: Sequence[int] = (23, 45, 91),
        inputs: Sequence[str] | str = ("fixed", "moving", "moving_label"),
    ) -> None:
        super().__init__()
        self.register_buffer("input_index", self._index(inputs), persistent=False)
        self.body = ValidUNet(len(self.input_index), widths)
        self.ddf_head = MultiScaleHead(widths, NUM_DDF_CHANNELS)
        init_weights(self)

    def forward_multiscale(self, image: torch.Tensor) -> dict[str, list[torch.Tensor]]:
        """``{"ddf": [high, mid, low]}``."""
        features = self.body(torch.index_select(image, 1, self.input_index))
        return {"ddf": self.ddf_head(features)}


class DenseJRSNet(JRSNetwork):
    """Hard parameter sharing (early fusion): one U-Net, a segmentation and a DDF head at each scale.

    Args:
        widths: feature maps per level (TF@ad938ce: ``(23, 45, 91)``).
        inputs: channels of ``image`` it sees (paper: ``If_Im_Sm``).
    """

    name = "dense"
    tasks = ("seg", "reg")
    if TYPE_CHECKING:  # the buffer, declared for the type checker only (TorchScript would read the annotation)
        input_index: torch.Tensor

    def __init__(
        self,
        widths: Sequence[int] = (23, 45, 91),
        inputs: Sequence[str] | str = ("fixed", "moving", "moving_label"),
    ) -> None:
        super().__init__()
        self.register_buffer("input_index", self._index(inputs), persistent=False)
        self.body = ValidUNet(len(self.input_index), widths)
        self.seg_head = MultiScaleHead(widths, NUM_CLASSES)
        self.ddf_head = MultiScaleHead(widths, NUM_DDF_CHANNELS)
        init_weights(self)

    def forward_multiscale(self, image: torch.Tensor) -> dict[str, list[torch.Tensor]]:
        """``{"ddf": [high, mid, low], "logits": [high, mid, low]}``."""
        features = self.body(torch.index_select(image, 1, self.input_index))
        return {"ddf": self.ddf_head(features), "logits": self.seg_head(features)}
