"""NVFlare Client API script: one hospital trains and evaluates the prostate-jrs bundle with MONAI's MonaiAlgo.

NVFlare runs this script at every site (``federated/job.py`` puts it into the job). Each round it

1. receives the global weights,
2. validates them on the site's own ``validation`` split with the bundle's ``validate#evaluator`` (train.json)
   and reports the metrics (the server selects the best global model by the aggregated key metric),
3. trains ``--local_epochs`` epochs on the site's ``training`` split with the bundle's ``train#trainer``,
4. sends back the weight differences only, with the number of iterations (FedAvg weights by it).

For a ``validate`` task (cross-site evaluation of the final and best global models) it evaluates the received
weights on the site's ``test`` split with train.json + evaluate.json and sends back summary metrics only.

Patient data stay at the site: the dataset folder is named by this site's own arguments (or the
``PROSTATE_JRS_DATASET_DIR`` environment variable of the site), and checkpoints, per-case CSVs, montages and
TensorBoard files of the bundle go to a site-local folder. Only weights (differences) and aggregate numbers
leave the site.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import nvflare.client as flare
from monai.fl.client import MonaiAlgo
from monai.fl.utils.constants import ExtraItems, FlStatistics, WeightType
from monai.fl.utils.exchange_object import ExchangeObject
from nvflare.app_common.abstract.fl_model import ParamsType
from nvflare.client.tracking import SummaryWriter

from prostate_jrs.federated_policy import code_in_overrides

#: Environment variable a site admin can set instead of naming the dataset folder in the job.
DATASET_ENV = "PROSTATE_JRS_DATASET_DIR"
#: Environment variable for the site-local output folder (checkpoints, CSVs, TensorBoard of the bundle).
OUTPUT_ENV = "PROSTATE_JRS_OUTPUT_DIR"


def parse_override(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` with VALUE read as JSON when it parses, else as a string.

    Raises:
        argparse.ArgumentTypeError: without ``=``.
    """
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def build_parser() -> argparse.ArgumentParser:
    """Arguments of the client script (``train_args`` of the job)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    here = Path(__file__).resolve().parent
    parser.add_argument(
        "--bundle_root",
        default=str(here),
        help="bundle folder (default: this script's folder, where the job ships the bundle's configs/)",
    )
    parser.add_argument("--dataset_dir", default=None, help=f"this site's dataset folder (else ${DATASET_ENV})")
    parser.add_argument(
        "--output_dir", default=None, help=f"site-local output folder (else ${OUTPUT_ENV}, else ./prostate_jrs_fl)"
    )
    parser.add_argument("--local_epochs", type=int, default=1, help="local epochs per round")
    parser.add_argument(
        "--override",
        type=parse_override,
        action="append",
        default=[],
        metavar="KEY=JSON",
        help="bundle config override, e.g. widths=[4,8,16] (repeatable; no spaces)",
    )
    return parser


def resolve_dataset_dir(value: str | None) -> Path:
    """The site's dataset folder from the argument or the environment.

    Raises:
        FileNotFoundError: if neither names a folder holding ``datalist.json``.
    """
    value = value or os.environ.get(DATASET_ENV)
    if not value:
        raise FileNotFoundError(f"no dataset folder: pass --dataset_dir in the job's train_args or set ${DATASET_ENV}")
    folder = Path(value).expanduser().resolve()
    if not (folder / "datalist.json").is_file():
        raise FileNotFoundError(f"{folder / 'datalist.json'} not found: the site's dataset folder must hold it")
    return folder


def numeric_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """Finite scalar metrics only: summary numbers may leave the site, per-case tables and NaNs do not."""
    out: dict[str, float] = {}
    for key, value in metrics.items():
        try:
            number = float(value)
        except (TypeError, ValueError):
            continue
        if math.isfinite(number):
            out[str(key)] = number
    return out


def make_algo(
    bundle_root: str,
    overrides: Mapping[str, Any],
    site: str,
    train: bool,
    eval_config: str | Sequence[str] | None,
    local_epochs: int = 1,
) -> MonaiAlgo:
    """An initialised MonaiAlgo on the bundle with the site's overrides.

    Args:
        bundle_root: bundle folder.
        overrides: bundle config overrides (dataset_dir, ckpt_dir, output_dir, sizes).
        site: client name (MonaiAlgo logs it and names TensorBoard runs by it).
        train: build the training workflow (train.json).
        eval_config: evaluation config file(s) relative to the bundle, or ``None`` for none.
        local_epochs: local epochs per round.

    Returns:
        The initialised algo.
    """
    algo = MonaiAlgo(
        bundle_root=bundle_root,
        local_epochs=local_epochs,
        send_weight_diff=True,
        config_train_filename="configs/train.json" if train else None,
        train_kwargs=dict(overrides),
        config_evaluate_filename=eval_config,
        eval_kwargs=dict(overrides),
        # The global weights come from the server; a checkpoint in the bundle must not replace them.
        disable_ckpt_loading=True,
    )
    algo.initialize(extra={ExtraItems.CLIENT_NAME: site, ExtraItems.APP_ROOT: ""})
    return algo


def main(argv: Sequence[str] | None = None) -> None:
    """Run the federated loop until the server ends the job."""
    args = build_parser().parse_args(argv)
    code = code_in_overrides(dict(args.override))
    if code:  # override values are data; code in them would run at this site (MONAI evaluates "$...")
        raise ValueError(f"bundle overrides that would run code are refused: {'; '.join(code)}")
    flare.init()
    site = flare.get_site_name()
    dataset_dir = resolve_dataset_dir(args.dataset_dir)
    # Under the site's workspace by default (NVFlare runs the client there), one folder per job.
    base = Path(args.output_dir or os.environ.get(OUTPUT_ENV) or Path.cwd() / "prostate_jrs_fl").resolve()
    out = base / str(flare.get_job_id() or "job")
    common = {**dict(args.override), "dataset_dir": str(dataset_dir)}
    print(f"{site}: dataset {dataset_dir}, site-local outputs {out}")

    # Two workflows on the same bundle: local training (train.json, its own local validation), and validation
    # of each incoming global model on the site's validation split (train.json's validate#evaluator).
    trainer = make_algo(
        args.bundle_root,
        {**common, "ckpt_dir": str(out / "models_local"), "output_dir": str(out / "train")},
        site,
        train=True,
        eval_config="configs/train.json",
        local_epochs=args.local_epochs,
    )
    n_tests = 0
    writer = SummaryWriter()
    try:
        while flare.is_running():
            model = flare.receive()
            if model is None:
                break
            weights = ExchangeObject(weights=model.params, weight_type=WeightType.WEIGHTS)
            if flare.is_evaluate():
                # Cross-site evaluation: the test split with the bundle's evaluate.json; one output folder per
                # evaluated model (the task does not say which model it is), whose per-case CSV stays here.
                n_tests += 1
                folder = out / "cross_site" / f"model_{n_tests}"
                tester = make_algo(
                    args.bundle_root,
                    {**common, "ckpt_dir": str(out / "models_global"), "output_dir": str(folder)},
                    site,
                    train=False,
                    eval_config="default",
                )
                try:
                    metrics = numeric_metrics(tester.evaluate(weights).metrics or {})
                finally:
                    tester.finalize()
                print(f"{site}: cross-site evaluation {n_tests} ({folder}): {metrics}")
                flare.send(flare.FLModel(metrics=metrics))
                continue
            if flare.is_submit_model():
                # The job evaluates global models only; local models never leave the site.
                flare.send(flare.FLModel(metrics={}))
                continue

            round_ = model.current_round or 0
            metrics = numeric_metrics(trainer.evaluate(weights).metrics or {})
            for key, value in metrics.items():
                writer.add_scalar(f"global_model/{key}", value, global_step=round_)
            print(f"{site}: round {round_} global model on local validation: {metrics}")

            trainer.train(weights)
            update = trainer.get_weights()
            stats = update.statistics or {}
            steps = int(stats.get(FlStatistics.NUM_EXECUTED_ITERATIONS, 1))
            writer.add_scalar("local/iterations", steps, global_step=round_)
            flare.send(
                flare.FLModel(
                    params=update.weights,
                    # MonaiAlgo already subtracted the global weights; DIFF stops NVFlare from doing it again.
                    params_type=ParamsType.DIFF,
                    metrics=metrics,
                    meta={"NUM_STEPS_CURRENT_ROUND": steps},
                )
            )
    finally:
        trainer.finalize()


if __name__ == "__main__":
    main()
