"""Site-local pinning of federated jobs: a hospital runs only the job code and configs it reviewed.

A federated job carries code to every site: NVFlare's client config names the Python classes it builds, ``client.py``
is Python, and the bundle configs it ships are code too (MONAI resolves every ``_target_`` and evaluates every
``$`` expression; advisory GHSA-x6pr-233j-x5cw). A compromised server or job channel could otherwise run anything
next to a hospital's patient data. So each site keeps a policy file in its startup kit (``local/``) that lists, for
every job version it has reviewed, the sha256 of every file of its client app (``config/`` and ``custom/``: the
client config, ``client.py``, the bundle configs, the licence; JSON in canonical form). Before NVFlare builds the
first component of a job at the site, :class:`federated/site_guard.JobPinGuard` hashes the deployed app and refuses
the job unless it matches one pinned version file for file (:func:`check_app`); nothing of a refused job is built,
imported or run.

Policy file (JSON, written by :func:`pin_app`)::

    {
      "format": "prostate-jrs-job-policy/1",
      "pinned": [
        {"label": "prostate_jrs_fedavg, 100 rounds, reviewed by it-admin 2026-12-03",
         "files": {"config/config_fed_client.json": "<sha256>", "custom/client.py": "<sha256>",
                   "custom/configs/train.json": "<sha256>", ...}}
      ]
    }

A site creates it from the job folder the researchers send for review (``federated/job.py ... --export``)::

    python -m prostate_jrs.federated_policy pin fl_job/prostate_jrs_fedavg --site hospital-a \\
        --policy prod_00/hospital-a/local/prostate_jrs_job_policy.json --label "reviewed by ..."
    python -m prostate_jrs.federated_policy check fl_job/prostate_jrs_fedavg --site hospital-a --policy ...

Hand-written: NVFlare signs jobs (who submitted them) and allow-lists component classes (``class_allow_list``), but
pins neither the content of a job's custom code nor the bundle configs it evaluates.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prostate_jrs.errors import JobNotPinnedError, PolicyError
from prostate_jrs.trust import sha256_file

__all__ = [
    "POLICY_FILE",
    "POLICY_FORMAT",
    "JobNotPinnedError",
    "JobPolicy",
    "PinnedJob",
    "PolicyError",
    "app_fingerprint",
    "check_app",
    "code_in_overrides",
    "job_app_dir",
    "load_policy",
    "pin_app",
]

#: Default name of the policy file in the site's ``local/`` folder.
POLICY_FILE = "prostate_jrs_job_policy.json"
POLICY_FORMAT = "prostate-jrs-job-policy/1"
#: What NVFlare or Python add to a deployed app by themselves: signatures of the job, byte-code caches.
_BOOKKEEPING_PREFIXES = (".__nvfl_",)
_BOOKKEEPING_DIRS = ("__pycache__",)
#: Markers that make MONAI's ConfigParser run code or read other files: ``$`` expressions, ``@`` references,
#: ``%`` macros (file#key), and ``_target_`` (instantiate a class or call a function).
_CODE_PREFIXES = ("$", "@", "%")
_CODE_KEYS = ("_target_", "_requires_")
_CLIENT_CONFIG = "config/config_fed_client.json"
#: The component NVFlare's SiteLogStreamer (a site's resources.json) adds to every deployed client config.
_INJECTED_ID = "auto_log_streamer"
_INJECTED_PATH = "nvflare.app_common.logging.job_log_streamer.JobLogStreamer"
_INJECTED_ARGS = {"target_parent_server", "log_file_name", "liveness_interval", "poll_interval"}


@dataclass
class PinnedJob:
    """One reviewed job version: relative file path (posix) -> sha256.

    Args:
        label: who reviewed what, for the log.
        files: every file of the client app.
    """

    label: str
    files: dict[str, str] = field(default_factory=dict)


@dataclass
class JobPolicy:
    """The pinned job versions of one site.

    Args:
        path: the policy file (for messages).
        pinned: the reviewed versions.
    """

    path: Path
    pinned: list[PinnedJob] = field(default_factory=list)


def _bookkeeping(relative: Path) -> bool:
    return (
        relative.name.startswith(_BOOKKEEPING_PREFIXES)
        or relative.suffix == ".pyc"
        or any(part in _BOOKKEEPING_DIRS for part in relative.parts)
    )


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError(f"duplicate keys {sorted({k for k in keys if keys.count(k) > 1})}")
    return dict(pairs)


def _site_injected(component: Any) -> bool:
    """Whether a client-config component is the log streamer the site's own ``SiteLogStreamer`` adds at deployment."""
    if not isinstance(component, dict):
        return False
    if (component.get("id"), component.get("path")) != (_INJECTED_ID, _INJECTED_PATH):
        return False
    args = component.get("args", {})
    name = args.get("log_file_name", "log.txt") if isinstance(args, dict) else None
    return (
        isinstance(args, dict)
        and set(args) <= _INJECTED_ARGS
        and isinstance(name, str)
        and Path(name).name == name  # a file of the job's own log folder, nothing elsewhere
    )


