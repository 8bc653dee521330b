from __future__ import annotations

import pytest
import torch
from monai.losses import BendingEnergyLoss

from prostate_jrs.losses import TASK_TERMS, JRSLoss, LocalNCCLoss
from prostate_jrs.nets import build_network, labels_to_onehot, warp_patch


def _grid(size: int) -> torch.Tensor:
    return torch.stack(torch.meshgrid(*[torch.arange(size, dtype=torch.float32)] * 3, indexing="ij"))


def synthetic_pair(size: int = 56, shift: tuple[int, int, int] = (2, -2, 1)) -> tuple[torch.Tensor, torch.Tensor]:
    """Smooth 'pelvis' with four ellipsoid organs (labels 1-4); the planning scan is the daily one shifted.

    Returns the network input ``image`` (1, 3, S, S, S) and the daily label map (1, 1, S, S, S).
    """
    g = _grid(size)
    centre = (size - 1) / 2
    organs = [((0, 0, 0), (7, 6, 6)), ((-9, 0, 4), (4, 9, 4)), ((0, 10, -2), (6, 5, 10)), ((10, 0, 0), (7, 10, 9))]
    labels = torch.zeros(size, size, size)
    image = -0.2 + 0.1 * torch.sin(g[0] / 5) * torch.cos(g[1] / 7)
    for label, (offset, radii) in enumerate(organs, start=1):
        dist = sum(((g[i] - centre - offset[i]) / radii[i]) ** 2 for i in range(3))
        labels[dist <= 1] = label
        image = image + (0.15 * label - 0.3) * torch.sigmoid(4 * (1 - dist))
    moving = torch.roll(image, shift, dims=(0, 1, 2))
    moving_label = torch.roll(labels, shift, dims=(0, 1, 2))
    return torch.stack([image, moving, moving_label])[None], labels[None, None]


# --- NCC ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["paper", "squared"])
def test_ncc_of_image_with_itself_is_zero(form: str) -> None:
    image = torch.randn(2, 1, 20, 20, 20)
    image[:, :, :5] = 0.3  # flat region: the paper form's clamps must count it as a match
    assert LocalNCCLoss(9, form=form)(image, image).item() == pytest.approx(0.0, abs=1e-5)


@pytest.mark.parametrize("form", ["paper", "squared"])
def test_ncc_increases_with_mismatch(form: str) -> None:
    torch.manual_seed(0)
    image = torch.randn(1, 1, 20, 20, 20)
    noisy = image + 0.5 * torch.randn_like(image)
    unrelated = torch.randn_like(image)
    ncc = LocalNCCLoss(9, form=form)
    assert 0.05 < ncc(noisy, image).item() < ncc(unrelated, image).item()


def test_paper_ncc_counts_anticorrelation_as_no_match() -> None:
    image = torch.randn(1, 1, 16, 16, 16)
    assert LocalNCCLoss(form="paper")(-image, image).item() == pytest.approx(1.0, abs=0.02)
    assert LocalNCCLoss(form="squared")(-image, image).item() == pytest.approx(0.0, abs=1e-4)


def test_ncc_argument_errors() -> None:
    with pytest.raises(ValueError, match="odd"):
        LocalNCCLoss(8)
    with pytest.raises(ValueError, match="form"):
        LocalNCCLoss(form="cubed")
    with pytest.raises(ValueError, match="shape"):
        LocalNCCLoss()(torch.zeros(1, 1, 9, 9, 9), torch.zeros(1, 1, 9, 9, 8))


# --- bending energy ------------------------------------------------------------------------------------------------


def test_bending_energy_of_affine_field_is_zero_and_of_quadratic_is_not() -> None:
    g = _grid(12)
    matrix = torch.tensor([[0.1, 0.2, -0.1], [0.05, -0.1, 0.2], [0.3, 0.0, 0.1]])
    affine = (torch.einsum("ij,jxyz->ixyz", matrix, g) + torch.tensor([1.0, 2.0, 3.0])[:, None, None, None])[None]
    loss = JRSLoss("reg").bending
    assert isinstance(loss, BendingEnergyLoss)
    assert loss(affine).item() == pytest.approx(0.0, abs=1e-8)
    quadratic = affine.clone()
    quadratic[:, 1] += 0.01 * g[0] ** 2  # d2/dx2 along axis 0 of the axis-1 component: channels-first axes matter
    assert loss(quadratic).item() > 1e-5


# --- Dice terms ----------------------------------------------------------------------------------------------------


def test_warped_label_dice_passes_gradient_to_ddf() -> None:
    image, fixed_label = synthetic_pair(48)
    ddf = [torch.full((1, 3, n, n, n), 0.3, requires_grad=True) for n in (8, 6, 5)]
    loss = JRSLoss("jrs_reg")
    result = loss({"ddf": ddf}, *loss.split_image(image), fixed_label)
    result["seg_reg"].backward()
    for field in ddf:
        assert field.grad is not None and field.grad.abs().sum() > 0


