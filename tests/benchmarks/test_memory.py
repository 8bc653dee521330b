"""Smoke test of benchmarks/memory.py on a small grid: it generates the session, runs the app and reports its peak.

No thresholds (docs/ARCHITECTURE.md, "No timing thresholds in tests"): the figure is checked to be a measured,
plausible number, not a bound.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_memory_benchmark_reports_the_apps_peak(tmp_path: Path) -> None:
    argv = [sys.executable, str(REPO / "benchmarks" / "memory.py"), "--shape", "48", "48", "30", "--spacing", "10"]
    argv += ["10", "10", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "out"), "--threads", "1"]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "memory.json").read_text())
    assert report["study"]["planning_size"] == [48, 48, 30]
    assert report["study"]["files"] > 60  # two CT series of 30 slices and the RTSTRUCT
    app = report["app"]
    assert app["exit_status"] == 0 and app["peak_rss_mib"] > 100  # torch alone is more
    assert {"load", "network", "restore"} <= set(app["timings_s"])
    table = (tmp_path / "out" / "memory.md").read_text()
    assert "| 48 x 48 x 30 | 10 x 10 x 10 |" in table and f"**{app['peak_rss_mib']:.0f} MiB**" in table
    assert table.strip() in result.stdout
