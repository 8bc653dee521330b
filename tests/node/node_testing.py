"""Helpers of the DICOM node tests: a free port, a session's parts, a C-STORE client standing in for a PACS, a storage
SCP standing in for the results' destination, and the node's test settings. Fixtures are in ``conftest.py``."""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.sop_class import DeformableSpatialRegistrationStorage, RTStructureSetStorage, SegmentationStorage

from prostate_jrs.node import Destination, DicomNode, Job, NodeConfig

StartNode = Callable[..., DicomNode]
"""The ``start_node`` fixture: ``start_node(destination_port, **config_overrides)``."""
StartReceiver = Callable[..., "StorageReceiver"]
"""The ``receiver`` fixture: ``receiver(sop_classes=RESULT_CLASSES)``."""

NODE_AET, PACS_AET, DEST_AET = "JRSNODE", "PACS", "PLANNING"
RESULT_CLASSES = (SegmentationStorage, DeformableSpatialRegistrationStorage, RTStructureSetStorage)


def free_port() -> int:
    """A TCP port nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def session_parts(folder: Path) -> dict[str, list[Path]]:
    """The files of a session folder by part: ``planning`` (CT), ``rtstruct``, ``daily`` (CT)."""
    headers = {path: pydicom.dcmread(path, stop_before_pixels=True) for path in sorted(folder.glob("*.dcm"))}
    rtstruct = [p for p, ds in headers.items() if ds.Modality == "RTSTRUCT"]
    planning_for = pydicom.dcmread(rtstruct[0]).ReferencedFrameOfReferenceSequence[0].FrameOfReferenceUID
    cts = [p for p, ds in headers.items() if ds.Modality == "CT"]
    return {
        "planning": [p for p in cts if headers[p].FrameOfReferenceUID == planning_for],
        "rtstruct": rtstruct,
        "daily": [p for p in cts if headers[p].FrameOfReferenceUID != planning_for],
    }


def session_files(folder: Path) -> list[Path]:
    """Planning CT, RTSTRUCT and daily CT of a session folder, in the order a planning system sends them."""
    parts = session_parts(folder)
    return [*parts["planning"], *parts["rtstruct"], *parts["daily"]]


def c_store(items: Sequence[Path | Dataset], port: int, calling: str = PACS_AET, called: str = NODE_AET) -> list[int]:
    """Send files or data sets to 127.0.0.1:``port`` in one association, as a PACS would; returns the statuses.

    Raises:
        AssertionError: if the association is not established.
    """
    ae = AE(ae_title=calling)
    datasets = [item if isinstance(item, Dataset) else pydicom.dcmread(item) for item in items]
    for uid in dict.fromkeys(str(ds.SOPClassUID) for ds in datasets):
        ae.add_requested_context(uid)
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    assert assoc.is_established, f"association with the node on port {port} not established"
    try:
        return [int(assoc.send_c_store(ds).Status) for ds in datasets]
    finally:
        assoc.release()


@dataclass
class StorageReceiver:
    """A storage SCP standing in for the planning system that receives the results.

    Args:
        port: its port.
        received: (time, SOP Class UID, data set) of each instance stored, in order.
    """

    port: int
    received: list[tuple[float, str, Dataset]] = field(default_factory=list)
    server: Any = None

    def stop(self) -> None:
        """Stop listening."""
        self.server.shutdown()


def start_receiver(sop_classes: Sequence[str] = RESULT_CLASSES, port: int | None = None) -> StorageReceiver:
    """A started storage SCP on ``port`` (default: a free one) that accepts ``sop_classes`` only."""
    ae = AE(ae_title=DEST_AET)
    for uid in sop_classes:
        ae.add_supported_context(uid)
    scp = StorageReceiver(port=port or free_port())

    def on_store(event: evt.Event) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        scp.received.append((time.time(), str(event.request.AffectedSOPClassUID), ds))
        return 0x0000

    scp.server = ae.start_server(("127.0.0.1", scp.port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    return scp


def node_config(workdir: Path, bundle: Path, destination_port: int, **overrides: Any) -> NodeConfig:
    """Test settings: port 0, loopback, PACS allowed, half a second of quiet time, short retries and timeouts."""
    config = NodeConfig(
        ae_title=NODE_AET,
        port=0,
        host="127.0.0.1",
        workdir=workdir,
        destination=Destination(DEST_AET, "127.0.0.1", destination_port),
        bundle=bundle,
        allowed_calling_aets=(PACS_AET,),
        quiet_s=0.5,
        send_attempts=2,
        retry_delay_s=0.2,
        network_timeout_s=10.0,
        job_timeout_s=240.0,
    )
    return replace(config, **overrides)


def jobs_of(node: DicomNode) -> list[Job]:
    """The node's jobs, oldest first."""
    with node.store.lock:
        return sorted(node.store.jobs.values(), key=lambda job: job.created)


class LogRecorder(logging.Handler):
    """Keeps the lines of a logger while attached (to check them for patient identifiers)."""

    def __init__(self, logger: str = "prostate_jrs.node") -> None:
        super().__init__(logging.DEBUG)
        self.logger = logging.getLogger(logger)
        self.lines: list[str] = []
        self._guard = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        with self._guard:
            self.lines.append(record.getMessage())

    def __enter__(self) -> LogRecorder:
        self._level = self.logger.level
        self.logger.setLevel(logging.DEBUG)
        self.logger.addHandler(self)
        return self

    def __exit__(self, *exc: object) -> None:
        self.logger.removeHandler(self)
        self.logger.setLevel(self._level)


@dataclass
class Processed:
    """One session sent to a node by C-STORE and processed with the tiny bundle.

    Args:
        job: the node's job.
        node_log: the node's log lines.
        sent: the session's files, in the order sent.
    """

    job: Job
    node_log: list[str]
    sent: list[Path]

    @property
    def patient_identifiers(self) -> list[str]:
        """Patient ID, name and birth date of the session."""
        header = pydicom.dcmread(self.sent[0], stop_before_pixels=True)
        return [header.PatientID, str(header.PatientName), header.PatientBirthDate]
