"""Test-time refinement: it lowers its loss and recovers a known smooth deformation on a tiny volume."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from prostate_jrs import refine as refine_module
from prostate_jrs.labels import NUM_CLASSES
from prostate_jrs.metrics import jacobian_determinant
from prostate_jrs.nets.warp import labels_to_onehot, warp_patch
from prostate_jrs.refine import (
    REFINE_MODES,
    RefineSettings,
    _Adam,
    _folding,
    context_similarity,
    mind_ssc,
    refine_ddf,
    refine_prediction,
    refine_settings,
)

SIZE = (36, 32, 28)
BORDER = 4
# the tiny textures span [-1, 1] (no window); LNCC-scale diffusion and smoothing suit every similarity here
SETTINGS = RefineSettings(
    levels=(2, 1),
    control_spacing=(4, 3),
    iterations=(60, 40),
    init="zero",
    patience=15,
    window=None,
    diffusion_weight=1.0,
    folding_weight=0.0,
    smoothing_passes=2,
)


def _texture(shape: tuple[int, ...], seed: int, sigma: float = 1.5) -> torch.Tensor:
    """Smooth random texture in [-1, 1], (1, 1, *shape)."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn((1, 1, *shape), generator=generator)
    radius = int(3 * sigma)
    kernel = torch.exp(-0.5 * (torch.arange(-radius, radius + 1) / sigma) ** 2)
    kernel = kernel / kernel.sum()
    for axis in range(3):
        view = [1, 1, 1, 1, 1]
        view[2 + axis] = -1
        pad = [0] * 6
        pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = radius
        noise = F.conv3d(F.pad(noise, pad, mode="replicate"), kernel.view(view))
    return torch.tanh(noise / noise.std())


def _smooth_field(amplitude: float, phase: float = 0.0) -> torch.Tensor:
    """A smooth, folding-free displacement (1, 3, *SIZE) in voxels."""
    axes = torch.meshgrid(*(torch.linspace(0, math.pi, n) for n in SIZE), indexing="ij")
    return (
        amplitude
        * torch.stack(
            [
                torch.sin(axes[1] + phase) * torch.sin(axes[2]),
                torch.sin(axes[0]) * torch.cos(axes[2] + phase),
                torch.sin(axes[0] + axes[1] + phase) * 0.5,
            ]
        )[None]
    )


@pytest.fixture(scope="module")
def pair() -> dict[str, torch.Tensor]:
    """Moving image with a context border, fixed = moving pulled back by a known field."""
    moving = _texture(tuple(n + 2 * BORDER for n in SIZE), seed=0)
    truth = _smooth_field(1.8)
    fixed = warp_patch(moving, truth, border=BORDER, stride=1)
    return {"moving": moving, "fixed": fixed, "truth": truth}


def _error(ddf: torch.Tensor, truth: torch.Tensor) -> float:
    inner = (slice(None), slice(None), *(slice(4, -4),) * 3)  # where the field is not pinned by the crop faces
    return float((ddf - truth)[inner].norm(dim=1).mean())


@pytest.mark.parametrize("similarity", ["ssd", "lncc", "mind"])
def test_recovers_a_known_field_from_zero(pair: dict[str, torch.Tensor], similarity: str) -> None:
    settings = replace(SETTINGS, similarity=similarity)
    start = torch.zeros_like(pair["truth"])
    ddf, report = refine_ddf(pair["fixed"], pair["moving"], start, settings)
    assert ddf.shape == pair["truth"].shape
    assert report.similarity_after < report.similarity_before
    before, after = _error(start, pair["truth"]), _error(ddf, pair["truth"])
    assert after < 0.35 * before, (similarity, before, after)


@pytest.mark.parametrize("similarity", ["ssd", "mind"])
def test_sampled_finest_level_recovers_the_field_and_runs_its_budget(
    pair: dict[str, torch.Tensor], similarity: str
) -> None:
    settings = replace(SETTINGS, similarity=similarity, sampling_stride=(1, 2))
    start = torch.zeros_like(pair["truth"])
    ddf, report = refine_ddf(pair["fixed"], pair["moving"], start, settings)
    assert ddf.shape == pair["truth"].shape
    assert report.iterations[-1] == settings.iterations[-1]  # a noisy loss does not stop a sampled level early
    assert _error(ddf, pair["truth"]) < 0.35 * _error(start, pair["truth"]), similarity
    again, _ = refine_ddf(pair["fixed"], pair["moving"], start, settings)
    torch.testing.assert_close(again, ddf)  # the lattices are drawn from a fixed seed


