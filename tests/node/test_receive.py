"""What the node accepts over the network: C-ECHO, the calling AE titles it knows, the storage classes it needs, the
quota, and one job per patient. No pipeline runs here (refused or incomplete sessions fail before one starts)."""

from __future__ import annotations

import json
import time
from copy import deepcopy
from pathlib import Path

import pydicom
import pytest
from node_testing import NODE_AET, PACS_AET, StartNode, c_store, free_port, jobs_of, session_parts
from pydicom.uid import generate_uid
from pynetdicom import AE, evt
from pynetdicom.sop_class import MRImageStorage, RTPlanStorage, Verification


def _as_class(ds: pydicom.Dataset, sop_class: str, modality: str) -> pydicom.Dataset:
    """A copy of ``ds`` as another storage class, with a new SOP Instance UID."""
    copy = deepcopy(ds)
    copy.SOPClassUID = copy.file_meta.MediaStorageSOPClassUID = sop_class
    copy.SOPInstanceUID = copy.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    copy.Modality = modality
    return copy


def test_echo_is_answered(start_node: StartNode) -> None:
    node = start_node(free_port())
    ae = AE(ae_title=PACS_AET)
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", node.port, ae_title=NODE_AET)
    assert assoc.is_established
    status = assoc.send_c_echo()
    assoc.release()
    assert status.Status == 0x0000


def test_unknown_calling_ae_title_is_rejected(start_node: StartNode, node_sessions: Path) -> None:
    node = start_node(free_port())
    responses = []
    ae = AE(ae_title="INTRUDER")
    ae.add_requested_context(Verification)
    assoc = ae.associate(
        "127.0.0.1",
        node.port,
        ae_title=NODE_AET,
        evt_handlers=[(evt.EVT_ACSE_RECV, lambda event: responses.append(event.primitive))],
    )
    assert assoc.is_rejected and not assoc.is_established
    rejection = responses[-1]
    # A-ASSOCIATE-RJ: rejected permanent (1), by the service user (1), calling AE title not recognised (3)
    assert (rejection.result, rejection.result_source, rejection.diagnostic) == (0x01, 0x01, 0x03)
    # nor can it store anything
    with pytest.raises(AssertionError, match="not established"):
        c_store(session_parts(node_sessions / "dicom" / "JRS001_f01")["rtstruct"], node.port, calling="INTRUDER")
    assert not jobs_of(node)


def test_storage_classes_it_does_not_need_are_refused(start_node: StartNode, node_sessions: Path) -> None:
    node = start_node(free_port())
    ct = pydicom.dcmread(session_parts(node_sessions / "dicom" / "JRS001_f01")["daily"][0])
    mr, plan = (
        _as_class(ct, sop_class, modality)
        for sop_class, modality in ((MRImageStorage, "MR"), (RTPlanStorage, "RTPLAN"))
    )
    no_patient = deepcopy(ct)
    no_patient.SOPInstanceUID = generate_uid()
    del no_patient.PatientID
    escaping = deepcopy(ct)  # a UID that is no UID must not name a file outside the job
    escaping.SOPInstanceUID = escaping.file_meta.MediaStorageSOPInstanceUID = "../../../escaped"

    statuses = c_store([mr, plan, no_patient, escaping, ct], node.port)

    # 0122: SOP Class not supported; A900: the data set does not fit (no Patient ID, no UID); the CT is kept
    assert statuses == [0x0122, 0x0122, 0xA900, 0xA900, 0x0000]
    jobs = jobs_of(node)
    assert len(jobs) == 1 and jobs[0].instances == 1
    assert [p.name for p in jobs[0].input_dir.iterdir()] == [f"CT.{ct.SOPInstanceUID}.dcm"]


def test_quota_refuses_instances_beyond_it(start_node: StartNode, node_sessions: Path) -> None:
    files = session_parts(node_sessions / "dicom" / "JRS001_f01")["daily"][:6]
    size = max(path.stat().st_size for path in files)
    node = start_node(free_port(), quota_bytes=int(3.5 * size))

    statuses = c_store(files, node.port)

    assert statuses[:3] == [0x0000] * 3
    assert statuses[3:] == [0xA700] * 3  # Refused: out of resources
    assert sum(p.stat().st_size for p in jobs_of(node)[0].input_dir.iterdir()) <= 3.5 * size


def test_instances_are_grouped_by_patient_and_never_combined(start_node: StartNode, node_sessions: Path) -> None:
    """Planning CT + RTSTRUCT of one patient and the daily CT of another in one association: two jobs, each of one
    patient, each refused as incomplete with the selection's reason; nothing is sent, the data stay."""
    destination = free_port()  # nothing listens there: a result sent would fail the job with another reason
    node = start_node(destination)
    first = session_parts(node_sessions / "dicom" / "JRS001_f01")
    second = session_parts(node_sessions / "dicom" / "JRS002_f01")
    sent = [*first["planning"], *first["rtstruct"], *second["daily"]]

    assert set(c_store(sent, node.port)) == {0x0000}
    assert node.wait_idle(60)

    jobs = jobs_of(node)
    assert len(jobs) == 2
    planning_job, daily_job = sorted(jobs, key=lambda job: len(job.series), reverse=True)
    assert planning_job.instances == len(first["planning"]) + 1 and daily_job.instances == len(second["daily"])
    assert planning_job.patient != daily_job.patient
    assert planning_job.state == daily_job.state == "failed"
    assert planning_job.reason.startswith("refused, not a complete session") and "no daily CT" in planning_job.reason
    assert daily_job.reason.startswith("refused, not a complete session") and "no RTSTRUCT" in daily_job.reason
    for job in jobs:
        assert len(list(job.input_dir.iterdir())) == job.instances  # received data kept
        assert not job.output_dir.exists() and job.sent == []
        assert json.loads((job.folder / "job.json").read_text())["reason"] == job.reason


def test_retention_deletes_finished_jobs(start_node: StartNode, node_sessions: Path) -> None:
    node = start_node(free_port(), retention_s=1.0)
    c_store(session_parts(node_sessions / "dicom" / "JRS001_f01")["rtstruct"], node.port)
    assert node.wait_idle(30)
    (job,) = jobs_of(node)
    assert job.state == "failed"
    folder = job.folder
    deadline = job.times["finished"] + 30
    while folder.exists() and time.time() < deadline:
        time.sleep(0.2)
    assert not folder.exists()
    assert not jobs_of(node)


def test_a_pause_inside_an_association_does_not_split_the_session(start_node: StartNode, node_sessions: Path) -> None:
    node = start_node(free_port(), quiet_s=0.2)
    parts = session_parts(node_sessions / "dicom" / "JRS001_f01")
    first, second = pydicom.dcmread(parts["rtstruct"][0]), pydicom.dcmread(parts["planning"][0])
    ae = AE(ae_title=PACS_AET)
    for ds in (first, second):
        ae.add_requested_context(ds.SOPClassUID)
    assoc = ae.associate("127.0.0.1", node.port, ae_title=NODE_AET)
    assert assoc.send_c_store(first).Status == 0x0000
    time.sleep(1.0)  # five quiet times without an instance, the association open
    assert [job.state for job in jobs_of(node)] == ["receiving"]
    assert assoc.send_c_store(second).Status == 0x0000
    assoc.release()
    assert node.wait_idle(30)
    (job,) = jobs_of(node)
    assert job.instances == 2 and job.times["complete"] - job.last_received >= 0.2
