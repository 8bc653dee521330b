"""Peak memory of the MONAI Deploy app on a clinical-size daily CT (512 x 512 x 300 by default).

Study: one synthetic patient (``prostate_jrs.phantom``, one seed) on a grid of ``--shape`` voxels of ``--spacing``
mm (default 512 x 512 x 300 at 0.977 x 0.977 x 1 mm: a 500 mm field of view, a 300 mm scan), planning and daily CT
alike, exported as a DICOM session as ``prostate-jrs synth --dicom`` writes it (planning CT + planning RTSTRUCT +
daily CT). The app then runs on it exactly as users run it, ``python app -i SESSION -o OUT -m BUNDLE``, in a child
process of this script; its peak resident set size (``ru_maxrss`` of the child, the whole run: imports, DICOM
reading, pipeline, writers) is the figure. The session is generated before the child starts and is not counted.

Usage::

    python benchmarks/memory.py [--shape 512 512 300] [--spacing 0.977 0.977 1.0] [--bundle bundle]
                                [--data DIR] [--out benchmarks/results/memory] [--seed 0] [--threads 2]

Writes ``memory.json`` and ``memory.md`` to ``--out`` and prints the table. Run it alone on the machine: other
processes do not change the peak, but a machine short of memory swaps and the wall time means nothing then.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def make_session(folder: Path, shape: Sequence[int], spacing: Sequence[float], seed: int) -> dict[str, Any]:
    """Write (or reuse) one patient with one fraction on ``shape`` voxels of ``spacing`` mm; the session and sizes."""
    from prostate_jrs.phantom import PhantomConfig, write_dataset
    from prostate_jrs.phantom.dicom_export import export_dicom_sessions

    fov = tuple(n * s for n, s in zip(shape, spacing, strict=True))
    config = dataclasses.replace(PhantomConfig(), spacing=tuple(spacing), fov=fov)
    manifest = folder / "dicom" / "sessions.json"
    start = time.perf_counter()
    if not manifest.is_file():
        write_dataset(folder, n_patients=1, n_fractions=1, seed=seed, config=config)
        export_dicom_sessions(folder)
    record = json.loads(manifest.read_text())["sessions"][0]
    session = folder / record["folder"]
    files = list(session.glob("*.dcm"))
    return {
        "session": str(session),
        "planning_size": list(config.size),
        "spacing_mm": list(spacing),
        "fov_mm": [round(f, 1) for f in fov],
        "files": len(files),
        "session_mib": round(sum(p.stat().st_size for p in files) / 2**20, 1),
        "generation_s": round(time.perf_counter() - start, 1),
    }


def run_app(session: str, bundle: Path, out: Path, threads: int) -> dict[str, Any]:
    """``python app -i session -o out -m bundle`` as a child; its exit status, wall time and peak RSS (MiB)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, str(REPO / "app"), "-i", session, "-o", str(out), "-m", str(bundle)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    seconds = time.perf_counter() - start
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if result.returncode != 0:
        raise RuntimeError(f"the app failed ({result.returncode}): {result.stderr[-2000:]}")
    if peak_kib <= before:
        raise RuntimeError("the app's peak RSS did not rise above an earlier child's; run the benchmark alone")
    qa = json.loads((out / "qa.json").read_text())
    return {
        "exit_status": result.returncode,
        "wall_s": round(seconds, 1),
        "peak_rss_mib": round(peak_kib / 1024, 1),
        "timings_s": qa.get("timings_s", {}),
    }


def markdown(study: dict[str, Any], run: dict[str, Any]) -> str:
    """The result as a Markdown table."""
    size = " x ".join(map(str, study["planning_size"]))
    ct_mib = study["planning_size"][0] * study["planning_size"][1] * study["planning_size"][2] * 2 / 2**20
    return "\n".join(
        [
            "| CT (voxels) | voxel (mm) | one CT as int16 | DICOM session | app peak RSS | app wall time |",
            "|---|---|---|---|---|---|",
            f"| {size} | {' x '.join(f'{s:g}' for s in study['spacing_mm'])} | {ct_mib:.0f} MiB | "
            f"{study['files']} files, {study['session_mib']} MiB | **{run['peak_rss_mib']:.0f} MiB** | "
            f"{run['wall_s']} s |",
        ]
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Generate (or reuse) the session, run the app on it, write and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", type=int, nargs=3, default=[512, 512, 300], help="CT size in voxels (x y z)")
    parser.add_argument("--spacing", type=float, nargs=3, default=[0.977, 0.977, 1.0], help="voxel size (mm)")
    parser.add_argument("--bundle", type=Path, default=REPO / "bundle", help="the bundle the app runs")
    parser.add_argument("--data", type=Path, default=Path("/tmp/prostate_jrs_memory"), help="session cache")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "memory", help="results")
    parser.add_argument("--seed", type=int, default=0, help="phantom seed")
    parser.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS of the app")
    args = parser.parse_args(argv)
    tag = "x".join(map(str, args.shape)) + "_" + "x".join(f"{s:g}" for s in args.spacing) + f"_seed{args.seed}"
    study = make_session(args.data / tag, args.shape, args.spacing, args.seed)
    app_out = args.data / f"{tag}_app_out"
    for stale in app_out.glob("*") if app_out.is_dir() else []:
        stale.unlink()
    run = run_app(study["session"], args.bundle, app_out, args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "memory.json").write_text(json.dumps({"study": study, "app": run}, indent=2) + "\n")
    table = markdown(study, run)
    (args.out / "memory.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
