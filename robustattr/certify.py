"""Certified attribution robustness: lower bounds that no attack can cross, from Gaussian smoothing.

An attack gives an upper bound on an explanation's robustness (the worst case it found); a certificate gives a
lower bound that holds for every perturbation within an L2 radius, with a stated confidence over the Monte Carlo
draws it was computed from. Two published certificates, computed from one set of draws:

* **Levine, Singla & Feizi 2019**, "Certifiably Robust Interpretation in Deep Learning" (arXiv:1905.12105),
  *sparsified SmoothGrad*: the attribution of each noisy copy ``x + N(0, sigma^2 I)`` is binarised to its top-k
  pixels (1 in the top k, 0 elsewhere) and averaged over the copies, ``g(x) = E[1{pixel in top-k}]``. Every pixel of
  such a smoothed map of a [0, 1]-valued function moves at most as ``Phi(Phi^-1(g_i(x)) +- rho / sigma)`` under an
  L2 perturbation of norm ``rho`` (the Gaussian-smoothing bound of Salman et al. 2019, the paper's Theorem 1). With
  n draws, Hoeffding's inequality with a union over the d pixels puts every ``g_i`` within
  ``t = sqrt(ln(2 d / alpha) / (2 n))`` of its estimate with probability ``1 - alpha``. The paper's top-k
  certificate: sort the estimated map decreasingly (``g_[1] >= g_[2] >= ...``); if the lower bound of the i-th
  value exceeds the upper bound of the ``(2k - i + 1)``-th, at least i of the estimated top-k pixels stay in the
  top-k of the smoothed map at ``x + delta`` for every ``||delta||_2 <= rho`` (an overlap of i - 1 would need one of
  the k - i + 1 displaced pixels, ranked i or lower, to fall below one of the k - i + 1 entrants, ranked
  2k - i + 1 or higher). `CertifiedMap.certified_topk_fraction` is that i / k; `CertifiedMap.certified_topk_mask`
  names the individual top-k pixels whose lower bound beats the upper bound of the (k + 1)-th.
* **Anani, Lorenz, Fritz & Schiele 2025**, "Pixel-level Certified Explanations via Randomized Smoothing" (ICML;
  arXiv:2506.15499): a per-pixel majority vote. The first ``n0`` draws choose each pixel's mode (in the top k or
  not), the other ``n - n0`` count how often the mode recurs; a one-sided binomial test per pixel at
  ``alpha / d`` (Bonferroni over the pixels) certifies a pixel whose mode probability exceeds ``tau`` for the L2
  radius ``sigma * Phi^-1(tau)``, and abstains otherwise. Inverting the test gives each pixel its Clopper-Pearson
  lower bound ``p_i`` and certified radius ``sigma * Phi^-1(p_i)`` (abstain where ``p_i <= 1/2``), every tau at
  once (`CertifiedMap.certified_pixels`).

What a certificate promises: with probability at least ``1 - alpha`` over the draws, the stated part of the
*smoothed* map (not the raw attribution of x) holds for every perturbation within the radius, for the explained
class fixed (the clean prediction unless given). What it does not: anything about L-infinity budgets beyond the
L2 ball they contain, about the raw map, or about whether the prediction itself changes. Its radii are L2 and
limited by n: no certificate from n draws exceeds `CertifiedMap.max_radius`, however stable the map.

Why written here: no maintained library certifies attributions (Captum, torchattacks and the smoothing libraries
certify classifiers). The draws are batched over samples and noise, each sample's noise seeded by its index (the
numbers do not depend on the batching), on the model's device. ``python -m robustattr.certify --radius R --sigma S
--pixels D`` prints the draws a radius needs.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from dataclasses import dataclass, fields

import numpy as np
import torch
from scipy import stats
from torch import nn

from robustattr.attacks.base import gradient_context
from robustattr.attributions import Attribution
from robustattr.errors import ConfigError
from robustattr.metrics import functional as M
from robustattr.rng import Seed, generator_for, is_per_sample, normal

__all__ = ["CertifiedMap", "NoiseSmoothed", "certify", "hoeffding_error", "required_samples"]


def hoeffding_error(n: int, pixels: int, alpha: float) -> float:
    """Half-width ``t`` within which every one of ``pixels`` means of n draws in [0, 1] lies of its expectation,
    with probability ``1 - alpha`` (Hoeffding, two-sided, union over the pixels)."""
    return math.sqrt(math.log(2 * pixels / alpha) / (2 * n))


def _check(sigma: float, n: int, alpha: float) -> None:
    if not (isinstance(sigma, (int, float)) and math.isfinite(sigma) and sigma > 0):
        raise ConfigError(f"certify: sigma must be a positive number (the noise's standard deviation), got {sigma!r}")
    if not (isinstance(n, int) and n >= 2):
        raise ConfigError(f"certify: n must be an integer of at least 2 draws, got {n!r}")
    if not 0 < alpha < 1:
        raise ConfigError(f"certify: alpha must be in (0, 1) (confidence 1 - alpha), got {alpha!r}")


def required_samples(
    radius: float, sigma: float, pixels: int, alpha: float = 0.05, method: str = "levine", n0: int = 0
) -> int:
    """The fewest draws with which a certificate can reach L2 ``radius`` at all: the best case, a pixel in the top k
    of every draw against competitors that never are (Levine: ``t < 1 - Phi(radius / sigma)``; Anani: all ``n - n0``
    counting draws agree, Clopper-Pearson bound ``(alpha / pixels)^(1 / (n - n0)) > Phi(radius / sigma)``). Real maps
    need more: this is a floor, not a promise."""
    if radius < 0:
        raise ConfigError(f"required_samples: radius must be non-negative, got {radius}")
    _check(sigma, 2, alpha)
    phi = stats.norm.cdf(radius / sigma)
    if method == "levine":
        return math.floor(math.log(2 * pixels / alpha) / (2 * (1 - phi) ** 2)) + 1
    if method == "anani":
        if phi >= 1:
            raise ConfigError(
                f"required_samples: radius {radius} is beyond any finite number of draws at sigma {sigma}"
            )
        return n0 + math.floor(math.log(pixels / alpha) / -math.log(phi)) + 1
    raise ConfigError(f"required_samples: method must be 'levine' or 'anani', got {method!r}")


@dataclass
class CertifiedMap:
    """Both certificates of a batch of N samples (maps H x W, d = H * W pixels), from the same n draws.

    ``smoothed``: the sparsified smoothed map (share of draws with the pixel in the top k); ``levine_radius``: per
    pixel of the estimated top k, the largest L2 radius within which it provably stays in the top k (-inf outside
    the top k; <= 0: not certified); ``overlap_radius``: (N, k), the i-th entry the radius within which at least i
    top-k pixels provably stay; ``mode``: Anani's per-pixel vote (True: in the top k); ``lower``: its
    Clopper-Pearson lower bound at ``alpha / d``; ``anani_radius``: ``sigma * Phi^-1(lower)`` (<= 0: abstain).
    """

    smoothed: torch.Tensor
    levine_radius: torch.Tensor
    overlap_radius: torch.Tensor
    mode: torch.Tensor
    lower: torch.Tensor
    anani_radius: torch.Tensor
    target: torch.Tensor
    k: int
    sigma: float
    n: int
    n0: int
    alpha: float

    @property
    def confidence(self) -> float:
        return 1 - self.alpha

    @property
    def pixels(self) -> int:
        return self.smoothed.shape[1] * self.smoothed.shape[2]

    @property
    def error(self) -> float:
        """Levine's Hoeffding half-width over the d pixels."""
        return hoeffding_error(self.n, self.pixels, self.alpha)

    @property
    def max_radius(self) -> dict[str, float]:
        """The largest radius each certificate can give with these n draws (a map certain in every draw)."""
        t = self.error
        levine = self.sigma * float(stats.norm.ppf(1 - t)) if t < 0.5 else 0.0
        best = (self.alpha / self.pixels) ** (1 / (self.n - self.n0))
        return {"levine": levine, "anani": self.sigma * float(stats.norm.ppf(best))}

    def topk_mask(self) -> torch.Tensor:
        """The estimated smoothed map's top k, the set Levine's certificate is about."""
        return M.topk_mask(self.smoothed, self.k)

    def certified_topk_fraction(self, radius: float) -> torch.Tensor:
        """(N,) Levine: the share of the top-k pixels certified to stay in the top k for every L2 perturbation of
        norm at most ``radius``."""
        return (self.overlap_radius > radius).sum(dim=1).float() / self.k

    def certified_topk_mask(self, radius: float) -> torch.Tensor:
        """(N, H, W) Levine, pixel by pixel: the top-k pixels each provably in the top k within ``radius``."""
        return self.levine_radius > radius

    def certified_pixels(self, radius: float) -> torch.Tensor:
        """(N, H, W) Anani: pixels whose vote (in the top k or not) is certified within ``radius``."""
        return self.anani_radius > radius

    def certified_pixel_fraction(self, radius: float) -> torch.Tensor:
        """(N,) Anani: the share of all pixels certified within ``radius`` (the rest abstain)."""
        return self.certified_pixels(radius).flatten(1).float().mean(dim=1)

    def certified_top_fraction(self, radius: float) -> torch.Tensor:
        """(N,) Anani: the share of the voted top pixels certified within ``radius`` (NaN where no pixel is voted
        in the top k)."""
        top = self.mode.flatten(1)
        certified = (self.certified_pixels(radius).flatten(1) & top).sum(dim=1).float()
        return certified / top.sum(dim=1).float()

    def abstain(self, tau: float = 0.5) -> torch.Tensor:
        """(N, H, W) Anani's abstentions at threshold ``tau`` (certified pixels there hold for ``sigma *
        Phi^-1(tau)``)."""
        if not 0.5 <= tau < 1:
            raise ConfigError(f"CertifiedMap.abstain: tau must be in [0.5, 1), got {tau}")
        return self.lower <= tau

    def select(self, rows) -> CertifiedMap:
        tensors = {f.name: getattr(self, f.name)[rows] for f in fields(self) if f.type == "torch.Tensor"}
        return CertifiedMap(**tensors, k=self.k, sigma=self.sigma, n=self.n, n0=self.n0, alpha=self.alpha)

    @staticmethod
    def concatenate(maps: Sequence[CertifiedMap]) -> CertifiedMap:
        first = maps[0]
        settings = {"k": first.k, "sigma": first.sigma, "n": first.n, "n0": first.n0, "alpha": first.alpha}
        for m in maps[1:]:
            if {key: getattr(m, key) for key in settings} != settings:
                raise ValueError("CertifiedMap.concatenate: the maps were certified with different settings")
        tensors = {
            f.name: torch.cat([getattr(m, f.name) for m in maps]) for f in fields(first) if f.type == "torch.Tensor"
        }
        return CertifiedMap(**tensors, **settings)


