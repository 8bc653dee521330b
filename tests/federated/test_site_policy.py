"""Site job policy: a hospital runs only the federated job versions it pinned (prostate_jrs.federated_policy).

The library tests build client app folders by hand. The end-to-end test provisions a real NVFlare proof-of-concept
system (server and one hospital client as separate processes, site guard in the client's startup kit), submits the
job the site pinned (it trains) and the same job with a bundle config changed after pinning (refused before any of
it runs: a ``$`` expression that would write a marker file never runs, client.py never starts).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from prostate_jrs.federated_policy import (
    POLICY_FILE,
    JobNotPinnedError,
    PolicyError,
    app_fingerprint,
    check_app,
    code_in_overrides,
    job_app_dir,
    load_policy,
    main,
    pin_app,
)

REPO = Path(__file__).resolve().parents[2]


def _app(root: Path, train: dict | None = None) -> Path:
    """A client app folder as NVFlare deploys it: config/, custom/ with client.py and bundle configs."""
    (root / "config").mkdir(parents=True)
    (root / "custom" / "configs").mkdir(parents=True)
    client = {"format_version": 2, "executors": [{"tasks": ["*"], "executor": {"path": "a.B"}}], "components": []}
    (root / "config" / "config_fed_client.json").write_text(json.dumps(client, indent=4))
    (root / "custom" / "client.py").write_text("print('train')\n")
    (root / "custom" / "configs" / "train.json").write_text(json.dumps(train or {"lr": 0.001, "imports": []}))
    return root


def test_pinned_app_passes_and_any_change_is_named(tmp_path: Path) -> None:
    app = _app(tmp_path / "app")
    policy_file = tmp_path / "local" / POLICY_FILE
    entry = pin_app(app, policy_file, "reviewed v1")
    assert set(entry.files) == {"config/config_fed_client.json", "custom/client.py", "custom/configs/train.json"}
    assert check_app(app, load_policy(policy_file)).label == "reviewed v1"

    train = app / "custom" / "configs" / "train.json"
    train.write_text(json.dumps({"lr": 0.001, "imports": ["$__import__('os').system('id')"]}))
    with pytest.raises(JobNotPinnedError, match=r"custom/configs/train\.json has sha256 [0-9a-f]{64}, pinned"):
        check_app(app, load_policy(policy_file))
    train.write_text(json.dumps({"lr": 0.001, "imports": []}))
    (app / "custom" / "helper.py").write_text("import os\n")
    with pytest.raises(JobNotPinnedError, match=r"custom/helper\.py is not in the pinned job"):
        check_app(app, load_policy(policy_file))
    (app / "custom" / "helper.py").unlink()
    (app / "custom" / "client.py").unlink()
    with pytest.raises(JobNotPinnedError, match=r"custom/client\.py is missing from the job"):
        check_app(app, load_policy(policy_file))


def test_what_nvflare_rewrites_on_the_way_still_matches(tmp_path: Path) -> None:
    """Submission re-serialises JSON; the site's log streamer joins the client config; signatures are added."""
    app = _app(tmp_path / "app", train={"b": [1, 2], "a": {"x": "$@y"}})
    pin_app(app, tmp_path / POLICY_FILE, "v1")
    policy = load_policy(tmp_path / POLICY_FILE)
    train = app / "custom" / "configs" / "train.json"
    train.write_text(json.dumps(json.loads(train.read_text()), indent=2, sort_keys=True))
    config_file = app / "config" / "config_fed_client.json"
    config = json.loads(config_file.read_text())
    streamer = {
        "id": "auto_log_streamer",
        "path": "nvflare.app_common.logging.job_log_streamer.JobLogStreamer",
        "args": {"target_parent_server": True, "log_file_name": "error_log.txt"},
    }
    config["components"].append(streamer)
    config_file.write_text(json.dumps(config, indent=2))
    for folder in (app, app / "config", app / "custom"):
        (folder / ".__nvfl_sig.json").write_text("{}")
    (app / "custom" / "__pycache__").mkdir()
    (app / "custom" / "__pycache__" / "client.cpython-311.pyc").write_bytes(b"\0")
    assert check_app(app, policy).label == "v1"

    # a component the job adds itself, under the injected name but reading a file outside its log folder, is not
    streamer["args"]["log_file_name"] = "../../local/privacy.json"
    config_file.write_text(json.dumps(config))
    with pytest.raises(JobNotPinnedError, match=r"config/config_fed_client\.json has sha256"):
        check_app(app, policy)
    # duplicate keys parse differently in different readers: such a file is pinned by its bytes
    config["components"].pop()
    config_file.write_text(json.dumps(config)[:-1] + ', "format_version": 3}')
    with pytest.raises(JobNotPinnedError, match=r"config/config_fed_client\.json"):
        check_app(app, policy)


