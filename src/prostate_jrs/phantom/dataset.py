"""Writing a synthetic dataset: NIfTI images, label maps, ground-truth DDFs and a MONAI ``datalist.json``.

Layout (paths in ``datalist.json`` are relative to the folder)::

    OUT/datalist.json               training / validation / test, split by patient
    OUT/phantom.json                config and every drawn parameter (provenance)
    OUT/JRS001_planning_ct.nii.gz   int16 HU           (moving_image)
    OUT/JRS001_planning_labels.nii.gz  uint8 0..4      (moving_label)
    OUT/JRS001_f01_ct.nii.gz        daily CT           (fixed_image)
    OUT/JRS001_f01_labels.nii.gz    daily labels       (fixed_label)
    OUT/JRS001_f01_ddf.nii.gz       float32 (I, J, K, 3) on the daily grid, daily voxel units (ddf)
    OUT/JRS001_preview.png          with ``preview=True``

Each item also records ``rigid``, the rigid pre-alignment on bone of its pair
(:meth:`prostate_jrs.rigid.RigidAlignment.to_record`, found by :func:`prostate_jrs.rigid.align_on_bone` as the app
and ``prostate-jrs import`` find it; about 0.4 s per pair), so that the bundle's preprocessing
(:class:`prostate_jrs.transforms.ModelGridd`) gives the network what the app gives it.

The folder appears complete or not at all: everything is written to a hidden sibling folder first and
renamed at the end.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk

from prostate_jrs.datasets.splits import split_patients
from prostate_jrs.geometry import index_to_world
from prostate_jrs.labels import LABEL_NAMES
from prostate_jrs.output_folder import staged_folder
from prostate_jrs.rigid import RIGID_CONVENTION, RigidAlignment, align_on_bone

from .config import PhantomConfig
from .generate import Patient, generate_patient

__all__ = ["DDF_CONVENTION", "patient_seed", "split_patients", "write_dataset", "write_ddf"]

DDF_CONVENTION = (
    "ddf is (I, J, K, 3) on the daily (fixed) grid in daily voxel units; channel c displaces along voxel axis c. "
    "Daily voxel x shows the planning (moving) anatomy at the world point A_daily @ (x + ddf(x)), A_daily being "
    "the daily image's voxel-to-world affine."
)


def patient_seed(seed: int, index: int) -> int:
    """Seed of patient ``index`` in a dataset made with ``seed``; adding patients leaves earlier ones unchanged."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1, dtype=np.uint32)[0])


def write_ddf(ddf: np.ndarray, reference: sitk.Image, path: str | Path) -> None:
    """Write a ``(3, I, J, K)`` DDF as NIfTI ``(I, J, K, 3)`` with the reference image's (RAS) affine.

    SimpleITK writes vector images as 5-D NIfTI ``(I, J, K, 1, 3)``, which MONAI's ``EnsureChannelFirst`` does
    not turn into ``(3, I, J, K)``; nibabel writes the plain 4-D layout. RAS = LPS with x and y negated.

    Raises:
        ValueError: if the DDF does not match the reference grid.
    """
    if ddf.shape != (3, *reference.GetSize()):
        raise ValueError(f"ddf of shape {ddf.shape} does not match grid (3, {reference.GetSize()})")
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ index_to_world(reference)
    image = nib.Nifti1Image(np.moveaxis(ddf, 0, -1).astype(np.float32), affine)
    image.header.set_qform(affine, code=1)
    image.header.set_sform(affine, code=1)
    image.header.set_xyzt_units("mm")
    nib.save(image, str(path))


def _jsonable(value: object) -> object:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def _write_patient(patient: Patient, folder: Path) -> list[dict[str, object]]:
    pid = patient.patient_id
    moving_image, moving_label = f"{pid}_planning_ct.nii.gz", f"{pid}_planning_labels.nii.gz"
    sitk.WriteImage(patient.planning.image, str(folder / moving_image), useCompression=True)
    sitk.WriteImage(patient.planning.labels, str(folder / moving_label), useCompression=True)
    items = []
    for f, fraction in enumerate(patient.fractions, start=1):
        stem = f"{pid}_f{f:02d}"
        sitk.WriteImage(fraction.image, str(folder / f"{stem}_ct.nii.gz"), useCompression=True)
        sitk.WriteImage(fraction.labels, str(folder / f"{stem}_labels.nii.gz"), useCompression=True)
        write_ddf(fraction.ddf, fraction.image, folder / f"{stem}_ddf.nii.gz")
        rigid = RigidAlignment.from_result(align_on_bone(fraction.image, patient.planning.image))
        items.append(
            {
                "fixed_image": f"{stem}_ct.nii.gz",
                "moving_image": moving_image,
                "moving_label": moving_label,
                "fixed_label": f"{stem}_labels.nii.gz",
                "ddf": f"{stem}_ddf.nii.gz",
                "patient": pid,
                "fraction": f,
                "rigid": rigid.to_record(),
            }
        )
    return items


