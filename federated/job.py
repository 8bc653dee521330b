"""Federated training of the prostate-jrs bundle: NVFlare FedAvg recipe over the bundle's network.

Usage (docs/ARCHITECTURE.md, "Command-line contract")::

    python federated/job.py --env sim --dataset-root R --rounds K [--local-epochs E] [--privacy percentile]
    python federated/job.py --env poc --dataset-root R --rounds K
    python federated/job.py --env prod --startup-kit DIR --rounds K [--site-dataset hospital-a=/data/jrs ...]
    python federated/job.py ... --export --export-dir fl_job      # write the job folder instead of running it

``R`` holds one dataset folder per site, named like the NVFlare client (``R/site-1``, ``R/site-2``; what
``prostate-jrs synth OUT --sites 2`` writes). In production each hospital's dataset stays on its own machine:
``--site-dataset NAME=PATH`` names the folder on that site's machine, or the site admin sets
``PROSTATE_JRS_DATASET_DIR`` in the client's environment (federated/README.md).

What the job does: the server sends the global weights of the bundle's network to every site; each site
(``federated/client.py``) validates them on its own validation split, trains ``--local-epochs`` epochs with the
bundle's ``train.json`` through MONAI's ``MonaiAlgo`` and returns weight differences; the server averages them
(FedAvg, weighted by local iterations), keeps ``FL_global_model.pt`` and ``best_FL_global_model.pt`` (best by the
bundle's validation key metric averaged over sites), and at the end every site evaluates the global models on
its test split (cross-site evaluation). Client metrics go to TensorBoard on the server.

After a simulator run this script prints the cross-site table, writes ``cross_site_summary.md`` / ``.csv`` and
converts the best global model into the bundle's checkpoint format: ``<result>/bundle_model/model.pt``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import tempfile
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundle"
HERE = Path(__file__).resolve().parent
#: The client script, named relative to this folder so that the job runs the copy shipped (and signed) with it.
CLIENT = "client.py"
#: Staging folder of the bundle copy; NVFlare copies its contents into each client app's ``custom/`` folder,
#: next to client.py, which uses that folder as the bundle root.
JOB_BUNDLE = "jrs_bundle"
#: What of the bundle goes into the job: configs and licence, never models/, eval/ or data the bundle folder may hold.
BUNDLE_FILES = ("configs/train.json", "configs/evaluate.json", "configs/metadata.json", "LICENSE")


@dataclass
class JobResult:
    """Where a finished run left its outputs (server side).

    Args:
        server_dir: the server's run folder (``FL_global_model.pt``, ``cross_site_val/``, ``tb_events/``).
        global_model: path of the last global model.
        best_model: path of the best global model (by the aggregated validation key metric), if any.
        cross_site: cross-site results: model name -> site -> metrics.
        bundle_model: the best (else last) global model converted to the bundle's ``models/model.pt`` format.
    """

    server_dir: Path
    global_model: Path
    best_model: Path | None
    cross_site: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    bundle_model: Path | None = None


def _override(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def _site_path(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected SITE=PATH, got {text!r}")
    return name, path


def build_parser() -> argparse.ArgumentParser:
    """Command-line arguments of ``federated/job.py``."""
    parser = argparse.ArgumentParser(
        prog="federated/job.py",
        description="FedAvg training of the prostate-jrs MONAI bundle with NVIDIA FLARE.",
    )
    parser.add_argument("--env", choices=("sim", "poc", "prod"), default="sim", help="where to run (default: sim)")
    parser.add_argument("--dataset-root", type=Path, help="folder with one dataset folder per site (sim, poc)")
    parser.add_argument(
        "--site-dataset",
        type=_site_path,
        action="append",
        default=[],
        metavar="SITE=PATH",
        help="dataset folder on that site's machine (repeatable); sites without one read $PROSTATE_JRS_DATASET_DIR",
    )
    parser.add_argument("--sites", nargs="+", metavar="NAME", help="client names (default: the dataset folders)")
    parser.add_argument("--rounds", type=int, default=2, metavar="K", help="FL rounds (default 2)")
    parser.add_argument("--local-epochs", type=int, default=1, metavar="E", help="local epochs per round (default 1)")
    parser.add_argument("--network", default=None, help="bundle network_name override (default: the bundle's)")
    parser.add_argument("--widths", type=int, nargs=3, default=None, help="bundle widths override (three ints)")
    parser.add_argument(
        "--bundle-override",
        type=_override,
        action="append",
        default=[],
        metavar="KEY=JSON",
        help="bundle config override for every site, e.g. patch_size=56 (repeatable; no spaces in JSON)",
    )
    parser.add_argument("--initial-ckpt", default=None, help="start from these weights (bundle model.pt format)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the initial weights when no --initial-ckpt")
    parser.add_argument("--key-metric", default=None, help="model-selection metric (default: the bundle's key metric)")
    parser.add_argument(
        "--privacy", choices=("none", "percentile"), default="none", help="client output filter on weight updates"
    )
    parser.add_argument("--percentile", type=float, default=10.0, help="PercentilePrivacy: share deltas above it")
    parser.add_argument("--gamma", type=float, default=0.01, help="PercentilePrivacy: clip of |delta|")
    parser.add_argument("--no-cross-site", action="store_true", help="skip the final cross-site evaluation")
    parser.add_argument("--tracking", choices=("tensorboard", "none"), default="tensorboard")
    parser.add_argument("--name", default="prostate_jrs_fedavg", help="job name")
    parser.add_argument("--workspace", type=Path, default=Path("/tmp/nvflare/prostate_jrs"), help="sim workspace")
    parser.add_argument("--threads", type=int, default=None, help="sim: clients run in parallel (default: all)")
    parser.add_argument("--startup-kit", type=Path, help="prod: the admin's startup kit folder")
    parser.add_argument("--username", default=None, help="poc/prod: admin user (default: NVFlare's)")
    parser.add_argument("--wait", type=float, default=0.0, help="prod/poc: seconds to wait for the result (0: no)")
    parser.add_argument(
        "--convert-model",
        type=Path,
        metavar="CKPT",
        help="only convert a downloaded server checkpoint (e.g. best_FL_global_model.pt) for the bundle, then exit",
    )
    parser.add_argument(
        "--model-out", type=Path, default=BUNDLE / "models" / "model.pt", help="with --convert-model: output file"
    )
    parser.add_argument("--export", action="store_true", help="write the job folder instead of running it")
    parser.add_argument("--export-dir", default="./fl_job", help="with --export: where to write it")
    return parser


def discover_sites(dataset_root: Path) -> dict[str, Path]:
    """Site name -> dataset folder for every sub-folder of ``dataset_root`` holding a ``datalist.json``.

    Raises:
        FileNotFoundError: if ``dataset_root`` is missing or has no site folder.
    """
    if not dataset_root.is_dir():
        raise FileNotFoundError(f"--dataset-root {dataset_root} is not a folder")
    sites = {p.name: p.resolve() for p in sorted(dataset_root.iterdir()) if (p / "datalist.json").is_file()}
    if not sites:
        raise FileNotFoundError(
            f"no site folder with a datalist.json under {dataset_root}; expected {dataset_root}/site-1/datalist.json, "
            "... (prostate-jrs synth OUT --sites 2 writes that layout)"
        )
    return sites


def bundle_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """Bundle config overrides for every site: ``--bundle-override`` plus ``--network`` and ``--widths``."""
    overrides = dict(args.bundle_override)
    if args.network is not None:
        overrides["network_name"] = args.network
    if args.widths is not None:
        overrides["widths"] = list(args.widths)
    return overrides


def bundle_settings(overrides: Mapping[str, Any]) -> tuple[str, list[int], str]:
    """Network name, widths and validation key metric of the bundle after ``overrides``.

    Raises:
        ValueError: if the bundle's train.json has no ``validate#key_metric``.
    """
    from prostate_jrs.nets import DEFAULT_WIDTHS

    train = json.loads((BUNDLE / "configs" / "train.json").read_text())
    name = str(overrides.get("network_name", train["network_name"]))
    widths = overrides.get("widths", train.get("widths"))
    widths = list(DEFAULT_WIDTHS[name.lower().replace("-", "_")] if widths is None else widths)
    key_metrics = list(train.get("validate", {}).get("key_metric", {}))
    if not key_metrics:
        raise ValueError(f"{BUNDLE}/configs/train.json has no validate#key_metric to select global models by")
    return name, [int(w) for w in widths], key_metrics[0]


def server_model(name: str, widths: Sequence[int]) -> dict[str, Any]:
    """The recipe's model config: the bundle's network class, instantiated by the server's persistor.

    The class path form lets the persistor rebuild the network without pickling it; its state-dict keys are
    those of ``build_network(name, widths)``, so the server's checkpoints load into the bundle's network.
    """
    from prostate_jrs.nets import NETWORKS

    cls = NETWORKS[name.lower().replace("-", "_")]
    return {"class_path": f"{cls.__module__}.{cls.__qualname__}", "args": {"widths": list(widths)}}


def write_initial_checkpoint(path: Path, name: str, widths: Sequence[int], seed: int) -> Path:
    """Seeded initial weights of the bundle's network, in the bundle's checkpoint format (``{"model": ...}``)."""
    from prostate_jrs.nets import build_network

    torch.manual_seed(seed)
    network = build_network(name, widths)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": network.state_dict()}, path)
    return path


def stage_bundle(staging: Path) -> Path:
    """Copy the bundle's configs (only) to ``staging/jrs_bundle`` for shipping inside the signed job."""
    target = staging / JOB_BUNDLE
    for rel in BUNDLE_FILES:
        source = BUNDLE / rel
        if source.is_file():
            (target / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / rel)
    return target