def test_folding_penalty_of_an_affine_field() -> None:
    """det J of ``x -> x + A x`` is det(I + A) at every voxel; the penalty is ``(min - det)^2`` below ``min``."""
    matrix = torch.tensor([[-0.7, 0.1, 0.0], [0.0, -0.2, 0.3], [0.1, 0.0, 0.0]], dtype=torch.float64)
    grid = torch.stack(torch.meshgrid(*(torch.arange(n, dtype=torch.float64) for n in (5, 6, 7)), indexing="ij"))
    ddf = torch.einsum("ck,kxyz->cxyz", matrix, grid)[None].requires_grad_(True)
    det = float(torch.linalg.det(torch.eye(3, dtype=torch.float64) + matrix))
    assert 0 < det < 0.4
    penalty = _folding(ddf, 0.4)
    assert float(penalty) == pytest.approx((0.4 - det) ** 2, rel=1e-9)
    assert float(_folding(ddf, det - 0.01)) == 0.0
    (gradient,) = torch.autograd.grad(penalty, ddf)
    assert bool(gradient.abs().sum() > 0)


def test_diffeomorphic_residual_recovers_the_field_without_folding(pair: dict[str, torch.Tensor]) -> None:
    start = pair["truth"] + _smooth_field(1.0, phase=1.0)
    # one coarse level: scaling and squaring costs seven warps per step
    settings = replace(
        SETTINGS, init="network", diffeomorphic=True, levels=(2,), control_spacing=(4,), iterations=(40,)
    )
    ddf, report = refine_ddf(pair["fixed"], pair["moving"], start, settings)
    assert report.similarity_after < report.similarity_before
    assert _error(ddf, pair["truth"]) < 0.5 * _error(start, pair["truth"])
    assert float(jacobian_determinant(ddf[0].numpy()).min()) > 0.0


def test_improves_a_perturbed_start(pair: dict[str, torch.Tensor]) -> None:
    start = pair["truth"] + _smooth_field(1.0, phase=1.0)
    settings = replace(SETTINGS, init="network")
    ddf, report = refine_ddf(pair["fixed"], pair["moving"], start, settings)
    assert report.similarity_after < report.similarity_before
    assert _error(ddf, pair["truth"]) < 0.5 * _error(start, pair["truth"])


def test_zero_budget_returns_the_start(pair: dict[str, torch.Tensor]) -> None:
    start = _smooth_field(0.7)
    settings = RefineSettings(levels=(2,), control_spacing=(4,), iterations=(0,), init="network")
    ddf, report = refine_ddf(pair["fixed"], pair["moving"], start, settings)
    torch.testing.assert_close(ddf, start)
    assert report.iterations == [0]


def test_coarse_start_is_the_networks_field_smoothed_onto_the_control_nodes(pair: dict[str, torch.Tensor]) -> None:
    start = _smooth_field(0.7)
    settings = RefineSettings(levels=(2,), control_spacing=(3,), iterations=(0,), init="coarse")
    ddf, _ = refine_ddf(pair["fixed"], pair["moving"], start, settings)
    assert _error(ddf, start) < 0.05 * _error(torch.zeros_like(start), start)  # close to the smooth start
    assert not torch.equal(ddf, start)  # but a residual on the nodes, not the field itself
    assert settings.needs_network


def test_refine_prediction_changes_only_the_ddf(pair: dict[str, torch.Tensor]) -> None:
    labels = torch.zeros_like(pair["moving"])
    inputs = torch.cat([F.pad(pair["fixed"], [BORDER] * 6, mode="replicate"), pair["moving"], labels], dim=1)
    logits = torch.randn(1, NUM_CLASSES, *SIZE)
    pred = torch.cat([torch.zeros(1, 3, *SIZE), logits], dim=1)
    refined, report = refine_prediction(inputs, pred, REFINE_MODES["fast"])  # type: ignore[arg-type]
    assert refined.shape == pred.shape
    torch.testing.assert_close(refined[:, 3:], logits)
    assert report.as_dict()["mode"] == "fast"
    assert _error(refined[:, :3], pair["truth"]) < _error(pred[:, :3], pair["truth"])


