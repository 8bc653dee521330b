"""Federated (2 sites, FedAvg) against centralised training on the pooled data, for the same training budget.

The published network lost accuracy on a second institute's scans (docs/ARCHITECTURE.md, "A second
institute"). This study asks what federated training costs against pooling both institutes' data in one place
(which hospitals usually cannot do):

* data: ``prostate-jrs synth --sites 2`` (institute-a, institute-b profiles), or ``--dataset-root R``;
* federated: ``federated/job.py --env sim`` with ``--rounds K --local-epochs E`` (each site trains K x E epochs
  over its own training split; FedAvg weights by iterations);
* centralised: the bundle's ``train.json`` for K x E epochs over the union of both training splits: the same
  number of gradient steps, the same bundle settings;
* both final models are evaluated with the bundle's ``evaluate.json`` on each site's test split (final contour
  path: mean DSC and MSD over the four structures), and timed (wall clock, this machine).

Usage::

    python benchmarks/federated.py [--patients 5] [--fractions 2] [--rounds 4] [--local-epochs 2]
                                   [--widths 8 16 32] [--dataset-root R] [--out DIR]

Prints a Markdown table and writes ``DIR/federated_vs_central.md`` and ``.json``. Tiny settings by default (4 mm
voxels, 56^3 patches) so it runs on a CPU in minutes; absolute accuracies at this budget are low and only the
comparison means something.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from prostate_jrs.tiny_bundle import TINY_TRAINING

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundle"
JOB = REPO / "federated" / "job.py"
#: Bundle settings for a CPU run (as tests/bundle/conftest.py), no validation inside training for both arms.
TINY: dict[str, Any] = {
    **{key: value for key, value in TINY_TRAINING.items() if key != "widths"},  # --widths chooses them
    "val_interval": 100000,
    "num_workers": 0,
    "cache_rate": 0.0,
    "show_progress": False,
}
STRUCTURES = ("prostate", "seminal_vesicles", "rectum", "bladder")


def _run(argv: Sequence[str], cwd: Path) -> float:
    """Run a command; return its wall time in seconds.

    Raises:
        RuntimeError: with the tail of its output if it fails.
    """
    start = time.perf_counter()
    result = subprocess.run(list(argv), capture_output=True, text=True, cwd=cwd, env={**os.environ})
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:4])} ... failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return time.perf_counter() - start


def _bundle_args(settings: Mapping[str, Any]) -> list[str]:
    return [arg for key, value in settings.items() for arg in (f"--{key}", json.dumps(value))]


def pool_datalists(sites: Mapping[str, Path], out: Path) -> Path:
    """A dataset folder whose datalist.json is the union of the sites' lists (absolute paths, no copies)."""
    pooled: dict[str, list[dict[str, Any]]] = {"training": [], "validation": [], "test": []}
    for folder in sites.values():
        data = json.loads((folder / "datalist.json").read_text())
        for part in pooled:
            for item in data.get(part, []):
                pooled[part].append(
                    {k: str(folder / v) if isinstance(v, str) and v.endswith(".nii.gz") else v for k, v in item.items()}
                )
    out.mkdir(parents=True, exist_ok=True)
    (out / "datalist.json").write_text(json.dumps(pooled, indent=1))
    return out


def evaluate(checkpoint: Path, dataset: Path, work: Path, settings: Mapping[str, Any]) -> dict[str, float]:
    """Evaluate a bundle-format checkpoint on a dataset's test split; final-path mean DSC and MSD."""
    ckpt_dir = work / "ckpt"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy2(checkpoint, ckpt_dir / "model.pt")
    configs = f"['{BUNDLE}/configs/train.json','{BUNDLE}/configs/evaluate.json']"
    argv = [sys.executable, "-m", "monai.bundle", "run", "--config_file", configs, "--bundle_root", str(BUNDLE)]
    argv += ["--dataset_dir", str(dataset), "--ckpt_dir", str(ckpt_dir), "--output_dir", str(work / "eval")]
    _run([*argv, *_bundle_args(settings)], work)
    rows = list(csv.DictReader((work / "eval" / "metrics_summary.csv").open()))
    final = {(r["structure"], r["metric"]): float(r["mean"]) for r in rows if r["path"] == "final"}
    dsc = [final[(s, "dsc")] for s in STRUCTURES if (s, "dsc") in final]
    msd = [final[(s, "msd_mm")] for s in STRUCTURES if (s, "msd_mm") in final]
    return {"dsc": sum(dsc) / len(dsc), "msd_mm": sum(msd) / len(msd)}


