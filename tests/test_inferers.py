from __future__ import annotations

import pytest
import torch
from monai.inferers import Inferer

from prostate_jrs.inferers import ValidPatchInferer, warp_labels, warp_planning_labels
from prostate_jrs.nets import build_network


def _position_volume(batch: int, shape: tuple[int, int, int]) -> torch.Tensor:
    """Every voxel holds a unique code of (sample, channel, position); exact in float32."""
    grids = torch.meshgrid(*[torch.arange(n, dtype=torch.float32) for n in shape], indexing="ij")
    code = grids[0] * 10_000 + grids[1] * 100 + grids[2]
    return torch.stack(
        [torch.stack([code + 1_000_000 * (c + 1) + 5_000_000 * b for c in range(3)]) for b in range(batch)]
    )


class CentreNet(torch.nn.Module):
    """Position-dependent stand-in for a valid-convolution network: output = tile centre, in 8 channels."""

    def __init__(self, border: int = 20) -> None:
        super().__init__()
        self.border = border
        self.calls: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append(x.shape[0])
        b = self.border
        centre = x[:, :, b:-b, b:-b, b:-b]
        return torch.cat([centre, -centre, centre[:, :2] * 0.5], dim=1)


@pytest.mark.parametrize("tile_batch_size", [1, 3, 64])
def test_reconstructs_position_dependent_network_exactly_on_odd_volume(tile_batch_size: int) -> None:
    volume = _position_volume(2, (61, 57, 59))
    net = CentreNet()
    out = ValidPatchInferer(patch_size=96, output_size=56, tile_batch_size=tile_batch_size)(volume, net)
    expected = torch.cat([volume, -volume, volume[:, :2] * 0.5], dim=1)
    assert out.shape == (2, 8, 61, 57, 59)
    assert torch.equal(out, expected)
    assert sum(net.calls) == 2 * 2 * 2 * 2  # two tiles per axis, two samples
    assert max(net.calls) <= tile_batch_size


@pytest.mark.parametrize("shape", [(61, 57, 59), (41, 100, 77)])
def test_context_inputs_give_their_inner_region_from_real_context(shape: tuple[int, int, int]) -> None:
    volume = _position_volume(1, shape)
    seen: list[torch.Tensor] = []

    def net(x: torch.Tensor) -> torch.Tensor:
        seen.append(x.clone())
        return CentreNet()(x)

    out = ValidPatchInferer(patch_size=96, output_size=56, includes_context=True)(volume, net)
    inner = volume[:, :, 20:-20, 20:-20, 20:-20]
    assert out.shape == (1, 8, *inner.shape[2:])
    assert torch.equal(out[:, :3], inner)
    # the first tile starts on the input's own first voxel: real context, not padding
    assert torch.equal(seen[0][0, :, 0, 0, 0], volume[0, :, 0, 0, 0])
    with pytest.raises(ValueError, match="context border"):
        ValidPatchInferer(96, 56, includes_context=True)(_position_volume(1, (40, 60, 60)), net)


def test_small_volume_and_anisotropic_tiles() -> None:
    volume = _position_volume(1, (5, 23, 9))
    out = ValidPatchInferer(patch_size=(28, 16, 30), output_size=(8, 6, 10))(volume, CentreNetAniso())
    assert torch.equal(out[:, :3], volume)


class CentreNetAniso(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :, 10:-10, 5:-5, 10:-10]


def test_padding_uses_each_channels_minimum() -> None:
    volume = torch.full((1, 3, 10, 10, 10), 2.0)
    volume[:, 0] = -1.0  # air-like CT
    volume[:, 1, 0, 0, 0] = -0.5
    volume[:, 2] = 3.0
    volume[:, 2, 0, 0, 0] = 0.0  # label map: background 0 is its minimum
    seen: list[torch.Tensor] = []

    def net(x: torch.Tensor) -> torch.Tensor:
        seen.append(x.clone())
        return x[:, :, 20:-20, 20:-20, 20:-20]

    ValidPatchInferer(96, 56)(volume, net)
    corner = seen[0][0, :, 0, 0, 0]
    assert corner.tolist() == [-1.0, -0.5, 0.0]


