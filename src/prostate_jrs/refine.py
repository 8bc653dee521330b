"""Test-time instance optimisation of the displacement field for one pair, on the model grid.

A short optimisation of the same kind of losses the network was trained on finishes the registration, as the leading
learned registration methods do (ConvexAdam, uniGradICON with instance optimisation). It starts from the rigid
alignment (``init="zero"``, the default), from the network's DDF (``"network"``), from whichever of both has the
lower loss after the coarsest level (``"auto"``), or from the network's DDF smoothed onto the control nodes
(``"coarse"``). The default is measured: on the real pelvic CT the phantom-trained
demo network's field is a worse start than none (crop error 1.18 mm with the auto start, which took the network's
field, against 0.74 mm from zero; ``benchmarks/real_anatomy.py``), while the segmentation path still comes from the
network. Design:

* **Parameterisation.** ``ddf = init + residual``. The residual lives on a control grid per resolution level (the
  model grid pooled by ``factor``, nodes ``control_spacing`` model voxels apart), optionally passed through 3x3x3 box
  filters per step (a B-spline-like smoother, as in ConvexAdam) and trilinearly upsampled between levels and at the
  end. The network's own field is kept at full resolution; only the correction is smooth. ``diffeomorphic``
  integrates the residual as a stationary velocity field (scaling and squaring) and composes it with the start.
* **Similarity.** Squared differences of the intensities clipped to a soft-tissue ``window`` (``ssd``), local NCC
  over box windows (``lncc``), or MIND-SSC descriptors (Heinrich et al. 2013) compared by squared differences
  (``mind``); all on the level's pooled images. Planning and daily scans are CTs of one scanner calibration, so
  HU are comparable and SSD is the sharpest criterion: on the real pelvic CT with a known deformation
  (``benchmarks/real_anatomy.py``) SSD on [-200, 300] HU recovered the field to 0.66-0.74 mm mean where LNCC
  stopped near 0.9 mm and MIND-SSC above 1.1 mm (same budget); LNCC and MIND stay for scans whose intensities
  differ (other scanners, CBCT).
* **Regularisation.** Diffusion (mean squared first differences) of the smoothed residual in level-voxel units,
  which is dimensionless (mm per mm) at every level, and a penalty on Jacobian determinants of the total field
  below ``min_jacobian`` (``folding_weight``; on by default: without it the phantom test split folded in
  0.03-0.06% of voxels).
* **Structure guidance** (optional). Soft Dice between the planning label map warped trilinearly by the field and
  the segmentation path's softmax, for the structures the settings trust.
* **Optimiser.** Adam per level (``torch.optim.Adam``'s update, written out: :class:`_Adam`), a fixed iteration
  budget, early stop when the loss has not improved by a relative ``tolerance`` for ``patience`` iterations.
* **Sampling.** A level may compute its similarity on every ``n``-th voxel per axis from a random phase per step
  (``sampling_stride``, as elastix samples its metric at random points): the full-resolution level of ``accurate``
  costs an eighth per step and visits every voxel over its steps.

Runs on the device of the input tensors: the same code on CPU and CUDA. ``inputs`` may include a context border of
real anatomy around ``pred``'s grid (the pipeline's and the bundle's inferers see it): the planning CT is then
sampled beyond the crop instead of clamped at its edge.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from monai.losses import DiceLoss
from monai.networks.blocks import DVF2DDF, Warp
from monai.networks.layers import separable_filtering

from prostate_jrs.labels import NUM_CLASSES, STRUCTURES
from prostate_jrs.nets.warp import labels_to_onehot, warp_patch

__all__ = [
    "REFINE_MODES",
    "RefineReport",
    "RefineSettings",
    "context_similarity",
    "refine_context",
    "refine_ddf",
    "refine_prediction",
    "refine_settings",
]

SIMILARITIES = ("lncc", "mind", "ssd")
INITS = ("network", "zero", "auto", "coarse")


@dataclass(frozen=True)
class RefineSettings:
    """Budget and losses of one refinement.

    Args:
        levels: pooling factor of each resolution level, coarse to fine (1 = the model grid).
        control_spacing: spacing (model voxels) of the residual's control nodes at each level; the residual is
            trilinear between them.
        iterations: Adam steps per level (same length as ``levels``).
        sampling_stride: per level (empty: 1 everywhere), the similarity of each step is computed on every
            ``n``-th voxel per axis from a random phase, as elastix's random sampler does: a full-resolution level
            at ``1/n^3`` of its cost per step, every voxel visited over the steps. Not with ``lncc``, whose box
            windows need the whole grid.
        learning_rate: Adam step in level voxels.
        similarity: ``"ssd"``, ``"lncc"`` or ``"mind"``.
        lncc_window: local NCC window (level voxels, odd).
        mind_radius: MIND-SSC patch radius (level voxels).
        mind_dilation: MIND-SSC neighbourhood distance (level voxels).
        diffusion_weight: weight of the diffusion regulariser of the residual (its scale suits the similarity: SSD
            of windowed intensities is about 1e-3, LNCC about 0.5).
        folding_weight: weight of the penalty on det J below ``min_jacobian``.
        min_jacobian: det J under which the folding penalty acts.
        diffeomorphic: treat the residual as a stationary velocity field, integrate it by scaling and squaring and
            compose the starting field with it (``start(x + r(x)) + r(x)``): invertible by construction.
        integration_steps: scaling-and-squaring steps.
        guidance_weight: weight of the structure-guidance Dice term (0: off).
        guidance_structures: structures whose segmentation-path prediction guides the field.
        smoothing_passes: 3x3x3 box filters applied to the residual at every step.
        init: ``"network"`` (start from the network's DDF), ``"zero"``, ``"auto"`` (the coarsest level runs from
            both and the start with the lower loss goes on: the network's field can be a worse start than none on
            anatomy unlike its training data) or ``"coarse"`` (the network's DDF averaged over the coarsest control
            spacing and put on its nodes, so the refinement may move away from it everywhere; on the adaptation
            phantoms it ends where ``"zero"`` does, ``benchmarks/adaptation_paths.py``).
        patience: iterations without relative improvement by ``tolerance`` before a level stops.
        tolerance: relative improvement that counts.
        window: intensity range (network input units, HU / 1000) the images are clipped to before the similarity;
            ``None`` for the network's full range.
        name: the mode these settings come from (reports and evaluation tables).
        cpu_threads: torch threads of the optimisation on a CPU (``None``: the process's setting). Each step is
            hundreds of small tensor operations; with two OpenMP threads, one that other software on the machine
            keeps waiting turns every operation into a spin-wait (1.7 s vs 8-27 s for the same refinement on
            2 cores shared with another job; 1.9-2.4 s on one thread), so the default is one thread.
    """

    levels: tuple[int, ...] = (4, 2)
    control_spacing: tuple[int, ...] = (8, 4)
    iterations: tuple[int, ...] = (60, 60)
    sampling_stride: tuple[int, ...] = ()
    learning_rate: float = 0.1
    similarity: str = "ssd"
    lncc_window: int = 5
    mind_radius: int = 1
    mind_dilation: int = 2
    diffusion_weight: float = 0.002
    folding_weight: float = 10.0
    min_jacobian: float = 0.1
    diffeomorphic: bool = False
    integration_steps: int = 7
    guidance_weight: float = 0.0
    guidance_structures: tuple[str, ...] = ()
    smoothing_passes: int = 0
    init: str = "zero"
    patience: int = 10
    tolerance: float = 1e-4
    window: tuple[float, float] | None = (-0.2, 0.3)
    name: str = "custom"
    cpu_threads: int | None = 1

    def __post_init__(self) -> None:
        if not self.levels or not len(self.levels) == len(self.iterations) == len(self.control_spacing):
            raise ValueError(
                f"levels {self.levels}, control_spacing {self.control_spacing} and iterations {self.iterations} must "
                "be non-empty and of one length"
            )
        if any(f < 1 for f in self.levels) or any(n < 0 for n in self.iterations):
            raise ValueError(f"levels must be >= 1 and iterations >= 0, got {self.levels}, {self.iterations}")
        if self.sampling_stride and (
            len(self.sampling_stride) != len(self.levels) or any(n < 1 for n in self.sampling_stride)
        ):
            raise ValueError(
                f"sampling_stride {self.sampling_stride}: expected one value >= 1 per level {self.levels} (overriding "
                "levels, give sampling_stride too; [] for none)"
            )
        if self.similarity == "lncc" and any(n > 1 for n in self.sampling_stride):
            raise ValueError("sampling_stride > 1 needs similarity 'ssd' or 'mind' (LNCC's windows need every voxel)")
        if self.similarity not in SIMILARITIES:
            raise ValueError(f"unknown similarity {self.similarity!r}; expected one of {SIMILARITIES}")
        if self.lncc_window % 2 != 1:
            raise ValueError(f"lncc_window must be odd, got {self.lncc_window}")
        if self.init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {self.init!r}")
        if self.cpu_threads is not None and self.cpu_threads < 1:
            raise ValueError(f"cpu_threads must be at least 1 or None, got {self.cpu_threads}")
        known = {s.name for s in STRUCTURES}
        unknown = sorted(set(self.guidance_structures) - known)
        if unknown:
            raise ValueError(f"guidance_structures: unknown {unknown}; expected some of {sorted(known)}")

    @property
    def needs_network(self) -> bool:
        """Whether the optimisation reads the network's output: its DDF as a start (``init`` other than ``"zero"``)
        or its segmentation as guidance. Without it, the refinement can run beside the network."""
        return self.init != "zero" or (self.guidance_weight > 0 and bool(self.guidance_structures))

    @property
    def budget(self) -> int:
        """Total iteration budget over all levels (``auto`` runs the coarsest level twice)."""
        return int(sum(self.iterations)) + (self.iterations[0] if self.init == "auto" else 0)


#: Named budgets: ``accurate`` (the bundle's default) and ``fast``, for CPUs slower than the two cores measured.
REFINE_MODES: dict[str, RefineSettings | None] = {
    "off": None,
    "fast": RefineSettings(name="fast"),
    # a third level at the model grid's full resolution, nodes 4 voxels apart, its similarity on a random half-
    # resolution lattice per step: on the phantom test split every structure beats elastix significantly (bladder
    # MSD 0.71 vs 0.79 mm; fast leaves it worse, 0.93) in 1.5 s per pair against elastix's 23 s, and on the real
    # pelvic CT the crop error is 0.71 mm (fast 0.74); benchmarks/results/refinement, benchmarks/results/real_anatomy.
    # The coarsest nodes 16 voxels apart (0.5.2; 8 before) widen the capture range at no cost: rectum 0.65 -> 0.61 mm
    # on the test split, and on a site unlike the training data two local failures of the 8-voxel grid went away or
    # shrank (bundle docs, "A site unlike the training data")
    "accurate": RefineSettings(
        levels=(4, 2, 1),
        control_spacing=(16, 4, 4),
        iterations=(120, 60, 60),
        sampling_stride=(1, 1, 2),
        name="accurate",
    ),
}


def refine_settings(mode: str | None, overrides: Mapping[str, Any] | None = None) -> RefineSettings | None:
    """Settings of a named mode (``off``, ``fast``, ``accurate``) with optional field overrides.

    Raises:
        ValueError: on an unknown mode or field.
    """
    name = "off" if mode in (None, "", False) else str(mode).lower()
    if name not in REFINE_MODES:
        raise ValueError(f"unknown refine mode {mode!r}; expected one of {sorted(REFINE_MODES)}")
    base = REFINE_MODES[name]
    if base is None:
        return None
    values = dict(overrides or {})
    unknown = sorted(set(values) - set(asdict(base)))
    if unknown:
        raise ValueError(f"unknown refine settings {unknown}; expected some of {sorted(asdict(base))}")
    for key in ("levels", "control_spacing", "iterations", "sampling_stride", "guidance_structures", "window"):
        if key in values:
            values[key] = tuple(values[key])
    return replace(base, **values)


@dataclass
class RefineReport:
    """What one refinement did (for QA and benchmarks).

    Attributes:
        settings: the settings used.
        similarity_before: similarity loss of the given DDF (the network's) at the finest level (lower is better).
        similarity_after: the same after refinement.
        iterations: Adam steps run per level (early stop may end a level before its budget); with ``init="auto"``
            the coarsest level comes twice, from zero and from the network.
        seconds: wall time.
        device: where it ran.
        cpu_seconds: CPU time of the optimisation (:func:`_cpu_clock`): on a shared machine a steadier cost than
            wall time.
    """

    settings: RefineSettings
    similarity_before: float
    similarity_after: float
    iterations: list[int] = field(default_factory=list)
    seconds: float = 0.0
    device: str = "cpu"
    cpu_seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready summary."""
        settings = asdict(self.settings)
        return {
            "mode": self.settings.name,
            "similarity": self.settings.similarity,
            "similarity_before": round(self.similarity_before, 6),
            "similarity_after": round(self.similarity_after, 6),
            "iterations": list(self.iterations),
            "budget": self.settings.budget,
            "seconds": round(self.seconds, 3),
            "cpu_seconds": round(self.cpu_seconds, 3),
            "device": self.device,
            "settings": settings,
        }


# --------------------------------------------------------------------------------------------------- features


def _box_mean(x: torch.Tensor, size: int) -> torch.Tensor:
    kernel = torch.full((size,), 1.0 / size, dtype=x.dtype, device=x.device)
    return separable_filtering(x, [kernel] * 3)


class LocalNCC:
    """``1 - mean local NCC`` against a fixed image over box windows, the fixed image's statistics computed once.

    Unsquared, so anti-correlation is penalised rather than rewarded (MONAI's ``LocalNormalizedCrossCorrelationLoss``
    squares the coefficient and recomputes the fixed statistics at every call).
    """

    def __init__(self, fixed: torch.Tensor, window: int, eps: float = 1e-5) -> None:
        self.fixed, self.window, self.eps = fixed, window, eps
        self.fixed_mean = _box_mean(fixed, window)
        self.fixed_var = (_box_mean(fixed * fixed, window) - self.fixed_mean**2).clamp_min(0.0)

    def __call__(self, warped: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        """The loss of ``warped`` (same shape as the fixed image); 0 for a perfect local linear match.

        Args:
            warped: the warped moving image.
            weight: optional voxel weights (e.g. 0 where the moving scan has no data); no gradient flows through it.
        """
        stats = _box_mean(torch.cat([warped, warped * warped, warped * self.fixed], dim=1), self.window)
        mean, square, product = stats[:, 0:1], stats[:, 1:2], stats[:, 2:3]
        cov = product - mean * self.fixed_mean
        var = (square - mean * mean).clamp_min(0.0)
        return 1.0 - _weighted_mean(cov / torch.sqrt(var * self.fixed_var + self.eps), weight)


def _weighted_mean(values: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    if weight is None:
        return values.mean()
    weight = weight.detach()
    return (values * weight).sum() / weight.sum().clamp_min(1e-6)


_SSC_PAIRS = (  # the 12 edges of the six-neighbourhood that MIND-SSC compares (Heinrich et al. 2013)
    ((0, 1, 1), (1, 1, 0)), ((1, 0, 1), (0, 1, 1)), ((1, 1, 2), (0, 1, 1)), ((1, 0, 1), (1, 1, 0)),
    ((1, 2, 1), (1, 1, 0)), ((1, 1, 2), (1, 0, 1)), ((1, 2, 1), (0, 1, 1)), ((2, 1, 1), (1, 1, 0)),
    ((1, 2, 1), (1, 1, 2)), ((2, 1, 1), (1, 0, 1)), ((2, 1, 1), (1, 1, 2)), ((2, 1, 1), (1, 2, 1)),
)  # fmt: skip


def _shift(x: torch.Tensor, offset: tuple[int, int, int], dilation: int) -> torch.Tensor:
    """``x`` shifted by ``(offset - 1) * dilation`` voxels, replicate padding."""
    pad = [dilation] * 6
    padded = F.pad(x, pad, mode="replicate")
    starts = [dilation + (o - 1) * dilation for o in offset]
    return padded[
        :, :, starts[0] : starts[0] + x.shape[2], starts[1] : starts[1] + x.shape[3], starts[2] : starts[2] + x.shape[4]
    ]


def mind_ssc(image: torch.Tensor, radius: int = 1, dilation: int = 2) -> torch.Tensor:
    """MIND-SSC descriptor (B, 12, *S) of a single-channel image (B, 1, *S).

    Hand-written: no maintained PyTorch library ships it (ConvexAdam's is a script, not a package).
    """
    distances = []
    for a, b in _SSC_PAIRS:
        diff = _shift(image, a, dilation) - _shift(image, b, dilation)
        distances.append(_box_mean(diff * diff, 2 * radius + 1))
    ssd = torch.cat(distances, dim=1)
    ssd = ssd - ssd.min(dim=1, keepdim=True).values
    variance = ssd.mean(dim=1, keepdim=True)
    floor = variance.mean() * 1e-3 + 1e-6
    variance = variance.clamp(min=floor, max=variance.mean() * 1e3 + 1e-6)
    return torch.exp(-ssd / variance)


# --------------------------------------------------------------------------------------------------- field


def _smooth(field_: torch.Tensor, passes: int) -> torch.Tensor:
    for _ in range(passes):
        field_ = F.avg_pool3d(F.pad(field_, [1] * 6, mode="replicate"), 3, stride=1)
    return field_


def _diffusion(field_: torch.Tensor, spacing: Sequence[float]) -> torch.Tensor:
    """Mean squared first derivatives of a (B, 3, *S) field sampled every ``spacing`` units of its own values."""
    return sum((torch.diff(field_, dim=2 + axis) / step).pow(2).mean() for axis, step in enumerate(spacing))  # type: ignore[return-value]


def _folding(ddf: torch.Tensor, min_jacobian: float) -> torch.Tensor:
    """Mean of ``relu(min_jacobian - det J)^2`` over the voxels with forward differences on every axis.

    det J of ``x -> x + ddf(x)`` (ddf in voxel units) by forward differences. Rolled copies and a mask of the valid
    voxels instead of slices: each slice's gradient allocates and zero-fills a full-size tensor, which made this
    penalty a third of a refinement's CPU time.
    """
    u = ddf.unbind(1)
    j = [[torch.roll(u[c], -1, k + 1) - u[c] + float(c == k) for k in range(3)] for c in range(3)]
    det = (
        j[0][0] * (j[1][1] * j[2][2] - j[1][2] * j[2][1])
        - j[0][1] * (j[1][0] * j[2][2] - j[1][2] * j[2][0])
        + j[0][2] * (j[1][0] * j[2][1] - j[1][1] * j[2][0])
    )
    valid = torch.zeros_like(det)
    valid[:, :-1, :-1, :-1] = 1.0
    return (F.relu(min_jacobian - det).pow(2) * valid).sum() / valid.sum()


def _erode(mask: torch.Tensor, size: int) -> torch.Tensor:
    """Minimum over ``size``-wide boxes: 1 only where a whole similarity window lies inside the scan."""
    return -F.max_pool3d(-mask, size, stride=1, padding=size // 2)


def _pool(x: torch.Tensor, factor: int) -> torch.Tensor:
    return x if factor == 1 else F.avg_pool3d(x, factor, stride=factor, ceil_mode=True, count_include_pad=False)


@dataclass(frozen=True)
class _ControlGrid:
    """Nodes spanning ``[0, size - 1]`` model voxels on each axis, about ``spacing`` apart."""

    size: tuple[int, ...]
    spacing: int

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(max(2, math.ceil((n - 1) / self.spacing) + 1) for n in self.size)

    @property
    def steps(self) -> tuple[float, ...]:
        return tuple((n - 1) / (m - 1) for n, m in zip(self.size, self.shape, strict=True))

    def weights(self, positions: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Per axis, the (len(positions), nodes) linear interpolation weights at model-voxel ``positions``."""
        out = []
        for pos, nodes, step in zip(positions, self.shape, self.steps, strict=True):
            t = (pos / step).clamp(0, nodes - 1)
            lower = t.floor().clamp(max=nodes - 2)
            frac = t - lower
            w = torch.zeros(len(pos), nodes, dtype=pos.dtype, device=pos.device)
            rows = torch.arange(len(pos), device=pos.device)
            w[rows, lower.long()] = 1.0 - frac
            w[rows, lower.long() + 1] = frac
            out.append(w)
        return out


def _interpolate(field_: torch.Tensor, weights: Sequence[torch.Tensor]) -> torch.Tensor:
    """A (1, 3, a, b, c) node field sampled by separable weights into (1, 3, X, Y, Z)."""
    wx, wy, wz = weights
    out = torch.einsum("xa,nabc->nxbc", wx, field_.flatten(0, 1))
    out = torch.einsum("yb,nxbc->nxyc", wy, out)
    out = torch.einsum("zc,nxyc->nxyz", wz, out)
    return out.unsqueeze(0)


def _positions(size: Sequence[int], factor: int, device: torch.device) -> list[torch.Tensor]:
    """Model-voxel coordinates of the voxel centres of a grid pooled by ``factor``."""
    return [factor * torch.arange(math.ceil(n / factor), device=device) + (factor - 1) / 2 for n in size]


@dataclass
class _Level:
    """The images of one resolution level."""

    factor: int
    fixed: torch.Tensor
    moving: torch.Tensor
    offset: float
    init: torch.Tensor
    labels: torch.Tensor | None = None
    target: torch.Tensor | None = None
    lncc: LocalNCC | None = None
    moving_mask: torch.Tensor | None = None
    stride: int = 1
    shift: torch.Tensor | None = None  # (1, 3, 1, 1, 1): a lattice's phase in lattice voxels

    def warp(self, image: torch.Tensor, ddf: torch.Tensor) -> torch.Tensor:
        """``image`` (on the moving grid) sampled at this level's (or lattice's) voxels displaced by ``ddf``."""
        shifted = ddf if self.shift is None else ddf + self.shift
        return warp_patch(image, shifted, border=self.offset, stride=self.stride)  # type: ignore[arg-type]


def _level(
    factor: int,
    fixed: torch.Tensor,
    moving: torch.Tensor,
    border: int,
    init: torch.Tensor,
    settings: RefineSettings,
    labels: torch.Tensor | None,
    target: torch.Tensor | None,
    moving_mask: torch.Tensor | None = None,
) -> _Level:
    """Pool images (and features) to ``factor``; level voxel ``j`` of the fixed grid sits at moving ``j + offset``."""
    fixed_l, moving_l = _pool(fixed, factor), _pool(moving, factor)
    if settings.window is not None:
        fixed_l, moving_l = fixed_l.clamp(*settings.window), moving_l.clamp(*settings.window)
    if settings.similarity == "mind":
        fixed_l = mind_ssc(fixed_l, settings.mind_radius, settings.mind_dilation)
        moving_l = mind_ssc(moving_l, settings.mind_radius, settings.mind_dilation)
    return _Level(
        factor=factor,
        fixed=fixed_l,
        moving=moving_l,
        offset=border / factor,
        init=_pool(init, factor) / factor,
        labels=None if labels is None else _pool(labels, factor),
        target=None if target is None else _pool(target, factor),
        lncc=LocalNCC(fixed_l, settings.lncc_window) if settings.similarity == "lncc" else None,
        moving_mask=None if moving_mask is None else _erode(_pool(moving_mask, factor), settings.lncc_window),
    )


def _sampled(level: _Level, stride: int, generator: torch.Generator) -> tuple[_Level, list[int]]:
    """The level on every ``stride``-th voxel per axis from a random phase; fields in units of that lattice.

    Moving-grid images (``moving``, ``labels``, ``moving_mask``) stay whole: the lattice only changes where they are
    sampled (``stride``, and the phase as a constant shift).
    """
    phase = torch.randint(stride, (3,), generator=generator).tolist()
    lattice = (slice(None), slice(None), *(slice(p, None, stride) for p in phase))
    sub = replace(
        level,
        fixed=level.fixed[lattice],
        shift=torch.tensor(phase, dtype=level.fixed.dtype, device=level.fixed.device).view(1, 3, 1, 1, 1) / stride,
        init=level.init[lattice] / stride,
        target=None if level.target is None else level.target[lattice],
        stride=stride,
    )
    return sub, phase


def _total_field(start: torch.Tensor, residual: torch.Tensor, settings: RefineSettings) -> torch.Tensor:
    """The refined DDF from the starting field and the residual, both in voxel units of one grid."""
    if not settings.diffeomorphic:
        return start + residual
    displacement = DVF2DDF(settings.integration_steps, padding_mode="border")(residual)
    if not bool(start.any()):
        return displacement
    return displacement + Warp(padding_mode="border")(start, displacement)


def _similarity(level: _Level, ddf: torch.Tensor, settings: RefineSettings) -> torch.Tensor:
    warped = level.warp(level.moving, ddf)
    weight = None
    if level.moving_mask is not None:
        with torch.no_grad():
            weight = level.warp(level.moving_mask, ddf)
            weight = (weight > 0.999).float()
    if level.lncc is None:
        return _weighted_mean((warped - level.fixed).pow(2).mean(dim=1, keepdim=True), weight)
    return level.lncc(warped, weight)


class _Adam:
    """``torch.optim.Adam``'s update with its defaults (the single-tensor path it takes on a CPU) for one tensor.

    Hand-written because ``torch.optim`` imports ``torch._dynamo`` at its first optimiser (0.45 s and 300 modules in
    a fresh process such as the app's, a sixth of a CPU refinement, with the GIL held); the same arithmetic in the
    same order, tested bit-identical to it.
    """

    def __init__(self, param: torch.Tensor, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        self.param, self.lr, self.betas, self.eps = param, lr, betas, eps
        self.exp_avg = torch.zeros_like(param, memory_format=torch.preserve_format)
        self.exp_avg_sq = torch.zeros_like(param, memory_format=torch.preserve_format)
        self.steps = 0

    @torch.no_grad()
    def step(self) -> None:
        """One update from ``param.grad``."""
        grad, (beta1, beta2) = self.param.grad, self.betas
        assert grad is not None
        self.steps += 1
        self.exp_avg.lerp_(grad, 1 - beta1)
        self.exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        step = float(self.steps)
        bias_correction1, bias_correction2 = 1 - beta1**step, 1 - beta2**step
        denom = (self.exp_avg_sq.sqrt() / bias_correction2**0.5).add_(self.eps)
        self.param.addcdiv_(self.exp_avg, denom, value=-(self.lr / bias_correction1))


def _optimise_level(
    level: _Level, grid: _ControlGrid, nodes: torch.Tensor, settings: RefineSettings, iterations: int, stride: int = 1
) -> tuple[torch.Tensor, int, float]:
    """Adam on the residual's control nodes (model voxels) at one level; returns the nodes, steps run, best loss.

    With ``stride`` > 1 each step sees a random lattice of the level (:func:`_sampled`); the loss that early stopping
    follows is then noisy, so the level runs its whole budget.
    """
    param = nodes.detach().clone().requires_grad_(True)
    optimiser = _Adam(param, lr=settings.learning_rate * level.factor)
    weights = grid.weights(_positions(grid.size, level.factor, nodes.device))
    generator = torch.Generator().manual_seed(level.factor)  # reproducible lattices
    dice = DiceLoss(include_background=False, smooth_nr=1e-5, smooth_dr=1e-5)
    best, stale, steps = math.inf, 0, 0
    for steps in range(1, iterations + 1):
        sub, lattice_weights = level, weights
        if stride > 1:
            sub, phase = _sampled(level, stride, generator)
            lattice_weights = [w[p::stride] for w, p in zip(weights, phase, strict=True)]
        param.grad = None
        smooth = _smooth(param, settings.smoothing_passes)
        ddf = _total_field(sub.init, _interpolate(smooth, lattice_weights) / (level.factor * stride), settings)
        loss = _similarity(sub, ddf, settings) + settings.diffusion_weight * _diffusion(smooth, grid.steps)
        if settings.folding_weight > 0:
            loss = loss + settings.folding_weight * _folding(ddf, settings.min_jacobian)
        if sub.labels is not None and sub.target is not None:
            warped = sub.warp(sub.labels, ddf)
            loss = loss + settings.guidance_weight * dice(warped, sub.target)
        loss.backward()
        optimiser.step()
        value = float(loss.detach())
        if math.isinf(best) or value < best - settings.tolerance * abs(best):
            best, stale = value, 0
        elif stride == 1:
            stale += 1
            if stale >= settings.patience and steps >= 2 * settings.patience:
                break
    return _smooth(param.detach(), settings.smoothing_passes), steps, best


def _guidance(
    labels: torch.Tensor, logits: torch.Tensor, settings: RefineSettings
) -> tuple[torch.Tensor, torch.Tensor] | tuple[None, None]:
    """Planning one-hot (with the context border) and the segmentation path's softmax, trusted channels only."""
    if settings.guidance_weight <= 0 or not settings.guidance_structures:
        return None, None
    channels = [0] + [s.label for s in STRUCTURES if s.name in settings.guidance_structures]
    onehot = labels_to_onehot(labels, NUM_CLASSES)[:, channels]
    probs = torch.softmax(logits.float(), dim=1)[:, channels]
    probs[:, 0] = 1.0 - probs[:, 1:].sum(dim=1)  # background of the trusted structures only
    return onehot, probs


def refine_ddf(
    fixed: torch.Tensor,
    moving: torch.Tensor,
    init: torch.Tensor,
    settings: RefineSettings,
    *,
    moving_labels: torch.Tensor | None = None,
    seg_logits: torch.Tensor | None = None,
    moving_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, RefineReport]:
    """Optimise the DDF of one pair.

    Args:
        fixed: daily image (1, 1, *S), scaled as the network's input.
        moving: rigidly aligned planning image (1, 1, *(S + 2b)): ``S`` plus a context border ``b`` on every side.
        init: the network's DDF (1, 3, *S) in voxel units of the grid (ignored when ``settings.init == "zero"``).
        settings: budget and losses.
        moving_labels: planning label map (1, 1, *(S + 2b)) for structure guidance.
        seg_logits: segmentation logits (1, 5, *S) for structure guidance.
        moving_mask: 1 where the planning scan has data (1, 1, *(S + 2b)); the similarity ignores the rest.

    Returns:
        The refined DDF (1, 3, *S) and the report.

    Raises:
        ValueError: if the shapes do not fit.
    """
    threads = torch.get_num_threads()
    if settings.cpu_threads is not None and fixed.device.type == "cpu":
        torch.set_num_threads(settings.cpu_threads)
    try:
        return _refine(fixed, moving, init, settings, moving_labels, seg_logits, moving_mask)
    finally:
        torch.set_num_threads(threads)


def _refine(
    fixed: torch.Tensor,
    moving: torch.Tensor,
    init: torch.Tensor,
    settings: RefineSettings,
    moving_labels: torch.Tensor | None,
    seg_logits: torch.Tensor | None,
    moving_mask: torch.Tensor | None,
) -> tuple[torch.Tensor, RefineReport]:
    """:func:`refine_ddf` on the threads it set."""
    start, start_cpu = time.perf_counter(), _cpu_clock()
    size, border = _pair_shape(fixed, moving, init)
    strides = settings.sampling_stride or (1,) * len(settings.levels)
    pair = _PaddedPair.of(
        fixed, moving, init.detach().float(), border, settings, moving_labels, seg_logits, moving_mask
    )
    init = pair.init
    with torch.enable_grad():
        finest = pair.level(1, init, settings, guided=False)
        with torch.no_grad():
            before = float(_similarity(finest, init, settings))
        init, nodes, grid, steps = _coarsest_level(pair, settings, strides[0])
        nodes, grid = _finer_levels(pair, init, nodes, grid, settings, strides[1:], steps)
        full = grid.weights([torch.arange(n, device=pair.device, dtype=torch.float32) for n in pair.size])
        ddf = _total_field(init, _interpolate(nodes, full), settings)
        with torch.no_grad():
            after = float(_similarity(finest, ddf, settings))
    ddf = ddf[:, :, : size[0], : size[1], : size[2]]
    report = RefineReport(
        settings, before, after, steps, time.perf_counter() - start, str(pair.device), _cpu_clock() - start_cpu
    )
    return ddf.detach(), report


def _cpu_clock() -> float:
    """CPU seconds of the optimisation's threads so far: the calling thread's when torch runs on one thread (the
    pipeline's network beside it, on another thread, is then not counted), else the whole process's (torch's
    worker threads are the optimisation's)."""
    return time.thread_time() if torch.get_num_threads() == 1 else time.process_time()


def _pair_shape(fixed: torch.Tensor, moving: torch.Tensor, init: torch.Tensor) -> tuple[tuple[int, ...], int]:
    """The model grid ``S`` and the moving image's context border ``b`` of :func:`refine_ddf`'s inputs.

    Raises:
        ValueError: if the shapes do not fit.
    """
    size = tuple(fixed.shape[2:])
    border2 = [m - s for m, s in zip(moving.shape[2:], size, strict=True)]
    if fixed.shape[:2] != (1, 1) or init.shape != (1, 3, *size) or len(set(border2)) != 1 or border2[0] % 2:
        raise ValueError(
            f"expected fixed (1, 1, *S), moving (1, 1, *(S + 2b)), init (1, 3, *S); got {tuple(fixed.shape)}, "
            f"{tuple(moving.shape)}, {tuple(init.shape)}"
        )
    return size, border2[0] // 2


@dataclass
class _PaddedPair:
    """One pair's images, the network's DDF and the guidance, padded at the high ends to a multiple of the coarsest
    level's factor, so that every level's voxels tile the model grid; what each level is pooled from."""

    fixed: torch.Tensor
    moving: torch.Tensor
    init: torch.Tensor
    border: int
    labels: torch.Tensor | None
    target: torch.Tensor | None
    moving_mask: torch.Tensor | None

    @classmethod
    def of(
        cls,
        fixed: torch.Tensor,
        moving: torch.Tensor,
        init: torch.Tensor,
        border: int,
        settings: RefineSettings,
        moving_labels: torch.Tensor | None,
        seg_logits: torch.Tensor | None,
        moving_mask: torch.Tensor | None,
    ) -> _PaddedPair:
        """Pad :func:`refine_ddf`'s inputs (guidance made first, from the unpadded label map and logits)."""
        labels, target = (None, None)
        if moving_labels is not None and seg_logits is not None:
            labels, target = _guidance(moving_labels, seg_logits, settings)
        multiple = max(settings.levels)
        pad = [p for n in reversed(fixed.shape[2:]) for p in (0, (-n) % multiple)]
        fixed, moving, init = (F.pad(x.float(), pad, mode="replicate") for x in (fixed, moving, init))
        if moving_mask is not None:
            moving_mask = F.pad(moving_mask.float(), pad, mode="replicate")
        if labels is not None and target is not None:
            labels, target = F.pad(labels, pad, mode="replicate"), F.pad(target, pad, mode="replicate")
        return cls(fixed, moving, init, border, labels, target, moving_mask)

    @property
    def size(self) -> tuple[int, ...]:
        """The padded model grid."""
        return tuple(self.fixed.shape[2:])

    @property
    def device(self) -> torch.device:
        """Where the images are."""
        return self.fixed.device

    def level(self, factor: int, ddf: torch.Tensor, settings: RefineSettings, guided: bool = True) -> _Level:
        """The pair pooled to ``factor`` around ``ddf`` (:func:`_level`); ``guided=False`` leaves out the guidance."""
        labels, target = (self.labels, self.target) if guided else (None, None)
        return _level(factor, self.fixed, self.moving, self.border, ddf, settings, labels, target, self.moving_mask)


def _coarsest_level(
    pair: _PaddedPair, settings: RefineSettings, stride: int
) -> tuple[torch.Tensor, torch.Tensor, _ControlGrid, list[int]]:
    """Optimise the coarsest level from each start ``settings.init`` names (zero, the network's DDF, both, or the
    network's DDF smoothed onto the control nodes); the start with the lower loss goes on. Returns that start, its
    control nodes and grid, and the steps of every run."""
    grid = _ControlGrid(pair.size, settings.control_spacing[0])
    steps: list[int] = []
    best: tuple[float, torch.Tensor, torch.Tensor] | None = None
    for start_ddf, start_nodes in _starts(pair, settings, grid):
        level = pair.level(settings.levels[0], start_ddf, settings)
        nodes, run, loss = _optimise_level(level, grid, start_nodes, settings, settings.iterations[0], stride)
        steps.append(run)
        if best is None or loss < best[0]:
            best = (loss, start_ddf, nodes)
    assert best is not None
    _, start_ddf, nodes = best
    return start_ddf, nodes, grid, steps


def _starts(pair: _PaddedPair, settings: RefineSettings, grid: _ControlGrid) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(starting DDF, initial control nodes) of each run of the coarsest level that ``settings.init`` names; only
    what that start needs is made (smoothing the network's field onto the nodes costs 0.13 s on a clinical grid)."""
    zero_nodes = torch.zeros((1, 3, *grid.shape), device=pair.device)
    if settings.init == "network":
        return [(pair.init, zero_nodes)]
    zero_ddf = torch.zeros_like(pair.init)
    if settings.init == "coarse":
        return [(zero_ddf, _field_on_nodes(pair.init, grid))]
    if settings.init == "auto":
        return [(zero_ddf, zero_nodes), (pair.init, zero_nodes)]
    return [(zero_ddf, zero_nodes)]


def _field_on_nodes(ddf: torch.Tensor, grid: _ControlGrid) -> torch.Tensor:
    """A (1, 3, *S) field (model voxels) averaged over boxes of the node spacing and sampled at the control nodes:
    its smooth part, as a residual the refinement can move away from everywhere."""
    width = grid.spacing + 1 - grid.spacing % 2  # odd
    kernel = torch.full((width,), 1.0 / width, dtype=ddf.dtype, device=ddf.device)
    smooth = separable_filtering(ddf, [kernel] * 3, mode="replicate")
    return F.interpolate(smooth, size=grid.shape, mode="trilinear", align_corners=True)


def _finer_levels(
    pair: _PaddedPair,
    init: torch.Tensor,
    nodes: torch.Tensor,
    grid: _ControlGrid,
    settings: RefineSettings,
    strides: Sequence[int],
    steps: list[int],
) -> tuple[torch.Tensor, _ControlGrid]:
    """Optimise the levels after the coarsest in turn, each from the last one's control nodes (carried over to its
    own control grid where that differs); appends each level's steps to ``steps``. Returns the last nodes and grid."""
    for factor, spacing, iterations, stride in zip(
        settings.levels[1:], settings.control_spacing[1:], settings.iterations[1:], strides, strict=True
    ):
        level = pair.level(factor, init, settings)
        finer = _ControlGrid(pair.size, spacing)
        if finer != grid:  # carry the residual over to this level's nodes
            positions = [
                step * torch.arange(n, device=pair.device) for step, n in zip(finer.steps, finer.shape, strict=True)
            ]
            nodes, grid = _interpolate(nodes, grid.weights(positions)), finer
        nodes, run, _ = _optimise_level(level, grid, nodes, settings, iterations, stride)
        steps.append(run)
    return nodes, grid


def _context_pair(inputs: torch.Tensor, size: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Daily image on the grid of ``size`` (inside the context border), planning image and labels with it."""
    border = (inputs.shape[2] - size[0]) // 2
    inner = (slice(None), slice(None), *(slice(border, border + n) for n in size))
    return inputs[:, 0:1][inner], inputs[:, 1:2], inputs[:, 2:3]


def refine_context(
    inputs: torch.Tensor,
    init: torch.Tensor,
    settings: RefineSettings,
    *,
    seg_logits: torch.Tensor | None = None,
    moving_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, RefineReport]:
    """:func:`refine_ddf` on the network's input: the pipeline's and the bundle's refinement.

    Args:
        inputs: network input (1, 3, *(S + 2b)): daily CT, planning CT, planning labels; ``b`` >= 0 is the context
            border around the grid of ``init``.
        init: the network's DDF (1, 3, *S); with ``settings.init == "zero"`` only its shape is read.
        settings: budget and losses.
        seg_logits: segmentation logits (1, 5, *S) for structure guidance.
        moving_mask: 1 where the planning scan has data, on the grid of ``inputs``; ``None``: everywhere.
    """
    fixed, moving, labels = _context_pair(inputs, init.shape[2:])
    return refine_ddf(
        fixed, moving, init, settings, moving_labels=labels, seg_logits=seg_logits, moving_mask=moving_mask
    )


def context_similarity(
    inputs: torch.Tensor, ddf: torch.Tensor, settings: RefineSettings, moving_mask: torch.Tensor | None = None
) -> float:
    """The similarity loss of ``ddf`` (1, 3, *S) on the network's input at the finest level, as
    :attr:`RefineReport.similarity_before` measures the network's DDF (for a refinement that did not start from it)."""
    fixed, moving, _ = _context_pair(inputs, ddf.shape[2:])
    _, border = _pair_shape(fixed, moving, ddf)
    pair = _PaddedPair.of(fixed, moving, ddf.detach().float(), border, settings, None, None, moving_mask)
    with torch.no_grad():
        return float(_similarity(pair.level(1, pair.init, settings, guided=False), pair.init, settings))


def refine_prediction(
    inputs: torch.Tensor, pred: torch.Tensor, settings: RefineSettings, moving_mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, RefineReport]:
    """The pipeline's ``refine(inputs, pred)`` step: ``pred`` with its DDF channels refined, logits untouched.

    Args:
        inputs: network input (1, 3, *(S + 2b)): daily CT, planning CT, planning labels; ``b`` >= 0 is the context
            border around ``pred``'s grid.
        pred: network output (1, 8, *S): 3 DDF channels, 5 segmentation logits.
        settings: budget and losses.
        moving_mask: 1 where the planning scan has data, on the grid of ``inputs``; ``None``: everywhere.
    """
    ddf, report = refine_context(inputs, pred[:, :3], settings, seg_logits=pred[:, 3:], moving_mask=moving_mask)
    return torch.cat([ddf.to(pred.dtype), pred[:, 3:]], dim=1), report
