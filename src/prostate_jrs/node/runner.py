"""Process one complete job: check it holds one patient's whole session, run the pipeline (or the app) in a child
process, check the outputs. Nothing is sent from here; :mod:`prostate_jrs.node.sender` sends what this returns.

The checks read headers only and run in the node itself, so a session of two patients or one that lacks its daily CT
or RTSTRUCT fails at once with the selection's reason, before a child process starts.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from prostate_jrs.dicom.discovery import DicomSelectionError, check_one_patient, scan_folder, select_session
from prostate_jrs.dicom_session import OUTPUT_FILES
from prostate_jrs.errors import JobFailedError
from prostate_jrs.node.config import NodeConfig
from prostate_jrs.node.jobs import Job

__all__ = ["ERROR_PREFIX", "SEND_ORDER", "JobFailedError", "job_command", "process_job"]

ERROR_PREFIX = "error: "
"""Start of the line on stderr with which the worker (and the app) give the reason of a failure."""

SEND_ORDER = ("seg", "registration", "rtstruct")
"""Result objects in the order they are sent: RTSTRUCT last, as planning systems act on its arrival."""

_REASON_CHARS = 4000


def job_command(job: Job, config: NodeConfig) -> list[str]:
    """The child process's command line: the library worker, or ``config.app_command`` with its placeholders filled."""
    if config.app_command is None:
        command = [sys.executable, "-m", "prostate_jrs.node.worker", str(job.input_dir), str(job.output_dir)]
        return [*command, str(config.bundle), *(["--device", config.device] if config.device else [])]
    values = {"input": str(job.input_dir), "output": str(job.output_dir), "bundle": str(config.bundle)}
    return [part.format(**values) for part in shlex.split(config.app_command)]


def process_job(
    job: Job, config: NodeConfig, on_start: Callable[[subprocess.Popen[bytes]], None] | None = None
) -> list[Path]:
    """Run ``job`` to its results; returns the DICOM results in :data:`SEND_ORDER`.

    Args:
        job: a complete job.
        config: the node's settings (bundle, device, app command, timeout).
        on_start: called with the child process once started (so the node can stop it).

    Raises:
        JobFailedError: if the job holds two patients or no complete session, the child fails or times out, or an
            output is missing.
    """
    try:
        check_one_patient(scan_folder(job.input_dir))
    except DicomSelectionError as err:
        raise JobFailedError(f"refused, a session must hold one patient: {err}") from err
    try:
        select_session(job.input_dir)
    except DicomSelectionError as err:
        raise JobFailedError(f"refused, not a complete session: {err}") from err
    command = job_command(job, config)
    job.log(f"processing: {'library pipeline' if config.app_command is None else 'app command'} ({command[0]})")
    start = time.perf_counter()
    with job.log_path.open("ab") as log:
        offset = log.tell()
        # own session: the node's Ctrl-C does not reach the child, which the node stops itself
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        if on_start is not None:
            on_start(process)
        try:
            status = process.wait(timeout=config.job_timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            raise JobFailedError(f"processing stopped after the job timeout of {config.job_timeout_s:g} s") from None
    if status != 0:
        raise JobFailedError(f"processing failed (exit status {status}): {_reason(job.log_path, offset)}")
    missing = [name for name in OUTPUT_FILES.values() if not (job.output_dir / name).is_file()]
    if missing:
        raise JobFailedError(f"processing ended without {', '.join(missing)} in {job.output_dir}; nothing is sent")
    job.log(f"processed in {time.perf_counter() - start:.1f} s")
    return [job.output_dir / OUTPUT_FILES[name] for name in SEND_ORDER]


def _reason(log_path: Path, offset: int) -> str:
    """The child's error message: from its last ``error: `` to the end of its output, else its last line."""
    with log_path.open("rb") as log:
        log.seek(offset)
        text = log.read().decode("utf-8", errors="replace").strip()
    position = text.rfind(ERROR_PREFIX)
    reason = text[position + len(ERROR_PREFIX) :] if position >= 0 else (text.splitlines() or ["no output"])[-1]
    return reason.strip()[:_REASON_CHARS]
