"""Accuracy of the six networks, elastix and the identity baseline on a phantom test split.

Every network of the paper is trained by the bundle's ``train.json`` with the same budget (epochs, data, widths,
spacing, learning rate; ``--epochs``; no validation, no model selection: the last epoch is scored) and scored by
``evaluate.json`` on the test split; elastix
(:mod:`prostate_jrs.baselines.elastix`) and the identity baseline (planning contours copied unchanged) are scored
on the same pairs by :func:`prostate_jrs.baselines.score_baseline` with the same metric code, on the daily CT's
own grid. Optionally the shipped checkpoint (``--shipped``) is scored as one more row.

Writes to ``--out``: ``accuracy.md`` (DSC, MSD and HD95 per structure and path as mean +- SD, DDF folding, training
time, and paired Wilcoxon signed-rank tests against elastix of the best equally trained network and, with
``--shipped``, of the shipped model), ``accuracy.json``,
``per_case.csv`` (every case, method, path and structure) and ``accuracy_dsc.png`` / ``accuracy_hd95.png`` (box
plots). The Markdown table is printed too.

Usage::

    python benchmarks/accuracy.py --data D [--patients 16 --fractions 4 --seed 2026 --spacing 2]
        [--networks seg reg jrs_reg dense sedd cross_stitch] [--epochs 12] [--runs RUNS] [--shipped]
        [--out benchmarks/results/accuracy] [--tiny]

``--data`` is made by ``prostate-jrs synth`` with the given options when it holds no ``datalist.json``. Trained
networks are kept under ``--runs`` and reused when their checkpoint exists and was trained for the same ``--epochs``
(a checkpoint of another budget stops the run; delete it to retrain); an evaluation is reused when it is newer than
its checkpoint and ran the same overrides and refinement settings (a changed refinement default is evaluated again).
``--tiny`` shrinks everything (3 patients, 4 mm, narrow networks, 1 epoch, short elastix) so CI can run the whole
script.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from prostate_jrs.timing import hardware_info
from prostate_jrs.tiny_bundle import TINY_REFINE, TINY_TRAINING

REPO = Path(__file__).resolve().parent.parent
STRUCTURE_NAMES = ("prostate", "seminal_vesicles", "rectum", "bladder")
SHORT = {"prostate": "prostate", "seminal_vesicles": "SV", "rectum": "rectum", "bladder": "bladder"}
#: Contour paths each network has (single-task networks have one).
NETWORK_PATHS = {
    "seg": ("seg",),
    "reg": ("reg",),
    "jrs_reg": ("reg",),
    "dense": ("reg", "seg"),
    "sedd": ("reg", "seg"),
    "cross_stitch": ("reg", "seg"),
}
#: Refinement variants scored for the shipped model (``--tiny``: for the first trained network): mode and settings.
REFINE_VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "fast": ("fast", {}),
    "accurate": ("accurate", {}),
    "fast from the network": ("fast", {"init": "network"}),
    "accurate from the network's coarse field": ("accurate", {"init": "coarse"}),
    "accurate 0.5.1 (nodes 8)": ("accurate", {"control_spacing": (8, 4, 4)}),
}
SHIPPED = "cross_stitch (shipped)"


def _parse(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO / "benchmarks" / "results" / "data")
    parser.add_argument("--patients", type=int, default=16)
    parser.add_argument("--fractions", type=int, default=4)
    parser.add_argument("--seed", type=int, default=2026)
    parser.add_argument("--spacing", type=float, default=2.0, help="voxel size (mm) of the synthetic dataset")
    parser.add_argument("--networks", nargs="*", default=list(NETWORK_PATHS), choices=list(NETWORK_PATHS))
    parser.add_argument(
        "--refine",
        nargs="*",
        default=list(REFINE_VARIANTS),
        choices=list(REFINE_VARIANTS),
        help="refinement variants scored for the shipped model (--tiny: the first network)",
    )
    parser.add_argument("--epochs", type=int, default=12, help="training budget of every network")
    parser.add_argument("--runs", type=Path, default=REPO / "benchmarks" / "results" / "accuracy_runs")
    parser.add_argument("--bundle", type=Path, default=REPO / "bundle")
    parser.add_argument("--shipped", action="store_true", help="also score the bundle's shipped checkpoint")
    parser.add_argument("--no-elastix", action="store_true", help="skip the elastix baseline")
    parser.add_argument("--threads", type=int, default=2, help="threads of training, inference and elastix")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "accuracy")
    parser.add_argument("--tiny", action="store_true", help="seconds-long smoke run (CI)")
    return parser.parse_args(argv)


def _overrides(values: Mapping[str, Any]) -> list[str]:
    args: list[str] = []
    for key, value in values.items():
        args += [f"--{key}", value if isinstance(value, str) else repr(value)]
    return args


def _bundle_run(config_files: Sequence[Path], overrides: Mapping[str, Any], log: Path, threads: int) -> float:
    """``python -m monai.bundle run`` as users type it; returns its wall time.

    Raises:
        RuntimeError: if the run fails (its log is named).
    """
    configs = "[" + ",".join(f"'{c}'" for c in config_files) + "]"
    command = [sys.executable, "-m", "monai.bundle", "run", "--config_file", configs, *_overrides(overrides)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with log.open("w") as handle:
        result = subprocess.run(command, cwd=REPO, env=env, stdout=handle, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        raise RuntimeError(f"bundle run failed ({' '.join(command)}); see {log}")
    return time.perf_counter() - start


def ensure_dataset(args: argparse.Namespace) -> Path:
    """The phantom dataset, made by ``prostate-jrs synth`` unless it exists."""
    if (args.data / "datalist.json").is_file():
        return args.data
    exe = shutil.which("prostate-jrs", path=str(Path(sys.executable).parent)) or "prostate-jrs"
    command = [exe, "synth", str(args.data), "--patients", str(args.patients), "--fractions", str(args.fractions)]
    command += ["--seed", str(args.seed), "--spacing", f"{args.spacing:g}"]
    if args.tiny:
        command += ["--preset", "tiny"]
    print("$", " ".join(command), flush=True)
    subprocess.run(command, check=True)
    return args.data


def _read_csv(path: Path) -> list[dict[str, str]]:
    with path.open() as handle:
        return list(csv.DictReader(handle))


def _check_budget(run: Path, epochs: int) -> None:
    """Refuse to reuse a checkpoint trained with another budget: every network must get the same one.

    Raises:
        ValueError: if ``run/models/model_final.pt`` exists and ``run/budget.json`` is missing or names other epochs.
    """
    if not (run / "models" / "model_final.pt").is_file():
        return
    budget = run / "budget.json"
    trained = json.loads(budget.read_text()).get("epochs") if budget.is_file() else None
    if trained != epochs:
        raise ValueError(
            f"{run / 'models' / 'model_final.pt'} was trained for {trained or 'an unknown number of'} epochs "
            f"({budget}), not --epochs {epochs}; delete {run} to retrain it or use another --runs"
        )


def run_network(name: str, args: argparse.Namespace, common: Mapping[str, Any]) -> dict[str, Any]:
    """Train (unless its checkpoint exists) and evaluate one network; returns its rows and timings."""
    run = args.runs / name
    models = run / "models"
    overrides = {**common, "network_name": name, "ckpt_dir": str(models)}
    train_seconds = math.nan
    _check_budget(run, args.epochs)
    if not (models / "model_final.pt").is_file():
        print(f"training {name} for {args.epochs} epochs ...", flush=True)
        # no validation during training: every network is scored at the end of the same budget, no model selection
        budget = {"epochs": args.epochs, "val_interval": args.epochs + 1, "output_dir": str(run / "train")}
        train_seconds = _bundle_run(
            [args.bundle / "configs" / "train.json"], {**overrides, **budget}, run / "train.log", args.threads
        )
        (run / "budget.json").write_text(json.dumps({"epochs": args.epochs, "seconds": train_seconds}, indent=2))
    elif (run / "budget.json").is_file():
        train_seconds = json.loads((run / "budget.json").read_text())["seconds"]
    final = {**overrides, "validate#handlers#0#load_path": str(models / "model_final.pt"), "refine#mode": "off"}
    return _evaluate(name, run, final, args, train_seconds, NETWORK_PATHS[name])


def run_refined(label: str, run: Path, overrides: Mapping[str, Any], args: argparse.Namespace) -> list[dict[str, Any]]:
    """Evaluate ``label``'s checkpoint once per refinement variant; rows of the refined DDF only."""
    results = []
    for variant in args.refine:
        mode, settings = REFINE_VARIANTS[variant]
        settings = {**settings, **(TINY_REFINE if args.tiny else {})}
        values = {**overrides, "refine#mode": mode, "refine#settings": settings}
        name = f"{label} + refine {variant}"
        folder = run / f"refine-{variant.replace(' ', '-')}"
        results.append(_evaluate(name, folder, values, args, math.nan, ("reg", "final"), refine=mode))
    return results


