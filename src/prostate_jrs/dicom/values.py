"""DICOM values the writers format by hand: dates, times, Decimal Strings and code items."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable

import numpy as np
from pydicom.dataset import Dataset

__all__ = ["code_item", "dicom_date", "dicom_time", "ds_list", "format_ds"]


def dicom_date(value: dt.date | dt.datetime) -> str:
    """``YYYYMMDD``."""
    return value.strftime("%Y%m%d")


def dicom_time(value: dt.datetime) -> str:
    """``HHMMSS`` (whole seconds, as most scanners write it)."""
    return value.strftime("%H%M%S")


def format_ds(value: float) -> str:
    """Decimal String of at most 16 characters (the DS limit), as precise as fits.

    Not :func:`pydicom.valuerep.format_number_as_ds`: it writes ``1.0``, ``1e-05`` and trailing zeros, so every file
    written before would change; this keeps the shortest text.

    Raises:
        ValueError: if ``value`` is not finite.
    """
    value = float(value)
    if not np.isfinite(value):
        raise ValueError(f"cannot write {value} as a DICOM Decimal String")
    if value == 0.0:
        return "0"
    for digits in range(16, 0, -1):
        text = f"{value:.{digits}g}"
        if "e" in text:
            # pydicom and other readers accept exponents, but plain notation is what TPSs write and read
            mantissa, exponent = text.split("e")
            text = f"{mantissa}e{int(exponent)}"
        if len(text) <= 16:
            return text
    raise ValueError(f"cannot write {value} in 16 characters")


def code_item(value: str, scheme: str, meaning: str) -> Dataset:
    """A code sequence item (Code Value, Coding Scheme Designator, Code Meaning)."""
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


def ds_list(values: Iterable[float]) -> list[str]:
    """Values as Decimal Strings of at most 16 characters each (see :func:`format_ds`)."""
    return [format_ds(v) for v in values]
