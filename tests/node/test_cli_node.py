"""``prostate-jrs node``: its help, and the one-line errors for settings it cannot run with (exit status 2)."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from prostate_jrs.cli import main

REPO = Path(__file__).resolve().parents[2]


def test_help_lists_the_options(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["node", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for option in ("--ae-title", "--port", "--workdir", "--send-to", "--bundle", "--allow", "--quiet-seconds",
                   "--quota-gb", "--retention-days", "--send-attempts", "--app-command"):  # fmt: skip
        assert option in text


def _node(tmp_path: Path, *extra: str, port: int = 11112, send_to: str = "PACS@127.0.0.1:104") -> list[str]:
    return ["node", "--ae-title", "JRSNODE", "--port", str(port), "--workdir", str(tmp_path / "w"), "--send-to",
            send_to, "--bundle", str(REPO / "bundle"), *extra]  # fmt: skip


@pytest.mark.parametrize(
    ("extra", "send_to", "message"),
    [
        ((), "PACS-at-host", "destination 'PACS-at-host' is not of the form AET@HOST:PORT"),
        (("--allow", "A" * 17), "PACS@127.0.0.1:104", "allowed calling AE title 'AAAAAAAAAAAAAAAAA' is not a DICOM AE"),
        (("--bundle", "/nonexistent"), "PACS@127.0.0.1:104", "/nonexistent/configs/inference.json: not found"),
        (("--app-command", "run-map {input}"), "PACS@127.0.0.1:104", "lacks {output}"),
    ],
)
def test_bad_settings_give_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: tuple[str, ...], send_to: str, message: str
) -> None:
    assert main([*_node(tmp_path, send_to=send_to), *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("prostate-jrs node: error: ") and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "w").exists()  # nothing created before the settings are checked


def test_a_port_in_use_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main([*_node(tmp_path, port=port), "--host", "127.0.0.1"]) == 2
    assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err
