"""Common interface of the six networks: input selection and the bundle-facing ``pred`` tensor.

Every network takes ``image`` = (daily CT, planning CT, planning label map) stacked as (B, 3, D, H, W) and
returns ``pred`` (B, 8, D - 40, H - 40, W - 40): channels 0-2 the DDF (voxel units of the input grid, channel
``c`` along spatial axis ``c``; warped planning(x) = planning(x + 20 + ddf(x)) in patch coordinates, see
:mod:`prostate_jrs.nets.warp`), channels 3-7 segmentation logits for labels 0..4. ``forward_multiscale``
gives the training outputs ``{"ddf": [56^3, 30^3, 17^3], "logits": [...]}`` (only the keys of the tasks the
network has; lists ordered high to low resolution).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from prostate_jrs.labels import NUM_CLASSES
from prostate_jrs.nets.blocks import BORDERS
from prostate_jrs.nets.warp import labels_to_onehot, warp_patch

__all__ = ["INPUT_CHANNELS", "NUM_CLASSES", "NUM_DDF_CHANNELS", "JRSNetwork", "OneInputNetwork", "resolve_inputs"]

#: Channel of each named input in ``image``.
INPUT_CHANNELS: dict[str, int] = {"fixed": 0, "moving": 1, "moving_label": 2}
_ALIASES: dict[str, str] = {
    "if": "fixed",
    "daily": "fixed",
    "fixed_image": "fixed",
    "im": "moving",
    "planning": "moving",
    "moving_image": "moving",
    "sm": "moving_label",
    "planning_label": "moving_label",
    "moving_labels": "moving_label",
}
NUM_DDF_CHANNELS = 3
# log-probability floor used when logits are made from warped label probabilities (margin ~13.8)
_LOG_FLOOR = 1e-6


def resolve_inputs(inputs: Sequence[str] | str) -> list[int]:
    """Channel indices of ``image`` for input names (``fixed``/``If``, ``moving``/``Im``, ``moving_label``/``Sm``).

    Raises:
        ValueError: on an unknown or repeated name, or an empty selection.
    """
    if isinstance(inputs, str):
        # one name, or the paper's experiment spelling "If_Im_Sm" / "If+Im"
        single = inputs.lower() in INPUT_CHANNELS or inputs.lower() in _ALIASES
        inputs = [inputs] if single else [part for part in re.split(r"[+_,\s]+", inputs) if part]
    indices: list[int] = []
    for name in inputs:
        key = _ALIASES.get(name.lower(), name.lower())
        if key not in INPUT_CHANNELS:
            raise ValueError(f"unknown network input {name!r}; expected some of {list(INPUT_CHANNELS)} (or If, Im, Sm)")
        if INPUT_CHANNELS[key] in indices:
            raise ValueError(f"network input {name!r} given twice in {list(inputs)}")
        indices.append(INPUT_CHANNELS[key])
    if not indices:
        raise ValueError("a network branch needs at least one input")
    return indices


class JRSNetwork(nn.Module):
    """Base class: subclasses implement :meth:`forward_multiscale`; :meth:`forward` builds ``pred``.

    Single-task networks fill the task they lack: ``seg`` gives a zero DDF; ``reg``/``jrs_reg`` give logits
    ``log(max(p, 1e-6))`` where ``p`` is the one-hot planning label map warped trilinearly with the predicted
    DDF (so ``softmax`` returns ``p`` and ``argmax`` is the label-wise linearly interpolated warp).
    """

    #: canonical network name (``build_network`` sets ``jrs_reg`` on a :class:`RegNet`)
    name = ""
    if TYPE_CHECKING:  # declared for the type checker only: TorchScript reads class annotations and fails on them
        tasks: tuple[str, ...]
    #: tasks the network predicts itself: ``seg`` (logits) and/or ``reg`` (DDF)
    tasks = ()

    def __init__(self) -> None:
        super().__init__()
        self.num_classes = NUM_CLASSES
        self.border = BORDERS[0]
        self.log_floor = _LOG_FLOOR

    @staticmethod
    def _index(inputs: Sequence[str] | str) -> torch.Tensor:
        return torch.tensor(resolve_inputs(inputs), dtype=torch.long)

    def forward_multiscale(self, image: torch.Tensor) -> dict[str, list[torch.Tensor]]:
        """Multi-scale outputs ``{"ddf": [...], "logits": [...]}`` (high, mid, low resolution)."""
        raise NotImplementedError

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """``pred`` (B, 8, D - 40, H - 40, W - 40): 3 DDF channels then 5 segmentation logits."""
        return self.compose(image, self.forward_multiscale(image))

    def compose(self, image: torch.Tensor, outputs: dict[str, list[torch.Tensor]]) -> torch.Tensor:
        """Build ``pred`` from the high-resolution outputs, filling a missing task (see class docstring)."""
        if "ddf" in outputs:
            ddf = outputs["ddf"][0]
            if "logits" in outputs:
                logits = outputs["logits"][0]
            else:
                onehot = labels_to_onehot(image[:, 2:3], self.num_classes).to(ddf.dtype)
                prob = warp_patch(onehot, ddf, self.border, 1, "bilinear")
                logits = torch.log(prob.clamp_min(self.log_floor))
        else:
            logits = outputs["logits"][0]
            ddf = torch.zeros_like(logits[:, :3])
        return torch.cat([ddf, logits], dim=1)


class OneInputNetwork(JRSNetwork):
    """A network whose encoder sees one selection of ``image`` channels (every network but cross-stitch).

    Args:
        inputs: channels of ``image`` it sees, see :func:`resolve_inputs`.
    """

    if TYPE_CHECKING:  # the buffer, declared for the type checker only (TorchScript would read the annotation)
        input_index: torch.Tensor

    def __init__(self, inputs: Sequence[str] | str) -> None:
        super().__init__()
        self.register_buffer("input_index", self._index(inputs), persistent=False)

    def select_inputs(self, image: torch.Tensor) -> torch.Tensor:
        """The channels of ``image`` (B, 3, D, H, W) this network sees."""
        return torch.index_select(image, 1, self.input_index)
