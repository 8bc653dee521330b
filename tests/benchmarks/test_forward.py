"""benchmarks/forward.py ``--engines``: the CPU engines agree with torch eager, and the CUDA rows are reported as far
as a CPU can check them (on a machine without CUDA they become error rows; the table still prints). No timing
thresholds (docs/ARCHITECTURE.md, "No timing thresholds in tests")."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from script_loader import load_script

import prostate_jrs.timing
from prostate_jrs.nets import build_network
from prostate_jrs.tiny_bundle import write_tiny_bundle

REPO = Path(__file__).resolve().parents[2]
forward = load_script(REPO / "benchmarks" / "forward.py", "benchmark_forward")


@pytest.mark.parametrize("name", ["torch eager", "torch channels-last", "torch bfloat16"])
def test_cpu_engines_compute_what_torch_eager_computes(name: str, tmp_path: Path) -> None:
    network = build_network("cross_stitch", [4, 8, 16]).eval()
    tile = torch.rand(1, 3, 48, 48, 48, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.inference_mode():
        reference = network(tile)
    out = forward._engine(name, network, tile, tmp_path / "model.onnx")()
    tolerance = 0.1 if name == "torch bfloat16" else 1e-4  # bfloat16 keeps 8 bits of mantissa
    assert out.shape == reference.shape and float((out - reference).abs().max()) < tolerance


def test_cuda_engines_become_error_rows_without_a_gpu(tmp_path: Path, monkeypatch, capsys) -> None:
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the CUDA rows are measured, not reported as errors")
    bundle = write_tiny_bundle(REPO / "bundle", tmp_path / "bundle")
    monkeypatch.setattr(forward, "ENGINES", ("torch eager",))
    monkeypatch.setattr(prostate_jrs.timing, "run_forked", lambda fn, *args: _errors_as_child(fn, *args))
    rows = forward.engines_table(str(bundle), (48, 48, 48), 1, 1, cuda=True)
    assert [row["engine"] for row in rows] == ["torch eager", *forward.CUDA_ENGINES]
    assert "error" not in rows[0] and rows[0]["max_abs_diff"] == 0.0
    assert all("error" in row for row in rows[1:])
    table = capsys.readouterr().out
    assert "| torch cuda | error:" in table and "| torch cuda amp | error:" in table


def _errors_as_child(fn: Callable[..., Any], *args: Any) -> Any:
    """``run_forked``'s contract without the fork: a failure comes back as :class:`ChildProcessError`."""
    try:
        return fn(*args)
    except Exception as err:  # a child reports any failure as ChildProcessError
        raise ChildProcessError(f"{type(err).__name__}: {err}") from err
