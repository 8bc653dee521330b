"""prostate_jrs.output_folder: the lock, owner stamps, publication killed at every step, recovery."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import socket
from pathlib import Path

import psutil
import pytest

from prostate_jrs import output_folder
from prostate_jrs.output_folder import (
    STAGING_PREFIX,
    OutputFolderBusyError,
    discard,
    new_staging,
    output_lock,
    owner_is_dead,
    owner_stamp,
    publish,
    recover,
    staged_folder,
)

NAMES = ["rtstruct.dcm", "seg.dcm", "registration.dcm", "qa.png", "qa.json"]


def _stage(out: Path, tag: str) -> Path:
    staging = new_staging(out)
    for name in NAMES:
        (staging / name).write_text(f"{tag} {name}")
    return staging


def _dead_stamp() -> dict:
    """The stamp of a process that has ended (a child that exited)."""
    child = multiprocessing.get_context("fork").Process(target=lambda: None)
    child.start()
    started = psutil.Process(child.pid).create_time()
    child.join()
    return {**owner_stamp(), "pid": child.pid, "started": started}


def test_a_second_run_is_refused_while_the_first_holds_the_folder(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with output_lock(out):
        staging = new_staging(out)
        busy = rf"another prostate-jrs run .* \(pid {os.getpid()} on host"
        with pytest.raises(OutputFolderBusyError, match=busy), output_lock(out):
            pass
        discard(out)
        assert not staging.exists()
    with output_lock(out):  # released with the first holder
        pass


def test_owner_stamps_tell_dead_runs_from_live_ones(tmp_path: Path) -> None:
    assert not owner_is_dead(owner_stamp())
    assert owner_is_dead(_dead_stamp())
    assert owner_is_dead({**owner_stamp(), "started": owner_stamp()["started"] - 3600})  # pid reused later
    assert owner_is_dead({**owner_stamp(), "boot": owner_stamp()["boot"] - 3600})  # rebooted since
    assert not owner_is_dead({**_dead_stamp(), "host": "another-host"})  # cannot be checked from here


def test_recover_removes_only_what_dead_runs_left(tmp_path: Path) -> None:
    out = tmp_path / "out"
    dead, live, foreign, unstamped = (_stage(out, tag) for tag in ("dead", "live", "foreign", "old"))
    (dead / ".owner.json").write_text(json.dumps(_dead_stamp()))
    parent = psutil.Process(os.getppid())  # alive, and not this process
    (live / ".owner.json").write_text(json.dumps({**owner_stamp(), "pid": parent.pid, "started": parent.create_time()}))
    (foreign / ".owner.json").write_text(json.dumps({**_dead_stamp(), "host": f"not-{socket.gethostname()}"}))
    (unstamped / ".owner.json").unlink()

    notes = recover(out)

    assert not dead.exists() and live.exists() and foreign.exists() and unstamped.exists()
    assert not any((out / name).exists() for name in NAMES)  # the dead run had not begun to publish
    assert any("of a run that died" in n and "removed (nothing of it was published)" in n for n in notes)
    assert any("may be alive" in n for n in notes) and any("no owner stamp" in n for n in notes)


def _publish_and_die_after(out: Path, moves: int) -> None:
    """Child: stage a result and publish it, but SIGKILL this process after ``moves`` renames (a power cut)."""
    staging = _stage(out, "new")
    real_replace = os.replace
    count = [0]

    def replace(src: object, dst: object) -> None:
        if str(dst).startswith(str(out)) and not str(dst).startswith(str(staging)):
            if count[0] == moves:
                os.kill(os.getpid(), signal.SIGKILL)
            count[0] += 1
        real_replace(src, dst)

    output_folder.os.replace = replace  # type: ignore[assignment]
    publish(staging, out, NAMES, last="qa.json")


@pytest.mark.parametrize("moves", range(len(NAMES) + 1))
def test_a_publication_killed_after_any_step_is_completed_never_mixed(tmp_path: Path, moves: int) -> None:
    out = tmp_path / "out"
    for name in NAMES:  # an earlier complete result in the folder
        out.mkdir(exist_ok=True)
        (out / name).write_text(f"old {name}")
    child = multiprocessing.get_context("fork").Process(target=_publish_and_die_after, args=(out, moves))
    child.start()
    child.join()

    contents = {name: (out / name).read_text() for name in NAMES if (out / name).exists()}
    if moves < len(NAMES):
        assert child.exitcode == -signal.SIGKILL
        assert "qa.json" not in contents  # not complete: no completion file while old and new files are mixed
        recover(out)
    else:
        assert child.exitcode == 0
    assert {name: (out / name).read_text() for name in NAMES} == {name: f"new {name}" for name in NAMES}
    assert not list(out.glob(f"{STAGING_PREFIX}*"))


def test_publish_refuses_an_incomplete_staging(tmp_path: Path) -> None:
    staging = _stage(tmp_path / "out", "new")
    (staging / "seg.dcm").unlink()
    with pytest.raises(FileNotFoundError, match=r"missing seg\.dcm; nothing published"):
        publish(staging, tmp_path / "out", NAMES, last="qa.json")
    assert not any((tmp_path / "out" / name).exists() for name in NAMES)


def test_staged_folder_appears_whole_or_not_at_all(tmp_path: Path) -> None:
    out = tmp_path / "sub" / "out"
    with staged_folder(out) as staging:
        (staging / "a.txt").write_text("a")
        assert staging.parent == out.parent and staging.name.startswith(".out.partial-") and not out.exists()
    assert [p.name for p in out.iterdir()] == ["a.txt"] and (out.stat().st_mode & 0o777) == 0o755
    with pytest.raises(FileExistsError, match="not an empty folder"), staged_folder(out):
        pass
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(RuntimeError, match="boom"), staged_folder(empty) as staging:
        (staging / "b.txt").write_text("b")
        raise RuntimeError("boom")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "sub"] and not any(empty.iterdir())
