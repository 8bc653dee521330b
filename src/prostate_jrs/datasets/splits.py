"""Split patients (never their fractions) into training, validation and test."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["DEFAULT_TEST_FRACTION", "DEFAULT_VALIDATION_FRACTION", "split_patients"]

DEFAULT_VALIDATION_FRACTION = 0.2
DEFAULT_TEST_FRACTION = 0.2


def split_patients(
    patient_ids: Sequence[str],
    seed: int,
    validation_fraction: float = DEFAULT_VALIDATION_FRACTION,
    test_fraction: float = DEFAULT_TEST_FRACTION,
) -> dict[str, list[str]]:
    """Split patients (never their fractions) into training / validation / test.

    About ``test_fraction`` and ``validation_fraction`` of the patients, at least one each when the fraction is
    positive and there are enough patients: from two patients on one tests, from three on one validates; one patient
    only trains. The order is shuffled by ``seed``.

    Raises:
        ValueError: if a fraction is negative or both add up to 1 or more.
    """
    if validation_fraction < 0 or test_fraction < 0 or validation_fraction + test_fraction >= 1:
        raise ValueError(
            f"validation ({validation_fraction}) and test ({test_fraction}) fractions must be >= 0 and leave patients "
            "for training (sum below 1)"
        )
    n = len(patient_ids)
    n_test = 0 if n < 2 or test_fraction == 0 else max(1, round(test_fraction * n))
    n_val = 0 if n < 3 or validation_fraction == 0 else max(1, round(validation_fraction * n))
    n_val = min(n_val, max(0, n - n_test - 1))
    order = np.random.default_rng([seed, 99]).permutation(n)
    shuffled = [patient_ids[i] for i in order]
    return {
        "test": sorted(shuffled[:n_test]),
        "validation": sorted(shuffled[n_test : n_test + n_val]),
        "training": sorted(shuffled[n_test + n_val :]),
    }
