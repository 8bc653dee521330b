"""End-to-end time and memory of one adaptive fraction as the app runs it, against elastix on the same crop.

Studies: one synthetic patient (``prostate_jrs.phantom``, one seed) at three fields of view, each exported as a
DICOM session (planning CT + planning RTSTRUCT + daily CT) as ``prostate-jrs synth --dicom`` writes it. Voxels are
clinical (0.977 x 0.977 mm, 3 mm slices); a scale ``s`` of ``--fov-scales`` gives an in-plane field of view of
``500 s`` mm and a scan length of ``120 + 240 s`` mm, so the default scales 0.5, 0.75, 1 give planning CTs of
256 x 256 x 80, 384 x 384 x 100 and 512 x 512 x 120 voxels (daily scans differ by a few slices: the phantom varies
their couch position and scan length). The smallest field of view cuts the sides of the body off, as a tight
reconstruction circle does; the contoured organs and most of the pelvic bone stay inside.

Network fraction: the library calls of the MONAI Deploy app (``app/operators``), in its order: ``load_session``
(DICOM selection and reading: ``load``), ``load_bundle`` (``bundle``; on CUDA it includes creating the CUDA
context), ``run_pipeline`` (``rigid``, ``preprocess``, ``network``, ``refine``, ``restore``, ``qa``, its own
timings), ``write_contours`` (``rtstruct``), ``write_segmentation`` (``seg``), ``write_registration``
(``registration``), ``write_qa`` (``qa_files``: qa.json + qa.png) and ``publish``. ``total`` is the wall time of
all of it. Every fraction runs in a process forked for it, so each is cold, as an app run is; imports (torch and
MONAI, about 5 s) are not counted, and their objects are frozen out of garbage collection (``gc.freeze``), as
``app/__main__.py`` does.

Variants (``--variants``), each a set of bundle overrides, measured in the same run and interleaved (repeat r of every
variant before repeat r + 1 of any, so that the load of a shared machine falls on all alike):

* ``torch-eager``: the network stage as it was before issue 15: torch eager, fixed 112^3 tiles two per call, no
  refinement;
* ``no-refine``: the bundle's defaults (``backend`` auto: OpenVINO on the CPU; tiles fitted to the crop) without the
  refinement;
* ``default``: the bundle as shipped, refinement included (its mode and iteration budget are in the table); on a CPU
  the refinement runs beside the network, each on one thread (:mod:`prostate_jrs.pipeline`);
* ``refine-after``: ``default`` with the refinement after the network, on all the threads (``cpu_threads`` null): the
  baseline of running both at once;
* on CUDA also ``amp``: ``no-refine`` with autocast.

The bundle's network is exported to ONNX once, in a child before the fractions (``export`` in the JSON), as a deployed
bundle has it in ``models/model.onnx``.

elastix: the multi-resolution B-spline of :mod:`prostate_jrs.baselines.elastix` on the box the network works on
(the pipeline's model grid), at the daily CT's own resolution: the daily CT cropped to that box is the fixed image,
the planning CT resampled into it through the pipeline's rigid alignment the moving one. Timed: cropping and
resampling (``prep``), registration plus deformation field (``register``: the whole ``register_bspline`` call, image
conversions included; ``ElastixResult.seconds``, without them, is in the JSON as ``elastix_s``) and warping the
planning label map with the field (``warp``, nearest neighbour). ITK's lazy module load (about 14 s on
first use) happens once in the parent before the elastix children fork and is not counted, as the imports are not
on the network's side.

Ratios: ``x network`` = the ``torch-eager`` variant's ``network`` stage over this row's (same field of view and
device); ``x elastix reg`` = elastix's ``register`` over the row's ``network + refine`` (the registration itself);
``elastix fraction`` = the row's fraction with ``preprocess + network + refine + restore`` replaced by elastix's
``prep + register + warp``, and ``x fraction`` its ratio to the row's ``total``.

Peak memory: growth of the peak resident set size (``ru_maxrss``) over the forked child's start (for elastix, over
the loaded session), as ``benchmarks/forward.py`` measures it (the absolute peak, imports included, is in the JSON);
on CUDA also ``torch.cuda.max_memory_allocated``. Times are medians over ``--repeats`` fractions, peaks maxima. The
machine's 1-minute load average is recorded before and after every measurement. Threads: ``--threads`` for torch,
OpenVINO, ONNX Runtime, SimpleITK and ITK (elastix); numpy's BLAS follows ``OMP_NUM_THREADS``.

Usage::

    python benchmarks/speed.py [--device cpu cuda] [--threads 2] [--fov-scales 0.5 0.75 1] [--repeats 1]
                               [--variants torch-eager no-refine default] [--bundle bundle]
                               [--out benchmarks/results/speed] [--data DIR] [--seed 0] [--tiny]
                               [--no-elastix]

Prints a Markdown table and writes ``OUT/speed.md``, ``OUT/speed.json`` (every measurement, the hardware, the load
and the software versions) and ``OUT/speed_scaling.png`` (time against daily-CT voxels). ``--tiny``: the phantom's
tiny preset (4 mm voxels), a narrow randomly initialised copy of the bundle on a 6 mm model grid (:data:`TINY_BUNDLE`)
and ``ElastixSettings.tiny()``, to check the script in CI in about a minute; its times mean nothing. ``--data DIR``
keeps the generated studies there and reuses them on the next run (the clinical ones take minutes to make).
``--no-elastix`` skips elastix (a GPU machine without itk-elastix): its cells show ``-``.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch

# imported here, in the parent, so that every forked child finds them loaded (importing MONAI takes seconds); importing
# is safe before forking, running torch operations is not
from prostate_jrs.backends import onnx_file_for, resolve_backend
from prostate_jrs.baselines import ElastixSettings, register_bspline
from prostate_jrs.dicom_session import (
    load_session,
    new_staging,
    publish,
    write_contours,
    write_qa,
    write_registration,
    write_segmentation,
)
from prostate_jrs.geometry import affine_transform, resample_with_ddf
from prostate_jrs.phantom import PhantomConfig, write_dataset
from prostate_jrs.phantom.dicom_export import export_dicom_sessions
from prostate_jrs.pipeline import load_bundle, run_pipeline
from prostate_jrs.timing import hardware_info, peak_rss_mib, run_forked, software_versions
from prostate_jrs.tiny_bundle import TINY_SETTINGS, write_tiny_bundle

REPO = Path(__file__).resolve().parents[1]
IN_PLANE_FOV_MM = 500.0
SCAN_LENGTH_MM = (120.0, 240.0)  # scan length = a + b * scale: 240, 300 and 360 mm for 0.5, 0.75, 1
DEFAULT_SCALES = (0.5, 0.75, 1.0)
SESSION = "JRS001_f01"
#: Bundle settings of ``--tiny``: the library's tiny bundle on a 6 mm grid with 72^3 tiles (two tiles).
TINY_BUNDLE: dict[str, Any] = {**TINY_SETTINGS, "model_spacing": 6.0, "crop_margin_mm": 12.0, "infer_patch_size": 72}
#: (key, header) of the network fraction's stages in table order.
STAGES: tuple[tuple[str, str], ...] = (
    ("load", "load"),
    ("bundle", "bundle"),
    ("rigid", "rigid"),
    ("preprocess", "preprocess"),
    ("network", "network"),
    ("refine", "refine"),
    ("restore", "restore"),
    ("qa", "QA"),
    ("rtstruct", "RTSTRUCT"),
    ("seg", "SEG"),
    ("registration", "registration"),
    ("qa_files", "QA files"),
    ("publish", "publish"),
)
#: The elastix entry of a study under ``--no-elastix``.
NOT_MEASURED: dict[str, Any] = {"error": "not measured (--no-elastix)", "skipped": True}
#: Bundle overrides of each variant (module docstring); ``amp`` only on CUDA.
VARIANTS: dict[str, dict[str, Any]] = {
    "torch-eager": {"backend": "torch", "infer_max_tile_voxels": None, "tile_batch_size": 2, "refine#mode": "off"},
    "no-refine": {"refine#mode": "off"},
    "default": {},
    "refine-after": {"refine#settings#cpu_threads": None},
    "amp": {"amp": True, "refine#mode": "off"},
}
BASELINE = "torch-eager"
#: Stages the elastix fraction replaces.
REGISTRATION_STAGES = ("preprocess", "network", "refine", "restore")
PIPELINE_STAGES = ("rigid", "preprocess", "network", "refine", "restore", "qa")


# --------------------------------------------------------------------------------------------------- studies


def study_config(scale: float, tiny: bool = False) -> PhantomConfig:
    """Phantom config of one field of view (clinical voxels, or the tiny preset's 4 mm ones).

    Args:
        scale: in-plane field of view ``500 scale`` mm, scan length ``120 + 240 scale`` mm.
        tiny: use :meth:`PhantomConfig.tiny`'s voxels and centre instead of the clinical default's.

    Returns:
        The phantom config.
    """
    if scale <= 0:
        raise ValueError(f"field-of-view scales must be positive, got {scale}")
    base = PhantomConfig.tiny() if tiny else PhantomConfig()
    fov = (IN_PLANE_FOV_MM * scale, IN_PLANE_FOV_MM * scale, SCAN_LENGTH_MM[0] + SCAN_LENGTH_MM[1] * scale)
    return dataclasses.replace(base, fov=fov)


def make_study(folder: Path, scale: float, seed: int, tiny: bool) -> dict[str, Any]:
    """Write (or reuse) one patient with one fraction and its DICOM session under ``folder``.

    Args:
        folder: the study folder; ``folder/data`` holds the dataset, ``folder/data/dicom/JRS001_f01`` the session.
        scale: field-of-view scale (:func:`study_config`).
        seed: dataset seed (the same for every field of view: the same anatomy and motion draws).
        tiny: tiny preset.

    Returns:
        The session folder and the study's sizes and generation time.
    """
    config = study_config(scale, tiny)
    data = folder / "data"
    sessions = data / "dicom" / "sessions.json"
    start = time.perf_counter()
    reused = sessions.is_file()
    if not reused:
        shutil.rmtree(data, ignore_errors=True)  # a run stopped half-way: start over
        write_dataset(data, n_patients=1, n_fractions=1, seed=seed, config=config)
        export_dicom_sessions(data)
    item = json.loads(sessions.read_text())["sessions"][0]["item"]
    daily = sitk.ImageFileReader()
    daily.SetFileName(str(data / item["fixed_image"]))
    daily.ReadImageInformation()
    return {
        "scale": scale,
        "session": str(data / "dicom" / SESSION),
        "spacing_mm": list(config.spacing),
        "fov_mm": list(config.fov),
        "planning_size": list(config.size),
        "daily_size": list(daily.GetSize()),
        "daily_voxels": int(np.prod(daily.GetSize())),
        "generation_s": round(time.perf_counter() - start, 3),
        "reused": reused,
    }


def cuda_facts() -> dict[str, Any]:
    """Whether CUDA can be used and the GPU's name; call it in a child (CUDA initialised here is lost to forks)."""
    if not torch.cuda.is_available():
        return {"available": False}
    props = torch.cuda.get_device_properties(0)
    return {
        "available": True,
        "name": props.name,
        "memory_gib": round(props.total_memory / 2**30, 1),
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
    }


# --------------------------------------------------------------------------------------------------- measurements


def _limit_threads(threads: int) -> None:
    torch.set_num_threads(threads)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)


