"""DICOM files: written completely or not at all, and read completely or refused."""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
import warnings
from pathlib import Path

import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

from prostate_jrs.dicom.uids import IMPLEMENTATION_CLASS_UID, package_version
from prostate_jrs.errors import ProstateJRSError

__all__ = ["DamagedFileError", "atomic_write", "file_meta_for", "read_dicom", "read_whole"]


def file_meta_for(ds: Dataset) -> FileMetaDataset:
    """File meta information (Explicit VR Little Endian) for ``ds``, which must have SOP Class and Instance UIDs."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = IMPLEMENTATION_CLASS_UID
    meta.ImplementationVersionName = f"PJRS_{package_version()}"[:16]
    return meta


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(ds: Dataset, path: str | os.PathLike[str]) -> Path:
    """Write ``ds`` as a DICOM file (Part 10, Explicit VR Little Endian): completely or not at all.

    The file is written to a temporary file in the same folder and moved into place with :func:`os.replace`.

    Args:
        ds: the dataset; it gets file meta information if it has none.
        path: the file to write; its folder is created.

    Returns:
        The path written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not getattr(ds, "file_meta", None) or "TransferSyntaxUID" not in ds.file_meta:
        ds.file_meta = file_meta_for(ds)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp creates the file private (0600); a gateway or PACS user must be able to read the output
        os.fchmod(fd, 0o666 & ~_current_umask())
        with os.fdopen(fd, "wb") as handle:
            pydicom.dcmwrite(handle, ds, enforce_file_format=True)
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
    return path


class DamagedFileError(ProstateJRSError, ValueError):
    """A file with the DICOM Part 10 prefix that is truncated or corrupt.

    Args:
        path: the file.
        reason: what is wrong, for messages.
        dataset: what could be parsed (``None`` when nothing could); it may identify the series the file belongs to.
    """

    def __init__(self, path: Path, reason: str, dataset: Dataset | None = None) -> None:
        super().__init__(f"{path}: truncated or corrupt DICOM file ({reason})")
        self.path = path
        self.reason = reason
        self.dataset = dataset


_UNDEFINED_LENGTH = 0xFFFFFFFF


def _short_element(ds: Dataset) -> str | None:
    """The first top-level element whose value is shorter than its header declares, described; else ``None``."""
    for element in ds.elements():
        if (
            isinstance(element, RawDataElement)
            and element.value is not None
            and element.length != _UNDEFINED_LENGTH
            and len(element.value) < element.length
        ):
            tag = element.tag
            return (
                f"element ({tag.group:04X},{tag.element:04X}) declares {element.length} bytes but the file ends after "
                f"{len(element.value)}"
            )
    return None


# A valid DS value (PS3.5 table 6.2-1, as pydicom's check): pydicom converts and validates it without error or warning
_DECIMAL = rb" *[+\-]?(?:\d+|\d+\.\d*|\.\d+)(?:[eE][+\-]?\d+)? *"
_DECIMALS = re.compile(_DECIMAL + rb"(?:\\" + _DECIMAL + rb")*")
_DS_MAX_CHARACTERS = 16


def _valid_decimal_strings(element: RawDataElement) -> bool:
    """Whether a raw element of a DS attribute, written as DS, has only valid decimal strings of at most 16 characters.

    Such an element needs no parsing to be checked: pydicom would convert it without error or warning. Converting it
    makes a Python object per number, and an RTSTRUCT's ContourData holds about 10^5 numbers (a second per structure
    set); left raw, its reader parses the bytes itself. Anything else (a sequence written as DS among them) is parsed.
    """
    if element.VR != "DS" or not isinstance(element.value, bytes):
        return False
    if not pydicom.datadict.dictionary_has_tag(element.tag) or pydicom.datadict.dictionary_VR(element.tag) != "DS":
        return False
    text = element.value.rstrip(b" \x00")
    return (
        _DECIMALS.fullmatch(text) is not None and max(len(value) for value in text.split(b"\\")) <= _DS_MAX_CHARACTERS
    )


# Raw elements, with the encoding they were read in, that a complete file read without warnings converted cleanly.
# The slices of a series repeat most of their ~100 elements byte for byte: converting each distinct one once made
# reading a 512 x 512 CT pair 0.05-0.2 s faster. Values converted again are the same bytes in the same encoding.
# A study adds a few thousand keys; the set is emptied at the limit (about 12 MB), so a long-running node stays small.
_CLEAN_RAW: set[tuple[object, ...]] = set()
_CLEAN_RAW_LIMIT = 50_000
_CLEAN_RAW_MAX_BYTES = 256


def _clean_key(raw: RawDataElement, ds: Dataset) -> tuple[object, ...] | None:
    """What makes converting ``raw`` (a top-level element of ``ds``) repeatable: tag, VR, bytes, encoding and
    character set; ``None`` for sequences, private or long values, which are converted every time."""
    value = raw.value
    if not isinstance(value, bytes) or len(value) > _CLEAN_RAW_MAX_BYTES:
        return None
    if (
        raw.VR == "SQ"
        or not pydicom.datadict.dictionary_has_tag(raw.tag)
        or "SQ" in pydicom.datadict.dictionary_VR(raw.tag)
    ):
        return None
    return (raw.tag, raw.VR, value, ds.original_encoding, tuple(ds.original_character_set or ()))


