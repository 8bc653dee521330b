"""Send a job's results by C-STORE (pynetdicom), all in one association, with retries.

Nothing partial on purpose: every file is read before the first is sent, and the association must accept the storage
class of every result before any C-STORE; a destination that refuses one class gets none (no retry: retrying does not
change what it accepts). A failure after some objects were stored (the connection drops, a C-STORE is refused) is
retried with the whole set; a destination stores a resent instance (same SOP Instance UID) once.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pydicom
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import uid_to_sop_class

from prostate_jrs.errors import SendError
from prostate_jrs.node.config import Destination

__all__ = ["SendError", "send_results"]

_SUCCESS_OR_WARNING = {0x0000, 0x0001, 0x0107, 0x0116, 0xB000, 0xB006, 0xB007}


class _PermanentSendError(SendError):
    """A failure that another attempt cannot change (the destination refuses a storage class or the node)."""


def send_results(
    files: Sequence[Path],
    destination: Destination,
    calling_ae_title: str,
    *,
    attempts: int = 3,
    retry_delay_s: float = 10.0,
    timeout_s: float = 30.0,
    log: Callable[[str], None] = print,
) -> None:
    """C-STORE ``files`` to ``destination`` in order, in one association, trying up to ``attempts`` times.

    Args:
        files: DICOM files, sent in this order.
        destination: called AE title, host and port.
        calling_ae_title: the node's AE title.
        attempts: tries of the whole set.
        retry_delay_s: pause between tries.
        timeout_s: association, DIMSE and network timeout.
        log: receives one line per attempt.

    Raises:
        SendError: if the last attempt failed, or the destination refuses a result's storage class or the node.
    """
    datasets = [pydicom.dcmread(path) for path in files]  # an unreadable result fails before anything is sent
    for attempt in range(1, attempts + 1):
        try:
            stored = _send_once(datasets, destination, calling_ae_title, timeout_s)
        except _PermanentSendError:
            raise
        except SendError as err:
            log(f"send attempt {attempt} of {attempts} to {destination} failed: {err}")
            if attempt == attempts:
                raise SendError(f"results not sent to {destination} after {attempts} attempts; last: {err}") from err
            time.sleep(retry_delay_s)
        else:
            log(f"sent {', '.join(stored)} to {destination} (attempt {attempt})")
            return


def _name(sop_class_uid: str) -> str:
    sop_class = uid_to_sop_class(sop_class_uid)
    return sop_class.name if hasattr(sop_class, "name") else sop_class_uid


def _send_once(
    datasets: Sequence[pydicom.Dataset], destination: Destination, calling_ae_title: str, timeout_s: float
) -> list[str]:
    """One association; returns the names of the storage classes stored, in order."""
    ae = AE(ae_title=calling_ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = timeout_s
    classes = list(dict.fromkeys(str(ds.SOPClassUID) for ds in datasets))
    for uid in classes:
        ae.add_requested_context(uid, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title)
    if assoc.is_rejected:
        raise _PermanentSendError(f"{destination} rejected the association from {calling_ae_title!r}; nothing sent")
    if not assoc.is_established:
        raise SendError(f"no association with {destination} (unreachable, aborted or timed out); nothing sent")
    stored: list[str] = []
    try:
        accepted = {context.abstract_syntax for context in assoc.accepted_contexts}
        refused = [_name(uid) for uid in classes if uid not in accepted]
        if refused:
            raise _PermanentSendError(f"{destination} does not accept {', '.join(refused)}; nothing sent")
        for ds in datasets:
            status = assoc.send_c_store(ds)
            code = int(status.Status) if "Status" in status else None
            if code not in _SUCCESS_OR_WARNING:
                why = "no response" if code is None else f"status 0x{code:04X}"
                done = f"{', '.join(stored)} stored before" if stored else "nothing stored"
                raise SendError(f"{_name(ds.SOPClassUID)} not stored by {destination} ({why}; {done})")
            stored.append(_name(ds.SOPClassUID))
    finally:
        if assoc.is_established:
            assoc.release()
    return stored
