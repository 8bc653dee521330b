"""The bundle engines' writers: evaluation tables and montage, and the inference files, on the daily CT's grid.

Evaluation and inference restore each case to the daily CT's own grid (:func:`restore_item`, through
:func:`prostate_jrs.evaluation.restore.restore_to_daily_grid`): :class:`EvaluationWriter` (``evaluate.json``) writes
per-case and summary CSVs and a PNG montage, :class:`InferenceWriter` (``inference.json``) the label map, DDF and
segmentation files of the command-line contract (docs/ARCHITECTURE.md). Both are ignite handlers: ``attach`` them
to the evaluator. The bundle configs name them ``prostate_jrs.engines.*`` (re-exported there).
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import nibabel as nib
import numpy as np
import torch
from monai.data import decollate_batch
from monai.transforms import LoadImage
from monai.utils import min_version, optional_import

from prostate_jrs.evaluation.contours import resolve_contour_source
from prostate_jrs.evaluation.restore import (
    DailyGridResult,
    compose_rigid,
    output_grid_affine,
    restore_to_daily_grid,
    spacing_from_affine,
)
from prostate_jrs.evaluation.tables import case_metrics, deployed_refine, summarize, write_csv
from prostate_jrs.inferers import RefiningInferer
from prostate_jrs.labels import STRUCTURES
from prostate_jrs.metrics import deformation_quality, structure_metrics
from prostate_jrs.preprocessing import DAILY_TO_PLANNING, ras_map
from prostate_jrs.qa import DISAGREEMENT_DSC, DISAGREEMENT_HD95_MM, check_disagreement_limits, disagreement_flag
from prostate_jrs.transforms import FIXED_IMAGE, FIXED_LABEL, IMAGE, MOVING_LABEL, PRED, TRUE_DDF, case_name

if TYPE_CHECKING:
    from ignite.engine import Engine, Events
else:
    Events, _ = optional_import("ignite.engine", "0.4.11", min_version, "Events")
    Engine, _ = optional_import("ignite.engine", "0.4.11", min_version, "Engine")

__all__ = ["EvaluationWriter", "InferenceWriter", "path_agreement", "restore_item"]

logger = logging.getLogger(__name__)

_METRICS = ("dsc", "msd_mm", "hd95_mm")
_DDF_METRICS = (
    "folding_fraction",
    "jacobian_std",
    "jacobian_min",
    "jacobian_max",
    "ddf_error_mean_mm",
    "ddf_error_p95_mm",
    "ddf_error_max_mm",
)


def _items(engine: Engine) -> list[tuple[Mapping[str, Any], Mapping[str, Any]]]:
    """(batch item, output item) pairs of the current iteration, decollating if the engine did not."""
    batch, output = engine.state.batch, engine.state.output
    batch_items = batch if isinstance(batch, list) else decollate_batch(batch)
    output_items = output if isinstance(output, list) else decollate_batch(output)
    return list(zip(batch_items, output_items, strict=True))


def _filename(value: Any, key: str) -> str:
    meta = getattr(value, "meta", None)
    if not meta or "filename_or_obj" not in meta:
        raise KeyError(f"{key} has no file name in its metadata; load it with LoadImaged(image_only=True)")
    return str(meta["filename_or_obj"])


def restore_item(
    batch_item: Mapping[str, Any], output_item: Mapping[str, Any], contour_source: Mapping[str, str]
) -> tuple[str, DailyGridResult]:
    """Restore one evaluated item to the daily CT's own grid.

    Uses the model-grid affine of ``image``, the daily grid (``original_affine``, ``spatial_shape``) that
    ``LoadImaged`` recorded in ``fixed_image``'s metadata, and re-reads the planning label map from its file so
    the registration path warps the original contours, placed in the daily frame by the item's rigid
    pre-alignment ``daily_to_planning`` (:class:`prostate_jrs.transforms.ModelGridd`; identity when absent). The
    DDF is returned relative to the planning file's own coordinates (:func:`prostate_jrs.evaluation.compose_rigid`),
    so the written ``NAME_ddf.nii.gz`` and a phantom's true DDF follow one convention.

    Returns:
        ``(case name, result)``.

    Raises:
        KeyError: if the item lacks the metadata.
    """
    image, fixed = batch_item[IMAGE], batch_item[FIXED_IMAGE]
    pred = torch.as_tensor(output_item[PRED]).detach().float().cpu().numpy()
    image_affine = np.asarray(torch.as_tensor(image.affine).cpu(), dtype=np.float64)
    pred_affine = output_grid_affine(image_affine, tuple(image.shape[1:]), tuple(pred.shape[1:]))
    daily_path = _filename(fixed, FIXED_IMAGE)
    daily_affine = np.asarray(fixed.meta["original_affine"], dtype=np.float64)
    daily_shape = tuple(int(v) for v in np.asarray(fixed.meta["spatial_shape"]).ravel()[:3])
    planning = LoadImage(image_only=True)(_filename(batch_item[MOVING_LABEL], MOVING_LABEL))
    rigid = batch_item.get(DAILY_TO_PLANNING)
    daily_to_planning = np.eye(4) if rigid is None else ras_map(np.asarray(torch.as_tensor(rigid).cpu()))
    result = restore_to_daily_grid(
        pred,
        pred_affine,
        daily_affine,
        daily_shape,
        np.asarray(planning),
        np.linalg.inv(daily_to_planning) @ np.asarray(planning.affine, dtype=np.float64),
        contour_source,
    )
    result.ddf = compose_rigid(result.ddf, daily_affine, daily_to_planning)
    return case_name(daily_path), result


def path_agreement(
    result: DailyGridResult,
    contour_source: Mapping[str, str],
    disagreement_dsc: float = DISAGREEMENT_DSC,
    disagreement_hd95_mm: float = DISAGREEMENT_HD95_MM,
) -> dict[str, Any]:
    """QA signal of one case: how far the registration and segmentation paths agree, and DDF folding.

    Args:
        result: the case on its daily grid.
        contour_source: structure -> path of its final contour.
        disagreement_dsc: flag a structure whose paths overlap less (the app's limit, :mod:`prostate_jrs.qa`).
        disagreement_hd95_mm: flag a structure whose paths are farther apart at the 95th percentile (mm).

    Returns:
        ``{"structures": {name: {"source", "dsc", "msd_mm", "hd95_mm", "reg_volume_ml", "seg_volume_ml"}},
        "ddf": {"folding_fraction", "jacobian_std", "jacobian_min", "jacobian_max"}, "flags": [str, ...]}``;
        distances that do not exist (a structure missing from a path) are ``None``.
    """

    def _clean(value: float) -> float | None:
        return None if math.isnan(value) else round(float(value), 4)

    spacing = spacing_from_affine(result.affine)
    structures = {}
    flags = []
    for name, m in structure_metrics(result.reg, result.seg, spacing).items():
        if flag := disagreement_flag(name, m.dsc, m.hd95_mm, disagreement_dsc, disagreement_hd95_mm):
            flags.append(flag)
        structures[name] = {
            "source": contour_source[name],
            "dsc": _clean(m.dsc),
            "msd_mm": _clean(m.msd_mm),
            "hd95_mm": _clean(m.hd95_mm),
            "reg_volume_ml": _clean(m.volume_ml),
            "seg_volume_ml": _clean(m.reference_volume_ml),
        }
    quality = deformation_quality(result.ddf, mask=result.fov if result.fov.any() else None)
    return {"structures": structures, "ddf": {k: _clean(v) for k, v in quality.as_dict().items()}, "flags": flags}


class _CaseWriter:
    """What both writers share: the output folder, the contour source of the bundle's network and the evaluator's
    refining inferer (``None`` when the inferer does not refine).

    Args:
        output_dir: folder of the written files.
        network_name: the bundle's network (forces the path of single-task networks).
        contour_source: structure -> ``"reg"``/``"seg"``.
        refiner: the evaluator's refining inferer.
    """

    def __init__(
        self,
        output_dir: str | Path,
        network_name: str,
        contour_source: Mapping[str, str] | None,
        refiner: RefiningInferer | None,
    ) -> None:
        self.output_dir = Path(output_dir)
        self.contour_source = resolve_contour_source(network_name, contour_source)
        self.refiner = refiner


class EvaluationWriter(_CaseWriter):
    """Per-case metrics on the daily grid, per structure and path, written as CSV with a summary and a montage.

    Files in ``output_dir``: ``metrics_per_case.csv`` (case, patient, refine, path, structure, dsc, msd_mm, hd95_mm,
    volumes), ``ddf_quality.csv`` (fraction of det J <= 0, SD/min/max of det J inside the network's field of
    view, error against a phantom's known deformation, seconds of refinement), ``metrics_summary.csv`` (mean, SD,
    median and n per refine, path, structure and metric, plus the DDF metrics) and ``montage.png`` (the worst and
    best cases by mean DSC of the final contours).

    Every row has a ``refine`` column: ``off`` for the network's own DDF and, when the evaluator's inferer is a
    :class:`prostate_jrs.inferers.RefiningInferer` (``refiner``) with refinement on, the mode name (e.g. ``fast``)
    for the refined DDF; both are scored on the same cases, so the tables show them side by side. The montage, the
    engine's ``final_dsc_*`` metrics and the bundle's ``eval_metrics`` use the refined rows.

    Args:
        output_dir: folder of the result files.
        network_name: the bundle's network (forces the path of single-task networks).
        contour_source: structure -> ``"reg"``/``"seg"``.
        num_montage_cases: cases shown at each end of the ranking.
        refiner: the evaluator's refining inferer, whose network-only output is scored too.
    """

    def __init__(
        self,
        output_dir: str | Path,
        network_name: str = "cross_stitch",
        contour_source: Mapping[str, str] | None = None,
        num_montage_cases: int = 3,
        refiner: RefiningInferer | None = None,
    ) -> None:
        super().__init__(output_dir, network_name, contour_source, refiner)
        self.num_montage_cases = num_montage_cases
        self.rows: list[dict[str, object]] = []
        self.ddf_rows: list[dict[str, object]] = []
        self._slices: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    def attach(self, engine: Engine) -> None:
        """Register on EPOCH_STARTED, ITERATION_COMPLETED and EPOCH_COMPLETED."""
        engine.add_event_handler(Events.EPOCH_STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._iteration_completed)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._write)

    def _reset(self, engine: Engine) -> None:
        self.rows, self.ddf_rows, self._slices = [], [], {}

    def _variants(self, index: int, output_item: Mapping[str, Any]) -> list[tuple[str, Mapping[str, Any], float]]:
        """``(refine label, output item, refinement seconds)`` to score: the network's output and the refined one."""
        refiner = self.refiner
        if refiner is None or refiner.settings is None or refiner.network_pred is None:
            return [("off", output_item, 0.0)]
        network_item = {**output_item, PRED: refiner.network_pred[index]}
        seconds = refiner.reports[index].seconds if index < len(refiner.reports) else math.nan
        return [("off", network_item, 0.0), (refiner.settings.name, output_item, seconds)]

    def _iteration_completed(self, engine: Engine) -> None:
        for index, (batch_item, output_item) in enumerate(_items(engine)):
            if FIXED_LABEL not in batch_item:
                raise KeyError("evaluation needs fixed_label (the daily reference contours) in every datalist item")
            reference = np.asarray(LoadImage(image_only=True)(_filename(batch_item[FIXED_LABEL], FIXED_LABEL)))
            patient = str(batch_item.get("patient", ""))
            daily = np.asarray(LoadImage(image_only=True)(_filename(batch_item[FIXED_IMAGE], FIXED_IMAGE)))
            true_ddf = None
            if isinstance(batch_item.get(TRUE_DDF), str):  # phantoms know the deformation: (I, J, K, 3) NIfTI
                true_ddf = np.moveaxis(np.asarray(LoadImage(image_only=True)(batch_item[TRUE_DDF])), -1, 0)
            for refine, item, seconds in self._variants(index, output_item):
                name, result = restore_item(batch_item, item, self.contour_source)
                rows, ddf_row = case_metrics(result, reference, name, patient, true_ddf=true_ddf, daily_ct=daily)
                self.rows.extend({"refine": refine, **row} for row in rows)
                self.ddf_rows.append({"refine": refine, **ddf_row, "refine_seconds": seconds})
            self._keep_slice(name, daily, reference, result.labels)

    def _keep_slice(self, name: str, daily: np.ndarray, reference: np.ndarray, final: np.ndarray) -> None:
        """Keep one axial slice (through the reference prostate, else the middle) for the montage."""
        daily = daily[0] if daily.ndim == 4 else daily
        reference = np.rint(reference[0] if reference.ndim == 4 else reference).astype(np.uint8)
        target = np.nonzero(reference == 1)[2]
        k = int(np.median(target)) if target.size else reference.shape[2] // 2
        self._slices[name] = (daily[:, :, k].astype(np.float32), reference[:, :, k], final[:, :, k])

    def _write(self, engine: Engine) -> None:
        if not self.rows:
            logger.warning("evaluation saw no case; nothing written")
            return
        columns = ["case", "patient", "refine", "path", "structure", *_METRICS, "volume_ml", "reference_volume_ml"]
        write_csv(self.output_dir / "metrics_per_case.csv", self.rows, columns)
        ddf_columns = ["case", "patient", "refine", *_DDF_METRICS, "refine_seconds"]
        write_csv(self.output_dir / "ddf_quality.csv", self.ddf_rows, ddf_columns)
        groups = ["refine", "path", "structure"]
        summary = summarize(self.rows, groups, _METRICS)
        summary += summarize([{**r, "path": "ddf", "structure": "all"} for r in self.ddf_rows], groups, _DDF_METRICS)
        write_csv(self.output_dir / "metrics_summary.csv", summary, [*groups, "metric", "n", "mean", "sd", "median"])
        self._montage()
        deployed = deployed_refine(summary)
        for row in summary:
            if row["metric"] in ("dsc", "msd_mm", "folding_fraction"):
                logger.info(
                    f"{row['refine']:>8} {row['path']:>5} {row['structure']:<16} {row['metric']:<16} "
                    f"mean {row['mean']:.4g} sd {row['sd']:.4g} median {row['median']:.4g} (n={row['n']})"
                )
        for row in summary:
            if row["refine"] == deployed and row["path"] == "final" and row["metric"] == "dsc":
                engine.state.metrics[f"final_dsc_{row['structure']}"] = row["mean"]
        logger.info(f"evaluation tables written to {self.output_dir}")

    def _case_scores(self) -> list[tuple[float, str]]:
        scores: dict[str, list[float]] = {}
        deployed = deployed_refine(self.rows)
        for row in self.rows:
            if row["path"] == "final" and row["refine"] == deployed:
                scores.setdefault(str(row["case"]), []).append(float(row["dsc"]))  # type: ignore[arg-type]
        return sorted((float(np.mean(v)), k) for k, v in scores.items())

    def _montage(self) -> None:
        """Worst cases (top row) and best cases (bottom row): daily CT, reference (white), final (colours)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.colors import ListedColormap

        ranked = self._case_scores()
        n = max(1, min(self.num_montage_cases, len(ranked) // 2))  # distinct worst and best cases from 2 on
        rows = [("worst", ranked[:n]), ("best", ranked[::-1][:n])]
        colours = ListedColormap([(0, 0, 0, 0), *[(*(c / 255 for c in s.color), 0.45) for s in STRUCTURES]])
        fig, axes = plt.subplots(2, n, figsize=(3.2 * n, 6.6), squeeze=False)
        for r, (title, cases) in enumerate(rows):
            for c in range(n):
                ax = axes[r][c]
                ax.axis("off")
                if c >= len(cases):
                    continue
                score, name = cases[c]
                daily, reference, final = self._slices[name]
                ax.imshow(np.clip(daily.T, -200, 300), cmap="gray", origin="lower")
                ax.imshow(final.T, cmap=colours, vmin=0, vmax=len(STRUCTURES), origin="lower", interpolation="nearest")
                ax.contour(
                    (reference > 0).T.astype(float), levels=[0.5], colors="white", linewidths=0.6, origin="lower"
                )
                ax.set_title(f"{title}: {name}\nmean DSC {score:.3f}", fontsize=8)
        fig.tight_layout()
        self.output_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.output_dir / ".montage.png.tmp"
        fig.savefig(tmp, dpi=100, format="png")
        plt.close(fig)
        tmp.replace(self.output_dir / "montage.png")


class InferenceWriter(_CaseWriter):
    """Writes ``O/NAME/NAME_labels.nii.gz``, ``NAME_ddf.nii.gz`` and ``NAME_seg.nii.gz`` on the daily image's grid.

    ``labels``: final contours (uint8, 0..4); ``ddf``: float32 ``(I, J, K, 3)`` in voxel units of the daily grid
    (docs/ARCHITECTURE.md, "DDF convention"); ``seg``: the segmentation path (uint8). With ``write_qa`` also
    ``NAME_qa.json``: the agreement of the two paths per structure, the DDF's folding and the app's review flags of
    disagreeing paths (:func:`path_agreement`), the QA signal (docs/ARCHITECTURE.md, "Contour source"). A case's
    folder appears complete or not at all (written under a temporary name, then renamed). The daily NIfTI header is
    copied, so the files overlay the daily CT exactly.

    Args:
        output_dir: output folder ``O``.
        network_name: the bundle's network (forces the path of single-task networks).
        contour_source: structure -> ``"reg"``/``"seg"``.
        write_qa: also write ``NAME_qa.json``.
        refiner: the evaluator's refining inferer; its report of each case (mode, budget, similarity before and
            after, seconds) goes into ``NAME_qa.json`` under ``refine``.
        disagreement_dsc: review flag below this DSC of the two paths (the bundle's ``qa_disagreement_dsc``).
        disagreement_hd95_mm: review flag above this HD95 (mm) of the two paths (``qa_disagreement_hd95_mm``).
    """

    def __init__(
        self,
        output_dir: str | Path,
        network_name: str = "cross_stitch",
        contour_source: Mapping[str, str] | None = None,
        write_qa: bool = True,
        refiner: RefiningInferer | None = None,
        disagreement_dsc: float = DISAGREEMENT_DSC,
        disagreement_hd95_mm: float = DISAGREEMENT_HD95_MM,
    ) -> None:
        super().__init__(output_dir, network_name, contour_source, refiner)
        self.write_qa = write_qa
        check_disagreement_limits(disagreement_dsc, disagreement_hd95_mm)
        self.limits = (disagreement_dsc, disagreement_hd95_mm)

    def attach(self, engine: Engine) -> None:
        """Register on ITERATION_COMPLETED."""
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._iteration_completed)

    def _iteration_completed(self, engine: Engine) -> None:
        reports = self.refiner.reports if self.refiner is not None else []
        for index, (batch_item, output_item) in enumerate(_items(engine)):
            name, result = restore_item(batch_item, output_item, self.contour_source)
            refine = reports[index].as_dict() if index < len(reports) else {"mode": "off"}
            self.write(name, result, _filename(batch_item[FIXED_IMAGE], FIXED_IMAGE), refine)

    def write(
        self, name: str, result: DailyGridResult, daily_path: str | Path, refine: Mapping[str, Any] | None = None
    ) -> Path:
        """Write one case; returns its folder. ``refine``: the refinement report for ``NAME_qa.json``."""
        header = None
        try:
            daily = nib.load(str(daily_path))
            if isinstance(daily, nib.Nifti1Image) and np.allclose(daily.affine, result.affine, atol=1e-4):
                header = daily.header
        except Exception:  # a non-NIfTI daily image: write a plain NIfTI header with the affine
            header = None
        folder = self.output_dir / name
        partial = self.output_dir / f".{name}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        volumes: dict[str, np.ndarray] = {
            "labels": result.labels.astype(np.uint8),
            "ddf": np.moveaxis(result.ddf, 0, -1).astype(np.float32),
            "seg": result.seg.astype(np.uint8),
        }
        for suffix, data in volumes.items():
            image = nib.Nifti1Image(data, result.affine, header=header)
            image.set_data_dtype(data.dtype)
            nib.save(image, str(partial / f"{name}_{suffix}.nii.gz"))
        if self.write_qa:
            qa = {
                **path_agreement(result, self.contour_source, *self.limits),
                "refine": dict(refine or {"mode": "off"}),
            }
            (partial / f"{name}_qa.json").write_text(json.dumps(qa, indent=2, allow_nan=False), encoding="utf-8")
        if folder.exists():
            shutil.rmtree(folder)
        partial.rename(folder)
        logger.info(f"wrote {folder}")
        return folder
