"""Speed and memory of ``prostate-jrs import`` on a synthetic hospital archive, with 1 and more worker processes.

Study: ``prostate-jrs synth D --patients N --fractions F --seed S --dicom archive`` (clinical voxels by default:
512 x 512 slices of 0.977 mm, 3 mm apart, 90 slices; ``--spacing`` for another grid): per patient a planning CT,
RTSTRUCT and RTPLAN and ``F`` daily CTs with approved daily RTSTRUCTs (the last patient's last without), plus a stray
series of another patient, a duplicate export and a non-DICOM file. Every run imports the whole archive into a new
dataset folder, in a child process forked for it (:func:`prostate_jrs.timing.run_forked`); then a second run over the
same dataset, which must find nothing to do (``resume``).

Reported per number of workers: wall time of the import (scanning the headers included), patients and daily scans
per minute, the header scan alone (``scan``, once, before the imports), the median seconds per patient inside its
worker, and the peak resident set size: of the importing process and, with workers, of the largest worker
(``ru_maxrss`` of the children), in MiB. Threads: SimpleITK uses all cores with one worker and cores / workers each
with more. No GPU is involved.

Usage::

    python benchmarks/import_speed.py [--patients 4] [--fractions 3] [--seed 0] [--spacing MM] [--workers 1 2]
                                      [--data DIR] [--out benchmarks/results/import_speed] [--tiny]

Prints a Markdown table and writes ``OUT/import_speed.md`` and ``OUT/import_speed.json`` (every measurement, the
hardware and the software versions). ``--data DIR`` keeps the generated archive and reuses it next time (the clinical
one takes minutes to make). ``--tiny``: 2 patients x 1 fraction of the 4 mm test preset, to check the script in CI;
its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from prostate_jrs.timing import hardware_info, peak_rss_mib, run_forked, software_versions

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "import_speed"


def _archive(data: Path, args: argparse.Namespace) -> Path:
    """The synthetic archive (``data/dicom``), generated unless ``data`` already holds one made the same way."""
    from prostate_jrs.cli import main

    recipe = {k: getattr(args, k) for k in ("patients", "fractions", "seed", "spacing", "tiny")}
    marker = data / "import_speed_recipe.json"
    if marker.is_file() and json.loads(marker.read_text()) == recipe:
        return data / "dicom"
    shutil.rmtree(data, ignore_errors=True)
    argv = ["synth", str(data), "--patients", str(args.patients), "--fractions", str(args.fractions)]
    argv += ["--seed", str(args.seed), "--dicom", "archive"]
    if args.tiny:
        argv += ["--preset", "tiny"]
    elif args.spacing is not None:
        argv += ["--spacing", str(args.spacing)]
    if main(argv) != 0:
        raise RuntimeError(f"prostate-jrs {' '.join(argv)} failed")
    marker.write_text(json.dumps(recipe))
    return data / "dicom"


def _scan(root: Path) -> dict[str, Any]:
    from prostate_jrs.datasets.archive import patient_inventories, scan_archive

    start = time.perf_counter()
    inventory = scan_archive(root)
    files = sum(len(s.files) for s in inventory.series.values()) + len(inventory.structure_sets)
    return {
        "scan_s": time.perf_counter() - start,
        "files": files,
        "patients_in_archive": len(patient_inventories(inventory)),
    }


def _import(root: Path, out: Path, workers: int) -> dict[str, Any]:
    """One import in this (forked) process: wall time, counts and peak memory."""
    from prostate_jrs.datasets.importer import import_archive

    rss_start = peak_rss_mib()
    start = time.perf_counter()
    result = import_archive(root, out, workers=workers, show_progress=False)
    seconds = time.perf_counter() - start
    imported = [r for r in result.reports if r.status == "imported" and not r.resumed]
    return {
        "seconds": seconds,
        "patients": len(imported),
        "daily_scans": sum(1 for r in imported for i in r.items if i.status != "skipped"),
        "patient_s_median": statistics.median(r.seconds for r in imported) if imported else None,
        "resumed": sum(r.resumed for r in result.reports),
        "peak_rss_mib": peak_rss_mib(),
        "peak_rss_growth_mib": peak_rss_mib() - rss_start,
        "worker_peak_rss_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024.0 if workers > 1 else None,
    }


def measure(root: Path, workers: Sequence[int], scratch: Path) -> list[dict[str, Any]]:
    """Import ``root`` once per worker count (and resume once), each in a forked child."""
    rows = []
    for count in workers:
        out = scratch / f"dataset_{count}"
        first = run_forked(_import, root, out, count)
        again = run_forked(_import, root, out, count)
        minutes = first["seconds"] / 60.0
        rows.append(
            {
                "workers": count,
                **first,
                "patients_per_min": first["patients"] / minutes,
                "scans_per_min": first["daily_scans"] / minutes,
                "resume_s": again["seconds"],
                "resume_patients_imported": again["patients"],
            }
        )
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(out.with_name(f"{out.name}-private"), ignore_errors=True)
    return rows


def _fmt(value: Any, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def table(rows: list[dict[str, Any]], scan: dict[str, Any], grid: str) -> str:
    """The Markdown table of the measurements."""
    lines = [
        f"Import of a synthetic archive ({grid}; {scan['patients_in_archive']} patients in the archive with the stray "
        f"series, {scan['files']} DICOM files; header scan {scan['scan_s']:.1f} s)",
        "",
        "| workers | patients | daily scans | wall (s) | patients / min | scans / min | s / patient (median) "
        "| peak RSS (MiB) | worker peak RSS (MiB) | re-run (s) | re-run imports |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['workers']} | {r['patients']} | {r['daily_scans']} | {_fmt(r['seconds'])} | "
            f"{_fmt(r['patients_per_min'], 2)} | {_fmt(r['scans_per_min'], 2)} | {_fmt(r['patient_s_median'])} | "
            f"{_fmt(r['peak_rss_mib'], 0)} | {_fmt(r['worker_peak_rss_mib'], 0)} | {_fmt(r['resume_s'])} | "
            f"{r['resume_patients_imported']} |"
        )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--patients", type=int, default=4)
    parser.add_argument("--fractions", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--spacing", type=float, default=None, help="isotropic voxel size (mm); default clinical")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--data", type=Path, default=None, help="keep (and reuse) the synthetic archive here")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--tiny", action="store_true", help="2 patients x 1 fraction of the 4 mm test preset (CI)")
    args = parser.parse_args(argv)
    if args.tiny:
        args.patients, args.fractions = 2, 1
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="import_speed-") as tmp:
        scratch = Path(tmp)
        data = args.data or scratch / "synth"
        root = run_forked(_archive, data, args)  # the parent stays free of SimpleITK threads before forking
        grid = "tiny preset, 4 mm voxels" if args.tiny else f"{args.spacing} mm voxels" if args.spacing else "clinical"
        scan = run_forked(_scan, root)
        rows = measure(root, args.workers, scratch)
    text = table(rows, scan, f"{args.patients} patients x {args.fractions} fractions, {grid}")
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "import_speed.md").write_text(text + "\n")
    record = {
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "scan": scan,
        "runs": rows,
        "hardware": hardware_info(),
        "software": software_versions(),
    }
    (args.out / "import_speed.json").write_text(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
