"""Smoke test of benchmarks/import_speed.py in its tiny mode: it runs end to end and writes a complete report.

The script runs in a subprocess, as users run it (it forks its measurements). No timing thresholds
(docs/ARCHITECTURE.md, "No timing thresholds in tests").
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "import_speed.py"


@pytest.mark.slow
def test_tiny_run_writes_the_table_and_every_measurement(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    argv = [sys.executable, str(SCRIPT), "--tiny", "--workers", "1", "2", "--out", str(tmp_path / "out")]
    result = subprocess.run(argv, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    record = json.loads((tmp_path / "out" / "import_speed.json").read_text())
    assert [run["workers"] for run in record["runs"]] == [1, 2]
    for run in record["runs"]:
        assert run["patients"] == 2 and run["daily_scans"] == 2  # the stray series' patient is skipped
        assert run["resume_patients_imported"] == 0  # the second run finds nothing to do
        assert run["seconds"] > 0 and run["peak_rss_mib"] > 0
    assert record["runs"][1]["worker_peak_rss_mib"] > 0
    table = (tmp_path / "out" / "import_speed.md").read_text()
    assert "| workers | patients |" in table and table.strip() in result.stdout  # the printed table is the file