def test_warped_label_dice_is_zero_for_perfect_warp() -> None:
    image, fixed_label = synthetic_pair(48, shift=(2, -2, 1))
    ddf = [torch.zeros(1, 3, n, n, n) for n in (8, 6, 5)]
    for field, stride in zip(ddf, (1, 2, 4), strict=True):
        field[:, 0], field[:, 1], field[:, 2] = 2 / stride, -2 / stride, 1 / stride  # the known shift
    loss = JRSLoss("jrs_reg")
    result = loss({"ddf": ddf}, *loss.split_image(image), fixed_label)
    assert result["seg_reg"].item() == pytest.approx(0.0, abs=1e-4)
    assert result["ncc"].item() == pytest.approx(0.0, abs=1e-4)
    zero = loss({"ddf": [torch.zeros_like(d) for d in ddf]}, *loss.split_image(image), fixed_label)
    assert zero["seg_reg"].item() > 0.05


def test_segmentation_dice_of_perfect_logits_is_zero() -> None:
    image, fixed_label = synthetic_pair(48)
    onehot = labels_to_onehot(fixed_label)
    logits = [
        100 * onehot[:, :, 20:28, 20:28, 20:28],
        100 * onehot[:, :, 18:30:2, 18:30:2, 18:30:2],
        100 * onehot[:, :, 14:34:4, 14:34:4, 14:34:4],
    ]
    loss = JRSLoss("seg")
    assert loss({"logits": logits}, *loss.split_image(image), fixed_label)["seg"].item() == pytest.approx(0, abs=1e-5)
    wrong = loss({"logits": [-x for x in logits]}, *loss.split_image(image), fixed_label)["seg"]
    assert wrong.item() > 0.5


def test_warp_used_by_loss_samples_outside_output_crop() -> None:
    moving = torch.zeros(1, 1, 48, 48, 48)
    moving[:, :, 15] = 1.0  # a plane 5 voxels outside the high-resolution output region (20..27)
    ddf = torch.zeros(1, 3, 8, 8, 8)
    ddf[:, 0] = -5.0
    assert warp_patch(moving, ddf, 20, 1)[0, 0, 0].min().item() == pytest.approx(1.0)


# --- terms and weighting --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(TASK_TERMS))
def test_terms_per_network(name: str) -> None:
    torch.manual_seed(0)
    image, fixed_label = synthetic_pair(48)
    net = build_network(name, (2, 4, 4))
    loss = JRSLoss(name)
    result = loss(net.forward_multiscale(image), *loss.split_image(image), fixed_label)
    for term in TASK_TERMS[name]:
        assert torch.isfinite(result[term]) and f"weight_{term}" in result
    assert torch.allclose(result["loss"], sum(result[t] for t in TASK_TERMS[name]))
    if name == "reg":  # logged, not optimised (as in the authors' Reg baseline)
        assert "seg_reg" in result and not result["seg_reg"].requires_grad


def test_reg_term_is_ncc_plus_half_bending() -> None:
    image, fixed_label = synthetic_pair(48)
    ddf = [torch.randn(1, 3, n, n, n) for n in (8, 6, 5)]
    loss = JRSLoss("reg")
    result = loss({"ddf": ddf}, *loss.split_image(image), fixed_label)
    assert torch.allclose(result["reg"], result["ncc"] + 0.5 * result["bending"])
    levels = JRSLoss("reg", level_weights=(1.0, 0.0, 0.0))({"ddf": ddf}, *loss.split_image(image), fixed_label)
    assert torch.allclose(levels["bending"], loss.bending(ddf[0]))


def test_homoscedastic_weights_change_after_optimizer_step() -> None:
    torch.manual_seed(0)
    image, fixed_label = synthetic_pair(48)
    net = build_network("dense", (2, 4, 4))
    loss = JRSLoss("dense", weighting="homoscedastic")
    assert [n for n, _ in loss.named_parameters()] == ["log_vars"]
    optimizer = torch.optim.Adam([*net.parameters(), *loss.parameters()], lr=0.1)
    before = loss.weights().clone()
    result = loss(net.forward_multiscale(image), *loss.split_image(image), fixed_label)
    expected = sum(result[t] for t in loss.terms)  # log-variances start at 0: total = plain sum
    assert torch.allclose(result["loss"], expected)
    optimizer.zero_grad()
    result["loss"].backward()
    optimizer.step()
    after = loss.weights()
    assert torch.all(after != before)
    # d/ds_i = 0.5 - L_i at s_i = 0: a step raises s_i (lowers the weight) of terms above 0.5, and vice versa
    for i, term in enumerate(loss.terms):
        assert (after[i] < before[i]) == (result[term].item() > 0.5)


