"""Where adaptation reaches the final contours: generic and adapted models per contour path and refinement start.

``benchmarks/adaptation.py`` scores the final contours of the bundle's default refinement, which starts from the rigid
alignment and takes every structure from the registration path: there the adapted weights change nothing. This study
scores, on the same later fractions and with the same patient bundles (made by ``adaptation.py`` under ``--work``, or
here with the same recipe), both contour paths (``reg``: planning contours warped by the final DDF; ``seg``: the
segmentation head) of each model under these refinements of the bundle's ``accurate`` mode:

* ``off``: the network alone;
* ``zero``: the bundle's default (from the rigid alignment);
* ``network``: from the model's own DDF (``init="network"``), the way an adapted field could reach the contours;
* ``coarse``: from the model's DDF smoothed onto the coarsest control nodes (``init="coarse"``), so that the
  refinement can move away from the field's local errors;
* ``auto``: the coarsest level from the rigid alignment and from the model's DDF, the lower loss kept
  (``init="auto"``);
* ``nodes8``: the default start, the coarsest level's control nodes 8 model voxels apart (the 0.5.1 default) instead
  of 16 (0.5.2);
* ``guided``: from the rigid alignment, guided by the model's segmentation of rectum and bladder
  (``guidance_weight`` 0.05), the way an adapted segmentation could reach them.

Writes ``paths.md`` (mean MSD per model, refinement and path; the paired Wilcoxon test of the final contours'
MSD of every variant against the generic model's default) and ``rows.jsonl`` (one line per fraction and variant,
read back to resume; a row scored with other refinement settings than the library's current ones is neither reused
nor reported) into ``--out``.

Usage::

    python benchmarks/adaptation_paths.py [--data D --work W] [--institute NAME] [--approved 1 2] [--fractions 5]
        [--threads 2] [--out benchmarks/results/adaptation_paths] [--tiny]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import adaptation as study  # the sibling benchmark: data, patient bundles, scoring

from prostate_jrs.adaptation.finetune import AdaptSettings
from prostate_jrs.dicom_session import load_session
from prostate_jrs.phantom.handover import fraction_folders
from prostate_jrs.pipeline import PipelineSettings, load_bundle, run_pipeline
from prostate_jrs.refine import RefineSettings, refine_settings
from prostate_jrs.rigid import RigidAlignment, align_on_bone

#: Refinements of the bundle's mode: overrides of its settings (``None``: refinement off).
REFINEMENTS: dict[str, dict[str, Any] | None] = {
    "off": None,
    "zero": {},
    "network": {"init": "network"},
    "coarse": {"init": "coarse"},
    "auto": {"init": "auto"},
    "nodes8": {"control_spacing": (8, 4, 4)},
    "guided": {"guidance_weight": 0.05, "guidance_structures": ("rectum", "bladder")},
}
#: The variant every other one is tested against: the generic model with the bundle's default refinement.
BASELINE = ("generic", "zero")
PATHS = ("final", "reg", "seg")


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=study.REPO / "benchmarks" / "results" / "adaptation_data")
    parser.add_argument("--work", type=Path, default=study.REPO / "benchmarks" / "results" / "adaptation_runs")
    parser.add_argument("--out", type=Path, default=study.REPO / "benchmarks" / "results" / "adaptation_paths")
    parser.add_argument("--bundle", type=Path, default=study.REPO / "bundle")
    parser.add_argument("--patients", type=int, default=4)
    parser.add_argument("--fractions", type=int, default=5)
    parser.add_argument("--seed", type=int, default=7014)
    parser.add_argument("--spacing", type=float, default=2.0)
    parser.add_argument(
        "--institute", default=None, help="hospital profile of the phantom patients (synth --institute)"
    )
    parser.add_argument("--approved", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--steps", type=int, default=300, help="adaptation budget of bundles made here")
    parser.add_argument("--learning-rate", type=float, default=AdaptSettings().learning_rate)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tiny", action="store_true", help="seconds-long smoke run (CI)")
    args = parser.parse_args(argv)
    if args.tiny:
        args.patients, args.fractions, args.approved, args.steps = 1, 3, [1], 2
    return args


def _settings(refinement: str) -> RefineSettings | None:
    """``refinement``'s overrides resolved against the library's current ``accurate`` mode; ``None``: off."""
    overrides = REFINEMENTS[refinement]
    return None if overrides is None else refine_settings("accurate", overrides)


def reads_network(refinement: str) -> bool:
    """Whether the final contours of ``refinement`` depend on the network: no refinement, or one whose settings
    (overrides of the ``accurate`` mode) read its output (:attr:`RefineSettings.needs_network`)."""
    settings = _settings(refinement)
    return settings is None or settings.needs_network


def settings_id(refinement: str) -> str:
    """What ``refinement`` runs, resolved against the library's current ``accurate`` mode (rows keyed by it go stale
    when the bundle's default changes)."""
    settings = _settings(refinement)
    return "off" if settings is None else repr(settings)


