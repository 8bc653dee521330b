"""The six networks of the paper and their shared valid-convolution U-Net blocks.

The networks: docs/ARCHITECTURE.md, "Network architecture".

``build_network(name, widths=None, **options)`` returns a module mapping ``image`` (B, 3, D, H, W) = (daily CT,
planning CT, planning label map) to ``pred`` (B, 8, D - 40, H - 40, W - 40) = 3 DDF channels + 5 logits;
``network.forward_multiscale(image)`` gives the 56^3/30^3/17^3 outputs (for a 96^3 patch) that
:class:`prostate_jrs.losses.JRSLoss` trains on, and :class:`prostate_jrs.inferers.ValidPatchInferer` runs any
of them over a whole volume. Architecture after the authors' TF@ad938ce models, parameter counts identical to
theirs (docs/ARCHITECTURE.md, "Parameter counts (TF@ad938ce)").
"""

from __future__ import annotations

from prostate_jrs.nets.base import INPUT_CHANNELS, NUM_CLASSES, NUM_DDF_CHANNELS, JRSNetwork, resolve_inputs
from prostate_jrs.nets.blocks import BORDERS, STRIDES, MultiScaleHead, ValidUNet, output_sizes
from prostate_jrs.nets.cross_stitch import CrossStitchNet, CrossStitchUnit
from prostate_jrs.nets.factory import DEFAULT_WIDTHS, NETWORKS, build_network, count_parameters
from prostate_jrs.nets.sedd import SEDDNet
from prostate_jrs.nets.single import DenseJRSNet, RegNet, SegNet
from prostate_jrs.nets.warp import crop_and_decimate, labels_to_onehot, warp_patch

__all__ = [
    "BORDERS",
    "DEFAULT_WIDTHS",
    "INPUT_CHANNELS",
    "NETWORKS",
    "NUM_CLASSES",
    "NUM_DDF_CHANNELS",
    "STRIDES",
    "CrossStitchNet",
    "CrossStitchUnit",
    "DenseJRSNet",
    "JRSNetwork",
    "MultiScaleHead",
    "RegNet",
    "SEDDNet",
    "SegNet",
    "ValidUNet",
    "build_network",
    "count_parameters",
    "crop_and_decimate",
    "labels_to_onehot",
    "output_sizes",
    "resolve_inputs",
    "warp_patch",
]
