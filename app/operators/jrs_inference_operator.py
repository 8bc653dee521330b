"""JRS inference: the selected session -> :class:`prostate_jrs.pipeline.PipelineResult` on the daily grid."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import torch
from monai.deploy.core import ExecutionContext, Fragment, InputContext, Operator, OperatorSpec, OutputContext

from prostate_jrs.pipeline import load_bundle, run_pipeline

__all__ = ["JRSInferenceOperator"]


class JRSInferenceOperator(Operator):
    """Run :func:`prostate_jrs.pipeline.run_pipeline` with the network and settings of a bundle folder.

    The bundle is loaded here with :func:`prostate_jrs.pipeline.load_bundle`, not through the SDK's model factory
    (which treats a bundle folder given with ``-m`` as a generic model; see README.md).

    Input ``session``; outputs ``result`` and ``settings``.

    Args:
        fragment: the application.
        bundle_path: the bundle folder (``configs/inference.json``, ``models/model.pt``).
        device: torch device; ``None`` for ``$PROSTATE_JRS_DEVICE`` if set, else the first GPU when there is one,
            else the CPU.
    """

    def __init__(
        self, fragment: Fragment, *args: Any, bundle_path: Path, device: str | None = None, **kwargs: Any
    ) -> None:
        self.bundle_path = Path(bundle_path)
        default = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = device or os.environ.get("PROSTATE_JRS_DEVICE") or default
        self._logger = logging.getLogger(f"{__name__}.{type(self).__name__}")
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        """Declare the ports."""
        spec.input("session")
        spec.output("result")
        spec.output("settings")

    def compute(self, op_input: InputContext, op_output: OutputContext, context: ExecutionContext) -> None:
        """Load the bundle, run the pipeline, emit the result."""
        inputs = op_input.receive("session")
        start = time.perf_counter()
        network, settings = load_bundle(self.bundle_path, device=self.device)
        inputs.timings["load_bundle"] = round(time.perf_counter() - start, 3)
        result = run_pipeline(inputs.planning.image, inputs.planning_labels, inputs.daily.image, network, settings)
        self._logger.info(f"pipeline stages (s) on {self.device}: {result.timings}")
        op_output.emit(result, "result")
        op_output.emit(settings, "settings")