def test_context_similarity_is_the_reports_similarity_of_the_start(pair: dict[str, torch.Tensor]) -> None:
    """What the pipeline reports for the network's DDF when the refinement did not start from it."""
    inputs = torch.cat([F.pad(pair["fixed"], [BORDER] * 6, mode="replicate"), pair["moving"], pair["moving"]], dim=1)
    start = _smooth_field(0.7)
    settings = replace(REFINE_MODES["fast"], init="network")  # type: ignore[type-var]
    _, report = refine_prediction(inputs, torch.cat([start, torch.zeros(1, NUM_CLASSES, *SIZE)], dim=1), settings)
    assert context_similarity(inputs, start, settings) == report.similarity_before
    assert context_similarity(inputs, pair["truth"], settings) < report.similarity_before


def test_adam_is_torchs_adam_bit_for_bit() -> None:
    generator = torch.Generator().manual_seed(0)
    ours = torch.randn(2, 3, 4, 5, generator=generator)
    theirs = ours.clone().requires_grad_(True)
    ours.requires_grad_(True)
    step, reference = _Adam(ours, lr=0.3), torch.optim.Adam([theirs], lr=0.3)
    for _ in range(25):
        gradient = torch.randn(ours.shape, generator=generator) * 10 ** float(
            torch.randint(-6, 3, (1,), generator=generator)
        )
        ours.grad, theirs.grad = gradient.clone(), gradient.clone()
        step.step()
        reference.step()
        assert torch.equal(ours, theirs)


def test_what_the_refinement_needs_from_the_network() -> None:
    accurate = REFINE_MODES["accurate"]
    assert accurate is not None and not accurate.needs_network  # the default runs beside the network
    assert replace(accurate, init="network").needs_network and replace(accurate, init="auto").needs_network
    guided = replace(accurate, guidance_weight=0.05, guidance_structures=("rectum",))
    assert guided.needs_network and not replace(guided, guidance_weight=0.0).needs_network


def test_structure_guidance_pulls_the_labels_onto_the_segmentation(pair: dict[str, torch.Tensor]) -> None:
    """With a flat image only the guidance term can move the field: the warped label follows the target."""
    shape = tuple(n + 2 * BORDER for n in SIZE)
    grid = torch.meshgrid(*(torch.arange(n, dtype=torch.float32) for n in shape), indexing="ij")
    ball = ((grid[0] - 20) ** 2 + (grid[1] - 18) ** 2 + (grid[2] - 16) ** 2 < 49).float()[None, None]
    truth = _smooth_field(2.0)
    target = warp_patch(labels_to_onehot(ball, NUM_CLASSES), truth, border=BORDER, stride=1)
    logits = 20.0 * (target - 0.5)
    flat = torch.zeros((1, 1, *SIZE))
    settings = replace(SETTINGS, guidance_weight=1.0, guidance_structures=("prostate",), similarity="ssd")
    start = torch.zeros_like(truth)
    ddf, _ = refine_ddf(flat, torch.zeros((1, 1, *shape)), start, settings, moving_labels=ball, seg_logits=logits)

    def dice(field: torch.Tensor) -> float:
        warped = warp_patch(ball, field, border=BORDER, stride=1)
        reference = target[:, 1:2]
        return float(2 * (warped * reference).sum() / (warped.sum() + reference.sum()))

    assert dice(ddf) > dice(start) + 0.05


def test_mind_ssc_is_a_twelve_channel_descriptor_invariant_to_contrast() -> None:
    image = _texture((20, 20, 20), seed=3)
    features = mind_ssc(image)
    assert features.shape == (1, 12, 20, 20, 20)
    assert float(features.min()) >= 0.0 and float(features.max()) <= 1.0 + 1e-6
    torch.testing.assert_close(mind_ssc(3.0 * image + 0.5), features, atol=1e-4, rtol=1e-4)


