"""Named hospital profiles and multi-site datasets for federated experiments.

The published network lost accuracy on a second institute's scans (validation HMC vs independent test EMC;
docs/ARCHITECTURE.md, "A second institute"). Two hospitals differ in their scanners (manufacturer calibration, dose
and reconstruction kernel, field of view) and in their populations and protocols (body size, bladder filling
instructions, rectal preparation).
:data:`INSTITUTES` holds two such profiles; :func:`write_multisite_dataset` writes one dataset folder per site,
the layout ``federated/job.py --dataset-root`` expects::

    OUT/site-1/datalist.json ...   institute-a (first profile)
    OUT/site-2/datalist.json ...   institute-b (second profile)

Typical use::

    from prostate_jrs.phantom import PhantomConfig
    from prostate_jrs.phantom.sites import write_multisite_dataset

    write_multisite_dataset("fl_data", n_sites=2, n_patients=5, n_fractions=2, seed=0, config=PhantomConfig.tiny())
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from prostate_jrs.output_folder import staged_folder

from .config import AnatomyRanges, PhantomConfig, SiteProfile
from .dataset import check_count, write_dataset

__all__ = ["INSTITUTES", "Institute", "site_folder_name", "site_seed", "write_multisite_dataset"]


@dataclass(frozen=True)
class Institute:
    """A hospital: its CT scanner profile and its patient population.

    Args:
        name: short name, written into ``phantom.json`` and ``sites.json``.
        description: one line for humans (scanner, protocol, population).
        site: scanner profile (HU calibration, noise, sharpness, field of view, muscle HU).
        anatomy: population ranges (body size, bladder filling, rectum).
    """

    name: str
    description: str
    site: SiteProfile
    anatomy: AnatomyRanges

    def apply(self, config: PhantomConfig) -> PhantomConfig:
        """Copy of ``config`` (grid, motion) with this institute's scanner and population."""
        return replace(config, site=self.site, anatomy=self.anatomy)


# Numbers: vendor water/soft-tissue calibration differs by up to ~20 HU between manufacturers and kernels;
# a low-dose protocol with a sharper kernel roughly doubles the noise SD; reconstruction diameters of
# 500 vs 420 mm are both common for pelvis CT; bladder filling instructions ("drink 500 ml" vs "comfortably
# full") shift the planning bladder volume; the rest follows the defaults of the phantom recipe
# (docs/ARCHITECTURE.md, "Phantom recipe").
INSTITUTES: tuple[Institute, ...] = (
    Institute(
        name="institute-a",
        description="manufacturer A, standard dose, smooth kernel, 500 mm field of view, full-bladder protocol",
        site=SiteProfile(name="institute-a", hu_offset=0.0, noise_sd_hu=15.0, psf_sigma_mm=0.65, fov_scale=1.0),
        anatomy=AnatomyRanges(),
    ),
    Institute(
        name="institute-b",
        description=(
            "manufacturer B (+20 HU calibration), low dose with sharper kernel (noise x2), 420 mm field of view, "
            "comfortably-full bladder protocol, larger patients"
        ),
        site=SiteProfile(
            name="institute-b",
            hu_offset=20.0,
            noise_sd_hu=30.0,
            psf_sigma_mm=0.45,
            fov_scale=0.84,
            muscle_hu=45.0,
        ),
        anatomy=AnatomyRanges(
            body_semi_lr=(165.0, 195.0),
            body_semi_ap=(110.0, 135.0),
            fat_rim=(20.0, 40.0),
            bladder_volume_ml=(120.0, 280.0),
            rectum_radius=(14.0, 20.0),
        ),
    ),
)


def site_folder_name(index: int) -> str:
    """Folder (and NVFlare client) name of site ``index`` (0-based): ``site-1``, ``site-2``, ..."""
    return f"site-{index + 1}"


def site_seed(seed: int, index: int) -> int:
    """Dataset seed of site ``index``: every site gets its own patients, whatever the number of sites."""
    return int(np.random.SeedSequence([seed, 7919, index]).generate_state(1, dtype=np.uint32)[0])


def write_multisite_dataset(
    out_dir: str | Path,
    n_sites: int,
    n_patients: int,
    n_fractions: int,
    seed: int,
    config: PhantomConfig | None = None,
    institutes: tuple[Institute, ...] = INSTITUTES,
    preview: bool = False,
    progress: Callable[[str], None] | None = None,
) -> list[Path]:
    """Write one dataset folder per site (``OUT/site-1``, ``OUT/site-2``, ...) and ``OUT/sites.json``.

    Site ``k`` uses ``institutes[k % len(institutes)]`` on the grid and motion of ``config``, and its own
    seed (:func:`site_seed`), so no patient appears at two sites. Each site has ``n_patients`` patients
    split into training / validation / test as :func:`prostate_jrs.phantom.dataset.split_patients` does.

    Args:
        out_dir: folder to create; it must not exist or be empty.
        n_sites: number of sites (>= 1).
        n_patients: patients per site (>= 1).
        n_fractions: daily scans per patient (>= 1).
        seed: root seed.
        config: grid and motion settings shared by all sites (clinical default when ``None``).
        institutes: profiles to cycle through.
        preview: also write ``<patient>_preview.png`` in each site folder.
        progress: called with a short message after each patient.

    Returns:
        The ``datalist.json`` path of every site, in site order.

    Raises:
        ValueError: for bad counts or seed, or an empty ``institutes``.
        FileExistsError: if ``out_dir`` exists and is not an empty folder.
    """
    check_count("n_sites", n_sites)
    check_count("seed", seed, minimum=0)
    if not institutes:
        raise ValueError("institutes must name at least one profile")
    config = config or PhantomConfig()
    out_dir = Path(out_dir)
    with staged_folder(out_dir) as staging:  # the same all-or-nothing rule as write_dataset
        summary: dict[str, object] = {}
        for k in range(n_sites):
            institute = institutes[k % len(institutes)]
            name = site_folder_name(k)
            site_progress = None if progress is None else (lambda m, n=name: progress(f"{n}: {m}"))
            write_dataset(
                staging / name,
                n_patients,
                n_fractions,
                site_seed(seed, k),
                config=institute.apply(config),
                preview=preview,
                progress=site_progress,
            )
            summary[name] = {"institute": institute.name, "description": institute.description, "seed": seed}
        (staging / "sites.json").write_text(json.dumps(summary, indent=2))
    return [out_dir / site_folder_name(k) / "datalist.json" for k in range(n_sites)]
