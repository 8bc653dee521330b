"""federated/job.py: the NVFlare SimEnv job end to end (2 sites x 2 rounds, tiny), and the exported job's layout;
and one round on two sites whose data came from their DICOM archives through ``prostate-jrs import``.

The simulator runs as a subprocess with the exact command of docs/ARCHITECTURE.md ("Command-line contract"), so
the test sees what a user sees.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
from dicom_edits import copy_patients
from script_loader import load_script

from prostate_jrs.cli import main
from prostate_jrs.nets import build_network
from prostate_jrs.phantom import PhantomConfig, write_multisite_dataset
from prostate_jrs.tiny_bundle import TINY_TRAINING

pytestmark = pytest.mark.slow  # NVFlare simulator runs, tens of seconds each

pytest.importorskip("nvflare")
pytest.importorskip("ignite")

REPO = Path(__file__).resolve().parents[2]
JOB = REPO / "federated" / "job.py"
WIDTHS = [4, 8, 16]
JOB_NAME = "jrs_ci"
#: The library's tiny training settings, plus no local validation inside training: the
#: client validates every incoming global model itself.
TINY: dict[str, Any] = {
    **{key: value for key, value in TINY_TRAINING.items() if key != "widths"},  # WIDTHS go in as --widths
    "val_interval": 1000,
    "num_workers": 0,
    "cache_rate": 0.0,
    "show_progress": False,
}


def _tiny_args() -> list[str]:
    args = ["--network", "cross_stitch", "--widths", *map(str, WIDTHS)]
    for key, value in TINY.items():
        args += ["--bundle-override", f"{key}={json.dumps(value)}"]
    return args


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _files(root: Path, skip: Iterable[Path] = ()) -> list[Path]:
    skipped = [s.resolve() for s in skip]
    return [p for p in root.rglob("*") if p.is_file() and not any(p.resolve().is_relative_to(s) for s in skipped)]


def _load_job_module() -> ModuleType:
    return load_script(JOB, "federated_job")


@pytest.fixture(scope="module")
def site_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two sites (institute-a, institute-b profiles), three tiny patients each: train / validation / test."""
    root = tmp_path_factory.mktemp("fl") / "data"
    write_multisite_dataset(root, n_sites=2, n_patients=3, n_fractions=1, seed=0, config=PhantomConfig.tiny())
    return root


@pytest.fixture(scope="module")
def sim_run(site_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """``python federated/job.py --env sim --dataset-root R --rounds 2`` with tiny overrides."""
    workspace = tmp_path_factory.mktemp("ws")
    argv = [sys.executable, str(JOB), "--env", "sim", "--dataset-root", str(site_data), "--rounds", "2"]
    argv += ["--local-epochs", "1", "--name", JOB_NAME, "--workspace", str(workspace), *_tiny_args()]
    start = time.perf_counter()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=workspace, timeout=600)
    seconds = time.perf_counter() - start
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-5000:]
    return {"workspace": workspace / JOB_NAME, "stdout": result.stdout, "seconds": seconds}


def test_sim_job_writes_a_global_model_that_loads_into_the_bundle_network(sim_run: dict[str, Any]) -> None:
    job = sim_run["workspace"]
    server = job / "server" / "simulate_job" / "app_server"
    network = build_network("cross_stitch", WIDTHS)
    final = torch.load(server / "FL_global_model.pt", map_location="cpu", weights_only=False)["model"]
    network.load_state_dict({k: torch.as_tensor(v) for k, v in final.items()}, strict=True)
    # The initial weights job.py generated travel inside the job to the server app.
    initial = torch.load(server / "custom" / "initial_model.pt", map_location="cpu", weights_only=True)["model"]
    assert set(initial) == set(final)
    changed = [k for k in initial if not torch.equal(initial[k].float(), torch.as_tensor(final[k]).float())]
    assert len(changed) > len(initial) // 2, f"only {len(changed)} of {len(initial)} tensors changed"
    assert (server / "best_FL_global_model.pt").is_file()
    # The converted checkpoint is in the bundle's format: {"model": state_dict}.
    bundle_ckpt = torch.load(job / "bundle_model" / "model.pt", map_location="cpu", weights_only=True)
    build_network("cross_stitch", WIDTHS).load_state_dict(bundle_ckpt["model"], strict=True)


