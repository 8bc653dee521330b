"""NVFlare's route into the bundle: MONAI's MonaiAlgo trains with train.json and evaluates with train+evaluate.json."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from monai.fl.client import MonaiAlgo
from monai.fl.utils.constants import ExtraItems, WeightType
from monai.fl.utils.exchange_object import ExchangeObject

BUNDLE = Path(__file__).resolve().parents[2] / "bundle"


def test_monai_algo_round(tiny_dataset: Path, tiny: dict[str, Any], tmp_path: Path) -> None:
    override = {
        **tiny,
        "dataset_dir": str(tiny_dataset),
        "ckpt_dir": str(tmp_path / "models"),
        "output_dir": str(tmp_path / "eval"),
    }
    algo = MonaiAlgo(
        bundle_root=str(BUNDLE),
        local_epochs=1,
        send_weight_diff=True,
        config_train_filename="configs/train.json",
        config_evaluate_filename="default",
        train_kwargs=override,
        eval_kwargs=override,
    )
    algo.initialize(extra={ExtraItems.CLIENT_NAME: "site-1", ExtraItems.APP_ROOT: ""})
    try:
        weights = {k: v.clone() for k, v in algo.trainer.network.state_dict().items()}
        algo.train(ExchangeObject(weights=weights, weight_type=WeightType.WEIGHTS))
        update = algo.get_weights()
        assert update.weight_type == WeightType.WEIGHT_DIFF and set(update.weights) == set(weights)
        report = algo.evaluate(ExchangeObject(weights=weights, weight_type=WeightType.WEIGHTS))
        assert {"val_mean_dice", "val_mean_dice_reg", "val_mean_dice_seg", "final_dsc_prostate"} <= set(report.metrics)
        assert (tmp_path / "eval" / "metrics_per_case.csv").is_file()
    finally:
        algo.finalize()
