"""Network backends: the bundle's torch network as it is, or exported to ONNX and run by an engine made for CPUs.

A backend runs the network on tiles: ``(n, 3, *tile)`` float32 in, ``(n, 8, *(tile - 40))`` out, like the torch
module. :func:`inference_network` returns that callable for a backend name (the bundle's ``backend`` setting):

* ``torch``: the module itself (the GPU path, and the reference).
* ``openvino``: the network exported to ONNX (:func:`export_onnx`) and compiled by OpenVINO for each tile shape,
  in float32 (never the bfloat16 some CPUs would default to).
* ``onnxruntime``: the same ONNX file in ONNX Runtime's CPU provider.
* ``auto``: torch on CUDA; on CPU OpenVINO where it is installed, else ONNX Runtime, else torch. On two cores OpenVINO
  ran the shipped network 2x faster than ONNX Runtime and 4x faster than torch eager (``benchmarks/forward.py``).

The export goes through MONAI's :func:`monai.networks.utils.convert_to_onnx` (what ``python -m monai.bundle
onnx_export`` calls; the bundle's ``configs/onnx_export.json`` holds the same arguments) with dynamic batch and spatial
axes, so one file serves every tile shape. An ONNX file is used only for the weights it was made from: the sha256 of
the network's state (:func:`weights_digest`) is recorded in the file's metadata; a file without it (e.g. written by
``monai.bundle onnx_export``) is checked once against torch on a small tile and the digest is recorded then. A file that
does not fit is exported anew: into the bundle's ``models/`` when writable, else into a cache folder
(``$PROSTATE_JRS_CACHE``, default ``~/.cache/prostate-jrs``).
"""

from __future__ import annotations

import copy
import hashlib
import logging
import os
import tempfile
import weakref
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = [
    "BACKENDS",
    "ONNX_EXPORT_KWARGS",
    "EngineNetwork",
    "export_onnx",
    "inference_network",
    "onnx_file_for",
    "resolve_backend",
    "weights_digest",
]

logger = logging.getLogger(__name__)

#: Backend names of the bundle's ``backend`` setting.
BACKENDS: tuple[str, ...] = ("auto", "torch", "openvino", "onnxruntime")
#: Arguments of :func:`monai.networks.utils.convert_to_onnx` besides model, inputs and file (the bundle's
#: ``configs/onnx_export.json`` has the same): one graph for any batch and tile shape; the TorchScript-based exporter
#: (``dynamo=False``) exports this network in 6 s, the dynamo one took 45 s.
ONNX_EXPORT_KWARGS: dict[str, Any] = {
    "input_names": ["image"],
    "output_names": ["pred"],
    "dynamic_axes": {"image": [0, 2, 3, 4], "pred": [0, 2, 3, 4]},
    "opset_version": 17,
    "use_trace": True,
    "dynamo": False,
}
#: Tile (input voxels per axis) on which an ONNX file is checked against torch: small, and not cubic, so that a file
#: with swapped axes fails.
CHECK_TILE: tuple[int, int, int] = (48, 52, 56)
#: Largest difference allowed between an engine's and torch's outputs on :data:`CHECK_TILE`.
TOLERANCE = 1e-4
_DIGEST_KEY = "prostate_jrs.weights_sha256"
_SHAPES_KEPT = 4  # compiled tile shapes an OpenVINO engine keeps (the pipeline uses one or two)


