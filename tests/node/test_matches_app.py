"""The node's job gives what the MONAI Deploy app gives for the same session: same ROIs and masks, same SEG, same
registration. The app runs as users run it (``python app -i IN -o OUT -m BUNDLE``) on the job's received input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from node_testing import Processed

from prostate_jrs.dicom.ct_reader import read_ct_series
from prostate_jrs.dicom.discovery import select_session
from prostate_jrs.dicom.registration import read_deformable_registration
from prostate_jrs.dicom.rtstruct_reader import read_rtstruct

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_node_outputs_match_the_app(processed: Processed, node_bundle: Path, tmp_path: Path) -> None:
    job = processed.job
    assert "processed" in job.times, job.reason  # processed (its destination was down: the results stayed)
    app_out = tmp_path / "app_out"
    run = subprocess.run(
        [sys.executable, str(REPO / "app"), "-i", str(job.input_dir), "-o", str(app_out), "-m", str(node_bundle)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        # the environment the node gives its worker: the refinement's float sums, and so its last voxels, depend on
        # the thread count
        env=dict(os.environ),
        timeout=600,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    node_out = job.output_dir
    assert sorted(p.name for p in app_out.iterdir()) == sorted(p.name for p in node_out.iterdir())

    # RTSTRUCT: same ROI names, same masks read back on the daily CT
    daily = read_ct_series(select_session(job.input_dir).daily_ct.files)
    ours, theirs = (read_rtstruct(folder / "rtstruct.dcm", daily) for folder in (node_out, app_out))
    assert [roi.name for roi in ours.rois] == [roi.name for roi in theirs.rois]
    assert ours.label_map.any()
    np.testing.assert_array_equal(ours.label_map, theirs.label_map)

    # SEG: same segments, same frames
    seg_ours, seg_theirs = (pydicom.dcmread(folder / "seg.dcm") for folder in (node_out, app_out))
    labels = [[s.SegmentLabel for s in seg.SegmentSequence] for seg in (seg_ours, seg_theirs)]
    assert labels[0] == labels[1]
    np.testing.assert_array_equal(seg_ours.pixel_array, seg_theirs.pixel_array)

    # registration: same rigid part and deformation grid
    reg_ours, reg_theirs = (read_deformable_registration(folder / "registration.dcm") for folder in (node_out, app_out))
    np.testing.assert_allclose(reg_ours.pre_matrix, reg_theirs.pre_matrix, atol=1e-6)
    np.testing.assert_allclose(reg_ours.ddf_on(daily.image), reg_theirs.ddf_on(daily.image), atol=1e-4)

    # QA: same per-structure report (timings and the bundle's path aside)
    qa_ours, qa_theirs = (json.loads((folder / "qa.json").read_text()) for folder in (node_out, app_out))
    assert qa_ours["structures"] == qa_theirs["structures"]
    assert qa_ours["settings"] == qa_theirs["settings"]
    assert qa_ours["flags"] == qa_theirs["flags"]
