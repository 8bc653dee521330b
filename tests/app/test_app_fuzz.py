"""Property-based fuzzing of the app's input side (Hypothesis, seeded, bounded).

Each case copies one tiny synthetic session (planning CT, planning RTSTRUCT, daily CT), applies one to three faults
that real exports combine (a tag deleted, written with a wrong VR or a wrong value, a file truncated, dropped or
duplicated, a wrong transfer syntax in the file meta) and runs the app's ``main`` in this process, as ``python app -i
IN -o OUT -m BUNDLE`` would. Every case must either

* succeed: exit 0, exactly the five outputs in the output folder (and the file that was there before), each DICOM
  output readable, ``qa.json`` complete; or
* be refused: exit 1 with a ``prostate-jrs: error:`` line naming a file, a tag or an ROI, and the output folder as
  it was (no result file, no staging folder);

never a traceback, never a partial output. The fast variant runs in every test run; the slow one runs hundreds of
cases. Both print the tally of cases and outcomes.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import struct
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pydicom
import pytest
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import Tag
from script_loader import load_script

from prostate_jrs.dicom.common import read_dicom
from prostate_jrs.phantom import PhantomConfig, write_dataset
from prostate_jrs.phantom.dicom_export import export_dicom_sessions
from prostate_jrs.tiny_bundle import TINY_SETTINGS, write_tiny_bundle

REPO = Path(__file__).resolve().parents[2]
OUTPUTS = ("rtstruct.dcm", "seg.dcm", "registration.dcm", "qa.json", "qa.png")
EARLIER = "earlier_result.txt"
FAST_CASES, SLOW_CASES = 12, 200

CT_TAGS = [
    "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "SliceThickness", "Rows", "Columns",
    "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation", "SamplesPerPixel", "PhotometricInterpretation",
    "RescaleSlope", "RescaleIntercept", "SeriesInstanceUID", "SOPInstanceUID", "StudyInstanceUID",
    "FrameOfReferenceUID", "SOPClassUID", "PatientID", "PatientName", "Modality", "NumberOfFrames", "PixelData",
    "InstanceNumber", "SeriesDate", "AcquisitionTime", "ImageType",
]  # fmt: skip
RTSTRUCT_TAGS = [
    "ReferencedFrameOfReferenceSequence", "StructureSetROISequence", "ROIContourSequence",
    "RTROIObservationsSequence", "SeriesInstanceUID", "SOPInstanceUID", "PatientID", "Modality", "StructureSetDate",
]  # fmt: skip
#: Elements inside the RTSTRUCT's sequences: (sequence, element); the item is drawn.
RTSTRUCT_NESTED = [
    ("StructureSetROISequence", "ROINumber"), ("StructureSetROISequence", "ROIName"),
    ("StructureSetROISequence", "ReferencedFrameOfReferenceUID"), ("ROIContourSequence", "ReferencedROINumber"),
    ("ROIContourSequence", "ContourSequence"), ("ReferencedFrameOfReferenceSequence", "FrameOfReferenceUID"),
    ("ReferencedFrameOfReferenceSequence", "RTReferencedStudySequence"),
]  # fmt: skip
CONTOUR_TAGS = ["ContourData", "ContourGeometricType", "NumberOfContourPoints", "ContourImageSequence"]
SYNTAXES = [
    pydicom.uid.JPEGBaseline8Bit, pydicom.uid.ExplicitVRBigEndian, pydicom.uid.DeflatedExplicitVRLittleEndian,
    pydicom.uid.ImplicitVRLittleEndian, pydicom.uid.RLELossless, "1.2.3.4.5", "",
]  # fmt: skip
VALUES: list[bytes] = [
    b"", b"abc", b"NaN", b"inf", b"-1e308", b"0", b"-5", b"1e30", b"1\\2", b"1\\2\\3\\4\\5\\6\\7", b"\x00\xff\x10\x80",
    b"1.2.3..4", b"JRS999", b"MR", b"0\\0\\0\\0\\0\\0", b"1\\0\\0\\1\\0\\0", b"99999", b"\\\\\\",
]  # fmt: skip
VRS = ["UN", "OB", "LO", "US", "FD", "SQ", "DS", "UI"]


@dataclass(frozen=True)
class Fault:
    """One fault: ``kind`` on ``target`` (planning, daily, rtstruct), file ``index`` (or all files of the series)."""

    kind: str
    target: str
    index: int
    every_file: bool
    tag: str = ""
    nested: tuple[str, int, str] | None = None  # (sequence, item, element) inside the RTSTRUCT
    vr: str = ""
    value: bytes = b""
    fraction: float = 0.5


def _tag_fault(kind: str) -> st.SearchStrategy[Fault]:
    ct = st.builds(
        Fault, kind=st.just(kind), target=st.sampled_from(["planning", "daily"]), index=st.integers(0, 99),
        every_file=st.booleans(), tag=st.sampled_from(CT_TAGS), vr=st.sampled_from(VRS), value=st.sampled_from(VALUES),
    )  # fmt: skip
    top = st.builds(
        Fault, kind=st.just(kind), target=st.just("rtstruct"), index=st.just(0), every_file=st.just(False),
        tag=st.sampled_from(RTSTRUCT_TAGS), vr=st.sampled_from(VRS), value=st.sampled_from(VALUES),
    )  # fmt: skip
    nested = st.builds(
        Fault, kind=st.just(kind), target=st.just("rtstruct"), index=st.just(0), every_file=st.just(False),
        nested=st.one_of(
            st.sampled_from(RTSTRUCT_NESTED).flatmap(
                lambda pair: st.tuples(st.just(pair[0]), st.integers(0, 9), st.just(pair[1]))
            ),
            st.tuples(st.just("contour"), st.integers(0, 999), st.sampled_from(CONTOUR_TAGS)),
        ),
        vr=st.sampled_from(VRS), value=st.sampled_from([*VALUES, b"0\\0\\1000", b"1\\2\\3\\4"]),
    )  # fmt: skip
    return st.one_of(ct, top, nested)


def fault_strategy() -> st.SearchStrategy[Fault]:
    """Faults of every kind, on every part of the session."""
    target = st.sampled_from(["planning", "daily", "rtstruct"])
    file_faults = st.builds(
        Fault, kind=st.sampled_from(["truncate", "drop", "duplicate", "duplicate_new_uid", "syntax"]), target=target,
        index=st.integers(0, 99), every_file=st.booleans(), fraction=st.floats(0.01, 0.99), value=st.sampled_from(
            [s.encode() for s in SYNTAXES]
        ),
    )  # fmt: skip
    return st.one_of(_tag_fault("delete"), _tag_fault("wrong_vr"), _tag_fault("wrong_value"), file_faults)


# --------------------------------------------------------------------------------------------- applying faults


def _files(folder: Path, uids: dict[str, str], target: str) -> list[Path]:
    if target == "rtstruct":
        return sorted(folder.glob("RS.*.dcm"))
    uid = uids[f"{target}_ct_series"]
    return sorted(p for p in folder.glob("CT.*.dcm") if _series_of(p) == uid)


def _series_of(path: Path) -> str:
    try:
        header = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SeriesInstanceUID"])
        return str(header.SeriesInstanceUID)
    except Exception:  # a file an earlier fault damaged belongs to no series we can tell
        return ""


def _raw(tag: int, vr: str, value: bytes) -> RawDataElement:
    value = value + (b" " if len(value) % 2 else b"")
    return RawDataElement(Tag(tag), vr, len(value), value, 0, False, True)


def _element_bytes(ds: Dataset, tag: int) -> bytes:
    value = ds[tag].value
    if isinstance(value, bytes):
        return value
    if isinstance(value, list | tuple | pydicom.multival.MultiValue):
        return "\\".join(str(v) for v in value).encode()
    return str(value).encode()


def _where(ds: Dataset, fault: Fault) -> tuple[Dataset, int] | None:
    """The dataset holding the element a tag fault hits, and its tag (``None`` when it is absent)."""
    if fault.nested is None:
        tag = Tag(pydicom.datadict.tag_for_keyword(fault.tag))
        return (ds, tag) if tag in ds else None
    sequence, item, element = fault.nested
    if sequence == "contour":
        contours = [c for roi in ds.get("ROIContourSequence", []) for c in roi.get("ContourSequence", [])]
        holder = contours[item % len(contours)] if contours else None
    else:
        items = ds.get(sequence, [])
        holder = items[item % len(items)] if items else None
    tag = Tag(pydicom.datadict.tag_for_keyword(element))
    return (holder, tag) if holder is not None and tag in holder else None


def _tag_fault_on(path: Path, fault: Fault) -> None:
    ds = pydicom.dcmread(path)
    where = _where(ds, fault)
    if where is None:
        return
    holder, tag = where
    if fault.kind == "delete":
        del holder[tag]
    elif fault.kind == "wrong_vr":
        value = b"" if fault.vr == "SQ" else _element_bytes(holder, tag)
        holder._dict[tag] = _raw(tag, fault.vr, value if fault.vr != "US" else struct.pack("<H", len(value)))
    else:
        holder._dict[tag] = _raw(tag, holder[tag].VR if holder[tag].VR != "SQ" else "UN", fault.value)
    ds.save_as(path)


def _with_syntax(path: Path, syntax: str) -> None:
    """Rewrite the file meta's Transfer Syntax UID, leaving the data set bytes as they are."""
    data = path.read_bytes()
    meta_end = 132 + 12 + struct.unpack("<I", data[140:144])[0]  # (0002,0000) UL group length after 'DICM'
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    meta = ds.file_meta
    meta.TransferSyntaxUID = syntax
    buffer = pydicom.filebase.DicomBytesIO()
    pydicom.filewriter.write_file_meta_info(buffer, meta, enforce_standard=False)
    path.write_bytes(data[:132] + buffer.getvalue() + data[meta_end:])


