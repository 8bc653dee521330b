"""Approved fractions from DICOM folders: one per folder or several, one patient only, all four structures."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from dicom_edits import edit_rois

from prostate_jrs.adaptation.sessions import read_approved_fractions
from prostate_jrs.dicom.discovery import DicomSelectionError
from prostate_jrs.dicom.rtstruct_reader import RTStructError
from prostate_jrs.geometry import array_from_image


def test_one_folder_per_fraction_gives_the_pairs_in_order(handover: dict) -> None:
    folders = [handover["JRS001"][k].approved for k in (2, 1)]  # given out of order
    fractions = read_approved_fractions(folders)
    assert [f.folder.name for f in fractions] == ["JRS001_f01_approved", "JRS001_f02_approved"]
    first = fractions[0]
    assert first.patient == ("JRS001", "") and first.patient_key == "JRS001"
    labels = array_from_image(first.daily_labels)
    assert labels.shape == first.inputs.daily.image.GetSize()
    assert set(np.unique(labels)) == {0, 1, 2, 3, 4}
    truth = array_from_image(sitk.ReadImage(str(handover["JRS001"][1].truth)))
    assert np.mean(labels[truth > 0] == truth[truth > 0]) > 0.9  # the approved RTSTRUCT is the daily truth
    uids = first.uids
    assert uids["daily_ct"] == first.inputs.daily.series_instance_uid
    assert uids["planning_rtstruct"] != uids["daily_rtstruct"]
    assert len(set(uids.values())) == 4


def test_a_folder_with_the_whole_patient_and_duplicates_gives_each_fraction_once(
    synthetic_archive: Path, handover: dict
) -> None:
    # JRS006's archive folder: three daily CTs, the last without approved contours; the same fraction given twice
    fractions = read_approved_fractions([synthetic_archive / "dicom" / "JRS006", handover["JRS006"][1].approved])
    assert len(fractions) == 2
    assert len({f.inputs.daily.series_instance_uid for f in fractions}) == 2


def test_two_patients_no_approved_fraction_and_missing_folders_are_refused(handover: dict, tmp_path: Path) -> None:
    with pytest.raises(DicomSelectionError, match=r"approved fractions of 2 patients: PatientID 'JRS001' in .*JRS002"):
        read_approved_fractions([handover["JRS001"][1].approved, handover["JRS002"][1].approved])
    with pytest.raises(DicomSelectionError, match=r"JRS001_f01: no approved fraction; expected a planning CT"):
        read_approved_fractions([handover["JRS001"][1].scan])
    with pytest.raises(FileNotFoundError, match="nowhere: not a folder"):
        read_approved_fractions([tmp_path / "nowhere"])


def test_approved_contours_without_a_structure_are_refused(handover: dict, tmp_path: Path) -> None:
    folder = Path(shutil.copytree(handover["JRS001"][1].approved, tmp_path / "f01", copy_function=shutil.copy2))
    daily_rtstruct = next((folder / "Study_FX1" / "RTSTRUCT_2").glob("*.dcm"))
    edit_rois(daily_rtstruct, rename={"Bladder": "Blaas met spoeling"})
    with pytest.raises(RTStructError, match=r"approved daily contours lack bladder; ROIs mapping to no structure: "):
        read_approved_fractions([folder])