class NoiseSmoothed(Attribution):
    """Any differentiable attribution averaged over ``samples`` Gaussian copies ``x + N(0, sigma^2)``: the
    differentiable surrogate an L2 attack ascends to move the certified (sparsified, smoothed) map, whose top-k
    binarisation has no gradient. Over `Saliency` it is SmoothGrad. Stochastic: explanation attacks give it fresh
    noise at every step (expectation over transformation)."""

    stochastic = True

    def __init__(self, attribution: Attribution, sigma: float, samples: int = 16, seed: Seed = 0) -> None:
        super().__init__(attribution.output)
        _check(sigma, 2, 0.5)
        if samples < 1:
            raise ConfigError(f"NoiseSmoothed: samples must be positive, got {samples}")
        self.attribution, self.sigma, self.samples = attribution, float(sigma), int(samples)
        self.seed = tuple(int(v) for v in seed) if is_per_sample(seed) else int(seed)
        self.short_name = f"smoothed_{attribution.short_name}"

    def attribute(self, model, x, target, create_graph):
        generator = generator_for(x.device, self.seed)  # one seed, or one per row (`robustattr.rng`)
        noise = self.sigma * normal((self.samples, *x.shape), generator, x.device, dim=1)
        z = (x.unsqueeze(0) + noise).reshape(-1, *x.shape[1:])
        a = self.attribution(model, z, target.repeat(self.samples), create_graph=create_graph)
        return a.reshape(self.samples, *x.shape).mean(dim=0)

    def __repr__(self) -> str:
        return f"NoiseSmoothed({self.attribution!r}, sigma={self.sigma:g}, samples={self.samples}, seed={self.seed})"


