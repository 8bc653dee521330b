"""The ``prostate-jrs`` command.

Subcommands:

* ``synth OUT --patients N --fractions F --seed S [--spacing MM] [--preview] [--dicom [sessions|archive]]``:
  synthetic dataset (NIfTI + ``datalist.json``), see :mod:`prostate_jrs.phantom`. With ``--sites K``: one dataset
  folder per site, ``OUT/site-1`` ... ``OUT/site-K``, each from another hospital profile
  (:mod:`prostate_jrs.phantom.sites`), the layout of ``federated/job.py --dataset-root OUT``. ``--dicom`` also writes
  ``OUT/dicom/<patient>_f<NN>/`` (planning CT + planning RTSTRUCT + daily CT per session,
  :mod:`prostate_jrs.phantom.dicom_export`); ``--dicom archive`` writes ``OUT/dicom/`` as a hospital's archive export.
* ``import DICOM_ROOT OUT [--synonyms FILE] [--validation-fraction F] [--test-fraction F] [--seed S] [--workers N]``:
  a hospital's DICOM archive -> the dataset format, pseudonymised (:mod:`prostate_jrs.datasets`).
* ``adapt --bundle BUNDLE --sessions DIR [DIR ...] --out PATIENT_BUNDLE [--steps N]``: fine-tune the bundle on one
  patient's approved fractions and write a patient bundle that runs for that patient only
  (:mod:`prostate_jrs.adaptation`).
* ``node --ae-title T --port P --workdir W --send-to AET@HOST:PORT [--bundle B] [--allow AET ...]``: the DICOM node
  (:mod:`prostate_jrs.node`): receives sessions by C-STORE, runs the pipeline, sends the results back; runs until
  interrupted (Ctrl-C or SIGTERM).

Each subcommand is a ``_add_<name>`` function that declares its arguments and a ``_run_<name>`` function
that does the work; :func:`build_parser` registers them. Planned: ``demo``.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from prostate_jrs.errors import ProstateJRSError

if TYPE_CHECKING:
    from prostate_jrs.labels import SynonymTable
    from prostate_jrs.phantom import PhantomConfig
    from prostate_jrs.phantom.sites import Institute

__all__ = ["build_parser", "main"]

_T = TypeVar("_T", int, float)


def _checked(convert: Callable[[str], _T], accept: Callable[[_T], bool], expected: str) -> Callable[[str], _T]:
    """An argparse type: ``convert`` the text and refuse what ``accept`` rejects; errors read "expected <expected>"."""

    def parse(text: str) -> _T:
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if not accept(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {value}")
        return value

    return parse


_positive_int = _checked(int, lambda value: value >= 1, "a positive integer")
_non_negative_int = _checked(int, lambda value: value >= 0, "a non-negative integer")
_fraction = _checked(float, lambda value: 0.0 <= value < 1.0, "a fraction between 0 and 1")


def _positive_number(unit: str) -> Callable[[str], float]:
    """An argparse type for a positive number of ``unit`` (named in its error message)."""
    return _checked(float, lambda value: value > 0, f"a positive number of {unit}")


def _subcommand(
    subparsers: argparse._SubParsersAction,
    name: str,
    run: Callable[[argparse.Namespace], int],
    summary: str,
    description: str,
) -> argparse.ArgumentParser:
    """Declare subcommand ``name``: ``summary`` in the command list, ``description`` in its help, ``run`` does it."""
    parser: argparse.ArgumentParser = subparsers.add_parser(name, help=summary, description=description)
    parser.set_defaults(run=run)
    return parser


def _add_synonyms_option(parser: argparse.ArgumentParser) -> None:
    """``--synonyms FILE``: ROI names a site adds to :class:`prostate_jrs.labels.SynonymTable`'s defaults."""
    parser.add_argument(
        "--synonyms",
        metavar="FILE",
        help='extra ROI names, JSON {"prostate": ["CTV_P", ...], ...} (added to the defaults)',
    )


def _synonyms(args: argparse.Namespace) -> SynonymTable | None:
    """The table of ``--synonyms``; ``None`` for the defaults."""
    from prostate_jrs.labels import SynonymTable

    return SynonymTable.from_file(args.synonyms) if args.synonyms else None