def apply(fault: Fault, folder: Path, uids: dict[str, str]) -> None:
    """Apply one fault to the session in ``folder`` (a fault whose target is gone does nothing)."""
    files = _files(folder, uids, fault.target)
    if not files:
        return
    chosen = files if fault.every_file else [files[fault.index % len(files)]]
    for path in chosen:
        if fault.kind == "truncate":
            data = path.read_bytes()
            path.write_bytes(data[: max(1, int(len(data) * fault.fraction))])
        elif fault.kind == "drop":
            path.unlink()
        elif fault.kind == "duplicate":
            shutil.copy(path, path.with_name(f"copy_of_{path.name}"))
        elif fault.kind == "duplicate_new_uid":
            ds = pydicom.dcmread(path)
            ds.SOPInstanceUID = pydicom.uid.generate_uid(entropy_srcs=[str(path), "dup"])
            ds.save_as(path.with_name(f"dup_{path.name}"))
        elif fault.kind == "syntax":
            _with_syntax(path, fault.value.decode())
        else:
            with contextlib.suppress(Exception):  # an earlier fault may have left nothing this one can parse
                _tag_fault_on(path, fault)


# ----------------------------------------------------------------------------------------------- outcomes


_TAG = re.compile(r"\([0-9A-Fa-f]{4},[0-9A-Fa-f]{4}\)")
_KEYWORDS = {kw for kw in pydicom.datadict.keyword_dict if len(kw) > 3}