def test_real_network_whole_volume_matches_single_tile() -> None:
    torch.manual_seed(0)
    net = build_network("dense", (2, 4, 4)).eval()
    volume = torch.randn(1, 3, 16, 20, 12)
    volume[:, 2] = torch.randint(0, 5, (1, 16, 20, 12)).float()
    inferer = ValidPatchInferer(patch_size=64, output_size=24)
    assert isinstance(inferer, Inferer)
    with torch.no_grad():
        out = inferer(volume, net)
        fill = volume.reshape(1, 3, -1).amin(2)[:, :, None, None, None]
        padded = fill.expand(1, 3, 64, 64, 64).clone()
        padded[:, :, 20:36, 20:40, 20:32] = volume
        expected = net(padded)[:, :, :16, :20, :12]
    assert out.shape == (1, 8, 16, 20, 12)
    assert torch.allclose(out, expected, atol=1e-6)


def test_output_size_is_checked() -> None:
    with pytest.raises(ValueError, match="output_size"):
        ValidPatchInferer(96, 60)(torch.zeros(1, 3, 8, 8, 8), CentreNet())
    with pytest.raises(ValueError, match="even"):
        ValidPatchInferer(96, 55)
    with pytest.raises(ValueError, match="tile_batch_size"):
        ValidPatchInferer(96, 56, tile_batch_size=0)
    with pytest.raises(ValueError, match="B, C, X, Y, Z"):
        ValidPatchInferer()(torch.zeros(3, 8, 8, 8), CentreNet())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_with_amp_matches_cpu() -> None:
    torch.manual_seed(0)
    net = build_network("cross_stitch", (4, 8, 16)).eval()
    volume = torch.randn(1, 3, 40, 30, 20)
    with torch.no_grad():
        cpu = ValidPatchInferer()(volume, net)
        gpu = ValidPatchInferer(amp=True, sw_device="cuda", device="cpu")(volume, net.cuda())
    assert gpu.device.type == "cpu" and gpu.dtype == torch.float32
    assert torch.allclose(cpu, gpu, atol=0.05)


# --- label warping with the stitched DDF ------------------------------------------------------------------------------


def test_zero_ddf_warps_labels_to_identity() -> None:
    labels = torch.randint(0, 5, (2, 1, 9, 7, 8)).float()
    ddf = torch.zeros(2, 3, 9, 7, 8)
    for mode in ("nearest", "trilinear"):
        assert torch.equal(warp_labels(labels, ddf, mode=mode), labels)


def test_integer_shift_warps_labels() -> None:
    labels = torch.randint(0, 5, (1, 1, 10, 10, 10)).float()
    ddf = torch.zeros(1, 3, 10, 10, 10)
    ddf[:, 1] = 2.0  # warped(x) = labels(x + 2) along axis 1
    for mode in ("nearest", "trilinear"):
        warped = warp_labels(labels, ddf, mode=mode)
        assert torch.equal(warped[:, :, :, :8], labels[:, :, :, 2:])


def test_warp_planning_labels_uses_image_channel_2_and_pred_ddf() -> None:
    image = torch.randn(1, 3, 6, 6, 6)
    image[:, 2] = torch.randint(0, 5, (1, 6, 6, 6)).float()
    pred = torch.randn(1, 8, 6, 6, 6)
    pred[:, :3] = 0.0
    assert torch.equal(warp_planning_labels(image, pred), image[:, 2:3])
    with pytest.raises(ValueError, match="mode"):
        warp_planning_labels(image, pred, mode="cubic")
    with pytest.raises(ValueError, match="labels"):
        warp_labels(image[:, 2:3], pred[:, :3, :5])


def test_metatensor_metadata_is_kept() -> None:
    from monai.data import MetaTensor

    affine = torch.diag(torch.tensor([2.0, 2.0, 3.0, 1.0]))
    volume = MetaTensor(_position_volume(1, (7, 9, 5)), affine=affine, meta={"filename_or_obj": "daily.nii.gz"})
    out = ValidPatchInferer()(volume, CentreNet())
    assert isinstance(out, MetaTensor)
    assert torch.equal(out.affine, affine) and out.meta["filename_or_obj"] == "daily.nii.gz"
    assert torch.equal(out.as_tensor()[:, :3], volume.as_tensor())
