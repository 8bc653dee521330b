"""benchmarks/adaptation.py: the paired test and the tables from given rows (the study itself is run by hand; see its
docstring)."""

from __future__ import annotations

import math
from pathlib import Path
from types import ModuleType

import pytest
from script_loader import load_script

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    return load_script(REPO / "benchmarks" / "adaptation.py", "benchmark_adaptation")


def _rows(bench: ModuleType) -> list[dict]:
    rows = []
    for case in range(6):
        for structure in bench.NAMES:
            generic = 1.0 + 0.1 * case
            for model, msd in (("generic", generic), ("adapted_2", generic - 0.2 - 0.01 * case)):
                values = {"dsc": 0.9, "msd_mm": msd, "hd95_mm": 2 * msd, "seconds": 1.0}
                rows.append({"case": f"P_f{case}", "model": model, "refine": "off", "structure": structure, **values})
    return rows


def test_paired_test_pairs_the_same_fractions(bench: ModuleType) -> None:
    rows = _rows(bench)
    rows.append({**rows[-1], "case": "only_adapted"})  # a fraction without its generic row is not paired
    result = bench.paired_test(rows, "adapted_2", "off")
    for name in bench.NAMES:
        test = result["structures"][name]
        assert test["n"] == 6 and math.isclose(test["mean_difference_mm"], -0.225)
        assert math.isclose(test["p_value"], 0.03125)  # all 6 differences negative: the exact two-sided minimum
    assert result["mean_over_structures"]["n"] == 6


def test_markdown_has_every_table(bench: ModuleType) -> None:
    rows = _rows(bench)
    tests = [bench.paired_test(rows, "adapted_2", "off")]
    seconds = {"2": {"total": [100.0, 120.0], "train": [80.0, 90.0], "steps": 20, "device": "cpu", "threads": 2}}
    meta = {
        "patients": 2,
        "scored_fractions": "3-5",
        "adaptation_seconds": seconds,
        "threads": 2,
        "hardware": {"cpu_model": "CPU", "usable_cores": 2},
        "load_average": {"start": 1.0, "end": 2.0},
        "dataset": {"institute": "institute-b"},
    }
    text = bench.markdown(rows, tests, meta)
    assert "fractions 3-5, institute-b profile)" in text
    assert "fractions 3-5)" in bench.markdown(rows, tests, {**meta, "dataset": {"institute": None}})
    for title in ("**MSD (mm)**", "**DSC**", "**HD95 (mm)**", "**Paired test of MSD", "**Adaptation time**"):
        assert title in text
    assert "| adapted_2 | off | -0.2" in text and "p 0.031 (n=6)" in text
    assert "| 2 | 2 | 20 | cpu | 2 | 110 (14) | 85 (7) |" in text
    assert "**Review flags of the app's QA**" in text


def test_review_table_counts_flagged_fractions_and_caught_errors(bench: ModuleType) -> None:
    rows = []
    for case, (msd, flagged) in enumerate(((0.5, False), (2.0, True), (2.5, False), (0.6, True))):
        for structure in bench.NAMES:
            first = structure == bench.NAMES[0]
            values = {"msd_mm": msd if first else 0.5, "flagged": flagged and first}
            rows.append({"case": f"P_f{case}", "model": "generic", "refine": "off", "structure": structure, **values})
    older = {key: value for key, value in rows[0].items() if key != "flagged"}
    rows.append({**older, "model": "older_rows"})  # rows scored before the flag was recorded: no line
    lines = bench.review_table(rows)
    assert lines[-1] == "| generic | off | 2 / 4 | 2 | 0 | 0 | 0 | 2 | 1 |"
    assert not any("older_rows" in line for line in lines)


def test_cached_scores_are_keyed_by_what_the_pipeline_runs(bench: ModuleType, tmp_path: Path) -> None:
    config = tmp_path / "configs" / "inference.json"
    config.parent.mkdir()
    config.write_text('{"refine": {"mode": "accurate"}}')
    first = bench._pipeline_id(tmp_path)
    assert bench._pipeline_id(tmp_path) == first
    config.write_text('{"refine": {"mode": "fast"}}')
    assert bench._pipeline_id(tmp_path) != first
