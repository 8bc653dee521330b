"""Ignite/MONAI glue of the bundle's trainer: batch preparation, multi-scale training forward, loss bookkeeping.

The bundle's ``train#trainer`` is MONAI's ``SupervisedTrainer`` (NVFlare's ``MonaiAlgo`` requires one). It calls
``prepare_batch`` -> ``inferer(inputs, network)`` -> ``loss_function(pred, targets)``; the classes here fit the
JRS network and loss into those three slots:

* :class:`JRSPrepareBatch`: ``image`` to the device, targets = the three input channels and the daily labels;
* :class:`MultiScaleInferer`: the training forward returns the multi-scale outputs the loss needs;
* :class:`JRSTrainingLoss`: ``JRSLoss``'s dict of terms -> the scalar the trainer back-propagates, keeping the
  terms for :class:`LossTermsHandler` (TensorBoard/console per epoch, and DWA's once-per-epoch update).

The evaluator's and the inference engine's writers live in :mod:`prostate_jrs.evaluation.writers`; they are
re-exported here, under the names the bundle configs use (``prostate_jrs.engines.EvaluationWriter``, ...).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from monai.data import MetaTensor
from monai.engines.utils import PrepareBatch
from monai.inferers import Inferer
from monai.utils import min_version, optional_import
from torch import nn

# the writers' public home is prostate_jrs.evaluation.writers; the bundle configs name them here
from prostate_jrs.evaluation.writers import EvaluationWriter, InferenceWriter, path_agreement, restore_item
from prostate_jrs.losses import JRSLoss
from prostate_jrs.transforms import FIXED_LABEL, IMAGE

if TYPE_CHECKING:
    from ignite.engine import Engine, Events
else:
    Events, _ = optional_import("ignite.engine", "0.4.11", min_version, "Events")
    Engine, _ = optional_import("ignite.engine", "0.4.11", min_version, "Engine")

__all__ = [
    "EvaluationWriter",
    "InferenceWriter",
    "JRSPrepareBatch",
    "JRSTrainingLoss",
    "LossTermsHandler",
    "MultiScaleInferer",
    "MultiScaleNetwork",
    "path_agreement",
    "restore_item",
]


def _plain(x: torch.Tensor) -> torch.Tensor:
    """The tensor without MONAI metadata."""
    return x.as_tensor() if isinstance(x, MetaTensor) else x


class JRSPrepareBatch(PrepareBatch):
    """``prepare_batch`` of trainer and evaluators: returns ``(image, targets)``.

    ``targets`` holds ``fixed_image``, ``moving_image``, ``moving_label`` (channels 0, 1, 2 of ``image``) and,
    when the batch has it, ``fixed_label``: exactly the keyword arguments of
    :meth:`prostate_jrs.losses.JRSLoss.forward`.
    """

    def __call__(
        self,
        batchdata: dict[str, torch.Tensor],
        device: str | torch.device | None = None,
        non_blocking: bool = False,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Move ``image`` (and ``fixed_label``) to ``device`` and split the targets.

        Raises:
            KeyError: if the batch has no ``image``.
        """
        if IMAGE not in batchdata:
            raise KeyError(f"batch has no {IMAGE!r} (keys: {sorted(batchdata)}); the preprocessing must build it")
        # plain tensors: MetaTensor bookkeeping on every network and loss operation only costs time here; the
        # geometry stays in the batch, where the evaluation handlers read it
        image = _plain(batchdata[IMAGE]).to(device=device, non_blocking=non_blocking, **kwargs)
        targets = {"fixed_image": image[:, 0:1], "moving_image": image[:, 1:2], "moving_label": image[:, 2:3]}
        if isinstance(batchdata.get(FIXED_LABEL), torch.Tensor):  # inference datalists may name unloaded labels
            label = _plain(batchdata[FIXED_LABEL]).to(device=device, non_blocking=non_blocking, **kwargs)
            targets["fixed_label"] = label
        return image, targets


