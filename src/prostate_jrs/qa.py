"""QA of one adaptive fraction: agreement of the two contour paths, volume change, DDF regularity, rigid residual.

:func:`quality_report` returns a JSON-ready dictionary (``qa.json`` of the app)::

    {"structures": {name: {"source", "dsc_reg_seg", "msd_mm_reg_seg", "hd95_mm_reg_seg", "volume_ml",
                           "reg_volume_ml", "seg_volume_ml", "planning_volume_ml", "volume_change_ml",
                           "volume_change_pct"}},
     "ddf": {"folding_fraction", "jacobian_std", "jacobian_min", "jacobian_max", "region"},
     "rigid": {"method", "bone_rms_mm", "bone_overlap", "translation_mm", "rotation_deg", "daily_to_planning"},
     "flags": [str, ...]}

``volume_ml`` is that of the final contour; the ``*_reg_seg`` metrics compare the registration path with the
segmentation path (the QA signal of docs/ARCHITECTURE.md, "Contour source": where they disagree, a reviewer
should look). The DDF statistics are computed on the model grid (where the network predicted the field) inside the
body; det J is unitless, so the grid does not change them. :func:`write_qa_png` draws both paths on daily slices
(``qa.png``).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import SimpleITK as sitk

from prostate_jrs.geometry import array_view, label_box, label_counts
from prostate_jrs.labels import STRUCTURES
from prostate_jrs.metrics import deformation_quality, structure_metrics

if TYPE_CHECKING:
    from matplotlib.lines import Line2D

    from prostate_jrs.rigid import RigidAlignment

__all__ = [
    "DISAGREEMENT_DSC",
    "DISAGREEMENT_HD95_MM",
    "QA_PNG_DPI",
    "QA_PNG_INCHES",
    "QALimits",
    "check_disagreement_limits",
    "disagreement_flag",
    "quality_report",
    "write_qa_png",
]

#: Flag a structure whose registration and segmentation paths overlap less than this (DSC).
DISAGREEMENT_DSC = 0.7
# above the generic model's largest distance between its refined registration path and its segmentation path on the
# training site's adaptation phantoms (5.7 mm over 12 fractions x 4 structures), below the local errors (8-12 mm)
# that the DSC limit missed on a site unlike the training data; bundle docs, "The app's review flags"
#: Flag a structure whose two paths are farther apart than this (mm) at the 95th percentile: a local disagreement.
DISAGREEMENT_HD95_MM = 7.0


class QALimits(Protocol):
    """The thresholds QA flags against (:class:`prostate_jrs.pipeline.PipelineSettings` has them)."""

    @property
    def disagreement_dsc(self) -> float: ...

    @property
    def disagreement_hd95_mm(self) -> float: ...

    @property
    def folding_limit(self) -> float: ...

    @property
    def volume_change_limit_pct(self) -> float: ...

    @property
    def residual_limit(self) -> float: ...


#: Size of ``qa.png``: 9 x 3.4 inches at 100 dpi, 900 x 340 pixels, for any scan and number of slices.
QA_PNG_INCHES: tuple[float, float] = (9.0, 3.4)
QA_PNG_DPI = 100


def _clean(value: float | None, digits: int = 4) -> float | None:
    if value is None or math.isnan(value) or math.isinf(value):
        return None
    return round(float(value), digits)


def _crop_box(*maps: np.ndarray, pad: int = 2) -> tuple[slice, ...]:
    """Bounding box of the foreground of all maps, padded (surface metrics are translation invariant)."""
    union = np.zeros(maps[0].shape, dtype=bool)
    for label_map in maps:
        union |= label_map > 0
    where = np.argwhere(union)
    if where.size == 0:
        return tuple(slice(0, 1) for _ in maps[0].shape)
    lo = np.maximum(where.min(axis=0) - pad, 0)
    hi = np.minimum(where.max(axis=0) + pad + 1, maps[0].shape)
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))


def quality_report(
    *,
    reg: np.ndarray,
    seg: np.ndarray,
    final: np.ndarray,
    daily_grid: sitk.Image,
    planning_labels: np.ndarray,
    planning_grid: sitk.Image,
    model_ddf: np.ndarray,
    body_mask: np.ndarray,
    rigid: RigidAlignment,
    contour_source: dict[str, str],
    settings: QALimits,
) -> dict[str, Any]:
    """The QA report of one fraction.

    Args:
        reg: registration path on the daily grid ``(I, J, K)``.
        seg: segmentation path on the daily grid.
        final: final contours on the daily grid.
        daily_grid: the daily CT (geometry).
        planning_labels: planning label map on ``planning_grid``.
        planning_grid: the planning CT (geometry).
        model_ddf: the network's DDF ``(3, *S)`` on the model grid (model voxel units).
        body_mask: boolean ``S``: model voxels inside the body.
        rigid: the rigid pre-alignment.
        contour_source: structure -> path used for ``final``.
        settings: thresholds of the flags.

    Returns:
        The report (module docstring); values that do not exist (a structure missing from a path) are ``None``.
    """
    # volume (ml) of each planning label
    planning_ml = label_counts(planning_labels) * (float(np.prod(planning_grid.GetSpacing())) / 1000.0)
    spacing = tuple(float(s) for s in daily_grid.GetSpacing())
    structures, structure_flags = _structures_report((reg, seg, final), spacing, planning_ml, contour_source, settings)
    ddf, ddf_flags = _ddf_report(model_ddf, body_mask, settings)
    rigid_report, rigid_flags = _rigid_report(rigid, settings)
    flags = structure_flags + ddf_flags + rigid_flags
    return {"structures": structures, "ddf": ddf, "rigid": rigid_report, "flags": flags}


def _structures_report(
    paths: tuple[np.ndarray, np.ndarray, np.ndarray],
    spacing: tuple[float, ...],
    planning_ml: np.ndarray,
    contour_source: dict[str, str],
    settings: QALimits,
) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """Per structure: agreement of the two paths, final and planning volumes; and the flags they raise.

    Args:
        paths: registration path, segmentation path and final contours on the daily grid.
        spacing: the daily grid's voxel size (mm).
        planning_ml: planning volume (ml) per label.
        contour_source: structure -> path used for the final contours.
        settings: thresholds of the flags.
    """
    reg, seg, final = paths
    box = _crop_box(reg, seg, final)
    agreement = structure_metrics(reg[box], seg[box], spacing)
    daily_ml = float(np.prod(spacing)) / 1000.0
    flags: list[str] = []
    structures: dict[str, dict[str, Any]] = {}
    for structure in STRUCTURES:
        name = structure.name
        pair = agreement[name]
        volume = float(np.count_nonzero(final[box] == structure.label)) * daily_ml
        planned = float(planning_ml[structure.label]) if structure.label < planning_ml.size else 0.0
        change = volume - planned
        change_pct = 100.0 * change / planned if planned > 0 else math.nan
        structures[name] = {
            "source": contour_source[name],
            "dsc_reg_seg": _clean(pair.dsc),
            "msd_mm_reg_seg": _clean(pair.msd_mm),
            "hd95_mm_reg_seg": _clean(pair.hd95_mm),
            "volume_ml": _clean(volume, 3),
            "reg_volume_ml": _clean(pair.volume_ml, 3),
            "seg_volume_ml": _clean(pair.reference_volume_ml, 3),
            "planning_volume_ml": _clean(planned, 3),
            "volume_change_ml": _clean(change, 3),
            "volume_change_pct": _clean(change_pct, 2),
        }
        if planned == 0:
            flags.append(f"{name}: not in the planning contours")
        elif volume == 0:
            flags.append(f"{name}: empty on the daily CT (source {contour_source[name]})")
        flag = disagreement_flag(name, pair.dsc, pair.hd95_mm, settings.disagreement_dsc, settings.disagreement_hd95_mm)
        if flag:
            flags.append(flag)
        if not math.isnan(change_pct) and abs(change_pct) > settings.volume_change_limit_pct:
            flags.append(
                f"{name}: volume changed by {change_pct:+.0f}% against planning "
                f"(limit {settings.volume_change_limit_pct:.0f}%)"
            )
    return structures, flags


def check_disagreement_limits(dsc_limit: float, hd95_limit_mm: float) -> None:
    """Refuse limits under which :func:`disagreement_flag` would flag everything or nothing without saying so.

    Raises:
        ValueError: naming the bundle key (``qa_disagreement_dsc``, ``qa_disagreement_hd95_mm``) and the value.
    """
    if not 0.0 <= dsc_limit <= 1.0:  # NaN fails too
        raise ValueError(f"qa_disagreement_dsc must be a DSC in [0, 1], got {dsc_limit}")
    if not 0.0 < hd95_limit_mm < math.inf:
        raise ValueError(f"qa_disagreement_hd95_mm must be a positive distance (mm), got {hd95_limit_mm}")


def disagreement_flag(name: str, dsc: float, hd95_mm: float, dsc_limit: float, hd95_limit_mm: float) -> str:
    """The review flag of a structure whose two paths disagree, or ``""``: their overlap below ``dsc_limit``, or (a
    local error that overlap hides, e.g. one end of the prostate off by a centimetre) their 95% Hausdorff distance
    above ``hd95_limit_mm``. The app's ``qa.json`` and the bundle's ``NAME_qa.json`` both flag with it."""
    if dsc < dsc_limit:
        why = f"DSC {dsc:.2f} < {dsc_limit:.2f}"
    elif hd95_mm > hd95_limit_mm:  # NaN (a path without the structure) compares False
        why = f"HD95 {hd95_mm:.1f} mm > {hd95_limit_mm:.1f} mm"
    else:
        return ""
    return f"{name}: registration and segmentation paths disagree ({why}); review this structure"


def _ddf_report(
    model_ddf: np.ndarray, body_mask: np.ndarray, settings: QALimits
) -> tuple[dict[str, float | str | None], list[str]]:
    """Jacobian statistics of the DDF inside the body (the whole model grid when no voxel is body); the flags."""
    mask = np.asarray(body_mask, dtype=bool)
    region = "body inside the model grid"
    if not mask.any():
        mask, region = np.ones(model_ddf.shape[1:], dtype=bool), "model grid"
    quality = deformation_quality(model_ddf, mask=mask)
    ddf: dict[str, float | str | None] = {key: _clean(value, 6) for key, value in quality.as_dict().items()}
    ddf["region"] = region
    flags = []
    if quality.folding_fraction > settings.folding_limit:
        flags.append(
            f"DDF folds in {100 * quality.folding_fraction:.3f}% of the body (det J <= 0; limit "
            f"{100 * settings.folding_limit:.3f}%)"
        )
    return ddf, flags


def _rigid_report(rigid: RigidAlignment, settings: QALimits) -> tuple[dict[str, Any], list[str]]:
    """The rigid pre-alignment's record and residual; the flags."""
    report = {
        "method": rigid.method,
        "bone_rms_mm": _clean(rigid.residual),
        "bone_overlap": _clean(rigid.bone_overlap),
        "translation_mm": _clean(rigid.translation_mm, 3),
        "rotation_deg": _clean(rigid.rotation_deg, 3),
        "daily_to_planning": np.round(rigid.daily_to_planning, 6).tolist(),
    }
    flags = []
    if rigid.residual is not None and rigid.residual > settings.residual_limit:
        flags.append(
            f"rigid alignment on bone: residual {rigid.residual:.2f} mm RMS above {settings.residual_limit:.2f} mm; "
            "check the alignment before using the contours"
        )
    if rigid.method == "none":
        flags.append("no rigid pre-alignment was run (both scans assumed in one frame of reference)")
    return report, flags


