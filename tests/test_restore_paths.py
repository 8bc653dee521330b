"""The restore path of issue 15 gives the app's outputs of the path it replaced, on a phantom DICOM session.

The old path (before issue 15) is kept here as the reference, verbatim in what it computed: the whole DDF restored to
every daily voxel in float64 coordinates with ``scipy.ndimage.map_coordinates`` on the box around the model grid,
padded with its edge values to the daily grid, then thinned to the registration object's grid. The new path restores
the DDF straight onto the written grids in float32 (:mod:`prostate_jrs.geometry`). Contours must be identical or
overlap with DSC >= 0.99, the DDF agree within 0.05 voxel (issue 15).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage

from prostate_jrs.dicom.registration import read_deformable_registration, registration_grid
from prostate_jrs.dicom_session import load_session, new_staging, write_registration
from prostate_jrs.evaluation import compose_contours, keep_largest_components
from prostate_jrs.geometry import array_from_image, index_to_world
from prostate_jrs.labels import STRUCTURES
from prostate_jrs.phantom import PhantomConfig, write_dataset
from prostate_jrs.phantom.dicom_export import export_dicom_sessions
from prostate_jrs.pipeline import _daily_box, load_bundle, run_pipeline

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------- the old path (reference)


def _old_resample(array, src_affine, dst_affine, dst_shape, order=1, mode="nearest", cval=0.0, ddf=None):
    mapping = np.linalg.inv(src_affine) @ dst_affine
    grid = np.stack(np.meshgrid(*(np.arange(n, dtype=np.float64) for n in dst_shape), indexing="ij"))
    if ddf is not None:
        grid += ddf
    points = np.tensordot(mapping[:3, :3], grid, axes=1) + mapping[:3, 3, None, None, None]
    source = array if order == 0 else array.astype(np.float32)
    return np.stack(
        [ndimage.map_coordinates(c, points, order=order, mode=mode, cval=cval, prefilter=False) for c in source]
    )


def _old_restore(pred, pred_affine, daily_affine, shape, planning, planning_affine, source):
    resampled = _old_resample(pred[:3].astype(np.float64), pred_affine, daily_affine, shape)
    vectors = np.linalg.inv(daily_affine[:3, :3]) @ pred_affine[:3, :3]
    ddf = np.tensordot(vectors, resampled, axes=1).astype(np.float32)
    ones = np.ones((1, *pred.shape[1:]), dtype=np.uint8)
    fov = _old_resample(ones, pred_affine, daily_affine, shape, order=0, mode="constant")[0] > 0
    seg = np.argmax(_old_resample(pred[3:], pred_affine, daily_affine, shape), axis=0).astype(np.uint8)
    seg[~fov] = 0
    seg = keep_largest_components(seg)
    reg = _old_resample(planning[None], planning_affine, daily_affine, shape, order=0, mode="constant", ddf=ddf)[0]
    return ddf, reg, seg, compose_contours(reg, seg, source)


def _old_pipeline_restore(pred, grid, daily, planning, planning_affine, source):
    """The old ``pipeline._restore``: the box around the model grid, padded to the daily grid (DDF: edge values)."""
    lo, hi = _daily_box(grid, daily)
    shift = np.eye(4)
    shift[:3, 3] = lo
    box = _old_restore(
        pred, index_to_world(grid), index_to_world(daily) @ shift, tuple(hi - lo), planning, planning_affine, source
    )
    pad = [(int(a), int(n - b)) for a, b, n in zip(lo, hi, daily.GetSize(), strict=True)]
    ddf = np.pad(box[0], [(0, 0), *pad], mode="edge")
    return (ddf, *(np.pad(m, pad) for m in box[1:]))


# --------------------------------------------------------------------------------- the comparison


def _dsc(a: np.ndarray, b: np.ndarray) -> float:
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else 2.0 * float(np.logical_and(a, b).sum()) / float(total)


@pytest.fixture(scope="module")
def session(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A phantom DICOM session at 2 x 2 x 4 mm (so the registration grid is every 2nd voxel in-plane) and a copy of
    the shipped bundle: trained weights, as the app runs them (an untrained network's logits tie everywhere, and
    every float rounding flips its segmentation)."""
    root = tmp_path_factory.mktemp("restore")
    data = root / "data"
    write_dataset(data, n_patients=1, n_fractions=1, seed=3, config=PhantomConfig.tiny(spacing=(2.0, 2.0, 4.0)))
    export_dicom_sessions(data)
    bundle = root / "bundle"
    for folder in ("configs", "models"):
        shutil.copytree(REPO / "bundle" / folder, bundle / folder, ignore=shutil.ignore_patterns("*.onnx"))
    return data / "dicom" / "JRS001_f01", bundle


def test_new_restore_path_gives_the_old_outputs(session: tuple[Path, Path], tmp_path: Path) -> None:
    folder, bundle = session
    inputs = load_session(folder)
    network, settings = load_bundle(bundle, overrides={"refine#mode": "off"})  # its default backend
    captured: list[torch.Tensor] = []

    def capture(context: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
        captured.append(pred.clone())
        return pred

    daily, planning_labels = inputs.daily.image, inputs.planning_labels
    result = run_pipeline(inputs.planning.image, planning_labels, daily, network, settings, capture)
    planning_affine = np.linalg.inv(result.rigid.daily_to_planning) @ index_to_world(planning_labels)
    old_ddf, old_reg, old_seg, old_labels = _old_pipeline_restore(
        captured[0][0].numpy(),
        result.model_grid,
        daily,
        array_from_image(planning_labels),
        planning_affine,
        result.contour_source,
    )

    new = {"labels": result.labels, "reg": result.reg, "seg": result.seg}
    for name, old in (("labels", old_labels), ("reg", old_reg), ("seg", old_seg)):
        array = array_from_image(new[name])
        assert old.any(), name
        for structure in STRUCTURES:
            dsc = _dsc(array == structure.label, old == structure.label)
            assert dsc >= 0.99, f"{name} {structure.name}: DSC {dsc:.4f} between the old and new restore paths"
    # the DDF on the whole daily grid and on the registration object's grid, within 0.05 daily voxel
    assert float(np.abs(result.ddf - old_ddf).max()) <= 0.05
    step = (2, 2, 1)
    coarse = registration_grid(daily, step)
    old_coarse = old_ddf[:, :: step[0], :: step[1], :: step[2]]
    assert float(np.abs(result.ddf_on(coarse) * np.array(step)[:, None, None, None] - old_coarse).max()) <= 0.05
    # what the app writes: the registration object read back holds the old DDF on its grid
    staging = new_staging(tmp_path)
    written = read_deformable_registration(write_registration(result, inputs, settings, staging))
    assert written.grid.GetSize() == coarse.GetSize()
    read_back = written.ddf_on(daily)[:, :: step[0], :: step[1], :: step[2]]
    assert float(np.abs(read_back - old_coarse).max()) <= 0.05
