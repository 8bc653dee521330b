"""Losses of JRS-MTL and the multi-task loss weighting, with the authors' defects fixed.

The paper's losses: docs/ARCHITECTURE.md, "Losses".

Terms, each averaged over the three output scales with ``level_weights``:

* ``reg`` = local NCC (window 9) + ``bending_weight`` (0.5) x bending energy, planning CT warped to daily;
* ``seg_reg`` = Dice between the daily labels and the one-hot planning labels warped **trilinearly** with the
  DDF (the authors warp with nearest sampling, which gives the DDF no gradient);
* ``seg`` = soft Dice of the segmentation logits against the daily labels.

Targets at each scale are the 96^3 patch centre-cropped by ``BORDERS`` (20, 18, 14) and decimated by
``STRIDES`` (1, 2, 4); the moving patch is sampled in full at ``border + stride * (grid + ddf)``
(:func:`prostate_jrs.nets.warp.warp_patch`).

Deliberate differences from the paper's code: trilinear warping of one-hot labels for ``seg_reg``; the moving
patch is sampled in full (the authors sample only its central crop, clamped at the crop's edge); MONAI's
``BendingEnergyLoss`` (compact [1, -2, 1] and 4-point mixed stencils on channels-first fields, where the
authors' half-step central differences ran along the wrong axes); the homoscedastic log-variances are
parameters the optimizer updates (add ``loss.parameters()`` to it); DWA's weight update is implemented.
The NCC defaults to the authors' form (unsquared, clamped), written on MONAI's ``separable_filtering``,
because MONAI's ``LocalNormalizedCrossCorrelationLoss`` squares the coefficient (rewarding anti-correlation);
``ncc_form="squared"`` selects MONAI's. Dice terms are MONAI ``DiceLoss`` set to the authors' batch-level,
foreground-only Dice with eps 1e-7.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from monai.losses import BendingEnergyLoss, DiceLoss, LocalNormalizedCrossCorrelationLoss
from monai.networks.layers import separable_filtering
from torch import nn

from prostate_jrs.labels import NUM_CLASSES
from prostate_jrs.nets.blocks import BORDERS, STRIDES
from prostate_jrs.nets.factory import canonical_network_name
from prostate_jrs.nets.warp import crop_and_decimate, labels_to_onehot, warp_patch

__all__ = ["TASK_TERMS", "WEIGHTINGS", "JRSLoss", "LocalNCCLoss"]

#: Loss terms entering the weighted total, per network (HEAD ``task_ids``; ``reg`` logs ``seg_reg`` only).
TASK_TERMS: dict[str, tuple[str, ...]] = {
    "seg": ("seg",),
    "reg": ("reg",),
    "jrs_reg": ("reg", "seg_reg"),
    "dense": ("seg", "reg", "seg_reg"),
    "sedd": ("seg", "reg", "seg_reg"),
    "cross_stitch": ("seg", "reg", "seg_reg"),
}
WEIGHTINGS = ("equal", "homoscedastic", "dwa")


class LocalNCCLoss(nn.Module):
    """``1 - mean local NCC`` over box windows.

    ``form="paper"`` follows the authors: the local coefficient ``cov / sqrt(var_f * var_m)``, not squared, with
    covariance and both variances clamped from below at ``eps`` (so anti-correlation counts as ~0 and flat
    windows as 1); box sums by MONAI's ``separable_filtering`` with zero padding. ``form="squared"`` is MONAI's
    ``LocalNormalizedCrossCorrelationLoss`` (squared coefficient), shifted by 1 so a perfect match is 0.

    Args:
        kernel_size: window size (paper: 9).
        form: ``"paper"`` or ``"squared"``.
        eps: lower clamp of the local (co)variances (paper form).

    Raises:
        ValueError: on an even ``kernel_size`` or unknown ``form``.
    """

    def __init__(self, kernel_size: int = 9, form: str = "paper", eps: float = 1e-4) -> None:
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f"NCC window must be odd, got {kernel_size}")
        if form not in ("paper", "squared"):
            raise ValueError(f"unknown NCC form {form!r}; expected 'paper' or 'squared'")
        self.kernel_size = kernel_size
        self.form = form
        self.eps = eps
        self.monai_lncc = LocalNormalizedCrossCorrelationLoss(
            spatial_dims=3, kernel_size=kernel_size, kernel_type="rectangular"
        )

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Loss of warped image ``pred`` against ``target`` (both (B, C, D, H, W)); 0 when identical."""
        if pred.shape != target.shape:
            raise ValueError(f"NCC inputs differ in shape: {tuple(pred.shape)} vs {tuple(target.shape)}")
        if self.form == "squared":
            return 1.0 + self.monai_lncc(pred, target)
        kernel = torch.full((self.kernel_size,), 1.0 / self.kernel_size, dtype=pred.dtype, device=pred.device)
        kernels = [kernel] * 3

        def mean(x: torch.Tensor) -> torch.Tensor:
            return separable_filtering(x, kernels)

        p_mean, t_mean = mean(pred), mean(target)
        cov = (mean(pred * target) - p_mean * t_mean).clamp_min(self.eps)
        p_var = (mean(pred * pred) - p_mean * p_mean).clamp_min(self.eps)
        t_var = (mean(target * target) - t_mean * t_mean).clamp_min(self.eps)
        return 1.0 - (cov / torch.sqrt(p_var * t_var)).mean()


