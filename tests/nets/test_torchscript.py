from __future__ import annotations

import warnings

import pytest
import torch

from prostate_jrs.nets import NETWORKS, build_network


@pytest.mark.parametrize("name", list(NETWORKS))
def test_script_and_trace_match_eager(name: str) -> None:
    torch.manual_seed(0)
    net = build_network(name, (2, 4, 4)).eval()
    image = torch.randn(1, 3, 48, 48, 48)
    image[:, 2] = torch.randint(0, 5, (1, 48, 48, 48)).float()
    other = torch.randn(2, 3, 52, 48, 56)
    other[:, 2] = torch.randint(0, 5, (2, 52, 48, 56)).float()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        scripted = torch.jit.script(net)
        traced = torch.jit.trace(net, image)
        for x in (image, other):
            eager = net(x)
            assert torch.allclose(scripted(x), eager, atol=1e-5)
            assert torch.allclose(traced(x), eager, atol=1e-5)
