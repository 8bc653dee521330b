"""Integrity of what the project runs: sha256 of files, and the bundle's weights against the hash its metadata records.

``configs/metadata.json`` of a bundle records the sha256 of ``models/model.pt`` under :data:`MODEL_HASH_KEY`.
:func:`model_hash_problem` tells when the weights on disk are not those (damaged, truncated, replaced, or retrained
without recording the new hash); :func:`prostate_jrs.pipeline.load_bundle` refuses such a bundle. Whoever writes new
weights into a bundle on purpose records them with :func:`record_model_hash` (:func:`write_bundle` does it for a
new bundle)::

    python -m prostate_jrs.trust record-model BUNDLE      # after training or copying a model.pt into BUNDLE
    python -m prostate_jrs.trust check-model BUNDLE

The hash protects against accidents and a swapped weights file; someone who can rewrite the whole bundle can rewrite
the hash too (federated sites pin what they run with :mod:`prostate_jrs.federated_policy`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from prostate_jrs.output_folder import staged_folder

__all__ = [
    "MODEL_FILE",
    "MODEL_HASH_KEY",
    "model_hash_problem",
    "record_model_hash",
    "sha256_file",
    "write_bundle",
]

#: Key of ``configs/metadata.json`` holding the sha256 (hex) of the weights file.
MODEL_HASH_KEY = "model_sha256"
#: The weights file of a bundle, relative to its folder.
MODEL_FILE = "models/model.pt"
_METADATA_FILE = "configs/metadata.json"
_CHUNK = 1 << 20


def sha256_file(path: str | os.PathLike[str]) -> str:
    """The sha256 of a file's bytes, hex (read in chunks: model files may be large)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _metadata(bundle: Path) -> dict:
    """The bundle's metadata (empty when it has none).

    Raises:
        ValueError: if the file is not a JSON object.
    """
    path = bundle / _METADATA_FILE
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({err}); expected the bundle's metadata") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: holds a {type(data).__name__}; expected the bundle's metadata (a JSON object)")
    return data


def model_hash_problem(bundle_dir: str | os.PathLike[str]) -> str | None:
    """Why the bundle's ``models/model.pt`` does not match the sha256 in its metadata, or ``None`` when it does.

    A bundle whose metadata records no hash (or that has no metadata) has nothing to check: ``None``.

    Args:
        bundle_dir: the bundle folder.

    Returns:
        A message naming the file, both hashes and how to fix it; ``None`` when the weights match or no hash is set.
    """
    bundle = Path(bundle_dir)
    try:
        expected = _metadata(bundle).get(MODEL_HASH_KEY)
    except ValueError as err:
        return str(err)
    weights = bundle / MODEL_FILE
    if not expected or not weights.is_file():
        return None
    actual = sha256_file(weights)
    if actual == str(expected).lower():
        return None
    return (
        f"{weights}: sha256 {actual} does not match {MODEL_HASH_KEY} {expected} in {bundle / _METADATA_FILE}; the "
        "weights are not those the bundle was released with (damaged, truncated or replaced). If you trained or "
        f"copied them on purpose, record them: python -m prostate_jrs.trust record-model {bundle}"
    )


def record_model_hash(bundle_dir: str | os.PathLike[str]) -> str:
    """Write the sha256 of ``models/model.pt`` into ``configs/metadata.json`` (atomically); returns it.

    Raises:
        FileNotFoundError: if the bundle has no ``models/model.pt`` or no ``configs/metadata.json``.
        ValueError: if the metadata is not a JSON object.
    """
    bundle = Path(bundle_dir)
    weights, meta_file = bundle / MODEL_FILE, bundle / _METADATA_FILE
    for path in (weights, meta_file):
        if not path.is_file():
            raise FileNotFoundError(f"{path}: not found; expected a MONAI bundle with weights and metadata")
    metadata = _metadata(bundle)
    metadata[MODEL_HASH_KEY] = sha256_file(weights)
    tmp = meta_file.with_name(f".{meta_file.name}.tmp")
    tmp.write_text(json.dumps(metadata, indent=4) + "\n", encoding="utf-8")
    tmp.replace(meta_file)
    return str(metadata[MODEL_HASH_KEY])


def write_bundle(target: str | os.PathLike[str], fill: Callable[[Path], None], what: str = "a bundle") -> Path:
    """Write a new bundle folder complete or not at all, its weights' hash recorded.

    ``fill`` writes the bundle (configs, ``models/model.pt``, ...) into an empty staging folder beside ``target``;
    then :func:`record_model_hash` records the weights and the folder is renamed to ``target``. A failure anywhere
    leaves no ``target`` and no staging folder.

    Args:
        target: the new bundle folder; must not exist.
        fill: called with the staging folder.
        what: the kind of bundle, for the error message.

    Returns:
        ``target``.

    Raises:
        FileExistsError: if ``target`` exists (nothing is written).
    """
    out = Path(target)
    if out.exists():
        raise FileExistsError(f"{out}: already exists; refusing to overwrite it with {what} (it goes to a new folder)")
    with staged_folder(out) as staging:
        fill(staging)
        record_model_hash(staging)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m prostate_jrs.trust record-model|check-model BUNDLE``; 0 when fine, 1 on a mismatch or error."""
    parser = argparse.ArgumentParser(prog="python -m prostate_jrs.trust", description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=("record-model", "check-model"))
    parser.add_argument("bundle", type=Path, help="the bundle folder")
    args = parser.parse_args(argv)
    try:
        if args.command == "record-model":
            print(f"{args.bundle / MODEL_FILE}: sha256 {record_model_hash(args.bundle)} recorded")
            return 0
        problem = model_hash_problem(args.bundle)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(problem or f"{args.bundle / MODEL_FILE}: matches its recorded sha256 (or none is recorded)")
    return 1 if problem else 0


if __name__ == "__main__":
    sys.exit(main())
