"""Real-anatomy check: recover a known smooth deformation of a real pelvic CT, shipped model against elastix.

The real CT (TotalSegmentator's pelvic example, ``shared/fixtures/real/pelvis_ct``: 3 mm, HU, no contours) is the
planning scan. A phantom patient (seed ``--seed``) is placed on its bone by a translation, and the phantom's daily
pull-back map (setup, background B-spline, rectal distension, bladder filling, prostate and SV motion; real bone
kept rigid) deforms it into a "daily" CT with fresh noise (:mod:`prostate_jrs.phantom.known_deformation`). The
phantom's organs, rasterised on the real grid, are the planning contours the pipeline needs (input and crop).

Compared, on the daily voxels: the rigid pre-alignment on bone alone, the shipped bundle through
:func:`prostate_jrs.pipeline.run_pipeline`, and elastix (:func:`prostate_jrs.baselines.register_bspline`) on the
network's crop at the daily CT's grid, starting from the same rigid alignment (the planning CT resampled through
it, with the network's context border around the crop). Outside the crop every method is the rigid map. Error of
a daily voxel: distance (mm) between its recovered planning point ``R @ A @ (x + ddf(x))`` and its true one, inside
the body (daily HU above ``--body-hu``, true point inside the planning CT), within the crop and in the whole body.

Limitations: one real scan and one drawn field; the phantom's organs only roughly coincide with the real ones, so
organ-specific motion is applied where the phantom's organs are and the planning contours do not outline real
organs; the fixture covers the pelvis from the symphysis upward, so the lower prostate region may be cut off.

Usage::

    python benchmarks/real_anatomy.py [--bundle bundle] [--seed 0] [--fixture PATH] [--out DIR] [--threads 2]
                                      [--device cpu] [--body-hu -300] [--tiny]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch

from prostate_jrs.baselines import ElastixSettings, register_bspline
from prostate_jrs.geometry import affine_transform, array_from_image, resample_with_ddf
from prostate_jrs.metrics import jacobian_determinant
from prostate_jrs.phantom.known_deformation import KnownDeformation, deform_real_ct, from_phantom_axes, planning_points
from prostate_jrs.pipeline import PipelineResult, PipelineSettings, load_bundle, run_pipeline
from prostate_jrs.refine import refine_settings
from prostate_jrs.tiny_bundle import TINY_REFINE, write_tiny_bundle

REPO = Path(__file__).resolve().parents[1]
DEFAULT_FIXTURE = REPO.parent / "shared" / "fixtures" / "real" / "pelvis_ct" / "pelvis_ct_3mm.nii.gz"
NETWORK_ONLY = "network only"
#: pipeline variants: the shipped network alone, each refinement mode (default start: the rigid alignment), the fast
#: mode started from the network's DDF or from the better of both, and the accurate mode from the network's DDF
#: smoothed onto the coarsest control nodes
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    NETWORK_ONLY: ("off", {}),
    "refine fast": ("fast", {}),
    "refine accurate": ("accurate", {}),
    "refine fast from the network's DDF": ("fast", {"init": "network"}),
    "refine fast, auto start": ("fast", {"init": "auto"}),
    "refine accurate from the network's DDF on the coarsest nodes": ("accurate", {"init": "coarse"}),
    "refine accurate, coarsest nodes 8 voxels apart (0.5.1)": ("accurate", {"control_spacing": (8, 4, 4)}),
}
METHODS = ("rigid only", *VARIANTS, "elastix")


def _box(mask: np.ndarray) -> tuple[slice, slice, slice]:
    """Index bounding box of a non-empty boolean mask."""
    where = np.argwhere(mask)
    lo, hi = where.min(axis=0), where.max(axis=0) + 1
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))  # type: ignore[return-value]


def _roi(image: sitk.Image, box: tuple[slice, slice, slice], grow: int = 0) -> sitk.Image:
    """An empty float image on ``image``'s grid restricted to ``box`` (grown by ``grow`` voxels, may leave it)."""
    start = [s.start - grow for s in box]
    reference = sitk.Image([s.stop - s.start + 2 * grow for s in box], sitk.sitkFloat32)
    reference.SetSpacing(image.GetSpacing())
    reference.SetDirection(image.GetDirection())
    reference.SetOrigin(image.TransformContinuousIndexToPhysicalPoint([float(i) for i in start]))
    return reference


