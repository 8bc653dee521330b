"""The work folder's jobs without the network: pseudonyms, a restart of the node, retention, the settings' checks."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest

from prostate_jrs.node import Destination, JobStore, NodeConfig


def _receive(
    store: JobStore, patient_id: str, sop_uid: str, series_uid: str = "1.2.3.1", association: int | None = None
) -> None:
    store.receive(
        b"DICM-ish bytes of one instance",
        patient=store.patient_key(patient_id),
        study_uid="1.2.3",
        series_uid=series_uid,
        modality="CT",
        sop_uid=sop_uid,
        association=association,
    )


def test_patient_keys_are_pseudonyms_of_the_work_folder(tmp_path: Path) -> None:
    store, other = JobStore(tmp_path / "a", 2**20), JobStore(tmp_path / "b", 2**20)
    key = store.patient_key("PJRS-0001")
    assert key == JobStore(tmp_path / "a", 2**20).patient_key("PJRS-0001")  # stable across restarts
    assert key != store.patient_key("PJRS-0002") and key != store.patient_key("PJRS-0001", issuer="OTHER")
    assert key != other.patient_key("PJRS-0001")  # another site's node: unlinkable
    assert (tmp_path / "a" / ".node-key").stat().st_mode & 0o777 == 0o600

    _receive(store, "PJRS-0001", "1.2.3.1.1")
    (job,) = store.jobs.values()
    assert "PJRS-0001" not in (job.folder / "job.json").read_text() + job.log_path.read_text()


def test_a_restart_fails_interrupted_jobs_and_completes_receiving_ones(tmp_path: Path) -> None:
    store = JobStore(tmp_path, 2**20)
    _receive(store, "A", "1.1")
    _receive(store, "B", "2.1")
    receiving, running = sorted(store.jobs.values(), key=lambda job: job.created)
    store.set_state(running, "running")

    restarted = JobStore(tmp_path, 2**20)

    after = restarted.jobs
    assert after[running.job_id].state == "failed"
    assert after[running.job_id].reason == "interrupted: the node stopped while the job was running; data kept"
    assert after[receiving.job_id].state == "receiving"
    assert restarted.used_bytes == store.used_bytes  # the quota counts what is already there
    _receive(restarted, "A", "1.2")  # the same patient's instances join the unfinished job
    assert after[receiving.job_id].instances == 2 and len(after) == 2
    assert restarted.complete_quiet(quiet_s=0.0, stale_s=60.0) == [after[receiving.job_id]]


def test_a_session_is_not_complete_while_its_association_is_open(tmp_path: Path) -> None:
    """A sender that pauses longer than the quiet time inside one association does not split its session."""
    store = JobStore(tmp_path, 2**20)
    _receive(store, "A", "1.1", association=7)
    (job,) = store.jobs.values()
    time.sleep(0.05)
    assert store.complete_quiet(quiet_s=0.01, stale_s=60.0) == []  # quiet, but association 7 is still open
    _receive(store, "A", "1.2", association=7)  # the same job after the pause
    store.association_ended(7)
    assert store.complete_quiet(quiet_s=60.0, stale_s=120.0) == []  # the quiet time runs from the association's end
    time.sleep(0.05)
    assert store.complete_quiet(quiet_s=0.01, stale_s=60.0) == [job] and job.instances == 2
    # an association whose end is never seen: complete after the stale time
    _receive(store, "B", "2.1", association=8)
    time.sleep(0.05)
    assert [j.instances for j in store.complete_quiet(quiet_s=0.01, stale_s=0.02)] == [1]


def test_retention_keeps_young_and_unfinished_jobs(tmp_path: Path) -> None:
    store = JobStore(tmp_path, 2**20)
    for patient in ("A", "B", "C"):
        _receive(store, patient, f"{patient}.1")
    done, failed, receiving = sorted(store.jobs.values(), key=lambda job: job.created)
    store.finish(done, "done")
    store.finish(failed, "failed", "a reason")
    failed.times["finished"] = time.time() - 3600  # finished an hour ago
    assert store.cleanup(retention_s=1800) == [failed.job_id]
    assert not failed.folder.exists() and done.folder.exists() and receiving.folder.exists()
    assert json.loads((done.folder / "job.json").read_text())["state"] == "done"
    assert store.cleanup(retention_s=0) == [done.job_id]
    assert list(store.jobs) == [receiving.job_id]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"ae_title": "A\\B"}, "node AE title 'A\\\\B' is not a DICOM AE title"),
        ({"ae_title": "SEVENTEEN_LETTERS"}, "is not a DICOM AE title"),
        ({"allowed_calling_aets": ("",)}, "allowed calling AE title '' is not a DICOM AE title"),
        ({"port": 70000}, "port 70000 is not a TCP port"),
        ({"quiet_s": 0}, "quiet_s must be positive"),
        ({"app_command": "run-map {input}"}, "lacks {output}"),
        ({"bundle": Path("/nonexistent")}, "/nonexistent/configs/inference.json: not found"),
    ],
)
def test_settings_are_checked(tmp_path: Path, change: dict, message: str) -> None:
    settings = {"ae_title": "JRSNODE", "port": 11112, "workdir": tmp_path, "destination": Destination.parse("A@h:1")}
    with pytest.raises(ValueError, match=re.escape(message)):
        NodeConfig(**{**settings, "bundle": tmp_path, **change})


@pytest.mark.parametrize(
    ("text", "expected"),
    [("PACS@10.0.0.5:104", ("PACS", "10.0.0.5", 104)), ("TPS@[::1]:4242", ("TPS", "::1", 4242))],
)
def test_destination_parses(text: str, expected: tuple[str, str, int]) -> None:
    destination = Destination.parse(text)
    assert (destination.ae_title, destination.host, destination.port) == expected
    assert Destination.parse(str(destination)) == destination


@pytest.mark.parametrize("text", ["PACS", "PACS@host", "@host:104", "PACS@host:port"])
def test_destination_refuses_malformed(text: str) -> None:
    with pytest.raises(ValueError, match="is not of the form AET@HOST:PORT"):
        Destination.parse(text)
