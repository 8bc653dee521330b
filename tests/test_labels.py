from __future__ import annotations

import json

import pytest

from prostate_jrs.labels import (
    LABEL_NAMES,
    NUM_CLASSES,
    STRUCTURES,
    SynonymTable,
    normalize_roi_name,
    structure_by_label,
    structure_by_name,
)


def test_label_numbers_are_the_design_contract():
    assert LABEL_NAMES == {0: "background", 1: "prostate", 2: "seminal_vesicles", 3: "rectum", 4: "bladder"}
    assert NUM_CLASSES == 5
    assert len({s.color for s in STRUCTURES}) == len(STRUCTURES)
    assert structure_by_label(3).name == "rectum"
    assert structure_by_name("bladder").label == 4
    with pytest.raises(KeyError, match="label 7"):
        structure_by_label(7)


@pytest.mark.parametrize(
    ("roi_name", "expected"),
    [
        ("Prostate", "prostate"),
        ("CTV_Prostate", "prostate"),
        ("CTV Prostate", "prostate"),
        ("prostaat", "prostate"),
        ("SV", "seminal_vesicles"),
        ("Vesicles", "seminal_vesicles"),
        ("Seminal Vesicles", "seminal_vesicles"),
        ("RECTUM", "rectum"),
        ("Bladder", "bladder"),
        ("Urinary-Bladder", "bladder"),
        ("Blaas", "bladder"),
    ],
)
def test_default_synonyms_map_common_clinical_names(roi_name, expected):
    structure = SynonymTable().match(roi_name)
    assert structure is not None and structure.name == expected


@pytest.mark.parametrize("roi_name", ["BODY", "Femur_L", "PTV_7800", "Bladder_wall", "GTV", ""])
def test_unrelated_rois_are_not_mapped(roi_name):
    assert SynonymTable().match(roi_name) is None


def test_normalize_roi_name_folds_case_accents_and_separators():
    assert normalize_roi_name("  Vésicules--Séminales ") == "vesicules_seminales"


def test_table_extends_from_file(tmp_path):
    path = tmp_path / "site_synonyms.json"
    path.write_text(json.dumps({"prostate": ["CTV_P_78Gy"], "rectum": ["Anorectum_ext"]}))
    table = SynonymTable.from_file(path)
    assert table.match("ctv p 78gy").name == "prostate"
    assert table.match("Anorectum_EXT").name == "rectum"
    assert table.match("Bladder").name == "bladder"
    assert SynonymTable.from_file(path, include_defaults=False).match("Bladder") is None


def test_bad_synonym_files_name_the_problem(tmp_path):
    unknown = tmp_path / "unknown.json"
    unknown.write_text(json.dumps({"kidney": ["Kidney_L"]}))
    with pytest.raises(ValueError, match=r"unknown\.json.*'kidney'"):
        SynonymTable.from_file(unknown)
    clash = tmp_path / "clash.json"
    clash.write_text(json.dumps({"rectum": ["Prostate"]}))
    with pytest.raises(ValueError, match="maps to both"):
        SynonymTable.from_file(clash)
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        SynonymTable.from_file(broken)
