"""Whole-volume inference for valid-convolution networks, and label warping with the stitched DDF.

A valid-convolution network maps a ``patch`` tile to its central ``output`` region (96^3 -> 56^3). The
inferer pads the volume, tiles it with stride equal to the output size, and writes each tile's output into
its own place: every output voxel comes from exactly one tile, so there is nothing to blend and no seam
handling. MONAI's ``SlidingWindowInferer`` assumes same-size outputs and blends overlaps, so this tiler is
hand-written. Padding: each channel is padded with its own minimum per sample, i.e. air for the CT channels
(as the authors pad with the image minimum) and 0 = background for the planning label map.

The DDF in the stitched ``pred`` is defined on the whole (unpadded) volume in its voxel units, so the planning
labels are warped **once**, with :func:`warp_planning_labels` (MONAI ``Warp``), not per tile.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from monai.data import MetaTensor
from monai.inferers import Inferer
from monai.networks.blocks import Warp
from torch import nn

from prostate_jrs.backends import inference_network
from prostate_jrs.labels import NUM_CLASSES
from prostate_jrs.nets.warp import labels_to_onehot
from prostate_jrs.refine import RefineReport, refine_prediction, refine_settings

__all__ = ["RefiningInferer", "ValidPatchInferer", "warp_labels", "warp_planning_labels"]


def _triple(value: int | Sequence[int], name: str) -> tuple[int, int, int]:
    values = (int(value),) * 3 if isinstance(value, int) else tuple(int(v) for v in value)
    if len(values) != 3 or min(values) < 1:
        raise ValueError(f"{name} must be a positive int or three positive ints, got {value!r}")
    return values


class ValidPatchInferer(Inferer):
    """Tile-exact whole-volume inferer for networks whose output is the centre of their input tile.

    Usable as a MONAI bundle ``inferer``: ``inferer(inputs, network)``.

    Args:
        patch_size: network input tile (per axis or one int), e.g. 96.
        output_size: network output for that tile, e.g. 56; ``None`` for ``patch_size - 40`` (the JRS U-Nets).
        tile_batch_size: tiles per network call.
        amp: run the network under ``torch.autocast`` when it runs on CUDA (ignored on CPU); outputs are float32.
        amp_dtype: autocast dtype.
        sw_device: device the network runs on; ``None`` for the device of ``inputs``.
        device: device of the stitched output; ``None`` for the device of ``inputs``.
        includes_context: the inputs already carry ``(patch_size - output_size) / 2`` voxels of real context on
            every side (e.g. a crop grown by the network's border), and the output covers the region inside it.
            Without it the inferer pads that border with the channel minimum, which the network never saw in
            training around anatomy: its DDF near the volume's faces is then unreliable.
        max_tile_voxels: fit the tiles to each volume instead of using ``patch_size``: per axis as few tiles as
            cover the volume, of equal size (output a multiple of ``tile_multiple``), with at most this many input
            voxels per tile; among such layouts the one with the fewest voxels computed. ``None``: ``patch_size``
            tiles. Fitted tiles compute less padding: a 84 x 104 x 130 grid takes two tiles of 124 x 144 x 108
            (3.9 M voxels) under 2 M voxels, instead of eight 112^3 tiles (11.2 M).
        tile_multiple: fitted outputs are multiples of this (4 for the JRS U-Nets: two stride-2 levels). Tiles start
            at multiples of their output size, so every tile sees the same stride phase.
        backend: what runs the tiles (:func:`prostate_jrs.backends.inference_network`): ``torch``, ``openvino``,
            ``onnxruntime`` or ``auto``.
        onnx_file: where the bundle keeps the network's ONNX export (ONNX backends; see
            :func:`prostate_jrs.backends.onnx_file_for`); ``None`` for the cache folder.

    Raises:
        ValueError: if ``patch_size - output_size`` is negative or odd on some axis, or a setting is out of range.
    """

    def __init__(
        self,
        patch_size: int | Sequence[int] = 96,
        output_size: int | Sequence[int] | None = 56,
        tile_batch_size: int = 4,
        amp: bool = False,
        amp_dtype: torch.dtype = torch.float16,
        sw_device: torch.device | str | None = None,
        device: torch.device | str | None = None,
        includes_context: bool = False,
        max_tile_voxels: int | None = None,
        tile_multiple: int = 4,
        backend: str = "torch",
        onnx_file: str | None = None,
    ) -> None:
        super().__init__()
        self.includes_context = bool(includes_context)
        if max_tile_voxels is not None and max_tile_voxels < 1:
            raise ValueError(f"max_tile_voxels must be positive or None, got {max_tile_voxels}")
        if tile_multiple < 1:
            raise ValueError(f"tile_multiple must be >= 1, got {tile_multiple}")
        self.max_tile_voxels = None if max_tile_voxels is None else int(max_tile_voxels)
        self.tile_multiple = int(tile_multiple)
        self.backend = str(backend)
        self.onnx_file = None if onnx_file is None else str(onnx_file)
        self.patch_size = _triple(patch_size, "patch_size")
        self.output_size = (
            tuple(p - 40 for p in self.patch_size) if output_size is None else _triple(output_size, "output_size")
        )
        diff = [p - o for p, o in zip(self.patch_size, self.output_size, strict=True)]
        if min(diff) < 0 or any(d % 2 for d in diff):
            raise ValueError(
                f"patch_size {self.patch_size} minus output_size {self.output_size} must be even and non-negative"
            )
        self.border = tuple(d // 2 for d in diff)
        if tile_batch_size < 1:
            raise ValueError(f"tile_batch_size must be >= 1, got {tile_batch_size}")
        self.tile_batch_size = int(tile_batch_size)
        self.amp = bool(amp)
        self.amp_dtype = amp_dtype
        self.sw_device = None if sw_device is None else torch.device(sw_device)
        self.device = None if device is None else torch.device(device)

    def tile_layout(self, spatial: Sequence[int]) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
        """Tiles per axis and the output size of one tile for an output region of ``spatial`` voxels.

        Raises:
            ValueError: if no fitted tile of at most ``max_tile_voxels`` input voxels exists.
        """
        if self.max_tile_voxels is None:
            counts = tuple(math.ceil(s / o) for s, o in zip(spatial, self.output_size, strict=True))
            return counts, self.output_size  # type: ignore[return-value]
        step = self.tile_multiple
        options = []
        for size in spatial:
            units = math.ceil(size / step)  # the axis in multiples of ``step``
            # per tile count n the output is the smallest multiple of ``step`` covering the axis in n tiles
            outputs = {math.ceil(units / n) * step for n in range(1, units + 1)}
            options.append([(math.ceil(size / o), o) for o in sorted(outputs)])
        best: tuple[int, tuple[int, int, int], tuple[int, int, int]] | None = None
        for (nx, ox), (ny, oy), (nz, oz) in itertools.product(*options):
            tile = (ox + 2 * self.border[0]) * (oy + 2 * self.border[1]) * (oz + 2 * self.border[2])
            if tile > self.max_tile_voxels:
                continue
            cost = nx * ny * nz * tile
            if best is None or cost < best[0]:
                best = (cost, (nx, ny, nz), (ox, oy, oz))
        if best is None:
            raise ValueError(
                f"max_tile_voxels={self.max_tile_voxels} is below the smallest tile ({self.border} context voxels "
                f"per side around {step} output voxels per axis)"
            )
        return best[1], best[2]

    def __call__(
        self, inputs: torch.Tensor, network: Callable[..., torch.Tensor], *args: Any, **kwargs: Any
    ) -> torch.Tensor:
        """Run ``network`` over the whole volume.

        Args:
            inputs: volume batch (B, C, X, Y, Z), any spatial size (with ``includes_context``: larger than twice
                the border on every axis).
            network: callable mapping (n, C, *patch_size) to (n, C_out, *output_size).
            args: passed to ``network`` after the tile batch.
            kwargs: passed to ``network``.

        Returns:
            Stitched output (B, C_out, X, Y, Z), float32, on ``device`` (with ``includes_context``: the inner region,
            X - 2 border, ...); a ``MetaTensor`` carrying the input's metadata when ``inputs`` is one and the grid is
            the same.

        Raises:
            ValueError: if ``inputs`` is not 5-D, is too small for its context, or the network's output is not of
                ``output_size``.
        """
        if inputs.dim() != 5:
            raise ValueError(f"expected inputs (B, C, X, Y, Z), got shape {tuple(inputs.shape)}")
        source = inputs if isinstance(inputs, MetaTensor) else None
        if source is not None:
            inputs = source.as_tensor()  # tiles are plain crops; the metadata goes back onto the result
        spatial, offset = self._output_region(tuple(inputs.shape[2:]))
        sw_device = self.sw_device or inputs.device
        tiles_per_axis, output_size = self.tile_layout(spatial)
        padded = self._padded(inputs, tiles_per_axis, output_size, offset)
        run = (
            inference_network(network, self.backend, sw_device, self.onnx_file)
            if isinstance(network, nn.Module)
            else network
        )
        result = self._stitched(
            padded, run, tiles_per_axis, output_size, sw_device, self.device or inputs.device, args, kwargs
        )
        if hasattr(run, "release"):  # an engine's buffers are not kept through what follows the network
            run.release()
        result = result[:, :, : spatial[0], : spatial[1], : spatial[2]]
        if source is not None and not self.includes_context:  # same grid: affine and history stay valid
            result = MetaTensor(result, meta=source.meta, applied_operations=list(source.applied_operations))
        return result

    def _output_region(self, spatial: tuple[int, ...]) -> tuple[list[int], tuple[int, ...]]:
        """The output's spatial size for inputs of ``spatial`` voxels, and where the inputs sit in the padded
        volume: at the origin when they carry their context, else one border in.

        Raises:
            ValueError: with ``includes_context``, if the inputs are not larger than their context border.
        """
        if not self.includes_context:
            return list(spatial), self.border
        if any(s <= 2 * b for s, b in zip(spatial, self.border, strict=True)):
            raise ValueError(f"inputs {tuple(spatial)} are not larger than their context border {self.border}")
        return [s - 2 * b for s, b in zip(spatial, self.border, strict=True)], (0, 0, 0)

    def _padded(
        self,
        inputs: torch.Tensor,
        tiles_per_axis: tuple[int, int, int],
        output_size: tuple[int, int, int],
        offset: tuple[int, ...],
    ) -> torch.Tensor:
        """``inputs`` at ``offset`` in a volume the tiles cover exactly, filled with each sample's and channel's
        minimum: air for CT, background (0) for the label map."""
        batch, channels = inputs.shape[:2]
        padded_size = [n * o + 2 * b for n, o, b in zip(tiles_per_axis, output_size, self.border, strict=True)]
        fill = inputs.reshape(batch, channels, -1).amin(dim=2)
        padded = fill[:, :, None, None, None].expand(batch, channels, *padded_size).clone()
        bx, by, bz = offset
        sx, sy, sz = inputs.shape[2:]
        padded[:, :, bx : bx + sx, by : by + sy, bz : bz + sz] = inputs
        return padded

    def _stitched(
        self,
        padded: torch.Tensor,
        run: Callable[..., torch.Tensor],
        tiles_per_axis: tuple[int, int, int],
        output_size: tuple[int, int, int],
        sw_device: torch.device,
        out_device: torch.device,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> torch.Tensor:
        """Run the tiles of ``padded`` through ``run``, ``tile_batch_size`` at a time, and place their outputs.

        Raises:
            ValueError: if the network returns no tensor or not ``output_size`` per tile.
        """
        batch = padded.shape[0]
        origins = [
            (b, i * output_size[0], j * output_size[1], k * output_size[2])
            for b in range(batch)
            for i in range(tiles_per_axis[0])
            for j in range(tiles_per_axis[1])
            for k in range(tiles_per_axis[2])
        ]
        px, py, pz = (o + 2 * b for o, b in zip(output_size, self.border, strict=True))
        ox, oy, oz = output_size
        result: torch.Tensor | None = None
        use_amp = self.amp and sw_device.type == "cuda"
        for start in range(0, len(origins), self.tile_batch_size):
            chunk = origins[start : start + self.tile_batch_size]
            tiles = torch.stack([padded[b, :, x : x + px, y : y + py, z : z + pz] for b, x, y, z in chunk])
            with torch.autocast(device_type=sw_device.type, dtype=self.amp_dtype, enabled=use_amp):
                out = run(tiles.to(sw_device), *args, **kwargs)
            if not isinstance(out, torch.Tensor):
                raise ValueError(f"network must return a tensor, got {type(out).__name__}")
            if tuple(out.shape[2:]) != output_size or out.shape[0] != len(chunk):
                raise ValueError(
                    f"network output {tuple(out.shape)} for tiles {tuple(tiles.shape)} does not have spatial size "
                    f"output_size={output_size}; set patch_size/output_size to the network's"
                )
            out = torch.as_tensor(out).to(device=out_device, dtype=torch.float32)
            if result is None:
                full = [n * o for n, o in zip(tiles_per_axis, output_size, strict=True)]
                result = torch.zeros(batch, out.shape[1], *full, device=out_device, dtype=torch.float32)
            for (b, x, y, z), tile_out in zip(chunk, out, strict=True):
                result[b, :, x : x + ox, y : y + oy, z : z + oz] = tile_out
        assert result is not None  # at least one tile exists for a non-empty volume
        return result


class RefiningInferer(Inferer):
    """A base inferer followed by test-time refinement of each item's DDF (:mod:`prostate_jrs.refine`).

    The bundle's ``inferer`` in inference and evaluation: ``inferer(inputs, network)``. The refinement runs on the
    device of ``inputs`` (the evaluator's device). The last batch's network-only output stays in
    :attr:`network_pred` and the refinement reports in :attr:`reports`, so evaluation can score both.

    Args:
        inferer: the network's inferer (e.g. :class:`ValidPatchInferer` with ``includes_context``); its output may
            be smaller than its input by a context border, which the refinement uses.
        mode: ``off``, ``fast`` or ``accurate`` (:data:`prostate_jrs.refine.REFINE_MODES`).
        settings: overrides of the mode's :class:`prostate_jrs.refine.RefineSettings` fields.
    """

    def __init__(self, inferer: Inferer, mode: str | None = "accurate", settings: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.inferer = inferer
        self.settings = refine_settings(mode, settings)
        self.network_pred: torch.Tensor | None = None
        self.reports: list[RefineReport] = []

    def __call__(
        self, inputs: torch.Tensor, network: Callable[..., torch.Tensor], *args: Any, **kwargs: Any
    ) -> torch.Tensor:
        """Run the base inferer, then refine every item of the batch."""
        pred = self.inferer(inputs, network, *args, **kwargs)
        self.network_pred, self.reports = None, []
        if self.settings is None:
            return pred
        self.network_pred = torch.as_tensor(pred).detach().clone()
        plain = inputs.as_tensor() if isinstance(inputs, MetaTensor) else inputs
        refined = []
        for b in range(pred.shape[0]):
            item, report = refine_prediction(
                plain[b : b + 1], torch.as_tensor(pred[b : b + 1]).to(plain.device), self.settings
            )
            refined.append(item.to(pred.device))
            self.reports.append(report)
        out = torch.cat(refined)
        if isinstance(pred, MetaTensor):
            out = MetaTensor(out, meta=pred.meta, applied_operations=list(pred.applied_operations))
        return out


_WARPS: dict[str, Warp] = {}


def _warp(mode: str) -> Warp:
    if mode not in _WARPS:
        _WARPS[mode] = Warp(mode=mode, padding_mode="border")
    return _WARPS[mode]


def warp_labels(
    labels: torch.Tensor, ddf: torch.Tensor, mode: str = "nearest", num_classes: int = NUM_CLASSES
) -> torch.Tensor:
    """Warp a label map with a DDF on the same grid (MONAI ``Warp``).

    Args:
        labels: integer label map (B, 1, X, Y, Z), any dtype.
        ddf: (B, 3, X, Y, Z), voxel units, ``warped(x) = labels(x + ddf(x))``.
        mode: ``"nearest"`` (the paper's Reg path) or ``"trilinear"`` (one-hot warped trilinearly, then argmax).
        num_classes: number of labels, for ``"trilinear"``.

    Returns:
        Warped label map (B, 1, X, Y, Z), dtype of ``labels``.

    Raises:
        ValueError: on an unknown mode or mismatched shapes.
    """
    if labels.shape[0] != ddf.shape[0] or labels.shape[2:] != ddf.shape[2:] or labels.shape[1] != 1:
        raise ValueError(f"labels {tuple(labels.shape)} and ddf {tuple(ddf.shape)} must be (B, 1, *S) and (B, 3, *S)")
    ddf = torch.as_tensor(ddf).float()
    labels = torch.as_tensor(labels)
    if mode == "nearest":
        return _warp("nearest")(labels.float(), ddf).round().to(labels.dtype)
    if mode == "trilinear":
        prob = _warp("bilinear")(labels_to_onehot(labels, num_classes), ddf)
        return prob.argmax(dim=1, keepdim=True).to(labels.dtype)
    raise ValueError(f"unknown label warp mode {mode!r}; expected 'nearest' or 'trilinear'")


def warp_planning_labels(image: torch.Tensor, pred: torch.Tensor, mode: str = "nearest") -> torch.Tensor:
    """Planning label map (``image`` channel 2) warped once with the stitched DDF (``pred`` channels 0-2).

    Returns:
        (B, 1, X, Y, Z) label map on the daily grid, dtype of ``image``.
    """
    return warp_labels(image[:, 2:3], pred[:, 0:3], mode=mode)
