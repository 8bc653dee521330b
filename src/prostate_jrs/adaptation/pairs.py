"""Training pairs of one patient on the model grid, and the synthetic deformation that augments them.

:func:`training_items` turns approved fractions (:mod:`prostate_jrs.adaptation.sessions`) into the items the bundle's
training transforms take after their deterministic part: ``fixed_image``, ``moving_image``, ``moving_label`` and
``fixed_label`` on the model grid grown by the context border, made by
:func:`prostate_jrs.preprocessing.model_inputs` after the rigid pre-alignment on bone
(:func:`prostate_jrs.rigid.align_on_bone`) -- exactly what the bundle's ``ModelGridd`` and the app's pipeline give the
network. Besides one item per approved fraction (planning -> approved daily), each distinct planning scan gives a
*planning item*: the planning scan paired with itself, which :class:`PlanningDeformationd` turns into a new pair at
every draw by deforming its fixed side (image and labels) with a random smooth field and a small rigid motion.
Fine-tuning on the planning scan and synthetic deformations of it is what Elmahdy et al. (ISBI 2020) did; the
deformation here is MONAI's ``Rand3DElasticd`` (a smoothed random field), not the phantom's motion model, so the
benchmark does not learn the test data's deformation model.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.transforms import MapTransform, Rand3DElasticd, RandomizableTransform

from prostate_jrs.adaptation.sessions import ApprovedFraction
from prostate_jrs.preprocessing import model_inputs
from prostate_jrs.rigid import NoBoneError, RigidAlignment, align_on_bone
from prostate_jrs.transforms import FIXED_IMAGE, FIXED_LABEL, MOVING_IMAGE, MOVING_LABEL

__all__ = ["KIND", "PlanningDeformationd", "grid_settings", "training_items"]

#: Item key telling approved pairs (``approved``) from planning items (``planning``).
KIND = "kind"
_GRID_KEYS = {
    "model_spacing": "spacing",
    "crop_margin_mm": "margin_mm",
    "context_voxels": "context_voxels",
    "hu_min": "hu_min",
    "hu_max": "hu_max",
}


def grid_settings(config: Mapping[str, Any]) -> dict[str, Any]:
    """Keyword arguments of :func:`prostate_jrs.preprocessing.model_inputs` from a bundle config's values.

    Raises:
        KeyError: naming the key the config lacks.
    """
    values = {}
    for key, argument in _GRID_KEYS.items():
        if key not in config:
            raise KeyError(f"the bundle's train.json has no {key!r}; expected the model-grid settings")
        values[argument] = config[key]
    return {
        "spacing": float(values["spacing"]),
        "margin_mm": float(values["margin_mm"]),
        "context_voxels": int(values["context_voxels"]),
        "hu_min": float(values["hu_min"]),
        "hu_max": float(values["hu_max"]),
    }


def _item(model: Any, kind: str, name: str) -> dict[str, Any]:
    arrays = {
        FIXED_IMAGE: model.image[0],
        MOVING_IMAGE: model.image[1],
        MOVING_LABEL: model.image[2],
        FIXED_LABEL: model.daily_labels,
    }
    item: dict[str, Any] = {
        k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32))[None] for k, v in arrays.items()
    }
    item[KIND] = kind
    item["name"] = name
    return item


def training_items(
    fractions: Sequence[ApprovedFraction], settings: Mapping[str, Any]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[RigidAlignment]]:
    """Approved pairs and planning items of one patient on the model grid.

    Args:
        fractions: the approved fractions.
        settings: :func:`grid_settings` of the bundle.

    Returns:
        ``(approved items, planning items, rigid alignment of each approved pair)``; one planning item per distinct
        planning CT series.

    Raises:
        ValueError: naming the daily CT series if a pair cannot be aligned on bone or put on a model grid.
    """
    approved: list[dict[str, Any]] = []
    planning: dict[str, dict[str, Any]] = {}
    rigids: list[RigidAlignment] = []
    for number, fraction in enumerate(fractions, start=1):
        inputs = fraction.inputs
        where = f"approved fraction {number} (daily CT series {inputs.daily.series_instance_uid})"
        try:
            rigid = RigidAlignment.from_result(align_on_bone(inputs.daily.image, inputs.planning.image))
            model = model_inputs(
                inputs.daily.image, inputs.planning.image, inputs.planning_labels, rigid.daily_to_planning,
                daily_labels=fraction.daily_labels, **settings,
            )  # fmt: skip
        except (NoBoneError, ValueError) as err:
            raise ValueError(f"{where}: {err}") from err
        approved.append(_item(model, "approved", f"fraction {number}"))
        rigids.append(rigid)
        series = inputs.planning.series_instance_uid
        if series not in planning:
            itself = model_inputs(
                inputs.planning.image, inputs.planning.image, inputs.planning_labels, np.eye(4),
                daily_labels=inputs.planning_labels, **settings,
            )  # fmt: skip
            planning[series] = _item(itself, "planning", f"planning {len(planning) + 1}")
    return approved, list(planning.values()), rigids


class PlanningDeformationd(RandomizableTransform, MapTransform):
    """Random smooth deformation of the fixed side of a training patch: always for planning items, with ``prob`` for
    approved pairs.

    The daily image and label map (``keys``) are resampled through MONAI's ``Rand3DElasticd``: a random offset field
    smoothed by a Gaussian of ``sigma_range`` voxels and scaled by ``magnitude_range``; the planning side stays, so
    the network learns to register the planning scan to deformed versions of the patient's own anatomy. The
    defaults move a 64^3 patch by 1.5-2.3 voxels on average (95th percentile 2.6-4 voxels, i.e. 3-8 mm on the
    2 mm model grid, the size of daily prostate and organ motion) without folding (min det J 0.35 over 3 draws).
    It runs on patches, after the bundle's crop (deforming the whole model grid costs ~2 s per draw on 2 cores).
    Labels are resampled by nearest neighbour, images linearly; the border is continued.

    Args:
        keys: the fixed image and fixed label keys.
        prob: probability of deforming an approved pair's patch (planning items are always deformed).
        sigma_range: Gaussian smoothing of the offsets (voxels).
        magnitude_range: scale of the offsets.
    """

    def __init__(
        self,
        keys: Sequence[str] = (FIXED_IMAGE, FIXED_LABEL),
        prob: float = 0.3,
        sigma_range: tuple[float, float] = (6.0, 8.0),
        magnitude_range: tuple[float, float] = (150.0, 300.0),
    ) -> None:
        MapTransform.__init__(self, keys)
        RandomizableTransform.__init__(self, prob)
        self.elastic = Rand3DElasticd(
            keys=list(keys),
            sigma_range=sigma_range,
            magnitude_range=magnitude_range,
            prob=1.0,
            mode=["bilinear", "nearest"],
            padding_mode="border",
        )

    def set_random_state(
        self, seed: int | None = None, state: np.random.RandomState | None = None
    ) -> PlanningDeformationd:
        """Seed this transform and the elastic one it wraps."""
        super().set_random_state(seed, state)
        self.elastic.set_random_state(seed, state)
        return self

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """Return ``data`` with its fixed side deformed (a planning item always, another with ``prob``)."""
        d = dict(data)
        self.randomize(None)
        if d.get(KIND) == "planning" or self._do_transform:
            d = dict(self.elastic(d))
        return d
