"""Certified attributions (Levine et al. 2019; Anani et al. 2025): known answers on a linear model, a planted rank
flip that no certificate may cross, Monte Carlo coverage at the certified radius, batching invariance, the draws a
radius needs, and refused settings."""

import math
from functools import partial

import pytest
import torch
from scipy import stats
from torch import nn

from robustattr.attributions import Saliency
from robustattr.certify import CertifiedMap, certify, hoeffding_error, main, required_samples
from robustattr.errors import ConfigError
from robustattr.metrics import functional as M
from robustattr.models import SmallCNN


class Linear(nn.Module):
    """Logits ``W x``: the saliency of a class is its weight row, the same at every input."""

    def __init__(self, pixels: int = 64, classes: int = 3) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.weight = nn.Parameter(torch.randn(classes, pixels, generator=g))

    def forward(self, x):
        return x.flatten(1) @ self.weight.T


class Planted(nn.Module):
    """Class 0's score ``sum_i c_i x_i^2 / 2`` over an 8x8 image: the saliency of pixel i is ``c_i x_i``. Pixels A
    and B have c = 1, the others 0.01 (never in the top 1). At x_A = 0.8, x_B = 0.5 pixel A leads, and the smoothed
    map's top 1 flips where x_A = x_B: at L2 distance (0.8 - 0.5) / sqrt(2) along (-1, +1) on (A, B)."""

    A, B = 18, 45

    def __init__(self) -> None:
        super().__init__()
        c = torch.full((64,), 0.01)
        c[[self.A, self.B]] = 1.0
        self.register_buffer("c", c)
        self.dummy = nn.Parameter(torch.zeros(1))  # gives the model a device and a parameter

    def forward(self, x):
        score = 0.5 * (self.c * x.flatten(1) ** 2).sum(dim=1, keepdim=True)
        return torch.cat([score, torch.zeros_like(score)], dim=1) + 0 * self.dummy


def planted_x(n: int = 1, a: float = 0.8, b: float = 0.5) -> torch.Tensor:
    x = torch.full((n, 1, 8, 8), 0.5)
    x.view(n, -1)[:, Planted.A] = a
    x.view(n, -1)[:, Planted.B] = b
    return x


FLIP = 0.3 / math.sqrt(2)
TARGET0 = torch.zeros(1, dtype=torch.long)


def test_on_a_linear_model_every_topk_pixel_is_certified_up_to_the_largest_radius_n_draws_allow():
    model = Linear()
    x = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    c = certify(model, x, Saliency(), sigma=0.5, n=512, k=8, alpha=0.05)
    assert set(c.smoothed.unique().tolist()) == {0.0, 1.0}  # the binarised map is the same at every draw
    expected_top = M.topk_mask(M.pixel_map(Saliency()(model, x, c.target)), 8)
    assert torch.equal(c.topk_mask(), expected_top)
    t = hoeffding_error(512, 64, 0.05)
    levine = c.max_radius["levine"]
    assert levine == pytest.approx(0.5 * stats.norm.ppf(1 - t))
    for radius in (0.0, 0.1, 0.5, 0.99 * levine):
        assert c.certified_topk_fraction(radius).tolist() == [1.0] * 4
        assert torch.equal(c.certified_topk_mask(radius), expected_top)
    assert c.certified_topk_fraction(1.01 * levine).tolist() == [0.0] * 4  # no n-draw certificate goes further
    anani = c.max_radius["anani"]  # every pixel's vote agrees in all n - n0 draws: the largest radius for all
    torch.testing.assert_close(c.anani_radius, torch.full_like(c.anani_radius, anani))
    assert torch.equal(c.mode, expected_top)
    assert c.certified_pixel_fraction(0.99 * anani).tolist() == [1.0] * 4
    assert c.certified_top_fraction(0.99 * anani).tolist() == [1.0] * 4
    assert not c.abstain(0.9).any()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_no_certificate_crosses_the_planted_rank_flip_and_the_bound_is_nearly_tight(seed):
    model, x = Planted(), planted_x()
    c = certify(model, x, Saliency(), sigma=0.1, n=4096, k=1, target=TARGET0, seed=seed)
    a = c.levine_radius.view(-1)[Planted.A].item()
    overlap = c.overlap_radius[0, 0].item()
    anani_a, anani_b = c.anani_radius.view(-1)[[Planted.A, Planted.B]].tolist()
    assert c.topk_mask().view(-1)[Planted.A]
    for radius in (a, overlap, anani_a, anani_b):
        assert radius < FLIP  # a certificate beyond the flip would be false
    # Smoothing a half-space is exactly Gaussian, so the only slack is the sampling error: the bound is close.
    assert a > 0.7 * FLIP and anani_a > 0.7 * FLIP
    # Just past the flip the smoothed map's top 1 is the other pixel: the distance is real.
    moved = planted_x(a=0.8 - 0.16, b=0.5 + 0.16)  # L2 distance 0.226 > 0.212
    after = certify(model, moved, Saliency(), sigma=0.1, n=4096, k=1, target=TARGET0, seed=seed + 10)
    assert after.topk_mask().view(-1)[Planted.B]


def _smoothed_top(model, x, target, k, sigma, n, seed, chunk=500):
    """An independent re-estimate of the sparsified smoothed map (its own generator, chunks of draws)."""
    g = torch.Generator().manual_seed(seed)
    total = torch.zeros(len(x), *x.shape[2:])
    for start in range(0, n, chunk):
        c = min(chunk, n - start)
        z = (x.unsqueeze(0) + sigma * torch.randn((c, *x.shape), generator=g)).reshape(-1, *x.shape[1:])
        top = M.topk_mask(M.pixel_map(Saliency()(model, z, target.repeat(c))), k).float()
        total += top.reshape(c, len(x), *x.shape[2:]).sum(dim=0)
    return total / n


