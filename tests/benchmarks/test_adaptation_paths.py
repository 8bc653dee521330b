"""benchmarks/adaptation_paths.py: variants, the paired test and the tables from given rows (the study itself is run
by hand; see its docstring)."""

from __future__ import annotations

import math
from pathlib import Path
from types import ModuleType

import pytest
from script_loader import load_script

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    return load_script(REPO / "benchmarks" / "adaptation_paths.py", "benchmark_adaptation_paths")


def _scores(msd: float) -> dict[str, dict[str, float]]:
    return {"prostate": {"dsc": 0.9, "msd_mm": msd, "hd95_mm": 2 * msd}} | {
        name: {"dsc": 0.8, "msd_mm": 1.0, "hd95_mm": 2.0} for name in ("seminal_vesicles", "rectum", "bladder")
    }


def _rows(bench: ModuleType) -> list[dict]:
    rows = []
    for case in range(6):
        for model, refinement in bench.variants([2]):
            msd = 0.5 + 0.1 * case + (0.2 if model == "adapted_2" else 0.0)
            row = {"case": f"P_f{case}", "model": model, "refine": refinement, "seconds": 1.0}
            rows.append(row | {path: _scores(msd) for path in bench.PATHS})
    return rows


def test_variants_leave_out_adapted_runs_that_do_not_read_the_network(bench: ModuleType) -> None:
    pairs = bench.variants([1, 2])
    assert ("generic", "zero") in pairs and ("adapted_1", "zero") not in pairs
    assert ("generic", "nodes8") in pairs and ("adapted_2", "nodes8") not in pairs
    assert ("adapted_1", "off") in pairs and ("adapted_1", "coarse") in pairs and ("adapted_2", "guided") in pairs
    readers = [r for r in bench.REFINEMENTS if bench.reads_network(r)]
    assert len(pairs) == len(bench.REFINEMENTS) + 2 * len(readers)


def test_paired_against_the_generic_default(bench: ModuleType) -> None:
    rows = _rows(bench)
    tests = bench.paired(rows, "adapted_2", "network")
    assert tests["prostate"]["n"] == 6 and math.isclose(tests["prostate"]["difference_mm"], 0.2)
    assert math.isclose(tests["prostate"]["p"], 0.03125)  # all 6 differences positive: the exact two-sided minimum
    assert math.isnan(tests["rectum"]["p"])  # no difference: no test


def test_markdown_has_every_path(bench: ModuleType) -> None:
    text = bench.markdown(_rows(bench), [2])
    for path in bench.PATHS:
        assert f"**{path} contours**" in text
    assert "| adapted_2 | network | 0.95 | 1.00 | 1.00 | 1.00 |" in text
    assert "| adapted_2 | guided | +0.20, p 0.031 (n=6)" in text
    assert "| generic | zero | +" not in text


def test_settings_id_follows_the_library_default(bench: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    import dataclasses

    import prostate_jrs.refine as refine

    before = bench.settings_id("zero")
    assert bench.settings_id("off") == "off" and before != bench.settings_id("nodes8")
    changed = dataclasses.replace(refine.REFINE_MODES["accurate"], iterations=(1, 1, 1))
    monkeypatch.setitem(refine.REFINE_MODES, "accurate", changed)
    assert bench.settings_id("zero") != before  # rows scored under the old default are not resumed


def test_rows_of_other_settings_or_retired_variants_are_not_reused(bench: ModuleType) -> None:
    current = {"case": "P_f03", "model": "generic", "refine": "zero", "settings": bench.settings_id("zero")}
    stale = {**current, "settings": bench.settings_id("nodes8")}  # scored when the default was the 8-voxel grid
    unkeyed = {key: value for key, value in current.items() if key != "settings"}  # written before rows had settings
    retired = {**current, "refine": "nodes16", "settings": "anything"}  # a variant this script no longer runs
    off = {**current, "refine": "off", "settings": "off"}
    assert bench.current_rows([current, stale, unkeyed, retired, off]) == [current, off]
