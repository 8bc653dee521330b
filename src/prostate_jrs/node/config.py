"""Settings of the DICOM node: who it is, whom it accepts, where results go, and the limits IT sets."""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["Destination", "NodeConfig", "check_ae_title", "repository_bundle"]

_AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # DICOM AE: 16 chars of default repertoire, no backslash
_PLACEHOLDERS = ("{input}", "{output}")


def check_ae_title(title: str, what: str = "AE title") -> str:
    """``title`` stripped, if it is a valid DICOM AE title (1-16 characters, no backslash or control character).

    Raises:
        ValueError: naming ``what`` and the rule broken.
    """
    stripped = title.strip()
    if not stripped or not _AE_TITLE.match(stripped):
        raise ValueError(
            f"{what} {title!r} is not a DICOM AE title; expected 1 to 16 printable ASCII characters without a backslash"
        )
    return stripped


def _check_port(port: int, what: str) -> int:
    if not 0 <= port <= 65535:
        raise ValueError(f"{what} {port} is not a TCP port; expected 1 to 65535 (0: any free port)")
    return port


@dataclass(frozen=True)
class Destination:
    """Where results are sent by C-STORE: the called AE title and its address.

    Args:
        ae_title: the destination's AE title (the called AE title of the association).
        host: host name or IP address.
        port: TCP port of its DICOM listener.
    """

    ae_title: str
    host: str
    port: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "ae_title", check_ae_title(self.ae_title, "destination AE title"))
        _check_port(self.port, "destination port")

    @classmethod
    def parse(cls, text: str) -> Destination:
        """``AET@HOST:PORT`` (an IPv6 host in brackets: ``AET@[::1]:104``).

        Raises:
            ValueError: if ``text`` is not of that form.
        """
        match = re.fullmatch(r"(?P<aet>[^@]+)@(?P<host>\[[^\]]+\]|[^:@]+):(?P<port>\d+)", text.strip())
        if match is None:
            raise ValueError(f"destination {text!r} is not of the form AET@HOST:PORT (e.g. PACS@10.0.0.5:104)")
        return cls(match["aet"], match["host"].strip("[]"), int(match["port"]))

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.ae_title}@{host}:{self.port}"


def repository_bundle() -> Path:
    """The bundle of the source checkout this package runs from (``<repo>/bundle``); may not exist when installed."""
    return Path(__file__).resolve().parents[3] / "bundle"


@dataclass(frozen=True)
class NodeConfig:
    """Everything the node needs; times in seconds, sizes in bytes.

    Args:
        ae_title: the node's own AE title (called AE title for senders, calling AE title when it sends results).
        port: TCP port to listen on (0: a free port, for tests).
        workdir: the work folder (jobs, logs); created if missing.
        destination: where results go.
        bundle: the bundle folder the library pipeline runs (``configs/inference.json``, ``models/model.pt``).
        host: address to listen on.
        allowed_calling_aets: calling AE titles accepted; empty: any.
        quiet_s: a patient's session is complete this long after the associations that brought it ended, if nothing
            more of it arrived.
        quota_bytes: the most the work folder may hold; instances beyond it are refused (status A700).
        retention_s: finished jobs (done or failed) are deleted this long after they finished.
        send_attempts: C-STORE attempts of the results before the job fails.
        retry_delay_s: pause between attempts.
        job_timeout_s: a job's processing is stopped after this long.
        max_parallel_jobs: jobs processed at once (of different patients; one patient never has two).
        device: torch device of the library pipeline; ``None``: the app's default.
        app_command: run this command instead of the library pipeline (e.g. the MAP); ``{input}``, ``{output}`` and
            ``{bundle}`` are replaced by the job's folders and the bundle; it must write the app's five outputs.
        network_timeout_s: DICOM association, DIMSE and network timeouts of the node.
    """

    ae_title: str
    port: int
    workdir: Path
    destination: Destination
    bundle: Path = field(default_factory=repository_bundle)
    host: str = "0.0.0.0"
    allowed_calling_aets: tuple[str, ...] = ()
    quiet_s: float = 20.0
    quota_bytes: int = 50 * 2**30
    retention_s: float = 7 * 86400.0
    send_attempts: int = 3
    retry_delay_s: float = 10.0
    job_timeout_s: float = 3600.0
    max_parallel_jobs: int = 1
    device: str | None = None
    app_command: str | None = None
    network_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "ae_title", check_ae_title(self.ae_title, "node AE title"))
        allowed = tuple(check_ae_title(title, "allowed calling AE title") for title in self.allowed_calling_aets)
        object.__setattr__(self, "allowed_calling_aets", allowed)
        object.__setattr__(self, "workdir", Path(self.workdir))
        object.__setattr__(self, "bundle", Path(self.bundle))
        _check_port(self.port, "port")
        for name in ("quiet_s", "quota_bytes", "retry_delay_s", "job_timeout_s", "network_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.retention_s < 0:
            raise ValueError(f"retention_s must be >= 0, got {self.retention_s}")
        if self.send_attempts < 1 or self.max_parallel_jobs < 1:
            raise ValueError("send_attempts and max_parallel_jobs must be at least 1")
        if self.app_command is not None:
            missing = [p for p in _PLACEHOLDERS if p not in self.app_command]
            if missing:
                raise ValueError(f"app command {self.app_command!r} lacks {' and '.join(missing)}")
            shlex.split(self.app_command)  # raises ValueError on unbalanced quotes
        else:
            self.check_bundle()

    def check_bundle(self) -> None:
        """Fail at start, not at the first job, when the bundle folder lacks its config or weights.

        Raises:
            ValueError: naming the missing file.
        """
        for part in ("configs/inference.json", "models/model.pt"):
            if not (self.bundle / part).is_file():
                raise ValueError(
                    f"{self.bundle / part}: not found; --bundle must be a MONAI bundle folder with "
                    "configs/inference.json and models/model.pt"
                )
