"""The label maps the DICOM writers take: integer pixels holding only known structure labels."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import SimpleITK as sitk

from prostate_jrs.geometry import label_counts
from prostate_jrs.labels import STRUCTURES, Structure

__all__ = ["known_label_values", "label_values"]


def label_values(labels: np.ndarray) -> list[int]:
    """The values of an integer map (a histogram for uint8: no sort of millions of voxels)."""
    if labels.dtype == np.uint8:
        return np.flatnonzero(label_counts(labels)).tolist()
    return np.unique(labels).tolist()


def known_label_values(labels: np.ndarray, label_map: sitk.Image, structures: Sequence[Structure]) -> list[int]:
    """The values of ``labels`` (a view of ``label_map``), once checked to be integers of known structures.

    Args:
        labels: the label map's voxels, in any axis order.
        label_map: the image they come from (for its pixel type in messages).
        structures: the structures to be written; their labels count as known besides the project's.

    Returns:
        The values present, background included, ascending.

    Raises:
        ValueError: if the pixel type is not integer, or a value is neither 0 nor a structure's label.
    """
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"label_map must have an integer pixel type, got {label_map.GetPixelIDTypeAsString()}")
    known = {0} | {s.label for s in STRUCTURES} | {s.label for s in structures}
    values = label_values(labels)
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"label_map has labels {unknown}; expected only {sorted(known)}")
    return values
