"""Everything the DICOM modules share, importable from one place (each concern lives in its own module).

* :mod:`prostate_jrs.dicom.uids`: UIDs and the package version written into objects;
* :mod:`prostate_jrs.dicom.values`: dates, times, Decimal Strings, code items;
* :mod:`prostate_jrs.dicom.modules`: patient, study and equipment modules, new derived series and references;
* :mod:`prostate_jrs.dicom.files`: atomic writing and complete reading of DICOM files;
* :mod:`prostate_jrs.dicom.slices`: matching a grid to the CT images it lies on.
"""

# ruff: noqa: F403  (this module only re-exports: every name of the five modules, as their __all__ lists them)
from __future__ import annotations

from prostate_jrs.dicom import files, modules, slices, uids, values
from prostate_jrs.dicom.files import *
from prostate_jrs.dicom.modules import *
from prostate_jrs.dicom.slices import *
from prostate_jrs.dicom.uids import *
from prostate_jrs.dicom.values import *

__all__ = [*files.__all__, *modules.__all__, *slices.__all__, *uids.__all__, *values.__all__]
