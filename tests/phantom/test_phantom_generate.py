from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from prostate_jrs.geometry import array_from_image, resample_with_ddf
from prostate_jrs.labels import STRUCTURES, structure_by_name
from prostate_jrs.phantom import Patient, PhantomConfig, generate_patient

RECTUM = structure_by_name("rectum").label


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float((a & b).sum()) / max(1, int(a.sum() + b.sum()))


def test_same_seed_same_patient_other_seed_other_anatomy(tiny_patient: Patient, tiny_config: PhantomConfig) -> None:
    again = generate_patient(seed=0, n_fractions=1, config=tiny_config)
    np.testing.assert_array_equal(array_from_image(again.planning.image), array_from_image(tiny_patient.planning.image))
    # Fraction f depends on (seed, f) only: asking for fewer fractions leaves it unchanged.
    np.testing.assert_array_equal(again.fractions[0].ddf, tiny_patient.fractions[0].ddf)
    np.testing.assert_array_equal(
        array_from_image(again.fractions[0].image), array_from_image(tiny_patient.fractions[0].image)
    )
    other = generate_patient(seed=1, n_fractions=0, config=tiny_config)
    assert other.anatomy.params["bladder_volume_ml"] != tiny_patient.anatomy.params["bladder_volume_ml"]
    assert other.anatomy.params["prostate_semi_lr"] != tiny_patient.anatomy.params["prostate_semi_lr"]
    labels_a = array_from_image(tiny_patient.planning.labels)
    labels_b = array_from_image(other.planning.labels)
    assert (labels_a != labels_b).mean() > 0.001


def test_daily_grids_differ_from_planning(tiny_patient: Patient) -> None:
    planning = tiny_patient.planning.image
    grids = {(f.image.GetSize(), f.image.GetOrigin()) for f in tiny_patient.fractions}
    assert all(grid != (planning.GetSize(), planning.GetOrigin()) for grid in grids)
    for fraction in tiny_patient.fractions:
        assert fraction.image.GetSpacing() == planning.GetSpacing()
        assert fraction.labels.GetSize() == fraction.image.GetSize()
        assert fraction.labels.GetOrigin() == fraction.image.GetOrigin()


def test_every_daily_label_map_holds_all_structures(tiny_patient: Patient) -> None:
    for fraction in tiny_patient.fractions:
        assert set(np.unique(array_from_image(fraction.labels))) == {0, *(s.label for s in STRUCTURES)}


def test_warped_planning_labels_reproduce_daily_labels(tiny_patient: Patient) -> None:
    for fraction in tiny_patient.fractions:
        warped = resample_with_ddf(tiny_patient.planning.labels, fraction.labels, fraction.ddf, order=0)
        daily = array_from_image(fraction.labels)
        for structure in STRUCTURES:
            assert _dice(warped == structure.label, daily == structure.label) >= 0.95, structure.name


def test_daily_image_is_warped_planning_anatomy(tiny_patient: Patient) -> None:
    """The daily CT equals the planning CT warped by the DDF up to noise; without the DDF it does not."""
    for fraction in tiny_patient.fractions:
        daily = array_from_image(fraction.image).astype(np.float32)
        warped = resample_with_ddf(
            tiny_patient.planning.image, fraction.image, fraction.ddf, order=1, default_value=-1000
        )
        unwarped = resample_with_ddf(tiny_patient.planning.image, fraction.image, None, order=1, default_value=-1000)
        # Body voxels, away from gas (painted per scan, no correspondence) in either scan.
        body = (daily > -500) & (warped > -500) & (unwarped > -500)
        body &= ~ndimage.binary_dilation(fraction.gas_mask, iterations=2)
        error = np.abs(daily - warped)[body]
        assert np.median(error) < 12.0
        assert np.abs(daily - unwarped)[body].mean() > 1.5 * error.mean()


def test_gas_is_painted_in_the_rectum_after_warping(tiny_patient: Patient) -> None:
    for fraction in tiny_patient.fractions:
        gas = fraction.gas_mask
        assert gas.shape == fraction.image.GetSize() and gas.dtype == bool
        assert gas.sum() > 0  # tiny_config paints gas in every daily scan
        assert np.all(array_from_image(fraction.labels)[gas] == RECTUM)  # gas stays inside the rectum label
        assert np.median(array_from_image(fraction.image)[gas]) < -500
    # Gas has no correspondence: it differs between scans.
    first, second = (f.gas_mask for f in tiny_patient.fractions)
    assert first.shape != second.shape or not np.array_equal(first, second)


def test_fresh_noise_per_scan() -> None:
    """Noise is drawn anew for every scan: in the air of a corner, planning and daily noise are uncorrelated."""
    patient = generate_patient(seed=2, n_fractions=1, config=PhantomConfig.tiny(vary_daily_grid=False))
    planning = array_from_image(patient.planning.image).astype(float)[:12, :12]
    daily = array_from_image(patient.fractions[0].image).astype(float)[:12, :12]
    assert patient.fractions[0].image.GetOrigin() == patient.planning.image.GetOrigin()
    assert planning.std() > 2.0 and daily.std() > 2.0
    assert abs(np.corrcoef(planning.ravel(), daily.ravel())[0, 1]) < 0.2


def test_analytic_daily_labels_agree_with_warped(tiny_config: PhantomConfig) -> None:
    patient = generate_patient(seed=5, n_fractions=1, config=PhantomConfig.tiny(daily_labels="analytic"))
    fraction = patient.fractions[0]
    warped = resample_with_ddf(patient.planning.labels, fraction.labels, fraction.ddf, order=0)
    analytic = array_from_image(fraction.labels)
    for name in ("prostate", "bladder"):
        label = structure_by_name(name).label
        assert _dice(warped == label, analytic == label) > 0.88, name


@pytest.mark.parametrize("kwargs", [{"seed": -1, "n_fractions": 1}, {"seed": 0, "n_fractions": -2}])
def test_bad_arguments(kwargs: dict) -> None:
    with pytest.raises(ValueError, match=r"seed|n_fractions"):
        generate_patient(config=PhantomConfig.tiny(), **kwargs)