def _evaluate(
    label: str,
    run: Path,
    overrides: Mapping[str, Any],
    args: argparse.Namespace,
    train_seconds: float,
    paths: Sequence[str],
    refine: str = "off",
) -> dict[str, Any]:
    """Score one checkpoint by ``evaluate.json`` (reused when newer than the checkpoint and run with the same
    settings, :func:`evaluation_key`); rows of ``refine``."""
    configs = [args.bundle / "configs" / "train.json", args.bundle / "configs" / "evaluate.json"]
    metrics, timing = run / "eval" / "metrics_per_case.csv", run / "eval_seconds.json"
    checkpoint = Path(str(overrides.get("validate#handlers#0#load_path", Path(overrides["ckpt_dir"]) / "model.pt")))
    key = evaluation_key(overrides)
    stored = json.loads(timing.read_text()) if timing.is_file() else {}
    fresh = metrics.is_file() and metrics.stat().st_mtime > checkpoint.stat().st_mtime
    if fresh and stored.get("key") == key:
        print(f"{label}: reusing {metrics}", flush=True)
        seconds = stored["seconds"]
    else:
        print(f"evaluating {label} ...", flush=True)
        overrides = {**overrides, "output_dir": str(run / "eval")}
        seconds = _bundle_run(configs, overrides, run / "eval.log", args.threads)
        timing.write_text(json.dumps({"seconds": seconds, "key": key}))
    rows = [
        {**r, "method": label}
        for r in _read_csv(run / "eval" / "metrics_per_case.csv")
        if r["path"] in paths and r["structure"] in STRUCTURE_NAMES and r.get("refine", "off") == refine
    ]
    ddf = [
        {**r, "method": label}
        for r in _read_csv(run / "eval" / "ddf_quality.csv")
        if "reg" in paths and r.get("refine", "off") == refine
    ]
    result = {"rows": rows, "ddf": ddf, "train_seconds": train_seconds, "eval_seconds": seconds}
    if refine != "off":
        result["registration_seconds_per_pair"] = float(np.mean([float(r["refine_seconds"]) for r in ddf]))
    return result


