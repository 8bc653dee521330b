"""Canonical structures, their label numbers and display colours, and ROI-name synonyms.

Label numbers are the contract between every part of the project (label maps, network outputs,
metrics tables, the bundle's ``channel_def``): 0 background, 1 prostate, 2 seminal vesicles,
3 rectum, 4 bladder.

ROI names in DICOM RTSTRUCTs written by planning systems vary between clinics ("CTV_Prostate",
"prostaat", "SV", "Rectum_wall", ...). :class:`SynonymTable` maps them to the four structures; a
clinic extends it from a JSON file instead of editing code.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "BACKGROUND",
    "DEFAULT_SYNONYMS",
    "LABEL_NAMES",
    "NUM_CLASSES",
    "SINGLE_COMPONENT_LABELS",
    "STRUCTURES",
    "Structure",
    "SynonymTable",
    "normalize_roi_name",
    "structure_by_label",
    "structure_by_name",
]


@dataclass(frozen=True)
class Structure:
    """One delineated structure.

    Args:
        label: integer value in label maps and index of the segmentation channel.
        name: canonical snake_case name used in files, configs and tables.
        display_name: name written into DICOM (ROI Name, Segment Label).
        color: display colour as 8-bit RGB, also written as ROI Display Color.
        interpreted_type: DICOM RT ROI Interpreted Type.
    """

    label: int
    name: str
    display_name: str
    color: tuple[int, int, int]
    interpreted_type: str


BACKGROUND = 0

STRUCTURES: tuple[Structure, ...] = (
    Structure(1, "prostate", "Prostate", (230, 25, 75), "CTV"),
    Structure(2, "seminal_vesicles", "SeminalVesicles", (255, 200, 25), "CTV"),
    Structure(3, "rectum", "Rectum", (60, 180, 75), "ORGAN"),
    Structure(4, "bladder", "Bladder", (0, 130, 200), "ORGAN"),
)

NUM_CLASSES = len(STRUCTURES) + 1

#: Labels that are one connected organ in any patient: the segmentation path keeps only its largest component of
#: each (the seminal vesicles are left out: left and right may show as two).
SINGLE_COMPONENT_LABELS: tuple[int, ...] = (1, 3, 4)

LABEL_NAMES: dict[int, str] = {BACKGROUND: "background", **{s.label: s.name for s in STRUCTURES}}

DEFAULT_SYNONYMS: dict[str, tuple[str, ...]] = {
    "prostate": (
        "prostate",
        "prostaat",
        "prostata",
        "ctv_prostate",
        "ctvprostate",
        "ctv_p",
        "prostate_ctv",
        "prostate_gland",
        "gtv_prostate",
    ),
    "seminal_vesicles": (
        "seminal_vesicles",
        "seminalvesicles",
        "seminal_vesicle",
        "seminalvesicle",
        "sv",
        "svs",
        "vesicles",
        "vesicula",
        "vesiculae",
        "vesicula_seminalis",
        "vesiculae_seminales",
        "zaadblaasjes",
        "ctv_sv",
        "ctv_seminal_vesicles",
    ),
    "rectum": ("rectum", "rect", "rectum_outer", "anorectum", "recto", "endeldarm"),
    "bladder": ("bladder", "blaas", "urinary_bladder", "vesica_urinaria", "harnblase", "vessie"),
}


def structure_by_label(label: int) -> Structure:
    """Return the structure with label number ``label``.

    Raises:
        KeyError: if no structure has that label.
    """
    for structure in STRUCTURES:
        if structure.label == label:
            return structure
    raise KeyError(f"no structure has label {label}; expected one of {[s.label for s in STRUCTURES]}")


def structure_by_name(name: str) -> Structure:
    """Return the structure with canonical name ``name``.

    Raises:
        KeyError: if no structure has that canonical name.
    """
    for structure in STRUCTURES:
        if structure.name == name:
            return structure
    raise KeyError(f"unknown structure {name!r}; expected one of {[s.name for s in STRUCTURES]}")


def normalize_roi_name(name: str) -> str:
    """Normalise an ROI name for matching: ASCII, lower case, runs of non-alphanumerics as one ``_``.

    ``"CTV  Prostate"``, ``"ctv-prostate"`` and ``"CTV_Prostate "`` all become ``"ctv_prostate"``.
    """
    ascii_name = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode("ascii")
    return re.sub(r"[^a-z0-9]+", "_", ascii_name.lower()).strip("_")


class SynonymTable:
    """Maps ROI names to canonical structures.

    Matching is on the normalised name (see :func:`normalize_roi_name`); a name matches a structure
    when it equals one of its synonyms, or equals it once underscores are removed.

    Args:
        synonyms: canonical structure name -> ROI names. Defaults to :data:`DEFAULT_SYNONYMS`.

    Raises:
        ValueError: if a key is not a canonical structure name, or one ROI name maps to two structures.
    """

    def __init__(self, synonyms: Mapping[str, Iterable[str]] | None = None) -> None:
        self._lookup: dict[str, str] = {}
        self.extend(DEFAULT_SYNONYMS if synonyms is None else synonyms)

    def extend(self, synonyms: Mapping[str, Iterable[str]]) -> SynonymTable:
        """Add synonyms in place and return ``self``.

        Raises:
            ValueError: if a key is not a canonical structure name, or a name is already mapped elsewhere.
        """
        known = {s.name for s in STRUCTURES}
        for structure_name, names in synonyms.items():
            if structure_name not in known:
                raise ValueError(
                    f"unknown structure {structure_name!r} in synonym table; expected one of {sorted(known)}"
                )
            if isinstance(names, str):
                names = [names]
            for name in [structure_name, *names]:
                for key in {normalize_roi_name(name), normalize_roi_name(name).replace("_", "")}:
                    previous = self._lookup.get(key)
                    if previous is not None and previous != structure_name:
                        raise ValueError(f"ROI name {name!r} maps to both {previous!r} and {structure_name!r}")
                    self._lookup[key] = structure_name
        return self

    @classmethod
    def from_file(cls, path: str | Path, include_defaults: bool = True) -> SynonymTable:
        """Build a table from a JSON file ``{"prostate": ["CTV_P", ...], ...}``.

        Args:
            path: the JSON file.
            include_defaults: start from :data:`DEFAULT_SYNONYMS` and add the file's names to it.

        Raises:
            ValueError: if the file is not a JSON object of lists of strings, or has unknown structures.
        """
        path = Path(path)
        try:
            content = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON ({err})") from err
        if not isinstance(content, dict) or not all(
            isinstance(v, list) and all(isinstance(n, str) for n in v) for v in content.values()
        ):
            raise ValueError(f"{path}: expected a JSON object mapping structure names to lists of ROI names")
        try:
            table = cls() if include_defaults else cls({})
            return table.extend(content)
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from err

    def match(self, roi_name: str) -> Structure | None:
        """Return the structure an ROI name denotes, or ``None`` when it denotes none of the four."""
        key = normalize_roi_name(roi_name)
        structure_name = self._lookup.get(key) or self._lookup.get(key.replace("_", ""))
        return None if structure_name is None else structure_by_name(structure_name)

    def names_for(self, structure_name: str) -> list[str]:
        """All normalised ROI names that map to ``structure_name``."""
        return sorted(k for k, v in self._lookup.items() if v == structure_name)
