"""Configuration of the synthetic pelvis: grid, scanner/site profile, anatomy ranges and daily motion ranges.

All lengths are millimetres, all angles degrees, all intensities Hounsfield units. Defaults follow the phantom
recipe (docs/ARCHITECTURE.md, "Phantom recipe"); the default grid looks like a clinical planning CT cropped to the
pelvis (512 x 512 pixels of 0.977 mm, 90 slices of 3 mm).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace

__all__ = ["AnatomyRanges", "MotionRanges", "PhantomConfig", "SiteProfile"]

Range = tuple[float, float]


def _check_range(name: str, value: Range, low: float | None = None) -> None:
    if len(value) != 2 or value[0] > value[1]:
        raise ValueError(f"{name} must be a (min, max) pair with min <= max, got {value}")
    if low is not None and value[0] < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")


@dataclass(frozen=True)
class SiteProfile:
    """What differs between two hospitals' scanners and populations (for federated experiments).

    Args:
        name: free text, written into dataset metadata.
        hu_offset: added to every voxel (calibration difference between manufacturers).
        noise_sd_hu: noise SD in homogeneous soft tissue for a reference voxel of ``noise_reference_voxel_mm3``.
        noise_reference_voxel_mm3: voxel volume at which ``noise_sd_hu`` holds (0.98 x 0.98 x 3 mm).
        noise_volume_exponent: noise SD scales as ``(reference / voxel volume) ** exponent``. CT noise is
            correlated, so averaging it into bigger voxels lowers it more slowly than white noise (0.5);
            0.15 comes close to the real 3 mm fixture (a real CT: 15 HU at 2.9 mm^3; at 27 mm^3 the fixture's
            urine SD is about 12.5 HU, the phantom's about 11 HU).
        noise_correlation_px: sigma (pixels, in-plane) of the Gaussian that colours the noise.
        psf_sigma_mm: in-plane Gaussian point-spread function.
        psf_sigma_slices: through-plane blur, in slices.
        fov_scale: scales the in-plane field of view (reconstruction diameter) of the config.
        muscle_hu: mean HU of skeletal muscle (varies between populations and scanners).
    """

    name: str = "default"
    hu_offset: float = 0.0
    noise_sd_hu: float = 15.0
    noise_reference_voxel_mm3: float = 0.977 * 0.977 * 3.0
    noise_volume_exponent: float = 0.15
    noise_correlation_px: float = 0.7
    psf_sigma_mm: float = 0.65
    psf_sigma_slices: float = 0.4
    fov_scale: float = 1.0
    muscle_hu: float = 35.0

    def noise_sd_for(self, spacing: Sequence[float]) -> float:
        """Noise SD (HU) for voxels of ``spacing`` mm."""
        volume = float(spacing[0] * spacing[1] * spacing[2])
        return self.noise_sd_hu * (self.noise_reference_voxel_mm3 / volume) ** self.noise_volume_exponent


@dataclass(frozen=True)
class AnatomyRanges:
    """Population ranges (uniform) from which each patient's anatomy is drawn.

    Args:
        body_semi_lr: body outline semi-axis, left-right.
        body_semi_ap: body outline semi-axis, anterior-posterior.
        fat_rim: subcutaneous fat thickness under the skin.
        prostate_semi_lr, prostate_semi_ap, prostate_semi_si: prostate ellipsoid semi-axes.
        sv_length: seminal vesicle length along its curve.
        sv_width: seminal vesicle width (diameter across, in the plane of its bend).
        sv_ap: seminal vesicle antero-posterior thickness (diameter).
        sv_angle: lateral angle of each seminal vesicle from the midline.
        bladder_volume_ml: planning bladder volume.
        bladder_wall: bladder wall thickness.
        rectum_radius: outer radius of the rectum at the level of the prostate.
        rectum_wall: rectal wall thickness.
        femoral_head_radius: femoral head radius.
    """

    body_semi_lr: Range = (155.0, 185.0)
    body_semi_ap: Range = (105.0, 125.0)
    fat_rim: Range = (15.0, 30.0)
    prostate_semi_lr: Range = (22.0, 25.0)
    prostate_semi_ap: Range = (15.0, 18.0)
    prostate_semi_si: Range = (18.0, 22.0)
    sv_length: Range = (35.0, 50.0)
    sv_width: Range = (12.0, 15.0)
    sv_ap: Range = (7.0, 11.0)
    sv_angle: Range = (30.0, 45.0)
    bladder_volume_ml: Range = (200.0, 400.0)
    bladder_wall: Range = (3.0, 5.0)
    rectum_radius: Range = (12.5, 18.0)
    rectum_wall: Range = (3.0, 5.0)
    femoral_head_radius: Range = (23.0, 25.0)


@dataclass(frozen=True)
class MotionRanges:
    """Magnitudes of the daily deformation (SDs of normal draws unless noted).

    Args:
        setup_shift_sd: rigid setup translation per axis; clipped to ``setup_shift_max``.
        setup_shift_max: clip of the setup translation.
        setup_rotation_sd: rigid setup rotation per axis; clipped to ``setup_rotation_max``.
        setup_rotation_max: clip of the setup rotation.
        prostate_shift_sd: prostate translation relative to bone (LR, AP, SI).
        prostate_rotation_sd: prostate rotation about the left-right axis.
        prostate_falloff: Gaussian falloff (sigma) of the prostate motion outside the gland.
        sv_factor: (min, max) amplification of the prostate motion for the seminal vesicles.
        sv_bend_sd: extra displacement of each seminal vesicle tip.
        bladder_log_sd: SD of log(daily / planning bladder volume).
        bladder_volume_clip: clamp of the daily bladder volume (ml).
        bladder_falloff: Gaussian falloff (sigma) of bladder filling outside the bladder.
        rectum_change: (min, max) absolute change of rectal radius; the sign is drawn.
        rectum_segment: (min, max) length of the distended segment.
        rectum_falloff: Gaussian falloff (sigma) of the rectal distension outside the rectum.
        background_spacing: control-point spacing of the smooth background B-spline field.
        background_sd: SD of its coefficients (clipped to 0.4 x spacing for local injectivity).
        bone_distance: distance scale over which non-rigid motion fades to zero at bone.
        min_jacobian: a field whose Jacobian determinant falls to this or below is damped and redrawn.
    """

    setup_shift_sd: float = 3.0
    setup_shift_max: float = 10.0
    setup_rotation_sd: float = 1.0
    setup_rotation_max: float = 3.0
    prostate_shift_sd: tuple[float, float, float] = (1.0, 3.0, 3.0)
    prostate_rotation_sd: float = 4.0
    prostate_falloff: float = 12.0
    sv_factor: Range = (1.5, 2.0)
    sv_bend_sd: float = 3.0
    bladder_log_sd: float = 0.35
    bladder_volume_clip: Range = (80.0, 600.0)
    bladder_falloff: float = 20.0
    rectum_change: Range = (5.0, 15.0)
    rectum_segment: Range = (30.0, 60.0)
    rectum_falloff: float = 18.0
    background_spacing: float = 50.0
    background_sd: float = 2.0
    bone_distance: float = 10.0
    min_jacobian: float = 0.2


@dataclass(frozen=True)
class PhantomConfig:
    """Everything that shapes a synthetic dataset; all draws come from the seed given to the generator.

    Args:
        spacing: planning voxel size (x, y, z) in mm; daily scans use the same spacing.
        fov: planning field of view (x, y, z) in mm; the grid has ``round(fov / spacing)`` voxels per axis.
        fov_centre: world point (LPS mm) at the centre of the planning field of view. The prostate centre
            is the world origin.
        vary_daily_grid: daily scans get their own couch position and scan length (different grids).
        couch_shift_sd: SD of the in-plane offset of a daily grid against the planning grid.
        scan_length_change: maximum change (mm, +/-) of the daily scan length at each end.
        field_spacing: spacing on which the deformation is composed before linear upsampling.
        site: scanner / hospital profile.
        anatomy: population ranges.
        motion: daily motion magnitudes.
        daily_labels: ``"warped"``: the daily label map is the planning label map warped by the ground-truth DDF
            (nearest neighbour), so the registration path's ground truth is exact; voxels that map outside the
            planning grid take the analytic labels. ``"analytic"``: the shapes evaluated at each daily voxel
            centre (sharper, but thin structures differ from the warped planning map by discretisation).
        planning_gas_probability: chance that the planning scan shows rectal gas.
        daily_gas_probability: chance that a daily scan shows rectal gas.
    """

    spacing: tuple[float, float, float] = (0.9765625, 0.9765625, 3.0)
    fov: tuple[float, float, float] = (500.0, 500.0, 270.0)
    fov_centre: tuple[float, float, float] = (0.0, 15.0, 15.0)
    vary_daily_grid: bool = True
    couch_shift_sd: float = 8.0
    scan_length_change: float = 15.0
    field_spacing: float = 4.0
    site: SiteProfile = field(default_factory=SiteProfile)
    anatomy: AnatomyRanges = field(default_factory=AnatomyRanges)
    motion: MotionRanges = field(default_factory=MotionRanges)
    daily_labels: str = "warped"
    planning_gas_probability: float = 0.5
    daily_gas_probability: float = 0.8

    def __post_init__(self) -> None:
        if len(self.spacing) != 3 or min(self.spacing) <= 0:
            raise ValueError(f"spacing must be three positive numbers (mm), got {self.spacing}")
        if len(self.fov) != 3 or min(self.fov) <= 0:
            raise ValueError(f"fov must be three positive numbers (mm), got {self.fov}")
        if len(self.fov_centre) != 3:
            raise ValueError(f"fov_centre must be three numbers (mm), got {self.fov_centre}")
        if self.field_spacing <= 0:
            raise ValueError(f"field_spacing must be positive, got {self.field_spacing}")
        for name in ("planning_gas_probability", "daily_gas_probability"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.daily_labels not in ("warped", "analytic"):
            raise ValueError(f"daily_labels must be 'warped' or 'analytic', got {self.daily_labels!r}")
        if self.site.fov_scale <= 0:
            raise ValueError(f"site.fov_scale must be positive, got {self.site.fov_scale}")
        for f in fields(AnatomyRanges):
            _check_range(f"anatomy.{f.name}", getattr(self.anatomy, f.name), low=0.0)
        if self.motion.min_jacobian <= 0:
            raise ValueError(f"motion.min_jacobian must be positive, got {self.motion.min_jacobian}")

    @property
    def size(self) -> tuple[int, int, int]:
        """Planning grid size in voxels (x, y, z)."""
        scale = (self.site.fov_scale, self.site.fov_scale, 1.0)
        return tuple(max(8, round(f * s / d)) for f, s, d in zip(self.fov, scale, self.spacing, strict=True))  # type: ignore[return-value]

    @classmethod
    def tiny(cls, **overrides: object) -> PhantomConfig:
        """A small, fast config for tests: 4 mm voxels on a 384 x 288 x 192 mm field of view (96 x 72 x 48)."""
        base: dict[str, object] = {
            "spacing": (4.0, 4.0, 4.0),
            "fov": (384.0, 288.0, 192.0),
            "fov_centre": (0.0, 15.0, 20.0),
        }
        base.update(overrides)
        return cls(**base)  # type: ignore[arg-type]

    def with_spacing(self, spacing: float | Sequence[float]) -> PhantomConfig:
        """Copy with another voxel size (one number: isotropic), keeping the field of view.

        Raises:
            ValueError: if ``spacing`` is not one or three positive numbers.
        """
        values = [float(spacing)] if isinstance(spacing, (int, float)) else [float(s) for s in spacing]
        if len(values) == 1:
            values *= 3
        if len(values) != 3 or min(values) <= 0:
            raise ValueError(f"spacing must be one or three positive numbers (mm), got {spacing}")
        return replace(self, spacing=tuple(values))  # type: ignore[arg-type]