def client_args(local_epochs: int, overrides: Mapping[str, Any], dataset_dir: str | None) -> str:
    """``train_args`` of client.py: whitespace-separated, so JSON values are written without spaces."""
    parts = [f"--local_epochs {local_epochs}"]
    parts += [f"--override {k}={json.dumps(v, separators=(',', ':'))}" for k, v in overrides.items()]
    if dataset_dir is not None:
        if any(c.isspace() for c in dataset_dir):
            raise ValueError(
                f"dataset path {dataset_dir!r} contains whitespace, which NVFlare's train_args cannot carry"
            )
        parts.append(f"--dataset_dir {dataset_dir}")
    return " ".join(parts)


def build_recipe(args: argparse.Namespace, sites: Mapping[str, str | None], staging: Path) -> Any:
    """The FedAvg recipe with per-site dataset folders, tracking, privacy filter and cross-site evaluation.

    Args:
        args: parsed command line.
        sites: client name -> dataset folder on that client's machine (``None``: the site's environment).
        staging: a folder that lives until the job is exported or run (bundle copy, initial weights).

    Returns:
        The recipe.
    """
    from nvflare.apis.dxo import DataKind
    from nvflare.app_opt.pt.recipes.fedavg import FedAvgRecipe
    from nvflare.recipe import add_experiment_tracking
    from nvflare.recipe.utils import add_final_global_evaluation, set_per_site_config

    overrides = bundle_overrides(args)
    name, widths, bundle_key_metric = bundle_settings(overrides)
    initial = args.initial_ckpt
    if initial is None:
        # A relative path makes the recipe ship the file inside the job, so every environment starts alike.
        initial = os.path.relpath(write_initial_checkpoint(staging / "initial_model.pt", name, widths, args.seed))
    recipe = FedAvgRecipe(
        name=args.name,
        model=server_model(name, widths),
        initial_ckpt=initial,
        min_clients=len(sites),
        num_rounds=args.rounds,
        train_script=CLIENT,
        train_args=client_args(args.local_epochs, overrides, None),
        aggregator_data_kind=DataKind.WEIGHT_DIFF,
        key_metric=args.key_metric or bundle_key_metric,
        key_metric_mode="max",
    )
    # One client app per site: only its own dataset path goes into its app config.
    set_per_site_config(
        recipe, {site: {"train_args": client_args(args.local_epochs, overrides, path)} for site, path in sites.items()}
    )
    recipe.add_client_file(str(stage_bundle(staging)))
    if args.privacy == "percentile":
        from nvflare.app_common.filters.percentile_privacy import PercentilePrivacy

        recipe.add_client_output_filter(
            PercentilePrivacy(percentile=args.percentile, gamma=args.gamma), tasks=["train"]
        )
    if args.tracking == "tensorboard":
        add_experiment_tracking(recipe, tracking_type="tensorboard")
    if not args.no_cross_site:
        add_final_global_evaluation(recipe)
    return recipe