def _slices_to_show(final: np.ndarray, count: int) -> list[int]:
    """Axial slices (index K) spread over the prostate (else all contours), else the middle slice."""
    for labels in ((1,), (1, 2, 3, 4)):
        ks = np.nonzero(np.isin(final, labels).any(axis=(0, 1)))[0]
        if ks.size:
            picks = np.linspace(ks.min(), ks.max(), count + 2)[1:-1] if ks.size > count else ks
            return sorted({int(np.rint(k)) for k in picks})
    return [final.shape[2] // 2]


def _view_window(
    reg_map: np.ndarray, seg_map: np.ndarray, spacing: tuple[float, ...], num_slices: int
) -> tuple[list[int], tuple[int, int], tuple[int, int]]:
    """What :func:`write_qa_png` shows: axial slices ``k`` and the in-plane window ``(i0, i1), (j0, j1)``, the
    bounding box of both paths plus 30 mm (the whole grid when both are empty)."""
    found = label_box(np.maximum(reg_map, seg_map))
    box = found if found is not None else tuple(slice(0, n) for n in reg_map.shape)
    ks = _slices_to_show(np.maximum(reg_map[box], seg_map[box]), num_slices)
    ks = [k + box[2].start for k in ks]
    margin = [int(30 / s) for s in spacing]
    i0, i1 = max(box[0].start - margin[0], 0), min(box[0].stop + margin[0], reg_map.shape[0])
    j0, j1 = max(box[1].start - margin[1], 0), min(box[1].stop + margin[1], reg_map.shape[1])
    return ks, (i0, i1), (j0, j1)


def _legend_handles() -> list[Line2D]:
    """Legend of ``qa.png``: one colour per structure, solid registration path, dashed segmentation path."""
    from matplotlib.lines import Line2D

    # the RGB triple is a tuple[float, ...] to mypy; matplotlib's ColorType only takes fixed-length tuples
    handles = [
        Line2D([], [], color=tuple(c / 255 for c in s.color), label=s.display_name)  # type: ignore[arg-type]
        for s in STRUCTURES
    ]
    return [
        *handles,
        Line2D([], [], color="black", linestyle="solid", label="registration path"),
        Line2D([], [], color="black", linestyle="dashed", label="segmentation path"),
    ]


def write_qa_png(
    daily_ct: sitk.Image,
    reg: sitk.Image,
    seg: sitk.Image,
    path: str | os.PathLike[str],
    *,
    num_slices: int = 3,
    title: str = "",
) -> Path:
    """Draw both contour paths on axial daily slices: registration solid, segmentation dashed.

    Args:
        daily_ct: the daily CT (HU).
        reg: registration-path label map on the daily grid.
        seg: segmentation-path label map on the daily grid.
        path: the PNG to write (written under a temporary name, then renamed).
        num_slices: number of slices, spread over the prostate.
        title: figure title.

    Returns:
        The written path.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # views, not copies: only the slices drawn are read (a 512 x 512 x 122 CT is 128 MB as float32)
    ct, reg_map, seg_map = array_view(daily_ct), array_view(reg), array_view(seg)
    ks, (i0, i1), (j0, j1) = _view_window(reg_map, seg_map, daily_ct.GetSpacing(), num_slices)
    spacing = daily_ct.GetSpacing()
    # a fixed small picture (900 x 340 pixels) whatever the scan and the number of slices
    fig, axes = plt.subplots(1, len(ks), figsize=QA_PNG_INCHES, squeeze=False)
    for ax, k in zip(axes[0], ks, strict=True):
        # rows = J (posterior down in LPS), columns = I: the radiological view of an axial slice
        extent = (-0.5, (i1 - i0) * spacing[0] - 0.5, (j1 - j0) * spacing[1] - 0.5, -0.5)
        ax.imshow(np.clip(ct[i0:i1, j0:j1, k].T, -250, 350), cmap="gray", extent=extent, interpolation="bilinear")
        for structure in STRUCTURES:
            colour = tuple(c / 255 for c in structure.color)
            for label_map, style in ((reg_map, "solid"), (seg_map, "dashed")):
                mask = (label_map[i0:i1, j0:j1, k] == structure.label).T.astype(float)
                if mask.any():
                    ax.contour(
                        mask,
                        levels=[0.5],
                        colors=[colour],
                        linestyles=style,
                        linewidths=1.2,
                        extent=extent,
                        origin="upper",
                    )
        ax.set_title(f"slice k={k}", fontsize=9)
        ax.axis("off")
    fig.legend(handles=_legend_handles(), loc="lower center", ncol=6, fontsize=8, frameon=False)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.07, 1, 0.95 if title else 1))
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, dpi=QA_PNG_DPI, format="png")
    plt.close(fig)
    tmp.replace(path)
    return path
