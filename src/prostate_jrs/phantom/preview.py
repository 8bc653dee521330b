"""Preview PNG of a patient: axial, sagittal and coronal slices of planning and daily scans with contours."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

from prostate_jrs.geometry import array_from_image
from prostate_jrs.hounsfield import BODY_HU
from prostate_jrs.labels import STRUCTURES, structure_by_name

from .generate import Patient

__all__ = ["save_preview"]

WINDOW = (-160.0, 240.0)  # soft-tissue window, W400 / L40


def _centroid(labels: np.ndarray, name: str) -> np.ndarray | None:
    """Voxel index of a structure's centroid, or ``None`` when absent."""
    where = np.argwhere(labels == structure_by_name(name).label)
    return np.round(where.mean(0)).astype(int) if len(where) else None


def _crop(hu: np.ndarray, lab: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Crop a 2-D view to the body (HU > :data:`~prostate_jrs.hounsfield.BODY_HU`) with a small margin."""
    rows, cols = np.nonzero(hu > BODY_HU)
    if len(rows) == 0:
        return hu, lab
    r0, r1 = max(0, rows.min() - 3), rows.max() + 4
    c0, c1 = max(0, cols.min() - 3), cols.max() + 4
    return hu[r0:r1, c0:c1], lab[r0:r1, c0:c1]


def _views(image: sitk.Image, labels: sitk.Image) -> list[tuple[str, np.ndarray, np.ndarray, float]]:
    """(name, 2-D image, 2-D labels, pixel aspect) for the views of one scan.

    Axial slices through the prostate and the seminal vesicles, sagittal and coronal slices through the
    prostate. Axial: anterior up, patient left on the right (radiological); sagittal: anterior left,
    superior up; coronal: superior up, patient left on the right.
    """
    hu = array_from_image(image)
    lab = array_from_image(labels)
    centre = _centroid(lab, "prostate")
    i, j, k = centre if centre is not None else np.array(lab.shape) // 2
    sv = _centroid(lab, "seminal_vesicles")
    k_sv = sv[2] if sv is not None else k
    sx, sy, sz = image.GetSpacing()
    views = [
        ("axial", hu[:, :, k].T, lab[:, :, k].T, sy / sx),
        ("axial (SV)", hu[:, :, k_sv].T, lab[:, :, k_sv].T, sy / sx),
        ("sagittal", hu[i, :, ::-1].T, lab[i, :, ::-1].T, sz / sy),
        ("coronal", hu[:, j, ::-1].T, lab[:, j, ::-1].T, sz / sx),
    ]
    return [(name, *_crop(h, m), aspect) for name, h, m, aspect in views]


def save_preview(patient: Patient, path: str | Path, max_fractions: int = 3) -> Path:
    """Write a PNG: one row per scan (planning, then up to ``max_fractions`` daily), four views per row.

    Args:
        patient: the generated patient.
        path: output PNG path.
        max_fractions: most daily scans shown.

    Returns:
        The path written.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    scans = [("planning", patient.planning), *((f"fraction {f}", s) for f, s in enumerate(patient.fractions, 1))]
    rows = []
    for title, scan in scans[: max_fractions + 1]:
        # Bladder volume as delineated: the number a user compares between fractions.
        voxels = int((array_from_image(scan.labels) == structure_by_name("bladder").label).sum())
        volume = voxels * float(np.prod(scan.labels.GetSpacing())) / 1000.0
        rows.append((f"{title} (bladder {volume:.0f} ml)", scan.image, scan.labels))
    fig = Figure(figsize=(16, 3.4 * len(rows) + 0.4), facecolor="black")
    FigureCanvasAgg(fig)
    for r, (title, image, labels) in enumerate(rows):
        for c, (view, hu, lab, aspect) in enumerate(_views(image, labels)):
            ax = fig.add_subplot(len(rows), 4, r * 4 + c + 1)
            ax.imshow(hu, cmap="gray", vmin=WINDOW[0], vmax=WINDOW[1], aspect=aspect, interpolation="bilinear")
            for structure in STRUCTURES:
                mask = lab == structure.label
                if mask.any():
                    colour = tuple(v / 255 for v in structure.color)
                    ax.contour(mask.astype(np.float32), levels=[0.5], colors=[colour], linewidths=1.0)
            ax.set_title(f"{patient.patient_id} {title}: {view}", color="white", fontsize=8)
            ax.axis("off")
    # the RGB triple is a tuple[float, ...] to mypy; matplotlib's ColorType only takes fixed-length tuples
    handles = [
        Line2D([0], [0], color=tuple(v / 255 for v in s.color), label=s.display_name)  # type: ignore[arg-type]
        for s in STRUCTURES
    ]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), facecolor="black", labelcolor="white")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    path = Path(path)
    fig.savefig(path, dpi=80, facecolor="black")
    return path
