"""One exception tree: every library error derives from ProstateJRSError and from the built-in it used to be."""

from __future__ import annotations

import importlib

import pytest

from prostate_jrs import errors
from prostate_jrs.dicom_session import SESSION_ERRORS

#: where each error was defined before prostate_jrs.errors; those modules keep the name for their callers
HOMES = {
    "BundleError": "prostate_jrs.pipeline",
    "CTSeriesError": "prostate_jrs.dicom.ct_reader",
    "DicomSelectionError": "prostate_jrs.dicom.discovery",
    "FoldingError": "prostate_jrs.phantom.deformation",
    "JobFailedError": "prostate_jrs.node.runner",
    "JobNotPinnedError": "prostate_jrs.federated_policy",
    "NoBoneError": "prostate_jrs.rigid",
    "OutputFolderBusyError": "prostate_jrs.output_folder",
    "PatientBundleError": "prostate_jrs.adaptation.patient_bundle",
    "PipelineError": "prostate_jrs.pipeline",
    "PolicyError": "prostate_jrs.federated_policy",
    "PreprocessingError": "prostate_jrs.preprocessing",
    "QuotaExceededError": "prostate_jrs.node.jobs",
    "RTStructError": "prostate_jrs.dicom.rtstruct_reader",
    "SendError": "prostate_jrs.node.sender",
}


def test_every_error_is_in_the_tree_and_keeps_its_builtin_base() -> None:
    names = set(errors.__all__) - {"ProstateJRSError"}
    assert names == set(HOMES)
    for name in names:
        error = getattr(errors, name)
        assert issubclass(error, errors.ProstateJRSError), name
        assert issubclass(error, (ValueError, RuntimeError)), name
        assert getattr(importlib.import_module(HOMES[name]), name) is error, name


def test_front_ends_catch_the_base_class() -> None:
    assert errors.ProstateJRSError in SESSION_ERRORS
    with pytest.raises(SESSION_ERRORS):
        raise errors.NoBoneError("daily CT: no bone above 200 HU")
    with pytest.raises(ValueError, match="no bone"):  # callers catching the built-in keep working
        raise errors.NoBoneError("daily CT: no bone above 200 HU")
