"""The project's exceptions: one tree under :class:`ProstateJRSError`.

Front ends (the app, the DICOM node, ``prostate-jrs``) catch the base class to report bad input or a refused run in
one line, with nothing written, instead of a traceback. Every message names the file, tag, ROI or setting at fault
and what was expected. Each class also derives from the built-in exception it used to be (``ValueError`` or
``RuntimeError``), so callers that catch those keep working.
"""

from __future__ import annotations

__all__ = [
    "BundleError",
    "CTSeriesError",
    "DicomSelectionError",
    "FoldingError",
    "JobFailedError",
    "JobNotPinnedError",
    "NoBoneError",
    "OutputFolderBusyError",
    "PatientBundleError",
    "PipelineError",
    "PolicyError",
    "PreprocessingError",
    "ProstateJRSError",
    "QuotaExceededError",
    "RTStructError",
    "SendError",
]


class ProstateJRSError(Exception):
    """Base of every error the library raises on bad input, an unusable bundle or a refused run."""


# ------------------------------------------------------------------------------------------------- reading DICOM


class DicomSelectionError(ProstateJRSError, ValueError):
    """The input folder does not hold what an adaptive session needs; the message names what is wrong."""


class CTSeriesError(ProstateJRSError, ValueError):
    """A CT series cannot be read as one regular volume; the message names the files and what was expected."""


class RTStructError(ProstateJRSError, ValueError):
    """An RTSTRUCT cannot be read onto the reference CT; the message names the file, the ROI and what was expected."""


# ------------------------------------------------------------------------------------------- one fraction's steps


class NoBoneError(ProstateJRSError, ValueError):
    """An image holds too little bone for a rigid alignment on bone."""


class PreprocessingError(ProstateJRSError, ValueError):
    """A pair cannot be put on a model grid (e.g. the planning contours miss the daily CT); the message says why."""


class PipelineError(ProstateJRSError, ValueError):
    """The inputs cannot be combined safely or do not fit; the message says what is wrong and what was expected."""


class BundleError(ProstateJRSError, ValueError):
    """The bundle lacks a file the pipeline needs, or its weights do not fit its config; the message says which."""


class PatientBundleError(BundleError):
    """A patient bundle does not belong to the session's patient, or its patient cannot be checked."""


class OutputFolderBusyError(ProstateJRSError, RuntimeError):
    """Another run is writing into the output folder; the message names it."""


# ----------------------------------------------------------------------------------------- node, federated, phantom


class QuotaExceededError(ProstateJRSError, RuntimeError):
    """Storing an instance would take the work folder over its quota."""


class JobFailedError(ProstateJRSError, RuntimeError):
    """The job cannot give results; the message is the reason, as the job's log and ``job.json`` record it."""


class SendError(ProstateJRSError, RuntimeError):
    """The results could not be sent; the message says where it stopped and what was stored already."""


class PolicyError(ProstateJRSError, ValueError):
    """The site policy file is missing or malformed: the site refuses every job until it is fixed."""


class JobNotPinnedError(ProstateJRSError, ValueError):
    """A job's client app does not match any version the site pinned; the message names the file that differs."""


class FoldingError(ProstateJRSError, RuntimeError):
    """No damping of a drawn deformation keeps its Jacobian determinant above the limit."""