def test_dwa_weights_follow_loss_ratios() -> None:
    loss = JRSLoss(("seg", "reg"), weighting="dwa", dwa_temperature=2.0)
    terms = {"seg": torch.tensor(0.0), "reg": torch.tensor(0.0)}

    def run_epoch(seg: float, reg: float) -> torch.Tensor:
        for scale in (0.9, 1.1):  # two iterations averaging to (seg, reg)
            terms["seg"], terms["reg"] = torch.tensor(seg * scale), torch.tensor(reg * scale)
            loss._accumulate(torch.stack([terms["seg"], terms["reg"]]))
        return loss.epoch_end()

    assert torch.equal(run_epoch(1.0, 1.0), torch.ones(2))  # one epoch: not enough history
    weights = run_epoch(0.5, 1.0)  # seg halved, reg flat: reg must get more weight
    ratio = torch.tensor([0.5, 1.0])
    assert torch.allclose(weights, 2 * torch.softmax(ratio / 2.0, dim=0))
    assert weights[1] > weights[0] and weights.sum().item() == pytest.approx(2.0)
    state = loss.state_dict()
    restored = JRSLoss(("seg", "reg"), weighting="dwa")
    restored.load_state_dict(state)
    assert torch.equal(restored.weights(), weights)


def test_dwa_accumulates_only_training_calls_with_grad() -> None:
    image, fixed_label = synthetic_pair(48)
    ddf = [torch.zeros(1, 3, n, n, n, requires_grad=True) for n in (8, 6, 5)]
    loss = JRSLoss("jrs_reg", weighting="dwa")
    with torch.no_grad():
        loss({"ddf": ddf}, *loss.split_image(image), fixed_label)
    assert int(loss.epoch_count) == 0
    result = loss({"ddf": ddf}, *loss.split_image(image), fixed_label)
    assert int(loss.epoch_count) == 1
    assert torch.allclose(loss.epoch_sum, torch.stack([result["reg"], result["seg_reg"]]).detach())


def test_loss_argument_errors() -> None:
    with pytest.raises(ValueError, match="unknown network"):
        JRSLoss("unet")
    with pytest.raises(ValueError, match="weighting"):
        JRSLoss("seg", weighting="gradnorm")
    with pytest.raises(ValueError, match="level_weights"):
        JRSLoss("seg", level_weights=(1.0, 1.0))
    with pytest.raises(ValueError, match="terms"):
        JRSLoss(("seg", "adversarial"))
    image, _ = synthetic_pair(48)
    with pytest.raises(ValueError, match="fixed_label"):
        JRSLoss("seg")({"logits": [torch.zeros(1, 5, n, n, n) for n in (8, 6, 5)]}, *JRSLoss.split_image(image))
    with pytest.raises(ValueError, match="'ddf'"):
        JRSLoss("reg")({"logits": []}, *JRSLoss.split_image(image))


# --- short overfit run ------------------------------------------------------------------------------------------------


def phantom_pair(size: int = 56, spacing: float = 3.0, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """A ``size``^3 phantom patch centred on the prostate (planning + first daily scan on one grid).

    Returns the network input ``image`` (1, 3, S, S, S), HU clipped to [-1000, 1000] / 1000, and the daily labels.
    """
    import numpy as np

    from prostate_jrs.geometry import array_from_image
    from prostate_jrs.phantom import PhantomConfig, generate_patient

    config = PhantomConfig(
        spacing=(spacing,) * 3, fov=(size * spacing,) * 3, fov_centre=(0.0, 0.0, 0.0), vary_daily_grid=False
    )
    patient = generate_patient(seed, 1, config=config)

    def ct(scan_image: object) -> torch.Tensor:
        return torch.from_numpy(np.clip(array_from_image(scan_image).astype(np.float32), -1000, 1000) / 1000)

    def labels(scan_labels: object) -> torch.Tensor:
        return torch.from_numpy(array_from_image(scan_labels).astype(np.float32))

    daily = patient.fractions[0]
    image = torch.stack([ct(daily.image), ct(patient.planning.image), labels(patient.planning.labels)])[None]
    return image, labels(daily.labels)[None, None]


def test_cross_stitch_overfits_one_phantom_pair() -> None:
    image, fixed_label = phantom_pair()
    present = torch.unique(fixed_label[0, 0, 20:36, 20:36, 20:36]).tolist()
    assert present == [0.0, 1.0, 2.0, 3.0, 4.0], f"phantom crop lacks structures: {present}"
    torch.manual_seed(0)
    net = build_network("cross_stitch", (4, 8, 16))
    loss = JRSLoss("cross_stitch")
    optimizer = torch.optim.Adam([*net.parameters(), *loss.parameters()], lr=1e-2)
    history = []
    for _ in range(20):
        result = loss(net.forward_multiscale(image), *loss.split_image(image), fixed_label)
        optimizer.zero_grad()
        result["loss"].backward()
        optimizer.step()
        history.append({k: v.item() for k, v in result.items()})
    first, last = history[0], history[-1]
    # bending energy regularises a field that starts near zero; it is not expected to fall
    for term in ("loss", "seg", "reg", "seg_reg", "ncc"):
        assert last[term] < 0.9 * first[term], (term, first[term], last[term])
