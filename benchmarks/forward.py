"""Speed and memory of the six networks at paper widths, and whole-volume inference time.

Prints, per network (96^3 patch, batch 1 by default): forward time, forward+backward time and peak memory,
on CPU and, when available, on CUDA; then the time of :class:`prostate_jrs.inferers.ValidPatchInferer` on a
clinical-size pelvis crop at 1 mm. Times are the median of ``--repeats`` runs after one warm-up; ratios are
against ``seg`` measured in the same run.

CPU peak memory is the growth of the process's peak RSS (``ru_maxrss``) during the measurement, taken in a
forked child per network so one network's peak cannot hide another's; CUDA peak memory is
``torch.cuda.max_memory_allocated``.

``--engines``: instead, the bundle's network (``--bundle``, trained weights) on one tile (``--tile``, default
124 x 144 x 108: a tile of the 512 x 512 x 122 fraction's fitted layout) with every way to run it: torch eager (with
``--threads`` and with one thread), torch channels-last, torch bfloat16 autocast, ``torch.compile``, ONNX Runtime
and OpenVINO (:mod:`prostate_jrs.backends`), and on CUDA torch with and without AMP. Each in a forked child: median
seconds of ``--repeats`` runs after a warm-up, the set-up (export, compile) seconds, peak memory, and the largest
difference from torch eager float32 on the same input.

Usage::

    python benchmarks/forward.py [--networks seg cross_stitch] [--device cpu cuda] [--threads 2]
                                 [--volume 176 144 112] [--inference-networks cross_stitch] [--out DIR]
    python benchmarks/forward.py --engines [--bundle bundle] [--tile 124 144 108] [--threads 2] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from prostate_jrs.inferers import ValidPatchInferer
from prostate_jrs.nets import NETWORKS, build_network, count_parameters


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], Any], device: torch.device, repeats: int) -> float:
    fn()  # warm-up (allocator, cuDNN autotuning, lazy inits)
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _image(batch: int, size: int, device: torch.device) -> torch.Tensor:
    image = torch.randn(batch, 3, size, size, size, device=device)
    image[:, 2] = torch.randint(0, 5, (batch, size, size, size), device=device).float()
    return image


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def measure_network(name: str, device_name: str, batch: int, size: int, repeats: int, threads: int) -> dict:
    """Forward and forward+backward time and peak memory of one network (runs in the calling process)."""
    torch.set_num_threads(threads)
    device = torch.device(device_name)
    net = build_network(name).to(device)
    image = _image(batch, size, device)
    result: dict[str, Any] = {"network": name, "device": device_name, "params": count_parameters(net)}

    def forward() -> None:
        with torch.no_grad():
            net.eval()(image)

    def forward_backward() -> None:
        net.train()
        outputs = net.forward_multiscale(image)
        loss = sum(t.float().square().mean() for ts in outputs.values() for t in ts)
        loss.backward()
        net.zero_grad(set_to_none=True)

    for key, fn in (("forward", forward), ("forward_backward", forward_backward)):
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
        else:
            base = _rss_mib()
        result[f"{key}_s"] = _timed(fn, device, repeats)
        if device.type == "cuda":
            result[f"{key}_peak_mib"] = (torch.cuda.max_memory_allocated(device) - base) / 2**20
        else:
            # ru_maxrss only grows: forward runs first, and forward+backward needs more than forward
            result[f"{key}_peak_mib"] = _rss_mib() - base
    return result


def _child(queue: Any, args: tuple) -> None:
    try:
        queue.put(measure_network(*args))
    except Exception as err:  # report, do not hang the parent
        queue.put({"network": args[0], "device": args[1], "error": repr(err)})


def measure_isolated(name: str, device_name: str, batch: int, size: int, repeats: int, threads: int) -> dict:
    """:func:`measure_network` in a forked child on CPU (clean peak RSS); in-process on CUDA."""
    if device_name != "cpu":
        return measure_network(name, device_name, batch, size, repeats, threads)
    ctx = mp.get_context("fork")  # the parent has run no torch op yet, so forking is safe
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(queue, (name, device_name, batch, size, repeats, threads)))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def measure_inference(name: str, device_name: str, volume: tuple[int, int, int], tile_batch: int, amp: bool) -> dict:
    """Whole-volume inference time (one run after a one-tile warm-up) with :class:`ValidPatchInferer`."""
    device = torch.device(device_name)
    net = build_network(name).to(device).eval()
    image = torch.randn(1, 3, *volume)
    image[:, 2] = torch.randint(0, 5, (1, *volume)).float()
    inferer = ValidPatchInferer(96, 56, tile_batch_size=tile_batch, amp=amp, sw_device=device, device="cpu")
    with torch.no_grad():
        inferer(image[:, :, :56, :56, :56], net)  # warm-up: one tile
        _sync(device)
        start = time.perf_counter()
        inferer(image, net)
        _sync(device)
        seconds = time.perf_counter() - start
    tiles = 1
    for n in volume:
        tiles *= -(-n // 56)
    return {"network": name, "device": device_name, "amp": amp, "tiles": tiles, "seconds": seconds}


ENGINES: tuple[str, ...] = (
    "torch eager",
    "torch eager, 1 thread",
    "torch channels-last",
    "torch bfloat16",
    "torch.compile",
    "onnxruntime",
    "openvino",
)
CUDA_ENGINES: tuple[str, ...] = ("torch cuda", "torch cuda amp")


def _engine(name: str, network: torch.nn.Module, tile: torch.Tensor, onnx_file: Path) -> Callable[[], torch.Tensor]:
    """A no-argument callable running ``network`` on ``tile`` the way ``name`` says (set-up done here)."""
    from prostate_jrs.backends import EngineNetwork, onnx_file_for

    if name in ("onnxruntime", "openvino"):
        engine = EngineNetwork(onnx_file_for(network, name, onnx_file), name)
        return lambda: engine(tile)
    if name == "torch channels-last":
        network = network.to(memory_format=torch.channels_last_3d)
        tile = tile.contiguous(memory_format=torch.channels_last_3d)
    if name == "torch.compile":
        network = torch.compile(network)
    device = "cuda" if name.startswith("torch cuda") else "cpu"
    network, tile = network.to(device), tile.to(device)
    dtype = torch.bfloat16 if name == "torch bfloat16" else torch.float16
    autocast = name in ("torch bfloat16", "torch cuda amp")

    def run() -> torch.Tensor:
        with torch.inference_mode(), torch.autocast(device, dtype=dtype, enabled=autocast):
            out = network(tile)
        _sync(torch.device(device))
        return out.float().cpu()

    return run


def measure_engine(name: str, bundle: str, tile_size: tuple[int, int, int], threads: int, repeats: int) -> dict:
    """One way of running the bundle's network on one tile (runs in the calling process; fork it)."""
    import tempfile

    from prostate_jrs.pipeline import load_bundle

    torch.set_num_threads(1 if name.endswith("1 thread") else threads)
    network, _ = load_bundle(bundle)
    generator = torch.Generator().manual_seed(0)
    tile = torch.rand(1, 3, *tile_size, generator=generator) * 2 - 1
    tile[:, 2] = torch.randint(0, 5, (1, *tile_size), generator=generator).float()
    with torch.inference_mode():
        reference = network(tile)
    base = _rss_mib()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        run = _engine(name, network, tile, Path(folder) / "model.onnx")
        setup = time.perf_counter() - start
        out = run()  # warm-up (and compilation where it is lazy)
        first = time.perf_counter() - start - setup
        times = []
        for _ in range(repeats):
            clock = time.perf_counter()
            run()
            times.append(time.perf_counter() - clock)
    return {
        "engine": name,
        "seconds": statistics.median(times),
        "setup_s": setup,
        "first_call_s": first,
        "peak_mib": _rss_mib() - base,
        "max_abs_diff": float((out - reference).abs().max()),
        "threads": torch.get_num_threads(),
    }


