"""DICOM in and out around :func:`prostate_jrs.pipeline.run_pipeline`: what the MONAI Deploy app's operators call.

In: :func:`load_session` selects planning CT, planning RTSTRUCT and daily CT in a folder
(:func:`prostate_jrs.dicom.discovery.select_session`: never two patients), reads both CT series and rasterises the
planning contours on the planning CT (only in its frame of reference).

Out: one writer per object, each writing into a staging folder: RTSTRUCT and SEG on the daily CT series
(:func:`write_contours`, :func:`write_segmentation`), the Deformable Spatial Registration with the rigid part as
pre-deformation matrix and the DDF as grid (:func:`write_registration`), ``qa.json`` and ``qa.png``
(:func:`write_qa`). :func:`publish` then moves the files into the output folder, ``qa.json`` last; staging folders,
the output-folder lock and recovery after a killed run are :mod:`prostate_jrs.output_folder`'s (re-exported here:
:func:`new_staging`, :func:`discard`).

All in one call: :func:`process_session` composes exactly these steps with :func:`prostate_jrs.pipeline.load_bundle`
and :func:`prostate_jrs.pipeline.run_pipeline`, as the app's operators do one by one; the DICOM node
(:mod:`prostate_jrs.node`) runs it for each job.

Patient bundles (:mod:`prostate_jrs.adaptation.patient_bundle`) run for their own patient only:
:func:`check_bundle_for_session` refuses one for a session of another patient before the network is loaded or
anything is written; the app's inference operator and :func:`process_session` call it. ``qa.json`` says which model
ran (``model``: base or patient bundle, its sha256).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch

from prostate_jrs import output_folder
from prostate_jrs.adaptation.patient_bundle import check_bundle_patient, model_summary
from prostate_jrs.backends import resolve_backend
from prostate_jrs.dicom.ct_reader import METADATA_KEYS, CTVolume, read_ct_series
from prostate_jrs.dicom.discovery import AdaptiveSession, select_session
from prostate_jrs.dicom.registration import RegistrationOptions, registration_grid, write_deformable_registration
from prostate_jrs.dicom.rtstruct_reader import RTStructContents, RTStructError, read_rtstruct
from prostate_jrs.dicom.rtstruct_writer import RTStructOptions, write_rtstruct
from prostate_jrs.dicom.seg_writer import SegOptions, write_seg
from prostate_jrs.dicom.uids import package_version
from prostate_jrs.errors import ProstateJRSError
from prostate_jrs.labels import STRUCTURES, SynonymTable
from prostate_jrs.output_folder import discard, new_staging
from prostate_jrs.pipeline import (
    PipelineResult,
    PipelineSettings,
    load_bundle,
    run_pipeline,
)
from prostate_jrs.qa import write_qa_png

__all__ = [
    "OUTPUT_FILES",
    "SESSION_ERRORS",
    "SessionInputs",
    "check_bundle_for_session",
    "default_device",
    "discard",
    "load_session",
    "new_staging",
    "process_session",
    "publish",
    "summary_lines",
    "write_contours",
    "write_qa",
    "write_registration",
    "write_segmentation",
]

#: Output file of each object, in the order :func:`publish` moves them (``qa.json`` last: it marks completion).
OUTPUT_FILES: dict[str, str] = {
    "rtstruct": "rtstruct.dcm",
    "seg": "seg.dcm",
    "registration": "registration.dcm",
    "qa_png": "qa.png",
    "qa_json": "qa.json",
}

#: Errors a user can act on (input missing, ambiguous, of two patients or not fitting; a bundle that does not fit;
#: an output folder another run is writing): front ends print their message, without a traceback.
SESSION_ERRORS: tuple[type[Exception], ...] = (ProstateJRSError, FileNotFoundError)

_AXIAL_TOLERANCE_DEG = 0.1  # slice normal vs the patient's z axis: more is a gantry tilt or a non-axial plane
_DDF_GRID_MM = 4.0  # in-plane spacing of the stored deformation grid: ~18 MB instead of ~280 MB at 512 x 512


@dataclass
class SessionInputs:
    """The inputs of one adaptive fraction, read from DICOM.

    Args:
        session: what the selection chose (and its notes).
        planning: the planning CT series.
        daily: the daily CT series.
        contours: the planning RTSTRUCT rasterised on the planning CT.
        planning_labels: label map 0..4 on the planning CT grid, with the planning frame of reference and patient as
            meta-data.
        notes: selection and reading notes for the log and the QA report.
        timings: seconds spent selecting and reading (``load``).
    """

    session: AdaptiveSession
    planning: CTVolume
    daily: CTVolume
    contours: RTStructContents
    planning_labels: sitk.Image
    notes: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)


def load_session(
    folder: str | os.PathLike[str],
    *,
    synonyms: SynonymTable | None = None,
    daily_series_uid: str | None = None,
    rtstruct_sop_uid: str | None = None,
) -> SessionInputs:
    """Select and read planning CT, planning contours and daily CT from a DICOM folder.

    Args:
        folder: the input folder (searched recursively).
        synonyms: ROI name -> structure table; ``None`` for the default.
        daily_series_uid: Series Instance UID of the daily CT; ``None`` for the latest other CT of the patient.
        rtstruct_sop_uid: SOP Instance UID of the planning RTSTRUCT; ``None`` for the only or latest one.

    Returns:
        The session's volumes and contours.

    Raises:
        FileNotFoundError: if ``folder`` is not a folder.
        DicomSelectionError, CTSeriesError, RTStructError: if something is missing, ambiguous, of different
            patients, truncated or corrupt, or does not fit, or no ROI of the RTSTRUCT gives one of the four
            structures (the message names the file, UID or ROI). Some structures missing is not an error: they are
            listed in the notes and in ``contours.missing_structures``.
    """
    start = time.perf_counter()
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: input folder not found; expected a folder of DICOM files")
    session = select_session(folder, daily_series_uid=daily_series_uid, rtstruct_sop_uid=rtstruct_sop_uid)
    planning = read_ct_series(session.planning_ct.files)
    daily = read_ct_series(session.daily_ct.files)
    _check_axial(planning, session.planning_rtstruct.path)
    contours = read_rtstruct(session.planning_rtstruct.path, planning, synonyms)
    _check_some_structure(contours)
    labels = contours.label_image()
    for keyword in ("FrameOfReferenceUID", "PatientID"):
        labels.SetMetaData(METADATA_KEYS[keyword], planning.image.GetMetaData(METADATA_KEYS[keyword]))
    notes = [*session.notes, *planning.notes, *daily.notes, *contours.notes]
    if contours.unmapped_rois:
        notes.append(f"ROIs not used (no structure): {', '.join(contours.unmapped_rois)}")
    if contours.missing_structures:
        notes.append(f"structures missing from the planning RTSTRUCT: {', '.join(contours.missing_structures)}")
    timings = {"load": round(time.perf_counter() - start, 3)}
    return SessionInputs(session, planning, daily, contours, labels, notes, timings)


def _check_axial(planning: CTVolume, rtstruct: Path) -> None:
    """Refuse planning contours on a CT whose slices are tilted (gantry tilt) or not axial (sagittal, coronal, oblique).

    Raises:
        RTStructError: naming the RTSTRUCT, the CT series, its ImageOrientationPatient and the tilt.
    """
    normal = np.asarray(planning.image.GetDirection()).reshape(3, 3)[:, 2]
    tilt = float(np.degrees(np.arccos(min(1.0, abs(normal[2])))))
    if tilt <= _AXIAL_TOLERANCE_DEG:
        return
    orientation = [round(float(v), 6) for v in planning.datasets[0].ImageOrientationPatient]
    raise RTStructError(
        f"{rtstruct}: references planning CT series {planning.series_instance_uid}, whose slices are not axial "
        f"(ImageOrientationPatient (0020,0037) {orientation}, slice normal {tilt:.1f} deg off the patient's "
        f"feet-head axis; e.g. {planning.files[0]}); expected contours on an axial planning CT: reconstruct the "
        "planning CT axially (without gantry tilt) and contour on that"
    )


def _check_some_structure(contours: RTStructContents) -> None:
    """Refuse an RTSTRUCT from which not one of the four structures can be taken: there is nothing to propagate.

    Raises:
        RTStructError: naming the file, its ROIs (and those that map but are empty) and the structures expected.
    """
    if contours.structure_rois:
        return
    expected = ", ".join(s.name for s in STRUCTURES)
    found = ", ".join(repr(r.name) for r in contours.rois) or "none"
    empty = [r.name for r in contours.rois if r.structure is not None]
    why = f"; {', '.join(map(repr, empty))} map to a structure but have no contour on the CT" if empty else ""
    raise RTStructError(
        f"{contours.path}: no ROI gives any of the structures {expected} (ROIs found: {found}{why}); expected "
        "at least one contoured structure to propagate. ROI names are matched with the synonym table "
        "(e.g. 'Prostate', 'CTV_Prostate', 'SV', 'Rectum', 'Bladder'); extend it for other names"
    )


def check_bundle_for_session(bundle_dir: str | os.PathLike[str], inputs: SessionInputs) -> None:
    """Refuse a patient bundle for a session of another patient (a base bundle passes).

    Raises:
        PatientBundleError: (a :class:`~prostate_jrs.pipeline.BundleError`) naming the bundle, if it is a patient
            bundle of another patient or its patient cannot be checked.
    """
    planning = inputs.planning.datasets[0]
    check_bundle_patient(bundle_dir, str(planning.get("PatientID", "")), str(planning.get("IssuerOfPatientID", "")))


def _algorithm(settings: PipelineSettings) -> str:
    return f"prostate-jrs {settings.network_name}"


def write_contours(result: PipelineResult, inputs: SessionInputs, settings: PipelineSettings, staging: Path) -> Path:
    """RTSTRUCT of the final contours on the daily CT series (keyhole holes: plastimatch reads them back exactly).

    Raises:
        ValueError: if the contours do not lie on the daily series' grid.
    """
    sources = ", ".join(f"{name} {path}" for name, path in result.contour_source.items())
    options = RTStructOptions(
        generation="AUTOMATIC",
        algorithm_name=_algorithm(settings),
        algorithm_version=package_version(),
        structure_set_label="JRS",
        structure_set_name="prostate-jrs daily contours",
        series_description=f"prostate-jrs contours ({sources})"[:64],
        holes="keyhole",
    )
    return write_rtstruct(result.labels, inputs.daily.datasets, staging / OUTPUT_FILES["rtstruct"], options=options)


def write_segmentation(
    result: PipelineResult, inputs: SessionInputs, settings: PipelineSettings, staging: Path
) -> Path:
    """DICOM SEG (BINARY) of the final contours on the daily CT series."""
    options = SegOptions(algorithm_name=_algorithm(settings), algorithm_version=package_version())
    return write_seg(result.labels, inputs.daily.datasets, staging / OUTPUT_FILES["seg"], options=options)


def write_registration(
    result: PipelineResult, inputs: SessionInputs, settings: PipelineSettings, staging: Path
) -> Path:
    """Deformable Spatial Registration: rigid part as pre-deformation matrix, DDF as grid (every ~4 mm in-plane).

    The DDF is restored from the model grid straight onto the written grid (:meth:`PipelineResult.ddf_on`).
    """
    spacing = inputs.daily.image.GetSpacing()
    step = (*(max(1, round(_DDF_GRID_MM / s)) for s in spacing[:2]), 1)
    options = RegistrationOptions(algorithm_name=_algorithm(settings), algorithm_version=package_version())
    return write_deformable_registration(
        result.ddf_on(registration_grid(inputs.daily.image, step)),
        inputs.daily.image,
        inputs.daily.datasets,
        inputs.planning.datasets,
        staging / OUTPUT_FILES["registration"],
        daily_to_planning=result.rigid.daily_to_planning,
        grid_step=step,
        options=options,
    )


def qa_document(
    result: PipelineResult,
    inputs: SessionInputs,
    settings: PipelineSettings,
    extra_timings: Mapping[str, float] | None = None,
    bundle: str | None = None,
) -> dict[str, Any]:
    """The content of ``qa.json``: the pipeline's QA plus the session, settings and timings."""
    session = inputs.session
    document = {
        "intended_use": "Research only; not a medical device. Every contour must be reviewed by a qualified clinician.",
        "software": {"name": "prostate-jrs", "version": package_version(), "bundle": bundle},
        "model": model_summary(bundle) if bundle else None,
        "session": {
            "patient_id": session.patient_id,
            "planning_ct_series_uid": session.planning_ct.series_instance_uid,
            "planning_rtstruct_sop_uid": session.planning_rtstruct.sop_instance_uid,
            "daily_ct_series_uid": session.daily_ct.series_instance_uid,
            "daily_frame_of_reference_uid": inputs.daily.frame_of_reference_uid,
            "planning_frame_of_reference_uid": inputs.planning.frame_of_reference_uid,
            "roi_to_structure": inputs.contours.roi_to_structure,
            # listed apart from the notes: a reviewer must see at once which planning contours were not propagated
            "missing_structures": inputs.contours.missing_structures,
            "unmapped_rois": inputs.contours.unmapped_rois,
            "empty_rois": inputs.contours.empty_rois,
            "notes": inputs.notes,
        },
        "settings": {
            "network_name": settings.network_name,
            "model_spacing_mm": settings.model_spacing,
            "crop_margin_mm": settings.crop_margin_mm,
            "hu_range": [settings.hu_min, settings.hu_max],
            "contour_source": result.contour_source,
            "model_grid_size": list(result.model_grid.GetSize()),
            "network_backend": resolve_backend(settings.backend, settings.device),
        },
        **result.qa,
    }
    document["timings_s"] = {**inputs.timings, **result.qa.get("timings_s", {}), **dict(extra_timings or {})}
    return document


