"""The label-map check shared by the RTSTRUCT and SEG writers."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from prostate_jrs.dicom.label_maps import known_label_values, label_values
from prostate_jrs.labels import STRUCTURES, Structure


@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.int64])
def test_label_values_of_any_integer_map(dtype: type) -> None:
    labels = np.zeros((4, 5, 6), dtype=dtype)
    labels[1, 2, 3], labels[0, 0, 0] = 4, 2
    assert label_values(labels) == [0, 2, 4]


def test_known_label_values_accepts_project_and_extra_labels() -> None:
    labels = np.array([[[0, 1, 4, 9]]], dtype=np.uint8)
    image = sitk.GetImageFromArray(labels)
    extra = Structure(9, "body", "BODY", (1, 2, 3), "EXTERNAL")
    assert known_label_values(labels, image, [*STRUCTURES, extra]) == [0, 1, 4, 9]
    with pytest.raises(ValueError, match=r"label_map has labels \[9\]; expected only \[0, 1, 2, 3, 4\]"):
        known_label_values(labels, image, STRUCTURES)


def test_known_label_values_refuses_float_maps() -> None:
    labels = np.zeros((1, 2, 2), dtype=np.float32)
    with pytest.raises(ValueError, match="integer pixel type, got 32-bit float"):
        known_label_values(labels, sitk.GetImageFromArray(labels), STRUCTURES)