def _file_digest(path: Path, relative: str) -> str:
    """sha256 of a file; of its canonical form for JSON, which NVFlare re-serialises when a job is submitted."""
    if path.suffix != ".json":
        return sha256_file(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"), object_pairs_hook=_unique_keys)
    except (ValueError, UnicodeDecodeError):
        return sha256_file(path)  # not plain JSON: its bytes are what is pinned
    if relative == _CLIENT_CONFIG and isinstance(data, dict) and isinstance(data.get("components"), list):
        data["components"] = [c for c in data["components"] if not _site_injected(c)]
    canonical = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def app_fingerprint(app_dir: str | os.PathLike[str]) -> dict[str, str]:
    """sha256 of every file of a client app folder (``config/``, ``custom/``, anything else in it), by posix path.

    NVFlare's signature files and Python byte-code caches are left out: they are not part of what was reviewed.
    JSON files are hashed in canonical form (keys sorted, no whitespace; duplicate keys make them count as plain
    bytes), because the NVFlare server re-serialises them on submission; from the client config, the log streamer
    that the site's own ``SiteLogStreamer`` injects at deployment is left out.

    Raises:
        JobNotPinnedError: if the folder is missing or holds a symbolic link (its target could change after review).
    """
    root = Path(app_dir)
    if not root.is_dir():
        raise JobNotPinnedError(f"{root}: no such app folder; expected the job's client app")
    files: dict[str, str] = {}
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root)
        if _bookkeeping(relative):
            continue
        if path.is_symlink():
            raise JobNotPinnedError(f"{relative.as_posix()}: a symbolic link in the job; a pinned job holds files only")
        if path.is_file():
            files[relative.as_posix()] = _file_digest(path, relative.as_posix())
    return files


