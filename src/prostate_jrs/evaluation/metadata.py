"""The bundle metadata's ``eval_metrics``, filled from an evaluation's summary table."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

from prostate_jrs.evaluation.tables import deployed_refine

__all__ = ["update_eval_metrics"]


def update_eval_metrics(metadata_file: str | Path, summary_csv: str | Path) -> dict[str, float | str]:
    """Fill the bundle metadata's ``eval_metrics`` with the means of an evaluation summary.

    Keys are ``<path>_<metric>_<structure>`` (e.g. ``final_dsc_prostate``, ``reg_msd_mm_bladder``) and
    ``ddf_<metric>`` for the DDF quality; values are the means over cases, rounded to 4 significant digits. Only
    the deployed rows count (:func:`deployed_refine`); ``refine`` records which.
    The metadata file is rewritten atomically.

    Args:
        metadata_file: ``bundle/configs/metadata.json``.
        summary_csv: ``metrics_summary.csv`` written by the bundle's ``evaluate.json``.

    Returns:
        The new ``eval_metrics``.

    Raises:
        ValueError: if the summary has no rows.
    """
    with Path(summary_csv).open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    if not rows:
        raise ValueError(f"{summary_csv}: no rows; run the bundle's evaluate.json first")
    deployed = deployed_refine(rows)
    rows = [row for row in rows if row.get("refine", "off") == deployed]
    metrics: dict[str, float | str] = {"refine": deployed}
    for row in rows:
        metric = str(row["metric"])
        if row["path"] == "ddf":
            key = metric if metric.startswith("ddf_") else f"ddf_{metric}"
        else:
            key = f"{row['path']}_{metric}_{row['structure']}"
        value = float(row["mean"])
        metrics[key] = value if math.isnan(value) else float(f"{value:.4g}")
    metrics["num_cases"] = max(int(row["n"]) for row in rows)
    path = Path(metadata_file)
    metadata = json.loads(path.read_text(encoding="utf-8"))
    metadata["eval_metrics"] = metrics
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(metadata, indent=4) + "\n", encoding="utf-8")
    tmp.replace(path)
    return metrics
