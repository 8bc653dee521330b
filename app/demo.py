"""Demo: run the app on a synthetic DICOM session and score its RTSTRUCT against the phantom's ground truth.

Usage (from the repository root)::

    python app/demo.py [--data demo_out/data] [--out demo_out/app] [-m bundle] [--preset clinical|tiny]

Steps: ``prostate-jrs synth DATA --patients 1 --fractions 1 --seed 0 --dicom`` (skipped when DATA already holds a
DICOM export), then ``python app -i DATA/dicom/JRS001_f01 -o OUT -m BUNDLE`` exactly as a user runs it, then the
written ``rtstruct.dcm`` is read back onto the daily CT and compared with the ground-truth daily label map of the
NIfTI dataset (same voxel grid). Prints DSC and mean surface distance per structure and the time taken.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO / "demo_out" / "data", help="synthetic dataset folder")
    parser.add_argument("--out", type=Path, default=REPO / "demo_out" / "app", help="app output folder")
    parser.add_argument("-m", "--model", type=Path, default=REPO / "bundle", help="bundle folder")
    parser.add_argument("--preset", choices=("clinical", "tiny"), default="clinical", help="phantom size")
    parser.add_argument("--session", default="JRS001_f01", help="session folder under DATA/dicom")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the demo; returns the app's exit status."""
    args = _parse(sys.argv[1:] if argv is None else argv)
    if not (args.data / "dicom" / "sessions.json").is_file():
        synth = shutil.which("prostate-jrs", path=str(Path(sys.executable).parent)) or "prostate-jrs"
        command = [synth, "synth", str(args.data), "--patients", "1", "--fractions", "1", "--seed", "0", "--dicom"]
        command += ["--preset", args.preset]
        print("$", " ".join(command), flush=True)
        subprocess.run(command, check=True)
    session = args.data / "dicom" / args.session
    command = [sys.executable, str(REPO / "app"), "-i", str(session), "-o", str(args.out), "-m", str(args.model)]
    print("$", " ".join(command), flush=True)
    start = time.perf_counter()
    run = subprocess.run(command, env={**os.environ}, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if run.returncode != 0:
        print(run.stdout[-4000:], run.stderr[-4000:], sep="\n", file=sys.stderr)
        return run.returncode
    print("\n".join(line for line in run.stdout.splitlines() if not line.startswith("[")))

    # imports after the run: the scoring needs the library, not the app
    import numpy as np
    import SimpleITK as sitk

    from prostate_jrs.dicom.ct_reader import read_ct_series
    from prostate_jrs.dicom.rtstruct_reader import read_rtstruct
    from prostate_jrs.geometry import array_from_image
    from prostate_jrs.metrics import structure_metrics

    manifest = json.loads((args.data / "dicom" / "sessions.json").read_text())
    record = next(s for s in manifest["sessions"] if s["folder"] == f"dicom/{args.session}")
    import pydicom

    daily_files = [
        p
        for p in session.glob("*.dcm")
        if pydicom.dcmread(p, stop_before_pixels=True).get("SeriesInstanceUID") == record["uids"]["daily_ct_series"]
    ]
    daily = read_ct_series(daily_files)
    contours = read_rtstruct(args.out / "rtstruct.dcm", daily)
    truth = array_from_image(sitk.ReadImage(str(args.data / record["item"]["fixed_label"])))
    if truth.shape != contours.label_map.shape:
        raise SystemExit(f"ground truth {truth.shape} is not on the daily grid {contours.label_map.shape}")
    qa = json.loads((args.out / "qa.json").read_text())
    metrics = structure_metrics(contours.label_map, truth, daily.image.GetSpacing())
    print(f"\nRTSTRUCT read back vs phantom truth ({args.session}):")
    print(f"{'structure':<18}{'source':<8}{'DSC':>7}{'MSD mm':>9}")
    for name, values in metrics.items():
        source = qa["structures"][name]["source"]
        msd = "n/a" if np.isnan(values.msd_mm) else f"{values.msd_mm:.2f}"
        print(f"{name:<18}{source:<8}{values.dsc:>7.3f}{msd:>9}")
    stages = ", ".join(f"{k} {v:.1f}" for k, v in qa["timings_s"].items())
    print(f"\napp wall time {seconds:.1f} s (process start to outputs written); stages (s): {stages}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
