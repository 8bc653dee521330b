"""UIDs and the version this package writes into every DICOM object it makes."""

from __future__ import annotations

from importlib import metadata

from pydicom.uid import UID, generate_uid

__all__ = ["IMPLEMENTATION_CLASS_UID", "make_uid", "package_version"]


def package_version() -> str:
    """Version of the installed ``prostate-jrs`` distribution (``"0+unknown"`` when not installed)."""
    try:
        return metadata.version("prostate-jrs")
    except metadata.PackageNotFoundError:
        return "0+unknown"


IMPLEMENTATION_CLASS_UID: UID = generate_uid(entropy_srcs=["prostate-jrs implementation"])
"""Implementation Class UID written into the file meta information (stable across runs)."""


def make_uid(*entropy: object) -> UID:
    """A new UID under pydicom's root.

    Args:
        *entropy: values that determine the UID; the same values give the same UID, so synthetic data is
            reproducible from a seed (e.g. ``make_uid("synth", seed, patient, "planning", "series")``).
            Without values the UID is random.

    Returns:
        The UID.
    """
    if not entropy:
        return generate_uid()
    return generate_uid(entropy_srcs=[repr(e) for e in entropy])