def current_rows(rows: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The rows (read back from ``rows.jsonl``) of refinements this script still runs, scored with the settings they
    have now; the others (a renamed variant, an older default) are neither reused nor reported."""
    return [r for r in rows if r["refine"] in REFINEMENTS and r.get("settings") == settings_id(r["refine"])]


def variants(approved: Sequence[int]) -> list[tuple[str, str]]:
    """``(model, refinement)`` pairs: every refinement for the generic model; for adapted ones only those that read the
    network (the others equal the generic model's by construction)."""
    models = ["generic", *(f"adapted_{n}" for n in approved)]
    return [(m, r) for m in models for r in REFINEMENTS if m == "generic" or reads_network(r)]


def score_variant(
    inputs: Any, rigid: RigidAlignment, model: tuple[Any, PipelineSettings], refinement: str, truth: Path
) -> dict[str, Any]:
    """Both paths and the final contours of one loaded model (``load_bundle``) and refinement on one fraction (DSC,
    MSD, HD95 each)."""
    network, settings = model
    overrides = REFINEMENTS[refinement]
    if overrides is None or settings.refine is None:
        run = dataclasses.replace(settings, refine=None)
    else:
        run = dataclasses.replace(settings, refine=dataclasses.replace(settings.refine, **overrides))
    start = time.perf_counter()
    result = run_pipeline(inputs.planning.image, inputs.planning_labels, inputs.daily.image, network, run, rigid=rigid)
    row: dict[str, Any] = {"seconds": time.perf_counter() - start}
    images: dict[str, sitk.Image] = {"final": result.labels, "reg": result.reg, "seg": result.seg}
    for path, image in images.items():
        row[path] = study.score(image, truth)
    return row


def paired(
    rows: Sequence[Mapping[str, Any]], model: str, refinement: str, baseline: tuple[str, str] = BASELINE
) -> dict[str, dict[str, float]]:
    """Wilcoxon signed-rank test of the final contours' MSD of one variant against ``baseline`` (model,
    refinement), per structure."""
    from scipy.stats import wilcoxon

    def msd(m: str, r: str) -> dict[str, dict[str, float]]:
        return {x["case"]: x["final"] for x in rows if x["model"] == m and x["refine"] == r}

    mine, base = msd(model, refinement), msd(*baseline)
    cases = sorted(set(mine) & set(base))
    result = {}
    for name in study.NAMES:
        a = np.array([mine[c][name]["msd_mm"] for c in cases])
        b = np.array([base[c][name]["msd_mm"] for c in cases])
        p = float(wilcoxon(a, b).pvalue) if a.size > 1 and np.any(a != b) else math.nan
        result[name] = {"n": len(cases), "difference_mm": float(np.mean(a - b)) if cases else math.nan, "p": p}
    return result


def markdown(rows: Sequence[Mapping[str, Any]], approved: Sequence[int]) -> str:
    """The tables of ``paths.md``."""
    header = "| model | refinement | " + " | ".join(study.SHORT[n] for n in study.NAMES) + " |"
    rule = "|---|---|" + "---|" * len(study.NAMES)
    lines = [f"Later fractions scored: {len({r['case'] for r in rows})}; mean MSD (mm) over them.", ""]
    for path in PATHS:
        lines += [f"**{path} contours**", "", header, rule]
        for model, refinement in variants(approved):
            mine = [r[path] for r in rows if r["model"] == model and r["refine"] == refinement]
            cells = [f"{np.mean([m[n]['msd_mm'] for m in mine]):.2f}" if mine else "n/a" for n in study.NAMES]
            lines.append(f"| {model} | {refinement} | " + " | ".join(cells) + " |")
        lines.append("")
    everything_but_baseline = [v for v in variants(approved) if v != BASELINE]
    adapted = [v for v in everything_but_baseline if v[0] != "generic"]
    for title, compared, same_refinement in (
        (f"{BASELINE[0]} / {BASELINE[1]} (the product's default)", everything_but_baseline, False),
        ("the generic model with the same refinement", adapted, True),
    ):
        lines += [f"**Final contours' MSD against {title}** (difference, Wilcoxon p)", "", header, rule]
        for model, refinement in compared:
            baseline = ("generic", refinement) if same_refinement else BASELINE
            tests = paired(rows, model, refinement, baseline)
            cells = [f"{t['difference_mm']:+.2f}, p {study._p(t['p'])} (n={t['n']})" for t in tests.values()]
            lines.append(f"| {model} | {refinement} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """Run (or resume) the study and write its report; returns 0."""
    args = _parse(argv)
    torch.set_num_threads(args.threads)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(args.threads)
    data = study.ensure_dataset(args)
    base = study._tiny_bundle(args.work) if args.tiny else args.bundle
    settings = AdaptSettings(steps=args.steps, learning_rate=args.learning_rate, device="cpu")
    args.out.mkdir(parents=True, exist_ok=True)
    sink = args.out / "rows.jsonl"
    rows = [json.loads(line) for line in sink.read_text().splitlines()] if sink.is_file() else []
    rows = current_rows(rows)
    done = {(r["case"], r["model"], r["refine"]) for r in rows}
    last = max(args.approved)
    for pid, fractions in sorted(fraction_folders(data, args.work / "sessions").items()):
        models = {"generic": base}
        loaded: dict[str, tuple[Any, PipelineSettings]] = {}
        for n in args.approved:
            approved = [fractions[k].approved for k in range(1, n + 1)]
            models[f"adapted_{n}"] = study.patient_bundle(
                base, approved, args.work / "bundles" / f"{pid}_n{n}", settings
            )[0]
        for k in sorted(f for f in fractions if last < f <= args.fractions):
            case = f"{pid}_f{k:02d}"
            todo = [v for v in variants(args.approved) if (case, *v) not in done]
            if not todo:
                continue
            inputs = load_session(fractions[k].scan)
            rigid = RigidAlignment.from_result(align_on_bone(inputs.daily.image, inputs.planning.image))
            for model, refinement in todo:
                if model not in loaded:  # once per patient, and only when a fraction still needs it
                    loaded[model] = load_bundle(models[model], device="cpu")
                row = {"case": case, "model": model, "refine": refinement, "settings": settings_id(refinement)}
                row.update(score_variant(inputs, rigid, loaded[model], refinement, fractions[k].truth))
                rows.append(row)
                with sink.open("a") as handle:
                    handle.write(json.dumps(row) + "\n")
                print(case, model, refinement, f"{row['seconds']:.1f} s", flush=True)
    table = markdown(rows, args.approved)
    (args.out / "paths.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
