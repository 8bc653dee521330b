"""``prostate-jrs import`` on the synthetic archive: every pair found, contours exact after the DICOM round trip,
every deliberately broken item reported with its reason, a second run that does nothing, no PHI in the dataset."""

from __future__ import annotations

import csv
import gzip
import json
import shutil
import stat
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import SimpleITK as sitk
from dicom_edits import copy_patients, cut_inside, edit_rois, set_patient

from prostate_jrs.cli import main
from prostate_jrs.datasets import importer
from prostate_jrs.datasets.archive import patient_inventories, plan_patient, scan_archive
from prostate_jrs.datasets.importer import PATIENTS, ImportSettings, import_archive, import_patient
from prostate_jrs.geometry import array_from_image, index_to_world
from prostate_jrs.labels import STRUCTURES

LISTS = ("training", "validation", "test")


def _truth(archive: Path) -> dict[str, Any]:
    return json.loads((archive / "dicom" / "archive.json").read_text())


def _key(dataset: Path) -> dict[str, str]:
    """Pseudonym -> Patient ID, from the key beside the dataset."""
    with (dataset.parent / f"{dataset.name}-private" / "pseudonym_key.csv").open() as handle:
        return {row["pseudonym"]: row["patient_key"] for row in csv.DictReader(handle)}


def _report(dataset: Path) -> dict[str, Any]:
    document = json.loads((dataset.parent / f"{dataset.name}-private" / "import_report.json").read_text())
    return {p["patient_key"]: p for p in document["patients"]}


def _read(path: Path) -> np.ndarray:
    return array_from_image(sitk.ReadImage(str(path)))


def _series_folder(archive: Path, patient: str, fraction: int, kind: str) -> Path:
    return archive / "dicom" / patient / f"Study_FX{fraction}" / {"ct": "CT_1", "rtstruct": "RTSTRUCT_2"}[kind]


def test_every_pair_is_found_and_contours_survive_the_round_trip(
    synthetic_archive: Path, imported_archive: Path
) -> None:
    truth, key = _truth(synthetic_archive), _key(imported_archive)
    datalist = json.loads((imported_archive / "datalist.json").read_text())
    items = [item for part in LISTS for item in datalist[part]]
    found = {(key[item["patient"]], item["fraction"]) for item in items}
    expected = {
        (pid, f["fraction"]) for pid, p in truth["patients"].items() for f in p["fractions"] if f["daily_rtstruct"]
    }
    assert found == expected and len(found) == 17  # 6 x 3 pairs, one without contours
    assert [(key[i["patient"]], i["fraction"]) for i in datalist["inference"]] == [("JRS006", 3)]
    # split by patient: every list non-empty, no patient in two lists
    owners = {part: {item["patient"] for item in datalist[part]} for part in LISTS}
    assert (
        all(owners.values())
        and not (owners["training"] & owners["test"])
        and not (owners["validation"] & owners["test"])
    )
    worst: dict[str, float] = {}
    for item in items:
        pid = key[item["patient"]]
        fraction = truth["patients"][pid]["fractions"][item["fraction"] - 1]
        reference = _read(synthetic_archive / fraction["item"]["fixed_label"])
        imported = _read(imported_archive / item["fixed_label"])
        for structure in STRUCTURES:
            a, b = imported == structure.label, reference == structure.label
            worst[structure.name] = min(worst.get(structure.name, 1.0), 2 * (a & b).sum() / (a.sum() + b.sum()))
        planning = _read(imported_archive / item["moving_label"])
        np.testing.assert_array_equal(planning, _read(synthetic_archive / fraction["item"]["moving_label"]))
        # the recorded rigid alignment maps the daily prostate where the phantom's bone motion maps it (mm)
        rigid, exact = np.asarray(item["rigid"]["daily_to_planning"]), np.asarray(fraction["bone_daily_to_planning"])
        daily = sitk.ReadImage(str(imported_archive / item["fixed_image"]))
        centre = index_to_world(daily) @ np.r_[np.argwhere(imported == 1).mean(axis=0), 1.0]
        assert np.linalg.norm((rigid - exact) @ centre) < 1.5
        assert item["rigid"]["residual_mm"] < 3.0 and item["rigid"]["method"] == "bone"
    print(f"daily contours after the DICOM round trip, worst DSC per structure: {worst}")
    assert min(worst.values()) >= 0.95, worst


# ------------------------------------------------------------------------------------------- a broken archive