def _geometry(image: sitk.Image) -> dict[str, list[float] | list[int]]:
    return {
        "size": list(image.GetSize()),
        "spacing": list(image.GetSpacing()),
        "origin": list(image.GetOrigin()),
        "direction": list(image.GetDirection()),
    }


def grid_from_geometry(geometry: dict[str, Any]) -> sitk.Image:
    """An empty uint8 image with the size, spacing, origin and direction of :func:`_geometry`'s dict."""
    grid = sitk.Image([int(n) for n in geometry["size"]], sitk.sitkUInt8)
    grid.SetSpacing([float(s) for s in geometry["spacing"]])
    grid.SetOrigin([float(o) for o in geometry["origin"]])
    grid.SetDirection([float(d) for d in geometry["direction"]])
    return grid


def _load() -> float:
    return round(os.getloadavg()[0], 2)


def _cpu_seconds() -> float:
    """CPU time (user + system, all threads) of this process so far: less bent by other jobs than wall time."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def prepare_bundle(bundle: str, device: str, threads: int) -> dict[str, Any]:
    """Export the bundle's network for its backend once (as a deployed bundle ships it); run it in a child.

    Returns:
        The backend that runs, the ONNX file (if any) and the seconds the export (or the check of a file) took.
    """
    _limit_threads(threads)
    start = time.perf_counter()
    network, settings = load_bundle(bundle, device=device)
    backend = resolve_backend(settings.backend, device)
    onnx = None if backend == "torch" else str(onnx_file_for(network, backend, settings.onnx_file))
    return {"backend": backend, "onnx_file": onnx, "export_s": round(time.perf_counter() - start, 3)}


def measure_fraction(
    session: str, bundle: str, device: str, threads: int, overrides: dict[str, Any] | None = None
) -> dict[str, Any]:
    """One fraction through the app's library calls (runs in the calling process; :func:`run_forked` it).

    Args:
        session: DICOM session folder.
        bundle: bundle folder.
        device: torch device of the network.
        threads: torch, OpenVINO, ONNX Runtime and SimpleITK threads.
        overrides: bundle config overrides (a variant, :data:`VARIANTS`).

    Returns:
        Seconds per stage and in total, peak memory, the backend, the refinement report, the geometry the network
        worked on and the rigid alignment.
    """
    _limit_threads(threads)
    gc.freeze()  # as app/__main__.py does after its imports: full collections skip the imported objects
    load_before, cpu_start = _load(), _cpu_seconds()
    cuda = device.startswith("cuda")
    rss_start = peak_rss_mib()
    out = Path(tempfile.mkdtemp(prefix="speed-fraction-"))
    try:
        stages: dict[str, float] = {}
        start = clock = time.perf_counter()

        def lap(stage: str) -> float:
            nonlocal clock
            now = time.perf_counter()
            stages[stage] = now - clock
            clock = now
            return stages[stage]

        # the app's order: SessionLoader, JRSInference (bundle, pipeline), the four writers, Publish
        inputs = load_session(session)
        lap("load")
        network, settings = load_bundle(bundle, device=device, overrides=overrides)
        inputs.timings["load_bundle"] = round(lap("bundle"), 3)
        result = run_pipeline(inputs.planning.image, inputs.planning_labels, inputs.daily.image, network, settings)
        stages.update({stage: float(result.timings.get(stage, 0.0)) for stage in PIPELINE_STAGES})
        staging = new_staging(out)
        clock = time.perf_counter()  # the staging folder is part of publishing, not of the first writer
        write_contours(result, inputs, settings, staging)
        lap("rtstruct")
        write_segmentation(result, inputs, settings, staging)
        lap("seg")
        write_registration(result, inputs, settings, staging)
        lap("registration")
        write_qa(result, inputs, settings, staging, bundle=str(bundle))
        lap("qa_files")
        published = publish(staging, out)
        lap("publish")
        total = time.perf_counter() - start
        row: dict[str, Any] = {
            "device": device,
            "stages_s": stages,
            "total_s": total,
            "cpu_s": _cpu_seconds() - cpu_start,
            "peak_rss_mib": peak_rss_mib(),
            "peak_rss_growth_mib": peak_rss_mib() - rss_start,
            "load_average": [load_before, _load()],
            "backend": resolve_backend(settings.backend, device),
            "refine": result.qa.get("refine", {"mode": "off"}),
            "daily_size": list(inputs.daily.image.GetSize()),
            "model_grid": _geometry(result.model_grid),
            "daily_to_planning": np.asarray(result.rigid.daily_to_planning).tolist(),
            "settings": {
                "network_name": settings.network_name,
                "model_spacing_mm": settings.model_spacing,
                "patch_size": settings.patch_size,
                "output_size": settings.output_size,
                "tile_batch_size": settings.tile_batch_size,
                "max_tile_voxels": settings.max_tile_voxels,
                "amp": settings.amp,
            },
            "output_bytes": {path.name: path.stat().st_size for path in published},
        }
        if cuda:
            row["gpu_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
        return row
    finally:
        shutil.rmtree(out, ignore_errors=True)


def crop_to_grid(image: sitk.Image, grid: sitk.Image) -> sitk.Image:
    """The voxels of ``image`` whose centres lie in the physical box of ``grid`` (``image``'s own resolution).

    Raises:
        ValueError: if the box and the image do not overlap.
    """
    size = np.asarray(grid.GetSize(), dtype=np.float64)
    corners = [(x, y, z) for x in (-0.5, size[0] - 0.5) for y in (-0.5, size[1] - 0.5) for z in (-0.5, size[2] - 0.5)]
    points = [grid.TransformContinuousIndexToPhysicalPoint(corner) for corner in corners]
    index = np.array([image.TransformPhysicalPointToContinuousIndex(point) for point in points])
    extent = np.asarray(image.GetSize())
    lo = np.clip(np.ceil(index.min(axis=0) - 1e-6).astype(int), 0, extent)
    hi = np.clip(np.floor(index.max(axis=0) + 1e-6).astype(int) + 1, 0, extent)
    if np.any(hi <= lo):
        raise ValueError(f"the box of grid {grid.GetSize()} does not overlap the image {image.GetSize()}")
    return image[int(lo[0]) : int(hi[0]), int(lo[1]) : int(hi[1]), int(lo[2]) : int(hi[2])]


def in_daily_frame(image: sitk.Image, daily_to_planning: np.ndarray) -> sitk.Image:
    """``image`` (planning frame) with its geometry carried into the daily frame by ``R^-1``; voxels untouched.

    Sampling it at daily points is sampling the original at ``R @ point``, without resampling the label map first
    (the pipeline places the planning contours the same way: ``planning_affine = R^-1 @ A_planning``).
    """
    inverse = np.linalg.inv(np.asarray(daily_to_planning, dtype=np.float64))
    moved = sitk.Image(image)
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    moved.SetDirection((inverse[:3, :3] @ direction).ravel().tolist())
    moved.SetOrigin((inverse[:3, :3] @ np.asarray(image.GetOrigin()) + inverse[:3, 3]).tolist())
    return moved


def measure_elastix(
    session: str,
    model_grid: dict[str, Any],
    daily_to_planning: list[list[float]],
    settings: ElastixSettings,
    threads: int,
) -> dict[str, Any]:
    """elastix B-spline on the network's box at daily resolution (runs in the calling process; fork it).

    Args:
        session: DICOM session folder (read untimed: the network fraction's ``load`` covers reading).
        model_grid: geometry of the pipeline's model grid (:func:`_geometry`).
        daily_to_planning: the pipeline's rigid alignment ``R``.
        settings: the elastix parameters (their ``threads`` are used).
        threads: SimpleITK and ITK threads.

    Returns:
        Seconds per stage and in total, the crop's size and peak memory.
    """
    import itk

    _limit_threads(threads)
    gc.freeze()  # as app/__main__.py does after its imports: full collections skip the imported objects
    load_before, cpu_start = _load(), _cpu_seconds()
    itk.MultiThreaderBase.SetGlobalDefaultNumberOfThreads(threads)  # transformix and the conversions
    inputs = load_session(session)
    rigid = np.asarray(daily_to_planning, dtype=np.float64)
    rss_start = peak_rss_mib()
    stages: dict[str, float] = {}
    start = time.perf_counter()
    fixed = sitk.Cast(crop_to_grid(inputs.daily.image, grid_from_geometry(model_grid)), sitk.sitkFloat32)
    moving = sitk.Resample(
        inputs.planning.image, fixed, affine_transform(rigid), sitk.sitkLinear, -1000.0, sitk.sitkFloat32
    )
    stages["prep"] = time.perf_counter() - start
    clock = time.perf_counter()
    result = register_bspline(fixed, moving, settings)
    stages["register"] = time.perf_counter() - clock
    clock = time.perf_counter()
    labels = resample_with_ddf(in_daily_frame(inputs.planning_labels, rigid), fixed, result.ddf, order=0)
    stages["warp"] = time.perf_counter() - clock
    return {
        "stages_s": stages,
        "elastix_s": result.seconds,  # registration + deformation field, without the image conversions
        "total_s": time.perf_counter() - start,
        "crop_size": list(fixed.GetSize()),
        "crop_voxels": int(np.prod(fixed.GetSize())),
        "warped_label_voxels": int(np.count_nonzero(labels)),
        "peak_rss_mib": peak_rss_mib(),
        "peak_rss_growth_mib": peak_rss_mib() - rss_start,
        "load_average": [load_before, _load()],
        "cpu_s": _cpu_seconds() - cpu_start,  # includes reading the session
    }


def load_itk() -> float:
    """Load ITK's elastix modules in this process (lazy, ~14 s) so forked children find them loaded; seconds."""
    start = time.perf_counter()
    import itk

    for name in ("ElastixRegistrationMethod", "TransformixFilter", "ParameterObject", "MultiThreaderBase"):
        getattr(itk, name)
    itk.GetImageFromArray(np.zeros((2, 2, 2), dtype=np.float32))  # the image wrappers too
    return time.perf_counter() - start


def _summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median seconds per stage and in total, maximum peaks, over repeats (errors kept apart)."""
    ok = [run for run in runs if "error" not in run]
    if not ok:
        return {"error": runs[0]["error"] if runs else "no run", "runs": runs}
    summary = dict(ok[0])
    summary["stages_s"] = {key: statistics.median(run["stages_s"][key] for run in ok) for key in ok[0]["stages_s"]}
    for key in ("total_s", "elastix_s", "cpu_s"):
        if key in ok[0]:
            summary[key] = statistics.median(run[key] for run in ok)
    for key in ("peak_rss_mib", "peak_rss_growth_mib", "gpu_peak_mib"):
        if key in ok[0]:
            summary[key] = max(run[key] for run in ok)
    summary["load_average_median"] = statistics.median(v for run in ok for v in run.get("load_average", [0.0]))
    summary["runs"] = runs
    return summary


def _attempt(label: str, fn: Any, *args: Any) -> dict[str, Any]:
    """:func:`run_forked` that turns a failure into an ``error`` entry (the other measurements still run)."""
    start = time.perf_counter()
    try:
        result = run_forked(fn, *args)
    except ChildProcessError as err:
        print(f"  {label}: FAILED\n{err}", file=sys.stderr, flush=True)
        return {"error": str(err)}
    print(f"  {label}: {result['total_s']:.1f} s ({time.perf_counter() - start:.1f} s)", file=sys.stderr, flush=True)
    return result


# --------------------------------------------------------------------------------------------------- report


def _fmt(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds:.2f}" if seconds < 10 else f"{seconds:.1f}"


def _size(size: Sequence[int]) -> str:
    return "x".join(str(n) for n in size)


def build_rows(
    studies: list[dict[str, Any]], fractions: dict[str, dict[str, list[dict]]], elastix: list[dict]
) -> list[dict]:
    """One row per device, field of view and variant: the network fraction, elastix and their ratios."""
    rows = []
    for device, variants in fractions.items():
        for n_study, (study, baseline) in enumerate(zip(studies, elastix, strict=True)):
            eager = variants.get(BASELINE, [{"error": "not measured"}] * len(studies))[n_study]
            for variant, summaries in variants.items():
                fraction = summaries[n_study]
                row: dict[str, Any] = {
                    "device": device,
                    "variant": variant,
                    "scale": study["scale"],
                    "study": study,
                    "fraction": fraction,
                    "elastix": baseline,
                }
                if "error" in fraction:
                    rows.append(row)
                    continue
                stages = fraction["stages_s"]
                if "error" not in eager:
                    row["ratio_network"] = eager["stages_s"]["network"] / stages["network"]
                if "error" not in baseline:
                    registration = stages["network"] + stages["refine"]
                    replaced = sum(stages[key] for key in REGISTRATION_STAGES)
                    row["elastix_fraction_s"] = fraction["total_s"] - replaced + baseline["total_s"]
                    row["ratio_registration"] = baseline["stages_s"]["register"] / registration
                    row["ratio_fraction"] = row["elastix_fraction_s"] / fraction["total_s"]
                rows.append(row)
    return rows


def _failed(elastix: dict[str, Any]) -> bool:
    """Whether elastix was measured and failed (skipped is not failed)."""
    return "error" in elastix and not elastix.get("skipped")


def _ratio(row: dict[str, Any], key: str) -> str:
    return f"{row[key]:.1f}" if key in row else "-"


def _refine(fraction: dict[str, Any]) -> str:
    report = fraction.get("refine", {})
    if report.get("mode", "off") == "off":
        return "off"
    return f"{report['mode']} {sum(report.get('iterations', []))}/{report.get('budget', '?')}"


def markdown(rows: list[dict[str, Any]], header: str) -> str:
    """The Markdown report: per-stage times (one row per device, field of view and variant), then the crops."""
    columns = [
        "FOV",
        "daily CT",
        "device",
        "variant",
        "backend",
        *(title for _, title in STAGES),
        "total s",
        "CPU s",
        "load avg",
        "peak MiB",
        "refine it/budget",
        "x network",
        "elastix reg s",
        "x elastix reg",
        "elastix fraction s",
        "x fraction",
    ]
    lines = [
        header,
        "",
        "| " + " | ".join(columns) + " |",
        "|" + "|".join(["---"] * 5 + ["---:"] * (len(columns) - 5)) + "|",
    ]
    for row in rows:
        study, fraction, baseline = row["study"], row["fraction"], row["elastix"]
        first = [f"{study['scale']:g}", _size(study["daily_size"]), row["device"], row["variant"]]
        if "error" in fraction:
            lines.append("| " + " | ".join([*first, "error: " + fraction["error"].splitlines()[0]]) + " |")
            continue
        peak = f"{fraction['peak_rss_growth_mib']:.0f}"
        if "gpu_peak_mib" in fraction:
            peak += f" (GPU {fraction['gpu_peak_mib']:.0f})"
        failed = "error" in baseline
        missing = "-" if baseline.get("skipped") else "error"
        cells = [
            *first,
            fraction["backend"],
            *(_fmt(fraction["stages_s"][key]) for key, _ in STAGES),
            _fmt(fraction["total_s"]),
            _fmt(fraction.get("cpu_s")),
            f"{fraction.get('load_average_median', float('nan')):.1f}",
            peak,
            _refine(fraction),
            _ratio(row, "ratio_network"),
            missing if failed else _fmt(baseline["stages_s"]["register"]),
            _ratio(row, "ratio_registration"),
            "-" if failed else _fmt(row.get("elastix_fraction_s")),
            _ratio(row, "ratio_fraction"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "Seconds (medians over repeats). CPU s: CPU time of the fraction's process, all threads (less bent by other "
        "jobs on the machine than wall time). load avg: the machine's 1-minute load average before and after the "
        "row's fractions (median; above the thread count, other jobs took a share of the cores). peak MiB: growth of "
        "the peak resident set size during the fraction "
        "(GPU: max allocated). refine it/budget: Adam steps run / budget of the refinement. x network: the torch-eager "
        "variant's network stage over this row's. elastix reg s: registration + deformation field on the network's "
        "box at daily resolution; x elastix reg: that over network + refine. elastix fraction s: the fraction with "
        "preprocess + network + refine + restore replaced by elastix (crop and resample + registration + label "
        "warp); x fraction: that over total s.",
        "",
        "| FOV | planning CT | daily CT | voxels | model grid | elastix crop | elastix prep s | elastix warp s "
        "| elastix CPU s | elastix load avg | elastix peak MiB | study made in s |",
        "|---|---|---|---:|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    seen = set()
    for row in rows:
        study, fraction, baseline = row["study"], row["fraction"], row["elastix"]
        if study["scale"] in seen or "error" in fraction:
            continue
        seen.add(study["scale"])
        grid = _size(fraction["model_grid"]["size"])
        if "error" in baseline:
            crop = "-" if baseline.get("skipped") else "error"
            prep, warp, cpu, load, peak = "-", "-", "-", "-", "-"
        else:
            crop = f"{_size(baseline['crop_size'])} ({baseline['crop_voxels'] / 1e6:.2f} M)"
            prep, warp = _fmt(baseline["stages_s"]["prep"]), _fmt(baseline["stages_s"]["warp"])
            peak = f"{baseline['peak_rss_growth_mib']:.0f}"
            cpu, load = _fmt(baseline.get("cpu_s")), f"{baseline.get('load_average_median', float('nan')):.1f}"
        made = "reused" if study["reused"] else _fmt(study["generation_s"])
        lines.append(
            f"| {study['scale']:g} | {_size(study['planning_size'])} | {_size(study['daily_size'])} "
            f"| {study['daily_voxels'] / 1e6:.2f} M | {grid} | {crop} | {prep} | {warp} | {cpu} | {load} | {peak} "
            f"| {made} |"
        )
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], path: Path) -> Path | None:
    """Log-log plot of seconds against daily-CT voxels: network fraction and stage per device, elastix."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    from matplotlib.ticker import FuncFormatter

    fig, ax = plt.subplots(figsize=(7, 4.5))
    colours = {"cpu": "tab:blue", "cuda": "tab:green"}
    series: dict[str, tuple[dict[str, Any], list[tuple[float, float]]]] = {}

    def add(label: str, style: dict[str, Any], x: float, y: float) -> None:
        series.setdefault(label, (style, []))[1].append((x, y))

    styles = {"torch-eager": ":", "no-refine": "-", "default": "-.", "amp": "--"}
    first = rows[0]
    for row in rows:
        x, fraction, baseline = row["study"]["daily_voxels"], row["fraction"], row["elastix"]
        device, variant = row["device"], row["variant"]
        colour = colours.get(device, "tab:orange")
        if "error" not in fraction:
            style = {"marker": "o", "ls": styles.get(variant, "-"), "color": colour}
            add(f"fraction, {variant} ({device})", style, x, fraction["total_s"])
            add(f"network stage, {variant} ({device})", {**style, "marker": "^"}, x, fraction["stages_s"]["network"])
        if "error" not in baseline and device == first["device"] and variant == first["variant"]:
            # elastix runs on the CPU once per size, whatever the network's devices and variants
            add(
                "elastix registration (CPU)",
                {"marker": "s", "ls": "--", "color": "k"},
                x,
                baseline["stages_s"]["register"],
            )
        if "elastix_fraction_s" in row and variant == "no-refine":
            label = f"fraction with elastix for the network ({device})"
            add(label, {"marker": "s", "ls": "-", "color": "k"}, x, row["elastix_fraction_s"])
    for label, (style, points) in series.items():
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], label=label, **style)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("daily CT voxels")
    ax.set_ylabel("seconds per fraction")
    ax.set_title("prostate-jrs fraction time against daily CT size")
    ax.grid(True, which="both", alpha=0.3)
    plain = FuncFormatter(lambda value, _: f"{value:g}")  # 3, 10, 30 rather than 3 x 10^0
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(plain)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------------------- main


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--device", nargs="+", choices=("cpu", "cuda"), default=None, help="default: cpu (+ cuda)")
    parser.add_argument("--threads", type=int, default=2, help="torch, engine, SimpleITK and elastix threads (2)")
    parser.add_argument(
        "--fov-scales", type=float, nargs="+", default=list(DEFAULT_SCALES), metavar="S",
        help="field-of-view scales: in-plane 500 S mm, scan length 120 + 240 S mm (default 0.5 0.75 1)",
    )  # fmt: skip
    parser.add_argument("--repeats", type=int, default=1, help="fractions per size, device and variant (median)")
    parser.add_argument(
        "--variants", nargs="+", choices=list(VARIANTS), default=None,
        help="bundle variants (default: torch-eager no-refine default refine-after, plus amp on CUDA)",
    )  # fmt: skip
    parser.add_argument("--bundle", type=Path, default=REPO / "bundle", help="bundle folder (default: bundle)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "speed", help="result folder")
    parser.add_argument("--data", type=Path, default=None, help="keep (and reuse) the generated studies here")
    parser.add_argument("--seed", type=int, default=0, help="phantom seed (default 0)")
    parser.add_argument("--tiny", action="store_true", help="tiny phantom, bundle and elastix: a smoke run")
    parser.add_argument(
        "--no-elastix", action="store_true",
        help="skip elastix (e.g. on a GPU machine without itk-elastix; its rows show '-')",
    )  # fmt: skip
    return parser


def _variants(device: str, chosen: Sequence[str] | None) -> list[str]:
    names = list(chosen) if chosen else [name for name in VARIANTS if name != "amp" or device == "cuda"]
    return [name for name in names if name != "amp" or device == "cuda"]  # autocast is a CUDA option


def measure_fractions(
    studies: list[dict[str, Any]], bundle: str, devices: list[str], args: argparse.Namespace
) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """Every variant on every device and field of view, repeats interleaved; summaries per study."""
    runs: dict[str, dict[str, list[list[dict[str, Any]]]]] = {
        device: {name: [[] for _ in studies] for name in _variants(device, args.variants)} for device in devices
    }
    for repeat in range(args.repeats):
        for device, variants in runs.items():
            for n_study, study in enumerate(studies):
                for name, per_study in variants.items():
                    label = f"fraction {study['scale']:g} on {device}, {name} ({repeat + 1}/{args.repeats})"
                    inputs = (study["session"], bundle, device, args.threads, VARIANTS[name])
                    per_study[n_study].append(_attempt(label, measure_fraction, *inputs))
    return {
        device: {name: [_summarise(study_runs) for study_runs in per_study] for name, per_study in variants.items()}
        for device, variants in runs.items()
    }


def measure_elastix_all(
    studies: list[dict[str, Any]],
    fractions: dict[str, dict[str, list[dict[str, Any]]]],
    settings: ElastixSettings,
    args: argparse.Namespace,
) -> list[dict[str, Any]]:
    """elastix on each study's crop (the model grid and rigid alignment of a successful fraction)."""
    elastix = []
    for n_study, study in enumerate(studies):
        candidates = [summaries[n_study] for variants in fractions.values() for summaries in variants.values()]
        source = next((c for c in candidates if "error" not in c), None)
        if source is None:
            elastix.append({"error": "no network fraction succeeded, so there is no model grid to crop to"})
            continue
        label = f"elastix {study['scale']:g}"
        inputs = (study["session"], source["model_grid"], source["daily_to_planning"], settings, args.threads)
        runs = [_attempt(f"{label} ({n + 1}/{args.repeats})", measure_elastix, *inputs) for n in range(args.repeats)]
        elastix.append(_summarise(runs))
    return elastix


def _header(args: argparse.Namespace, hardware: dict[str, Any], rows: list[dict], settings: ElastixSettings) -> str:
    ok = [row["fraction"] for row in rows if "error" not in row["fraction"]]
    model = ok[0]["settings"] if ok else {}
    loads = [v for fraction in ok for run in fraction["runs"] if "error" not in run for v in run["load_average"]]
    load = f"; 1-min load average during the fractions: median {statistics.median(loads):.1f}" if loads else ""
    gpu = hardware.get("gpu") or {}
    return (
        f"prostate-jrs fraction time (s), {'tiny' if args.tiny else 'clinical'} phantom, seed {args.seed}; "
        f"{hardware['cpu_model']}, {hardware['usable_cores']} cores, {args.threads} threads"
        + (f"; GPU {gpu.get('name')}" if gpu else "")
        + f"; network {model.get('network_name')} at {model.get('model_spacing_mm')} mm; elastix "
        f"{settings.resolutions} levels x {settings.iterations} iterations, {settings.grid_spacing_mm:g} mm grid; "
        f"medians of {args.repeats} repeat(s){load}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; returns 0, or 1 when a measurement failed (its row says so)."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.threads < 1 or args.repeats < 1 or args.seed < 0 or min(args.fov_scales) <= 0:
        parser.error("--threads and --repeats must be >= 1, --seed >= 0 and the scales positive")
    # CUDA is queried in a child: initialised in this process, it would be unusable in every later fork
    cuda = run_forked(cuda_facts) if torch.backends.cuda.is_built() else {"available": False}
    devices = args.device or (["cpu", "cuda"] if cuda["available"] else ["cpu"])
    if "cuda" in devices and not cuda["available"]:
        parser.error("--device cuda: torch finds no CUDA device here")
    devices = sorted(set(devices), key=["cpu", "cuda"].index)
    settings = dataclasses.replace(ElastixSettings.tiny() if args.tiny else ElastixSettings(), threads=args.threads)

    work = Path(tempfile.mkdtemp(prefix="speed-"))
    try:
        bundle = args.bundle.resolve()
        if args.tiny:
            bundle = run_forked(write_tiny_bundle, bundle, work / "tiny_bundle", TINY_BUNDLE)
        data = args.data.resolve() if args.data is not None else work / "studies"
        kind = "tiny" if args.tiny else "clinical"
        studies = []
        for scale in sorted(args.fov_scales):
            study = run_forked(make_study, data / f"{kind}_fov{scale:g}_seed{args.seed}", scale, args.seed, args.tiny)
            studies.append(study)
            size = _size(study["daily_size"])
            print(f"  study {scale:g}: daily CT {size} ({study['generation_s']:.1f} s)", file=sys.stderr, flush=True)
        exports = {device: run_forked(prepare_bundle, str(bundle), device, args.threads) for device in devices}
        fractions = measure_fractions(studies, str(bundle), devices, args)
        if args.no_elastix:
            itk_load_s = None
            elastix = [dict(NOT_MEASURED) for _ in studies]
        else:
            itk_load_s = load_itk()  # after the network children: they need not carry ITK's ~1 GB
            elastix = measure_elastix_all(studies, fractions, settings, args)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    rows = build_rows(studies, fractions, elastix)
    hardware = {**hardware_info(), "threads": args.threads, "gpu": cuda if "cuda" in devices else None}
    report = markdown(rows, _header(args, hardware, rows, settings))
    print(report, end="")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "speed.md").write_text(report)
    document = {
        "description": (__doc__ or "").split("\n\n")[0],
        "tiny": args.tiny,
        "seed": args.seed,
        "repeats": args.repeats,
        "bundle": str(args.bundle),
        "tiny_bundle_settings": TINY_BUNDLE if args.tiny else None,
        "devices": devices,
        "variants": {name: VARIANTS[name] for name in sorted({row["variant"] for row in rows})},
        "export": exports,
        "hardware": hardware,
        "versions": software_versions(),
        "elastix_settings": dataclasses.asdict(settings),
        "itk_load_s": itk_load_s,
        "stages": dict(STAGES),
        "studies": studies,
        "rows": rows,
    }
    (args.out / "speed.json").write_text(json.dumps(document, indent=2) + "\n")
    plot(rows, args.out / "speed_scaling.png")
    failed = any("error" in row["fraction"] or _failed(row["elastix"]) for row in rows)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
