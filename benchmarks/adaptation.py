"""Patient-specific adaptation: the generic model against models adapted to the first approved fractions.

Phantom patients never seen in training (``prostate-jrs synth D ... --seed 7014 --dicom archive``: the shipped
weights were trained on seed 2026, the tests use seeds 0-5) are exported as a hospital's archive; for every patient,
fraction ``k`` becomes two DICOM folders as a clinic would hand them over: ``<P>_fNN_approved`` (planning CT +
RTSTRUCT + RTPLAN, daily CT, approved daily RTSTRUCT) and ``<P>_fNN`` (the same without the daily RTSTRUCT: a new
fraction). For each patient the bundle is adapted with ``prostate_jrs.adaptation.runner.adapt_patient`` (what
``prostate-jrs adapt`` runs) on the first 1 and on the first 2 approved fractions (``--approved 1 2``), and the
generic model and both patient bundles run the app's library path (``load_session``, the patient check,
``load_bundle``, ``run_pipeline``; one rigid pre-alignment per fraction shared by all models) on the *later*
fractions (those after the largest ``--approved``, up to ``--fractions``), without refinement and (unless
``--no-refine``) with the bundle's default refinement.
Final contours are scored on the daily CT's grid against the phantom's truth (DSC, MSD, HD95 per structure).

Writes to ``--out``: ``adaptation.md`` (mean (SD) per model, refinement and structure; the paired Wilcoxon signed-rank
test of MSD, adapted vs generic, per structure and on the per-fraction mean; the app's QA review flags per model:
fractions flagged, and of the fractions with a structure beyond the recipe's 1.5 mm MSD limit or with a local error
(HD95 above 5 mm) how many had a flag naming that structure; seconds per adaptation; the machine and its load),
``adaptation.json``, ``per_case.csv`` (per fraction, model, refinement and structure: the metrics, the QA flag and
the QA's agreement of the two paths, ``qa_*``) and ``adaptation_msd.png``.
The Markdown is printed too.

Usage::

    python benchmarks/adaptation.py [--data D] [--patients 4 --fractions 5 --seed 7014 --spacing 2]
        [--institute NAME] [--approved 1 2] [--steps N] [--learning-rate LR] [--[no-]freeze-norm] [--threads 2]
        [--device cpu] [--bundle bundle]
        [--work W] [--out benchmarks/results/adaptation] [--no-refine] [--tiny]

Patient bundles already under ``--work`` with the same budget are reused, and so are the scores of a model (by the
sha256 of its weights) on a fraction; the report is rewritten after every patient. ``--tiny`` runs 1 patient of 3
tiny fractions, a tiny randomly initialised bundle and 2 steps: it checks that the study runs, never its numbers.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch

from prostate_jrs.adaptation.finetune import DEFAULT_STEPS, AdaptSettings
from prostate_jrs.adaptation.patient_bundle import ADAPTATION_KEY
from prostate_jrs.adaptation.runner import adapt_patient
from prostate_jrs.dicom_session import check_bundle_for_session, load_session
from prostate_jrs.geometry import array_from_image
from prostate_jrs.labels import STRUCTURES
from prostate_jrs.metrics import structure_metrics
from prostate_jrs.phantom import PhantomConfig
from prostate_jrs.phantom.handover import fraction_folders
from prostate_jrs.pipeline import PipelineSettings, load_bundle, run_pipeline
from prostate_jrs.refine import REFINE_MODES
from prostate_jrs.rigid import RigidAlignment, align_on_bone
from prostate_jrs.timing import hardware_info
from prostate_jrs.tiny_bundle import TINY_TRAINING, write_tiny_bundle
from prostate_jrs.trust import MODEL_FILE, MODEL_HASH_KEY, sha256_file

REPO = Path(__file__).resolve().parent.parent
NAMES = tuple(s.name for s in STRUCTURES)
SHORT = {"prostate": "prostate", "seminal_vesicles": "SV", "rectum": "rectum", "bladder": "bladder"}
METRICS = ("dsc", "msd_mm", "hd95_mm")
#: The QA report's agreement of the registration and segmentation paths, per structure, kept in every row.
QA_AGREEMENT = ("dsc_reg_seg", "msd_mm_reg_seg", "hd95_mm_reg_seg")
#: The recipe's acceptance limit of a structure's mean surface distance (shared/docs/DATA.md 3.4, item 9).
ACCEPTABLE_MSD_MM = 1.5
#: A local error worth a reviewer's look: a structure's HD95 beyond a typical 5 mm planning margin.
LOCAL_ERROR_HD95_MM = 5.0


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO / "benchmarks" / "results" / "adaptation_data")
    parser.add_argument("--patients", type=int, default=4)
    parser.add_argument("--fractions", type=int, default=5, help="fractions per patient; those after --approved scored")
    parser.add_argument("--seed", type=int, default=7014, help="phantom seed (not 2026, the shipped model's data)")
    parser.add_argument("--spacing", type=float, default=2.0, help="voxel size (mm) of the phantom scans")
    parser.add_argument(
        "--institute",
        default=None,
        help="hospital profile of the phantom patients (synth --institute; default: the recipe's, as in training)",
    )
    parser.add_argument("--approved", type=int, nargs="+", default=[1, 2], help="approved fractions adapted to")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="adaptation budget (optimizer steps)")
    parser.add_argument("--learning-rate", type=float, default=AdaptSettings().learning_rate)
    parser.add_argument(
        "--freeze-norm",
        action=argparse.BooleanOptionalAction,
        default=AdaptSettings().freeze_norm,
        help="keep the batch-norm statistics during adaptation (default as prostate-jrs adapt)",
    )
    parser.add_argument("--threads", type=int, default=2, help="torch and SimpleITK threads")
    parser.add_argument(
        "--device", choices=("cpu", "cuda"), default="cpu", help="adaptation and scoring device (default cpu)"
    )
    parser.add_argument("--bundle", type=Path, default=REPO / "bundle")
    parser.add_argument("--work", type=Path, default=REPO / "benchmarks" / "results" / "adaptation_runs")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "adaptation")
    parser.add_argument("--no-refine", action="store_true", help="score without refinement only")
    parser.add_argument("--tiny", action="store_true", help="seconds-long smoke run (CI)")
    args = parser.parse_args(argv)
    if args.tiny:
        args.patients, args.fractions, args.approved, args.steps = 1, 3, [1, 2], 2
    if max(args.approved) >= args.fractions:
        parser.error(f"--approved {max(args.approved)} leaves no later fraction of --fractions {args.fractions}")
    return args


# --------------------------------------------------------------------------------------------------- data


def ensure_dataset(args: argparse.Namespace) -> Path:
    """The phantom archive, made by ``prostate-jrs synth ... --dicom archive`` unless it exists.

    Raises:
        SystemExit: if an existing archive was made with another hospital profile than ``--institute``.
    """
    if (args.data / "dicom" / "archive.json").is_file():
        made_with = json.loads((args.data / "phantom.json").read_text())["config"]["site"]["name"]
        wanted = args.institute or PhantomConfig().site.name
        if made_with != wanted:
            sys.exit(f"{args.data} holds {made_with!r} phantoms, not {wanted!r} ones (--institute)")
        return args.data
    exe = shutil.which("prostate-jrs", path=str(Path(sys.executable).parent)) or "prostate-jrs"
    command = [exe, "synth", str(args.data), "--patients", str(args.patients), "--fractions", str(args.fractions)]
    command += ["--seed", str(args.seed), "--dicom", "archive"]
    command += ["--institute", args.institute] if args.institute else []
    command += ["--preset", "tiny"] if args.tiny else ["--spacing", f"{args.spacing:g}"]
    print("$", " ".join(command), flush=True)
    subprocess.run(command, check=True)
    return args.data


# --------------------------------------------------------------------------------------------------- models


def _tiny_bundle(work: Path) -> Path:
    bundle = work / "tiny_bundle"
    if not bundle.is_dir():
        write_tiny_bundle(REPO / "bundle", bundle, training=TINY_TRAINING)
    return bundle


def patient_bundle(
    base: Path, approved: Sequence[Path], out: Path, settings: AdaptSettings
) -> tuple[Path, dict[str, Any]]:
    """The patient bundle adapted on ``approved`` (reused when it exists with the same budget) and its record."""
    metadata = out / "configs" / "metadata.json"
    if metadata.is_file():
        record = json.loads(metadata.read_text())[ADAPTATION_KEY]
        used = record["training"]["settings"]
        same = used["steps"] == settings.steps and used.get("freeze_norm") == settings.freeze_norm
        if same and math.isclose(used["learning_rate"], settings.learning_rate):
            return out, record
        shutil.rmtree(out)
    print(f"adapting {out.name} on {len(approved)} approved fraction(s)", flush=True)
    adapt_patient(base, approved, out, settings, progress=lambda line: print(f"  {line}", flush=True))
    return out, json.loads(metadata.read_text())[ADAPTATION_KEY]


def score(labels: sitk.Image, truth: Path) -> dict[str, dict[str, float]]:
    """DSC, MSD and HD95 per structure of the final contours against the phantom's daily truth (same voxels)."""
    reference = sitk.ReadImage(str(truth))
    if reference.GetSize() != labels.GetSize():
        raise ValueError(f"{truth}: grid {reference.GetSize()} is not the daily CT's {labels.GetSize()}")
    metrics = structure_metrics(array_from_image(labels), array_from_image(reference), labels.GetSpacing())
    return {name: {m: float(getattr(metrics[name], m)) for m in METRICS} for name in NAMES}


