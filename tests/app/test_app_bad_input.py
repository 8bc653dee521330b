"""Bad input through the app as users run it (``python app -i IN -o OUT -m BUNDLE``, a subprocess).

One tiny synthetic session is generated per module; each case copies it, breaks it with pydicom and runs the app.
Where the app cannot proceed it must exit with status 1, print one ``prostate-jrs: error:`` message naming the file,
tag or ROI and what was expected (no traceback), and leave the output folder as it was: no RTSTRUCT, SEG,
registration or QA file and no staging folder. Refusals happen while the session is read, before the network runs.
Where it can proceed (some structures missing, unknown ROI names) it must say what it left out in ``qa.json``.

Every mutation of ``tests/bad_sessions.py`` is refused by ``load_session`` (tests/test_dicom_session_refusals.py), and
the reader tests cover each check in detail (tests/dicom/test_discovery.py, test_ct_reader.py, test_rtstruct_reader.py,
test_common.py); these make sure the app stops, says why and writes nothing, for one refusal of each reader.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from bad_sessions import (
    Mutation,
    Study,
    daily_missing_slice,
    make_study,
    mim_rtstruct_with_incomplete_ct,
    no_roi_maps_to_a_structure,
    no_rtstruct,
    planning_slice_truncated,
    rtstruct_of,
)
from dicom_edits import edit_rois

# one app process per case; every refusal is also a library test (tests/test_dicom_session_refusals.py)
pytestmark = pytest.mark.slow

if TYPE_CHECKING:  # conftest is not importable at run time; the fixture hands its helper over
    from conftest import RunApp

OUTPUTS = ("rtstruct.dcm", "seg.dcm", "registration.dcm", "qa.json", "qa.png")
EARLIER = "earlier_result.txt"  # a file already in the output folder: a refused run must leave it alone
# Through the app, one refusal per reader that refuses (selection, CT series, RTSTRUCT, a damaged file, a real
# vendor's export); tests/test_dicom_session_refusals.py runs every mutation through load_session. Each app run costs
# ~10 s, mostly importing torch and MONAI.
APP_REFUSED: list[Mutation] = [
    no_rtstruct,
    daily_missing_slice,
    no_roi_maps_to_a_structure,
    planning_slice_truncated,
    mim_rtstruct_with_incomplete_ct,
]


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> Study:
    """One tiny synthetic patient, one fraction: planning CT, planning RTSTRUCT and daily CT in one folder."""
    return make_study(tmp_path_factory.mktemp("synth") / "data")


def _error_message(stderr: str) -> str:
    """The app's error message: from ``prostate-jrs: error:`` to ``prostate-jrs: no output written``."""
    start = stderr.rindex("prostate-jrs: error: ")
    end = stderr.index("prostate-jrs: no output written", start)
    return stderr[start:end]


@pytest.mark.parametrize("mutate", APP_REFUSED, ids=[m.__name__ for m in APP_REFUSED])
def test_bad_input_is_refused_with_a_clear_message_and_no_output(
    study: Study, bundle: Path, tmp_path: Path, run_app: RunApp, mutate: Mutation
) -> None:
    folder = Path(shutil.copytree(study.folder, tmp_path / "in"))
    expected = mutate(folder, study.uids)
    # an output folder with an earlier file must keep just that; one the run would create must not appear
    existing = mutate is not no_rtstruct
    out = tmp_path / "out" / "fraction 1"
    if existing:
        out.mkdir(parents=True)
        (out / EARLIER).write_text("kept")

    result = run_app(["-i", str(folder), "-o", str(out), "-m", str(bundle)], tmp_path)

    log = result.stdout[-3000:] + result.stderr[-3000:]
    assert result.returncode == 1, log
    assert "Traceback (most recent call last)" not in result.stderr, log
    message = _error_message(result.stderr)
    for fragment in expected:
        assert fragment in message, f"{fragment!r} not in: {message}"
    if existing:
        assert [p.name for p in out.iterdir()] == [EARLIER]  # no output, no staging folder
    else:
        assert not out.exists()


def test_missing_structures_and_unknown_rois_are_reported(
    study: Study, bundle: Path, tmp_path: Path, run_app: RunApp
) -> None:
    """No rectum, the vesicles under a name no synonym knows: the app proceeds and says so in qa.json."""
    folder = Path(shutil.copytree(study.folder, tmp_path / "in"))
    edit_rois(rtstruct_of(folder), rename={"SV": "Spacer"}, remove=("Rectum",))
    out = tmp_path / "out"

    result = run_app(["-i", str(folder), "-o", str(out), "-m", str(bundle)], tmp_path)

    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == sorted(OUTPUTS)
    qa = json.loads((out / "qa.json").read_text())
    session = qa["session"]
    assert session["missing_structures"] == ["seminal_vesicles", "rectum"]
    assert session["unmapped_rois"] == ["Spacer", "BODY"]
    assert session["roi_to_structure"] == {"Prostate": "prostate", "Spacer": None, "Bladder": "bladder", "BODY": None}
    assert "structures missing from the planning RTSTRUCT: seminal_vesicles, rectum" in session["notes"]
    assert "ROIs not used (no structure): Spacer, BODY" in session["notes"]
    for name in ("seminal_vesicles", "rectum"):
        assert f"{name}: not in the planning contours" in qa["flags"]
        assert qa["structures"][name]["planning_volume_ml"] == 0.0
        assert qa["structures"][name]["volume_change_pct"] is None
    assert qa["structures"]["prostate"]["planning_volume_ml"] > 0
    assert "QA flag: rectum: not in the planning contours" in result.stdout
