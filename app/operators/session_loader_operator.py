"""Input stage: DICOM folder -> the selected session (planning CT, planning contours, daily CT)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from monai.deploy.core import ExecutionContext, Fragment, InputContext, Operator, OperatorSpec, OutputContext

from prostate_jrs.dicom_session import load_session

__all__ = ["SessionLoaderOperator"]


class SessionLoaderOperator(Operator):
    """Select and read one adaptive session from the input folder.

    Output ``session``: :class:`prostate_jrs.dicom_session.SessionInputs`. Selection rules (never two patients,
    contours only in their frame of reference) are those of :func:`prostate_jrs.dicom.discovery.select_session`.

    Args:
        fragment: the application.
        input_folder: the DICOM input folder.
        daily_series_uid: Series Instance UID of the daily CT, ``None`` for the latest.
        rtstruct_sop_uid: SOP Instance UID of the planning RTSTRUCT, ``None`` for the only or latest.
    """

    def __init__(
        self,
        fragment: Fragment,
        *args: Any,
        input_folder: Path,
        daily_series_uid: str | None = None,
        rtstruct_sop_uid: str | None = None,
        **kwargs: Any,
    ) -> None:
        self.input_folder = Path(input_folder)
        self.daily_series_uid = daily_series_uid
        self.rtstruct_sop_uid = rtstruct_sop_uid
        self._logger = logging.getLogger(f"{__name__}.{type(self).__name__}")
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        """Declare the output port."""
        spec.output("session")

    def compute(self, op_input: InputContext, op_output: OutputContext, context: ExecutionContext) -> None:
        """Load the session and emit it."""
        inputs = load_session(
            self.input_folder, daily_series_uid=self.daily_series_uid, rtstruct_sop_uid=self.rtstruct_sop_uid
        )
        session = inputs.session
        self._logger.info(
            f"patient {session.patient_id}: planning CT {session.planning_ct.series_instance_uid}, RTSTRUCT "
            f"{session.planning_rtstruct.path.name}, daily CT {session.daily_ct.series_instance_uid}"
        )
        for note in inputs.notes:
            self._logger.info(note)
        op_output.emit(inputs, "session")