def test_policy_file_problems_refuse_every_job(tmp_path: Path) -> None:
    app = _app(tmp_path / "app")
    with pytest.raises(PolicyError, match="no site job policy"):
        load_policy(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"format": "something-else"}')
    with pytest.raises(PolicyError, match="prostate-jrs-job-policy/1"):
        load_policy(bad)
    bad.write_text('{"format": "prostate-jrs-job-policy/1", "pinned": [{"label": "x", "files": {"a": "short"}}]}')
    with pytest.raises(PolicyError, match="pinned entry 1"):
        load_policy(bad)
    bad.write_text('{"format": "prostate-jrs-job-policy/1", "pinned": []}')
    with pytest.raises(JobNotPinnedError, match="pins no job"):
        check_app(app, load_policy(bad))
    os.symlink(tmp_path / "bad.json", app / "custom" / "link.json")
    with pytest.raises(JobNotPinnedError, match="symbolic link"):
        app_fingerprint(app)


def test_the_closest_pinned_version_is_reported(tmp_path: Path) -> None:
    policy_file = tmp_path / POLICY_FILE
    pin_app(_app(tmp_path / "v1"), policy_file, "v1")
    v2 = _app(tmp_path / "v2", train={"lr": 0.01, "imports": []})
    pin_app(v2, policy_file, "v2")
    pin_app(v2, policy_file, "v2")  # the same label again replaces the entry
    assert [p.label for p in load_policy(policy_file).pinned] == ["v1", "v2"]
    (v2 / "custom" / "client.py").write_text("print('changed')\n")
    with pytest.raises(JobNotPinnedError, match=r"custom/client\.py has sha256 .* against the pinned job 'v2'"):
        check_app(v2, load_policy(policy_file))


def test_command_line_pins_the_sites_app_of_a_job_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    job = tmp_path / "job"
    _app(job / "app_site-1")
    _app(job / "app_site-2", train={"lr": 2})
    (job / "meta.json").write_text(json.dumps({"deploy_map": {"app_site-1": ["site-1"], "app_site-2": ["site-2"]}}))
    assert job_app_dir(job, "site-2") == job / "app_site-2"
    with pytest.raises(FileNotFoundError, match="no app to site 'site-3'"):
        job_app_dir(job, "site-3")
    policy = tmp_path / "kit" / "local" / POLICY_FILE
    assert main(["pin", str(job), "--site", "site-1", "--policy", str(policy), "--label", "ok"]) == 0
    assert main(["check", str(job), "--site", "site-1", "--policy", str(policy)]) == 0
    assert main(["check", str(job), "--site", "site-2", "--policy", str(policy)]) == 1
    assert "custom/configs/train.json has sha256" in capsys.readouterr().err


def test_overrides_that_would_run_code_are_found() -> None:
    assert code_in_overrides({"widths": [4, 8, 16], "lr": 1e-3, "name": "cross_stitch", "path": "/data/x"}) == []
    found = code_in_overrides(
        {
            "a": "$__import__('os').system('id')",
            "b": "@network_def",
            "c": "%/etc/configs.json#x",
            "network_def": {"_target_": "os.system", "command": "id"},
            "d": [1, {"e": "$1+1"}],
        }
    )
    assert [line.split(":")[0] for line in found] == ["a", "b", "c", "network_def", "d#1#e"]


# ------------------------------------------------------------------------------------------ real NVFlare system


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _nvflare(args: list[str], env: dict[str, str], timeout: int = 120) -> subprocess.CompletedProcess[str]:
    exe = Path(sys.executable).with_name("nvflare")
    return subprocess.run([str(exe), *args], env=env, capture_output=True, text=True, timeout=timeout, check=False)


PROJECT = """api_version: 3
name: jrs_poc
description: prostate-jrs site policy test
participants:
- {{name: server, type: server, org: nvidia, default_host: localhost, fed_learn_port: {port}}}
- {{name: admin@nvidia.com, type: admin, org: nvidia, role: project_admin}}
- {{name: site-1, type: client, org: nvidia}}
builders:
- path: nvflare.lighter.impl.workspace.WorkspaceBuilder
  args: {{template_file: [master_template.yml]}}
- path: nvflare.lighter.impl.static_file.StaticFileBuilder
  args: {{config_folder: config}}
- path: nvflare.lighter.impl.cert.CertBuilder
- path: nvflare.lighter.impl.signature.SignatureBuilder
"""


