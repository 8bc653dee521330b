"""Synthetic male pelvis CT with known daily deformation (docs/ARCHITECTURE.md, "Phantom recipe").

Typical use::

    from prostate_jrs.phantom import PhantomConfig, generate_patient, write_dataset

    patient = generate_patient(seed=0, n_fractions=2, config=PhantomConfig.tiny())
    write_dataset("out", n_patients=3, n_fractions=2, seed=1)

Modules: :mod:`.config` (settings and site profile), :mod:`.shapes` (signed distance primitives),
:mod:`.anatomy` (the pelvis and its rendering), :mod:`.deformation` (daily ground-truth field),
:mod:`.imaging` (gas, PSF, noise), :mod:`.generate` (one patient), :mod:`.dataset` (files and datalist),
:mod:`.preview` (PNG), :mod:`.realism` (HU statistics to compare with real CT), :mod:`.sites` (hospital
profiles and one dataset per site for federated learning).
"""

from __future__ import annotations

from .config import AnatomyRanges, MotionRanges, PhantomConfig, SiteProfile
from .dataset import write_dataset
from .deformation import FoldingError
from .generate import Fraction, Patient, Scan, generate_patient
from .sites import INSTITUTES, Institute, write_multisite_dataset

__all__ = [
    "INSTITUTES",
    "AnatomyRanges",
    "FoldingError",
    "Fraction",
    "Institute",
    "MotionRanges",
    "Patient",
    "PhantomConfig",
    "Scan",
    "SiteProfile",
    "generate_patient",
    "write_dataset",
    "write_multisite_dataset",
]