def resolve_backend(backend: str, device: str | torch.device = "cpu") -> str:
    """The backend that runs: ``auto`` resolved for ``device``, the others checked.

    Raises:
        ValueError: on an unknown name, or an ONNX engine asked for on a non-CPU device.
        ImportError: if the named engine is not installed (the message names the pip package).
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown network backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    kind = torch.device(device).type
    if backend == "torch" or (backend == "auto" and kind != "cpu"):
        return "torch"
    if kind != "cpu":
        raise ValueError(f"backend {backend!r} runs on the CPU; the network is on {device} (use 'torch' or 'auto')")
    if backend == "auto":
        return next((name for name in ("openvino", "onnxruntime") if _importable(name)), "torch")
    if not _importable(backend):
        raise ImportError(f"backend {backend!r} needs the pip package {backend} (pip install 'prostate-jrs[cpu]')")
    return backend


def _importable(module: str) -> bool:
    try:
        __import__(module)
        __import__("onnx")  # the export needs it whatever the engine
    except ImportError:
        return False
    return True


def weights_digest(network: nn.Module) -> str:
    """sha256 (hex) of the network's class and state (names, shapes, dtypes and values of weights and buffers).

    It identifies an export only for networks whose output depends on nothing but their class and state dict, as
    the bundle's networks do; a module computing with other attributes must run on the ``torch`` backend.
    """
    digest = hashlib.sha256(f"{type(network).__module__}.{type(network).__qualname__}".encode())
    for name, tensor in network.state_dict().items():
        value = tensor.detach().cpu().contiguous()
        digest.update(f"{name}{tuple(value.shape)}{value.dtype}".encode())
        digest.update(value.numpy().tobytes() if value.dtype != torch.bfloat16 else value.float().numpy().tobytes())
    return digest.hexdigest()


def _cache_dir() -> Path:
    return Path(os.environ.get("PROSTATE_JRS_CACHE") or Path.home() / ".cache" / "prostate-jrs") / "onnx"


def export_onnx(network: nn.Module, path: str | os.PathLike[str]) -> Path:
    """Export ``network`` to ONNX at ``path`` (written completely or not at all) with its weights' digest recorded.

    Args:
        network: the torch network (any device; it is exported from a CPU copy of its state).
        path: the ONNX file to write.

    Returns:
        ``path``.
    """
    import onnx
    from monai.networks.utils import convert_to_onnx

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = copy.deepcopy(network).cpu().eval()
    example = torch.zeros(1, 3, *CHECK_TILE)
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        # a deep copy: torch's exporter rewrites dynamic_axes in place (lists become named dicts)
        exported = convert_to_onnx(model, [example], filename=tmp, **copy.deepcopy(ONNX_EXPORT_KWARGS))
        _record_digest(exported, weights_digest(network))
        onnx.save(exported, tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the export is no secret
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path


def _record_digest(model: Any, digest: str) -> None:
    entries = [entry for entry in model.metadata_props if entry.key != _DIGEST_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(entries)
    entry = model.metadata_props.add()
    entry.key, entry.value = _DIGEST_KEY, digest


def _recorded_digest(path: Path) -> str | None:
    import onnx

    model = onnx.load(str(path))
    return next((entry.value for entry in model.metadata_props if entry.key == _DIGEST_KEY), None)


def _agrees_with_torch(network: nn.Module, engine: EngineNetwork) -> float:
    """Largest difference between ``engine`` and ``network`` on a random :data:`CHECK_TILE` tile."""
    generator = torch.Generator().manual_seed(0)
    tile = torch.rand(1, 3, *CHECK_TILE, generator=generator) * 2 - 1
    tile[:, 2] = torch.randint(0, 5, (1, *CHECK_TILE), generator=generator).float()
    device = next(network.parameters()).device
    with torch.inference_mode():
        expected = network.eval()(tile.to(device)).float().cpu()
    return float((engine(tile) - expected).abs().max())


def onnx_file_for(network: nn.Module, backend: str, onnx_file: str | os.PathLike[str] | None = None) -> Path:
    """An ONNX file of ``network``'s current weights: ``onnx_file`` if it holds them, else a fresh export.

    Args:
        network: the torch network.
        backend: the engine that checks a file without a recorded digest (``openvino`` or ``onnxruntime``).
        onnx_file: where the bundle keeps its export (``models/model.onnx``); ``None`` for the cache folder only.

    Returns:
        The path of a file whose recorded digest is ``weights_digest(network)``.
    """
    digest = weights_digest(network)
    cached = _cache_dir() / f"{digest[:32]}.onnx"
    candidates = [Path(onnx_file)] if onnx_file is not None else []
    for path in [*candidates, cached]:
        if not path.is_file():
            continue
        recorded = _recorded_digest(path)
        if recorded == digest:
            return path
        if recorded is None and _agrees_with_torch(network, EngineNetwork(path, backend)) <= TOLERANCE:
            return _adopt(path, digest, cached)
    for path in [*candidates, cached]:
        try:
            logger.info("exporting the network to ONNX (once per weights): %s", path)
            return export_onnx(network, path)
        except OSError as err:  # a read-only bundle: the cache folder next
            logger.info("cannot write %s (%s)", path, err)
    raise OSError(f"cannot write the ONNX export of the network to {onnx_file} nor to {cached}")


def _adopt(path: Path, digest: str, cached: Path) -> Path:
    """Record ``digest`` in a checked file that lacks it (in place, or as a copy in the cache folder)."""
    import onnx

    model = onnx.load(str(path))
    _record_digest(model, digest)
    for target in (path, cached):
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.tmp")
            onnx.save(model, str(tmp))
            os.replace(tmp, target)
            return target
        except OSError:
            continue
    return path  # checked, but the digest could not be written anywhere: it is checked again next time


class EngineNetwork:
    """The exported network in OpenVINO or ONNX Runtime, called like the torch module on CPU tensors.

    Threads follow ``torch.get_num_threads()`` at construction, so one thread setting governs every backend.

    Args:
        onnx_file: the exported network (:func:`export_onnx`).
        backend: ``openvino`` or ``onnxruntime``.
    """

    def __init__(self, onnx_file: str | os.PathLike[str], backend: str) -> None:
        if backend not in ("openvino", "onnxruntime"):
            raise ValueError(f"EngineNetwork runs 'openvino' or 'onnxruntime', not {backend!r}")
        self.backend = backend
        self.onnx_file = Path(onnx_file)
        self.threads = torch.get_num_threads()
        self._compiled: OrderedDict[tuple[int, ...], Any] = OrderedDict()
        if backend == "onnxruntime":
            import onnxruntime

            options = onnxruntime.SessionOptions()
            options.intra_op_num_threads = self.threads
            options.inter_op_num_threads = 1
            self._session = onnxruntime.InferenceSession(
                str(self.onnx_file), options, providers=["CPUExecutionProvider"]
            )
        else:
            import openvino

            self._core = openvino.Core()
            self._model = self._core.read_model(str(self.onnx_file))

    def eval(self) -> EngineNetwork:
        """No-op (an engine has no training mode); lets callers treat it like a module."""
        return self

    def _compiled_for(self, shape: tuple[int, ...]) -> Any:
        """The network compiled by OpenVINO for one input shape (static shapes: less memory than dynamic ones)."""
        if shape not in self._compiled:
            import openvino

            model = self._model.clone()
            model.reshape({model.input(0): openvino.PartialShape(list(shape))})
            config = {"INFERENCE_NUM_THREADS": self.threads, "INFERENCE_PRECISION_HINT": "f32"}
            self._compiled[shape] = self._core.compile_model(model, "CPU", config)
            while len(self._compiled) > _SHAPES_KEPT:
                self._compiled.popitem(last=False)
        self._compiled.move_to_end(shape)
        return self._compiled[shape]

    def __call__(self, tiles: torch.Tensor) -> torch.Tensor:
        """``(n, 3, *tile)`` -> ``(n, 8, *(tile - 40))`` float32 on the CPU."""
        array = np.ascontiguousarray(tiles.detach().to("cpu", torch.float32).numpy())
        if self.backend == "onnxruntime":
            return torch.from_numpy(self._session.run(None, {"image": array})[0])
        request = self._compiled_for(array.shape).create_infer_request()
        out = np.array(request.infer({0: array})[0], copy=True)  # the request reuses its output buffer
        return torch.from_numpy(out)

    def release(self) -> None:
        """Free the compiled models (OpenVINO keeps ~0.2 GB of buffers per million tile voxels in each), e.g. when a
        volume is done; the next call compiles again (about a second)."""
        self._compiled.clear()


_ENGINES: weakref.WeakKeyDictionary[nn.Module, dict[tuple[str, int, str], EngineNetwork]] = weakref.WeakKeyDictionary()


def inference_network(
    network: nn.Module,
    backend: str = "auto",
    device: str | torch.device = "cpu",
    onnx_file: str | os.PathLike[str] | None = None,
) -> Callable[[torch.Tensor], torch.Tensor]:
    """What runs ``network``'s tiles for ``backend``: the module itself, or its engine (built once per weights).

    Args:
        network: the torch network with its weights loaded.
        backend: one of :data:`BACKENDS`.
        device: the device the tiles run on.
        onnx_file: where the bundle keeps the network's ONNX export (see :func:`onnx_file_for`).

    Returns:
        A callable mapping ``(n, 3, *tile)`` to ``(n, 8, *(tile - 40))``.
    """
    name = resolve_backend(backend, device)
    if name == "torch":
        return network
    engines = _ENGINES.setdefault(network, {})
    key = (name, torch.get_num_threads(), weights_digest(network))
    if key not in engines:
        engines.clear()  # other weights or threads: the old engines are stale
        engines[key] = EngineNetwork(onnx_file_for(network, name, onnx_file), name)
    return engines[key]
