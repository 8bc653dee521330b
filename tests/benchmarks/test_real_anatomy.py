"""The real-anatomy benchmark: known-deformation transport (unit tests) and a tiny end-to-end smoke run."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import SimpleITK as sitk
from script_loader import load_script

from prostate_jrs.geometry import array_from_image, image_from_array, index_to_world, world_to_index
from prostate_jrs.metrics import jacobian_determinant
from prostate_jrs.phantom import MotionRanges, PhantomConfig, generate_patient
from prostate_jrs.phantom.known_deformation import (
    deform_real_ct,
    from_phantom_axes,
    phantom_grid,
    place_phantom,
    planning_points,
)

REPO = Path(__file__).resolve().parents[2]
FIXTURE_DIR = REPO.parent / "shared" / "fixtures" / "real" / "pelvis_ct"
FLIPPED = (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)  # the fixture's direction (NIfTI RAS axes in LPS)

#: Only the rigid setup moves: every other component of the phantom's deformation is switched off.
SETUP_ONLY = MotionRanges(
    setup_rotation_sd=0.0,
    prostate_shift_sd=(0.0, 0.0, 0.0),
    prostate_rotation_sd=0.0,
    sv_bend_sd=0.0,
    bladder_log_sd=0.0,
    rectum_change=(0.0, 0.0),
    background_sd=0.0,
)


def _benchmark() -> ModuleType:
    """benchmarks/real_anatomy.py as a module (benchmarks/ is not a package)."""
    return load_script(REPO / "benchmarks" / "real_anatomy.py", "real_anatomy")


def _ct(shape: tuple[int, int, int], spacing: float, direction: tuple[float, ...]) -> sitk.Image:
    """A small smooth CT around the phantom's prostate (world origin), on a grid with ``direction``."""
    reference = sitk.Image(list(shape), sitk.sitkInt16)
    reference.SetSpacing((spacing,) * 3)
    reference.SetDirection(direction)
    matrix = np.asarray(direction).reshape(3, 3) * spacing
    reference.SetOrigin(tuple(-(matrix @ ((np.asarray(shape) - 1) / 2))))
    affine = index_to_world(reference)
    index = np.stack(np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")).reshape(3, -1)
    world = (affine[:3, :3] @ index + affine[:3, 3:4]).reshape(3, *shape)
    hu = 40.0 + 300.0 * np.sin(world[0] / 9.0) * np.cos(world[1] / 11.0) + 2.0 * world[2]
    return image_from_array(hu.astype(np.int16), reference)


def test_flip_between_image_and_phantom_axes_is_an_involution() -> None:
    image = _ct((6, 5, 4), 3.0, FLIPPED)
    ddf = np.random.default_rng(0).normal(size=(3, 6, 5, 4)).astype(np.float32)
    np.testing.assert_array_equal(from_phantom_axes(from_phantom_axes(ddf, image, True), image, True), ddf)
    grid = phantom_grid(image, np.array([1.0, 2.0, 3.0]))
    # the grid's nodes are the image's voxel centres, shifted by the offset
    first = index_to_world(image) @ np.array([5.0, 4.0, 0.0, 1.0])
    np.testing.assert_allclose(np.asarray(grid.origin), first[:3] + np.array([1.0, 2.0, 3.0]))
    with pytest.raises(ValueError, match="diagonal"):
        oblique = _ct((6, 5, 4), 3.0, (0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0))
        phantom_grid(oblique, np.zeros(3))


@pytest.mark.parametrize("direction", [(1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0), FLIPPED])
def test_pure_setup_translation_gives_a_constant_exact_map(direction: tuple[float, ...]) -> None:
    image = _ct((40, 36, 30), 4.0, direction)
    known = deform_real_ct(image, seed=3, motion=SETUP_ONLY, noise_hu=0.0, offset=np.zeros(3))
    shift = np.asarray(known.info["setup_shift"])
    assert np.abs(shift).max() > 0.5  # seed 3 draws a real shift
    # daily point q shows planning point q - shift, everywhere
    world = planning_points(np.zeros_like(known.ddf), image)
    np.testing.assert_allclose(known.true_points(), world - shift.reshape(3, 1, 1, 1), atol=2e-3)
    np.testing.assert_allclose(
        planning_points(np.zeros_like(known.ddf), image, known.setup), known.true_points(), atol=2e-3
    )
    voxels = world_to_index(image)[:3, :3] @ -shift
    np.testing.assert_allclose(known.ddf.reshape(3, -1), np.repeat(voxels[:, None], known.ddf[0].size, 1), atol=2e-3)
    np.testing.assert_allclose(jacobian_determinant(known.ddf), 1.0, atol=1e-4)


def test_the_field_does_not_depend_on_the_array_order() -> None:
    """The same physical volume stored with flipped axes gets the same world-space deformation."""
    plain = _ct((40, 36, 30), 4.0, (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
    flipped = image_from_array(array_from_image(plain)[::-1, ::-1, :].copy(), _ct((40, 36, 30), 4.0, FLIPPED))
    np.testing.assert_allclose(index_to_world(flipped) @ [39, 35, 0, 1], index_to_world(plain) @ [0, 0, 0, 1])
    a = deform_real_ct(plain, seed=1, noise_hu=0.0, offset=np.zeros(3))
    b = deform_real_ct(flipped, seed=1, noise_hu=0.0, offset=np.zeros(3))
    assert float(np.abs(a.ddf).max()) > 0.5  # a non-trivial field
    np.testing.assert_allclose(b.true_points()[:, ::-1, ::-1], a.true_points(), atol=1e-3)
    # float32 sampling (geometry.resample_to_grid) rounds a few voxels to the neighbouring HU in the other order
    np.testing.assert_allclose(array_from_image(b.daily_ct)[::-1, ::-1], array_from_image(a.daily_ct), atol=1)
    np.testing.assert_array_equal(array_from_image(b.planning_labels)[::-1, ::-1], array_from_image(a.planning_labels))
    assert jacobian_determinant(a.ddf).min() > 0


def test_the_true_map_recovered_after_any_rigid_part_has_zero_error() -> None:
    image = _ct((30, 28, 24), 4.0, FLIPPED)
    known = deform_real_ct(image, seed=2, noise_hu=0.0, offset=np.zeros(3))
    truth = known.true_points()
    np.testing.assert_allclose(planning_points(known.ddf, known.daily_ct), truth)
    # a method reporting rigid R plus the residual DDF relative to the aligned planning: R A (x + d') = A (x + d)
    rigid = known.setup
    residual = planning_points(known.ddf, known.daily_ct, world_to_index(image) @ np.linalg.inv(rigid))
    residual -= planning_points(np.zeros_like(known.ddf), known.daily_ct, world_to_index(image))
    recovered = planning_points(residual, known.daily_ct, rigid)
    assert float(np.sqrt(((recovered - truth) ** 2).sum(0)).max()) < 1e-6


def test_placement_recovers_a_known_translation() -> None:
    patient = generate_patient(0, 0, PhantomConfig.tiny())
    ct = patient.planning.image
    moved = sitk.Image(ct)
    moved.SetOrigin(tuple(np.asarray(ct.GetOrigin()) + np.array([8.0, -12.0, 16.0])))  # world = phantom + d
    placement = place_phantom(moved, patient.anatomy)
    np.testing.assert_allclose(placement.offset, [-8.0, 12.0, -16.0], atol=1e-6)
    assert placement.bone_overlap > 0.8


@pytest.mark.slow  # the tiny run of the script, elastix included
@pytest.mark.skipif(not FIXTURE_DIR.is_dir(), reason="shared/fixtures/real/pelvis_ct is absent")
def test_tiny_run_writes_table_json_and_figure(tmp_path: Path) -> None:
    benchmark = _benchmark()
    assert benchmark.main(["--tiny", "--out", str(tmp_path), "--threads", "1"]) == 0
    for name in ("real_anatomy.md", "real_anatomy.json", "real_anatomy.png"):
        assert (tmp_path / name).stat().st_size > 0
    report = json.loads((tmp_path / "real_anatomy.json").read_text())
    assert list(report["methods"]) == list(benchmark.METHODS)
    assert report["methods"]["network only"]["refine"] == {"mode": "off"}
    refined = report["methods"]["refine fast from the network's DDF"]["refine"]
    assert refined["mode"] == "fast" and refined["settings"]["init"] == "network" and refined["budget"] == 6
    for row in report["methods"].values():
        values = [row["crop"]["mean"], row["crop"]["p95"], row["body"]["mean"], row["body"]["p95"]]
        assert all(math.isfinite(v) and v >= 0 for v in values)
        assert 0.0 <= row["folding_fraction"] <= 1.0 and row["seconds"] > 0
    assert report["field"]["folding_fraction"] == 0.0
    table = [line for line in (tmp_path / "real_anatomy.md").read_text().splitlines() if line.startswith("| ")]
    assert [line.split("|")[1].strip() for line in table[1:]] == list(benchmark.METHODS)