def run_elastix(
    known: KnownDeformation,
    result: PipelineResult,
    box: tuple[slice, slice, slice],
    context_mm: float,
    settings: ElastixSettings,
) -> tuple[np.ndarray, float]:
    """elastix on the network's crop of the daily CT, from the pipeline's rigid alignment.

    The moving image is the planning CT resampled through the same rigid map onto the crop grown by the network's
    context border, so elastix sees what the network sees around the crop's edges.

    Returns:
        DDF ``(3, I, J, K)`` on the whole daily grid (zero outside the crop: the rigid map only) relative to the
        rigidly aligned planning CT, and the seconds of resampling plus registration.
    """
    start = time.perf_counter()
    daily = known.daily_ct
    fixed = sitk.Cast(
        sitk.RegionOfInterest(daily, [s.stop - s.start for s in box], [s.start for s in box]), sitk.sitkFloat32
    )
    grow = int(np.ceil(context_mm / min(daily.GetSpacing())))
    transform = affine_transform(result.rigid.daily_to_planning)
    moving = sitk.Resample(
        known.planning_ct, _roi(daily, box, grow), transform, sitk.sitkLinear, -1000.0, sitk.sitkFloat32
    )
    registered = register_bspline(fixed, moving, settings)
    ddf = np.zeros((3, *daily.GetSize()), dtype=np.float32)
    ddf[(slice(None), *box)] = registered.ddf  # same spacing and axes as the daily grid: daily voxel units
    return ddf, time.perf_counter() - start


def _stats(error: np.ndarray, mask: np.ndarray) -> dict[str, float]:
    values = error[mask]
    if values.size == 0:
        return {"mean": float("nan"), "p95": float("nan"), "max": float("nan"), "n": 0}
    return {
        "mean": float(values.mean()),
        "p95": float(np.percentile(values, 95)),
        "max": float(values.max()),
        "n": int(values.size),
    }


def _norm(vectors: np.ndarray) -> np.ndarray:
    return np.sqrt((vectors**2).sum(axis=0))


def evaluate(
    known: KnownDeformation,
    results: dict[str, PipelineResult],
    elastix_ddf: np.ndarray,
    elastix_seconds: float,
    box: tuple[slice, slice, slice],
    body_hu: float,
) -> dict[str, Any]:
    """Error statistics, folding and runtime of every method, plus the true field's magnitude.

    ``results`` holds one pipeline run per variant (same rigid alignment and crop); the first gives the rigid map.
    """
    result = next(iter(results.values()))
    daily = known.daily_ct
    truth = known.true_points()
    body = (array_from_image(daily) > body_hu) & known.inside_planning()
    crop = np.zeros(body.shape, dtype=bool)
    crop[box] = True
    in_crop = body & crop
    # The planning contours carried to the daily scan by the true map: where the network's training (contour
    # overlap) constrains the DDF most.
    organs = body & (resample_with_ddf(known.planning_labels, daily, known.ddf, order=0) > 0)
    rigid = result.rigid.daily_to_planning
    ddfs = {"rigid only": np.zeros_like(elastix_ddf)}
    seconds = {"rigid only": result.timings["rigid"]}
    for name, run in results.items():
        ddfs[name] = np.where(crop[None], run.ddf, 0.0).astype(np.float32)  # outside the crop: the rigid map
        seconds[name] = run.timings["total"]
    ddfs["elastix"] = elastix_ddf
    seconds["elastix"] = result.timings["rigid"] + elastix_seconds
    methods: dict[str, Any] = {}
    errors: dict[str, np.ndarray] = {}
    for name, ddf in ddfs.items():
        error = _norm(planning_points(ddf, daily, rigid) - truth)
        errors[name] = error.astype(np.float32)
        det = jacobian_determinant(ddf[(slice(None), *box)])  # inside the crop only: its edge is a seam
        methods[name] = {
            "crop": _stats(error, in_crop),
            "organs": _stats(error, organs),
            "body": _stats(error, body),
            "folding_fraction": float(np.mean(det <= 0)),
            "min_det_j": float(det.min()),
            "seconds": float(seconds[name]),
        }
        if name in results:
            methods[name]["refine"] = results[name].qa.get("refine", {"mode": "off"})
    displacement = _norm(truth - planning_points(np.zeros_like(known.ddf), daily))
    nonrigid = _norm(truth - planning_points(np.zeros_like(known.ddf), daily, known.setup))
    true_det = jacobian_determinant(known.ddf)
    bone = array_from_image(daily) > 200.0
    field = {
        "displacement_body_mm": _stats(displacement, body),
        "displacement_crop_mm": _stats(displacement, in_crop),
        "nonrigid_body_mm": _stats(nonrigid, body),
        "nonrigid_crop_mm": _stats(nonrigid, in_crop),
        "min_det_j": float(true_det.min()),
        "max_det_j": float(true_det.max()),
        "folding_fraction": float(np.mean(true_det <= 0)),
        # how well the rigid pre-alignment found the true setup: error of the rigid map on daily bone voxels
        "rigid_error_on_bone_mm": _stats(errors["rigid only"], bone & body),
    }
    return {"methods": methods, "field": field, "errors": errors, "body": body, "crop_box": box}