def find_server_dir(result: Path) -> Path:
    """The server's run folder (the one holding ``FL_global_model.pt``) under a run's result folder.

    Raises:
        FileNotFoundError: if no global model was written.
    """
    hits = sorted(result.rglob("FL_global_model.pt"))
    if not hits:
        raise FileNotFoundError(f"no FL_global_model.pt under {result}: the run did not finish a round")
    return hits[0].parent


def read_cross_site(result: Path) -> dict[str, dict[str, dict[str, float]]]:
    """Cross-site results as model -> site -> metrics (empty when the job had no cross-site evaluation)."""
    hits = sorted(result.rglob("cross_val_results.json"))
    if not hits:
        return {}
    raw: dict[str, dict[str, Any]] = json.loads(hits[0].read_text())
    table: dict[str, dict[str, dict[str, float]]] = {}
    for site, per_model in raw.items():
        for model, metrics in (per_model or {}).items():
            table.setdefault(model, {})[site] = {k: float(v) for k, v in (metrics or {}).items()}
    return table


def format_cross_site(table: Mapping[str, Mapping[str, Mapping[str, float]]], metrics: Sequence[str]) -> str:
    """Markdown table: one row per (model, site), one column per metric, plus the mean over sites per model."""
    lines = ["| model | site | " + " | ".join(metrics) + " |", "|---|---|" + "---|" * len(metrics)]
    for model in sorted(table):
        rows = table[model]
        for site in sorted(rows):
            cells = [f"{rows[site][m]:.3f}" if m in rows[site] else "-" for m in metrics]
            lines.append(f"| {model} | {site} | " + " | ".join(cells) + " |")
        means = []
        for m in metrics:
            values = [rows[s][m] for s in rows if m in rows[s]]
            means.append(f"{sum(values) / len(values):.3f}" if values else "-")
        lines.append(f"| {model} | **mean** | " + " | ".join(means) + " |")
    return "\n".join(lines)


