"""One output folder, many runs: a lock, staging folders stamped with their owner, publication that survives a kill.

* :func:`output_lock`: one run writes into an output folder at a time; a second one is refused at once with the
  owner's process and host (an advisory ``flock`` on the folder itself, released by the kernel when the owner dies,
  so a killed run never leaves a stale lock; local file systems).
* :func:`new_staging`: a hidden staging folder stamped with its owner (host, pid, process start time, boot time).
* :func:`publish`: moves the staged files in, the completion file (``qa.json``) last, after removing an older one
  first, so that a folder holding ``qa.json`` holds one complete result, never a mixture of two runs. A journal in
  the staging folder lists the files; a run killed while publishing leaves it, and :func:`recover` completes the
  publication.
* :func:`staged_folder`: a new folder (a dataset, a bundle) built in a hidden sibling and renamed into place, so it
  appears complete or not at all.
* :func:`recover`: removes staging folders whose owner is provably dead (same host, and that process no longer
  exists, or the pid now belongs to a later process, or the machine rebooted), completing interrupted publications;
  folders of live runs, of other hosts or without a stamp are left alone.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import os
import shutil
import socket
import tempfile
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import psutil

from prostate_jrs.errors import OutputFolderBusyError

__all__ = [
    "STAGING_PREFIX",
    "OutputFolderBusyError",
    "discard",
    "new_staging",
    "output_lock",
    "owner_is_dead",
    "owner_stamp",
    "publish",
    "recover",
    "staged_folder",
]

STAGING_PREFIX = ".prostate-jrs.partial-"
_OWNER_FILE = ".owner.json"
_JOURNAL_FILE = ".publishing.json"
_TIME_TOLERANCE_S = 1.0  # psutil's start and boot times are derived from clock ticks and /proc/stat's btime


def owner_stamp() -> dict[str, Any]:
    """This process as the owner of a staging folder: host, pid, process start time and boot time (epoch s)."""
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started": psutil.Process().create_time(),
        "boot": psutil.boot_time(),
    }


def owner_is_dead(stamp: dict[str, Any]) -> bool:
    """Whether the process of a stamp has provably ended: same host, and it is gone or its pid was reused.

    A stamp of another host cannot be checked from here: ``False``.
    """
    if stamp.get("host") != socket.gethostname():
        return False
    if abs(float(stamp.get("boot", 0)) - psutil.boot_time()) > _TIME_TOLERANCE_S:
        return True  # the machine rebooted since: every process of that boot has ended
    try:
        started = psutil.Process(int(stamp["pid"])).create_time()
    except psutil.NoSuchProcess:
        return True
    except psutil.AccessDenied:
        return False
    return abs(started - float(stamp["started"])) > _TIME_TOLERANCE_S


def _read_stamp(staging: Path) -> dict[str, Any] | None:
    try:
        stamp = json.loads((staging / _OWNER_FILE).read_text())
    except (OSError, ValueError):
        return None
    return stamp if isinstance(stamp, dict) and {"host", "pid", "started", "boot"} <= set(stamp) else None


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(f"{path.name}.tmp")
    tmp.write_text(json.dumps(data))
    tmp.replace(path)


def _describe(stamp: dict[str, Any]) -> str:
    started = dt.datetime.fromtimestamp(float(stamp["started"])).isoformat(sep=" ", timespec="seconds")
    return f"pid {stamp['pid']} on host {stamp['host']}, started {started}"


def new_staging(out_dir: str | os.PathLike[str]) -> Path:
    """A new hidden staging folder inside ``out_dir`` (created, with ``out_dir``), stamped with this process."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    staging = out / f"{STAGING_PREFIX}{uuid.uuid4().hex[:12]}"
    staging.mkdir()
    _write_json(staging / _OWNER_FILE, owner_stamp())
    return staging