#: (patient, fraction) -> (status, category) of each deliberately broken item, and of what synth itself adds.
BROKEN = {
    ("JRS001", 2): ("inference", "unmapped roi"),
    ("JRS002", 3): ("inference", "missing structure"),
    ("JRS003", 2): ("skipped", "damaged file"),
    ("JRS004", 3): ("skipped", "not a volume"),
    ("JRS005", 1): ("inference", "other patient"),
    ("JRS006", 3): ("inference", "no contours"),
}
SKIPPED_PATIENTS = {"STRAY001": "no rtstruct", "JRS999": "no rtstruct"}


def _break(archive: Path) -> None:
    """The edits behind :data:`BROKEN` (besides what synth writes: a stray series, a scan without contours)."""
    (rs,) = _series_folder(archive, "JRS001", 2, "rtstruct").iterdir()
    edit_rois(rs, rename={"Prostate": "Prostaat links"})  # a name no synonym knows
    (rs,) = _series_folder(archive, "JRS002", 3, "rtstruct").iterdir()
    edit_rois(rs, remove=("SV",))
    cut_inside(sorted(_series_folder(archive, "JRS003", 2, "ct").iterdir())[10], "FrameOfReferenceUID")
    for path in sorted(_series_folder(archive, "JRS004", 3, "ct").iterdir())[1:]:
        path.unlink()  # one slice left
    (rs,) = _series_folder(archive, "JRS005", 1, "rtstruct").iterdir()
    set_patient(rs, "JRS999", "Other^Patient")  # contours filed under another patient


