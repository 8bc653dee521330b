"""Last stage: move the staged outputs into the output folder together and print the per-structure summary."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from monai.deploy.core import ExecutionContext, Fragment, InputContext, Operator, OperatorSpec, OutputContext

from prostate_jrs.dicom_session import publish, summary_lines

__all__ = ["PublishOperator"]

WRITER_PORTS: tuple[str, ...] = ("rtstruct", "seg", "registration", "qa")
"""Input ports, one per writer operator."""


class PublishOperator(Operator):
    """Wait for every writer, then publish the staging folder's files into the output folder.

    Inputs: ``result`` and one port per writer (:data:`WRITER_PORTS`), each receiving the list of staged files.

    Args:
        fragment: the application.
        staging: the staging folder.
        output_folder: the output folder.
    """

    def __init__(self, fragment: Fragment, *args: Any, staging: Path, output_folder: Path, **kwargs: Any) -> None:
        self.staging = Path(staging)
        self.output_folder = Path(output_folder)
        self.published: list[Path] = []
        self._logger = logging.getLogger(f"{__name__}.{type(self).__name__}")
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        """Declare the ports."""
        spec.input("result")
        for port in WRITER_PORTS:
            spec.input(port)

    def compute(self, op_input: InputContext, op_output: OutputContext, context: ExecutionContext) -> None:
        """Publish and print the summary."""
        result = op_input.receive("result")
        staged = [path for port in WRITER_PORTS for path in op_input.receive(port)]
        self.published = publish(self.staging, self.output_folder, [path.name for path in staged])
        for line in summary_lines(result):
            print(line, flush=True)
        print(f"wrote {', '.join(p.name for p in self.published)} to {self.output_folder}", flush=True)