class JRSLoss(nn.Module):
    """Multi-scale, multi-task loss of JRS-MTL with equal, homoscedastic or DWA weighting.

    Weighting of the task terms ``L_i`` (``TASK_TERMS[network]``):

    * ``"equal"``: ``sum_i L_i``.
    * ``"homoscedastic"`` (Kendall et al. 2018, the authors' "classification" form): one learned log-variance
      ``s_i`` per term, initialised 0, ``sum_i exp(-s_i) L_i + s_i / 2``. The ``s_i`` are this module's
      parameters: give them to the optimizer, e.g. ``Adam([*net.parameters(), *loss.parameters()])``.
    * ``"dwa"`` (Liu et al. 2019): ``w_i = K softmax_i(r_i / T)`` with ``r_i`` the ratio of the term's average
      over the last two epochs, ``T = dwa_temperature``; weights are 1 for the first two epochs. Averages are
      accumulated by every call made in training mode with gradients enabled; the trainer must call
      :meth:`epoch_end` once per epoch. Weights and history are buffers, so they are checkpointed.

    Args:
        network: network name (selects the terms) or an explicit sequence of terms (``seg``, ``reg``,
            ``seg_reg``).
        weighting: ``"equal"``, ``"homoscedastic"`` or ``"dwa"``.
        level_weights: weights of the (high, mid, low) resolution outputs.
        ncc_window: local NCC window.
        bending_weight: weight of bending energy inside the ``reg`` term.
        ncc_form: ``"paper"`` or ``"squared"``, see :class:`LocalNCCLoss`.
        dwa_temperature: DWA temperature.
        num_classes: segmentation classes (labels 0..num_classes-1, background 0 excluded from Dice).

    Raises:
        ValueError: on unknown network, term or weighting, or level weights not of length 3.
    """

    # buffers (``register_buffer`` in ``__init__``), declared for the type checker
    dwa_weights: torch.Tensor
    dwa_history: torch.Tensor
    dwa_epochs: torch.Tensor
    epoch_sum: torch.Tensor
    epoch_count: torch.Tensor

    def __init__(
        self,
        network: str | Sequence[str] = "cross_stitch",
        weighting: str = "equal",
        level_weights: Sequence[float] = (1 / 3, 1 / 3, 1 / 3),
        ncc_window: int = 9,
        bending_weight: float = 0.5,
        ncc_form: str = "paper",
        dwa_temperature: float = 2.0,
        num_classes: int = NUM_CLASSES,
    ) -> None:
        super().__init__()
        if isinstance(network, str):
            key = canonical_network_name(network)
            if key not in TASK_TERMS:
                raise ValueError(f"unknown network {network!r}; expected one of {list(TASK_TERMS)}")
            terms = TASK_TERMS[key]
        else:
            terms = tuple(network)
            unknown = set(terms) - {"seg", "reg", "seg_reg"}
            if unknown or not terms:
                raise ValueError(f"loss terms must be some of 'seg', 'reg', 'seg_reg'; got {list(terms)}")
        if weighting not in WEIGHTINGS:
            raise ValueError(f"unknown loss weighting {weighting!r}; expected one of {list(WEIGHTINGS)}")
        if len(level_weights) != 3:
            raise ValueError(f"level_weights needs 3 values (high, mid, low resolution), got {list(level_weights)}")
        self.terms = terms
        self.weighting = weighting
        self.level_weights = tuple(float(w) for w in level_weights)
        self.bending_weight = float(bending_weight)
        self.dwa_temperature = float(dwa_temperature)
        self.num_classes = num_classes
        self.ncc = LocalNCCLoss(ncc_window, form=ncc_form)
        self.bending = BendingEnergyLoss()
        # batch-level soft Dice over the foreground classes, eps 1e-7 (HEAD ``Dice``)
        self.seg_dice = DiceLoss(
            include_background=False, to_onehot_y=True, softmax=True, batch=True, smooth_nr=1e-7, smooth_dr=1e-7
        )
        self.warped_dice = DiceLoss(
            include_background=False, to_onehot_y=True, softmax=False, batch=True, smooth_nr=1e-7, smooth_dr=1e-7
        )
        n = len(terms)
        self.log_vars = nn.Parameter(torch.zeros(n)) if weighting == "homoscedastic" else None
        self.register_buffer("dwa_weights", torch.ones(n))
        self.register_buffer("dwa_history", torch.zeros(2, n))  # [t-2, t-1] epoch averages
        self.register_buffer("dwa_epochs", torch.zeros((), dtype=torch.long))
        self.register_buffer("epoch_sum", torch.zeros(n))
        self.register_buffer("epoch_count", torch.zeros((), dtype=torch.long))

    def forward(
        self,
        outputs: Mapping[str, Sequence[torch.Tensor]],
        fixed_image: torch.Tensor,
        moving_image: torch.Tensor,
        moving_label: torch.Tensor,
        fixed_label: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Total loss and its parts.

        Args:
            outputs: ``network.forward_multiscale(image)``: ``{"ddf": [...], "logits": [...]}``, high to low.
            fixed_image: daily CT patch (B, 1, D, H, W) (the network's input patch, e.g. 96^3).
            moving_image: planning CT patch (B, 1, D, H, W).
            moving_label: planning label map (B, 1, D, H, W), integer values.
            fixed_label: daily label map (B, 1, D, H, W); needed by ``seg`` and ``seg_reg``.

        Returns:
            ``loss`` (weighted total to back-propagate), each unweighted term present (``seg``, ``reg``,
            ``seg_reg``, and ``ncc``, ``bending`` inside ``reg``), and ``weight_<term>`` for every weighted term.
            ``seg_reg`` is also reported (detached) for ``reg``, when ``fixed_label`` is given.

        Raises:
            ValueError: if an output the terms need is missing, or ``fixed_label`` is missing when needed.
        """
        needs_ddf = "reg" in self.terms or "seg_reg" in self.terms
        if needs_ddf and "ddf" not in outputs:
            raise ValueError(f"loss terms {self.terms} need a 'ddf' output; got {list(outputs)}")
        if "seg" in self.terms and "logits" not in outputs:
            raise ValueError(f"loss terms {self.terms} need a 'logits' output; got {list(outputs)}")
        if fixed_label is None and ("seg" in self.terms or "seg_reg" in self.terms):
            raise ValueError(f"loss terms {self.terms} need fixed_label (the daily label map)")

        parts: dict[str, torch.Tensor] = {}
        if "ddf" in outputs:
            parts.update(self._registration_terms(outputs["ddf"], fixed_image, moving_image, moving_label, fixed_label))
        if "logits" in outputs and fixed_label is not None:
            seg = []
            for logits, border, stride in zip(outputs["logits"], BORDERS, STRIDES, strict=True):
                target = crop_and_decimate(fixed_label, border, stride, tuple(logits.shape[2:]))
                seg.append(self.seg_dice(logits, target))
            parts["seg"] = self._levels(seg)
        return self._weighted(parts)

    def _registration_terms(
        self,
        ddfs: Sequence[torch.Tensor],
        fixed_image: torch.Tensor,
        moving_image: torch.Tensor,
        moving_label: torch.Tensor,
        fixed_label: torch.Tensor | None,
    ) -> dict[str, torch.Tensor]:
        """``ncc``, ``bending`` and ``reg`` of the multi-scale DDFs; with ``fixed_label`` also ``seg_reg`` (detached
        unless it is a term)."""
        ncc, bending, seg_reg = [], [], []
        moving_onehot = labels_to_onehot(moving_label, self.num_classes) if fixed_label is not None else None
        for ddf, border, stride in zip(ddfs, BORDERS, STRIDES, strict=True):
            size = tuple(ddf.shape[2:])
            warped = warp_patch(moving_image, ddf, border, stride)
            ncc.append(self.ncc(warped, crop_and_decimate(fixed_image, border, stride, size)))
            bending.append(self.bending(ddf))
            if moving_onehot is not None and fixed_label is not None:
                warped_labels = warp_patch(moving_onehot.to(ddf.dtype), ddf, border, stride)
                target = crop_and_decimate(fixed_label, border, stride, size)
                seg_reg.append(self.warped_dice(warped_labels, target))
        parts = {"ncc": self._levels(ncc), "bending": self._levels(bending)}
        parts["reg"] = parts["ncc"] + self.bending_weight * parts["bending"]
        if seg_reg:
            value = self._levels(seg_reg)
            parts["seg_reg"] = value if "seg_reg" in self.terms else value.detach()
        return parts

    def _weighted(self, parts: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``loss``, the weighted total of the terms (kept for DWA's epoch average), with the parts and weights."""
        losses = torch.stack([parts[t] for t in self.terms])
        weights = self.weights().to(losses)
        if self.log_vars is not None:
            total = (torch.exp(-self.log_vars) * losses + 0.5 * self.log_vars).sum()
        else:
            total = (weights * losses).sum()
        if self.weighting == "dwa" and self.training and torch.is_grad_enabled():
            self._accumulate(losses)
        result = {"loss": total, **parts}
        for term, weight in zip(self.terms, weights, strict=True):
            result[f"weight_{term}"] = weight.detach()
        return result

    def weights(self) -> torch.Tensor:
        """Current weight of each term (``exp(-s_i)`` for homoscedastic), in the order of ``self.terms``."""
        if self.log_vars is not None:
            return torch.exp(-self.log_vars.detach())
        if self.weighting == "dwa":
            return self.dwa_weights.clone()
        return torch.ones(len(self.terms), device=self.dwa_weights.device)

    def epoch_end(self) -> torch.Tensor:
        """Close an epoch for DWA: store the epoch's average terms and update the weights.

        Returns:
            The weights for the next epoch (ones for other weightings, or before two epochs are complete).
        """
        if self.weighting != "dwa":
            return self.weights()
        if int(self.epoch_count) > 0:
            average = self.epoch_sum / self.epoch_count
            self.dwa_history[0] = self.dwa_history[1]
            self.dwa_history[1] = average
            self.dwa_epochs += 1
        self.epoch_sum.zero_()
        self.epoch_count.zero_()
        if int(self.dwa_epochs) >= 2:
            ratio = self.dwa_history[1] / self.dwa_history[0].clamp_min(1e-12)
            self.dwa_weights.copy_(len(self.terms) * torch.softmax(ratio / self.dwa_temperature, dim=0))
        return self.weights()

    def _accumulate(self, losses: torch.Tensor) -> None:
        self.epoch_sum += losses.detach().to(self.epoch_sum)
        self.epoch_count += 1

    def _levels(self, values: Sequence[torch.Tensor]) -> torch.Tensor:
        return sum(w * v for w, v in zip(self.level_weights, values, strict=True))  # type: ignore[return-value]

    @staticmethod
    def split_image(image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Split the network input ``image`` (B, 3, ...) into fixed image, moving image, moving label map."""
        return image[:, 0:1], image[:, 1:2], image[:, 2:3]