def main(argv: Sequence[str] | None = None) -> int:
    """Run both arms and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset-root", type=Path, help="existing site folders (default: synthesise two)")
    parser.add_argument("--patients", type=int, default=5, help="patients per site when synthesising")
    parser.add_argument("--fractions", type=int, default=2, help="fractions per patient when synthesising")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--local-epochs", type=int, default=2)
    parser.add_argument("--widths", type=int, nargs=3, default=[8, 16, 32])
    parser.add_argument("--out", type=Path, default=Path("benchmark_out/federated"))
    args = parser.parse_args(argv)

    settings = {**TINY, "widths": list(args.widths)}
    work = Path(tempfile.mkdtemp(prefix="bench_fl_"))
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    try:
        root = args.dataset_root
        if root is None:
            from prostate_jrs.phantom import PhantomConfig, write_multisite_dataset

            root = work / "data"
            write_multisite_dataset(root, 2, args.patients, args.fractions, args.seed, config=PhantomConfig.tiny())
        root = root.resolve()
        sites = {p.name: p for p in sorted(root.iterdir()) if (p / "datalist.json").is_file()}

        # Federated arm.
        fl_argv = [sys.executable, str(JOB), "--env", "sim", "--dataset-root", str(root), "--rounds", str(args.rounds)]
        fl_argv += ["--local-epochs", str(args.local_epochs), "--workspace", str(work / "ws"), "--name", "bench"]
        fl_argv += ["--widths", *map(str, args.widths), "--no-cross-site", "--tracking", "none"]
        fl_argv += [arg for k, v in TINY.items() for arg in ("--bundle-override", f"{k}={json.dumps(v)}")]
        fl_seconds = _run(fl_argv, work)
        fl_final = next((work / "ws" / "bench").rglob("FL_global_model.pt"))
        fl_ckpt = work / "fl_model.pt"
        convert = [sys.executable, str(JOB), "--convert-model", str(fl_final), "--model-out", str(fl_ckpt)]
        _run([*convert, "--widths", *map(str, args.widths)], work)

        # Centralised arm: same epochs over the pooled training data = same number of iterations.
        pooled = pool_datalists(sites, work / "pooled")
        epochs = args.rounds * args.local_epochs
        central_argv = [sys.executable, "-m", "monai.bundle", "run"]
        central_argv += ["--config_file", str(BUNDLE / "configs/train.json"), "--bundle_root", str(BUNDLE)]
        central_argv += ["--dataset_dir", str(pooled), "--epochs", str(epochs)]
        central_argv += ["--ckpt_dir", str(work / "central_ckpt"), "--output_dir", str(work / "central_out")]
        central_seconds = _run([*central_argv, *_bundle_args(settings)], work)
        central_ckpt = work / "central_ckpt" / "model_final.pt"

        rows: list[dict[str, Any]] = []
        for arm, ckpt, seconds in (("federated", fl_ckpt, fl_seconds), ("centralised", central_ckpt, central_seconds)):
            for site, folder in sites.items():
                metrics = evaluate(ckpt, folder, work / f"eval_{arm}_{site}", settings)
                rows.append({"training": arm, "test site": site, **metrics, "train wall s": seconds})
    finally:
        shutil.rmtree(work, ignore_errors=True)

    header = "| training | test site | mean DSC (final) | mean MSD mm (final) | training wall s |"
    lines = [header, "|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['training']} | {r['test site']} | {r['dsc']:.3f} | {r['msd_mm']:.2f} | {r['train wall s']:.0f} |"
        )
    budget = (
        f"{len(sites)} sites, {args.patients} patients x {args.fractions} fractions each; {args.rounds} rounds x "
        f"{args.local_epochs} local epochs vs {args.rounds * args.local_epochs} pooled epochs; widths {args.widths}"
    )
    text = f"Federated vs centralised ({budget})\n\n" + "\n".join(lines)
    print(text)
    (out / "federated_vs_central.md").write_text(text + "\n")
    (out / "federated_vs_central.json").write_text(json.dumps({"setup": budget, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