class MultiScaleNetwork(nn.Module):
    """Wraps a JRS network so that ``forward`` returns ``forward_multiscale`` (for DDP, whose forward must run).

    Args:
        network: a :class:`prostate_jrs.nets.JRSNetwork`.
    """

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network

    def forward(self, image: torch.Tensor) -> dict[str, list[torch.Tensor]]:
        """Multi-scale outputs of the wrapped network."""
        return self.network.forward_multiscale(image)  # type: ignore[operator]


class MultiScaleInferer(Inferer):
    """Training ``inferer``: the network's multi-scale outputs ``{"ddf": [...], "logits": [...]}``.

    Calls ``network.forward_multiscale``; a network without it (``DistributedDataParallel`` around a
    :class:`MultiScaleNetwork`) is called directly and must return the same dictionary.
    """

    def __call__(self, inputs: torch.Tensor, network: Any, *args: Any, **kwargs: Any) -> dict[str, list[torch.Tensor]]:
        """Run the multi-scale forward.

        Raises:
            TypeError: if the network returns no dictionary of outputs.
        """
        inputs = _plain(inputs)
        if hasattr(network, "forward_multiscale"):
            outputs = network.forward_multiscale(inputs, *args, **kwargs)
        else:
            outputs = network(inputs, *args, **kwargs)
        if not isinstance(outputs, Mapping):
            raise TypeError(
                f"training forward returned {type(outputs).__name__}; expected the multi-scale dict "
                "(wrap the network in prostate_jrs.engines.MultiScaleNetwork before DistributedDataParallel)"
            )
        return dict(outputs)


class JRSTrainingLoss(nn.Module):
    """``loss_function`` of the trainer: :class:`~prostate_jrs.losses.JRSLoss` returning its total.

    The terms of the last call are kept in :attr:`last_terms` (detached floats) for :class:`LossTermsHandler`.
    Its parameters are the loss's (homoscedastic log-variances): give them to the optimizer.

    Args:
        loss: the multi-term loss.
    """

    def __init__(self, loss: JRSLoss) -> None:
        super().__init__()
        self.loss = loss
        self.last_terms: dict[str, float] = {}

    def forward(
        self, outputs: Mapping[str, Sequence[torch.Tensor]], targets: Mapping[str, torch.Tensor]
    ) -> torch.Tensor:
        """Total loss of the multi-scale ``outputs`` against the ``targets`` of :class:`JRSPrepareBatch`."""
        terms = self.loss(outputs, **targets)
        self.last_terms = {k: float(v.detach()) for k, v in terms.items() if v.numel() == 1}
        return terms["loss"]


class LossTermsHandler:
    """Per-epoch means of the loss terms into ``engine.state.metrics``, and DWA's epoch update.

    Attach it before ``StatsHandler``/``TensorBoardStatsHandler`` so they report ``train_<term>`` (``seg``,
    ``reg``, ``seg_reg``, ``ncc``, ``bending``, ``weight_<term>``) every epoch.

    Args:
        loss: the trainer's :class:`JRSTrainingLoss`.
        prefix: metric name prefix.
    """

    def __init__(self, loss: JRSTrainingLoss, prefix: str = "train_") -> None:
        self.loss = loss
        self.prefix = prefix
        self._sums: dict[str, float] = {}
        self._count = 0

    def attach(self, engine: Engine) -> None:
        """Register on ITERATION_COMPLETED and EPOCH_COMPLETED."""
        engine.add_event_handler(Events.EPOCH_STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._accumulate)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._epoch_completed)

    def _reset(self, engine: Engine) -> None:
        self._sums, self._count = {}, 0

    def _accumulate(self, engine: Engine) -> None:
        for key, value in self.loss.last_terms.items():
            self._sums[key] = self._sums.get(key, 0.0) + value
        self._count += 1

    def _epoch_completed(self, engine: Engine) -> None:
        if self._count:
            for key, total in self._sums.items():
                engine.state.metrics[f"{self.prefix}{key}"] = total / self._count
        weights = self.loss.loss.epoch_end()
        for term, weight in zip(self.loss.loss.terms, weights.tolist(), strict=True):
            engine.state.metrics[f"{self.prefix}next_weight_{term}"] = float(weight)