def _remember_clean(keys: list[tuple[object, ...]]) -> None:
    if len(_CLEAN_RAW) + len(keys) > _CLEAN_RAW_LIMIT:
        _CLEAN_RAW.clear()
    _CLEAN_RAW.update(keys)


def _structure_problem(ds: Dataset, converted: list[tuple[object, ...]] | None = None) -> str | None:
    """Parse every element of ``ds`` (recursively); the first element the dictionary makes a sequence that is none.

    A sequence written with another VR (a PACS that lost the VR, a broken writer) parses into a number or bytes; every
    reader would then fail on it in its own way, so it is named here. Valid decimal strings are checked without
    parsing (:func:`_valid_decimal_strings`); elements are visited in :meth:`Dataset.iterall`'s order. With
    ``converted`` (top level only), elements that converted cleanly in an earlier file are not converted again, and the
    keys of those converted now are appended to it.
    """
    for tag in sorted(ds.keys()):
        raw = ds.get_item(tag)
        key = None
        if isinstance(raw, RawDataElement):
            if _valid_decimal_strings(raw):
                continue
            key = None if converted is None else _clean_key(raw, ds)
            if key is not None and key in _CLEAN_RAW:
                continue
        element = ds[tag]
        known = element.VR != "SQ" and pydicom.datadict.dictionary_has_tag(element.tag)
        if known and pydicom.datadict.dictionary_VR(element.tag) == "SQ":
            return (
                f"element ({tag.group:04X},{tag.element:04X}) {element.keyword} has VR {element.VR}; expected a "
                "sequence (SQ)"
            )
        if element.VR == "SQ":
            for item in element.value:
                problem = _structure_problem(item)
                if problem:
                    return problem
        if key is not None and converted is not None:
            converted.append(key)
    return None


def read_dicom(path: str | os.PathLike[str], **kwargs: object) -> Dataset:
    """:func:`pydicom.dcmread` that refuses a truncated or corrupt file instead of returning the part it parsed.

    pydicom stops quietly at the end of a truncated file: the last value comes back short (half the pixel data) or
    the elements after the cut are simply missing, and bytes after a ``DICM`` prefix that are not DICOM at all parse
    into nonsense elements. A CT slice or RTSTRUCT read that way loses pixels, slices or contours without a word, so
    this parses every element (pydicom would otherwise convert them lazily, and fail later, wherever they are first
    used; an element with the same bytes and encoding as one an earlier clean file converted is known to parse),
    checks that no sequence was written with another VR, that every element read is as long as its header
    declares, that pydicom did not reach the end of the file inside a sequence or an undefined-length value, and that
    the file meta information names a transfer syntax.
    Files cut exactly between two elements pass: callers check that the elements they need are present.

    Args:
        path: the file.
        **kwargs: passed to :func:`pydicom.dcmread` (e.g. ``stop_before_pixels``, ``specific_tags``).

    Returns:
        The dataset.

    Raises:
        pydicom.errors.InvalidDicomError: if the file is not DICOM Part 10 (no ``DICM`` prefix): not damaged, just
            not DICOM.
        DamagedFileError: if it has the prefix but cannot be read completely; the message names the file.
    """
    path = Path(path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            ds = pydicom.dcmread(path, **kwargs)  # type: ignore[arg-type]
        except pydicom.errors.InvalidDicomError:
            raise
        except Exception as err:  # pydicom raises many types on damaged files (struct.error, ValueError, OSError, ...)
            raise DamagedFileError(path, f"cannot be parsed: {type(err).__name__}: {err}") from err
        meta = getattr(ds, "file_meta", None)
        problem = (
            "no Transfer Syntax UID (0002,0010) in the file meta information"
            if meta is None or "TransferSyntaxUID" not in meta
            else _short_element(meta) or _short_element(ds)  # before the elements are converted below
        )
        converted: list[tuple[object, ...]] = []
        if not problem:
            try:  # pydicom converts elements lazily: parse them all now, so that a damaged one fails here, not later
                problem = _structure_problem(ds, converted)
            except Exception as err:
                problem = f"cannot be parsed: {type(err).__name__}: {err}"
    eof = [str(w.message) for w in caught if "end of file" in str(w.message).lower()]
    problem = eof[0] if eof else problem
    if problem:
        raise DamagedFileError(path, problem, ds)
    if not caught:  # a value that warned is converted (and warns) again in every file
        _remember_clean(converted)
    for w in caught:  # a complete file: keep pydicom's warnings visible, as without the check
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return ds


def read_whole(path: Path, error: type[Exception], expected: str) -> Dataset:
    """:func:`read_dicom` for a reader that raises its own exception for a file it cannot use.

    Never part of a damaged file: a cut CT slice loses pixels, a cut structure set ROIs or contours, without an error.

    Args:
        path: the file.
        error: the reader's exception type (e.g. ``CTSeriesError``), raised with the file in the message.
        expected: what the file should have been, ending the message for a damaged file (e.g. ``"a complete RTSTRUCT:
            re-export it"``).

    Raises:
        Exception: ``error``, if the file is not DICOM Part 10 or is truncated or corrupt.
    """
    try:
        return read_dicom(path)
    except pydicom.errors.InvalidDicomError as err:
        raise error(f"{path}: cannot read as DICOM ({err})") from err
    except DamagedFileError as err:
        raise error(f"{path}: truncated or corrupt DICOM file ({err.reason}); expected {expected}") from err
