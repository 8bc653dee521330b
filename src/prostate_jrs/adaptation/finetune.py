"""Fine-tuning of a bundle's network on one patient's pairs, through the bundle's own training components.

:func:`finetune` reads the bundle's ``configs/train.json`` with MONAI's ``ConfigParser`` and runs its
``train#trainer`` (MONAI's ``SupervisedTrainer`` with the bundle's network, ``JRSLoss``, optimizer, batch
preparation and multi-scale inferer) with overrides, not a loop of its own:

* ``train#dataset``: the patient's items on the model grid (:func:`prostate_jrs.adaptation.pairs.training_items`,
  the output of the bundle's deterministic transforms) through the bundle's ``train#random_transforms`` (pad, patch
  crop balanced over the structures), :class:`~prostate_jrs.adaptation.pairs.PlanningDeformationd` and
  ``train#input_transforms``;
* ``train#handlers``: the bundle's ``LossTermsHandler`` and its ``CheckpointLoader`` (enabled, loading the bundle's
  weights: "fine-tuning from existing weights"); validation, checkpoint saving, TensorBoard and the progress bar are
  left out (the patient bundle is written by :mod:`prostate_jrs.adaptation.patient_bundle`);
* ``epochs`` 1 of ``epoch_length`` = the step budget, ``learning_rate``, ``num_workers`` 0, and the device (the
  bundle's own rule, a GPU when there is one, unless given).

The patient's loss is measured before and after on fixed patches of the approved pairs (eval mode, no gradient),
and every step's training loss is kept: the training record (:class:`TrainingRecord`) of the patient bundle.
"""

from __future__ import annotations

import copy
import math
import time
import types
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from monai.data import Dataset, list_data_collate
from monai.transforms import Compose
from monai.utils import set_determinism
from torch import nn

from prostate_jrs.adaptation.pairs import KIND, PlanningDeformationd, grid_settings
from prostate_jrs.pipeline import BundleError
from prostate_jrs.trust import MODEL_FILE, model_hash_problem

__all__ = [
    "DEFAULT_LEARNING_RATE",
    "DEFAULT_STEPS",
    "AdaptSettings",
    "TrainingRecord",
    "finetune",
    "model_grid_settings",
    "trainer_config",
]

#: Optimizer steps of the default budget (a few minutes on 2 CPU cores; see benchmarks/adaptation.py).
DEFAULT_STEPS = 20
#: Adam learning rate of the fine-tuning (a tenth of the bundle's; 5e-4 and 1e-3 made later fractions worse).
DEFAULT_LEARNING_RATE = 1e-4
_HANDLERS_KEPT = ("LossTermsHandler", "CheckpointLoader")


@dataclass(frozen=True)
class AdaptSettings:
    """Budget and recipe of one adaptation.

    Args:
        steps: optimizer steps.
        learning_rate: Adam learning rate.
        planning_share: share of the drawn pairs that are the planning scan against a synthetic deformation of itself.
        deform_prob: probability that an approved pair's daily patch is deformed too.
        batch_size: pairs per step; ``None`` for the bundle's ``batch_size``.
        patches_per_pair: patches per drawn pair; ``None`` for the bundle's ``patches_per_pair``.
        seed: seed of patch sampling, deformations and shuffling.
        device: torch device; ``None`` for the bundle's rule (a GPU when there is one, else the CPU).
        freeze_norm: keep the batch-norm layers in eval mode (their running statistics used and kept, their scale and
            shift still tuned): one patient's batches of 2 would otherwise re-estimate the statistics, which raised
            the eval-mode loss on the patient's own pairs (tiny bundle: 1.48 -> 5.06 in 8 steps, against
            1.48 -> 1.23 with them kept) and the later fractions' MSD (shipped bundle, see benchmarks/adaptation.py).
    """

    steps: int = DEFAULT_STEPS
    learning_rate: float = DEFAULT_LEARNING_RATE
    planning_share: float = 0.5
    deform_prob: float = 0.3
    batch_size: int | None = None
    patches_per_pair: int | None = 1
    seed: int = 0
    device: str | None = None
    freeze_norm: bool = True

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps must be at least 1, got {self.steps}")
        if not 0.0 <= self.planning_share < 1.0:
            raise ValueError(f"planning_share must be in [0, 1), got {self.planning_share}")
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be positive, got {self.learning_rate}")


