"""Fixtures of the app tests: a tiny bundle, and the app run as users run it (``python app ...``, a subprocess)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from prostate_jrs.tiny_bundle import write_tiny_bundle

REPO = Path(__file__).resolve().parents[2]

RunApp = Callable[[list[str], Path], subprocess.CompletedProcess[str]]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The repo's bundle configs with tiny settings and randomly initialised weights."""
    return write_tiny_bundle(REPO / "bundle", tmp_path_factory.mktemp("bundle") / "tiny_bundle")


def _run_app(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, str(REPO / "app"), *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=300
    )


@pytest.fixture(scope="session")
def run_app() -> RunApp:
    """``run_app(args, cwd)``: ``python app *args`` in a subprocess, output captured."""
    return _run_app
