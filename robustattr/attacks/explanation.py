"""Attacks on explanations (Ghorbani, Abid & Zou 2019; Dombrowski et al. 2019): find x' in the L-infinity
ball of x that keeps the predicted label but changes the attribution map.

Every step ascends a dissimilarity D between the perturbed and the clean pixel maps, with the gradient taken
through the attribution (double backprop). On a piecewise-linear (ReLU) network that gradient is exactly zero,
so it is computed on a softplus(beta) surrogate that shares the network's weights, while every iterate is
judged on the ORIGINAL network: an iterate whose predicted label changed is not eligible, and per sample the
eligible iterate with the worst metric is kept. Samples with no eligible iterate are reported as not kept.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from robustattr.attacks.base import EpsilonSweepable, generator_for, gradient_context, prepare
from robustattr.attacks.surrogate import BetaSchedule, require_second_order, softplus_surrogate
from robustattr.attacks.threat import LinfBall
from robustattr.attributions.gradient import Attribution, Saliency
from robustattr.errors import ConfigError
from robustattr.metrics.functional import (
    center_of_mass,
    center_shift,
    default_k,
    pixel_map,
    topk_intersection,
    topk_mask,
)
from robustattr.models.activations import needs_smooth_surrogate, set_beta


def _scaled(size: float | torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
    """A step length (one value, or one per sample under a per-sample threat) times a batch of directions."""
    if isinstance(size, torch.Tensor):
        size = size.to(direction).view(-1, *[1] * (direction.dim() - 1))
    return size * direction


@dataclass
class ExplanationAttackResult:
    x_adv: torch.Tensor  # the kept iterate (x itself where none kept the label)
    kept: torch.Tensor  # bool: an iterate kept the clean prediction
    score: torch.Tensor  # the attack's damage score at x_adv (higher: more damage); NaN where not kept
    target: torch.Tensor  # the explained class: the clean prediction
    maps_clean: torch.Tensor  # pixel maps of the clean inputs (N, H, W)
    maps_adv: torch.Tensor  # pixel maps at x_adv


class ExplanationAttack(EpsilonSweepable):
    """Base class of the explanation attacks.

    Args:
        attribution: the attacked method (default Saliency); it must be differentiable (not a Captum adapter).
        threat: the L-infinity ball (default 8/255).
        steps: iterations per restart.
        step_size: default eps/8 (1/255 at 8/255, the RAR/ART setting).
        restarts: independent runs (with ``random_start``), the best eligible iterate over all is kept.
        random_start: start from a random point of the ball.
        beta: softplus beta of the smooth surrogate used for the attack gradient on networks with kinked
            activations (`softplus_surrogate`); None attacks the network itself (right for smooth networks; on
            ReLU networks it raises).
        beta_end: anneal beta geometrically from ``beta`` to ``beta_end`` over the steps.
        k: top-k size for the metric (default: 100 for 32x32, 1000 for 224x224, 1/8 of smaller images).
        seed: seed of random starts and random directions; None (the default) draws from the global RNG, fresh on
            every call (callbacks and the audit inject a seed per chunk, so they are reproducible).
    """

    short_name = "explanation"

    tracks_best = True  # keep the eligible iterate with the highest score (the random baseline keeps the last)

    def __init__(
        self,
        attribution: Attribution | None = None,
        threat: LinfBall | None = None,
        steps: int = 100,
        step_size: float | None = None,
        restarts: int = 1,
        random_start: bool = False,
        beta: float | None = 10.0,
        beta_end: float | None = None,
        k: int | None = None,
        seed: int | None = None,
    ) -> None:
        if steps < 1 or restarts < 1:
            raise ConfigError(f"{type(self).__name__}: steps and restarts must be at least 1")
        if step_size is not None and step_size <= 0:
            raise ConfigError(f"{type(self).__name__}: step_size must be positive, got {step_size}")
        self.attribution = attribution if attribution is not None else Saliency()
        self.threat = threat if threat is not None else LinfBall(8 / 255)
        if not isinstance(self.threat, LinfBall):
            raise ConfigError(f"{type(self).__name__}: explanation attacks use an L-infinity ball (LinfBall)")
        self.steps = steps
        self._step_size = step_size
        self.restarts = restarts
        self.random_start = random_start
        self.schedule = BetaSchedule(beta, beta_end) if beta is not None else None
        self.k = k
        self.seed = seed

    @property
    def step_size(self) -> float:
        return self._step_size if self._step_size is not None else self.threat.eps / 8

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.attribution!r}, {self.threat}, steps={self.steps}, "
            f"step_size={self.step_size:.6g}, restarts={self.restarts}, surrogate={self.schedule})"
        )

    # -- what a subclass defines -------------------------------------------------------------------------------
    def context(self, maps_clean: torch.Tensor, x: torch.Tensor, logits: torch.Tensor) -> dict[str, Any]:
        """Per-batch constants of the objective, computed once from the clean maps."""
        return {"k": self.k or default_k(*maps_clean.shape[1:]), "maps_clean": maps_clean, "input_shape": x.shape}

    def objective(self, maps: torch.Tensor, logits: torch.Tensor, ctx: dict[str, Any]) -> torch.Tensor:
        """(N,) dissimilarity to ascend, differentiable in ``maps`` (and ``logits``)."""
        raise NotImplementedError

    def score(self, maps: torch.Tensor, ctx: dict[str, Any]) -> torch.Tensor:
        """(N,) damage of an iterate, as judged on the original network (higher: more damage)."""
        raise NotImplementedError

    def update(self, grad: torch.Tensor | None, ctx: dict[str, Any], generator: torch.Generator) -> torch.Tensor:
        """The perturbation to add (before projection): a signed-gradient step by default."""
        return _scaled(self.step_size, self.threat.direction(grad))

    uses_gradient = True

    # -- the loop ----------------------------------------------------------------------------------------------
    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        return self.run(model, x, y).x_adv

    def zero_gradient_cause(self, ctx: dict[str, Any]) -> str | None:
        """Why the objective can have no gradient for these clean maps, when the attack itself can tell."""
        return None

    def _ascent_gradient(self, maps: torch.Tensor, logits: torch.Tensor, x_in: torch.Tensor, ctx, check: bool):
        (grad,) = torch.autograd.grad(self.objective(maps, logits, ctx).sum(), x_in, allow_unused=True)
        if check:
            require_second_order(grad, f"{type(self).__name__} on {self.attribution!r}", self.zero_gradient_cause(ctx))
        return grad

    def run(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor | None = None) -> ExplanationAttackResult:
        """Attack the explanation of each sample's predicted class (``y`` is accepted for the common attack
        call; as in Ghorbani et al., the explained class is the clean prediction).

        Cost per step: the attack gradient (a double backward through the attribution) plus judging the new
        iterate on the original network. Without a surrogate (a smooth network) both come from one pass: the
        attribution computed at x_t for the step also judges x_t."""
        input_device, input_dtype = x.device, x.dtype
        with gradient_context(model):
            (x,) = prepare(model, x)
            generator = generator_for(x.device, self.seed)
            with torch.no_grad():
                target = model(x).argmax(dim=1)
            attr, logits = self.attribution.attribute_and_logits(model, x, target)
            maps_clean = pixel_map(attr)
            ctx = self.context(maps_clean, x, logits)
            attacker = model
            if self.uses_gradient and self.schedule is not None and needs_smooth_surrogate(model):
                attacker = softplus_surrogate(model, self.schedule.start)
            fused = self.uses_gradient and attacker is model
            best_x, best_maps = x.clone(), maps_clean.clone()
            best_score = torch.full((x.shape[0],), float("-inf"), device=x.device)
            kept = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
            for restart in range(self.restarts):
                ctx.pop("adam", None)
                x_adv = self.threat.random_start(x, generator) if self.random_start else x.clone()
                for t in range(self.steps + 1):
                    attack_now = t < self.steps
                    x_in = x_adv.detach().requires_grad_(fused and attack_now)
                    if t > 0 or (fused and attack_now):
                        attr, logits = self.attribution.attribute_and_logits(
                            model, x_in, target, create_graph=fused and attack_now
                        )
                        maps = pixel_map(attr)
                    if t > 0:  # judge the current iterate on the original network
                        eligible = logits.detach().argmax(dim=1) == target
                        score = self.score(maps.detach(), ctx)
                        better = eligible & (score > best_score) if self.tracks_best else eligible
                        best_x = torch.where(better.view(-1, 1, 1, 1), x_adv, best_x)
                        best_maps = torch.where(better.view(-1, 1, 1), maps.detach(), best_maps)
                        best_score = torch.where(better, score, best_score)
                        kept |= eligible
                    if not attack_now:
                        break
                    grad = None
                    if self.uses_gradient:
                        check = restart == 0 and t == 0
                        if not fused:
                            if attacker is not model:
                                set_beta(attacker, self.schedule(t, self.steps))
                            x_in = x_adv.detach().requires_grad_(True)
                            attr, logits = self.attribution.attribute_and_logits(
                                attacker, x_in, target, create_graph=True
                            )
                            maps = pixel_map(attr)
                        grad = self._ascent_gradient(maps, logits, x_in, ctx, check)
                    x_adv = self.threat.project(x_adv.detach() + self.update(grad, ctx, generator), x)
        nan = torch.full_like(best_score, float("nan"))
        return ExplanationAttackResult(
            x_adv=best_x.detach().to(device=input_device, dtype=input_dtype),
            kept=kept.to(input_device),
            score=torch.where(kept, best_score, nan).to(input_device),
            target=target.to(input_device),
            maps_clean=maps_clean.to(input_device),
            maps_adv=best_maps.detach().to(input_device),
        )


class TopKAttack(ExplanationAttack):
    """Drain attribution mass from the clean map's top-k pixels: ``D = -sum_{p in topk(I(x))} I(x')_p``.
    Damage score: ``1 - top-k intersection``."""

    short_name = "topk"

    def context(self, maps_clean, x, logits):
        ctx = super().context(maps_clean, x, logits)
        ctx["mask"] = topk_mask(maps_clean, ctx["k"]).to(maps_clean.dtype)
        return ctx

    def objective(self, maps, logits, ctx):
        return -(maps * ctx["mask"]).sum(dim=(1, 2))

    def zero_gradient_cause(self, ctx):
        nonzero = (ctx["maps_clean"] > 0).flatten(1).sum(dim=1)
        if bool((nonzero <= ctx["k"]).all()):
            return (
                f"k={ctx['k']} covers every non-zero pixel of the clean maps (at most {int(nonzero.max())} here: "
                "attributions that multiply by x - baseline vanish where the image equals the baseline), so the "
                "mass in the top-k pixels is the whole, normalised map: a constant. Use a smaller k"
            )
        return None

    def score(self, maps, ctx):
        return 1 - topk_intersection(ctx["maps_clean"], maps, ctx["k"])


class MassCenterAttack(ExplanationAttack):
    """Move the map's centre of mass: ``D = ||C(I(x')) - C(I(x))||^2``. Damage score: the shift in pixels.

    It starts from a random point of the ball by default: at x' = x the objective is at its minimum, so its
    gradient is zero and the first step would go nowhere on a smooth network."""

    short_name = "mass_center"

    def __init__(self, *args: Any, random_start: bool = True, **kwargs: Any) -> None:
        super().__init__(*args, random_start=random_start, **kwargs)

    def context(self, maps_clean, x, logits):
        ctx = super().context(maps_clean, x, logits)
        ctx["center"] = center_of_mass(maps_clean)
        return ctx

    def objective(self, maps, logits, ctx):
        return (center_of_mass(maps) - ctx["center"]).pow(2).sum(dim=1)

    def score(self, maps, ctx):
        return center_shift(ctx["maps_clean"], maps)


class TargetedAttack(ExplanationAttack):
    """Push attribution mass into a target region: ``D = sum_p I(x')_p T_p`` for a binary mask T. ``region`` is
    (row start, row end, column start, column end) as fractions of the image; ``mask`` (H, W) overrides it.
    Damage score: the share of the map's mass inside the region."""

    short_name = "targeted"

    def __init__(
        self, *args: Any, region: tuple[float, float, float, float] = (0.0, 0.5, 0.0, 0.5), **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        r0, r1, c0, c1 = region
        if not (0 <= r0 < r1 <= 1 and 0 <= c0 < c1 <= 1):
            raise ConfigError(f"TargetedAttack: region {region} is not a sub-rectangle of [0, 1] x [0, 1]")
        self.region = region
        self.mask: torch.Tensor | None = None

    def region_mask(self, height: int, width: int, device: torch.device) -> torch.Tensor:
        if self.mask is not None:
            return self.mask.to(device=device, dtype=torch.float32)
        r0, r1, c0, c1 = self.region
        mask = torch.zeros(height, width, device=device)
        mask[round(r0 * height) : max(round(r1 * height), round(r0 * height) + 1),
             round(c0 * width) : max(round(c1 * width), round(c0 * width) + 1)] = 1.0  # fmt: skip
        return mask

    def context(self, maps_clean, x, logits):
        ctx = super().context(maps_clean, x, logits)
        ctx["mask"] = self.region_mask(*maps_clean.shape[1:], maps_clean.device).to(maps_clean.dtype)
        return ctx

    def objective(self, maps, logits, ctx):
        return (maps * ctx["mask"]).sum(dim=(1, 2))

    def score(self, maps, ctx):
        return (maps * ctx["mask"]).sum(dim=(1, 2)) / maps.sum(dim=(1, 2)).clamp_min(1e-12)


class TargetMapAttack(ExplanationAttack):
    """Dombrowski et al.'s manipulation: make the map of x look like a target map ``h_t`` while the output stays,
    minimising ``||h(x') - h_t||^2 + gamma * ||softmax(x') - softmax(x)||^2`` with Adam (learning rate
    ``step_size``), projected onto the ball after each step. ``h`` is the pixel map normalised to sum 1. The
    target of each sample is a function of that sample alone: its own clean map shifted circularly by half the
    image in both directions (a plausible explanation, somewhere else), so it is the same whatever the batch
    (Dombrowski et al. take another image's map; taking it from the batch made a single image its own target and
    the targets change with chunking). Damage score: ``-||h(x') - h_t||^2`` (higher: closer to the target)."""

    short_name = "target_map"

    def __init__(self, *args: Any, gamma: float = 1e6, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.gamma = gamma

    def context(self, maps_clean, x, logits):
        ctx = super().context(maps_clean, x, logits)
        hw = maps_clean.shape[1] * maps_clean.shape[2]
        h, w = maps_clean.shape[1:]
        ctx["target_map"] = torch.roll(maps_clean, shifts=(h // 2, w // 2), dims=(1, 2)) / hw
        ctx["probs"] = logits.softmax(dim=1)
        return ctx

    def _map_distance(self, maps, ctx):
        hw = maps.shape[1] * maps.shape[2]
        return (maps / hw - ctx["target_map"]).pow(2).sum(dim=(1, 2))

    def score(self, maps, ctx):
        return -self._map_distance(maps, ctx)

    def objective(self, maps, logits, ctx):
        out_change = (logits.softmax(dim=1) - ctx["probs"]).pow(2).sum(dim=1)
        return -(self._map_distance(maps, ctx) + self.gamma * out_change)

    def update(self, grad, ctx, generator):
        # Adam (betas 0.9 / 0.999, bias-corrected) on the ascent direction; moments restart with each run.
        if "adam" not in ctx:
            ctx["adam"] = [torch.zeros_like(grad), torch.zeros_like(grad), 0]
        m, v, t = ctx["adam"]
        t += 1
        m.mul_(0.9).add_(grad, alpha=0.1)
        v.mul_(0.999).addcmul_(grad, grad, value=0.001)
        ctx["adam"][2] = t
        return _scaled(self.step_size, (m / (1 - 0.9**t)) / ((v / (1 - 0.999**t)).sqrt() + 1e-8))


class RandomSignAttack(ExplanationAttack):
    """The baseline of the same budget: random-sign steps clipped to the ball (one step of size eps by default,
    ``x + eps * sign(N(0, I))`` as in the paper; more steps give the code's random walk). No gradient, no
    selection: the last label-preserving iterate is kept. Damage score: ``1 - top-k intersection``, so it
    compares directly with `TopKAttack`."""

    short_name = "random_sign"

    tracks_best = False
    uses_gradient = False

    def __init__(
        self,
        attribution: Attribution | None = None,
        threat: LinfBall | None = None,
        steps: int = 1,
        step_size: float | None = None,
        k: int | None = None,
        seed: int | None = None,
    ) -> None:
        super().__init__(attribution, threat, steps, step_size, 1, False, None, None, k, seed)

    @property
    def step_size(self) -> float:
        return self._step_size if self._step_size is not None else self.threat.eps

    def update(self, grad, ctx, generator):
        x = ctx["maps_clean"]
        shape = ctx["input_shape"]
        noise = torch.randn(shape, generator=generator, device=x.device, dtype=x.dtype)
        return _scaled(self.step_size, noise.sign())

    def score(self, maps, ctx):
        return 1 - topk_intersection(ctx["maps_clean"], maps, ctx["k"])