def names_something(line: str, folder: Path) -> bool:
    """Whether an error line names a file (or the input folder), a tag (number or keyword) or an ROI."""
    words = set(re.findall(r"[A-Za-z]+", line))
    return str(folder) in line or bool(_TAG.search(line)) or "ROI" in line or bool(words & _KEYWORDS)


def valid_outputs(out: Path) -> str:
    """``""`` when ``out`` holds exactly one complete, readable result (beside the earlier file), else why not."""
    names = sorted(p.name for p in out.iterdir())
    if names != sorted([*OUTPUTS, EARLIER]):
        return f"output folder holds {names}"
    for name in ("rtstruct.dcm", "seg.dcm", "registration.dcm"):
        try:
            read_dicom(out / name)
        except Exception as err:
            return f"{name} unreadable: {err}"
    qa = json.loads((out / "qa.json").read_text())
    if not {"session", "structures", "flags", "timings_s"} <= set(qa):
        return f"qa.json incomplete: {sorted(qa)}"
    return ""


def run_case(app: ModuleType, base: Path, uids: dict[str, str], faults: list[Fault], work: Path, bundle: Path,
             capfd: pytest.CaptureFixture[str]) -> tuple[str, str]:  # fmt: skip
    """Apply ``faults`` to a copy of the session, run the app; (outcome, detail). Outcomes: ``success``,
    ``refused``, ``traceback``, ``partial output``, ``unnamed refusal``, ``invalid output``, ``exit N``."""
    shutil.rmtree(work, ignore_errors=True)
    folder = Path(shutil.copytree(base, work / "in"))
    for fault in faults:
        apply(fault, folder, uids)
    out = work / "out"
    out.mkdir()
    (out / EARLIER).write_text("kept")
    capfd.readouterr()
    try:
        code = app.main(["app", "-i", str(folder), "-o", str(out), "-m", str(bundle)])
    except BaseException as err:  # what the user would see as a traceback
        return "traceback", f"{type(err).__name__}: {str(err)[:300]}"
    captured = capfd.readouterr()
    text = captured.out + captured.err
    if "Traceback (most recent call last)" in text:
        return "traceback", text[text.index("Traceback") :][:600]
    if code == 0:
        problem = valid_outputs(out)
        return ("invalid output", problem) if problem else ("success", "")
    if code != 1:
        return f"exit {code}", text[-400:]
    left = sorted(p.name for p in out.iterdir())
    if left != [EARLIER]:
        return "partial output", f"{left}"
    errors = [line for line in captured.err.splitlines() if line.startswith("prostate-jrs: error: ")]
    if not errors or not names_something(errors[0], folder):
        return "unnamed refusal", errors[0] if errors else captured.err[-300:]
    return "refused", errors[0][len("prostate-jrs: error: ") :][:200]