def test_monte_carlo_coverage_at_the_certified_radius_along_the_worst_direction():
    """At the certified radius, moved straight toward the flip, pixel A stays the smoothed map's top 1 (and its
    vote stays the majority) in every trial, more often than the stated 95%."""
    model = Planted()
    failures, trials = 0, 0
    for trial, a in enumerate((0.7, 0.75, 0.8, 0.85, 0.9)):
        x = planted_x(a=a)
        c = certify(model, x, Saliency(), sigma=0.1, n=2048, k=1, target=TARGET0, seed=trial)
        for radius in (c.levine_radius.view(-1)[Planted.A].item(), c.anani_radius.view(-1)[Planted.A].item()):
            assert radius > 0
            step = radius / math.sqrt(2) * 0.999
            moved = planted_x(a=a - step, b=0.5 + step)
            share = _smoothed_top(model, moved, TARGET0, 1, 0.1, 4000, 100 + trial).view(-1)
            failures += int(share[Planted.A] <= share[Planted.B] or share[Planted.A] <= 0.5)
            trials += 1
    assert trials == 10 and failures <= 0.05 * trials


def test_monte_carlo_coverage_under_random_l2_perturbations_on_a_cnn():
    torch.manual_seed(0)
    model = SmallCNN(width=8, activation=partial(nn.Softplus, beta=5)).eval()
    x = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    c = certify(model, x, Saliency(), sigma=0.25, n=2000, k=8, seed=0)
    radius = 0.05
    levine = c.certified_topk_mask(radius)
    anani = c.certified_pixels(radius)
    assert levine.any() and anani.any()
    g = torch.Generator().manual_seed(9)
    broken = []
    for trial in range(3):
        delta = torch.randn(x.shape, generator=g)
        delta = radius * delta / delta.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
        share = _smoothed_top(model, x + delta, c.target, 8, 0.25, 3000, 50 + trial)
        top = M.topk_mask(share, 8)
        broken.append(bool((levine & ~top).flatten(1).any(dim=1).any()))
        majority = share > 0.5
        broken.append(bool((anani & (majority != c.mode)).any()))
    assert sum(broken) <= 0.05 * len(broken)


def test_the_smoothed_map_is_the_mean_of_the_binarised_draws_and_does_not_depend_on_batching():
    model = SmallCNN(width=4).eval()
    x = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    big = certify(model, x, Saliency(), sigma=0.2, n=40, seed=5)
    small = certify(model, x, Saliency(), sigma=0.2, n=40, seed=5, batch_size=7)
    alone = certify(model, x[2:], Saliency(), sigma=0.2, n=40, seed=5, index=[2])
    for f in ("smoothed", "levine_radius", "overlap_radius", "lower", "anani_radius"):
        torch.testing.assert_close(getattr(big, f), getattr(small, f))
        torch.testing.assert_close(getattr(big, f)[2:], getattr(alone, f))
    # sample i's draws come from its own generator seeded seed + i, in order
    g = torch.Generator().manual_seed(5 + 1)
    draws = [x[1:2] + 0.2 * torch.randn((1, 1, 8, 8), generator=g) for _ in range(40)]
    k = M.default_k(8, 8)
    tops = [M.topk_mask(M.pixel_map(Saliency()(model, z, big.target[1:2])), k).float() for z in draws]
    torch.testing.assert_close(big.smoothed[1], torch.stack(tops).mean(dim=0)[0])
    first = torch.stack(tops[: big.n0]).mean(dim=0)[0]
    assert torch.equal(big.mode[1], first > 0.5)
    joined = CertifiedMap.concatenate([big.select(slice(0, 1)), big.select(slice(1, 3))])
    torch.testing.assert_close(joined.smoothed, big.smoothed)


@pytest.mark.parametrize("method", ["levine", "anani"])
def test_required_samples_is_the_fewest_draws_whose_best_case_reaches_the_radius(method, capsys):
    model = Linear()
    x = torch.rand(1, 1, 8, 8, generator=torch.Generator().manual_seed(4))
    radius, sigma = 0.3, 0.25
    need = required_samples(radius, sigma, 64, 0.05, method, n0=10)
    reach = certify(model, x, Saliency(), sigma=sigma, n=need, n0=10).max_radius[method]
    short = certify(model, x, Saliency(), sigma=sigma, n=need - 1, n0=10).max_radius[method]
    assert short <= radius < reach
    main(["--radius", "0.3", "--sigma", "0.25", "--pixels", "64"])
    assert f"{method}: at least {need} draws" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"sigma": 0.0}, "sigma must be a positive"),
        ({"sigma": float("nan")}, "sigma must be a positive"),
        ({"n": 1}, "n must be an integer of at least 2"),
        ({"alpha": 1.5}, "alpha must be in"),
        ({"k": 64}, "k must be in"),
        ({"n0": 100}, "n0 must be in"),
        ({"batch_size": 0}, "batch_size"),
    ],
)
def test_bad_settings_are_refused_with_their_reason(kwargs, match):
    settings = {"sigma": 0.25, "n": 100, **kwargs}
    with pytest.raises(ConfigError, match=match):
        certify(Linear(), torch.rand(1, 1, 8, 8), Saliency(), **settings)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU on this machine")
def test_certify_runs_on_a_gpu_with_the_same_known_answer():
    model = Linear().cuda()
    x = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    c = certify(model, x, Saliency(), sigma=0.5, n=512, k=8)
    assert c.smoothed.device.type == "cpu" and set(c.smoothed.unique().tolist()) == {0.0, 1.0}
    assert c.certified_topk_fraction(0.99 * c.max_radius["levine"]).tolist() == [1.0] * 4