def _model_id(bundle: Path) -> str:
    """The sha256 of a bundle's weights (its metadata's record, else the file's)."""
    metadata = json.loads((bundle / "configs" / "metadata.json").read_text())
    return str(metadata.get(MODEL_HASH_KEY) or sha256_file(bundle / MODEL_FILE))


def _pipeline_id(bundle: Path) -> str:
    """A digest of what the pipeline runs besides the weights: the bundle's inference config, the library's
    refinement modes and pipeline defaults (QA limits; a cached score is stale when any changes), and the version of
    the rows (with QA flags and the paths' agreement)."""
    digest = hashlib.sha256(b"rows with QA flags and path agreement")
    digest.update((bundle / "configs" / "inference.json").read_bytes())
    digest.update(repr(REFINE_MODES).encode())
    digest.update(repr(PipelineSettings()).encode())  # the QA's flag limits among them
    return digest.hexdigest()[:12]


def evaluate_fraction(
    folder: Path, truth: Path, models: Mapping[str, Path], refine: bool, device: str, cache: Path | None = None
) -> list[dict[str, Any]]:
    """Every model on one new fraction, without and (``refine``) with the bundle's default refinement; one row per
    model, refinement and structure. Rows of a model (by the sha256 of its weights) already scored on this fraction
    are read from ``cache`` (a folder) instead of run again."""
    inputs, rigid = None, None
    rows = []
    for model, bundle in models.items():
        key = f"{folder.name}_{_model_id(bundle)[:16]}_{_pipeline_id(bundle)}_{int(refine)}"
        stored = None if cache is None else cache / f"{key}.json"
        if stored is not None and stored.is_file():
            rows += [{**row, "model": model} for row in json.loads(stored.read_text())]
            continue
        if inputs is None:
            inputs = load_session(folder)
            rigid = RigidAlignment.from_result(align_on_bone(inputs.daily.image, inputs.planning.image))
        check_bundle_for_session(bundle, inputs)  # the app's rule: a patient bundle runs for its patient only
        network, settings = load_bundle(bundle, device=device)
        variants = [("off", dataclasses.replace(settings, refine=None))]
        if refine and settings.refine is not None:
            variants.append((settings.refine.name, settings))
        mine = []
        for label, run in variants:
            start = time.perf_counter()
            result = run_pipeline(
                inputs.planning.image, inputs.planning_labels, inputs.daily.image, network, run, rigid=rigid
            )
            seconds = time.perf_counter() - start
            for structure, values in score(result.labels, truth).items():
                flagged = any(flag.startswith(f"{structure}:") for flag in result.qa["flags"])
                agreement = {f"qa_{k}": result.qa["structures"][structure][k] for k in QA_AGREEMENT}
                row = {"model": model, "refine": label, "structure": structure, **values, "flagged": flagged}
                mine.append({**row, **agreement, "seconds": seconds})
        if stored is not None:
            stored.parent.mkdir(parents=True, exist_ok=True)
            stored.write_text(json.dumps(mine))
        rows += mine
    return rows