def _add_device_option(parser: argparse.ArgumentParser, default: str) -> None:
    """``--device``: the torch device; ``default`` says in the help what is used without it."""
    parser.add_argument("--device", default=None, help=f"torch device (default: {default})")


def _add_synth(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = _subcommand(
        subparsers,
        "synth",
        _run_synth,
        "write a synthetic pelvis dataset (NIfTI + datalist.json)",
        (
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
        type=_positive_number("mm"),
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
    parser.add_argument(
        "--institute",
        default=None,
        metavar="NAME",
        help=(
            "one hospital's scanner and population profile for every patient: institute-a or institute-b "
            "(prostate_jrs.phantom.sites; default: the recipe's own ranges), e.g. to test a model on a site unlike "
            "its training data"
        ),
    )
    parser.add_argument("--preview", action="store_true", help="also write <patient>_preview.png")
    parser.add_argument(
        "--dicom",
        nargs="?",
        const="sessions",
        choices=("sessions", "archive"),
        default=None,
        metavar="LAYOUT",
        help=(
            "also write DICOM. 'sessions' (the default of a bare --dicom): OUT/dicom/<patient>_f<NN>/ per session, "
            "planning CT series, planning RTSTRUCT and daily CT series (own study and frame of reference), ready for "
            "`python app -i`; OUT/dicom/sessions.json links each session to its ground truth. 'archive': OUT/dicom/ "
            "as a hospital's export for `prostate-jrs import`: per patient nested study folders with planning CT, "
            "RTSTRUCT, RTPLAN and daily CTs with their approved RTSTRUCTs (the last patient's last fraction without), "
            "a stray series of another patient, a duplicate export and a non-DICOM file; OUT/dicom/archive.json "
            "links them to the ground truth"
        ),
    )
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


def _institute(name: str) -> Institute:
    """The hospital profile called ``name`` (``synth --institute``)."""
    from prostate_jrs.phantom.sites import INSTITUTES

    for institute in INSTITUTES:
        if institute.name == name:
            return institute
    known = ", ".join(institute.name for institute in INSTITUTES)
    raise ValueError(f"--institute {name!r} is not a known profile; expected one of: {known}")


def _run_synth(args: argparse.Namespace) -> int:
    from prostate_jrs.phantom import PhantomConfig, write_dataset

    config = PhantomConfig.tiny() if args.preset == "tiny" else PhantomConfig()
    if args.spacing is not None:
        if len(args.spacing) not in (1, 3):
            raise ValueError(f"--spacing takes one or three values, got {len(args.spacing)}")
        config = config.with_spacing(args.spacing)
    if args.sites is not None:
        if args.institute is not None:
            raise ValueError("--institute picks one profile for every patient; --sites alternates them: give one")
        return _run_synth_sites(args, config)
    if args.institute is not None:
        config = _institute(args.institute).apply(config)
    size = "x".join(str(n) for n in config.size)
    spacing = " x ".join(f"{s:g}" for s in config.spacing)
    profile = f", {args.institute} profile" if args.institute else ""
    grid = f"grid {size} of {spacing} mm{profile}"
    print(f"synth: {args.patients} patients x {args.fractions} fractions, {grid} -> {args.out}")
    start = time.perf_counter()
    datalist = write_dataset(
        args.out, args.patients, args.fractions, args.seed, config=config, preview=args.preview,
        progress=lambda message: print(f"  {message} ({time.perf_counter() - start:.1f} s)", flush=True),
    )  # fmt: skip
    if args.dicom:
        from prostate_jrs.phantom.dicom_export import export_dicom_archive, export_dicom_sessions

        export = export_dicom_archive if args.dicom == "archive" else export_dicom_sessions
        try:
            sessions = export(
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


#: The node's limits and timings: flag, type, default, metavar, help (the default is appended to the help).
_NODE_LIMITS: tuple[tuple[str, Callable[[str], float], float, str, str], ...] = (
    (
        "--quiet-seconds", _positive_number("seconds"), 20.0, "S",
        "a patient's session is complete S seconds after its last association ended, if nothing more of it arrived",
    ),
    (
        "--quota-gb", _positive_number("GB"), 50.0, "G",
        "most the work folder may hold; instances beyond are refused with status A700",
    ),
    (
        "--retention-days", _positive_number("days"), 7.0, "D",
        "delete finished jobs (done or failed) D days after they finished",
    ),
    ("--send-attempts", _positive_int, 3, "N", "C-STORE tries of the results"),
    ("--retry-seconds", _positive_number("seconds"), 10.0, "S", "pause between attempts"),
    ("--job-timeout-minutes", _positive_number("minutes"), 60.0, "M", "stop a job's processing after M minutes"),
    ("--max-jobs", _positive_int, 1, "N", "jobs processed at once, of different patients"),
)  # fmt: skip


def _add_numeric_options(
    parser: argparse.ArgumentParser, options: Sequence[tuple[str, Callable[[str], float], float, str, str]]
) -> None:
    """Add optional numbers from (flag, type, default, metavar, help) rows; each help ends with its default."""
    for flag, kind, default, metavar, text in options:
        parser.add_argument(flag, type=kind, default=default, metavar=metavar, help=f"{text} (default {default:g})")


def _add_node(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = _subcommand(
        subparsers,
        "node",
        _run_node,
        "run a DICOM node: receive sessions by C-STORE, run the pipeline, send results back",
        (
            "A DICOM storage SCP (C-STORE, C-ECHO) in front of the pipeline. It keeps CT and RTSTRUCT instances "
            "(other storage classes are refused with status 0122), groups them by patient, treats a patient's "
            "session as complete when its associations have ended and nothing of it arrived for --quiet-seconds, "
            "runs the bundle's pipeline on it "
            "in a child process (one job at a time per patient) and sends SEG, the registration object and the "
            "RTSTRUCT by C-STORE to --send-to. Each job keeps its data, log and reason under WORKDIR/jobs/. Runs "
            "until Ctrl-C or SIGTERM."
        ),
    )
    parser.add_argument("--ae-title", required=True, metavar="T", help="the node's AE title")
    parser.add_argument("--port", type=_non_negative_int, required=True, metavar="P", help="TCP port to listen on")
    parser.add_argument("--workdir", required=True, metavar="W", help="work folder (jobs, logs); created if missing")
    parser.add_argument(
        "--send-to", required=True, metavar="AET@HOST:PORT", help="where results go, e.g. PACS@10.0.0.5:104"
    )
    parser.add_argument("--bundle", metavar="B", help="bundle folder (default: the repository's bundle/)")
    parser.add_argument(
        "--allow", action="append", default=[], metavar="AET",
        help="calling AE title allowed to connect (repeat for several); default: any",
    )  # fmt: skip
    parser.add_argument("--host", default="0.0.0.0", help="address to listen on (default 0.0.0.0)")
    _add_numeric_options(parser, _NODE_LIMITS)
    _add_device_option(parser, "$PROSTATE_JRS_DEVICE, else cuda if any")
    parser.add_argument(
        "--app-command", default=None, metavar="CMD",
        help=(
            "run CMD instead of the library pipeline, e.g. the MAP; {input}, {output} and {bundle} are replaced "
            "by the job's folders and the bundle; CMD must write the app's outputs into {output}"
        ),
    )  # fmt: skip
    return parser


def _run_node(args: argparse.Namespace) -> int:
    import logging
    import signal
    import threading

    from prostate_jrs.node import Destination, NodeConfig, serve
    from prostate_jrs.node.config import repository_bundle

    config = NodeConfig(
        ae_title=args.ae_title,
        port=args.port,
        workdir=Path(args.workdir),
        destination=Destination.parse(args.send_to),
        bundle=Path(args.bundle) if args.bundle else repository_bundle(),
        host=args.host,
        allowed_calling_aets=tuple(args.allow),
        quiet_s=args.quiet_seconds,
        quota_bytes=int(args.quota_gb * 2**30),
        retention_s=args.retention_days * 86400.0,
        send_attempts=args.send_attempts,
        retry_delay_s=args.retry_seconds,
        job_timeout_s=args.job_timeout_minutes * 60.0,
        max_parallel_jobs=args.max_jobs,
        device=args.device,
        app_command=args.app_command,
    )
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stdout)
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)  # its INFO lines name every association and instance
    stop = threading.Event()
    previous = {signum: signal.signal(signum, lambda *_: stop.set()) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        serve(config, stop)
    except OSError as err:
        raise ValueError(f"cannot listen on {config.host}:{config.port}: {err}") from err
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return 0


def _add_import(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = _subcommand(
        subparsers,
        "import",
        _run_import,
        "turn a hospital's DICOM archive into a pseudonymised dataset (NIfTI + datalist.json)",
        (
            "Scan a DICOM archive export (a planning system's or PACS export: many patients, nested folders, other "
            "modalities, duplicates, non-DICOM files), find per patient the planning CT + RTSTRUCT and every daily "
            "CT with or without its approved RTSTRUCT, align each pair rigidly on bone as the app does, and write "
            "the prostate-jrs dataset format under pseudonyms. The pseudonym key and a per-patient report of what "
            "was imported and skipped (and why) go to a private folder the site keeps. A re-run resumes: patients "
            "whose files did not change are not imported again."
        ),
    )
    parser.add_argument("root", metavar="DICOM_ROOT", help="root folder of the archive export (searched recursively)")
    parser.add_argument("out", metavar="OUT", help="dataset folder: new, empty, or an earlier import to resume")
    _add_synonyms_option(parser)
    parser.add_argument(
        "--validation-fraction", type=_fraction, default=0.2, metavar="F", help="share of patients for validation"
    )
    parser.add_argument(
        "--test-fraction", type=_fraction, default=0.2, metavar="F", help="share of patients for testing"
    )
    parser.add_argument("--seed", type=_non_negative_int, default=0, metavar="S", help="seed of the patient split")
    parser.add_argument("--workers", type=_positive_int, default=1, metavar="N", help="patients imported in parallel")
    parser.add_argument(
        "--private-dir",
        metavar="DIR",
        help="folder of the pseudonym key and the report (default: OUT-private beside OUT); keep it at the site",
    )
    parser.add_argument(
        "--planning-rule",
        choices=("rtplan", "earliest"),
        default="rtplan",
        help=(
            "planning structure set: the one the latest RTPLAN references, else the latest approved RTSTRUCT on the "
            "earliest contoured CT (rtplan, default); or always the latter (earliest)"
        ),
    )
    parser.add_argument(
        "--planning",
        metavar="FILE",
        help="CSV of overrides, one 'PatientID,RTSTRUCT SOP Instance UID' per line: that patient's planning RTSTRUCT",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def _planning_overrides(path: str | None) -> dict[str, str]:
    """Patient ID -> planning RTSTRUCT SOP Instance UID from the ``--planning`` CSV."""
    import csv
    from pathlib import Path

    if path is None:
        return {}
    overrides = {}
    with Path(path).open(newline="", encoding="utf-8") as handle:
        for line, row in enumerate(csv.reader(handle), start=1):
            if not row or row[0].startswith("#") or row[0].strip().lower() in ("patientid", "patient_id"):
                continue
            if len(row) != 2:
                raise ValueError(f"{path}, line {line}: expected 'PatientID,RTSTRUCT SOP Instance UID', got {row}")
            overrides[row[0].strip()] = row[1].strip()
    return overrides


def _run_import(args: argparse.Namespace) -> int:
    from prostate_jrs.datasets.importer import ImportSettings, import_archive
    from prostate_jrs.datasets.report import summary_lines

    settings = ImportSettings(
        synonyms=_synonyms(args),
        planning_rule=args.planning_rule,
        planning_overrides=_planning_overrides(args.planning),
        validation_fraction=args.validation_fraction,
        test_fraction=args.test_fraction,
        seed=args.seed,
    )
    start = time.perf_counter()
    result = import_archive(
        args.root, args.out, private_dir=args.private_dir, settings=settings, workers=args.workers,
        show_progress=False if args.no_progress else None,
    )  # fmt: skip
    for line in summary_lines(result.reports):
        print(line)
    print(f"wrote {result.datalist} ({time.perf_counter() - start:.1f} s)")
    print(f"pseudonym key and report (keep at the site, never share): {result.private_dir}")
    return 0 if any(r.status == "imported" for r in result.reports) else 1


def _add_adapt(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from prostate_jrs.adaptation.finetune import DEFAULT_LEARNING_RATE, DEFAULT_STEPS

    parser = _subcommand(
        subparsers,
        "adapt",
        _run_adapt,
        "fine-tune the bundle on one patient's approved fractions; write a bundle for that patient only",
        (
            "Patient-specific adaptation. Each DIR holds an approved fraction of one patient: planning CT + planning "
            "RTSTRUCT + daily CT + the daily RTSTRUCT a clinician approved (a folder may hold several fractions). "
            "The bundle's network is fine-tuned with its own train.json trainer on the planning -> approved daily "
            "pairs and on synthetic deformations of the planning scan, and a complete bundle is written to "
            "PATIENT_BUNDLE (complete or not at all): new weights with their sha256, and in "
            "configs/metadata.json the base model's sha256, the patient's pseudonym (a keyed hash, never the "
            "Patient ID; $PROSTATE_JRS_SITE_SECRET adds the site's key), keyed digests of the fractions' UIDs and "
            "the training record. The app and the DICOM node refuse to run it on any other patient's study. Uses "
            "the GPU when there is one."
        ),
    )
    parser.add_argument("--bundle", required=True, metavar="BUNDLE", help="the bundle to adapt (e.g. bundle/)")
    parser.add_argument(
        "--sessions", required=True, nargs="+", metavar="DIR", help="DICOM folders of approved fractions (one patient)"
    )
    parser.add_argument("--out", required=True, metavar="PATIENT_BUNDLE", help="the patient bundle folder (new)")
    parser.add_argument(
        "--steps", type=_positive_int, default=DEFAULT_STEPS, metavar="N",
        help=f"optimizer steps (default {DEFAULT_STEPS}: a few minutes on 2 CPU cores)",
    )  # fmt: skip
    parser.add_argument(
        "--learning-rate", type=_positive_number("(learning rate)"), default=DEFAULT_LEARNING_RATE, metavar="LR",
        help=f"Adam learning rate (default {DEFAULT_LEARNING_RATE:g})",
    )  # fmt: skip
    parser.add_argument(
        "--seed", type=_non_negative_int, default=0, metavar="S", help="seed of patches and deformations"
    )
    _add_device_option(parser, "a GPU when there is one, else the CPU")
    _add_synonyms_option(parser)
    return parser


def _run_adapt(args: argparse.Namespace) -> int:
    from prostate_jrs.adaptation.finetune import AdaptSettings
    from prostate_jrs.adaptation.runner import adapt_patient

    settings = AdaptSettings(steps=args.steps, learning_rate=args.learning_rate, seed=args.seed, device=args.device)
    start = time.perf_counter()
    result = adapt_patient(
        args.bundle, args.sessions, args.out, settings,
        synonyms=_synonyms(args),
        progress=lambda message: print(f"  {message} ({time.perf_counter() - start:.0f} s)", flush=True),
    )  # fmt: skip
    record = result.training
    print(
        f"adapted to patient {result.pseudonym[:8]} on {result.fractions} approved fraction(s): "
        f"{record.settings['steps']} steps on {record.settings['device']}, loss on the approved pairs "
        f"{record.loss_before:.4f} -> {record.loss_after:.4f}, {result.seconds:.0f} s"
    )
    print(f"wrote {result.bundle}; it runs for this patient only: python app -i DICOM_IN -o OUT -m {result.bundle}")
    return 0


# Subcommands in help order; `demo` is added here when it exists.
_SUBCOMMANDS: tuple[Callable[[argparse._SubParsersAction], argparse.ArgumentParser], ...] = (
    _add_synth,
    _add_import,
    _add_adapt,
    _add_node,
)


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

    Errors a user can fix (bad arguments, a missing input or an existing output folder) print one line and return 2.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.run(args))
    except (ProstateJRSError, ValueError, FileExistsError, FileNotFoundError) as err:
        print(f"prostate-jrs {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
