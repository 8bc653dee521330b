"""Helpers of the benchmarks under ``benchmarks/``: measurements in a forked child, peak memory, machine facts.

A measurement runs in a child forked from a light parent (:func:`run_forked`), so its peak resident set size
(:func:`peak_rss_mib`) belongs to it alone and one measurement's peak cannot hide another's. The parent must not have
run torch operations (OpenMP thread pools do not survive a fork) nor initialised CUDA (a forked child cannot use it):
do both only inside children.

:func:`hardware_info` and :func:`software_versions` describe the machine and the stack, for the result files.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import platform
import resource
import traceback
from collections.abc import Callable, Iterable
from importlib import metadata
from multiprocessing.connection import Connection
from typing import Any, TypeVar

__all__ = ["DEFAULT_PACKAGES", "hardware_info", "peak_rss_mib", "run_forked", "software_versions"]

T = TypeVar("T")

#: Distributions whose versions :func:`software_versions` reports by default.
DEFAULT_PACKAGES: tuple[str, ...] = (
    "prostate-jrs",
    "torch",
    "monai",
    "numpy",
    "scipy",
    "SimpleITK",
    "itk",
    "itk-elastix",
    "pydicom",
    "highdicom",
    "monai-deploy-app-sdk",
    "onnx",
    "onnxruntime",
    "openvino",
)


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far, in MiB (Linux reports ``ru_maxrss`` in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _child_main(sender: Connection, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    try:
        message: tuple[str, Any] = ("ok", fn(*args, **kwargs))
    except BaseException:  # the parent re-raises it with the child's traceback
        message = ("error", traceback.format_exc())
    sender.send(message)
    sender.close()


def run_forked(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)`` in a forked child process; returns its (picklable) result.

    Args:
        fn: the measurement; any callable (the child is forked, nothing is pickled but the result).
        *args: positional arguments of ``fn``.
        **kwargs: keyword arguments of ``fn``.

    Returns:
        What ``fn`` returned in the child.

    Raises:
        ChildProcessError: if ``fn`` raised (the message holds the child's traceback) or the child died without a
            result (killed for memory, a crash in native code).
    """
    ctx = mp.get_context("fork")
    receiver, sender = ctx.Pipe(duplex=False)
    process = ctx.Process(target=_child_main, args=(sender, fn, args, kwargs))
    process.start()
    sender.close()  # the child holds the only writer now: its death ends recv() with EOFError instead of a hang
    name = getattr(fn, "__name__", repr(fn))
    try:
        status, payload = receiver.recv()  # before join(): a large result must be read for the child to exit
    except EOFError:
        process.join()
        raise ChildProcessError(
            f"{name} died in a forked child without a result (exit code {process.exitcode})"
        ) from None
    finally:
        receiver.close()
    process.join()
    if status != "ok":
        raise ChildProcessError(f"{name} failed in a forked child:\n{payload}")
    return payload


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_gib() -> float | None:
    try:
        with open("/proc/meminfo", encoding="utf-8") as meminfo:
            for line in meminfo:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 2**20, 1)  # kB
    except (OSError, ValueError, IndexError):
        pass
    return None


def hardware_info() -> dict[str, Any]:
    """CPU model (``/proc/cpuinfo``), logical cores, cores this process may use, memory, OS and Python.

    GPU facts are not collected here: querying CUDA in the parent would keep forked children from using it.
    """
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu_model": _cpu_model(),
        "logical_cores": os.cpu_count(),
        "usable_cores": usable,
        "memory_gib": _memory_gib(),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }


def software_versions(packages: Iterable[str] = DEFAULT_PACKAGES) -> dict[str, str | None]:
    """Installed version of each distribution (``None`` when not installed)."""
    versions: dict[str, str | None] = {}
    for name in packages:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions
