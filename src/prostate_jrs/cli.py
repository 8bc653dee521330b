"""The ``prostate-jrs`` command.

Subcommands:

* ``synth OUT --patients N --fractions F --seed S [--spacing MM] [--preview]``: synthetic dataset
  (NIfTI + ``datalist.json``), see :mod:`prostate_jrs.phantom`. With ``--sites K``: one dataset folder per
  site, ``OUT/site-1`` ... ``OUT/site-K``, each from another hospital profile (:mod:`prostate_jrs.phantom.sites`),
  the layout of ``federated/job.py --dataset-root OUT``.

Each subcommand is a ``_add_<name>`` function that declares its arguments and a ``_run_<name>`` function
that does the work; :func:`build_parser` registers them. ``synth --dicom`` also writes ``OUT/dicom/<patient>_f<NN>/``
(planning CT + planning RTSTRUCT + daily CT per session, :mod:`prostate_jrs.phantom.dicom_export`). Planned: ``demo``.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from prostate_jrs.phantom import PhantomConfig

__all__ = ["build_parser", "main"]


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number of mm, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of mm, got {value}")
    return value


def _add_synth(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "synth",
        help="write a synthetic pelvis dataset (NIfTI + datalist.json)",
        description=(
            "Generate synthetic male-pelvis CT patients (planning scan + daily scans with known deformation) "
            "and write NIfTI images, label maps, ground-truth DDFs and a MONAI datalist.json split by patient."
        ),
    )
    parser.add_argument("out", metavar="OUT", help="output folder (must not exist, or be empty)")
    parser.add_argument("--patients", type=_positive_int, required=True, metavar="N", help="number of patients")
    parser.add_argument("--fractions", type=_positive_int, required=True, metavar="F", help="daily scans per patient")
    parser.add_argument("--seed", type=_non_negative_int, required=True, metavar="S", help="random seed")
    parser.add_argument(
        "--spacing",
        type=_positive_float,
        nargs="+",
        metavar="MM",
        help="voxel size in mm: one value (isotropic) or three (x y z); default 0.977 0.977 3 (clinical)",
    )
    parser.add_argument(
        "--preset",
        choices=("clinical", "tiny"),
        default="clinical",
        help="clinical: 512x512, 90 slices of 3 mm (default); tiny: 4 mm voxels, a few seconds per patient",
    )
    parser.add_argument(
        "--sites",
        type=_positive_int,
        default=None,
        metavar="K",
        help=(
            "write OUT/site-1 ... OUT/site-K, one dataset per hospital, for federated learning: N patients each, "
            "scanner and population profiles alternating institute-a / institute-b (HU offset, noise, sharpness, "
            "field of view, body size, bladder filling)"
        ),
    )
    parser.add_argument("--preview", action="store_true", help="also write <patient>_preview.png")
    parser.add_argument(
        "--dicom",
        action="store_true",
        help=(
            "also write OUT/dicom/<patient>_f<NN>/ per session: planning CT series, planning RTSTRUCT and daily CT "
            "series (own study and frame of reference), ready for `python app -i`; OUT/dicom/sessions.json links "
            "each session to its ground truth in the NIfTI dataset"
        ),
    )
    parser.set_defaults(run=_run_synth)
    return parser


def _run_synth_sites(args: argparse.Namespace, config: PhantomConfig) -> int:
    """``synth --sites K``: one dataset per site under OUT (federated learning layout)."""
    from prostate_jrs.phantom.sites import INSTITUTES, write_multisite_dataset

    if getattr(args, "dicom", False):
        raise ValueError("--dicom is not available with --sites yet; write the sites without it")
    names = ", ".join(f"site-{k + 1}={INSTITUTES[k % len(INSTITUTES)].name}" for k in range(args.sites))
    print(f"synth: {args.sites} sites ({names}) x {args.patients} patients x {args.fractions} fractions -> {args.out}")
    start = time.perf_counter()
    datalists = write_multisite_dataset(
        args.out, args.sites, args.patients, args.fractions, args.seed, config=config, preview=args.preview,
        progress=lambda message: print(f"  {message} ({time.perf_counter() - start:.1f} s)", flush=True),
    )  # fmt: skip
    for datalist in datalists:
        print(f"wrote {datalist}")
    return 0


def _run_synth(args: argparse.Namespace) -> int:
    from prostate_jrs.phantom import PhantomConfig, write_dataset

    config = PhantomConfig.tiny() if args.preset == "tiny" else PhantomConfig()
    if args.spacing is not None:
        if len(args.spacing) not in (1, 3):
            raise ValueError(f"--spacing takes one or three values, got {len(args.spacing)}")
        config = config.with_spacing(args.spacing)
    if args.sites is not None:
        return _run_synth_sites(args, config)
    size = "x".join(str(n) for n in config.size)
    spacing = " x ".join(f"{s:g}" for s in config.spacing)
    print(f"synth: {args.patients} patients x {args.fractions} fractions, grid {size} of {spacing} mm -> {args.out}")
    start = time.perf_counter()
    datalist = write_dataset(
        args.out, args.patients, args.fractions, args.seed, config=config, preview=args.preview,
        progress=lambda message: print(f"  {message} ({time.perf_counter() - start:.1f} s)", flush=True),
    )  # fmt: skip
    if args.dicom:
        from prostate_jrs.phantom.dicom_export import export_dicom_sessions

        try:
            sessions = export_dicom_sessions(
                datalist.parent,
                progress=lambda message: print(f"  {message} ({time.perf_counter() - start:.1f} s)", flush=True),
            )
        except BaseException:
            # the command's output appears complete or not at all: without its DICOM part, drop the dataset too
            shutil.rmtree(datalist.parent, ignore_errors=True)
            raise
        print(f"wrote {sessions}")
    print(f"wrote {datalist}")
    return 0


# Subcommands in help order; `demo` is added here when it exists.
_SUBCOMMANDS: tuple[Callable[[argparse._SubParsersAction], argparse.ArgumentParser], ...] = (_add_synth,)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    parser = argparse.ArgumentParser(
        prog="prostate-jrs",
        description="Joint registration and segmentation for prostate adaptive radiotherapy.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in _SUBCOMMANDS:
        add(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``prostate-jrs`` console script; returns the exit status.

    Errors a user can fix (bad arguments, an existing output folder) print one line and return 2.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.run(args))
    except (ValueError, FileExistsError) as err:
        print(f"prostate-jrs {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