def export_bundle_model(checkpoint: Path, target: Path, name: str, widths: Sequence[int]) -> Path:
    """Convert a server checkpoint into the bundle's ``models/model.pt`` format, checking that it loads.

    NVFlare saves ``{"model": state_dict, "train_conf": ...}``; the bundle's CheckpointLoader reads the
    ``model`` entry, so the conversion keeps only that entry, as tensors, after a strict load into
    ``build_network(name, widths)``. Written into a bundle (``BUNDLE/models/model.pt``), its sha256 is recorded in
    ``BUNDLE/configs/metadata.json``, against which the app checks the weights.

    Raises:
        FileNotFoundError: if ``checkpoint`` is missing.
        ValueError: if the weights do not fit the bundle's network.
    """
    from prostate_jrs.nets import build_network

    if not checkpoint.is_file():
        raise FileNotFoundError(f"checkpoint {checkpoint} not found")
    # weights_only: a checkpoint that came over the network must not be able to run code when loaded.
    data = torch.load(checkpoint, map_location="cpu", weights_only=True)
    state = data.get("model", data)
    network = build_network(name, widths)
    try:
        network.load_state_dict({k: torch.as_tensor(v) for k, v in state.items()}, strict=True)
    except RuntimeError as err:
        first = str(err).splitlines()[1].strip() if len(str(err).splitlines()) > 1 else str(err)
        raise ValueError(
            f"{checkpoint} does not fit the bundle's {name} network with widths {list(widths)} ({first} ...); "
            "pass the --network / --widths the job was trained with"
        ) from None
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".partial")
    torch.save({"model": network.state_dict()}, tmp)
    tmp.replace(target)
    bundle = target.parent.parent
    if target.parent.name == "models" and target.name == "model.pt" and (bundle / "configs" / "metadata.json").exists():
        from prostate_jrs.trust import record_model_hash

        record_model_hash(bundle)  # new weights of this bundle: load_bundle checks them against this hash
    return target


def summarise(result: Path, name: str, widths: Sequence[int], metrics: Sequence[str]) -> JobResult:
    """Collect a finished run's outputs: table files, bundle checkpoint; print the cross-site table."""
    server_dir = find_server_dir(result)
    best = server_dir / "best_FL_global_model.pt"
    job = JobResult(server_dir, server_dir / "FL_global_model.pt", best if best.is_file() else None)
    job.bundle_model = export_bundle_model(
        job.best_model or job.global_model, result / "bundle_model" / "model.pt", name, widths
    )
    job.cross_site = read_cross_site(result)
    if job.cross_site:
        present = sorted({m for rows in job.cross_site.values() for r in rows.values() for m in r})
        columns = [m for m in metrics if m in present] + [m for m in present if m not in metrics]
        text = format_cross_site(job.cross_site, columns)
        (result / "cross_site_summary.md").write_text(text + "\n")
        with (result / "cross_site_summary.csv").open("w") as f:
            f.write("model,site," + ",".join(columns) + "\n")
            for model in sorted(job.cross_site):
                for site, row in sorted(job.cross_site[model].items()):
                    f.write(f"{model},{site}," + ",".join(f"{row.get(m, float('nan')):.6g}" for m in columns) + "\n")
        print("\nCross-site evaluation (every site evaluates the global models on its test split):\n" + text)
    print(f"\nglobal model: {job.global_model}\nbest global model: {job.best_model}")
    print(f"bundle checkpoint (copy to bundle/models/model.pt): {job.bundle_model}")
    return job


@contextlib.contextmanager
def _working_dir(path: Path) -> Iterator[None]:
    # NVFlare resolves relative script and checkpoint paths against the working directory when it builds the
    # job; relative paths are what make it ship the files instead of pointing at this machine's copies.
    previous = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(previous)