def _top_counts(
    model: nn.Module,
    x: torch.Tensor,
    target: torch.Tensor,
    attribution: Attribution,
    sigma: float,
    n: int,
    n0: int,
    k: int,
    batch_size: int,
    seeds: Sequence[int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sample and pixel, how often the pixel is in the top k of the noisy copies' maps: over the first n0 draws
    and over all n. Sample i's noise comes from its own generator (seed ``seeds[i]``), drawn in order, so the counts
    do not depend on how the draws are batched."""
    N = len(x)
    generators = [torch.Generator(device=x.device).manual_seed(int(s)) for s in seeds]
    first = torch.zeros(N, *x.shape[2:], device=x.device)
    total = torch.zeros_like(first)
    group = min(N, batch_size)
    per = max(1, batch_size // group)
    for g0 in range(0, N, group):
        rows = slice(g0, min(g0 + group, N))
        xs, ts, gens = x[rows], target[rows], generators[rows]
        for start in range(0, n, per):
            stop = min(start + per, n)
            c = stop - start
            noise = torch.stack([torch.randn((c, *x.shape[1:]), generator=g, device=x.device) for g in gens], dim=1)
            z = (xs.unsqueeze(0) + sigma * noise).reshape(-1, *x.shape[1:])  # draw-major: (c * g, C, H, W)
            a = attribution(model, z, ts.repeat(c)).detach()
            top = M.topk_mask(M.pixel_map(a.float()), k).reshape(c, len(xs), *x.shape[2:]).float()
            total[rows] += top.sum(dim=0)
            if start < n0:
                first[rows] += top[: max(0, n0 - start)].sum(dim=0)
    return first, total


def default_n0(n: int) -> int:
    """Anani's mode-selection draws for n draws: 10 of 100 as in their code, 5% of larger budgets, at most half."""
    return max(1, min(max(10, n // 20), n // 2))


def _ndtri(p: torch.Tensor) -> torch.Tensor:
    return torch.special.ndtri(p.double())


def certify(
    model: nn.Module,
    x: torch.Tensor,
    attribution: Attribution,
    sigma: float,
    n: int,
    target: torch.Tensor | None = None,
    k: int | None = None,
    n0: int | None = None,
    alpha: float = 0.05,
    batch_size: int = 1024,
    seed: int = 0,
    index: torch.Tensor | Sequence[int] | None = None,
) -> CertifiedMap:
    """Certify ``attribution``'s top-k pixels of each sample of ``x`` (N, C, H, W in [0, 1]) under L2 perturbations.

    Args:
        model: images -> logits; put in eval mode for the call (BatchNorm frozen), restored after.
        attribution: any attribution (`robustattr.attributions`); its pixel map of each noisy copy is binarised to
            its top k.
        sigma: the Gaussian noise's standard deviation, in pixel units of [0, 1] images; radii scale with it.
        n: draws per sample (Levine et al. used 8192 at 95%; Anani et al. 100 at 99.9%).
        target: the explained class per sample (default: the clean prediction), fixed for every draw.
        k: the top-k size, of the binarisation and of the certified set (default `default_k`).
        n0: Anani's mode-selection draws (default `default_n0`); the other ``n - n0`` test the mode.
        alpha: 1 - confidence, for Levine's union bound over the pixels and Anani's Bonferroni-corrected tests.
        batch_size: noisy images per attribution call (draws of several samples share a call).
        seed, index: sample i's noise is seeded with ``seed + index[i]`` (default index: 0..N-1), so a sample's
            certificate is the same in any batch.
    """
    _check(sigma, n, alpha)
    if x.dim() != 4:
        raise ConfigError(f"certify: x must be (N, C, H, W), got shape {tuple(x.shape)}")
    H, W = x.shape[2:]
    d = H * W
    k = M.default_k(H, W) if k is None else int(k)
    if not 0 < k < d:
        raise ConfigError(f"certify: k must be in [1, {d - 1}] (the top k of {d} pixels), got {k}")
    n0 = default_n0(n) if n0 is None else int(n0)
    if not 0 < n0 < n:
        raise ConfigError(f"certify: n0 must be in [1, n - 1] = [1, {n - 1}], got {n0}")
    if batch_size < 1:
        raise ConfigError(f"certify: batch_size must be positive, got {batch_size}")
    device = next(model.parameters()).device
    x = x.detach().to(device, torch.float32)
    index = torch.arange(len(x)) if index is None else torch.as_tensor(index)
    if len(index) != len(x):
        raise ConfigError(f"certify: index has {len(index)} entries for {len(x)} samples")
    with gradient_context(model):
        if target is None:
            with torch.no_grad():
                target = model(x).argmax(dim=1)
        target = torch.as_tensor(target, device=device).reshape(-1)
        first, total = _top_counts(
            model, x, target, attribution, sigma, n, n0, k, batch_size, [seed + int(i) for i in index]
        )

    # Levine et al.: bounds on the smoothed map, the top-k overlap certificate and the per-pixel one.
    smoothed = total / n
    t = hoeffding_error(n, d, alpha)
    flat = smoothed.flatten(1).double()
    values = flat.sort(dim=1, descending=True).values
    low = _ndtri((values - t).clamp(0, 1))
    high = _ndtri((values + t).clamp(0, 1))
    i = torch.arange(1, k + 1, device=device)
    rival = 2 * k - i  # 0-based position of the (2k - i + 1)-th value
    inf = torch.full((len(x), k), math.inf, dtype=torch.float64, device=device)
    rival_high = torch.where(rival < d, high[:, rival.clamp(max=d - 1)], -inf)
    overlap = sigma / 2 * (low[:, :k] - rival_high)
    top = M.topk_mask(smoothed, k).flatten(1)
    own = _ndtri((flat - t).clamp(0, 1))
    per_pixel = sigma / 2 * (own - high[:, k : k + 1])
    per_pixel = torch.where(top, per_pixel, -math.inf)

    # Anani et al.: the mode from the first n0 draws, its Clopper-Pearson lower bound from the other n - n0.
    mode = (first / n0) > 0.5
    rest = n - n0
    hits = total - first
    agree = torch.where(mode, hits, rest - hits).round().cpu().numpy().astype(np.int64)
    lower = np.where(agree > 0, stats.beta.ppf(alpha / d, np.maximum(agree, 1), rest - agree + 1), 0.0)
    lower = torch.as_tensor(lower, dtype=torch.float64, device=device)
    radius = torch.where(lower > 0.5, sigma * _ndtri(lower), -math.inf)

    shape = (len(x), H, W)
    return CertifiedMap(
        smoothed=smoothed.float().cpu(),
        levine_radius=per_pixel.reshape(shape).float().cpu(),
        overlap_radius=overlap.float().cpu(),
        mode=mode.cpu(),
        lower=lower.float().cpu(),
        anani_radius=radius.float().cpu(),
        target=target.cpu(),
        k=k,
        sigma=float(sigma),
        n=n,
        n0=n0,
        alpha=float(alpha),
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m robustattr.certify", description="The fewest draws a certified L2 radius needs."
    )
    parser.add_argument("--radius", type=float, required=True, help="L2 radius, in pixel units of [0, 1] images")
    parser.add_argument("--sigma", type=float, required=True, help="the smoothing noise's standard deviation")
    parser.add_argument("--pixels", type=int, required=True, help="pixels per map (H * W)")
    parser.add_argument("--alpha", type=float, default=0.05, help="1 - confidence (default 0.05)")
    parser.add_argument("--n0", type=int, default=10, help="Anani's mode-selection draws (default 10)")
    args = parser.parse_args(argv)
    for method in ("levine", "anani"):
        need = required_samples(args.radius, args.sigma, args.pixels, args.alpha, method, args.n0)
        confidence = f"{100 * (1 - args.alpha):g}%"
        print(f"{method}: at least {need} draws for L2 radius {args.radius} at sigma {args.sigma}, {args.pixels} "
              f"pixels, {confidence} confidence (a best case: real maps need more)")  # fmt: skip


if __name__ == "__main__":
    main()
