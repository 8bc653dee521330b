"""Shared, session-scoped phantom data: generated once from seeds, small (4 mm voxels)."""

from __future__ import annotations

from pathlib import Path

import pytest

from prostate_jrs.phantom import Patient, PhantomConfig, generate_patient, write_dataset

TINY = PhantomConfig.tiny(daily_gas_probability=1.0)


@pytest.fixture(scope="session")
def tiny_config() -> PhantomConfig:
    return TINY


@pytest.fixture(scope="session")
def tiny_patient() -> Patient:
    """Seed 0, two fractions, gas in every daily scan."""
    return generate_patient(seed=0, n_fractions=2, config=TINY)


@pytest.fixture(scope="session")
def dataset_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``write_dataset`` with 3 patients, 2 fractions, seed 1 (tiny grid)."""
    out = tmp_path_factory.mktemp("synth") / "D"
    write_dataset(out, n_patients=3, n_fractions=2, seed=1, config=PhantomConfig.tiny())
    return out