@dataclass
class TrainingRecord:
    """What the fine-tuning did, for the patient bundle's metadata.

    Attributes:
        settings: the :class:`AdaptSettings` used (device resolved).
        approved_pairs: approved fractions trained on.
        planning_items: planning scans trained on (against synthetic deformations).
        patch_size: training patch edge (voxels).
        loss_before: the patient's loss on fixed patches of the approved pairs with the base weights.
        loss_after: the same with the adapted weights.
        loss_curve: training loss of every step.
        train_seconds: wall time of the training loop.
        threads: torch CPU threads.
    """

    settings: dict[str, Any]
    approved_pairs: int
    planning_items: int
    patch_size: int
    loss_before: float = math.nan
    loss_after: float = math.nan
    loss_curve: list[float] = field(default_factory=list)
    train_seconds: float = 0.0
    threads: int = 0

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready dictionary."""
        record = asdict(self)
        for key in ("loss_before", "loss_after", "train_seconds"):
            record[key] = round(float(record[key]), 5)
        record["loss_curve"] = [round(float(v), 5) for v in self.loss_curve]
        return record


def trainer_config(bundle_dir: str | Path, overrides: Mapping[str, Any] | None = None) -> Any:
    """The bundle's ``configs/train.json`` as a MONAI ``ConfigParser``, ``bundle_root`` set, ``overrides`` applied.

    Raises:
        BundleError: if the bundle has no ``configs/train.json``.
    """
    from monai.bundle import ConfigParser

    bundle = Path(bundle_dir)
    config = bundle / "configs" / "train.json"
    if not config.is_file():
        raise BundleError(f"{config}: not found; adaptation fine-tunes with the bundle's own training config")
    parser = ConfigParser()
    parser.read_config(str(config))
    parser["bundle_root"] = str(bundle)
    for key, value in dict(overrides or {}).items():
        parser[key] = value
    return parser


def model_grid_settings(bundle_dir: str | Path) -> dict[str, Any]:
    """The model grid of the bundle's training (:func:`prostate_jrs.adaptation.pairs.grid_settings` of its
    ``train.json``): pairs are prepared exactly as its ``ModelGridd`` prepares them.

    Raises:
        BundleError: if the bundle has no ``configs/train.json``.
        KeyError: naming a model-grid key the config lacks.
    """
    parser = trainer_config(bundle_dir)
    keys = ("model_spacing", "crop_margin_mm", "context_voxels", "hu_min", "hu_max")
    return grid_settings({key: parser.get_parsed_content(key) for key in keys if key in parser})


def _handlers(parser: Any, weights: Path) -> list[dict[str, Any]]:
    """The bundle's loss-terms handler and its checkpoint loader, enabled on ``weights``.

    Raises:
        BundleError: if ``train#handlers`` lacks either.
    """
    kept = []
    for handler in parser["train#handlers"]:
        target = str(handler.get("_target_", "")).rsplit(".", 1)[-1]
        if target == "CheckpointLoader":
            kept.append({**handler, "_disabled_": False, "load_path": str(weights), "strict": True})
        elif target in _HANDLERS_KEPT:
            kept.append(dict(handler))
    found = {str(h["_target_"]).rsplit(".", 1)[-1] for h in kept}
    if found != set(_HANDLERS_KEPT):
        raise BundleError(f"the bundle's train#handlers lack {sorted(set(_HANDLERS_KEPT) - found)}; cannot fine-tune")
    return kept


def _stay_in_eval(module: nn.Module, mode: bool = True) -> nn.Module:
    return nn.Module.train(module, False)


def _freeze_norm(network: nn.Module) -> None:
    """Keep every batch-norm layer in eval mode whatever the trainer's ``network.train()`` asks."""
    for module in network.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.train = types.MethodType(_stay_in_eval, module)  # type: ignore[method-assign]
            module.eval()


