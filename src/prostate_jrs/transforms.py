"""Paired dictionary transforms of the bundle: data keys, datalists, the model grid and the two contour paths on it.

The bundle configs list MONAI's transforms (``LoadImaged``, ``RandCropByLabelClassesd``, ``ConcatItemsd``, ...) and
these, for what MONAI does not have: reading the project's datalist; :class:`CheckLabelsd`, which refuses unusable
label maps with the file's name; :class:`ModelGridd`, the app's model-grid step
(:func:`prostate_jrs.preprocessing.model_inputs`: rigid pre-alignment, RAS, model spacing, crop, one interpolation,
HU scaling) on a datalist item; and :class:`JRSPathsd`, which splits the network's ``pred`` into DDF and logits and
derives both contour paths and the final contours on the model grid (the validation metrics of training use these).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Collection, Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor, load_decathlon_datalist
from monai.networks.utils import one_hot
from monai.transforms import MapTransform

from prostate_jrs.evaluation import compose_contours, keep_largest_components, resolve_contour_source
from prostate_jrs.inferers import warp_labels
from prostate_jrs.labels import NUM_CLASSES
from prostate_jrs.preprocessing import (
    DAILY_TO_PLANNING,
    LPS_RAS,
    RIGID,
    PreprocessingError,
    model_inputs,
    ras_affine,
)
from prostate_jrs.rigid import RigidAlignment, recorded_or_on_bone

__all__ = [
    "FIXED_IMAGE",
    "FIXED_LABEL",
    "IMAGE",
    "IMAGE_KEYS",
    "INPUT_KEYS",
    "LABEL_KEYS",
    "MOVING_IMAGE",
    "MOVING_LABEL",
    "PRED",
    "TRUE_DDF",
    "CheckLabelsd",
    "JRSPathsd",
    "ModelGridd",
    "case_name",
    "image_from_metatensor",
    "load_datalist",
]

logger = logging.getLogger(__name__)

FIXED_IMAGE = "fixed_image"
MOVING_IMAGE = "moving_image"
MOVING_LABEL = "moving_label"
FIXED_LABEL = "fixed_label"
IMAGE = "image"
PRED = "pred"
#: Ground-truth DDF of a phantom pair, when the datalist item has one (NIfTI (I, J, K, 3), daily voxel units).
TRUE_DDF = "ddf"
#: CT keys (linear interpolation, HU scaling) and label keys (nearest neighbour).
IMAGE_KEYS: tuple[str, str] = (FIXED_IMAGE, MOVING_IMAGE)
LABEL_KEYS: tuple[str, str] = (MOVING_LABEL, FIXED_LABEL)
#: Channel order of the network input ``image``.
INPUT_KEYS: tuple[str, str, str] = (FIXED_IMAGE, MOVING_IMAGE, MOVING_LABEL)

_REQUIRED = (FIXED_IMAGE, MOVING_IMAGE, MOVING_LABEL)


def load_datalist(
    dataset_dir: str | Path,
    lists: Sequence[str] | str = ("training",),
    datalist: str | Path = "datalist.json",
    require_fixed_label: bool = False,
) -> list[dict[str, Any]]:
    """Items of one or more lists of a dataset folder's ``datalist.json``, with absolute paths.

    Args:
        dataset_dir: the dataset folder (docs/ARCHITECTURE.md, "Dataset on disk").
        lists: list names to concatenate (``training``, ``validation``, ``test``); missing lists are skipped.
        datalist: the datalist file, relative to ``dataset_dir`` unless absolute.
        require_fixed_label: also require ``fixed_label`` (training and evaluation need the daily contours).

    Returns:
        The items, first occurrence kept where the same daily image appears in several lists.

    Raises:
        FileNotFoundError: if the datalist or a file it names does not exist.
        ValueError: if the selected lists hold no item, or an item lacks a required key.
    """
    root = Path(dataset_dir)
    path = Path(datalist) if Path(datalist).is_absolute() else root / datalist
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no datalist; expected a datalist.json as written by `prostate-jrs synth`")
    names = [lists] if isinstance(lists, str) else list(lists)
    content = json.loads(path.read_text(encoding="utf-8"))
    required = (*_REQUIRED, FIXED_LABEL) if require_fixed_label else _REQUIRED
    items: list[dict[str, Any]] = []
    seen: set[str] = set()
    for name in names:
        if not content.get(name):
            continue
        for item in load_decathlon_datalist(str(path), is_segmentation=False, data_list_key=name, base_dir=str(root)):
            missing = [k for k in required if not item.get(k)]
            if missing:
                raise ValueError(f"{path}: an item of list {name!r} lacks {missing}: {item}")
            for key in (*_REQUIRED, FIXED_LABEL):
                if item.get(key) and not Path(item[key]).is_file():
                    raise FileNotFoundError(f"{path}: list {name!r} names {item[key]} ({key}), which does not exist")
            if item[FIXED_IMAGE] in seen:
                continue
            seen.add(item[FIXED_IMAGE])
            items.append(item)
    if not items:
        raise ValueError(f"{path}: lists {names} hold no item")
    return items


def case_name(path: str | Path) -> str:
    """Case name of a daily image file: its name without ``.nii.gz``/``.nii``/other extension."""
    name = Path(str(path)).name
    for suffix in (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


class CheckLabelsd(MapTransform):
    """Fail early, naming the file, on label maps the network cannot use.

    Every value must be one of the project's labels (0..4). With ``require_foreground`` a map must also hold a
    contour: placed after resampling the planning labels onto the daily grid, this refuses a pair whose planning
    contours fall outside the daily scan (wrong patient, wrong frame of reference) instead of cropping to nothing.

    Args:
        keys: label map keys.
        require_foreground: keys that must contain at least one non-background voxel.
        allow_missing_keys: skip absent keys.
    """

    def __init__(
        self,
        keys: KeysCollection,
        require_foreground: str | Collection[Hashable] = (),
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.require_foreground = (
            {require_foreground} if isinstance(require_foreground, str) else set(require_foreground)
        )

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """Return ``data`` unchanged.

        Raises:
            ValueError: on a value outside 0..4, or a required map without any contour.
        """
        d = dict(data)
        for key in self.key_iterator(d):
            values = torch.unique(torch.as_tensor(d[key]))
            source = getattr(d[key], "meta", {}).get("filename_or_obj", key)
            bad = [v for v in values.tolist() if v != round(v) or not 0 <= v < NUM_CLASSES]
            if bad:
                raise ValueError(
                    f"{source} ({key}): label values {bad[:5]} are not project labels; expected 0 background, "
                    "1 prostate, 2 seminal_vesicles, 3 rectum, 4 bladder"
                )
            if key in self.require_foreground and bool((values == 0).all()):
                raise ValueError(
                    f"{source} ({key}): no contour on the daily grid; the planning contours are empty or lie outside "
                    "the daily scan (check that both scans belong to the same patient and frame of reference)"
                )
        return d


def image_from_metatensor(tensor: torch.Tensor, name: str = "image") -> sitk.Image:
    """A channel-first MetaTensor ``(1, I, J, K)`` (RAS affine, as ``LoadImaged`` gives it) as a SimpleITK image (LPS).

    Raises:
        ValueError: naming ``name`` if the tensor has no affine, more than one channel, or a sheared affine.
    """
    affine = getattr(tensor, "affine", None)
    if affine is None or tensor.ndim != 4 or tensor.shape[0] != 1:
        raise ValueError(
            f"{name}: expected a MetaTensor of shape (1, I, J, K) with an affine (as LoadImaged with "
            f"ensure_channel_first=True gives), got {type(tensor).__name__} of shape {tuple(tensor.shape)}"
        )
    lps = LPS_RAS @ np.asarray(torch.as_tensor(affine).cpu(), dtype=np.float64)
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    direction = lps[:3, :3] / spacing
    if not np.allclose(direction.T @ direction, np.eye(3), atol=1e-4):
        raise ValueError(f"{name}: the affine is sheared ({lps[:3, :3].tolist()}); expected an orthogonal grid")
    array = np.asarray(torch.as_tensor(tensor).detach().cpu()[0].numpy())
    image = sitk.GetImageFromArray(np.ascontiguousarray(array.transpose(2, 1, 0)))
    image.SetSpacing(spacing.tolist())
    image.SetDirection(direction.ravel().tolist())
    image.SetOrigin(lps[:3, 3].tolist())
    return image


def _source(value: Any, key: Hashable) -> str:
    return str(getattr(value, "meta", {}).get("filename_or_obj", key))


class ModelGridd(MapTransform):
    """The bundle's paired preprocessing: a datalist item's scans on the model grid, as the app's pipeline does it.

    Reads the loaded ``fixed_image``, ``moving_image``, ``moving_label`` (and, when present, ``fixed_label``), the
    item's ``rigid`` record, and replaces the four with MetaTensors ``(1, *context shape)`` on the model grid grown
    by ``context_voxels`` (:func:`model_inputs`): the CTs scaled to [-1, 1], the label maps as float. Their affine
    is the grown grid's (RAS); their other metadata (file name, ``original_affine``, ``spatial_shape``) are the
    files'. ``rigid`` is replaced by ``daily_to_planning`` (float64 tensor ``(4, 4)``, LPS), which the restore of
    predictions to the daily grid needs (:func:`prostate_jrs.evaluation.writers.restore_item`).

    Args:
        keys: the daily CT, planning CT, planning label map and (optional) daily label map keys, in this order.
        model_spacing: model voxel size (mm).
        crop_margin_mm: margin around the planning contours (mm).
        context_voxels: context border of the network (``(patch - output) / 2``).
        hu_min: HU mapped to -1.
        hu_max: HU mapped to +1.
        rigid_key: the item's rigid record key.
        align_missing: for an item without a rigid record, align on bone here (about 0.5 s per pair) instead of
            failing; a dataset written by ``prostate-jrs import`` or ``synth`` has the records.
        allow_missing_keys: the daily label map may be absent (inference).
    """

    def __init__(
        self,
        keys: tuple[str, ...] = (FIXED_IMAGE, MOVING_IMAGE, MOVING_LABEL, FIXED_LABEL),
        model_spacing: float = 2.0,
        crop_margin_mm: float = 30.0,
        context_voxels: int = 20,
        hu_min: float = -1000.0,
        hu_max: float = 1000.0,
        rigid_key: str = RIGID,
        align_missing: bool = True,
        allow_missing_keys: bool = True,
    ) -> None:
        if len(keys) not in (3, 4):
            raise ValueError(f"keys: expected (fixed_image, moving_image, moving_label[, fixed_label]), got {keys}")
        super().__init__(keys, allow_missing_keys)
        self.settings: dict[str, Any] = {  # model_inputs' keyword arguments
            "spacing": float(model_spacing),
            "margin_mm": float(crop_margin_mm),
            "context_voxels": int(context_voxels),
            "hu_min": float(hu_min),
            "hu_max": float(hu_max),
        }
        self.rigid_key = rigid_key
        self.align_missing = align_missing

    def _alignment(self, d: Mapping[Hashable, Any], daily: sitk.Image, planning: sitk.Image) -> RigidAlignment:
        source = _source(d[self.keys[0]], self.keys[0])
        record = d.get(self.rigid_key)
        if record is None and not self.align_missing:
            raise ValueError(
                f"{source}: the datalist item has no {self.rigid_key!r} record; expected the "
                "rigid pre-alignment written by `prostate-jrs import` (or allow align_missing)"
            )
        if record is None:
            logger.info(f"{source}: no rigid record in the datalist; aligning on bone")
        return recorded_or_on_bone(record, daily, planning, source, self.rigid_key)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """Return a copy of ``data`` with the scans on the model grid.

        Raises:
            ValueError: naming the daily file if the pair cannot be put on a model grid.
        """
        d = dict(data)
        fixed_key, moving_key, label_key = self.keys[:3]
        daily_label_key = self.keys[3] if len(self.keys) == 4 and self.keys[3] in d else None
        volumes = {k: image_from_metatensor(d[k], _source(d[k], str(k))) for k in (fixed_key, moving_key, label_key)}
        rigid = self._alignment(d, volumes[fixed_key], volumes[moving_key])
        try:
            model = model_inputs(
                volumes[fixed_key],
                volumes[moving_key],
                volumes[label_key],
                rigid.daily_to_planning,
                daily_labels=None if daily_label_key is None else image_from_metatensor(d[daily_label_key]),
                **self.settings,
            )
        except PreprocessingError as err:
            raise ValueError(
                f"{_source(d[fixed_key], fixed_key)} with {_source(d[label_key], label_key)}: {err}"
            ) from err
        affine = torch.as_tensor(ras_affine(model.context_grid))
        outputs = dict(zip((fixed_key, moving_key, label_key), model.image, strict=True))
        if daily_label_key is not None:
            outputs[daily_label_key] = model.daily_labels
        for key, array in outputs.items():
            meta = {k: v for k, v in getattr(d[key], "meta", {}).items() if k != "affine"}
            d[key] = MetaTensor(torch.from_numpy(np.ascontiguousarray(array))[None], affine=affine, meta=meta)
        d.pop(self.rigid_key, None)
        d[DAILY_TO_PLANNING] = torch.as_tensor(rigid.daily_to_planning, dtype=torch.float64)
        return d


def _centre_crop(volume: torch.Tensor, spatial_shape: Sequence[int], key: str) -> torch.Tensor:
    """``volume`` (C, *S) cropped to its centred region of ``spatial_shape``.

    Raises:
        ValueError: if ``spatial_shape`` is not a centred crop of the volume (larger, or an odd difference).
    """
    starts = []
    for size, target in zip(volume.shape[1:], spatial_shape, strict=True):
        if target > size or (size - target) % 2:
            raise ValueError(
                f"{key} of spatial shape {tuple(volume.shape[1:])} has no centred region of shape "
                f"{tuple(spatial_shape)}"
            )
        starts.append((size - target) // 2)
    return volume[(slice(None), *(slice(s, s + n) for s, n in zip(starts, spatial_shape, strict=True)))]


class JRSPathsd(MapTransform):
    """Both contour paths and the final contours on the model grid, from one item's ``pred``.

    Adds ``pred_ddf`` (3, *S; not ``ddf``, the datalist's key of a phantom's true DDF), ``seg`` (argmax of the
    logits, largest component of each single-organ label), ``reg`` (the planning label map, channel 2 of ``image``,
    warped with the DDF by nearest neighbour, MONAI ``Warp``) and ``final`` (per-structure choice,
    :func:`prostate_jrs.evaluation.compose_contours`), each (1, *S). With ``onehot=True`` also ``<path>_onehot``
    and, when the item has it, ``label_onehot`` of the daily label map, for MONAI's ``MeanDice``.

    A ``pred`` smaller than ``image`` is the centred inner region of an input that carried the network's context
    border (``ValidPatchInferer(includes_context=True)``): the planning and daily label maps are cropped to it.

    Args:
        keys: the prediction key (``pred``).
        image_key: the network input key (``image``).
        label_key: the daily label map key (``fixed_label``), optional in the item.
        network_name: forces the one path of single-task networks (``seg``, ``reg``, ``jrs_reg``).
        contour_source: structure -> ``"reg"``/``"seg"``; defaults from
            :data:`prostate_jrs.evaluation.DEFAULT_CONTOUR_SOURCE`.
        onehot: add one-hot versions for metrics.
        allow_missing_keys: skip items without ``pred``.
    """

    def __init__(
        self,
        keys: KeysCollection = PRED,
        image_key: str = IMAGE,
        label_key: str = FIXED_LABEL,
        network_name: str = "cross_stitch",
        contour_source: Mapping[str, str] | None = None,
        onehot: bool = True,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.image_key = image_key
        self.label_key = label_key
        self.contour_source = resolve_contour_source(network_name, contour_source)
        self.onehot = onehot

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """Add the path outputs to a copy of ``data``."""
        d = dict(data)
        for key in self.key_iterator(d):
            pred = torch.as_tensor(d[key]).float()
            if pred.dim() != 4 or pred.shape[0] != 3 + NUM_CLASSES:
                raise ValueError(f"{key}: expected (8, X, Y, Z) = 3 DDF + 5 logits, got {tuple(pred.shape)}")
            image = _centre_crop(torch.as_tensor(d[self.image_key]), pred.shape[1:], self.image_key)
            ddf = pred[:3]
            seg = pred[3:].argmax(dim=0, keepdim=True).to(torch.uint8)
            seg = torch.as_tensor(keep_largest_components(seg.cpu().numpy()), device=seg.device)
            reg = warp_labels(image[None, 2:3].float(), ddf[None], mode="nearest")[0].to(torch.uint8)
            final = torch.as_tensor(
                compose_contours(reg.cpu().numpy(), seg.cpu().numpy(), self.contour_source), device=seg.device
            )
            d.update({"pred_ddf": ddf, "seg": seg, "reg": reg, "final": final})
            if self.onehot:
                for path in ("reg", "seg", "final"):
                    d[f"{path}_onehot"] = one_hot(d[path][None].long(), NUM_CLASSES, dim=1)[0]
                if self.label_key in d:
                    label = _centre_crop(torch.as_tensor(d[self.label_key]), pred.shape[1:], self.label_key)
                    d["label_onehot"] = one_hot(label[None].round().long(), NUM_CLASSES, dim=1)[0].to(seg.device)
        return d