def write_qa(
    result: PipelineResult,
    inputs: SessionInputs,
    settings: PipelineSettings,
    staging: Path,
    extra_timings: Mapping[str, float] | None = None,
    bundle: str | None = None,
) -> list[Path]:
    """``qa.json`` (:func:`qa_document`) and ``qa.png`` (both paths on daily slices)."""
    png = write_qa_png(
        inputs.daily.image,
        result.reg,
        result.seg,
        staging / OUTPUT_FILES["qa_png"],
        title=f"patient {inputs.session.patient_id}: registration path (solid) vs segmentation path (dashed)",
    )
    document = qa_document(result, inputs, settings, extra_timings, bundle)
    path = staging / OUTPUT_FILES["qa_json"]
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(document, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    tmp.replace(path)
    return [png, path]


def publish(
    staging: Path, out_dir: str | os.PathLike[str], names: Sequence[str] = tuple(OUTPUT_FILES.values())
) -> list[Path]:
    """Move the staged files into ``out_dir`` (``qa.json`` last, an older one removed first) and remove the staging
    folder; a kill half-way leaves a journal that :func:`prostate_jrs.output_folder.recover` completes.

    Raises:
        FileNotFoundError: if a staged file is missing (nothing is moved then).
    """
    return output_folder.publish(staging, out_dir, names, last=OUTPUT_FILES["qa_json"])


def summary_lines(result: PipelineResult) -> list[str]:
    """One line per structure (path used, volume and change against planning, agreement of the two paths)."""
    lines = []
    for structure in STRUCTURES:
        row = result.qa["structures"][structure.name]
        dsc = row["dsc_reg_seg"]
        change = row["volume_change_pct"]
        lines.append(
            f"{structure.display_name:<16} from {row['source']}: {row['volume_ml'] or 0:7.1f} ml "
            f"({'n/a' if change is None else f'{change:+.1f}%'} vs planning), "
            f"reg/seg DSC {'n/a' if dsc is None else f'{dsc:.3f}'}"
        )
    rigid = result.qa["rigid"]
    lines.append(
        f"rigid pre-alignment: {rigid['translation_mm']} mm, {rigid['rotation_deg']} deg, bone RMS "
        f"{rigid['bone_rms_mm']} mm; DDF folding {result.qa['ddf']['folding_fraction']}"
    )
    lines += [f"QA flag: {flag}" for flag in result.qa["flags"]]
    return lines


def default_device() -> str:
    """``$PROSTATE_JRS_DEVICE`` if set, else ``cuda`` when a GPU is visible, else ``cpu`` (the app's rule)."""
    return os.environ.get("PROSTATE_JRS_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")


def process_session(
    input_dir: str | os.PathLike[str],
    output_dir: str | os.PathLike[str],
    bundle_dir: str | os.PathLike[str],
    device: str | None = None,
) -> dict[str, Any]:
    """Everything the app does for one session: load, run the bundle's pipeline, write and publish the five outputs.

    The steps and their order are those of the app's operators (load_session, load_bundle, run_pipeline,
    write_contours, write_segmentation, write_registration, write_qa, publish); the pipeline's settings come from the
    bundle alone. Outputs appear in ``output_dir`` complete or not at all.

    Args:
        input_dir: folder with the planning CT, planning RTSTRUCT and daily CT (one patient).
        output_dir: where ``rtstruct.dcm``, ``seg.dcm``, ``registration.dcm``, ``qa.png`` and ``qa.json`` go.
        bundle_dir: the bundle folder (``configs/inference.json``, ``models/model.pt``).
        device: torch device; ``None`` for :func:`default_device`.

    Returns:
        ``{"outputs": [file names], "summary": [lines of summary_lines], "flags": [QA flags], "timings_s": {...}}``
        (no patient identifier).

    Raises:
        DicomSelectionError, CTSeriesError, RTStructError, PipelineError, BundleError: as :func:`load_session`,
            :func:`prostate_jrs.pipeline.load_bundle` and :func:`prostate_jrs.pipeline.run_pipeline`; a patient
            bundle of another patient (:func:`check_bundle_for_session`) before anything is written.
    """
    inputs = load_session(input_dir)
    start = time.perf_counter()
    check_bundle_for_session(bundle_dir, inputs)
    network, settings = load_bundle(bundle_dir, device=device or default_device())
    inputs.timings["load_bundle"] = round(time.perf_counter() - start, 3)
    result = run_pipeline(inputs.planning.image, inputs.planning_labels, inputs.daily.image, network, settings)
    staging = new_staging(output_dir)
    try:
        write_contours(result, inputs, settings, staging)
        write_segmentation(result, inputs, settings, staging)
        write_registration(result, inputs, settings, staging)
        write_qa(result, inputs, settings, staging, bundle=str(bundle_dir))
        published = publish(staging, output_dir)
    except BaseException:
        discard(output_dir)
        raise
    document = json.loads((Path(output_dir) / OUTPUT_FILES["qa_json"]).read_text(encoding="utf-8"))
    return {
        "outputs": [path.name for path in published],
        "summary": summary_lines(result),
        "flags": list(result.qa.get("flags", [])),
        "timings_s": document["timings_s"],
    }
