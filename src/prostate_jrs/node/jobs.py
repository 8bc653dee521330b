"""Jobs of the DICOM node: what was received for one patient, its state, its log, and the work folder's accounting.

Layout of the work folder::

    W/.node-key                 secret of the pseudonymous patient keys (created once, mode 600)
    W/jobs/<job id>/job.json    state, reason, counts and times (no patient identifier)
    W/jobs/<job id>/job.log     what happened, one timestamped line per event, and the pipeline's output
    W/jobs/<job id>/input/      the received instances, <Modality>.<SOP Instance UID>.dcm
    W/jobs/<job id>/output/     rtstruct.dcm, seg.dcm, registration.dcm, qa.json, qa.png (all or none)

A job collects the instances of one patient (Patient ID and Issuer of Patient ID) until the associations that brought
them have ended and nothing of that patient has arrived for the quiet time since; then it is complete (``queued``).
A pause inside an open association (a slow sender) does not complete a session; an association left open without
traffic is closed by the node's network timeout. Instances arriving later start the patient's next job.
States: ``receiving`` -> ``queued`` -> ``running`` -> ``sending`` -> ``done`` or ``failed`` (with a reason).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
import logging
import os
import secrets
import shutil
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from prostate_jrs.errors import QuotaExceededError

__all__ = ["ACTIVE", "FINISHED", "Job", "JobStore", "QuotaExceededError", "folder_size"]

_log = logging.getLogger("prostate_jrs.node")

FINISHED = ("done", "failed")
"""States of a job that is over (its folder is deleted after the retention time)."""
ACTIVE = ("running", "sending")
"""States of a job being processed (at most one per patient)."""


def folder_size(folder: Path) -> int:
    """Bytes of the files under ``folder`` (0 if it does not exist)."""
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file()) if folder.is_dir() else 0


def _now_text(seconds: float | None = None) -> str:
    return dt.datetime.fromtimestamp(time.time() if seconds is None else seconds).isoformat(timespec="milliseconds")


@dataclass
class Job:
    """One patient's session as received, and what became of it.

    Args:
        job_id: pseudonymous id (date, time and random digits; the folder's name).
        folder: the job's folder.
        patient: pseudonymous patient key (:meth:`JobStore.patient_key`).
        state: ``receiving``, ``queued``, ``running``, ``sending``, ``done`` or ``failed``.
        created: when the first instance arrived (epoch seconds).
        last_received: when the last instance arrived, or the last association that brought some ended.
        instances: instances received (a resent instance counts once).
        series: Series Instance UID -> ``{"modality": ..., "instances": n}``.
        studies: Study Instance UIDs.
        reason: why the job failed.
        times: epoch seconds of ``complete``, ``started``, ``processed``, ``sent``, ``finished``.
        sent: result files sent, in order.
    """

    job_id: str
    folder: Path
    patient: str
    state: str = "receiving"
    created: float = field(default_factory=time.time)
    last_received: float = field(default_factory=time.time)
    instances: int = 0
    series: dict[str, dict[str, Any]] = field(default_factory=dict)
    studies: list[str] = field(default_factory=list)
    reason: str | None = None
    times: dict[str, float] = field(default_factory=dict)
    sent: list[str] = field(default_factory=list)
    open_associations: set[int] = field(default_factory=set, init=False, repr=False, compare=False)
    """Associations that delivered instances and are still open (not saved: none survives a restart)."""

    @property
    def input_dir(self) -> Path:
        """The received instances."""
        return self.folder / "input"

    @property
    def output_dir(self) -> Path:
        """The results (complete or absent)."""
        return self.folder / "output"

    @property
    def log_path(self) -> Path:
        """The job's log."""
        return self.folder / "job.log"

    def log(self, message: str, level: int = logging.INFO, node_log: str | None = "") -> None:
        """Append ``message`` to the job's log and pass it to the node's log.

        Args:
            message: the line (the job's log sits beside the patient's data and may name what is wrong).
            level: logging level in the node's log.
            node_log: what the node's log gets instead (``""``: ``message``; ``None``: nothing), for messages that
                may quote patient attributes.
        """
        with self.log_path.open("a", encoding="utf-8") as log:
            log.write(f"{_now_text()} {message}\n")
        if node_log is not None:
            _log.log(level, f"job {self.job_id} (patient {self.patient}): {node_log or message}")

    def describe(self) -> str:
        """Counts per modality, e.g. ``3 series (CT 2 x 88 instances, RTSTRUCT 1), 2 studies``."""
        by_modality: dict[str, list[int]] = {}
        for entry in self.series.values():
            by_modality.setdefault(entry["modality"], []).append(entry["instances"])
        parts = [f"{modality} {len(n)} x {'/'.join(map(str, n))} instances" for modality, n in by_modality.items()]
        return f"{len(self.series)} series ({', '.join(parts)}), {len(self.studies)} studies"

    def save(self) -> None:
        """Write ``job.json`` (atomically)."""
        document = {key: value for key, value in asdict(self).items() if key not in ("folder", "open_associations")}
        path = self.folder / "job.json"
        tmp = path.with_name(".job.json.tmp")
        tmp.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
        tmp.replace(path)

    @classmethod
    def load(cls, folder: Path) -> Job:
        """Read ``folder/job.json``."""
        document = json.loads((folder / "job.json").read_text(encoding="utf-8"))
        return cls(folder=folder, **document)


class JobStore:
    """The jobs in a work folder: thread-safe receiving, completion, scheduling state and cleanup.

    Args:
        workdir: the work folder (created if missing).
        quota_bytes: the most the jobs may hold together.
    """

    def __init__(self, workdir: Path, quota_bytes: int) -> None:
        self.root = Path(workdir) / "jobs"
        self.root.mkdir(parents=True, exist_ok=True)
        self.quota_bytes = quota_bytes
        self.lock = threading.RLock()
        self.jobs: dict[str, Job] = {}
        self._key = _node_key(Path(workdir) / ".node-key")
        self.used_bytes = self._data_bytes()
        self._load()

    def _data_bytes(self) -> int:
        """Bytes of the jobs' received instances and results (what the quota counts; logs are not)."""
        return sum(folder_size(part) for part in (*self.root.glob("*/input"), *self.root.glob("*/output")))

    def patient_key(self, patient_id: str, issuer: str = "") -> str:
        """A pseudonym of the patient, stable for this work folder (HMAC of Issuer and Patient ID with its key)."""
        digest = hmac.new(self._key, f"{issuer}\\{patient_id}".encode(), hashlib.sha256).hexdigest()
        return digest[:12]

    def _load(self) -> None:
        """Take up the jobs of an earlier run: unfinished receptions are completed anew, interrupted runs fail."""
        for state_file in sorted(self.root.glob("*/job.json")):
            job = Job.load(state_file.parent)
            self.jobs[job.job_id] = job
            if job.state in ("receiving", "queued"):
                job.state, job.last_received = "receiving", time.time()
                job.log("node restarted: the session is complete after the quiet time from now")
                job.save()
            elif job.state in ACTIVE:
                self.finish(job, "failed", f"interrupted: the node stopped while the job was {job.state}; data kept")

    def receive(
        self,
        encoded: bytes,
        *,
        patient: str,
        study_uid: str,
        series_uid: str,
        modality: str,
        sop_uid: str,
        sender: str = "",
        association: int | None = None,
    ) -> Job:
        """Store one instance (a DICOM file's bytes) in the patient's receiving job, starting one if needed.

        Raises:
            QuotaExceededError: if the work folder would exceed its quota (nothing is written).
        """
        with self.lock:
            if self.used_bytes + len(encoded) > self.quota_bytes:
                raise QuotaExceededError(
                    f"work folder quota of {self.quota_bytes / 2**30:.2f} GiB reached ({self.used_bytes} bytes used)"
                )
            job = next((j for j in self.jobs.values() if j.patient == patient and j.state == "receiving"), None)
            job = job or self._new_job(patient)
            path = job.input_dir / f"{modality}.{sop_uid}.dcm"
            previous = path.stat().st_size if path.is_file() else None
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_bytes(encoded)
            tmp.replace(path)  # an instance is in the job folder whole or not at all
            self.used_bytes += len(encoded) - (previous or 0)
            job.last_received = time.time()
            if association is not None:
                job.open_associations.add(association)
            if previous is None:
                self._count(job, study_uid, series_uid, modality, sender)
            return job

    def _count(self, job: Job, study_uid: str, series_uid: str, modality: str, sender: str) -> None:
        job.instances += 1
        entry = job.series.setdefault(series_uid, {"modality": modality, "instances": 0})
        entry["instances"] += 1
        if study_uid not in job.studies:
            job.studies.append(study_uid)
        if entry["instances"] == 1:
            job.log(f"receiving {modality} series {len(job.series)}{f' from {sender}' if sender else ''}")
            job.save()

    def _new_job(self, patient: str) -> Job:
        job_id = f"{dt.datetime.now():%Y%m%d-%H%M%S}-{secrets.token_hex(3)}"
        job = Job(job_id=job_id, folder=self.root / job_id, patient=patient)
        job.input_dir.mkdir(parents=True)
        self.jobs[job_id] = job
        job.log("new job: first instance received")
        job.save()
        return job

    def association_ended(self, association: int) -> None:
        """An association ended: the quiet time of the jobs it delivered to starts now."""
        with self.lock:
            for job in self.jobs.values():
                if association in job.open_associations:
                    job.open_associations.discard(association)
                    job.last_received = time.time()

    def complete_quiet(self, quiet_s: float, stale_s: float) -> list[Job]:
        """Mark as complete (``queued``) every receiving job whose associations have ended and that received nothing
        for ``quiet_s``, or that received nothing for ``stale_s`` (an association whose end was never seen)."""
        now = time.time()

        def complete(job: Job) -> bool:
            idle = now - job.last_received
            return job.state == "receiving" and (idle >= stale_s or (idle >= quiet_s and not job.open_associations))

        with self.lock:
            done = [job for job in self.jobs.values() if complete(job)]
            for job in done:
                job.state = "queued"
                job.times["complete"] = now
                job.log(f"session complete ({quiet_s:g} s quiet): {job.instances} instances in {job.describe()}")
                job.save()
        return done

    def start_runnable(self, max_parallel: int) -> list[Job]:
        """Queued jobs to start now (state set to ``running``), oldest first: at most ``max_parallel`` active in all
        and never two of one patient."""
        with self.lock:
            active = [j for j in self.jobs.values() if j.state in ACTIVE]
            busy = {j.patient for j in active}
            started: list[Job] = []
            for job in sorted((j for j in self.jobs.values() if j.state == "queued"), key=lambda j: j.created):
                if len(active) + len(started) >= max_parallel:
                    break
                if job.patient in busy:
                    continue
                busy.add(job.patient)
                job.state = "running"
                job.times["started"] = time.time()
                job.save()
                started.append(job)
            return started

    def set_state(self, job: Job, state: str) -> None:
        """Move ``job`` to ``state`` (not a finished one: see :meth:`finish`) and save it."""
        with self.lock:
            job.state = state
            job.save()

    def finish(self, job: Job, state: str, reason: str | None = None) -> None:
        """End ``job`` as ``done`` or ``failed`` (with ``reason``); its data stay until the retention time."""
        with self.lock:
            job.state, job.reason = state, reason
            job.times["finished"] = time.time()
            self.used_bytes += folder_size(job.output_dir)
            job.save()
        if state == "failed":  # the reason may quote patient attributes: in the job's folder only
            job.log(f"FAILED: {reason}", logging.WARNING, node_log=f"FAILED; reason in {job.folder / 'job.json'}")
        else:
            job.log("done")

    def cleanup(self, retention_s: float) -> list[str]:
        """Delete finished jobs older than ``retention_s``; returns their ids."""
        now = time.time()
        with self.lock:
            old = [j for j in self.jobs.values() if j.state in FINISHED and now - j.times["finished"] >= retention_s]
            for job in old:
                shutil.rmtree(job.folder, ignore_errors=True)
                del self.jobs[job.job_id]
                _log.info(f"job {job.job_id}: deleted after the retention time ({job.state})")
            if old:
                self.used_bytes = self._data_bytes()
        return [job.job_id for job in old]


def _node_key(path: Path) -> bytes:
    """The work folder's secret for patient pseudonyms; created on first use, readable by its owner only."""
    if not path.is_file():
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(secrets.token_bytes(32))
        tmp.chmod(0o600)
        tmp.replace(path)
    return path.read_bytes()