def engines_table(bundle: str, tile: tuple[int, int, int], threads: int, repeats: int, cuda: bool) -> list[dict]:
    """:func:`measure_engine` for every engine (:data:`ENGINES`, plus :data:`CUDA_ENGINES` with ``cuda``)."""
    from prostate_jrs.timing import run_forked

    rows = []
    for name in ENGINES + (CUDA_ENGINES if cuda else ()):
        try:
            rows.append(run_forked(measure_engine, name, bundle, tile, threads, repeats))
        except ChildProcessError as err:
            rows.append({"engine": name, "error": str(err).strip().splitlines()[-1]})
        print(f"  measured {name}", file=sys.stderr, flush=True)
    base = next((r["seconds"] for r in rows if r["engine"] == "torch eager" and "error" not in r), None)
    print(f"bundle {bundle}, tile {tile}, {threads} threads, median of {repeats}")
    print("| engine | threads | seconds | x torch eager | set-up s | first call s | peak MiB | max abs diff |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        if "error" in row:
            print(f"| {row['engine']} | error: {row['error']} |")
            continue
        ratio = f"{base / row['seconds']:.2f}" if base else "-"
        print(
            f"| {row['engine']} | {row['threads']} | {row['seconds']:.2f} | {ratio} | {row['setup_s']:.1f} | "
            f"{row['first_call_s']:.1f} | {row['peak_mib']:.0f} | {row['max_abs_diff']:.1e} |"
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--networks", nargs="+", default=list(NETWORKS), choices=list(NETWORKS))
    parser.add_argument("--device", nargs="+", default=None, help="default: cpu, plus cuda when available")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--size", type=int, default=96, help="patch size per axis")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="CPU threads")
    parser.add_argument("--volume", type=int, nargs=3, default=(176, 144, 112), help="pelvis crop, voxels at 1 mm")
    parser.add_argument("--inference-networks", nargs="*", default=["cross_stitch"], choices=list(NETWORKS))
    parser.add_argument("--tile-batch", type=int, default=None, help="tiles per call (default: 2 CPU, 8 CUDA)")
    parser.add_argument("--out", type=Path, default=None, help="write results.json (and forward.png) here")
    parser.add_argument("--engines", action="store_true", help="compare the ways to run the bundle's network")
    parser.add_argument("--bundle", default=str(Path(__file__).resolve().parents[1] / "bundle"), help="for --engines")
    parser.add_argument("--tile", type=int, nargs=3, default=(124, 144, 108), help="tile of --engines (input voxels)")
    args = parser.parse_args(argv)
    if args.engines:
        cuda = torch.backends.cuda.is_built() and _cuda_in_child()
        rows = engines_table(args.bundle, tuple(args.tile), args.threads, args.repeats, cuda)
        if args.out is not None:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "engines.json").write_text(json.dumps({"tile": args.tile, "engines": rows}, indent=2))
        return 0
    devices = args.device or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    # CPU first: its measurements fork, which must happen before this process initialises CUDA
    devices = sorted(devices, key=lambda d: d != "cpu")

    rows = []
    for device_name in devices:
        for name in args.networks:
            row = measure_isolated(name, device_name, args.batch, args.size, args.repeats, args.threads)
            rows.append(row)
            print(f"  measured {name} on {device_name}", file=sys.stderr, flush=True)
    torch.set_num_threads(args.threads)
    inference = []
    for device_name in devices:
        tile_batch = args.tile_batch or (8 if device_name.startswith("cuda") else 2)
        for name in args.inference_networks:
            for amp in [False, True] if device_name.startswith("cuda") else [False]:
                inference.append(measure_inference(name, device_name, tuple(args.volume), tile_batch, amp))
                print(f"  inferred {name} on {device_name} amp={amp}", file=sys.stderr, flush=True)

    print(f"torch {torch.__version__}, threads {args.threads}, patch {args.size}^3, batch {args.batch}")
    print("| network | device | params | forward s | x seg | fwd+bwd s | x seg | fwd peak MiB | fwd+bwd peak MiB |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        if "error" in row:
            print(f"| {row['network']} | {row['device']} | error: {row['error']} |")
            continue
        base = next(
            (r for r in rows if r["network"] == "seg" and r["device"] == row["device"] and "error" not in r), row
        )
        print(
            f"| {row['network']} | {row['device']} | {row['params']:,} | {row['forward_s']:.3f} | "
            f"{row['forward_s'] / base['forward_s']:.2f} | {row['forward_backward_s']:.3f} | "
            f"{row['forward_backward_s'] / base['forward_backward_s']:.2f} | {row['forward_peak_mib']:.0f} | "
            f"{row['forward_backward_peak_mib']:.0f} |"
        )
    if inference:
        print(f"\nwhole-volume inference, volume {tuple(args.volume)} (1 mm), patch 96^3 -> 56^3")
        print("| network | device | amp | tiles | seconds | s/tile |")
        print("|---|---|---|---:|---:|---:|")
        for row in inference:
            print(
                f"| {row['network']} | {row['device']} | {row['amp']} | {row['tiles']} | {row['seconds']:.1f} | "
                f"{row['seconds'] / row['tiles']:.2f} |"
            )
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(json.dumps({"networks": rows, "inference": inference}, indent=2))
        _plot(rows, args.out / "forward.png")
    return 0


def _cuda_in_child() -> bool:
    """Whether CUDA works, asked in a child: initialised here, it would be lost to the forked measurements."""
    from prostate_jrs.timing import run_forked

    return bool(run_forked(torch.cuda.is_available))


def _plot(rows: list[dict], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    ok = [r for r in rows if "error" not in r]
    labels = [f"{r['network']}\n{r['device']}" for r in ok]
    fig, ax = plt.subplots(figsize=(max(6, len(ok)), 4))
    x = range(len(ok))
    ax.bar([i - 0.2 for i in x], [r["forward_s"] for r in ok], width=0.4, label="forward")
    ax.bar([i + 0.2 for i in x], [r["forward_backward_s"] for r in ok], width=0.4, label="forward+backward")
    ax.set_xticks(list(x), labels, fontsize=7)
    ax.set_ylabel("seconds (96^3 patch)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
