"""prostate_jrs.timing: forked measurements, peak memory and machine facts for the benchmarks."""

from __future__ import annotations

import mmap
import os

import numpy as np
import pytest

from prostate_jrs.timing import hardware_info, peak_rss_mib, run_forked, software_versions


def _allocate(mib: int) -> float:
    start = peak_rss_mib()
    # a fresh anonymous mapping: a malloc that an engine loaded into the test process (OpenVINO's) may serve a
    # large array from pages the parent had already touched, which are resident before the child writes them
    block = mmap.mmap(-1, mib * 2**20)
    pages = np.frombuffer(block, dtype=np.uint8)
    pages.fill(1)  # ones, not zeros: the pages must be touched to count
    assert int(pages.sum()) == mib * 2**20
    return peak_rss_mib() - start


def _fail() -> None:
    raise ValueError("measured nothing")


def test_run_forked_returns_the_result_and_isolates_memory() -> None:
    before = peak_rss_mib()
    assert run_forked(_allocate, 200) > 150
    assert peak_rss_mib() - before < 100  # the child's peak is not the parent's
    assert run_forked(divmod, 7, 2) == (3, 1)


def test_run_forked_reports_the_childs_error_and_death() -> None:
    with pytest.raises(ChildProcessError, match="ValueError: measured nothing"):
        run_forked(_fail)
    with pytest.raises(ChildProcessError, match="exit code 3"):
        run_forked(os._exit, 3)


def test_machine_and_versions() -> None:
    info = hardware_info()
    assert info["cpu_model"] and info["logical_cores"] >= 1 and 1 <= info["usable_cores"] <= info["logical_cores"]
    versions = software_versions(["numpy", "no-such-distribution-here"])
    assert versions == {"numpy": np.__version__, "no-such-distribution-here": None}
