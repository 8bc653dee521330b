"""The app killed half-way and run twice at once into one output folder (``python app ...`` subprocesses).

A run killed with SIGKILL (power cut, OOM killer, ``docker kill``) at a random point leaves either nothing, or one
complete result; the next run removes the staging folder the dead one left (its owner stamp proves it dead) and
publishes its own. Two runs into one output folder end with one complete result and, when they overlap, a clear
refusal of the second; never a mixture of the two patients' files.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pydicom
import pytest

from prostate_jrs.output_folder import STAGING_PREFIX, new_staging, output_lock
from prostate_jrs.phantom import PhantomConfig, write_dataset
from prostate_jrs.phantom.dicom_export import export_dicom_sessions

if TYPE_CHECKING:  # conftest is not importable at run time; the fixture hands its helper over
    from conftest import RunApp

REPO = Path(__file__).resolve().parents[2]
OUTPUTS = ("rtstruct.dcm", "seg.dcm", "registration.dcm", "qa.json", "qa.png")
EARLIER = "earlier_result.txt"


@pytest.fixture(scope="module")
def sessions(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two tiny patients, one fraction each: patient ID -> session folder."""
    root = tmp_path_factory.mktemp("synth") / "data"
    write_dataset(root, n_patients=2, n_fractions=1, seed=0, config=PhantomConfig.tiny())
    export_dicom_sessions(root)
    manifest = json.loads((root / "dicom" / "sessions.json").read_text())
    return {s["patient"]: root / s["folder"] for s in manifest["sessions"]}


def _start(session: Path, out: Path, bundle: Path) -> subprocess.Popen[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    argv = [sys.executable, str(REPO / "app"), "-i", str(session), "-o", str(out), "-m", str(bundle)]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _state(out: Path) -> str:
    """``none``, ``complete`` (one patient's files) or ``interrupted`` (a publication a dead run's journal completes).

    Fails on anything else: a completion file beside another patient's files, result files without a journal.
    """
    present = [name for name in OUTPUTS if (out / name).exists()]
    if not present:
        return "none"
    if "qa.json" in present:
        assert sorted(present) == sorted(OUTPUTS), f"qa.json without every output: {present}"
        patient = json.loads((out / "qa.json").read_text())["session"]["patient_id"]
        for name in ("rtstruct.dcm", "seg.dcm", "registration.dcm"):
            assert pydicom.dcmread(out / name, stop_before_pixels=True).PatientID == patient, f"{name}: mixed runs"
        return "complete"
    journals = list(out.glob(f"{STAGING_PREFIX}*/.publishing.json"))
    assert journals, f"result files {present} without qa.json and without a publication journal"
    return "interrupted"


def _run_until_staging(session: Path, out: Path, bundle: Path) -> tuple[subprocess.Popen[str], float]:
    """Start the app; return once its staging folder appears (imports done, its own work begins) or it ended."""
    before = set(out.glob(f"{STAGING_PREFIX}*"))
    process = _start(session, out, bundle)
    deadline = time.monotonic() + 180
    while process.poll() is None and not set(out.glob(f"{STAGING_PREFIX}*")) - before and time.monotonic() < deadline:
        time.sleep(0.02)
    return process, time.monotonic()


@pytest.mark.slow
def test_runs_killed_at_random_points_leave_no_partial_result(
    sessions: dict[str, Path], bundle: Path, tmp_path: Path, run_app: RunApp
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / EARLIER).write_text("kept")
    # how long a run works once its staging folder exists: the kills fall anywhere in that time, or after it
    process, began = _run_until_staging(sessions["JRS002"], out, bundle)
    process.communicate(timeout=300)
    work = time.monotonic() - began
    assert process.returncode == 0 and _state(out) == "complete"
    rng = random.Random(2026)
    states = []
    for n in range(4):
        process, began = _run_until_staging(sessions["JRS001" if n % 2 else "JRS002"], out, bundle)
        time.sleep(max(0.0, began + rng.uniform(0.0, 1.1 * work) - time.monotonic()))
        process.send_signal(signal.SIGKILL)
        process.communicate(timeout=60)
        states.append(_state(out))

    result = run_app(["-i", str(sessions["JRS001"]), "-o", str(out), "-m", str(bundle)], tmp_path)

    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert _state(out) == "complete"
    assert sorted(p.name for p in out.iterdir()) == sorted([*OUTPUTS, EARLIER])  # the dead runs' staging is gone
    cleaned = [line for line in result.stdout.splitlines() if "of a run that died" in line]
    print(f"a run works {work:.1f} s after staging; states after each of 4 kills: {states}; next run: {cleaned}")


def test_a_run_into_a_folder_another_run_holds_is_refused(
    sessions: dict[str, Path], bundle: Path, tmp_path: Path, run_app: RunApp
) -> None:
    out = tmp_path / "out"
    with output_lock(out):
        other = new_staging(out)  # the holder's stamped staging folder names it in the refusal
        result = run_app(["-i", str(sessions["JRS001"]), "-o", str(out), "-m", str(bundle)], tmp_path)
        assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
        assert "Traceback" not in result.stderr
        refusal = f"prostate-jrs: error: {out}: another prostate-jrs run is writing into this output folder"
        assert refusal in result.stderr
        assert f"(pid {os.getpid()} on host" in result.stderr
        assert [p.name for p in out.iterdir()] == [other.name]  # the holder's folder untouched


def test_two_simultaneous_runs_end_with_one_complete_result(
    sessions: dict[str, Path], bundle: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    runs = {patient: _start(sessions[patient], out, bundle) for patient in ("JRS001", "JRS002")}
    finished = {patient: process.communicate(timeout=300) for patient, process in runs.items()}
    codes = {patient: runs[patient].returncode for patient in runs}

    assert set(codes.values()) <= {0, 1}, {p: finished[p][1][-2000:] for p in runs}
    for patient, (_, stderr) in finished.items():
        assert "Traceback" not in stderr
        if codes[patient] == 1:  # refused: the other held the folder
            assert "another prostate-jrs run is writing into this output folder" in stderr, stderr[-2000:]
    assert 0 in codes.values()
    assert _state(out) == "complete"
    assert sorted(p.name for p in out.iterdir()) == sorted(OUTPUTS)
    print(f"exit codes {codes}, result of {json.loads((out / 'qa.json').read_text())['session']['patient_id']}")