def _draws(approved: Sequence[dict[str, Any]], planning: Sequence[dict[str, Any]], share: float) -> list[dict]:
    """The dataset of one pass: each approved pair once, the planning items repeated to make up ``share``."""
    if not planning or share == 0.0:
        return list(approved)
    repeats = max(1, round(share / (1.0 - share) * len(approved) / len(planning)))
    return [*approved, *(list(planning) * repeats)]


def _patient_loss(parser: Any, network: nn.Module, approved: Sequence[dict[str, Any]], seed: int) -> float:
    """Mean loss of ``network`` on fixed patches of the approved pairs (the bundle's crop with ``seed``)."""
    # copies: the parsed transforms are the training dataset's, whose random state must not be touched
    transforms = [t for part in ("random", "input") for t in parser.get_parsed_content(f"train#{part}_transforms")]
    crop = Compose(copy.deepcopy(transforms))
    crop.set_random_state(seed)
    patches = [patch for item in approved for patch in crop({k: v for k, v in item.items() if k != KIND})]
    prepare, inferer = parser.get_parsed_content("prepare_batch"), parser.get_parsed_content("train#inferer")
    loss, device = parser.get_parsed_content("loss"), parser.get_parsed_content("device")
    was_training = network.training
    network.eval()
    values = []
    with torch.no_grad():
        for patch in patches:
            inputs, targets = prepare(list_data_collate([patch]), device)
            values.append(float(loss(inferer(inputs, network), targets)))
    network.train(was_training)
    return float(sum(values) / len(values))


def finetune(
    bundle_dir: str | Path,
    approved: Sequence[dict[str, Any]],
    planning: Sequence[dict[str, Any]],
    settings: AdaptSettings | None = None,
    progress: Callable[[str], None] | None = None,
) -> tuple[nn.Module, TrainingRecord]:
    """Fine-tune the bundle's network on one patient's items with the bundle's trainer (module docstring).

    Args:
        bundle_dir: the bundle (its ``configs/train.json`` and ``models/model.pt``).
        approved: approved pairs (:func:`prostate_jrs.adaptation.pairs.training_items`).
        planning: planning items.
        settings: budget and recipe; ``None`` for the defaults.
        progress: called with a line about every tenth of the steps.

    Returns:
        ``(network with the adapted weights, training record)``.

    Raises:
        BundleError: if the bundle lacks its weights or training config, or the weights are not those its metadata
            records.
        ValueError: if there is no approved pair.
    """
    from ignite.engine import Events

    settings = settings or AdaptSettings()
    bundle = Path(bundle_dir)
    weights = _checked_weights(bundle, approved)
    set_determinism(seed=settings.seed)
    parser = _patient_trainer_config(bundle, weights, settings, approved, planning)
    trainer = parser.get_parsed_content("train#trainer")
    if settings.freeze_norm:
        _freeze_norm(trainer.network)
    record = TrainingRecord(
        settings={
            **asdict(settings),
            "device": str(parser.get_parsed_content("device")),
            "batch_size": int(parser.get_parsed_content("batch_size")),
            "patches_per_pair": int(parser.get_parsed_content("patches_per_pair")),
        },
        approved_pairs=len(approved),
        planning_items=len(planning),
        patch_size=int(parser.get_parsed_content("patch_size")),
        threads=torch.get_num_threads(),
    )
    recorder = _Recorder(record, lambda network: _patient_loss(parser, network, approved, settings.seed))
    recorder.progress(settings.steps, progress)
    trainer.add_event_handler(Events.STARTED, recorder.started)
    trainer.add_event_handler(Events.ITERATION_COMPLETED, recorder.step)
    with warnings.catch_warnings():
        # MONAI's BendingEnergyLoss indexes with lists, which torch deprecates: one warning per loss, nothing to act on
        warnings.filterwarnings("ignore", message="Using a non-tuple sequence")
        trainer.run()
        record.train_seconds = time.perf_counter() - recorder.start
        record.loss_after = recorder.patient_loss(trainer.network)
    return trainer.network, record


