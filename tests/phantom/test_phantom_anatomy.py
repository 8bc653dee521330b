from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from prostate_jrs.geometry import array_from_image
from prostate_jrs.labels import STRUCTURES, structure_by_name
from prostate_jrs.phantom import Patient
from prostate_jrs.phantom.anatomy import bladder_semi_axes

PROSTATE = structure_by_name("prostate").label
SV = structure_by_name("seminal_vesicles").label
RECTUM = structure_by_name("rectum").label
BLADDER = structure_by_name("bladder").label


def _volume_ml(labels: np.ndarray, label: int, spacing: tuple[float, ...]) -> float:
    return float((labels == label).sum() * np.prod(spacing) / 1000.0)


def test_planning_scan_geometry_and_types(tiny_patient: Patient) -> None:
    image, labels = tiny_patient.planning.image, tiny_patient.planning.labels
    assert image.GetPixelIDTypeAsString() == "16-bit signed integer"
    assert labels.GetPixelIDTypeAsString() == "8-bit unsigned integer"
    assert image.GetSize() == (96, 72, 48) and labels.GetSize() == image.GetSize()
    assert image.GetDirection() == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    hu = array_from_image(image)
    assert hu.min() >= -1024 and hu.max() > 700  # air and cortical bone
    assert tiny_patient.patient_id == "JRS000"


def test_every_structure_present_with_plausible_volume(tiny_patient: Patient) -> None:
    labels = array_from_image(tiny_patient.planning.labels)
    spacing = tiny_patient.planning.labels.GetSpacing()
    assert set(np.unique(labels)) == {0, *(s.label for s in STRUCTURES)}
    assert 20.0 < _volume_ml(labels, PROSTATE, spacing) < 70.0
    assert 3.0 < _volume_ml(labels, SV, spacing) < 30.0
    drawn = tiny_patient.anatomy.bladder_volume_ml
    assert abs(_volume_ml(labels, BLADDER, spacing) - drawn) < 0.12 * drawn


def test_bladder_axes_give_volume() -> None:
    a, b, c = bladder_semi_axes(300.0)
    assert 4 / 3 * np.pi * a * b * c / 1000 == pytest.approx(300.0)
    assert (a / b, b / c) == pytest.approx((1.3, 1.0))
    assert 49 < a < 52 and 37 < b < 40  # phantom recipe: about 51 x 39 x 37 mm at 300 ml


def test_prostate_has_no_free_edge(tiny_patient: Patient) -> None:
    """The prostate touches rectum and bladder, and its neighbours' HU differ from it by less than 15."""
    labels = array_from_image(tiny_patient.planning.labels)
    rim = ndimage.binary_dilation(labels == PROSTATE, iterations=1) & (labels != PROSTATE)
    assert (labels[rim] == RECTUM).any()
    assert (labels[rim] == BLADDER).any()
    hu = {layer.name: layer.hu for layer in tiny_patient.anatomy.layers}
    for neighbour in ("rectal_wall", "bladder_wall", "levator_ani", "seminal_vesicle"):
        assert abs(hu[neighbour] - hu["prostate"]) < 15, neighbour


def test_seminal_vesicles_are_thin_and_paired(tiny_patient: Patient) -> None:
    sv = array_from_image(tiny_patient.planning.labels) == SV
    thickness = 2 * ndimage.distance_transform_edt(sv, sampling=tiny_patient.planning.labels.GetSpacing()).max()
    assert thickness <= 20.0
    left, right = tiny_patient.anatomy.seminal_vesicles
    # Bent: the tip direction differs from the root direction.
    for tube in (left, right):
        first, last = np.diff(tube.points[:2], axis=0)[0], np.diff(tube.points[-2:], axis=0)[0]
        cos = first @ last / np.linalg.norm(first) / np.linalg.norm(last)
        assert cos < np.cos(np.deg2rad(10))
    assert left.points[-1, 0] > 0 > right.points[-1, 0]


def test_tissue_intensities(tiny_patient: Patient) -> None:
    hu = array_from_image(tiny_patient.planning.image).astype(float)
    labels = array_from_image(tiny_patient.planning.labels)
    urine = ndimage.binary_erosion(labels == BLADDER, iterations=3)
    assert abs(np.median(hu[urine]) - 10) < 8
    prostate = ndimage.binary_erosion(labels == PROSTATE, iterations=1)
    assert abs(np.median(hu[prostate]) - 40) < 10