# --------------------------------------------------------------------------------------------------- statistics


def _values(rows: Sequence[Mapping[str, Any]], model: str, refine: str, structure: str, metric: str) -> dict:
    """``{case: value}`` of one model, refinement, structure and metric (NaN kept: a structure not found)."""
    return {
        r["case"]: float(r[metric])
        for r in rows
        if r["model"] == model and r["refine"] == refine and r["structure"] == structure
    }


def _mean_sd(values: Sequence[float], digits: int) -> str:
    finite = np.asarray([v for v in values if math.isfinite(v)], dtype=np.float64)
    if finite.size == 0:
        return "n/a"
    missing = f" [{len(values) - finite.size} n/a]" if finite.size < len(values) else ""
    return f"{finite.mean():.{digits}f} ({finite.std(ddof=1) if finite.size > 1 else 0.0:.{digits}f}){missing}"


def paired_test(rows: Sequence[Mapping[str, Any]], model: str, refine: str, baseline: str = "generic") -> dict:
    """Wilcoxon signed-rank test of MSD, ``model`` vs ``baseline`` on the same fractions, per structure and on the
    per-fraction mean over structures; mean differences (negative: the adapted model is closer)."""
    from scipy.stats import wilcoxon

    def test(a: np.ndarray, b: np.ndarray) -> dict[str, Any]:
        ok = np.isfinite(a) & np.isfinite(b)
        a, b = a[ok], b[ok]
        p = float(wilcoxon(a, b).pvalue) if a.size > 1 and np.any(a != b) else math.nan
        return {"n": int(a.size), "mean_difference_mm": float(np.mean(a - b)) if a.size else math.nan, "p_value": p}

    result: dict[str, Any] = {"model": model, "baseline": baseline, "refine": refine, "structures": {}}
    per_case: dict[str, list[tuple[float, float]]] = {}
    for structure in NAMES:
        mine, base = (
            _values(rows, model, refine, structure, "msd_mm"),
            _values(rows, baseline, refine, structure, "msd_mm"),
        )
        cases = sorted(set(mine) & set(base))
        a, b = np.array([mine[c] for c in cases]), np.array([base[c] for c in cases])
        result["structures"][structure] = test(a, b)
        for case, x, y in zip(cases, a, b, strict=True):
            per_case.setdefault(case, []).append((x, y))
    complete = {c: v for c, v in per_case.items() if len(v) == len(NAMES) and all(map(np.isfinite, np.ravel(v)))}
    a = np.array([np.mean([x for x, _ in v]) for v in complete.values()])
    b = np.array([np.mean([y for _, y in v]) for v in complete.values()])
    result["mean_over_structures"] = test(a, b)
    return result


