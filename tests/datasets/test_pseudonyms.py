"""The pseudonym key: random, stable across runs, private, refused when damaged."""

from __future__ import annotations

import re
import stat
from pathlib import Path

import pytest

from prostate_jrs.datasets.pseudonyms import PseudonymKey


def test_pseudonyms_are_random_stable_and_kept_private(tmp_path: Path) -> None:
    key = PseudonymKey(tmp_path / "key.csv")
    first = {pid: key.pseudonym(pid) for pid in ("12345", "12346", "99 (HOSP)")}
    assert all(re.fullmatch(r"P[0-9A-F]{8}", p) for p in first.values()) and len(set(first.values())) == 3
    assert key.pseudonym("12345") == first["12345"]
    key.save()
    assert stat.S_IMODE((tmp_path / "key.csv").stat().st_mode) == 0o600
    again = PseudonymKey(tmp_path / "key.csv")
    assert len(again) == 3 and all(again.pseudonym(pid) == p for pid, p in first.items())
    assert PseudonymKey(tmp_path / "other.csv").pseudonym("12345") != first["12345"]  # not derived from the ID


def test_damaged_key_is_refused(tmp_path: Path) -> None:
    (tmp_path / "key.csv").write_text("id,name\n1,2\n")
    with pytest.raises(ValueError, match="not a pseudonym key"):
        PseudonymKey(tmp_path / "key.csv")
    (tmp_path / "key.csv").write_text("patient_key,pseudonym\nA,P1\nB,P1\n")
    with pytest.raises(ValueError, match="share a pseudonym"):
        PseudonymKey(tmp_path / "key.csv")