# ----------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def session(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """One tiny patient at 6 mm voxels (a fast session: ~30 slices per CT) and its UIDs."""
    root = tmp_path_factory.mktemp("fuzz_synth") / "data"
    write_dataset(root, n_patients=1, n_fractions=1, seed=0, config=PhantomConfig.tiny(spacing=(6.0, 6.0, 6.0)))
    export_dicom_sessions(root)
    record = json.loads((root / "dicom" / "sessions.json").read_text())["sessions"][0]
    return root / record["folder"], record["uids"]


@pytest.fixture(scope="module")
def fuzz_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny bundle on a 6 mm model grid, refinement off: a successful case costs about two seconds.

    The fuzz exercises DICOM input handling; refinement has its own tests (tests/test_refine.py, the app's).
    """
    target = tmp_path_factory.mktemp("fuzz_bundle") / "bundle"
    off = {"refine": {"mode": "off", "settings": {}}}
    return write_tiny_bundle(REPO / "bundle", target, {**TINY_SETTINGS, "model_spacing": 6.0, **off})


@pytest.fixture(scope="module")
def app() -> ModuleType:
    """``app/app.py`` imported in this process (its folder on ``sys.path`` for ``operators``)."""
    if str(REPO / "app") not in sys.path:
        sys.path.insert(0, str(REPO / "app"))
    return load_script(REPO / "app" / "app.py", "prostate_jrs_fuzz_app")


def _fuzz(cases: int, rng_seed: int, app: ModuleType, session: tuple[Path, dict[str, str]], bundle: Path,
          tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> Counter[str]:  # fmt: skip
    base, uids = session
    tally: Counter[str] = Counter()
    bad: list[tuple[str, str, list[Fault]]] = []
    kinds: Counter[str] = Counter()

    @seed(rng_seed)
    @settings(max_examples=cases, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))  # fmt: skip
    @given(faults=st.lists(fault_strategy(), min_size=1, max_size=3))
    def case(faults: list[Fault]) -> None:
        outcome, detail = run_case(app, base, uids, faults, tmp_path / "case", bundle, capfd)
        tally[outcome] += 1
        kinds.update(f.kind for f in faults)
        if outcome not in ("success", "refused"):
            bad.append((outcome, detail, faults))

    case()
    others = sum(tally.values()) - sum(tally[k] for k in ("success", "refused", "traceback", "partial output"))
    with capfd.disabled():
        print(f"\nfuzz (seed {rng_seed}): {sum(tally.values())} cases, {tally['success']} successes, "
              f"{tally['refused']} clean refusals, {tally['traceback']} tracebacks, {tally['partial output']} partial "
              f"outputs, {others} other failures; faults applied: {dict(kinds)}")  # fmt: skip
    assert not bad, "\n".join(f"{outcome}: {detail}\n  faults: {faults}" for outcome, detail, faults in bad[:10])
    return tally


@pytest.mark.parametrize(
    ("cases", "rng_seed"),
    [(FAST_CASES, 2026), pytest.param(SLOW_CASES, 17, marks=pytest.mark.slow)],
    ids=["fast", "slow"],
)
def test_fuzzed_sessions_succeed_or_are_refused_cleanly(
    cases: int, rng_seed: int, app: ModuleType, session: tuple[Path, dict[str, str]], fuzz_bundle: Path,
    tmp_path: Path, capfd: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    tally = _fuzz(cases, rng_seed, app, session, fuzz_bundle, tmp_path, capfd)
    assert sum(tally.values()) == cases
    if cases == SLOW_CASES:
        assert tally["success"] and tally["refused"]  # both ways out were exercised
