"""Paired dictionary transforms of the bundle: data keys, datalists and the two contour paths on the model grid.

The paired preprocessing itself is MONAI's (``LoadImaged``, ``ResampleToMatchd`` to put the planning CT and
contours on the daily grid through the affines, ``Orientationd``, ``Spacingd``, ``ScaleIntensityRanged``,
``CropForegroundd`` around the planning contours, ``RandCropByLabelClassesd``, ``ConcatItemsd``) and is listed
in the bundle configs. This module adds what MONAI does not have: reading the project's datalist,
:class:`CheckLabelsd`, which refuses unusable label maps with the file's name (e.g. planning contours that miss the
daily scan), and :class:`JRSPathsd`, which splits the network's ``pred`` into DDF and logits and derives both
contour paths and the final contours on the model grid (the validation metrics of training use these).
"""

from __future__ import annotations

import json
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from monai.config import KeysCollection
from monai.data import load_decathlon_datalist
from monai.networks.utils import one_hot
from monai.transforms import MapTransform

from prostate_jrs.evaluation import compose_contours, keep_largest_components, resolve_contour_source
from prostate_jrs.inferers import warp_labels
from prostate_jrs.labels import NUM_CLASSES

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
    "case_name",
    "load_datalist",
]

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
        dataset_dir: the dataset folder (DESIGN.md "Dataset on disk").
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
        self, keys: KeysCollection, require_foreground: KeysCollection = (), allow_missing_keys: bool = False
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
