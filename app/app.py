"""The prostate-jrs MONAI Deploy application: planning CT + RTSTRUCT + daily CT in, daily contours out.

Graph (input and output stages are separate operators; each is a thin wrapper over :mod:`prostate_jrs`)::

    SessionLoader --session--> JRSInference --result/settings--> RTStructWriter ----\\
          |                                                     SegWriter ---------+--> Publish
          +------------------- session ----------------------> RegistrationWriter -+
                                                                QAWriter ----------/

Writers stage their files in a hidden folder inside the output folder; Publish moves them into place once all are
written (``qa.json`` last, an older one removed first), so the output folder holds one complete result or none.
:func:`main` holds the output folder for the run (a second run into it is refused), completes or removes what runs
that died there left (:func:`prostate_jrs.output_folder.recover`), removes its staging folder when it fails and turns
the errors a user can act on into a one-line message and exit status 1.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from monai.deploy.conditions import CountCondition
from monai.deploy.core import Application
from operators import (
    JRSInferenceOperator,
    PublishOperator,
    QAWriterOperator,
    RegistrationWriterOperator,
    RTStructWriterOperator,
    SegWriterOperator,
    SessionLoaderOperator,
)

from prostate_jrs.backends import BACKENDS
from prostate_jrs.dicom_session import SESSION_ERRORS, discard
from prostate_jrs.output_folder import new_staging, output_lock, recover
from prostate_jrs.pipeline import BundleError
from prostate_jrs.refine import REFINE_MODES

__all__ = ["ProstateJRSApp", "main", "resolve_bundle"]

_REPO_BUNDLE = Path(__file__).resolve().parent.parent / "bundle"
_USER_ERRORS = SESSION_ERRORS


def _option_value(argv: Sequence[str], short: str, long: str) -> str | None:
    """The value of ``short``/``long`` (``-m``/``--model``) in ``argv``, if given.

    Read here rather than with the SDK's ``parse_args``: its ``-o`` type creates the folder while parsing, and
    :func:`main` must know whether the folder existed before the run; its ``-m`` default (``models``) is not the
    app's (the repository's ``bundle/``).
    """
    for n, arg in enumerate(argv[1:], start=1):
        if arg in (short, long) and n + 1 < len(argv):
            return argv[n + 1]
        if arg.startswith(f"{long}="):
            return arg.split("=", 1)[1]
    return None


def resolve_bundle(argv: Sequence[str]) -> Path:
    """The bundle folder: ``-m`` if given, else ``$HOLOSCAN_MODEL_PATH`` (inside a MAP), else the repo's ``bundle/``.

    The path may be the bundle folder, a folder holding exactly one bundle (how a MAP's ``/opt/holoscan/models``
    holds the folder given to ``monai-deploy package -m``), or the bundle's ``models/model.pt``.

    Raises:
        BundleError: if no bundle (a folder with ``configs/inference.json``) is found there, or it has no
            ``models/model.pt``.
    """
    given = _option_value(argv, "-m", "--model") or os.environ.get("HOLOSCAN_MODEL_PATH")
    path = Path(given).resolve() if given else _REPO_BUNDLE
    if path.is_file() and path.parent.name == "models":
        path = path.parent.parent
    if not (path / "configs" / "inference.json").is_file() and path.is_dir():
        bundles = [p for p in sorted(path.iterdir()) if (p / "configs" / "inference.json").is_file()]
        path = bundles[0] if len(bundles) == 1 else path
    if (path / "configs" / "inference.json").is_file():
        if not (path / "models" / "model.pt").is_file():  # fail before reading any DICOM
            raise BundleError(
                f"{path / 'models' / 'model.pt'}: no model weights in the bundle; train the bundle or copy a model.pt "
                "there"
            )
        return path
    raise BundleError(
        f"{path}: not a MONAI bundle; expected a folder with configs/inference.json and models/model.pt "
        "(pass it with -m BUNDLE)"
    )


def parse_app_options(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    """The app's own options and the command line left for the SDK (``-i``, ``-o``, ``-m``, ``-l``, ...).

    ``--refine off|fast|accurate`` (default ``$PROSTATE_JRS_REFINE``, else the bundle's ``refine#mode``) sets the
    test-time refinement of the deformation; the mode used is recorded in ``qa.json``. ``--backend
    auto|torch|openvino|onnxruntime`` (default ``$PROSTATE_JRS_BACKEND``, else the bundle's ``backend``, ``auto``:
    OpenVINO on the CPU, torch on a GPU) says what runs the network; the one used is recorded in ``qa.json``.
    """
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--refine", choices=sorted(REFINE_MODES), default=os.environ.get("PROSTATE_JRS_REFINE"))
    parser.add_argument("--backend", choices=BACKENDS, default=os.environ.get("PROSTATE_JRS_BACKEND"))
    options, rest = parser.parse_known_args(list(argv[1:]))
    return options, [argv[0], *rest]


class ProstateJRSApp(Application):
    """Joint registration and segmentation of a daily prostate CT from the planning CT and RTSTRUCT.

    Inputs (``-i``): a folder with the planning CT series, the planning RTSTRUCT and the daily CT series.
    Outputs (``-o``): ``rtstruct.dcm``, ``seg.dcm``, ``registration.dcm``, ``qa.json``, ``qa.png``.
    Model (``-m``): the bundle folder (default: the repository's ``bundle/``).
    Refinement (``--refine off|fast|accurate``): test-time refinement of the deformation (default: the bundle's).
    Network backend (``--backend auto|torch|openvino|onnxruntime``): what runs the network (default: the bundle's).
    """

    name = "prostate-jrs"
    description = "Joint registration and segmentation for prostate adaptive radiotherapy (research use only)"
    version = "0.1.0"

    def __init__(self, argv: Sequence[str] | None = None, *args: object, **kwargs: object) -> None:
        # Holoscan strips the program name from self.argv, but init_app_context parses argv[1:]: keep the full
        # command line for it, without the app's own options, which the SDK's parser would refuse
        self.run_options, self.cli_argv = parse_app_options(list(sys.argv if argv is None else argv))
        self.staging: Path | None = None
        self.output_folder: Path | None = None
        super().__init__(self.cli_argv, *args, **kwargs)

    def compose(self) -> None:
        """Build the operator graph."""
        context = Application.init_app_context(self.cli_argv)
        bundle = resolve_bundle(self.cli_argv)
        input_folder = Path(context.input_path)
        self.output_folder = Path(context.output_path)
        self.staging = new_staging(self.output_folder)  # stamped: a later run can tell whether this one died
        logging.info(f"input {input_folder}, output {self.output_folder}, bundle {bundle}")

        loader = SessionLoaderOperator(self, CountCondition(self, 1), input_folder=input_folder, name="session_loader")
        inference = JRSInferenceOperator(
            self,
            bundle_path=bundle,
            refine=self.run_options.refine,
            backend=self.run_options.backend,
            name="jrs_inference",
        )
        writers = {
            "rtstruct": RTStructWriterOperator(self, staging=self.staging, name="rtstruct_writer"),
            "seg": SegWriterOperator(self, staging=self.staging, name="seg_writer"),
            "registration": RegistrationWriterOperator(self, staging=self.staging, name="registration_writer"),
            "qa": QAWriterOperator(self, staging=self.staging, bundle_path=bundle, name="qa_writer"),
        }
        publisher = PublishOperator(self, staging=self.staging, output_folder=self.output_folder, name="publisher")
        self.add_flow(loader, inference, {("session", "session")})
        self.add_flow(inference, publisher, {("result", "result")})
        for port, writer in writers.items():
            self.add_flow(loader, writer, {("session", "session")})
            self.add_flow(inference, writer, {("result", "result"), ("settings", "settings")})
            self.add_flow(writer, publisher, {("paths", port)})


def main(argv: Sequence[str] | None = None) -> int:
    """Run the app; returns the exit status (0 success, 1 an error the user can act on).

    Args:
        argv: the command line, program name first (``sys.argv``).
    """
    argv = list(sys.argv if argv is None else argv)
    output = Path(_option_value(argv, "-o", "--output") or os.environ.get("HOLOSCAN_OUTPUT_PATH", "output")).absolute()
    existed = output.exists()
    start = time.perf_counter()
    app = ProstateJRSApp(argv)
    try:
        with output_lock(output):  # one run per output folder; a second one is refused, never mixed in
            for note in recover(output):
                print(f"prostate-jrs: {note}", flush=True)
            try:
                app.run()
            except BaseException:
                _clean(output, existed)
                raise
    except _USER_ERRORS as err:
        print(f"prostate-jrs: error: {err}", file=sys.stderr, flush=True)
        print("prostate-jrs: no output written", file=sys.stderr, flush=True)
        return 1
    print(f"prostate-jrs: done in {time.perf_counter() - start:.1f} s", flush=True)
    return 0


def _clean(output: Path, existed: bool) -> None:
    """Remove this run's staging folder (and dead runs') and, if this run created it and it is empty, the output
    folder."""
    discard(output)
    if not existed and output.is_dir() and not any(output.iterdir()):
        output.rmdir()
