"""Every broken session of ``tests/bad_sessions.py`` is refused by ``load_session`` with an error of the project's
tree whose message names the file, tag, UID or ROI and what was expected, as the app prints it."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from bad_sessions import REFUSED, Mutation, Study, make_study

from prostate_jrs.dicom_session import SESSION_ERRORS, load_session


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> Study:
    return make_study(tmp_path_factory.mktemp("synth") / "data")


def test_the_study_itself_loads(study: Study) -> None:
    inputs = load_session(study.folder)
    assert inputs.planning_labels.GetSize() == inputs.planning.image.GetSize()


@pytest.mark.parametrize("mutate", REFUSED, ids=[m.__name__ for m in REFUSED])
def test_a_broken_session_is_refused_naming_what_is_wrong(study: Study, tmp_path: Path, mutate: Mutation) -> None:
    folder = Path(shutil.copytree(study.folder, tmp_path / "in"))
    expected = mutate(folder, study.uids)
    with pytest.raises(SESSION_ERRORS) as refused:
        load_session(folder)
    message = str(refused.value)
    for fragment in expected:
        assert fragment in message, f"{fragment!r} not in: {message}"