def test_sim_job_reports_each_sites_metrics(sim_run: dict[str, Any]) -> None:
    job = sim_run["workspace"]
    run_dir = job / "server" / "simulate_job"
    rounds = [json.loads(line) for line in (run_dir / "metrics" / "round_metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [0, 1]
    for record in rounds:
        per_site = {s["name"]: {m["name"] for m in s["metrics"]} for s in record["sites"]}
        assert set(per_site) == {"site-1", "site-2"}
        assert all("val_mean_dice" in names for names in per_site.values())
    cross = json.loads((run_dir / "cross_site_val" / "cross_val_results.json").read_text())
    assert set(cross) == {"site-1", "site-2"}
    for models in cross.values():
        assert {"SRV_FL_global_model.pt", "SRV_best_FL_global_model.pt"} <= set(models)
        for metrics in models.values():
            assert 0.0 <= metrics["val_mean_dice"] <= 1.0
            assert "final_dsc_prostate" in metrics
    assert {p.name for p in (run_dir / "tb_events").iterdir()} == {"site-1", "site-2"}
    summary = (job / "cross_site_summary.md").read_text()
    assert "| SRV_FL_global_model.pt | site-1 |" in summary and "| SRV_FL_global_model.pt | site-2 |" in summary
    assert "Cross-site evaluation" in sim_run["stdout"]
    print(f"sim job: {sim_run['seconds']:.1f} s")


def test_no_dataset_file_leaves_its_site(sim_run: dict[str, Any], site_data: Path) -> None:
    job = sim_run["workspace"]
    sites = ["site-1", "site-2"]
    for site in sites:
        private = {_sha256(p): p.name for p in _files(site_data / site)}
        assert len(private) >= 10  # images, labels, DDFs, datalist.json, phantom.json
        # Everything in the job's workspace except this site's own folder: the server and the other site.
        elsewhere = _files(job, skip=[job / site])
        assert any(p.is_relative_to(job / "server") for p in elsewhere)
        leaked = [(p, private[h]) for p in elsewhere if (h := _sha256(p)) in private]
        assert not leaked, f"{site} dataset files found outside the site: {leaked}"
        # The site's own workspace holds its bundle outputs (per-case tables), which stay there.
        assert list((job / site).rglob("metrics_per_case.csv"))


def test_export_ships_bundle_filter_and_only_own_dataset_path(site_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "exported"
    argv = [sys.executable, str(JOB), "--env", "sim", "--dataset-root", str(site_data), "--rounds", "1"]
    argv += ["--privacy", "percentile", "--export", "--export-dir", str(out), *_tiny_args()]
    result = subprocess.run(argv, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    job = next(p for p in out.iterdir() if (p / "meta.json").is_file())
    for site, other in (("site-1", "site-2"), ("site-2", "site-1")):
        app = next(p for p in job.iterdir() if p.is_dir() and site in p.name)
        text = (app / "config" / "config_fed_client.json").read_text()
        assert str(site_data / site) in text and str(site_data / other) not in text
        assert "PercentilePrivacy" in text
        assert (app / "custom" / "client.py").is_file()
        assert (app / "custom" / "configs" / "train.json").is_file()
        assert not (app / "custom" / "models").exists()
    server_text = "".join(p.read_text() for p in job.rglob("config_fed_server.json"))
    assert "val_mean_dice" in server_text and "CrossStitchNet" in server_text


def test_dataset_root_without_sites_is_a_clear_error(tmp_path: Path) -> None:
    job = _load_job_module()
    (tmp_path / "empty").mkdir()
    assert job.main(["--env", "sim", "--dataset-root", str(tmp_path / "empty")]) == 2
    with pytest.raises(FileNotFoundError, match=r"site-1/datalist\.json"):
        job.discover_sites(tmp_path / "empty")


def test_cross_site_table_has_a_mean_row() -> None:
    job = _load_job_module()
    table = {"m.pt": {"site-1": {"dice": 0.5}, "site-2": {"dice": 0.7}}}
    text = job.format_cross_site(table, ["dice"])
    assert "| m.pt | **mean** | 0.600 |" in text


def test_each_simulated_site_ran_exactly_the_job_it_would_pin(
    sim_run: dict[str, Any], site_data: Path, tmp_path: Path
) -> None:
    """The job that trained above is, file for file, what a site pins from the exported job (site job policy)."""
    from prostate_jrs.federated_policy import check_app, job_app_dir, load_policy, pin_app

    argv = [sys.executable, str(JOB), "--env", "sim", "--dataset-root", str(site_data), "--rounds", "2"]
    argv += ["--local-epochs", "1", "--name", JOB_NAME, *_tiny_args(), "--export", "--export-dir", str(tmp_path)]
    result = subprocess.run(argv, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for site in ("site-1", "site-2"):
        policy = tmp_path / site / "prostate_jrs_job_policy.json"
        pinned = pin_app(job_app_dir(tmp_path / JOB_NAME, site), policy, f"{JOB_NAME} for {site}")
        ran = sim_run["workspace"] / site / "simulate_job" / f"app_{site}"
        assert check_app(ran, load_policy(policy)) == pinned
        assert {"custom/client.py", "custom/configs/train.json", "config/config_fed_client.json"} <= set(pinned.files)


@pytest.mark.slow
def test_sim_job_on_two_imported_archives(synthetic_archive: Path, tmp_path: Path) -> None:
    """Each hospital runs `prostate-jrs import` on its own archive; the federation trains on what it wrote."""
    root = tmp_path / "sites"
    for site, patients in (("site-1", ["JRS001", "JRS002", "JRS003"]), ("site-2", ["JRS004", "JRS005", "JRS006"])):
        archive = copy_patients(synthetic_archive / "dicom", patients, tmp_path / f"{site}-archive")
        for later in [*archive.glob("*/Study_FX2"), *archive.glob("*/Study_FX3")]:
            shutil.rmtree(later)  # one fraction per patient, as in the phantom-site test: a shorter round
        argv = ["import", str(archive), str(root / site), "--private-dir", str(tmp_path / f"{site}-private")]
        assert main([*argv, "--no-progress"]) == 0
        lists = json.loads((root / site / "datalist.json").read_text())
        assert all(lists[part] for part in ("training", "validation", "test"))
    workspace = tmp_path / "ws"
    argv = [sys.executable, str(JOB), "--env", "sim", "--dataset-root", str(root), "--rounds", "1"]
    argv += ["--local-epochs", "1", "--name", JOB_NAME, "--workspace", str(workspace), *_tiny_args()]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-5000:]
    run_dir = workspace / JOB_NAME / "server" / "simulate_job"
    (record,) = [json.loads(line) for line in (run_dir / "metrics" / "round_metrics.jsonl").read_text().splitlines()]
    assert {s["name"] for s in record["sites"]} == {"site-1", "site-2"}
    cross = json.loads((run_dir / "cross_site_val" / "cross_val_results.json").read_text())
    for site in ("site-1", "site-2"):
        assert 0.0 <= cross[site]["SRV_FL_global_model.pt"]["val_mean_dice"] <= 1.0
    final = torch.load(run_dir / "app_server" / "FL_global_model.pt", map_location="cpu", weights_only=False)["model"]
    build_network("cross_stitch", WIDTHS).load_state_dict({k: torch.as_tensor(v) for k, v in final.items()})
