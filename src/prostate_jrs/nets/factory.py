"""``build_network``: one entry point selecting any of the six networks by name.

Names and widths: docs/ARCHITECTURE.md, "Bundle I/O and network choice".
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

from prostate_jrs.nets.base import JRSNetwork
from prostate_jrs.nets.cross_stitch import CrossStitchNet
from prostate_jrs.nets.sedd import SEDDNet
from prostate_jrs.nets.single import DenseJRSNet, RegNet, SegNet

__all__ = ["DEFAULT_WIDTHS", "NETWORKS", "build_network", "canonical_network_name", "count_parameters"]

#: Network name -> class.
NETWORKS: dict[str, type[JRSNetwork]] = {
    "seg": SegNet,
    "reg": RegNet,
    "jrs_reg": RegNet,
    "dense": DenseJRSNet,
    "sedd": SEDDNet,
    "cross_stitch": CrossStitchNet,
}

#: Paper widths: [23, 45, 91] for one-branch networks, [16, 32, 64] for two-branch ones (TF@ad938ce).
DEFAULT_WIDTHS: dict[str, tuple[int, int, int]] = {
    "seg": (23, 45, 91),
    "reg": (23, 45, 91),
    "jrs_reg": (23, 45, 91),
    "dense": (23, 45, 91),
    "sedd": (16, 32, 64),
    "cross_stitch": (16, 32, 64),
}


def canonical_network_name(name: str) -> str:
    """A network name as :data:`NETWORKS` spells it: lower case, ``_`` for ``-``."""
    return name.lower().replace("-", "_")


def build_network(name: str, widths: Sequence[int] | None = None, **options: Any) -> JRSNetwork:
    """Build one of the six networks with the bundle-facing interface (``image`` -> ``pred``).

    Args:
        name: ``seg``, ``reg``, ``jrs_reg``, ``dense``, ``sedd`` or ``cross_stitch`` (``-`` and case ignored).
        widths: feature maps per level; ``None`` for the paper's widths (:data:`DEFAULT_WIDTHS`).
        options: passed to the network class: ``inputs`` (one-branch networks and ``sedd``), ``seg_inputs``,
            ``reg_inputs``, ``alpha_init``, ``alpha_mean``, ``alpha_std`` (``cross_stitch``).

    Returns:
        The network; ``network.name`` holds the canonical name (``jrs_reg`` differs from ``reg`` only in it
        and in the loss terms).

    Raises:
        ValueError: on an unknown name, wrong widths, or an option the network does not take.
    """
    key = canonical_network_name(name)
    if key not in NETWORKS:
        raise ValueError(f"unknown network {name!r}; expected one of {list(NETWORKS)}")
    widths = DEFAULT_WIDTHS[key] if widths is None else tuple(int(w) for w in widths)
    if len(widths) != 3 or min(widths) < 1:
        raise ValueError(f"widths must be three positive feature-map counts, got {widths}")
    # subclasses take widths and options; the base class's own __init__ takes none
    network_class: Callable[..., JRSNetwork] = NETWORKS[key]
    try:
        network = network_class(widths=widths, **options)
    except TypeError as err:
        raise ValueError(f"network {key!r} does not take options {sorted(options)}: {err}") from err
    network.name = key
    return network


def count_parameters(module: nn.Module) -> int:
    """Number of trainable weights (BatchNorm gamma/beta included, running statistics not)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)