@pytest.fixture(scope="module")
def broken(synthetic_archive: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("broken")
    shutil.copytree(synthetic_archive / "dicom", root / "synth" / "dicom")
    _break(root / "synth")
    dataset = root / "dataset"
    result = import_archive(root / "synth" / "dicom", dataset, show_progress=False)
    return {"root": root / "synth" / "dicom", "dataset": dataset, "result": result}


def test_report_lists_every_broken_item_with_its_reason(broken: dict[str, Any]) -> None:
    report = _report(broken["dataset"])
    assert set(report) == {f"JRS00{k}" for k in range(1, 7)} | set(SKIPPED_PATIENTS)
    for patient, category in SKIPPED_PATIENTS.items():
        assert report[patient]["status"] == "skipped" and report[patient]["category"] == category
    for patient in (f"JRS00{k}" for k in range(1, 7)):
        assert report[patient]["status"] == "imported"
        assert [item["fraction"] for item in report[patient]["items"]] == [1, 2, 3]  # every daily CT was found
        for item in report[patient]["items"]:
            expected = BROKEN.get((patient, item["fraction"]), ("training", ""))
            assert (item["status"], item["category"]) == expected, (patient, item)
            assert bool(item["reason"]) == (expected[0] != "training")
    reasons = {(p, i["fraction"]): i["reason"] for p, r in report.items() for i in r["items"]}
    assert "'Prostaat links'" in reasons[("JRS001", 2)] and "prostate" in reasons[("JRS001", 2)]
    assert "seminal_vesicles" in reasons[("JRS002", 3)]
    assert "cannot be read" in reasons[("JRS003", 2)]
    assert "single slice" in reasons[("JRS004", 3)]
    assert "JRS999" in reasons[("JRS005", 1)]
    rows = list(csv.DictReader((broken["dataset"].parent / "dataset-private" / "import_report.csv").open()))
    assert len(rows) == 6 * 3 + len(SKIPPED_PATIENTS)
    datalist = json.loads((broken["dataset"] / "datalist.json").read_text())
    assert sum(len(datalist[part]) for part in LISTS) == 18 - 2 - 4 and len(datalist["inference"]) == 4


def _snapshot(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*")}


def test_second_run_does_no_work_and_a_changed_patient_is_redone(broken: dict[str, Any], tmp_path: Path) -> None:
    dataset, before = broken["dataset"], _snapshot(broken["dataset"])
    key_before = (broken["dataset"].parent / "dataset-private" / "pseudonym_key.csv").read_text()
    again = import_archive(broken["root"], dataset, show_progress=False)
    assert all(r.resumed for r in again.reports) and _snapshot(dataset) == before
    assert (dataset.parent / "dataset-private" / "pseudonym_key.csv").read_text() == key_before

    # a fixed RTSTRUCT (the ROI renamed back): that patient alone is imported again, and keeps its pseudonym
    (rs,) = _series_folder(broken["root"].parent, "JRS001", 2, "rtstruct").iterdir()
    edit_rois(rs, rename={"Prostaat links": "Prostate"})
    third = {r.patient_key: r for r in import_archive(broken["root"], dataset, show_progress=False).reports}
    assert [k for k, r in third.items() if not r.resumed] == ["JRS001"]
    assert third["JRS001"].items[1].status == "training"
    assert third["JRS001"].pseudonym == {r.patient_key: r for r in again.reports}["JRS001"].pseudonym


def test_no_phi_in_the_dataset(broken: dict[str, Any]) -> None:
    """No Patient ID, name, birth or study date and no UID of the archive in any file (decompressed) or path."""
    inventory = scan_archive(broken["root"])
    secrets: set[str] = {"Other^Patient", "Stray^Series"}
    uids: set[str] = set()
    for s in inventory.series.values():
        secrets |= {s.patient_id, s.patient_name, s.patient_birth_date, s.study_date}
        uids |= {s.study_instance_uid, s.series_instance_uid, s.frame_of_reference_uid, *s.sop_instance_uids}
    for s in inventory.structure_sets:
        secrets |= {s.patient_id, s.patient_name}
        uids |= {s.sop_instance_uid, s.series_instance_uid}
    # every UID of the archive starts with one root: where none of it appears, no UID does
    first, last = min(uids), max(uids)
    root = first[: next((i for i, (a, b) in enumerate(zip(first, last, strict=False)) if a != b), len(first))]
    assert len(root) >= 10 and {"JRS001", "Phantom^JRS001", "STRAY001"} <= secrets
    secrets = {s for s in secrets if s} | {root}
    files = [p for p in broken["dataset"].rglob("*") if p.is_file()]
    assert len(files) > 40
    for path in files:
        data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
        text = data.decode("latin-1") + str(path.relative_to(broken["dataset"]))
        leaked = [s for s in secrets if s in text]
        assert not leaked, f"{path}: {leaked}"
    # the key and the report (which must name the sources) are outside the dataset, readable by the owner only
    private = broken["dataset"].parent / "dataset-private"
    assert stat.S_IMODE((private / "pseudonym_key.csv").stat().st_mode) == 0o600
    assert "JRS001" in (private / "pseudonym_key.csv").read_text()


def test_a_patient_appears_complete_or_not_at_all(synthetic_archive: Path, tmp_path: Path, monkeypatch) -> None:
    inventory = scan_archive(copy_patients(synthetic_archive / "dicom", ["JRS003"], tmp_path / "archive"))
    (part,) = patient_inventories(inventory).values()
    plan = plan_patient("JRS003", part)
    written = []

    def failing_write(image: sitk.Image, path: Path) -> str:
        if len(written) == 3:
            raise OSError("disk full")
        written.append(path)
        return path.name

    monkeypatch.setattr(importer, "_write_volume", failing_write)
    (tmp_path / "out").mkdir()
    report = import_patient(plan, "PTEST", tmp_path / "out", ImportSettings())
    assert report.status == "skipped" and report.category == "error" and "disk full" in report.reason
    assert list((tmp_path / "out").rglob("*")) == [tmp_path / "out" / PATIENTS]  # not even the staging folder


def test_workers_give_the_same_dataset(synthetic_archive: Path, imported_archive: Path, tmp_path: Path) -> None:
    archive = copy_patients(synthetic_archive / "dicom", ["JRS003", "JRS004"], tmp_path / "archive")
    result = import_archive(archive, tmp_path / "out", workers=2, show_progress=False)
    assert [r.status for r in result.reports] == ["imported", "imported"]
    reference = {v: k for k, v in _key(imported_archive).items()}
    for report in result.reports:
        mine = json.loads((tmp_path / "out" / PATIENTS / report.pseudonym / "items.json").read_text())["items"]
        theirs = (imported_archive / PATIENTS / reference[report.patient_key] / "items.json").read_text()
        theirs = json.loads(theirs)["items"]
        for a, b in zip(mine, theirs, strict=True):
            np.testing.assert_allclose(a["rigid"]["daily_to_planning"], b["rigid"]["daily_to_planning"], atol=0.05)
            np.testing.assert_array_equal(
                _read(tmp_path / "out" / a["fixed_label"]), _read(imported_archive / b["fixed_label"])
            )


def test_command_line_errors(synthetic_archive: Path, tmp_path: Path, capsys) -> None:
    assert main(["import", str(tmp_path / "nowhere"), str(tmp_path / "out")]) == 2
    assert "nowhere: not a folder" in capsys.readouterr().err
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("something else")
    assert main(["import", str(synthetic_archive / "dicom"), str(tmp_path / "other")]) == 2
    assert "is not a dataset written by `prostate-jrs import`" in capsys.readouterr().err
    assert main(["import", str(synthetic_archive / "dicom"), str(synthetic_archive / "dicom" / "out")]) == 2
    assert "must not lie inside the archive" in capsys.readouterr().err
    assert not (synthetic_archive / "dicom" / "out").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["import", str(empty), str(tmp_path / "none"), "--no-progress"]) == 1  # nothing to import
    assert "0 of 0 patient(s) imported" in capsys.readouterr().out
