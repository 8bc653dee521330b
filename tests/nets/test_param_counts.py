"""Parameter counts at paper widths against TF@ad938ce (docs/ARCHITECTURE.md, "Parameter counts (TF@ad938ce)")."""

from __future__ import annotations

import pytest

from prostate_jrs.nets import build_network, count_parameters

# (network, options, TF@ad938ce count)
TABLE = [
    ("seg", {"inputs": "If"}, 779_436),
    ("seg", {"inputs": "If_Im_Sm"}, 780_678),
    ("reg", {"inputs": "If_Im"}, 779_733),
    ("reg", {"inputs": "If_Im_Sm"}, 780_354),
    ("dense", {}, 781_164),
    ("sedd", {}, 722_936),
    ("cross_stitch", {}, 779_576),
]


@pytest.mark.parametrize(("name", "options", "expected"), TABLE)
def test_parameter_count_matches_method_table(name: str, options: dict, expected: int) -> None:
    count = count_parameters(build_network(name, **options))
    assert abs(count - expected) <= 0.10 * expected, f"{name} {options}: {count} vs {expected}"


def test_cross_stitch_has_576_alphas() -> None:
    net = build_network("cross_stitch")
    alphas = sum(p.numel() for n, p in net.named_parameters() if "stitch" in n)
    assert alphas == 576


def test_running_stats_are_not_counted() -> None:
    net = build_network("seg")
    buffers = sum(b.numel() for n, b in net.named_buffers() if "running" in n)
    assert buffers > 0
    assert count_parameters(net) == sum(p.numel() for p in net.parameters())
