"""A DICOM node in front of the pipeline: receive a session by C-STORE, process it, send the results back.

``prostate-jrs node`` runs :class:`DicomNode` (:mod:`prostate_jrs.node.server`): a pynetdicom storage SCP that takes
CT and RTSTRUCT, groups them into one job per patient (:mod:`prostate_jrs.node.jobs`), runs a job when its session
has been quiet for a while (:mod:`prostate_jrs.node.runner`: :func:`prostate_jrs.dicom_session.process_session` in a
child process, or the app itself) and sends RTSTRUCT, SEG and the registration object by C-STORE
(:mod:`prostate_jrs.node.sender`).
"""

from __future__ import annotations

from prostate_jrs.node.config import Destination, NodeConfig
from prostate_jrs.node.jobs import Job, JobStore
from prostate_jrs.node.runner import JobFailedError, process_job
from prostate_jrs.node.sender import SendError, send_results
from prostate_jrs.node.server import ACCEPTED_SOP_CLASSES, DicomNode, serve

__all__ = [
    "ACCEPTED_SOP_CLASSES",
    "Destination",
    "DicomNode",
    "Job",
    "JobFailedError",
    "JobStore",
    "NodeConfig",
    "SendError",
    "process_job",
    "send_results",
    "serve",
]
