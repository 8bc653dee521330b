"""Evaluation: predictions back on the daily CT's own grid, the contour paths, metric tables, bundle metadata.

One module per job; this package re-exports their public names (``from prostate_jrs.evaluation import ...``):

* :mod:`~prostate_jrs.evaluation.contours`: the contour paths and the per-structure contour source;
* :mod:`~prostate_jrs.evaluation.restore`: model grid -> daily grid (DDF, both paths, final contours);
* :mod:`~prostate_jrs.evaluation.tables`: per-case and summary metric tables, CSV;
* :mod:`~prostate_jrs.evaluation.metadata`: the bundle metadata's ``eval_metrics`` from a summary;
* :mod:`~prostate_jrs.evaluation.writers`: the bundle engines' handlers that write evaluation tables and inference
  files (imported on its own: it needs ignite, and the modules above must not).
"""

from __future__ import annotations

from prostate_jrs.evaluation.contours import DEFAULT_CONTOUR_SOURCE, PATHS, compose_contours, resolve_contour_source
from prostate_jrs.evaluation.metadata import update_eval_metrics
from prostate_jrs.evaluation.restore import (
    DailyGridResult,
    compose_rigid,
    keep_largest_components,
    output_grid_affine,
    registration_path,
    restore_to_daily_grid,
    spacing_from_affine,
)
from prostate_jrs.evaluation.tables import BODY_HU, case_metrics, ddf_error, deployed_refine, summarize, write_csv
from prostate_jrs.geometry import ddf_to_grid, field_of_view_mask, resample_to_grid

__all__ = [
    "BODY_HU",
    "DEFAULT_CONTOUR_SOURCE",
    "PATHS",
    "DailyGridResult",
    "case_metrics",
    "compose_contours",
    "compose_rigid",
    "ddf_error",
    "ddf_to_grid",
    "deployed_refine",
    "field_of_view_mask",
    "keep_largest_components",
    "output_grid_affine",
    "registration_path",
    "resample_to_grid",
    "resolve_contour_source",
    "restore_to_daily_grid",
    "spacing_from_affine",
    "summarize",
    "update_eval_metrics",
    "write_csv",
]