def _checked_weights(bundle: Path, approved: Sequence[dict[str, Any]]) -> Path:
    """The bundle's weights file, once there is something to adapt to and the weights are those it records.

    Raises:
        ValueError: if there is no approved pair.
        BundleError: if the weights are missing or not those the metadata records.
    """
    weights = bundle / MODEL_FILE
    if not approved:
        raise ValueError("no approved pair to adapt to; expected at least one approved fraction")
    if not weights.is_file():
        raise BundleError(f"{weights}: no model weights to fine-tune")
    if problem := model_hash_problem(bundle):
        raise BundleError(problem)
    return weights


def _patient_trainer_config(
    bundle: Path,
    weights: Path,
    settings: AdaptSettings,
    approved: Sequence[dict[str, Any]],
    planning: Sequence[dict[str, Any]],
) -> Any:
    """The bundle's ``train.json`` for one patient: the settings' budget, the kept handlers loading ``weights``, and
    a dataset of the patient's pairs with synthetic deformations of the planning scan."""
    overrides: dict[str, Any] = {"learning_rate": settings.learning_rate, "epochs": 1, "num_workers": 0}
    overrides.update({"show_progress": False, "train#trainer#epoch_length": settings.steps})
    for key in ("batch_size", "patches_per_pair"):
        if getattr(settings, key) is not None:
            overrides[key] = getattr(settings, key)
    if settings.device is not None:
        overrides["device"] = torch.device(settings.device)
    parser = trainer_config(bundle, overrides)
    parser["train#handlers"] = _handlers(parser, weights)
    transform = Compose(
        [
            *parser.get_parsed_content("train#random_transforms"),
            PlanningDeformationd(prob=settings.deform_prob),
            *parser.get_parsed_content("train#input_transforms"),
        ]
    )
    parser["train#dataset"] = Dataset(_draws(approved, planning, settings.planning_share), transform=transform)
    return parser


class _Recorder:
    """The trainer's event handlers that fill a :class:`TrainingRecord`: loss on the approved pairs before
    training, the loss curve, progress lines, and the start of the training time.

    Args:
        record: the record to fill.
        patient_loss: the loss of a network on the approved pairs' fixed patches.
    """

    def __init__(self, record: TrainingRecord, patient_loss: Callable[[nn.Module], float]) -> None:
        self.record = record
        self.patient_loss = patient_loss
        self.start = time.perf_counter()
        self.steps, self.every = 0, 1
        self.report: Callable[[str], None] | None = None

    def progress(self, steps: int, report: Callable[[str], None] | None) -> None:
        """Call ``report`` with a line about every tenth of ``steps``."""
        self.steps, self.every, self.report = steps, max(1, steps // 10), report

    def started(self, engine: Any) -> None:
        """On STARTED, after the bundle's CheckpointLoader (which also runs on STARTED)."""
        self.record.loss_before = self.patient_loss(engine.network)
        self.start = time.perf_counter()

    def step(self, engine: Any) -> None:
        """On ITERATION_COMPLETED."""
        self.record.loss_curve.append(engine.state.output["loss"].item())
        n = engine.state.iteration
        if self.report is not None and (n % self.every == 0 or n == self.steps):
            recent = self.record.loss_curve[-self.every :]
            self.report(f"step {n}/{self.steps}: training loss {sum(recent) / len(recent):.4f}")