@contextlib.contextmanager
def output_lock(out_dir: str | os.PathLike[str]) -> Iterator[Path]:
    """Hold the output folder (created when missing) for this run; yields it.

    Raises:
        OutputFolderBusyError: if another run holds it; the message names that run where its staging stamp tells.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fd = os.open(out, os.O_RDONLY | os.O_DIRECTORY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owners = [_describe(s) for p in sorted(out.glob(f"{STAGING_PREFIX}*")) if (s := _read_stamp(p))]
            who = f" ({'; '.join(owners)})" if owners else ""
            raise OutputFolderBusyError(
                f"{out}: another prostate-jrs run is writing into this output folder{who}; wait until it has finished "
                "or choose another output folder"
            ) from None
        if os.fstat(fd).st_ino != os.stat(out).st_ino:  # removed and made anew by a run that finished meanwhile
            raise OutputFolderBusyError(f"{out}: the output folder was replaced while this run started; run it again")
        yield out
    finally:
        os.close(fd)


def _move_in(staging: Path, out: Path, names: Sequence[str]) -> list[Path]:
    """Move what is still staged of ``names`` (in order) into ``out``; the last name is the completion file."""
    if (staging / names[-1]).exists():
        # an older result's completion file goes first: a folder with it must hold one complete result
        with contextlib.suppress(FileNotFoundError):
            os.remove(out / names[-1])
    moved = []
    for name in names:
        if (staging / name).exists():
            # rename within one file system is atomic: a reader sees the old file or the new one, never a partial one
            os.replace(staging / name, out / name)
        moved.append(out / name)
    return moved


def publish(staging: Path, out_dir: str | os.PathLike[str], names: Sequence[str], last: str) -> list[Path]:
    """Move the staged files into ``out_dir`` (``last``, the completion file, last) and remove the staging folder.

    Raises:
        FileNotFoundError: if a staged file is missing (nothing is moved then).
    """
    out = Path(out_dir)
    missing = [name for name in names if not (staging / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{staging}: staged output incomplete, missing {', '.join(missing)}; nothing published")
    ordered = sorted(names, key=lambda name: name == last)
    _write_json(staging / _JOURNAL_FILE, {"names": ordered})
    moved = _move_in(staging, out, ordered)
    shutil.rmtree(staging, ignore_errors=True)
    return moved


def _finish(staging: Path, out: Path) -> str:
    """Complete an interrupted publication (journal present) or drop an unpublished staging folder; what was done."""
    try:
        names = json.loads((staging / _JOURNAL_FILE).read_text())["names"]
    except (OSError, ValueError, KeyError):
        shutil.rmtree(staging, ignore_errors=True)
        return "removed (nothing of it was published)"
    moved = _move_in(staging, out, names)
    shutil.rmtree(staging, ignore_errors=True)
    return f"completed its interrupted publication of {', '.join(p.name for p in moved)}"


def recover(out_dir: str | os.PathLike[str]) -> list[str]:
    """Clean up after runs that died in ``out_dir``; call it holding :func:`output_lock`. Returns notes for the log."""
    out = Path(out_dir)
    notes = []
    for staging in sorted(out.glob(f"{STAGING_PREFIX}*")) if out.is_dir() else []:
        stamp = _read_stamp(staging)
        if stamp is None:
            notes.append(f"left {staging}: no owner stamp, so it cannot be told whether its run is still alive")
        elif owner_is_dead(stamp):
            notes.append(f"{staging} of a run that died ({_describe(stamp)}): {_finish(staging, out)}")
        elif stamp["pid"] != os.getpid():
            notes.append(f"left {staging}: its run may be alive ({_describe(stamp)})")
    return notes


def discard(out_dir: str | os.PathLike[str]) -> None:
    """Remove the staging folders of this process and of dead runs (a failed run's cleanup); others are left alone."""
    out = Path(out_dir)
    for staging in sorted(out.glob(f"{STAGING_PREFIX}*")) if out.is_dir() else []:
        stamp = _read_stamp(staging)
        mine = stamp is not None and stamp["pid"] == os.getpid() and stamp.get("host") == socket.gethostname()
        if mine or (stamp is not None and owner_is_dead(stamp)):
            with contextlib.suppress(OSError):  # a publication this run began is completed: its files were complete
                _finish(staging, out)
            shutil.rmtree(staging, ignore_errors=True)


@contextlib.contextmanager
def staged_folder(out_dir: Path) -> Iterator[Path]:
    """Build ``out_dir`` all or nothing: in a hidden sibling folder that replaces it when the block succeeds and is
    removed when the block fails, so that a half-written dataset or bundle is never seen under its name.

    Raises:
        FileExistsError: if ``out_dir`` exists and is not an empty folder.
    """
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(f"{out_dir} already exists and is not an empty folder; choose a new output folder")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; the new folder is an ordinary one
    try:
        yield staging
        if out_dir.exists():
            out_dir.rmdir()
        os.replace(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
