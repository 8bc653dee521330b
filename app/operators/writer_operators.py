"""Output stage: one operator per object, each writing into the run's staging folder and emitting what it wrote."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from monai.deploy.core import ExecutionContext, Fragment, InputContext, Operator, OperatorSpec, OutputContext

from prostate_jrs.dicom_session import (
    SessionInputs,
    write_contours,
    write_qa,
    write_registration,
    write_segmentation,
)
from prostate_jrs.pipeline import PipelineResult, PipelineSettings

__all__ = ["QAWriterOperator", "RTStructWriterOperator", "RegistrationWriterOperator", "SegWriterOperator"]


class _StagedWriter(Operator):
    """Receive ``session``, ``result`` and ``settings``; write into ``staging``; emit ``paths`` (list of files).

    Args:
        fragment: the application.
        staging: the run's staging folder inside the output folder (created when missing).
    """

    label = "output"

    def __init__(self, fragment: Fragment, *args: Any, staging: Path, **kwargs: Any) -> None:
        self.staging = Path(staging)
        self._logger = logging.getLogger(f"{__name__}.{type(self).__name__}")
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        """Declare the ports."""
        spec.input("session")
        spec.input("result")
        spec.input("settings")
        spec.output("paths")

    def write(self, result: PipelineResult, inputs: SessionInputs, settings: PipelineSettings) -> list[Path]:
        """Write the object; overridden by each writer."""
        raise NotImplementedError

    def compute(self, op_input: InputContext, op_output: OutputContext, context: ExecutionContext) -> None:
        """Write and emit the staged paths."""
        inputs, result, settings = op_input.receive("session"), op_input.receive("result"), op_input.receive("settings")
        self.staging.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        paths = self.write(result, inputs, settings)
        self._logger.info(
            f"{self.label}: staged {', '.join(p.name for p in paths)} in {time.perf_counter() - start:.2f} s"
        )
        op_output.emit(paths, "paths")


class RTStructWriterOperator(_StagedWriter):
    """RTSTRUCT of the final contours on the daily CT series (``rtstruct.dcm``)."""

    label = "RTSTRUCT"

    def write(self, result: PipelineResult, inputs: SessionInputs, settings: PipelineSettings) -> list[Path]:
        """Write ``rtstruct.dcm``."""
        return [write_contours(result, inputs, settings, self.staging)]


class SegWriterOperator(_StagedWriter):
    """DICOM SEG of the final contours on the daily CT series (``seg.dcm``)."""

    label = "SEG"

    def write(self, result: PipelineResult, inputs: SessionInputs, settings: PipelineSettings) -> list[Path]:
        """Write ``seg.dcm``."""
        return [write_segmentation(result, inputs, settings, self.staging)]


class RegistrationWriterOperator(_StagedWriter):
    """Deformable Spatial Registration planning -> daily (``registration.dcm``): rigid pre-matrix + DDF grid."""

    label = "registration"

    def write(self, result: PipelineResult, inputs: SessionInputs, settings: PipelineSettings) -> list[Path]:
        """Write ``registration.dcm``."""
        return [write_registration(result, inputs, settings, self.staging)]


class QAWriterOperator(_StagedWriter):
    """``qa.json`` and ``qa.png``.

    Args:
        fragment: the application.
        staging: the staging folder.
        bundle_path: recorded in ``qa.json``.
    """

    label = "QA"

    def __init__(self, fragment: Fragment, *args: Any, staging: Path, bundle_path: Path, **kwargs: Any) -> None:
        self.bundle_path = Path(bundle_path)
        super().__init__(fragment, *args, staging=staging, **kwargs)

    def write(self, result: PipelineResult, inputs: SessionInputs, settings: PipelineSettings) -> list[Path]:
        """Write ``qa.json`` and ``qa.png``."""
        return write_qa(result, inputs, settings, self.staging, bundle=str(self.bundle_path))