def test_settings_by_name_and_bad_values() -> None:
    assert refine_settings("off") is None and refine_settings(None) is None
    fast = refine_settings("fast", {"iterations": [5, 5]})
    assert fast is not None and fast.iterations == (5, 5) and fast.name == "fast"
    with pytest.raises(ValueError, match="unknown refine mode"):
        refine_settings("fastest")
    with pytest.raises(ValueError, match="unknown refine settings"):
        refine_settings("fast", {"step": 1})
    with pytest.raises(ValueError, match="one length"):
        RefineSettings(levels=(4, 2), control_spacing=(8,), iterations=(1, 1))
    with pytest.raises(ValueError, match="unknown similarity"):
        RefineSettings(similarity="mi")
    with pytest.raises(ValueError, match="guidance_structures"):
        RefineSettings(guidance_structures=("liver",))
    with pytest.raises(ValueError, match="one value >= 1 per level"):
        RefineSettings(levels=(4, 2), control_spacing=(8, 4), iterations=(1, 1), sampling_stride=(2,))
    with pytest.raises(ValueError, match="needs similarity"):
        RefineSettings(similarity="lncc", sampling_stride=(1, 2))
    sampled = refine_settings("fast", {"sampling_stride": [1, 2]})
    assert sampled is not None and sampled.sampling_stride == (1, 2)


def test_rejects_inputs_that_do_not_fit(pair: dict[str, torch.Tensor]) -> None:
    with pytest.raises(ValueError, match="expected fixed"):
        refine_ddf(pair["fixed"], pair["moving"][..., :-1], torch.zeros_like(pair["truth"]), SETTINGS)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu(pair: dict[str, torch.Tensor]) -> None:
    start = torch.zeros_like(pair["truth"])
    cpu, _ = refine_ddf(pair["fixed"], pair["moving"], start, SETTINGS)
    cuda, report = refine_ddf(pair["fixed"].cuda(), pair["moving"].cuda(), start.cuda(), SETTINGS)
    assert report.device.startswith("cuda")
    assert _error(cuda.cpu(), pair["truth"]) < 0.35 * _error(start, pair["truth"])
    assert float((cuda.cpu() - cpu).abs().mean()) < 0.05


@pytest.mark.parametrize("cpu_threads", [1, None])
def test_cpu_threads_are_set_for_the_optimisation_and_restored(
    pair: dict[str, torch.Tensor], monkeypatch: pytest.MonkeyPatch, cpu_threads: int | None
) -> None:
    import prostate_jrs.refine as refine_module

    seen = []
    inner = refine_module._refine

    def recording(*args: object) -> object:
        seen.append(torch.get_num_threads())
        return inner(*args)

    monkeypatch.setattr(refine_module, "_refine", recording)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        settings = replace(SETTINGS, iterations=(2, 2), cpu_threads=cpu_threads)
        refine_ddf(pair["fixed"], pair["moving"], torch.zeros_like(pair["truth"]), settings)
        assert seen == [1 if cpu_threads == 1 else 2] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_cpu_seconds_are_the_optimising_threads(pair: dict[str, torch.Tensor], monkeypatch: pytest.MonkeyPatch) -> None:
    """One torch thread: the calling thread's CPU time (another thread's work, e.g. the network beside the refinement,
    is not the refinement's); more: the process's (torch's workers are)."""
    clocks = {"thread": iter(range(0, 100, 3)), "process": iter(range(0, 1000, 70))}
    monkeypatch.setattr(refine_module.time, "thread_time", lambda: float(next(clocks["thread"])))
    monkeypatch.setattr(refine_module.time, "process_time", lambda: float(next(clocks["process"])))
    budget = replace(SETTINGS, iterations=(2, 2))
    _, report = refine_ddf(
        pair["fixed"], pair["moving"], torch.zeros_like(pair["truth"]), replace(budget, cpu_threads=1)
    )
    assert report.cpu_seconds == 3.0
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        _, report = refine_ddf(
            pair["fixed"], pair["moving"], torch.zeros_like(pair["truth"]), replace(budget, cpu_threads=None)
        )
    finally:
        torch.set_num_threads(threads)
    assert report.cpu_seconds == 70.0


def test_cpu_threads_must_be_positive() -> None:
    with pytest.raises(ValueError, match="cpu_threads"):
        RefineSettings(cpu_threads=0)
