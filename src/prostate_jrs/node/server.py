"""The DICOM node: a pynetdicom storage SCP that turns received sessions into jobs and sends their results on.

Receiving (association threads): Verification (C-ECHO) is answered; a C-STORE of a CT Image or RT Structure Set is
stored in its patient's receiving job (:class:`prostate_jrs.node.jobs.JobStore`); every other storage class is
refused with status 0122 (SOP Class not supported), an instance that would exceed the work folder's quota with A700
(out of resources), one without Patient ID or with a SOP Class that differs from the request with A900. Associations
from calling AE titles not on the allowed list are rejected (reason: calling AE title not recognised).

A scheduler thread completes quiet sessions (the associations that brought them ended, then nothing arrived for
``quiet_s``), starts queued jobs (one per patient at a time, at most
``max_parallel_jobs`` in all), each in its own thread that runs :func:`prostate_jrs.node.runner.process_job` and then
:func:`prostate_jrs.node.sender.send_results`, and deletes finished jobs after the retention time.
"""

from __future__ import annotations

import logging
import re
import subprocess
import threading
import time
from typing import TYPE_CHECKING, cast

from pydicom.dataset import Dataset
from pydicom.uid import UID
from pynetdicom import AE, AllStoragePresentationContexts, evt

# pynetdicom makes its SOP Class names at import time, so the type checker does not see them
from pynetdicom.sop_class import CTImageStorage, RTStructureSetStorage, Verification  # type: ignore[attr-defined]

from prostate_jrs.node.config import NodeConfig
from prostate_jrs.node.jobs import FINISHED, Job, JobStore, QuotaExceededError
from prostate_jrs.node.runner import JobFailedError, process_job
from prostate_jrs.node.sender import SendError, send_results

if TYPE_CHECKING:
    from pynetdicom.transport import ThreadedAssociationServer

__all__ = ["ACCEPTED_SOP_CLASSES", "DicomNode"]

_log = logging.getLogger("prostate_jrs.node")

ACCEPTED_SOP_CLASSES: dict[str, str] = {CTImageStorage: "CT", RTStructureSetStorage: "RTSTRUCT"}
"""Storage SOP Classes the node keeps, with the Modality their files are named after; all others are refused."""

_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_UID_KEYS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")
_REFUSED_CLASS, _OUT_OF_RESOURCES, _DOES_NOT_MATCH, _CANNOT_UNDERSTAND = 0x0122, 0xA700, 0xA900, 0xC000


def _status(code: int, comment: str) -> Dataset:
    status = Dataset()
    status.Status = code
    status.ErrorComment = comment[:64]  # LO: 64 characters
    return status