def evaluation_key(overrides: Mapping[str, Any]) -> str:
    """What an evaluation ran: its config overrides and, when it refines, the library's settings of that mode (an
    evaluation cached under an older refinement default is stale)."""
    from prostate_jrs.refine import refine_settings

    mode = overrides.get("refine#mode", "off")
    resolved = refine_settings(mode, overrides.get("refine#settings")) if mode != "off" else None
    return json.dumps({"overrides": dict(overrides), "refine": repr(resolved)}, sort_keys=True, default=str)


def run_baseline(method: str, data: Path, tiny: bool, margin_mm: float, threads: int, runs: Path) -> dict[str, Any]:
    """Score ``identity``, ``rigid`` or ``elastix`` on every test pair (kept in ``runs/METHOD/scores.json``, reused)."""
    cache = runs / method / "scores.json"
    if cache.is_file():
        print(f"{method}: reusing {cache}", flush=True)
        return json.loads(cache.read_text())
    from prostate_jrs.baselines import ElastixSettings, score_baseline
    from prostate_jrs.transforms import load_datalist

    settings = replace(ElastixSettings.tiny() if tiny else ElastixSettings(), threads=threads)
    rows: list[dict[str, Any]] = []
    ddf: list[dict[str, Any]] = []
    seconds: list[float] = []
    for item in load_datalist(str(data), ["test"], "datalist.json", require_fixed_label=True):
        print(f"{method}: {Path(item['fixed_image']).name}", flush=True)
        score = score_baseline(item, method, margin_mm=margin_mm, settings=settings)
        rows += [{**r, "method": method} for r in score.rows]
        ddf.append({**score.ddf_row, "method": method})
        seconds.append(score.seconds)
    result = {"rows": rows, "ddf": ddf, "registration_seconds_per_pair": float(np.mean(seconds)) if seconds else 0.0}
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(result, default=float))
    return result


