"""prostate_jrs.trust: the bundle's weights are checked against the sha256 its metadata records."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from prostate_jrs.pipeline import BundleError, load_bundle
from prostate_jrs.tiny_bundle import write_tiny_bundle
from prostate_jrs.trust import (
    MODEL_HASH_KEY,
    main,
    model_hash_problem,
    record_model_hash,
    sha256_file,
    write_bundle,
)

REPO = Path(__file__).resolve().parents[1]


def test_the_shipped_weights_match_the_recorded_hash() -> None:
    metadata = json.loads((REPO / "bundle" / "configs" / "metadata.json").read_text())
    weights = REPO / "bundle" / "models" / "model.pt"
    assert metadata[MODEL_HASH_KEY] == hashlib.sha256(weights.read_bytes()).hexdigest() == sha256_file(weights)
    assert model_hash_problem(REPO / "bundle") is None


def test_changed_weights_are_refused_by_name_until_recorded(tmp_path: Path) -> None:
    bundle = write_tiny_bundle(REPO / "bundle", tmp_path / "bundle")
    load_bundle(bundle)  # the tiny bundle records the hash of its own weights
    weights = bundle / "models" / "model.pt"
    recorded = sha256_file(weights)
    weights.write_bytes(weights.read_bytes()[:-100])  # a truncated copy
    with pytest.raises(BundleError, match=rf"models/model\.pt: sha256 [0-9a-f]{{64}} does not match {MODEL_HASH_KEY}"):
        load_bundle(bundle)
    assert recorded in (model_hash_problem(bundle) or "")
    assert main(["check-model", str(bundle)]) == 1

    shutil.copy(REPO / "bundle" / "models" / "model.pt", weights)  # new weights on purpose ...
    with pytest.raises(BundleError, match="record-model"):
        load_bundle(bundle)
    assert main(["record-model", str(bundle)]) == 0  # ... recorded: accepted again
    assert model_hash_problem(bundle) is None
    metadata = json.loads((bundle / "configs" / "metadata.json").read_text())
    assert metadata[MODEL_HASH_KEY] == sha256_file(REPO / "bundle" / "models" / "model.pt")


def test_no_recorded_hash_and_bad_metadata(tmp_path: Path) -> None:
    bundle = write_tiny_bundle(REPO / "bundle", tmp_path / "bundle")
    meta = bundle / "configs" / "metadata.json"
    metadata = json.loads(meta.read_text())
    del metadata[MODEL_HASH_KEY]
    meta.write_text(json.dumps(metadata))
    assert model_hash_problem(bundle) is None  # nothing recorded, nothing to check
    meta.write_text("{ not json")
    assert "metadata.json: not valid JSON" in (model_hash_problem(bundle) or "")
    with pytest.raises(ValueError, match="not valid JSON"):
        record_model_hash(bundle)
    with pytest.raises(FileNotFoundError, match=r"model\.pt"):
        record_model_hash(tmp_path)


def test_write_bundle_publishes_complete_bundles_only(tmp_path: Path) -> None:
    def fill(staging: Path) -> None:
        shutil.copytree(REPO / "bundle" / "configs", staging / "configs")
        (staging / "models").mkdir()
        (staging / "models" / "model.pt").write_bytes(b"new weights")

    out = write_bundle(tmp_path / "new", fill)
    assert out == tmp_path / "new"
    assert model_hash_problem(out) is None  # the new weights' hash is recorded
    assert json.loads((out / "configs" / "metadata.json").read_text())[MODEL_HASH_KEY] == sha256_file(
        out / "models" / "model.pt"
    )

    def fail(staging: Path) -> None:
        fill(staging)
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        write_bundle(tmp_path / "broken", fail)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new"]  # neither the bundle nor its staging folder
