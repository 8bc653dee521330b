"""The pseudonym key: which random pseudonym stands for which patient, kept by the site, never in the dataset.

Pseudonyms are random (``P`` + 8 hexadecimal digits from :mod:`secrets`), so nothing about the patient can be
derived from them; only the key links them back. The key is a CSV file (``patient_key,pseudonym``) written with
owner-only permissions; every run of ``prostate-jrs import`` reads it first, so a patient keeps their pseudonym.
"""

from __future__ import annotations

import csv
import io
import os
import secrets
import tempfile
from pathlib import Path

__all__ = ["KEY_HEADER", "PseudonymKey"]

KEY_HEADER = ("patient_key", "pseudonym")
_PREFIX = "P"


class PseudonymKey:
    """Patient key (Patient ID, with the issuer when given) -> pseudonym, backed by a CSV file.

    Args:
        path: the key file; read when it exists.

    Raises:
        ValueError: if the file is not a key written by this class, or maps two patients to one pseudonym.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._pseudonyms: dict[str, str] = {}
        if self.path.is_file():
            self._read()

    def _read(self) -> None:
        with self.path.open(newline="", encoding="utf-8") as handle:
            rows = list(csv.reader(handle))
        if not rows or tuple(rows[0]) != KEY_HEADER:
            raise ValueError(f"{self.path}: not a pseudonym key (expected the header {','.join(KEY_HEADER)})")
        for line, row in enumerate(rows[1:], start=2):
            if len(row) != 2 or not row[0] or not row[1]:
                raise ValueError(f"{self.path}, line {line}: expected 'patient_key,pseudonym', got {row}")
            self._pseudonyms[row[0]] = row[1]
        if len(set(self._pseudonyms.values())) != len(self._pseudonyms):
            raise ValueError(f"{self.path}: two patients share a pseudonym; the key is damaged")

    def __len__(self) -> int:
        return len(self._pseudonyms)

    def __contains__(self, patient_key: object) -> bool:
        return patient_key in self._pseudonyms

    def pseudonym(self, patient_key: str) -> str:
        """The patient's pseudonym, a new random one the first time (call :meth:`save` to keep it)."""
        if patient_key not in self._pseudonyms:
            taken = set(self._pseudonyms.values())
            while (candidate := f"{_PREFIX}{secrets.token_hex(4).upper()}") in taken:
                pass
            self._pseudonyms[patient_key] = candidate
        return self._pseudonyms[patient_key]

    def save(self) -> Path:
        """Write the key (owner read/write only), completely or not at all."""
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(KEY_HEADER)
        writer.writerows(sorted(self._pseudonyms.items()))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=self.path.parent)
        try:
            os.fchmod(fd, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(buffer.getvalue())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return self.path