def _by_case(
    rows: Sequence[Mapping[str, Any]], method: str, path: str, structure: str, metric: str
) -> dict[str, float]:
    """``metric`` of one method, path and structure per case (in row order)."""
    return {
        str(r["case"]): float(r[metric])
        for r in rows
        if r["method"] == method and r["path"] == path and r["structure"] == structure
    }


def _values(rows: Sequence[Mapping[str, Any]], method: str, path: str, structure: str, metric: str) -> np.ndarray:
    return np.array(list(_by_case(rows, method, path, structure, metric).values()), dtype=np.float64)


def _fmt(values: np.ndarray, digits: int) -> str:
    values = values[~np.isnan(values)]
    if values.size == 0:
        return "n/a"
    return f"{values.mean():.{digits}f} ± {values.std():.{digits}f}"


def _column(rows: Sequence[Mapping[str, Any]], key: str, scale: float = 1.0, digits: int = 2) -> str:
    return _fmt(np.array([float(r.get(key, math.nan)) for r in rows], dtype=np.float64) * scale, digits)


def case_means(rows: Sequence[Mapping[str, Any]], method: str, path: str, metric: str = "dsc") -> dict[str, float]:
    """Mean of ``metric`` over the four structures per case (NaN structures left out)."""
    by_case: dict[str, list[float]] = {}
    for r in rows:
        if r["method"] == method and r["path"] == path:
            value = float(r[metric])
            if not math.isnan(value):
                by_case.setdefault(str(r["case"]), []).append(value)
    return {case: float(np.mean(v)) for case, v in by_case.items()}


def method_paths(rows: Sequence[Mapping[str, Any]]) -> list[tuple[str, str]]:
    """(method, path) pairs in first-seen order."""
    seen: dict[tuple[str, str], None] = {}
    for r in rows:
        seen.setdefault((str(r["method"]), str(r["path"])), None)
    return list(seen)


def wilcoxon_against(rows: Sequence[Mapping[str, Any]], baseline: str, networks: Sequence[str]) -> dict[str, Any]:
    """Paired two-sided Wilcoxon signed-rank test, per-case mean DSC, of the best network path against ``baseline``.

    Returns:
        The best (network, path), its and the baseline's mean, the number of pairs and the p-value, plus the p-value
        per structure; empty if the baseline or networks are absent.
    """
    from scipy.stats import wilcoxon

    candidates = [(m, p) for m, p in method_paths(rows) if m in networks]
    base = case_means(rows, baseline, "reg")
    if not candidates or not base:
        return {}
    best = max(candidates, key=lambda mp: np.mean(list(case_means(rows, *mp).values())))
    ours = case_means(rows, *best)
    cases = sorted(set(ours) & set(base))
    a, b = np.array([ours[c] for c in cases]), np.array([base[c] for c in cases])
    result: dict[str, Any] = {
        "best": f"{best[0]} ({best[1]} path)",
        "baseline": baseline,
        "n_pairs": len(cases),
        "best_mean_dsc": float(a.mean()),
        "baseline_mean_dsc": float(b.mean()),
        "p_value": float(wilcoxon(a, b).pvalue) if len(cases) > 1 and np.any(a != b) else math.nan,
        "per_structure_p": {},
        "per_structure_mean_dsc": {},
    }
    for structure in STRUCTURE_NAMES:
        x, y = _values(rows, *best, structure, "dsc"), _values(rows, baseline, "reg", structure, "dsc")
        ok = len(x) == len(y) and len(x) > 1 and np.any(x != y)
        result["per_structure_p"][structure] = float(wilcoxon(x, y).pvalue) if ok else math.nan
        result["per_structure_mean_dsc"][structure] = (float(np.mean(x)), float(np.mean(y)))
    return result