def _p(value: float) -> str:
    return "n/a" if not math.isfinite(value) else (f"{value:.2g}" if value >= 0.001 else "< 0.001")


def markdown(rows: Sequence[Mapping[str, Any]], tests: Sequence[Mapping[str, Any]], meta: Mapping[str, Any]) -> str:
    """The tables of ``adaptation.md``."""
    models = list(dict.fromkeys(r["model"] for r in rows))
    refines = list(dict.fromkeys(r["refine"] for r in rows))
    cases = len({r["case"] for r in rows})
    lines = [
        f"Later fractions scored: {cases} ({meta['patients']} patients, fractions {meta['scored_fractions']}"
        f"{', ' + meta['dataset']['institute'] + ' profile' if meta['dataset']['institute'] else ''}); "
        f"mean (SD) over fractions; final contours on the daily CT's grid.",
        "",
    ]
    for metric, label, digits in (("msd_mm", "MSD (mm)", 2), ("dsc", "DSC", 3), ("hd95_mm", "HD95 (mm)", 2)):
        lines += [f"**{label}**", ""]
        lines += ["| model | refine | " + " | ".join(SHORT[n] for n in NAMES) + " |", "|---|---|" + "---|" * len(NAMES)]
        for refine in refines:
            for model in models:
                cells = [_mean_sd(list(_values(rows, model, refine, n, metric).values()), digits) for n in NAMES]
                lines.append(f"| {model} | {refine} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += [
        "**Paired test of MSD against the generic model** (Wilcoxon signed-rank over the same fractions; "
        "difference = adapted - generic, mm)",
        "",
    ]
    lines += ["| model | refine | " + " | ".join(SHORT[n] for n in NAMES) + " | mean of 4 |", "|---|---|" + "---|" * 5]
    for test in tests:
        cells = [test["structures"][n] for n in NAMES] + [test["mean_over_structures"]]
        text = [f"{c['mean_difference_mm']:+.2f}, p {_p(c['p_value'])} (n={c['n']})" for c in cells]
        lines.append(f"| {test['model']} | {test['refine']} | " + " | ".join(text) + " |")
    lines += ["", *review_table(rows)]
    lines += ["", "**Adaptation time** (`prostate-jrs adapt`: read DICOM, align, fine-tune, write the bundle)", ""]
    lines += ["| approved fractions | adaptations | steps | device | threads | seconds, total | seconds, training |"]
    lines += ["|---|---|---|---|---|---|---|"]
    for n, t in sorted(meta["adaptation_seconds"].items()):
        lines.append(
            f"| {n} | {len(t['total'])} | {t['steps']} | {t['device']} | {t['threads']} | "
            f"{_mean_sd(t['total'], 0)} | {_mean_sd(t['train'], 0)} |"
        )
    load = meta["load_average"]
    lines += [
        "",
        f"Machine: {meta['hardware']['cpu_model']}, {meta['hardware']['usable_cores']} usable cores, "
        f"--threads {meta['threads']}; 1-minute load average {load['start']:.1f} at the start, "
        f"{load['end']:.1f} at the end (other sessions share the machine).",
    ]
    return "\n".join(lines) + "\n"