def _table(methods: dict[str, Any]) -> str:
    lines = [
        "| method | crop mean mm | crop p95 mm | organs mean mm | organs p95 mm | body mean mm | body p95 mm "
        "| det J <= 0 (crop) | runtime s | CPU s | registration s | registration CPU s | x elastix |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    rigid_seconds = methods["rigid only"]["seconds"]
    wall = {name: _registration(name, methods[name], rigid_seconds)[0] for name in METHODS}
    for name in METHODS:
        row = methods[name]
        cpu = _registration(name, row, rigid_seconds)[1]
        lines.append(
            f"| {name} | {row['crop']['mean']:.2f} | {row['crop']['p95']:.2f} | {row['organs']['mean']:.2f} | "
            f"{row['organs']['p95']:.2f} | {row['body']['mean']:.2f} | {row['body']['p95']:.2f} | "
            f"{row['folding_fraction']:.4%} | {row['seconds']:.1f} | {_cell(row.get('cpu_seconds'))} | "
            f"{_cell(wall[name])} | {_cell(cpu)} | {_ratio(wall['elastix'], wall[name])} |"
        )
    return "\n".join(lines)


def _cell(value: float | None) -> str:
    return "" if value is None else f"{value:.1f}"


def _ratio(baseline: float | None, value: float | None) -> str:
    return "" if baseline is None or not value else f"{baseline / value:.1f}"


def _registration(name: str, row: dict[str, Any], rigid_seconds: float) -> tuple[float | None, float | None]:
    """Wall and CPU seconds of the deformable registration alone: the refinement, or elastix's resampling and
    registration (its row's runtime less the shared rigid stage)."""
    if name == "elastix":
        return row["seconds"] - rigid_seconds, row.get("cpu_seconds")
    refine = row.get("refine", {})
    if refine.get("mode", "off") == "off":
        return None, None
    return refine.get("seconds"), refine.get("cpu_seconds")


def _markdown(report: dict[str, Any], table: str) -> str:
    field = report["field"]
    known = report["known_deformation"]
    crop = report["crop"]
    return "\n".join(
        [
            "# Real-anatomy check: known deformation of a real pelvic CT",
            "",
            f"Fixture `{report['fixture']}`; phantom seed {report['seed']}; bundle `{report['bundle']}`"
            + (" (**--tiny**: random tiny network, tiny elastix; numbers meaningless)" if report["tiny"] else "")
            + ".",
            "",
            f"- Phantom placed by bone overlap (translation {np.round(known['phantom_offset_mm'], 1).tolist()} mm, "
            f"{known['placement_bone_overlap']:.0%} of the phantom's bone on real bone).",
            f"- True field inside the body: mean |u| {field['displacement_body_mm']['mean']:.1f} mm, max "
            f"{field['displacement_body_mm']['max']:.1f} mm; non-rigid part (after the true setup) mean "
            f"{field['nonrigid_body_mm']['mean']:.1f} mm, max {field['nonrigid_body_mm']['max']:.1f} mm "
            f"(in the crop: mean {field['nonrigid_crop_mm']['mean']:.1f} mm). det J in "
            f"[{field['min_det_j']:.2f}, {field['max_det_j']:.2f}], folding {field['folding_fraction']:.2%}.",
            f"- Rigid pre-alignment on bone: error on daily bone voxels mean "
            f"{field['rigid_error_on_bone_mm']['mean']:.2f} mm, p95 {field['rigid_error_on_bone_mm']['p95']:.2f} mm.",
            f"- Crop (the network's model grid, on the daily CT's grid): {crop['size']} voxels, "
            f"{crop['body_voxels']} body voxels; body = daily HU > {report['body_hu']:g} with the true point inside "
            "the planning CT. Outside the crop every method is the rigid map.",
            "- Runtime: rigid = the pipeline's rigid stage; network and refine rows = the whole pipeline (read, "
            "rigid, network, refinement, restore, QA); elastix = rigid + resampling + registration "
            f"({report['threads']} thread(s), device {report['device']}); CPU s: the process's CPU time over all "
            "threads (steadier than wall time on a shared machine); registration s and registration CPU s: wall and "
            "CPU time of the refinement alone, or of elastix's resampling and registration; x elastix: elastix's "
            "registration s over the row's. Refinement: the bundle's modes "
            "(`prostate_jrs.refine.REFINE_MODES`), which start from the rigid alignment (zero DDF); the last rows "
            "start from the network's DDF, or from whichever of both has the lower loss after the coarsest level.",
            "",
            table,
            "",
            "Error: distance (mm) between a daily voxel's recovered planning point and its true one. crop: body voxels "
            "in the network's crop; organs: body voxels inside the planning contours carried to the daily scan by the "
            "true map (phantom organs, not the real ones); body: every body voxel (rigid map outside the crop).",
            "",
        ]
    )


def _plot(known: KnownDeformation, evaluation: dict[str, Any], path: Path, vmax: float = 10.0) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    daily = known.daily_ct
    # Shown in LPS axes (radiological: patient right on the left, anterior up), whatever the array order.
    image = from_phantom_axes(array_from_image(daily).astype(np.float32), daily)
    body = from_phantom_axes(evaluation["body"], daily)
    crop = np.zeros(body.shape, dtype=bool)
    crop[evaluation["crop_box"]] = True
    crop = from_phantom_axes(crop, daily)
    centre = [int((s.start + s.stop - 1) // 2) for s in _box(crop)]
    spacing = daily.GetSpacing()
    views = [
        ("axial", (slice(None), slice(None), centre[2]), "upper", spacing[1] / spacing[0]),
        ("sagittal", (centre[0], slice(None), slice(None)), "lower", spacing[2] / spacing[1]),
    ]
    fig, axes = plt.subplots(2, len(METHODS) + 1, figsize=(4.25 * (len(METHODS) + 1), 8.5))
    for row, (view, index, origin, aspect) in enumerate(views):
        ax = axes[row, 0]
        ax.imshow(image[index].T, cmap="gray", vmin=-300, vmax=400, origin=origin, aspect=aspect)
        # contour without origin: its node (c, r) is the pixel centre imshow uses for either origin
        ax.contour(crop[index].T.astype(float), [0.5], colors="y", linewidths=0.8)
        ax.set_title(f"daily CT, {view} (crop in yellow)")
        for col, name in enumerate(METHODS, start=1):
            error = from_phantom_axes(evaluation["errors"][name], daily)[index].T
            shown = np.where(body[index].T, error, np.nan)
            ax = axes[row, col]
            ax.imshow(image[index].T, cmap="gray", vmin=-300, vmax=400, origin=origin, aspect=aspect)
            im = ax.imshow(shown, cmap="magma", vmin=0.0, vmax=vmax, origin=origin, aspect=aspect)
            ax.contour(crop[index].T.astype(float), [0.5], colors="c", linewidths=0.6)
            mean = evaluation["methods"][name]["crop"]["mean"]
            ax.set_title(f"{name} (crop mean {mean:.2f} mm)")
            fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02, label="mm")
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle("error of the recovered planning point (mm) inside the body; slices through the crop centre")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "real_anatomy")
    parser.add_argument("--bundle", type=Path, default=REPO / "bundle")
    parser.add_argument("--seed", type=int, default=0, help="phantom patient (anatomy and motion)")
    parser.add_argument("--fixture", type=Path, default=DEFAULT_FIXTURE, help="real CT (NIfTI, HU)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch and elastix threads")
    parser.add_argument("--device", default="cpu", help="torch device of the network")
    parser.add_argument("--body-hu", type=float, default=-300.0, help="daily HU above which a voxel is body")
    parser.add_argument("--tiny", action="store_true", help="tiny random network and tiny elastix (smoke test)")
    args = parser.parse_args(argv)
    if not args.fixture.is_file():
        print(
            f"{args.fixture}: not found (the real pelvic CT fixture, shared/fixtures/real/pelvis_ct)", file=sys.stderr
        )
        return 2
    torch.set_num_threads(args.threads)

    planning = sitk.ReadImage(str(args.fixture))
    start = time.perf_counter()
    known = deform_real_ct(planning, seed=args.seed)
    print(f"  known deformation in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory() as scratch:
        bundle = write_tiny_bundle(args.bundle, Path(scratch) / "bundle") if args.tiny else args.bundle
        network, settings = load_bundle(bundle, device=args.device)
    results: dict[str, PipelineResult] = {}
    cpu_seconds: dict[str, float] = {}
    for name, (mode, overrides) in VARIANTS.items():
        refine = refine_settings(mode, {**overrides, **(TINY_REFINE if args.tiny else {})})
        variant = dataclasses.replace(settings, refine=refine)
        cpu = time.process_time()
        results[name] = run_pipeline(known.planning_ct, known.planning_labels, known.daily_ct, network, variant)
        cpu_seconds[name] = time.process_time() - cpu
        print(f"  {name}: pipeline in {results[name].timings['total']:.1f} s", file=sys.stderr, flush=True)
    result = results[NETWORK_ONLY]

    box = _box(result.fov)
    _load_itk()
    elastix_settings = ElastixSettings.tiny() if args.tiny else ElastixSettings()
    elastix_settings = dataclasses.replace(elastix_settings, threads=args.threads)
    cpu = time.process_time()
    ddf, seconds = run_elastix(known, result, box, _context_mm(settings), elastix_settings)
    cpu_seconds["elastix"] = time.process_time() - cpu
    print(f"  elastix in {seconds:.1f} s", file=sys.stderr, flush=True)

    evaluation = evaluate(known, results, ddf, seconds, box, args.body_hu)
    for name, value in cpu_seconds.items():
        evaluation["methods"][name]["cpu_seconds"] = float(value)
    table = _table(evaluation["methods"])
    report: dict[str, Any] = {
        "fixture": str(args.fixture),
        "seed": args.seed,
        "bundle": str(args.bundle),
        "tiny": args.tiny,
        "threads": args.threads,
        "device": args.device,
        "body_hu": args.body_hu,
        "methods": evaluation["methods"],
        "field": evaluation["field"],
        "known_deformation": known.info,
        "crop": {
            "box": [[s.start, s.stop] for s in box],
            "size": [s.stop - s.start for s in box],
            "body_voxels": evaluation["methods"]["rigid only"]["crop"]["n"],
        },
        "rigid": {
            "daily_to_planning": result.rigid.daily_to_planning.tolist(),
            "residual_mm": result.rigid.residual,
            "bone_overlap": result.rigid.bone_overlap,
        },
        "pipeline_timings_s": {name: run.timings for name, run in results.items()},
        "qa_flags": result.qa.get("flags", []),
        "elastix_settings": dataclasses.asdict(elastix_settings),
        "settings": {"model_spacing": settings.model_spacing, "crop_margin_mm": settings.crop_margin_mm},
    }
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "real_anatomy.json").write_text(json.dumps(report, indent=2, default=_json_default))
    (args.out / "real_anatomy.md").write_text(_markdown(report, table))
    _plot(known, evaluation, args.out / "real_anatomy.png")
    return 0


def _load_itk() -> None:
    """Load itk's elastix wrappers now: itk loads them lazily on first use (~20 s), which is no registration time."""
    import itk

    _ = (itk.ElastixRegistrationMethod, itk.TransformixFilter, itk.ParameterObject)


def _context_mm(settings: PipelineSettings) -> float:
    """The border (mm) of real anatomy the network sees around its crop (``ValidPatchInferer`` context)."""
    output = settings.output_size if settings.output_size is not None else settings.patch_size - 40
    return (settings.patch_size - output) / 2 * settings.model_spacing


def _json_default(value: object) -> object:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


if __name__ == "__main__":
    raise SystemExit(main())
