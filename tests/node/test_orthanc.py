"""Round trip through a real PACS. A synthetic session is uploaded to Orthanc (Debian package ``orthanc``, started
here from the example configuration ``docs/node/orthanc.json`` moved to free local ports and a temporary folder),
Orthanc sends it to ``prostate-jrs node`` (the command, with the shipped bundle), the node's results arrive back in
Orthanc, and they are read out through Orthanc's REST API: the RTSTRUCT's contours, read back onto the daily CT, are
scored against the phantom's ground truth.

The shipped weights make the check mean something: with random weights the segmentation path (prostate, bladder)
scores near 0, and a node that mixes up series, frames of reference or patients cannot reach these DSCs. The example
configuration accepts C-STORE only from its known modalities (the node, by AE title and host), so the results
arriving also shows the node presents itself as configured.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from node_testing import NODE_AET, free_port, session_files

from prostate_jrs.dicom.ct_reader import read_ct_series
from prostate_jrs.dicom.registration import read_deformable_registration
from prostate_jrs.dicom.rtstruct_reader import read_rtstruct
from prostate_jrs.geometry import array_from_image
from prostate_jrs.metrics import structure_metrics

REPO = Path(__file__).resolve().parents[2]
EXAMPLE_CONFIG = REPO / "docs" / "node" / "orthanc.json"
ORTHANC_AET = "ORTHANC"
MIN_DSC = {"prostate": 0.75, "rectum": 0.75, "bladder": 0.8}  # shipped weights at the tiny preset give ~0.85-0.92


class Orthanc:
    """An Orthanc server run from the example configuration, and its REST API.

    Args:
        folder: holds the configuration, the storage and the log.
        node_port: port of the node, configured as modality ``jrsnode``.
    """

    def __init__(self, folder: Path, node_port: int) -> None:
        executable = shutil.which("Orthanc")
        if executable is None:  # fail, never skip: CI installs it, and a missing PACS must not pass silently
            pytest.fail("Orthanc not found: install it with `apt-get install -y orthanc`")
        self.http_port, self.dicom_port = free_port(), free_port()
        config = json.loads(EXAMPLE_CONFIG.read_text())  # the documented example, on this test's ports and folder
        config.update(
            StorageDirectory=str(folder / "storage"),
            IndexDirectory=str(folder / "storage"),
            HttpPort=self.http_port,
            DicomPort=self.dicom_port,
            SaveJobs=False,
        )
        assert config["DicomAet"] == ORTHANC_AET and config["DicomModalities"]["jrsnode"]["AET"] == NODE_AET
        config["DicomModalities"]["jrsnode"]["Port"] = node_port
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "orthanc.json").write_text(json.dumps(config, indent=2))
        self.log = (folder / "orthanc.log").open("w")
        self.process = subprocess.Popen(
            [executable, str(folder / "orthanc.json")], stdout=self.log, stderr=subprocess.STDOUT
        )
        self.url = f"http://127.0.0.1:{self.http_port}"
        _wait(lambda: self._up(), 60, "Orthanc's REST API")

    def _up(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(f"Orthanc exited with status {self.process.returncode}; see {self.log.name}")
        try:
            return "Version" in self.get("/system")
        except OSError:
            return False

    def request(self, method: str, path: str, body: bytes | None = None) -> bytes:
        """One REST call; returns the response body."""
        with urllib.request.urlopen(
            urllib.request.Request(self.url + path, data=body, method=method), timeout=600
        ) as r:
            return r.read()

    def get(self, path: str) -> Any:
        """GET and parse JSON."""
        return json.loads(self.request("GET", path))

    def post(self, path: str, payload: Any) -> Any:
        """POST JSON (or bytes) and parse the JSON answer."""
        body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        return json.loads(self.request("POST", path, body))

    def stop(self) -> None:
        """Stop the server."""
        self.process.terminate()
        self.process.wait(30)
        self.log.close()


def _wait(predicate: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.2)


@pytest.fixture
def node_command(tmp_path: Path) -> Iterator[tuple[int, Path, Any]]:
    """Yields ``(port, workdir, start)``; ``start(orthanc_dicom_port)`` runs ``prostate-jrs node`` with the shipped
    bundle, sending to Orthanc; stopped with SIGTERM afterwards (it must exit 0)."""
    port, workdir, log_path = free_port(), tmp_path / "node_work", tmp_path / "node.log"
    processes: list[subprocess.Popen[bytes]] = []

    def start(orthanc_port: int) -> None:
        command = [
            sys.executable, "-m", "prostate_jrs.cli", "node", "--ae-title", NODE_AET, "--port", str(port),
            "--host", "127.0.0.1", "--workdir", str(workdir), "--send-to", f"{ORTHANC_AET}@127.0.0.1:{orthanc_port}",
            "--allow", ORTHANC_AET, "--quiet-seconds", "2", "--bundle", str(REPO / "bundle"), "--device", "cpu",
        ]  # fmt: skip
        with log_path.open("wb") as log:
            processes.append(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT))
        _wait(lambda: "listening on" in log_path.read_text() or processes[0].poll() is not None, 120, "the node")
        assert processes[0].poll() is None, log_path.read_text()

    yield port, workdir, start
    for process in processes:
        process.send_signal(signal.SIGTERM)
        assert process.wait(60) == 0, log_path.read_text()[-3000:]


@pytest.mark.slow
def test_round_trip_through_orthanc(
    node_sessions: Path, node_command: tuple[int, Path, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    node_port, workdir, start_node = node_command
    orthanc = Orthanc(tmp_path / "orthanc", node_port)
    try:
        start_node(orthanc.dicom_port)
        assert orthanc.post("/modalities/jrsnode/echo", {}) == {}  # Orthanc's C-ECHO answered by the node

        session = node_sessions / "dicom" / "JRS001_f01"
        files = session_files(session)
        uploaded = [orthanc.post("/instances", path.read_bytes())["ID"] for path in files]
        sent = orthanc.post("/modalities/jrsnode/store", {"Resources": uploaded, "Synchronous": True})
        assert int(sent["InstancesCount"]) == len(files) and not sent.get("FailedInstancesCount")

        def results() -> list[str]:
            return [uid for uid in orthanc.get("/instances") if uid not in set(uploaded)]

        _wait(lambda: len(results()) >= 3, 600, "the node's results in Orthanc")
        found = time.time()
        checked = _check_results(orthanc, results(), session, node_sessions)
        job = json.loads(next((workdir / "jobs").glob("*/job.json")).read_text())
    finally:
        orthanc.stop()

    assert job["state"] == "done" and job["instances"] == len(files)
    times = job["times"]
    with capsys.disabled():
        print(
            f"\nOrthanc round trip: last C-STORE received by the node -> results stored in Orthanc "
            f"{times['sent'] - job['last_received']:.1f} s (quiet time 2 s, processing "
            f"{times['processed'] - times['started']:.1f} s, sending {times['sent'] - times['processed']:.1f} s; "
            f"seen through Orthanc's REST API after {found - job['last_received']:.1f} s)"
        )
        print("RTSTRUCT read back from Orthanc vs phantom truth: " + ", ".join(f"{k} DSC {v:.3f}" for k, v in checked))


def _check_results(orthanc: Orthanc, ids: list[str], session: Path, dataset: Path) -> list[tuple[str, float]]:
    """The three results in Orthanc: SEG and registration present, RTSTRUCT on the daily CT, DSC against the truth."""
    folder = session.parent.parent / "from_orthanc"
    folder.mkdir(exist_ok=True)
    by_modality = {}
    for instance in ids:
        path = folder / f"{instance}.dcm"
        path.write_bytes(orthanc.request("GET", f"/instances/{instance}/file"))
        by_modality[pydicom.dcmread(path, stop_before_pixels=True).Modality] = path
    assert sorted(by_modality) == ["REG", "RTSTRUCT", "SEG"]

    manifest = json.loads((dataset / "dicom" / "sessions.json").read_text())
    record = next(s for s in manifest["sessions"] if s["folder"] == f"dicom/{session.name}")
    daily_uid = record["uids"]["daily_ct_series"]
    daily_files = [
        p for p in session.glob("*.dcm") if pydicom.dcmread(p, stop_before_pixels=True).SeriesInstanceUID == daily_uid
    ]
    daily = read_ct_series(daily_files)
    rtstruct = pydicom.dcmread(by_modality["RTSTRUCT"], stop_before_pixels=True)
    assert rtstruct.PatientID == record["patient"]
    assert rtstruct.ReferencedFrameOfReferenceSequence[0].FrameOfReferenceUID == daily.frame_of_reference_uid
    registration = read_deformable_registration(by_modality["REG"])
    assert registration.registered_frame_of_reference_uid == daily.frame_of_reference_uid

    contours = read_rtstruct(by_modality["RTSTRUCT"], daily)
    truth = array_from_image(sitk.ReadImage(str(dataset / record["item"]["fixed_label"])))
    metrics = structure_metrics(contours.label_map, truth, daily.image.GetSpacing())
    scores = [(name, float(values.dsc)) for name, values in metrics.items()]
    for name, minimum in MIN_DSC.items():
        assert metrics[name].dsc >= minimum, f"{name}: DSC {metrics[name].dsc:.3f} < {minimum}; all: {scores}"
    assert np.isfinite([dsc for _, dsc in scores]).all()
    return scores