def _datalist(seed: int, split: dict[str, list[str]], items: dict[str, list[dict[str, object]]]) -> dict[str, object]:
    """``datalist.json``: dataset description and conventions, and each patient's items in its part of the split."""
    datalist: dict[str, object] = {
        "name": "prostate-jrs synthetic pelvis",
        "description": "Synthetic planning/daily pelvic CT pairs with known deformation (prostate_jrs.phantom)",
        "seed": seed,
        "modality": {"0": "CT"},
        "labels": {str(k): v for k, v in LABEL_NAMES.items()},
        "ddf_convention": DDF_CONVENTION,
        "rigid_convention": RIGID_CONVENTION,
    }
    for part in ("training", "validation", "test"):
        datalist[part] = [item for pid in split[part] for item in items[pid]]
    return datalist


def check_count(name: str, value: object, minimum: int = 1) -> None:
    """Refuse a count or seed that is not a whole number of at least ``minimum`` (0 or 1).

    Raises:
        ValueError: naming the argument and its value.
    """
    if not isinstance(value, int) or value < minimum:
        kind = "a positive integer" if minimum == 1 else "a non-negative integer"
        raise ValueError(f"{name} must be {kind}, got {value!r}")


def write_dataset(
    out_dir: str | Path,
    n_patients: int,
    n_fractions: int,
    seed: int,
    config: PhantomConfig | None = None,
    preview: bool = False,
    progress: Callable[[str], None] | None = None,
) -> Path:
    """Generate ``n_patients`` patients with ``n_fractions`` daily scans each and write them as a dataset.

    Args:
        out_dir: folder to create; it must not exist or be empty.
        n_patients: number of patients (>= 1), named JRS001, JRS002, ...
        n_fractions: daily scans per patient (>= 1).
        seed: dataset seed; patient ``i`` uses :func:`patient_seed` ``(seed, i)``.
        config: phantom config (clinical-looking default when ``None``).
        preview: also write ``<patient>_preview.png``.
        progress: called with a short message after each patient.

    Returns:
        Path of ``datalist.json``.

    Raises:
        ValueError: for bad counts or seed.
        FileExistsError: if ``out_dir`` exists and is not an empty folder.
    """
    check_count("n_patients", n_patients)
    check_count("n_fractions", n_fractions)
    check_count("seed", seed, minimum=0)
    config = config or PhantomConfig()
    out_dir = Path(out_dir)
    with staged_folder(out_dir) as staging:
        items: dict[str, list[dict[str, object]]] = {}
        provenance: dict[str, object] = {}
        ids = [f"JRS{i + 1:03d}" for i in range(n_patients)]
        for i, pid in enumerate(ids):
            patient = generate_patient(patient_seed(seed, i), n_fractions, config, patient_id=pid)
            items[pid] = _write_patient(patient, staging)
            if preview:
                from .preview import save_preview  # matplotlib only when asked for

                save_preview(patient, staging / f"{pid}_preview.png")
            provenance[pid] = {
                "seed": patient.seed,
                "anatomy": patient.anatomy.params,
                "fractions": [fraction.info for fraction in patient.fractions],
            }
            if progress is not None:
                progress(f"{pid}: planning + {n_fractions} fractions written")
        datalist = _datalist(seed, split_patients(ids, seed), items)
        (staging / "phantom.json").write_text(
            json.dumps(_jsonable({"config": dataclasses.asdict(config), "patients": provenance}), indent=1)
        )
        (staging / "datalist.json").write_text(json.dumps(datalist, indent=2))
    return out_dir / "datalist.json"
