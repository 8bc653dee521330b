"""Thin Holoscan operators of the prostate-jrs app; the work is done by :mod:`prostate_jrs`."""

from operators.jrs_inference_operator import JRSInferenceOperator
from operators.publish_operator import PublishOperator
from operators.session_loader_operator import SessionLoaderOperator
from operators.writer_operators import (
    QAWriterOperator,
    RegistrationWriterOperator,
    RTStructWriterOperator,
    SegWriterOperator,
)

__all__ = [
    "JRSInferenceOperator",
    "PublishOperator",
    "QAWriterOperator",
    "RTStructWriterOperator",
    "RegistrationWriterOperator",
    "SegWriterOperator",
    "SessionLoaderOperator",
]
