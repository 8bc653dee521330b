"""Contour paths and the per-structure contour source: which path each structure's final contour comes from.

Two paths give daily contours (docs/ARCHITECTURE.md, "Contour source"): the registration path (planning contours
warped by the DDF) and the segmentation path (argmax of the segmentation head). :func:`resolve_contour_source` is
the policy (the project default, a bundle's overrides, the one path of a single-task network);
:func:`compose_contours` paints the final label map from it.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from prostate_jrs.labels import STRUCTURES
from prostate_jrs.nets.factory import canonical_network_name

__all__ = ["DEFAULT_CONTOUR_SOURCE", "PATHS", "compose_contours", "resolve_contour_source"]

#: Contour paths: ``reg`` = planning contours warped by the DDF, ``seg`` = argmax of the segmentation head,
#: ``final`` = per-structure choice between the two (:func:`compose_contours`).
PATHS: tuple[str, str, str] = ("reg", "seg", "final")

#: Default source of each structure's final contour. The registration path keeps the clinician's planning
#: delineation of the low-contrast targets (prostate, seminal vesicles), whose outline CT barely shows; the
#: segmentation path follows the filling changes of rectum and bladder, which a smooth DDF underestimates
#: (docs/ARCHITECTURE.md, "Per-organ contour source"; not yet confirmed against the paper).
DEFAULT_CONTOUR_SOURCE: dict[str, str] = {
    "prostate": "reg",
    "seminal_vesicles": "reg",
    "rectum": "seg",
    "bladder": "seg",
}

# Painting order of the final label map: later structures overwrite earlier ones where paths disagree, so
# the targets (prostate, then seminal vesicles) win over the organs at risk.
_PAINT_ORDER: tuple[str, ...] = ("bladder", "rectum", "seminal_vesicles", "prostate")

#: Networks with only one task; their final contours must come from that task's path.
_SINGLE_PATH: dict[str, str] = {"seg": "seg", "reg": "reg", "jrs_reg": "reg"}


def resolve_contour_source(network_name: str, contour_source: Mapping[str, str] | None = None) -> dict[str, str]:
    """Per-structure contour source, forced to the one path a single-task network has.

    Args:
        network_name: the bundle's ``network_name`` (``seg``, ``reg``, ``jrs_reg``, ``dense``, ``sedd``,
            ``cross_stitch``).
        contour_source: structure name -> ``"reg"`` or ``"seg"``; missing structures take
            :data:`DEFAULT_CONTOUR_SOURCE`.

    Raises:
        ValueError: on an unknown structure or path.
    """
    known = {s.name for s in STRUCTURES}
    source = dict(DEFAULT_CONTOUR_SOURCE)
    for name, path in dict(contour_source or {}).items():
        if name not in known:
            raise ValueError(f"contour_source names unknown structure {name!r}; expected some of {sorted(known)}")
        if path not in ("reg", "seg"):
            raise ValueError(f"contour_source[{name!r}] = {path!r}; expected 'reg' or 'seg'")
        source[name] = path
    forced = _SINGLE_PATH.get(canonical_network_name(network_name))
    if forced is not None:
        source = dict.fromkeys(source, forced)
    return source


def compose_contours(reg: np.ndarray, seg: np.ndarray, contour_source: Mapping[str, str]) -> np.ndarray:
    """Final label map taking each structure from the path named in ``contour_source``.

    Args:
        reg: label map of the registration path.
        seg: label map of the segmentation path, same shape.
        contour_source: structure name -> ``"reg"`` or ``"seg"`` (see :func:`resolve_contour_source`).

    Returns:
        uint8 label map; where two structures claim a voxel the targets win (prostate over seminal vesicles
        over rectum over bladder).

    Raises:
        ValueError: if the shapes differ.
    """
    reg, seg = np.asarray(reg), np.asarray(seg)
    if reg.shape != seg.shape:
        raise ValueError(f"registration and segmentation label maps differ in shape: {reg.shape} vs {seg.shape}")
    source = resolve_contour_source("", contour_source)
    final = np.zeros(reg.shape, dtype=np.uint8)
    labels = {s.name: s.label for s in STRUCTURES}
    for name in _PAINT_ORDER:
        path_map = reg if source[name] == "reg" else seg
        final[path_map == labels[name]] = labels[name]
    return final