@pytest.fixture(scope="module")
def poc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """A provisioned NVFlare PoC system (server + site-1 with the site guard and a pinned job), running."""
    pytest.importorskip("nvflare")
    from prostate_jrs.phantom import PhantomConfig, write_multisite_dataset

    root = tmp_path_factory.mktemp("poc")
    env = {
        **os.environ,
        "HOME": str(root / "home"),
        "NVFLARE_POC_WORKSPACE": str(root / "poc"),
        "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
    }
    (root / "home").mkdir()
    (root / "project.yml").write_text(PROJECT.format(port=_free_port()))
    prepared = _nvflare(["poc", "prepare", "-i", str(root / "project.yml"), "--force"], env)
    assert prepared.returncode == 0, prepared.stdout + prepared.stderr
    prod = next((root / "poc").glob("*/prod_00"))
    kit = prod / "site-1"

    data = root / "data"
    write_multisite_dataset(data, n_sites=1, n_patients=3, n_fractions=1, seed=0, config=PhantomConfig.tiny())
    job_dir = root / "job"
    tiny = ["model_spacing=4.0", "patch_size=56", "crop_margin_mm=16.0", "patches_per_pair=1", "num_workers=0"]
    tiny += ["cache_rate=0.0", "val_interval=1000", "show_progress=false"]
    argv = [sys.executable, str(REPO / "federated" / "job.py"), "--sites", "site-1", "--rounds", "1"]
    argv += ["--site-dataset", f"site-1={data / 'site-1'}", "--no-cross-site", "--tracking", "none", "--widths", "4"]
    argv += ["8", "16", *[a for item in tiny for a in ("--bundle-override", item)], "--export", "--export-dir"]
    exported = subprocess.run([*argv, str(job_dir)], env=env, capture_output=True, text=True, timeout=300)
    assert exported.returncode == 0, exported.stdout[-3000:] + exported.stderr[-3000:]
    job = job_dir / "prostate_jrs_fedavg"

    # the site's IT installs the guard and pins the reviewed job (federated/README.md, "Site job policy")
    (kit / "local" / "custom").mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "federated" / "site_guard.py", kit / "local" / "custom" / "site_guard.py")
    resources = json.loads((kit / "local" / "resources.json.default").read_text())
    resources["components"].append({"id": "prostate_jrs_job_guard", "path": "site_guard.JobPinGuard", "args": {}})
    (kit / "local" / "resources.json").write_text(json.dumps(resources, indent=2))
    pin = [sys.executable, "-m", "prostate_jrs.federated_policy", "pin", str(job), "--site", "site-1"]
    pin += ["--policy", str(kit / "local" / POLICY_FILE), "--label", "prostate_jrs_fedavg reviewed by site IT"]
    pinned = subprocess.run(pin, env=env, capture_output=True, text=True, timeout=120)
    assert pinned.returncode == 0, pinned.stderr

    started = _nvflare(["poc", "start"], env, timeout=180)
    try:
        assert started.returncode == 0, started.stdout[-3000:] + started.stderr[-3000:]
        yield {"env": env, "kit": kit, "admin": prod / "admin@nvidia.com", "job": job, "root": root}
    finally:
        _nvflare(["poc", "stop"], env, timeout=180)


def _submit(poc: dict, job: Path) -> tuple[str, str]:
    """Submit ``job`` through the admin API (as federated/job.py --env prod does); wait; (job id, final status)."""
    from nvflare.fuel.flare_api.flare_api import new_secure_session

    session = new_secure_session("admin@nvidia.com", str(poc["admin"]), timeout=60)
    try:
        job_id = session.submit_job(str(job))
        meta = session.wait_for_job(job_id, timeout=600, poll_interval=2)
    finally:
        session.close()
    return job_id, str(meta.get("status"))


@pytest.mark.slow
def test_a_job_changed_after_pinning_is_refused_before_any_of_it_runs(poc: dict, tmp_path: Path) -> None:
    marker = tmp_path / "the_job_ran_code_here"
    tampered = Path(shutil.copytree(poc["job"], tmp_path / "prostate_jrs_fedavg"))
    train_file = tampered / "app_site-1" / "custom" / "configs" / "train.json"
    train = json.loads(train_file.read_text())
    train["imports"].append(f"$open({str(marker)!r}, 'w').write('ran')")  # what a compromised channel could add
    train_file.write_text(json.dumps(train, indent=4))

    job_id, status = _submit(poc, tampered)

    assert "COMPLETED" not in status, status
    assert not marker.exists()
    site_log = (poc["kit"] / job_id / "log.txt").read_text()
    refusal = [line for line in site_log.splitlines() if "refused by the site job policy" in line]
    assert refusal, site_log[-3000:]
    assert "custom/configs/train.json has sha256" in refusal[0]
    assert "against the pinned job 'prostate_jrs_fedavg reviewed by site IT'" in refusal[0]
    assert "site-1: dataset" not in site_log  # client.py never started
    print(f"refused: {refusal[0].split(' - ')[-1][:200]}")


@pytest.mark.slow
def test_the_pinned_job_trains(poc: dict) -> None:
    job_id, status = _submit(poc, poc["job"])

    site_log = (poc["kit"] / job_id / "log.txt").read_text()
    assert status == "FINISHED:COMPLETED", status + site_log[-3000:]
    assert "client app matches the pinned job 'prostate_jrs_fedavg reviewed by site IT'" in site_log
    assert "site-1: round 0 global model on local validation" in site_log