def review_table(
    rows: Sequence[Mapping[str, Any]], limit_mm: float = ACCEPTABLE_MSD_MM, local_mm: float = LOCAL_ERROR_HD95_MM
) -> list[str]:
    """Lines of the table of the app's review flags (``qa.json`` ``flags`` naming a structure) per model and refinement:
    fractions flagged, flags per structure, and of the fractions with a structure's MSD above ``limit_mm`` (or its HD95
    above ``local_mm``) how many had a flag naming that structure."""
    lines = [
        f"**Review flags of the app's QA** (fractions with a flag naming a structure; fractions where some structure's "
        f"MSD exceeds {limit_mm:g} mm, or its HD95 {local_mm:g} mm, and how many of those have a flag naming it)",
        "",
        "| model | refine | fractions flagged | "
        + " | ".join(f"{SHORT[n]} flags" for n in NAMES)
        + f" | MSD > {limit_mm:g} mm | flagged there | HD95 > {local_mm:g} mm | flagged there |",
        "|---|---|---|" + "---|" * len(NAMES) + "---|---|---|---|",
    ]
    for refine in dict.fromkeys(r["refine"] for r in rows):
        for model in dict.fromkeys(r["model"] for r in rows):
            mine = [r for r in rows if r["model"] == model and r["refine"] == refine and "flagged" in r]
            if not mine:
                continue
            cases = sorted({r["case"] for r in mine})
            flagged = {r["case"] for r in mine if r["flagged"]}
            per_structure = [str(sum(r["flagged"] for r in mine if r["structure"] == n)) for n in NAMES]
            counts = []
            for metric, limit in (("msd_mm", limit_mm), ("hd95_mm", local_mm)):
                wrong = [r for r in mine if r[metric] > limit]
                counts += [len({r["case"] for r in wrong}), len({r["case"] for r in wrong if r["flagged"]})]
            lines.append(
                f"| {model} | {refine} | {len(flagged)} / {len(cases)} | "
                + " | ".join(per_structure)
                + " | "
                + " | ".join(str(c) for c in counts)
                + " |"
            )
    return lines


