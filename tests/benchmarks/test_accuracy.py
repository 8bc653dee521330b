"""Smoke test of benchmarks/accuracy.py in its tiny mode (the real study is run by hand; see its docstring)."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from types import ModuleType

import pytest
from script_loader import load_script

REPO = Path(__file__).resolve().parents[2]


def _load() -> ModuleType:
    return load_script(REPO / "benchmarks" / "accuracy.py", "benchmark_accuracy")


@pytest.mark.slow  # the tiny study: trains and scores networks
def test_tiny_study_writes_tables_plots_and_the_test(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    accuracy = _load()
    out = tmp_path / "out"
    args = ["--tiny", "--data", str(tmp_path / "data"), "--runs", str(tmp_path / "runs"), "--out", str(out)]
    assert accuracy.main([*args, "--networks", "cross_stitch", "--refine", "fast", "--threads", "1"]) == 0
    table = (out / "accuracy.md").read_text()
    refined = "cross_stitch + refine fast"
    for method, path in (("identity", "reg"), ("rigid", "reg"), ("elastix", "reg"), ("cross_stitch", "seg")):
        assert f"| {method} | {path} |" in table
    assert f"| {refined} | reg |" in table and f"| {refined} | final |" in table
    assert f"| {refined} | final | prostate | 1 |" in table  # the per-structure test against elastix
    assert "Wilcoxon signed-rank" in table and "**HD95 (mm)**" in table and "**DDF**" in table
    identity_ddf = next(line for line in table.splitlines() if line.startswith("| identity | 0.000"))
    assert "n/a" not in identity_ddf  # the tiny phantoms know their deformation: the error is measured
    with (out / "per_case.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert {r["method"] for r in rows} == {"identity", "rigid", "elastix", "cross_stitch", refined}
    assert all(0.0 <= float(r["dsc"]) <= 1.0 for r in rows)
    report = json.loads((out / "accuracy.json").read_text())
    assert report["budget"]["epochs"] == 1 and report["timings"]["cross_stitch"]["train_seconds"] > 0
    assert report["budget"]["elastix_margin_mm"] == pytest.approx(16.0 + 20 * 4.0)
    assert report["wilcoxon"]["best"].startswith("cross_stitch") and report["wilcoxon"]["n_pairs"] == 1
    assert report["timings"][refined]["registration_seconds_per_pair"] > 0
    for png in ("accuracy_dsc.png", "accuracy_hd95.png"):
        assert (out / png).stat().st_size > 10_000


def test_wilcoxon_pairs_cases_and_picks_the_best_network() -> None:
    accuracy = _load()
    rows = []
    for case in range(8):
        for structure in accuracy.STRUCTURE_NAMES:
            rows.append({"method": "elastix", "path": "reg", "case": f"c{case}", "structure": structure, "dsc": 0.70})
            good = 0.80 + 0.01 * case
            rows.append({"method": "net", "path": "reg", "case": f"c{case}", "structure": structure, "dsc": good})
            rows.append({"method": "net", "path": "seg", "case": f"c{case}", "structure": structure, "dsc": 0.5})
    test = accuracy.wilcoxon_against(rows, "elastix", ["net"])
    assert test["best"] == "net (reg path)" and test["n_pairs"] == 8
    assert test["best_mean_dsc"] == pytest.approx(0.835) and test["p_value"] < 0.01
    assert all(p < 0.05 for p in test["per_structure_p"].values())
    assert accuracy.wilcoxon_against(rows, "elastix", ["other"]) == {}


def test_a_checkpoint_of_another_budget_is_not_reused(tmp_path: Path) -> None:
    accuracy = _load()
    run = tmp_path / "sedd"
    accuracy._check_budget(run, 50)  # nothing trained yet: train
    (run / "models").mkdir(parents=True)
    (run / "models" / "model_final.pt").write_bytes(b"")
    with pytest.raises(ValueError, match=r"unknown number of epochs.*--epochs 50; delete .*sedd"):
        accuracy._check_budget(run, 50)
    (run / "budget.json").write_text(json.dumps({"epochs": 10, "seconds": 1.0}))
    with pytest.raises(ValueError, match=r"trained for 10 epochs .*not --epochs 50"):
        accuracy._check_budget(run, 50)
    accuracy._check_budget(run, 10)


def test_a_cached_evaluation_is_keyed_by_the_refinement_it_ran(monkeypatch: pytest.MonkeyPatch) -> None:
    import dataclasses

    import prostate_jrs.refine as refine

    accuracy = _load()
    overrides = {"ckpt_dir": "C", "refine#mode": "accurate", "refine#settings": {}}
    key = accuracy.evaluation_key(overrides)
    assert key == accuracy.evaluation_key(dict(overrides))
    assert key != accuracy.evaluation_key({**overrides, "refine#settings": {"control_spacing": (8, 4, 4)}})
    assert key != accuracy.evaluation_key({**overrides, "refine#mode": "off"})
    # the same overrides under another library default are another evaluation
    changed = dataclasses.replace(refine.REFINE_MODES["accurate"], iterations=(1, 1, 1))
    monkeypatch.setitem(refine.REFINE_MODES, "accurate", changed)
    assert accuracy.evaluation_key(overrides) != key