class DicomNode:
    """Storage SCP, job scheduler and result sender. ``start()`` returns at once; ``stop()`` ends everything.

    Args:
        config: the node's settings.
    """

    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        config.workdir.mkdir(parents=True, exist_ok=True)
        self.store = JobStore(config.workdir, config.quota_bytes)
        self._stopping = threading.Event()
        self._server: ThreadedAssociationServer | None = None
        self._scheduler: threading.Thread | None = None
        self._workers: dict[str, threading.Thread] = {}
        self._children: dict[str, subprocess.Popen[bytes]] = {}

    @property
    def port(self) -> int:
        """The port listened on (the one chosen when ``config.port`` is 0)."""
        if self._server is None:
            raise RuntimeError("the node is not started")
        return int(self._server.server_address[1])

    def start(self) -> None:
        """Listen and schedule in background threads.

        Raises:
            OSError: if the address cannot be bound (port in use or not allowed).
        """
        ae = AE(ae_title=self.config.ae_title)
        for context in AllStoragePresentationContexts:  # accepted at negotiation: refused classes get their status
            ae.add_supported_context(cast(UID, context.abstract_syntax))  # set in every one of those contexts
        ae.add_supported_context(Verification)
        ae.require_calling_aet = list(self.config.allowed_calling_aets)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.config.network_timeout_s
        handlers: list[evt.EventHandlerType] = [
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_CONN_CLOSE, lambda event: self.store.association_ended(id(event.assoc))),
        ]
        self._server = ae.start_server((self.config.host, self.config.port), block=False, evt_handlers=handlers)
        self._scheduler = threading.Thread(target=self._schedule, name="node-scheduler", daemon=True)
        self._scheduler.start()
        allowed = ", ".join(self.config.allowed_calling_aets) or "any (no --allow given)"
        _log.info(
            f"{self.config.ae_title} listening on {self.config.host}:{self.port}; calling AE titles allowed: "
            f"{allowed}; results to {self.config.destination}; work folder {self.config.workdir}"
        )

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stop listening, stop running jobs' children (those jobs fail as interrupted) and wait for the threads."""
        self._stopping.set()
        if self._server is not None:
            self._server.shutdown()
        if self._scheduler is not None:
            self._scheduler.join(timeout_s)  # no job starts after this
        for child in list(self._children.values()):
            child.kill()
        for thread in list(self._workers.values()):
            thread.join(timeout_s)

    def wait_idle(self, timeout_s: float) -> bool:
        """Wait until no job is receiving, queued or being processed; ``False`` on timeout (for tests and tools)."""
        deadline = time.monotonic() + timeout_s
        while True:
            with self.store.lock:
                if all(job.state in FINISHED for job in self.store.jobs.values()):
                    return True
            if time.monotonic() > deadline:
                return False
            time.sleep(0.1)

    # ------------------------------------------------------------------------------------------------- receiving

    def _on_echo(self, event: evt.Event) -> int:
        return 0x0000

    def _on_store(self, event: evt.Event) -> int | Dataset:
        affected_class = event.request.AffectedSOPClassUID
        if affected_class is None:  # UID(None) would raise the same, less clearly
            raise TypeError("C-STORE request without an Affected SOP Class UID")
        request_class = UID(affected_class)
        calling = event.assoc.requestor.ae_title
        modality = ACCEPTED_SOP_CLASSES.get(request_class)
        if modality is None:
            _log.info(f"refused a {request_class.name} instance from {calling}: not needed (status 0122)")
            return _status(_REFUSED_CLASS, "SOP Class not supported: this node takes CT and RTSTRUCT only")
        try:
            ds = event.dataset
            patient_id, sop_class = str(ds.get("PatientID", "") or ""), str(ds.get("SOPClassUID", ""))
            uids = {key: str(ds.get(key, "") or "") for key in _UID_KEYS}
            issuer = str(ds.get("IssuerOfPatientID", "") or "")
        except Exception as err:  # pydicom parses lazily: any element may fail to decode
            _log.warning(f"refused an instance from {calling}: cannot decode it ({type(err).__name__})")
            return _status(_CANNOT_UNDERSTAND, "cannot decode the data set")
        # UIDs name the stored files: only DICOM UIDs (digits and dots) may get there
        if sop_class != request_class or not patient_id or not all(_UID.match(uid) for uid in uids.values()):
            _log.warning(f"refused a {modality} instance from {calling}: SOP Class, Patient ID or UID missing or wrong")
            return _status(_DOES_NOT_MATCH, "SOP Class differs, or Patient ID or a UID missing or invalid")
        try:
            self.store.receive(
                event.encoded_dataset(),
                patient=self.store.patient_key(patient_id, issuer),
                study_uid=uids["StudyInstanceUID"],
                series_uid=uids["SeriesInstanceUID"],
                modality=modality,
                sop_uid=uids["SOPInstanceUID"],
                sender=calling,
                association=id(event.assoc),
            )
        except QuotaExceededError as err:
            _log.warning(f"refused an instance from {calling}: {err} (status A700)")
            return _status(_OUT_OF_RESOURCES, "work folder quota reached")
        except OSError as err:
            _log.error(f"could not store an instance from {calling}: {err}")
            return _status(_OUT_OF_RESOURCES, "cannot write to the work folder")
        return 0x0000

    # ------------------------------------------------------------------------------------------------ scheduling

    def _schedule(self) -> None:
        tick = min(1.0, self.config.quiet_s / 4)
        self.store.cleanup(self.config.retention_s)
        while not self._stopping.wait(tick):
            # network_timeout_s closes an idle association: a job that waited that long too is complete anyway
            self.store.complete_quiet(self.config.quiet_s, self.config.quiet_s + self.config.network_timeout_s)
            for job in self.store.start_runnable(self.config.max_parallel_jobs):
                thread = threading.Thread(target=self._run, args=(job,), name=f"job-{job.job_id}", daemon=True)
                self._workers[job.job_id] = thread
                thread.start()
            self.store.cleanup(self.config.retention_s)
            for job_id in [k for k, t in self._workers.items() if not t.is_alive()]:
                del self._workers[job_id]

    def _run(self, job: Job) -> None:
        """Process and send one job; every way out ends it as ``done`` or ``failed`` with its reason."""

        def register(child: subprocess.Popen[bytes]) -> None:
            self._children[job.job_id] = child  # so that stop() can end it

        try:
            files = process_job(job, self.config, on_start=register)
            job.times["processed"] = time.time()
            self.store.set_state(job, "sending")
            send_results(
                files,
                self.config.destination,
                self.config.ae_title,
                attempts=self.config.send_attempts,
                retry_delay_s=self.config.retry_delay_s,
                timeout_s=self.config.network_timeout_s,
                log=job.log,
            )
            job.sent = [path.name for path in files]
            job.times["sent"] = time.time()
            self.store.finish(job, "done")
        except (JobFailedError, SendError) as err:
            reason = f"interrupted: the node stopped; {err}" if self._stopping.is_set() else str(err)
            self.store.finish(job, "failed", reason)
        except Exception as err:  # a bug must not leave the job hanging as running: record it, keep the data
            _log.exception(f"job {job.job_id}: unexpected error")
            self.store.finish(job, "failed", f"unexpected error in the node: {type(err).__name__}: {err}")
        finally:
            self._children.pop(job.job_id, None)


def serve(config: NodeConfig, stop: threading.Event) -> None:
    """Run a node until ``stop`` is set (the CLI sets it on SIGINT or SIGTERM)."""
    node = DicomNode(config)
    node.start()
    try:
        stop.wait()
    finally:
        _log.info("stopping")
        node.stop()
