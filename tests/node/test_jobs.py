"""Jobs end to end on the network: results sent whole and RTSTRUCT last, a destination that is down or refuses a
result's class, two patients under one Patient ID, one job at a time per patient, the job timeout."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from copy import deepcopy
from pathlib import Path

import pydicom
import pytest
from node_testing import (
    RESULT_CLASSES,
    Processed,
    StartNode,
    StartReceiver,
    c_store,
    free_port,
    jobs_of,
    session_files,
    session_parts,
    start_receiver,
)
from pynetdicom.sop_class import DeformableSpatialRegistrationStorage, RTStructureSetStorage, SegmentationStorage

from prostate_jrs.dicom_session import OUTPUT_FILES
from prostate_jrs.node import Destination, DicomNode, Job, SendError, send_results
from prostate_jrs.node.runner import SEND_ORDER

pytestmark = pytest.mark.slow  # a running DICOM node and app processes per case

# waits for a flag file, then exits without writing outputs: an app command whose run the test controls
WAIT_FOR_FLAG = """\
import pathlib, sys, time
flag = pathlib.Path(sys.argv[1])
while not flag.exists():
    time.sleep(0.05)
"""


def _wait_for(node: DicomNode, predicate: Callable[[list[Job]], bool], timeout_s: float = 60) -> list[Job]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        jobs = jobs_of(node)
        if predicate(jobs):
            return jobs
        time.sleep(0.05)
    raise AssertionError(f"timed out; jobs: {[(job.job_id, job.state) for job in jobs_of(node)]}")


def test_destination_down_retries_then_fails_keeping_everything(processed: Processed) -> None:
    job = processed.job
    assert job.state == "failed"
    assert job.reason.startswith("results not sent to PLANNING@127.0.0.1:") and "after 3 attempts" in job.reason
    assert "nothing sent" in job.reason
    log = job.log_path.read_text()
    assert log.count("send attempt") == 3
    assert job.sent == [] and "sent" not in job.times
    assert sorted(p.name for p in job.output_dir.iterdir()) == sorted(OUTPUT_FILES.values())  # results kept
    assert job.instances == len(processed.sent) == len(list(job.input_dir.iterdir()))  # received data kept
    assert json.loads((job.folder / "job.json").read_text())["reason"] == job.reason
    times = job.times
    assert job.last_received <= times["complete"] <= times["started"] <= times["processed"] <= times["finished"]
    for event in ("new job", "session complete", "processing: library pipeline", "processed in", "FAILED"):
        assert event in log

    # logs and job.json: pseudonyms only
    texts = [log, (job.folder / "job.json").read_text(), *processed.node_log]
    for identifier in processed.patient_identifiers:
        assert not any(identifier in text for text in texts), identifier
    assert any(job.patient in line and job.job_id in line for line in processed.node_log)


def test_results_are_sent_whole_rtstruct_last(processed: Processed, node_sessions: Path) -> None:
    """The node's results, sent as the node sends them, to a destination that is down at the first attempt and up
    at the second."""
    assert SEND_ORDER[-1] == "rtstruct"  # planning systems act on the RTSTRUCT's arrival: it goes last
    files = [processed.job.output_dir / OUTPUT_FILES[name] for name in SEND_ORDER]
    port, started = free_port(), []

    def log(line: str) -> None:  # the destination comes up after the first failed attempt
        if not started:
            started.append(start_receiver(port=port))

    try:
        send_results(files, Destination("PLANNING", "127.0.0.1", port), "JRSNODE", retry_delay_s=0.1, log=log)
        received = started[0].received
    finally:
        for scp in started:
            scp.stop()
    assert [uid for _, uid, _ in received] == list(RESULT_CLASSES)  # SEG, registration, RTSTRUCT
    for (_, _, ds), path in zip(received, files, strict=True):
        assert ds.SOPInstanceUID == pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID
    rtstruct = received[-1][2]
    daily = pydicom.dcmread(session_parts(node_sessions / "dicom" / "JRS001_f01")["daily"][0], stop_before_pixels=True)
    referenced = rtstruct.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence[0]
    assert referenced.RTReferencedSeriesSequence[0].SeriesInstanceUID == daily.SeriesInstanceUID


def test_destination_refusing_a_result_class_gets_nothing(processed: Processed, receiver: StartReceiver) -> None:
    scp = receiver([RTStructureSetStorage, DeformableSpatialRegistrationStorage])  # no SEG
    files = [processed.job.output_dir / OUTPUT_FILES[name] for name in SEND_ORDER]
    lines: list[str] = []
    with pytest.raises(SendError, match="does not accept Segmentation Storage; nothing sent"):
        send_results(files, Destination("PLANNING", "127.0.0.1", scp.port), "JRSNODE", attempts=3, log=lines.append)
    assert scp.received == []
    assert lines == []  # not retried: the destination's classes do not change

    # the same results to a destination that takes them all: the refusal was about the class, not the files
    complete = receiver([SegmentationStorage, DeformableSpatialRegistrationStorage, RTStructureSetStorage])
    send_results(files, Destination("PLANNING", "127.0.0.1", complete.port), "JRSNODE", log=lines.append)
    assert len(complete.received) == 3


def test_two_patients_under_one_patient_id_are_refused(
    start_node: StartNode, receiver: StartReceiver, node_sessions: Path
) -> None:
    """Planning CT and RTSTRUCT of JRS001 with the daily CT of JRS002 relabelled with JRS001's Patient ID: one job,
    refused before processing because name and birth date differ; nothing sent, data kept."""
    scp = receiver()
    node = start_node(scp.port)
    own, other = (session_parts(node_sessions / "dicom" / name) for name in ("JRS001_f01", "JRS002_f01"))
    patient_id = pydicom.dcmread(own["rtstruct"][0]).PatientID
    daily = [pydicom.dcmread(path) for path in other["daily"]]
    for ds in daily:
        ds.PatientID = patient_id

    c_store([*own["planning"], *own["rtstruct"], *daily], node.port)
    assert node.wait_idle(60)

    (job,) = jobs_of(node)
    assert job.state == "failed"
    assert job.reason.startswith("refused, a session must hold one patient")
    assert "belong to different patients" in job.reason and "PatientBirthDate" in job.reason
    assert "started" in job.times and "processed" not in job.times  # refused before any processing
    assert scp.received == [] and not job.output_dir.exists()
    assert job.instances == len(own["planning"]) + 1 + len(daily) == len(list(job.input_dir.iterdir()))


def test_one_job_at_a_time_per_patient(start_node: StartNode, node_sessions: Path, tmp_path: Path) -> None:
    script, flag = tmp_path / "wait_for_flag.py", tmp_path / "flag"
    script.write_text(WAIT_FOR_FLAG)
    command = f"{sys.executable} {script} {flag} {{input}} {{output}}"
    node = start_node(free_port(), app_command=command, max_parallel_jobs=2)
    first, second = (session_files(node_sessions / "dicom" / name) for name in ("JRS001_f01", "JRS002_f01"))

    c_store(first, node.port)
    _wait_for(node, lambda jobs: [job.state for job in jobs] == ["running"])
    c_store(first, node.port)  # the same patient again while the first job runs
    _wait_for(node, lambda jobs: [job.state for job in jobs] == ["running", "queued"])
    time.sleep(1.0)  # several scheduler ticks with a free slot: only the per-patient rule holds the job back
    assert [job.state for job in jobs_of(node)] == ["running", "queued"]
    c_store(second, node.port)  # another patient takes the free slot
    _wait_for(node, lambda jobs: [job.state for job in jobs] == ["running", "queued", "running"])

    flag.touch()
    assert node.wait_idle(60)
    one, again, other = jobs_of(node)
    assert one.patient == again.patient != other.patient
    assert again.times["started"] >= one.times["finished"]
    assert other.times["started"] < one.times["finished"]
    for job in (one, again, other):  # the command wrote nothing: failed, nothing sent
        assert job.state == "failed" and job.reason.startswith("processing ended without rtstruct.dcm")


def test_job_timeout_stops_processing(start_node: StartNode, node_sessions: Path, tmp_path: Path) -> None:
    script = tmp_path / "wait_for_flag.py"
    script.write_text(WAIT_FOR_FLAG)
    command = f"{sys.executable} {script} {tmp_path / 'never'} {{input}} {{output}}"
    node = start_node(free_port(), app_command=command, job_timeout_s=1.0)

    c_store(session_files(node_sessions / "dicom" / "JRS001_f01"), node.port)
    assert node.wait_idle(60)

    (job,) = jobs_of(node)
    assert job.state == "failed" and job.reason == "processing stopped after the job timeout of 1 s"
    assert len(list(job.input_dir.iterdir())) == job.instances


def test_a_resent_instance_counts_once(start_node: StartNode, node_sessions: Path) -> None:
    node = start_node(free_port(), quiet_s=30.0)
    rtstruct = session_parts(node_sessions / "dicom" / "JRS001_f01")["rtstruct"]
    c_store([*rtstruct, *rtstruct], node.port)
    c_store([deepcopy(pydicom.dcmread(rtstruct[0]))], node.port)
    (job,) = jobs_of(node)
    assert job.state == "receiving" and job.instances == 1 and len(list(job.input_dir.iterdir())) == 1
    (stored,) = job.input_dir.iterdir()
    assert node.store.used_bytes == stored.stat().st_size  # the quota counts the instance once