def load_policy(path: str | os.PathLike[str]) -> JobPolicy:
    """Read a site policy file.

    Raises:
        PolicyError: if it is missing, not JSON, of another format, or an entry is malformed.
    """
    path = Path(path)
    if not path.is_file():
        raise PolicyError(f"{path}: no site job policy; no job runs here until one is pinned (federated/README.md)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise PolicyError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, dict) or data.get("format") != POLICY_FORMAT:
        raise PolicyError(f'{path}: expected a JSON object with "format": "{POLICY_FORMAT}"')
    pinned = []
    for n, entry in enumerate(data.get("pinned", []), start=1):
        files = entry.get("files") if isinstance(entry, dict) else None
        if (
            not isinstance(files, dict)
            or not files
            or not all(isinstance(k, str) and isinstance(v, str) and len(v) == 64 for k, v in files.items())
        ):
            raise PolicyError(f'{path}: pinned entry {n} needs "files": {{relative path: sha256 hex}}')
        pinned.append(PinnedJob(str(entry.get("label", f"entry {n}")), {k: v.lower() for k, v in files.items()}))
    return JobPolicy(path, pinned)


def _differences(actual: Mapping[str, str], pinned: PinnedJob) -> list[str]:
    """What differs between an app's files and one pinned version, one line per file (sorted by path)."""
    lines = []
    for name in sorted(set(actual) | set(pinned.files)):
        if name not in pinned.files:
            lines.append(f"{name} is not in the pinned job")
        elif name not in actual:
            lines.append(f"{name} is missing from the job")
        elif actual[name] != pinned.files[name]:
            lines.append(f"{name} has sha256 {actual[name]}, pinned {pinned.files[name]}")
    return lines


def check_app(app_dir: str | os.PathLike[str], policy: JobPolicy) -> PinnedJob:
    """The pinned version the client app matches file for file.

    Raises:
        JobNotPinnedError: if no pinned version matches; the message names the first differing file against the
            closest version (fewest differences).
    """
    actual = app_fingerprint(app_dir)
    if not policy.pinned:
        raise JobNotPinnedError(f"{policy.path} pins no job; pin the reviewed job version first")
    scored = sorted(((_differences(actual, p), p) for p in policy.pinned), key=lambda item: len(item[0]))
    differences, closest = scored[0]
    if not differences:
        return closest
    more = f" (and {len(differences) - 1} more difference(s))" if len(differences) > 1 else ""
    raise JobNotPinnedError(
        f"{differences[0]}{more}, against the pinned job {closest.label!r} in {policy.path}; the job is not a version "
        "this site reviewed"
    )


def job_app_dir(job_dir: str | os.PathLike[str], site: str) -> Path:
    """The client app folder that a job folder (``meta.json`` + apps) deploys to ``site``.

    Raises:
        FileNotFoundError: if the job folder has no ``meta.json`` or no app for ``site``.
    """
    job = Path(job_dir)
    meta_file = job / "meta.json"
    if not meta_file.is_file():
        raise FileNotFoundError(f"{meta_file}: not found; expected a job folder (federated/job.py --export)")
    deploy_map: dict[str, list[Any]] = json.loads(meta_file.read_text()).get("deploy_map", {})
    for app, sites in deploy_map.items():
        if site in sites or any(str(s).upper() == "@ALL" for s in sites):
            return job / app
    raise FileNotFoundError(f"{meta_file}: deploys no app to site {site!r} (deploy_map: {deploy_map})")


def pin_app(app_dir: str | os.PathLike[str], policy_file: str | os.PathLike[str], label: str) -> PinnedJob:
    """Add the client app's files to the site policy (created when missing; an entry with the same label is replaced).

    Raises:
        PolicyError: if an existing policy file is malformed.
    """
    path = Path(policy_file)
    policy = load_policy(path) if path.exists() else JobPolicy(path)
    entry = PinnedJob(label, app_fingerprint(app_dir))
    policy.pinned = [p for p in policy.pinned if p.label != label] + [entry]
    document = {"format": POLICY_FORMAT, "pinned": [{"label": p.label, "files": p.files} for p in policy.pinned]}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)
    return entry


def code_in_overrides(overrides: Mapping[str, Any]) -> list[str]:
    """Bundle config overrides whose values MONAI would run as code or resolve elsewhere, as ``key: value`` lines.

    Override values should be plain data (numbers, strings, lists); ``$`` expressions, ``@``/``%`` references and
    ``_target_`` dicts would run code at the site and are refused by the client.
    """
    found: list[str] = []

    def visit(key: str, value: Any) -> None:
        if isinstance(value, str) and value.startswith(_CODE_PREFIXES):
            found.append(f"{key}: {value!r}")
        elif isinstance(value, Mapping):
            if any(k in value for k in _CODE_KEYS):
                found.append(f"{key}: {value!r}")
            for k, v in value.items():
                visit(f"{key}#{k}", v)
        elif isinstance(value, list | tuple):
            for n, v in enumerate(value):
                visit(f"{key}#{n}", v)

    for key, value in overrides.items():
        if str(key).startswith(_CODE_PREFIXES) or key in _CODE_KEYS:
            found.append(f"{key}: {value!r}")
        visit(str(key), value)
    return found


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m prostate_jrs.federated_policy pin|check JOB_DIR --site NAME --policy FILE [--label TEXT]``."""
    parser = argparse.ArgumentParser(prog="python -m prostate_jrs.federated_policy", description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=("pin", "check"), help="pin the job's app for the site, or check it")
    parser.add_argument("job", type=Path, help="the job folder (federated/job.py --export) or a client app folder")
    parser.add_argument("--site", help="the site's client name (the app deployed to it is pinned)")
    parser.add_argument("--policy", type=Path, required=True, help=f"the site policy file (KIT/local/{POLICY_FILE})")
    parser.add_argument("--label", default=None, help="who reviewed which job version (default: the job folder)")
    args = parser.parse_args(argv)
    try:
        app = job_app_dir(args.job, args.site) if args.site else args.job
        if args.command == "pin":
            entry = pin_app(app, args.policy, args.label or str(args.job.resolve()))
            print(f"pinned {len(entry.files)} file(s) of {app} as {entry.label!r} in {args.policy}")
            return 0
        entry = check_app(app, load_policy(args.policy))
    except (FileNotFoundError, PolicyError, JobNotPinnedError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"{app}: matches the pinned job {entry.label!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
