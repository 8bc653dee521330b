"""The `prostate-jrs` command: `synth` end to end (tiny preset), arguments and errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from prostate_jrs.cli import build_parser, main
from prostate_jrs.geometry import array_from_image


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "D"
    argv = ["synth", str(out), "--patients", "3", "--fractions", "2", "--seed", "1", "--preset", "tiny", "--preview"]
    assert main(argv) == 0
    return out


def test_synth_writes_dataset_and_previews(synth_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = json.loads((synth_dir / "datalist.json").read_text())
    items = data["training"] + data["validation"] + data["test"]
    assert len(items) == 6
    assert {item["patient"] for item in items} == {"JRS001", "JRS002", "JRS003"}
    for part in ("training", "validation", "test"):
        assert len({item["patient"] for item in data[part]}) == 1
    for item in items:
        for key in ("fixed_image", "moving_image", "moving_label", "fixed_label", "ddf"):
            assert (synth_dir / item[key]).is_file()
    previews = sorted(p.name for p in synth_dir.glob("*_preview.png"))
    assert previews == ["JRS001_preview.png", "JRS002_preview.png", "JRS003_preview.png"]
    image = sitk.ReadImage(str(synth_dir / "JRS001_planning_ct.nii.gz"))
    assert image.GetSpacing() == (4.0, 4.0, 4.0)


def test_synth_items_load_with_monai(synth_dir: Path) -> None:
    from monai.transforms import LoadImaged

    item = json.loads((synth_dir / "datalist.json").read_text())["test"][0]
    keys = ["fixed_image", "moving_image", "moving_label", "fixed_label", "ddf"]
    data = LoadImaged(keys=keys)({k: str(synth_dir / item[k]) for k in keys})
    assert data["ddf"].shape == (*data["fixed_image"].shape, 3)


def test_spacing_option(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "coarse"
    assert main(["synth", str(out), "--patients", "1", "--fractions", "1", "--seed", "0", "--spacing", "8"]) == 0
    image = sitk.ReadImage(str(out / "JRS001_f01_ct.nii.gz"))
    assert image.GetSpacing() == (8.0, 8.0, 8.0)
    assert image.GetSize()[:2] == (62, 62)  # clinical 500 mm field of view kept
    assert "62x62x34" in capsys.readouterr().out
    labels = array_from_image(sitk.ReadImage(str(out / "JRS001_f01_labels.nii.gz")))
    assert set(np.unique(labels)) >= {0, 1, 3, 4}


def test_existing_output_is_a_clear_error(synth_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["synth", str(synth_dir), "--patients", "1", "--fractions", "1", "--seed", "0"]) == 2
    assert "already exists" in capsys.readouterr().err


def test_bad_spacing_count_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["synth", str(tmp_path / "x"), "--patients", "1", "--fractions", "1", "--seed", "0", "--spacing", "1", "2"]
    assert main(argv) == 2
    assert "one or three values" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--patients", "0", "--fractions", "1", "--seed", "0"], "positive integer"),
        (["--patients", "1", "--fractions", "1", "--seed", "-1"], "non-negative integer"),
        (["--patients", "1", "--fractions", "1", "--seed", "0", "--spacing", "abc"], "positive number"),
        (["--patients", "1", "--fractions", "1"], "--seed"),
    ],
)
def test_argument_errors(extra: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["synth", "OUT", *extra])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_module_entry_point_help() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "prostate_jrs.cli", "synth", "--help"], capture_output=True, text=True, check=True
    )
    for option in ("--patients", "--fractions", "--seed", "--spacing", "--preview"):
        assert option in result.stdout


def test_synth_sites_writes_one_dataset_per_site(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "R"
    argv = ["synth", str(out), "--sites", "2", "--patients", "1", "--fractions", "1", "--seed", "0", "--preset", "tiny"]
    assert main(argv) == 0
    assert sorted(p.name for p in out.iterdir()) == ["site-1", "site-2", "sites.json"]
    for site in ("site-1", "site-2"):
        assert (out / site / "datalist.json").is_file()
    sizes = [sitk.ReadImage(str(out / s / "JRS001_planning_ct.nii.gz")).GetSize() for s in ("site-1", "site-2")]
    assert sizes[1][0] < sizes[0][0]  # institute-b reconstructs a smaller field of view
    printed = capsys.readouterr().out
    assert "site-1=institute-a" in printed and "site-2=institute-b" in printed


def test_synth_institute_gives_every_patient_that_profile(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["synth", "", "--patients", "1", "--fractions", "1", "--seed", "0", "--preset", "tiny"]
    for name in ("plain", "institute-b"):
        argv[1] = str(tmp_path / name)
        assert main(argv + (["--institute", name] if name != "plain" else [])) == 0
    site = json.loads((tmp_path / "institute-b" / "phantom.json").read_text())["config"]["site"]
    assert site["name"] == "institute-b" and site["hu_offset"] == 20.0
    sizes = [
        sitk.ReadImage(str(tmp_path / n / "JRS001_planning_ct.nii.gz")).GetSize() for n in ("plain", "institute-b")
    ]
    assert sizes[1][0] < sizes[0][0]  # institute-b reconstructs a smaller field of view
    assert "institute-b profile" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--institute", "institute-c"], "expected one of: institute-a, institute-b"),
        (["--institute", "institute-b", "--sites", "2"], "--sites alternates them"),
    ],
)
def test_synth_institute_errors(
    tmp_path: Path, extra: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["synth", str(tmp_path / "D"), "--patients", "1", "--fractions", "1", "--seed", "0", "--preset", "tiny"]
    assert main(argv + extra) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "D").exists()


def test_synth_sites_must_be_positive(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["synth", "OUT", "--patients", "1", "--fractions", "1", "--seed", "0", "--sites", "0"]
    with pytest.raises(SystemExit):
        build_parser().parse_args(argv)
    assert "positive integer" in capsys.readouterr().err


def test_synth_dicom_writes_one_session_folder_per_fraction(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from prostate_jrs.dicom.discovery import select_session

    out = tmp_path / "D"
    argv = ["synth", str(out), "--patients", "1", "--fractions", "2", "--seed", "2", "--preset", "tiny", "--dicom"]
    assert main(argv) == 0
    assert sorted(p.name for p in (out / "dicom").iterdir()) == ["JRS001_f01", "JRS001_f02", "sessions.json"]
    assert (out / "datalist.json").is_file()
    session = select_session(out / "dicom" / "JRS001_f02")
    assert session.planning_ct.frame_of_reference_uid != session.daily_ct.frame_of_reference_uid
    assert "dicom/sessions.json" in capsys.readouterr().out


def test_synth_help_lists_dicom(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["synth", "--help"])
    assert "--dicom" in capsys.readouterr().out
