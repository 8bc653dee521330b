"""JRS inference: the selected session -> :class:`prostate_jrs.pipeline.PipelineResult` on the daily grid."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from monai.deploy.core import ExecutionContext, Fragment, InputContext, Operator, OperatorSpec, OutputContext

from prostate_jrs.dicom_session import check_bundle_for_session, default_device
from prostate_jrs.pipeline import load_bundle, run_pipeline

__all__ = ["JRSInferenceOperator"]


class JRSInferenceOperator(Operator):
    """Run :func:`prostate_jrs.pipeline.run_pipeline` with the network and settings of a bundle folder.

    The bundle is loaded here with :func:`prostate_jrs.pipeline.load_bundle`, not through the SDK's model factory
    (which treats a bundle folder given with ``-m`` as a generic model; see README.md), after
    :func:`prostate_jrs.dicom_session.check_bundle_for_session`: a patient bundle runs for its own patient only.

    Input ``session``; outputs ``result`` and ``settings``.

    Args:
        fragment: the application.
        bundle_path: the bundle folder (``configs/inference.json``, ``models/model.pt``).
        device: torch device; ``None`` for ``$PROSTATE_JRS_DEVICE`` if set, else the first GPU when there is one,
            else the CPU.
        refine: refinement mode (``off``, ``fast``, ``accurate``); ``None`` for the bundle's ``refine#mode``.
        backend: network backend (``auto``, ``torch``, ``openvino``, ``onnxruntime``); ``None`` for the bundle's.
    """

    def __init__(
        self,
        fragment: Fragment,
        *args: Any,
        bundle_path: Path,
        device: str | None = None,
        refine: str | None = None,
        backend: str | None = None,
        **kwargs: Any,
    ) -> None:
        self.bundle_path = Path(bundle_path)
        self.refine = refine
        self.backend = backend
        self.device = device or default_device()
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
        check_bundle_for_session(self.bundle_path, inputs)
        overrides = {} if self.refine is None else {"refine#mode": self.refine}
        if self.backend is not None:
            overrides["backend"] = self.backend
        network, settings = load_bundle(self.bundle_path, device=self.device, overrides=overrides)
        inputs.timings["load_bundle"] = round(time.perf_counter() - start, 3)
        result = run_pipeline(inputs.planning.image, inputs.planning_labels, inputs.daily.image, network, settings)
        self._logger.info(f"pipeline stages (s) on {self.device}: {result.timings}")
        op_output.emit(result, "result")
        op_output.emit(settings, "settings")
