"""benchmarks/adaptation.py: the paired test and the tables from given rows, and the tiny study end to end (the study
itself is run by hand; see its docstring)."""

from __future__ import annotations

import csv
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
    # (prostate MSD, prostate HD95, which structure is flagged) per fraction
    fractions = ((0.5, 2.0, None), (2.0, 9.0, 0), (2.5, 3.0, None), (0.6, 2.0, 0), (0.7, 8.0, 1), (0.6, 6.0, 0))
    for case, (msd, hd95, flagged) in enumerate(fractions):
        for index, structure in enumerate(bench.NAMES):
            first = index == 0
            values = {"msd_mm": msd if first else 0.5, "hd95_mm": hd95 if first else 2.0, "flagged": flagged == index}
            rows.append({"case": f"P_f{case}", "model": "generic", "refine": "off", "structure": structure, **values})
    older = {key: value for key, value in rows[0].items() if key != "flagged"}
    rows.append({**older, "model": "older_rows"})  # rows scored before the flag was recorded: no line
    lines = bench.review_table(rows)
    # MSD > 1.5 mm: fractions 1 and 2, the prostate flagged in 1; HD95 > 5 mm: fractions 1, 4 and 5, the prostate
    # flagged in 1 and 5 (fraction 4's flag names another structure)
    assert lines[-1] == "| generic | off | 4 / 6 | 3 | 1 | 0 | 0 | 2 | 1 | 3 | 2 |"
    assert not any("older_rows" in line for line in lines)


def test_cached_scores_are_keyed_by_what_the_pipeline_runs(bench: ModuleType, tmp_path: Path) -> None:
    config = tmp_path / "configs" / "inference.json"
    config.parent.mkdir()
    config.write_text('{"refine": {"mode": "accurate"}}')
    first = bench._pipeline_id(tmp_path)
    assert bench._pipeline_id(tmp_path) == first
    config.write_text('{"refine": {"mode": "fast"}}')
    assert bench._pipeline_id(tmp_path) != first


@pytest.mark.slow  # the tiny study: synthesises a patient, adapts a tiny bundle twice and scores it
def test_tiny_study_writes_every_output(bench: ModuleType, tmp_path: Path) -> None:
    out = tmp_path / "out"
    argv = ["--tiny", "--data", str(tmp_path / "D"), "--work", str(tmp_path / "W"), "--out", str(out), "--threads", "1"]
    assert bench.main(argv) == 0
    assert {p.name for p in out.iterdir()} >= {"adaptation.md", "adaptation.json", "per_case.csv", "adaptation_msd.png"}
    with (out / "per_case.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert {r["model"] for r in rows} == {"generic", "adapted_1", "adapted_2"}
    assert {r["structure"] for r in rows} == set(bench.NAMES)
    # the QA's agreement of the two paths is kept for every row, as the QA report has it (no distance where one path
    # lost the structure: the tiny random network's segmentation is often empty)
    assert all(0.0 <= float(r["qa_dsc_reg_seg"]) <= 1.0 for r in rows)
    assert all(float(r["qa_hd95_mm_reg_seg"]) >= 0.0 for r in rows if float(r["qa_dsc_reg_seg"]) > 0.0)
    assert "Review flags of the app's QA" in (out / "adaptation.md").read_text()