def plot(rows: Sequence[Mapping[str, Any]], path: Path) -> None:
    """MSD per structure, one box per model, one panel per refinement setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in rows))
    refines = list(dict.fromkeys(r["refine"] for r in rows))
    fig, axes = plt.subplots(1, len(refines), figsize=(7 * len(refines), 4.5), sharey=True, squeeze=False)
    width = 0.8 / len(models)
    for ax, refine in zip(axes[0], refines, strict=True):
        for m, model in enumerate(models):
            data = [[v for v in _values(rows, model, refine, n, "msd_mm").values() if math.isfinite(v)] for n in NAMES]
            positions = [s + (m - (len(models) - 1) / 2) * width for s in range(len(NAMES))]
            boxes = ax.boxplot(data, positions=positions, widths=width * 0.9, patch_artist=True, showfliers=True)
            for box in boxes["boxes"]:
                box.set_facecolor(f"C{m}")
            ax.plot([], [], color=f"C{m}", linewidth=8, label=model)
        ax.set_xticks(range(len(NAMES)), [SHORT[n] for n in NAMES])
        ax.set_title(f"refinement {refine}")
        ax.set_ylabel("mean surface distance (mm)")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Later fractions: generic model vs adapted to the first approved fraction(s)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------------------------------- main


def _write_csv(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    columns = ["case", "patient", "fraction", "model", "refine", "structure", *METRICS, "flagged"]
    columns += [*(f"qa_{k}" for k in QA_AGREEMENT), "seconds"]
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def write_report(
    args: argparse.Namespace, rows: Sequence[Mapping[str, Any]], seconds: Mapping[str, Any], patients: int, load: float
) -> str:
    """Write ``adaptation.md``, ``adaptation.json``, ``per_case.csv`` and the plot for the patients scored so far;
    returns the Markdown."""
    tests = [
        paired_test(rows, model, refine)
        for refine in dict.fromkeys(r["refine"] for r in rows)
        for model in dict.fromkeys(r["model"] for r in rows)
        if model != "generic"
    ]
    meta = {
        "patients": patients,
        "scored_fractions": f"{max(args.approved) + 1}-{args.fractions}",
        "adaptation_seconds": seconds,
        "threads": args.threads,
        "hardware": hardware_info(),
        "load_average": {"start": load, "end": os.getloadavg()[0]},
        "dataset": {
            "patients": args.patients,
            "fractions": args.fractions,
            "seed": args.seed,
            "spacing": args.spacing,
            "institute": args.institute,
        },
        "settings": {
            "steps": args.steps,
            "learning_rate": args.learning_rate,
            "freeze_norm": args.freeze_norm,
            "approved": args.approved,
        },
        "tiny": args.tiny,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    table = markdown(rows, tests, meta)
    (args.out / "adaptation.md").write_text(table)
    report = {**meta, "tests": tests, "rows": list(rows)}
    (args.out / "adaptation.json").write_text(json.dumps(report, indent=1, default=float))
    _write_csv(args.out / "per_case.csv", rows)
    plot(rows, args.out / "adaptation_msd.png")
    return table


def main(argv: Sequence[str] | None = None) -> int:
    """Run the study (the report is rewritten after every patient); returns 0."""
    args = _parse(argv)
    torch.set_num_threads(args.threads)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(args.threads)
    load_start = os.getloadavg()[0]
    data = ensure_dataset(args)
    base = _tiny_bundle(args.work) if args.tiny else args.bundle
    folders = fraction_folders(data, args.work / "sessions")
    settings = AdaptSettings(
        steps=args.steps, learning_rate=args.learning_rate, device=args.device, freeze_norm=args.freeze_norm
    )
    last = max(args.approved)
    rows: list[dict[str, Any]] = []
    seconds: dict[str, dict[str, Any]] = {}
    table = ""
    for done, (pid, fractions) in enumerate(sorted(folders.items()), start=1):
        models = {"generic": base}
        for n in args.approved:
            approved = [fractions[k].approved for k in range(1, n + 1)]
            bundle, record = patient_bundle(base, approved, args.work / "bundles" / f"{pid}_n{n}", settings)
            models[f"adapted_{n}"] = bundle
            t = seconds.setdefault(str(n), {"total": [], "train": []})
            t["total"].append(record["training"]["total_seconds"])
            t["train"].append(record["training"]["train_seconds"])
            t.update(steps=record["training"]["settings"]["steps"], device=record["training"]["settings"]["device"])
            t["threads"] = record["training"]["threads"]
        for k in sorted(f for f in fractions if last < f <= args.fractions):
            print(f"scoring {pid} fraction {k}", flush=True)
            for row in evaluate_fraction(
                fractions[k].scan, fractions[k].truth, models, not args.no_refine, args.device, args.work / "scores"
            ):
                rows.append({"case": f"{pid}_f{k:02d}", "patient": pid, "fraction": k, **row})
        table = write_report(args, rows, seconds, done, load_start)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