def make_env(args: argparse.Namespace, site_names: Sequence[str]) -> Any:
    """SimEnv, PocEnv or ProdEnv from the command line.

    Raises:
        ValueError: for prod without ``--startup-kit``.
    """
    from nvflare.recipe import PocEnv, ProdEnv, SimEnv

    login = {"username": args.username} if args.username else {}
    if args.env == "sim":
        threads = args.threads or len(site_names)
        return SimEnv(clients=list(site_names), num_threads=threads, workspace_root=str(args.workspace))
    if args.env == "poc":
        return PocEnv(clients=list(site_names), **login)
    if args.startup_kit is None:
        raise ValueError("--env prod needs --startup-kit DIR (the admin's startup kit from nvflare provision)")
    return ProdEnv(startup_kit_location=str(args.startup_kit), **login)


def resolve_sites(args: argparse.Namespace) -> dict[str, str | None]:
    """Client name -> dataset folder on that client's machine, from ``--dataset-root``/``--site-dataset``/``--sites``.

    Raises:
        ValueError: when no site can be named, or a ``--sites`` name has no dataset in sim/poc.
    """
    sites: dict[str, str | None] = {}
    if args.dataset_root is not None:
        sites.update({name: str(path) for name, path in discover_sites(args.dataset_root).items()})
    sites.update(dict(args.site_dataset))
    if args.sites:
        missing = [s for s in args.sites if s not in sites]
        # In production (and for an exported job) the paths live at the sites: $PROSTATE_JRS_DATASET_DIR there.
        if missing and args.env != "prod" and not args.export:
            raise ValueError(f"sites {missing} have no dataset folder under --dataset-root or in --site-dataset")
        sites = {s: sites.get(s) for s in args.sites}
    if not sites:
        raise ValueError("name the sites: --dataset-root R (one folder per site), --site-dataset SITE=PATH or --sites")
    return sites


def run(argv: Sequence[str] | None = None) -> JobResult | None:
    """Build the job from ``argv``, run (or export, or submit) it; after a local run, summarise it.

    Returns:
        The run's outputs when the result is available here (sim, or poc/prod with ``--wait``), else ``None``.
    """
    args = build_parser().parse_args(argv)
    # NVFlare strips --export/--export-dir from sys.argv when nvflare.recipe is first imported and warns that it
    # did; this script has already parsed them (same names, same meaning) and exports itself.
    warnings.filterwarnings("ignore", message="NVFlare reserves '--export'", category=UserWarning)
    if args.convert_model is not None:
        name, widths, _ = bundle_settings(bundle_overrides(args))
        target = export_bundle_model(args.convert_model, args.model_out, name, widths)
        print(f"wrote {target} ({name}, widths {widths})")
        return None
    if args.rounds < 1 or args.local_epochs < 1:
        raise ValueError("--rounds and --local-epochs must be at least 1")
    sites = resolve_sites(args)
    name, widths, key_metric = bundle_settings(bundle_overrides(args))
    export_dir = str(Path(args.export_dir).resolve())
    args.workspace = args.workspace.resolve()
    if args.startup_kit is not None:
        args.startup_kit = args.startup_kit.resolve()
    if args.initial_ckpt is not None and not os.path.isabs(args.initial_ckpt):
        # Relative: a file here, shipped inside the job (paths are taken relative to HERE while building it).
        args.initial_ckpt = os.path.relpath(Path(args.initial_ckpt).resolve(), HERE)
    staging = Path(tempfile.mkdtemp(prefix="prostate_jrs_job_"))
    try:
        print(f"{args.env}: {len(sites)} sites {list(sites)}, {args.rounds} rounds x {args.local_epochs} local epochs")
        with _working_dir(HERE):
            recipe = build_recipe(args, sites, staging)
            env = make_env(args, list(sites))
            if args.export:
                recipe.export(job_dir=export_dir, env=env)
                print(f"job written to {export_dir}/{args.name}; submit with `nvflare job submit -j ...`")
                return None
            handle = recipe.run(env)
        if args.env == "sim":
            result = handle.get_result()
        elif args.wait > 0:
            result = handle.get_result(timeout=args.wait)
        else:
            print(f"submitted job {handle.get_job_id()}; monitor with `nvflare job list` / `nvflare job download`")
            return None
        if result is None:
            print("no result (yet): the job is still running or failed; see the server log")
            return None
        extra = [f"{key_metric}_reg", f"{key_metric}_seg"]
        return summarise(Path(result), name, widths, [key_metric, *extra])
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry: errors a user can fix print one line and return 2."""
    try:
        run(argv)
    except (ValueError, FileNotFoundError) as err:
        print(f"federated/job.py: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