def structure_tests(
    rows: Sequence[Mapping[str, Any]], methods: Sequence[tuple[str, str]], baseline: str = "elastix"
) -> list[dict[str, Any]]:
    """Paired two-sided Wilcoxon signed-rank tests per structure of each (method, path) against ``baseline``'s
    registration path, on MSD and DSC, over the cases both have."""
    from scipy.stats import wilcoxon

    tests = []
    for method, path in methods:
        for structure in STRUCTURE_NAMES:
            row: dict[str, Any] = {"method": method, "path": path, "structure": structure, "baseline": baseline}
            for metric in ("msd_mm", "dsc"):
                ours = _by_case(rows, method, path, structure, metric)
                base = _by_case(rows, baseline, "reg", structure, metric)
                cases = sorted(c for c in set(ours) & set(base) if np.isfinite(ours[c]) and np.isfinite(base[c]))
                a, b = np.array([ours[c] for c in cases]), np.array([base[c] for c in cases])
                ok = len(cases) > 1 and bool(np.any(a != b))
                row[metric] = {
                    "mean": float(a.mean()) if cases else math.nan,
                    "baseline_mean": float(b.mean()) if cases else math.nan,
                    "n": len(cases),
                    "p_value": float(wilcoxon(a, b).pvalue) if ok else math.nan,
                }
            tests.append(row)
    return tests


def structure_table(tests: Sequence[Mapping[str, Any]]) -> str:
    """Markdown table of :func:`structure_tests`."""
    if not tests:
        return ""
    lines = [
        f"**Against {tests[0]['baseline']}**, per structure, paired two-sided Wilcoxon signed-rank over the test "
        "pairs (MSD: lower is better; over the pairs where both contours exist)",
        "",
        "| method | path | structure | pairs | MSD (mm) | MSD baseline | p | DSC | DSC baseline | p |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for t in tests:
        msd, dsc = t["msd_mm"], t["dsc"]
        lines.append(
            f"| {t['method']} | {t['path']} | {SHORT[t['structure']]} | {dsc['n']} | {msd['mean']:.2f} | "
            f"{msd['baseline_mean']:.2f} | {msd['p_value']:.3g} | {dsc['mean']:.3f} | {dsc['baseline_mean']:.3f} | "
            f"{dsc['p_value']:.3g} |"
        )
    return "\n".join(lines) + "\n"


def markdown(
    rows: Sequence[Mapping[str, Any]],
    ddf: Sequence[Mapping[str, Any]],
    timings: Mapping[str, Mapping[str, float]],
    tests: Sequence[Mapping[str, Any]],
) -> str:
    """The report's tables, then one sentence per Wilcoxon test in ``tests``."""
    lines: list[str] = []
    heads = [SHORT[s] for s in STRUCTURE_NAMES]
    for metric, title, digits in (("dsc", "DSC", 3), ("msd_mm", "MSD (mm)", 2), ("hd95_mm", "HD95 (mm)", 2)):
        lines += [f"**{title}**, mean ± SD over the test pairs", ""]
        extra = " train (min) |" if metric == "dsc" else ""
        lines.append("| method | path | " + " | ".join(heads) + " | mean |" + extra)
        lines.append("|---" * (len(heads) + 3 + (1 if extra else 0)) + "|")
        for method, path in method_paths(rows):
            cells = [_fmt(_values(rows, method, path, s, metric), digits) for s in STRUCTURE_NAMES]
            means = np.array(list(case_means(rows, method, path, metric).values()))
            row = f"| {method} | {path} | " + " | ".join(cells) + f" | {_fmt(means, digits)} |"
            if extra:
                minutes = timings.get(method, {}).get("train_seconds", math.nan) / 60.0
                row += f" {'' if math.isnan(minutes) else f'{minutes:.0f}'} |"
            lines.append(row)
        lines.append("")
    lines += [
        "**DDF**, mean ± SD over the test pairs: folding and, against the phantom's known deformation, the "
        "error of the planning point each daily voxel is mapped to (inside the body, within the crop)",
        "",
        "| method | det J <= 0 (%) | SD of det J | error mean (mm) | error p95 (mm) | registration (s/pair) |",
        "|---|---|---|---|---|---|",
    ]
    for method in dict.fromkeys(str(r["method"]) for r in ddf):
        mine = [r for r in ddf if r["method"] == method]
        seconds = timings.get(method, {}).get("registration_seconds_per_pair")
        lines.append(
            f"| {method} | {_column(mine, 'folding_fraction', 100.0, 3)} | {_column(mine, 'jacobian_std', digits=3)} | "
            f"{_column(mine, 'ddf_error_mean_mm')} | {_column(mine, 'ddf_error_p95_mm')} | "
            f"{'' if seconds is None else f'{seconds:.1f}'} |"
        )
    lines.append("")
    for test in tests:
        per = ", ".join(
            f"{SHORT[s]} {test['per_structure_mean_dsc'][s][0]:.3f} vs {test['per_structure_mean_dsc'][s][1]:.3f}, "
            f"p = {p:.3g}"
            for s, p in test["per_structure_p"].items()
        )
        lines.append(
            f"Wilcoxon signed-rank (paired, two-sided, per-case mean DSC over the four structures, n = "
            f"{test['n_pairs']}): {test['best']} {test['best_mean_dsc']:.3f} vs {test['baseline']} "
            f"{test['baseline_mean_dsc']:.3f}, p = {test['p_value']:.3g}; per structure: {per}."
        )
    return "\n".join(lines)


def box_plots(rows: Sequence[Mapping[str, Any]], metric: str, label: str, path: Path) -> None:
    """One panel per structure, one box per method and path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pairs = method_paths(rows)
    fig, axes = plt.subplots(1, 4, figsize=(4 * 4, 4.5), sharey=metric == "dsc")
    for ax, structure in zip(axes, STRUCTURE_NAMES, strict=True):
        data = [_values(rows, m, p, structure, metric) for m, p in pairs]
        data = [d[~np.isnan(d)] for d in data]
        ax.boxplot(data, showmeans=True)
        names = [f"{m}\n({p})" for m, p in pairs]
        # long method names end at their tick instead of running under the neighbouring panels
        ax.set_xticks(range(1, len(pairs) + 1), names, rotation=60, ha="right", rotation_mode="anchor", fontsize=7)
        ax.set_title(SHORT[structure])
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel(label)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the study; returns 0."""
    args = _parse(sys.argv[1:] if argv is None else argv)
    if args.tiny:
        args.patients, args.fractions, args.spacing, args.epochs = 3, 1, 4.0, 1
    data = ensure_dataset(args)
    common: dict[str, Any] = {
        "bundle_root": str(args.bundle),
        "dataset_dir": str(data),
        "num_workers": 0,
        "show_progress": False,
        **(TINY_TRAINING if args.tiny else {}),
    }
    # the elastix crop is the network's input box: output margin plus the network's context border
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(args.bundle / "configs" / "train.json"))
    parser.update({k: v for k, v in common.items() if k in ("model_spacing", "crop_margin_mm")})
    margin_mm = float(parser.get_parsed_content("crop_margin_mm")) + float(
        parser.get_parsed_content("context_voxels")
    ) * float(parser.get_parsed_content("model_spacing"))

    rows: list[dict[str, Any]] = []
    ddf: list[dict[str, Any]] = []
    timings: dict[str, dict[str, float]] = {}
    for method in ("identity", "rigid", *(() if args.no_elastix else ("elastix",))):
        result = run_baseline(method, data, args.tiny, margin_mm, args.threads, args.runs)
        rows += result["rows"]
        ddf += result["ddf"]
        timings[method] = {"registration_seconds_per_pair": result["registration_seconds_per_pair"]}
    for name in args.networks:
        result = run_network(name, args, common)
        rows += result["rows"]
        ddf += result["ddf"]
        timings[name] = {"train_seconds": result["train_seconds"], "eval_seconds": result["eval_seconds"]}
    refined: list[dict[str, Any]] = []
    if args.shipped and not args.tiny:
        shipped = {**common, "ckpt_dir": str(args.bundle / "models")}
        result = _evaluate(
            SHIPPED, args.runs / "shipped", {**shipped, "refine#mode": "off"}, args, math.nan, ("reg", "seg")
        )
        rows += result["rows"]
        ddf += result["ddf"]
        timings[SHIPPED] = {"eval_seconds": result["eval_seconds"]}
        refined = run_refined(SHIPPED, args.runs / "shipped", shipped, args)
    elif args.tiny and args.networks:
        name = args.networks[0]
        models = args.runs / name / "models"
        load = {"ckpt_dir": str(models), "validate#handlers#0#load_path": str(models / "model_final.pt")}
        refined = run_refined(name, args.runs / name, {**common, "network_name": name, **load}, args)
    for variant, result in zip(args.refine, refined, strict=False):
        label = result["rows"][0]["method"] if result["rows"] else variant
        rows += result["rows"]
        ddf += result["ddf"]
        timings[label] = {
            "eval_seconds": result["eval_seconds"],
            "registration_seconds_per_pair": result["registration_seconds_per_pair"],
        }

    # the equally trained networks are ranked among themselves; the shipped model (more steps) is tested on its own
    test = wilcoxon_against(rows, "elastix", args.networks) if not args.no_elastix else {}
    shipped = {str(r["method"]) for r in rows} - {*args.networks, "identity", "elastix"}
    shipped_test = wilcoxon_against(rows, "elastix", sorted(shipped)) if shipped and not args.no_elastix else {}
    table = markdown(rows, ddf, timings, [t for t in (test, shipped_test) if t])
    compared = [(m, p) for m, p in method_paths(rows) if " + refine " in m and p == "final"]
    compared += [(m, "reg") for m in (SHIPPED,) if any(r["method"] == m for r in rows)]
    per_structure = structure_tests(rows, compared) if not args.no_elastix else []
    table += "\n\n" + structure_table(per_structure)
    args.out.mkdir(parents=True, exist_ok=True)
    columns = ["method", "case", "patient", "path", "structure", "dsc", "msd_mm", "hd95_mm"]
    with (args.out / "per_case.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    budget = {
        "epochs": args.epochs,
        "dataset": {"patients": args.patients, "fractions": args.fractions, "seed": args.seed, "spacing": args.spacing},
        "bundle_overrides": {k: v for k, v in common.items() if k not in ("bundle_root", "dataset_dir")},
        "elastix_margin_mm": margin_mm,
    }
    hardware = {**hardware_info(), "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    report = {
        "budget": budget,
        "timings": timings,
        "wilcoxon": test,
        "wilcoxon_shipped": shipped_test,
        "against_elastix_per_structure": per_structure,
        "hardware": hardware,
        "command": sys.argv,
    }
    (args.out / "accuracy.json").write_text(json.dumps(report, indent=2, default=float))
    header = (
        f"Test split of `{data}` ({len({r['case'] for r in rows})} pairs); every network trained for {args.epochs} "
        f"epochs by bundle/configs/train.json; hardware: {hardware['cpu_model']}, {hardware['usable_cores']} cores, "
        f"GPU: {hardware['gpu'] or 'none'}.\n\n"
    )
    (args.out / "accuracy.md").write_text(header + table + "\n")
    box_plots(rows, "dsc", "DSC", args.out / "accuracy_dsc.png")
    box_plots(rows, "hd95_mm", "HD95 (mm)", args.out / "accuracy_hd95.png")
    print(header + table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
