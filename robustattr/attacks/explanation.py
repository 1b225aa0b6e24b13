"""Attacks on explanations (Ghorbani, Abid & Zou 2019; Dombrowski et al. 2019): find x' in the L-infinity
ball of x that keeps the predicted label but changes the attribution map.

Every step ascends a dissimilarity D between the perturbed and the clean pixel maps, with the gradient taken
through the attribution (double backprop). On a piecewise-linear (ReLU) network that gradient is exactly zero,
so it is computed on a softplus(beta) surrogate that shares the network's weights, while every iterate is
judged on the ORIGINAL network: an iterate whose predicted label changed is not eligible, and per sample the
eligible iterate with the worst metric is kept. Samples with no eligible iterate are reported as not kept.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import torch
from torch import nn

from robustattr.attacks.base import IterativeAttack, generator_for, gradient_context, prepare
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

S = TypeVar("S", bound="AttackState")


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


@dataclass
class CleanExplanation:
    """What an attack measures its damage against, computed once per batch on the original network."""

    x: torch.Tensor  # the clean inputs (fp32, on the model's device)
    target: torch.Tensor  # the explained class: the clean prediction
    logits: torch.Tensor  # the clean logits
    maps: torch.Tensor  # the clean pixel maps (N, H, W)
    k: int  # the top-k size of the metric


@dataclass
class AttackState:
    """An attack's state for one restart; each attack extends it with the constants of its objective (and, for
    an optimiser, its moments), so a restart starts from a fresh state."""

    clean: CleanExplanation


class Judge:
    """The shared rule of every explanation attack: an iterate is judged on the ORIGINAL network; one whose
    predicted label changed is not eligible; per sample the eligible iterate with the highest damage score is
    kept (`keeps` says which eligible iterates replace the kept one)."""

    def __init__(self, clean: CleanExplanation) -> None:
        self.clean = clean
        self.x = clean.x.clone()
        self.maps = clean.maps.clone()
        self.score = torch.full((clean.x.shape[0],), float("-inf"), device=clean.x.device)
        self.kept = torch.zeros(clean.x.shape[0], dtype=torch.bool, device=clean.x.device)

    def keeps(self, eligible: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
        return eligible & (score > self.score)

    def observe(self, x_adv: torch.Tensor, maps: torch.Tensor, logits: torch.Tensor, score: torch.Tensor) -> None:
        eligible = logits.argmax(dim=1) == self.clean.target
        better = self.keeps(eligible, score)
        self.x = torch.where(better.view(-1, 1, 1, 1), x_adv, self.x)
        self.maps = torch.where(better.view(-1, 1, 1), maps, self.maps)
        self.score = torch.where(better, score, self.score)
        self.kept |= eligible

    def result(self, device: torch.device, dtype: torch.dtype) -> ExplanationAttackResult:
        clean = self.clean
        nan = torch.full_like(self.score, float("nan"))
        return ExplanationAttackResult(
            x_adv=self.x.detach().to(device=device, dtype=dtype),
            kept=self.kept.to(device),
            score=torch.where(self.kept, self.score, nan).to(device),
            target=clean.target.to(device),
            maps_clean=clean.maps.to(device),
            maps_adv=self.maps.detach().to(device),
        )


class LastEligible(Judge):
    """Keep the last eligible iterate, whatever its score (a random walk makes no selection)."""

    def keeps(self, eligible: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
        return eligible


class Iterate:
    """One iterate x_t of a run. Its attribution on the original network judges it; a step may ask for the
    ascent gradient of an objective of its attribution, taken by double backprop through the attribution: on
    the network itself when it is smooth (one pass then serves the step and the judge), else on a softplus
    surrogate sharing its weights, with beta annealed by the attack's schedule."""

    def __init__(self, run: _Run, x_adv: torch.Tensor, t: int) -> None:
        self.run, self.x, self.t = run, x_adv.detach(), t
        self._judged: tuple[torch.Tensor, torch.Tensor] | None = None

    def judged(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(maps, logits) on the original network, detached."""
        if self._judged is None:
            attr, logits = self.run.attribution.attribute_and_logits(self.run.model, self.x, self.run.target)
            self._judged = pixel_map(attr), logits
        return self._judged

    def ascent_gradient(
        self, objective: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], cause: Callable[[], str | None]
    ) -> torch.Tensor:
        """d objective(maps, logits).sum() / dx at this iterate; ``cause`` explains a gradient that is zero."""
        network = self.run.gradient_network(self.t)
        x_in = self.x.detach().requires_grad_(True)  # a leaf sharing the iterate's storage: no copy
        attr, logits = self.run.attribution.attribute_and_logits(network, x_in, self.run.target, create_graph=True)
        maps = pixel_map(attr)
        if network is self.run.model:
            self._judged = maps.detach(), logits.detach()
        (grad,) = torch.autograd.grad(objective(maps, logits).sum(), x_in, allow_unused=True)
        if not self.run.checked:
            self.run.checked = True
            require_second_order(grad, f"{type(self.run.attack).__name__} on {self.run.attribution!r}", cause())
        return grad


class _Run:
    """What one call of an attack shares between its iterates: the networks, the explained class, the
    network its gradients go through (built on the first gradient asked for: a softplus surrogate for networks
    with kinked activations, else the network itself)."""

    def __init__(self, attack: ExplanationAttack, model: nn.Module, target: torch.Tensor) -> None:
        self.attack, self.attribution, self.model, self.target = attack, attack.attribution, model, target
        self.checked = False
        self._surrogate: nn.Module | None = None

    def gradient_network(self, t: int) -> nn.Module:
        schedule = self.attack.schedule
        if schedule is None:
            return self.model
        if self._surrogate is None:
            kinked = needs_smooth_surrogate(self.model)  # decided once per call, on the first gradient asked for
            self._surrogate = softplus_surrogate(self.model, schedule.start) if kinked else self.model
        if self._surrogate is not self.model:
            set_beta(self._surrogate, schedule(t, self.attack.steps))
        return self._surrogate


class ExplanationAttack(IterativeAttack, Generic[S]):
    """Base class of the explanation attacks: a shared loop around a per-attack `step` and the shared `Judge`.

    A subclass defines its typed state (`init_state`, fresh per restart), its `step` (by default a signed
    step up the gradient of its `objective`) and its damage `score`.

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
        threat = threat if threat is not None else LinfBall(8 / 255)
        if not isinstance(threat, LinfBall):
            raise ConfigError(f"{type(self).__name__}: explanation attacks use an L-infinity ball (LinfBall)")
        super().__init__(threat, steps, step_size, restarts, random_start, seed)
        self.attribution = attribution if attribution is not None else Saliency()
        self.schedule = BetaSchedule(beta, beta_end) if beta is not None else None
        self.k = k

    @property
    def step_size(self) -> float:
        return self._step_size if self._step_size is not None else self.threat.eps / 8

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.attribution!r}, {self.threat}, steps={self.steps}, "
            f"step_size={self.step_size:.6g}, restarts={self.restarts}, surrogate={self.schedule})"
        )

    # -- what a subclass defines -------------------------------------------------------------------------------
    def init_state(self, clean: CleanExplanation) -> S:
        """The attack's state for one restart (the constants of its objective, computed from the clean maps)."""
        return AttackState(clean)  # type: ignore[return-value]

    def objective(self, maps: torch.Tensor, logits: torch.Tensor, state: S) -> torch.Tensor:
        """(N,) dissimilarity to ascend, differentiable in ``maps`` (and ``logits``)."""
        raise NotImplementedError

    def score(self, maps: torch.Tensor, state: S) -> torch.Tensor:
        """(N,) damage of an iterate, as judged on the original network (higher: more damage)."""
        raise NotImplementedError

    def zero_gradient_cause(self, state: S) -> str | None:
        """Why the objective can have no gradient for these clean maps, when the attack itself can tell."""
        return None

    def step(self, iterate: Iterate, state: S, generator: torch.Generator | None) -> torch.Tensor:
        """The perturbation to add to the iterate (before projection): a signed step up the objective."""
        return _scaled(self.step_size, self.threat.direction(self.ascent(iterate, state)))

    def ascent(self, iterate: Iterate, state: S) -> torch.Tensor:
        """The gradient of the objective at the iterate."""
        return iterate.ascent_gradient(
            lambda maps, logits: self.objective(maps, logits, state), lambda: self.zero_gradient_cause(state)
        )

    def judge(self, clean: CleanExplanation) -> Judge:
        return Judge(clean)

    # -- the loop ----------------------------------------------------------------------------------------------
    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        return self.run(model, x, y).x_adv

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
            maps = pixel_map(attr)
            clean = CleanExplanation(x, target, logits, maps, self.k or default_k(*maps.shape[1:]))
            run, judge = _Run(self, model, target), self.judge(clean)
            for _ in range(self.restarts):
                state = self.init_state(clean)
                x_adv = self.threat.random_start(x, generator) if self.random_start else x.clone()
                for t in range(self.steps + 1):
                    iterate = Iterate(run, x_adv, t)
                    if t < self.steps:
                        x_adv = self.threat.project(iterate.x + self.step(iterate, state, generator), x)
                    if t > 0:  # the start is not judged
                        maps_t, logits_t = iterate.judged()
                        judge.observe(iterate.x, maps_t, logits_t, self.score(maps_t, state))
        return judge.result(input_device, input_dtype)


@dataclass
class MaskState(AttackState):
    mask: torch.Tensor  # (H, W) or (N, H, W) weights of the pixels the objective sums


class TopKAttack(ExplanationAttack[MaskState]):
    """Drain attribution mass from the clean map's top-k pixels: ``D = -sum_{p in topk(I(x))} I(x')_p``.
    Damage score: ``1 - top-k intersection``."""

    short_name = "topk"

    def init_state(self, clean):
        return MaskState(clean, topk_mask(clean.maps, clean.k).to(clean.maps.dtype))

    def objective(self, maps, logits, state):
        return -(maps * state.mask).sum(dim=(1, 2))

    def zero_gradient_cause(self, state):
        k, nonzero = state.clean.k, (state.clean.maps > 0).flatten(1).sum(dim=1)
        if bool((nonzero <= k).all()):
            return (
                f"k={k} covers every non-zero pixel of the clean maps (at most {int(nonzero.max())} here: "
                "attributions that multiply by x - baseline vanish where the image equals the baseline), so the "
                "mass in the top-k pixels is the whole, normalised map: a constant. Use a smaller k"
            )
        return None

    def score(self, maps, state):
        return 1 - topk_intersection(state.clean.maps, maps, state.clean.k)


@dataclass
class CenterState(AttackState):
    center: torch.Tensor  # (N, 2) centre of mass of each clean map


class MassCenterAttack(ExplanationAttack[CenterState]):
    """Move the map's centre of mass: ``D = ||C(I(x')) - C(I(x))||^2``. Damage score: the shift in pixels.

    It starts from a random point of the ball by default: at x' = x the objective is at its minimum, so its
    gradient is zero and the first step would go nowhere on a smooth network."""

    short_name = "mass_center"

    def __init__(self, *args: Any, random_start: bool = True, **kwargs: Any) -> None:
        super().__init__(*args, random_start=random_start, **kwargs)

    def init_state(self, clean):
        return CenterState(clean, center_of_mass(clean.maps))

    def objective(self, maps, logits, state):
        return (center_of_mass(maps) - state.center).pow(2).sum(dim=1)

    def score(self, maps, state):
        return center_shift(state.clean.maps, maps)


class TargetedAttack(ExplanationAttack[MaskState]):
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

    def init_state(self, clean):
        return MaskState(clean, self.region_mask(*clean.maps.shape[1:], clean.maps.device).to(clean.maps.dtype))

    def objective(self, maps, logits, state):
        return (maps * state.mask).sum(dim=(1, 2))

    def score(self, maps, state):
        return (maps * state.mask).sum(dim=(1, 2)) / maps.sum(dim=(1, 2)).clamp_min(1e-12)


class AdamDirection:
    """The update of `torch.optim.Adam` (betas 0.9 / 0.999, bias-corrected, eps 1e-8) at unit learning rate for
    a sequence of ascent gradients. It is read off a parameter zeroed before each step, so that the attack keeps
    its (per-sample) step size and its projection onto the ball while Adam keeps the moments."""

    def __init__(self, like: torch.Tensor) -> None:
        self.param = torch.zeros_like(like, requires_grad=True)
        self.optimizer = torch.optim.Adam([self.param], lr=1.0, maximize=True)

    def __call__(self, grad: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            self.param.zero_()
        self.param.grad = grad.detach()
        self.optimizer.step()
        return self.param.detach().clone()


@dataclass
class TargetMapState(AttackState):
    target_map: torch.Tensor  # (N, H, W) each sample's target map, normalised to sum 1
    probs: torch.Tensor  # (N, C) the clean output the attack must keep
    adam: AdamDirection  # Adam's moments, fresh with each restart


class TargetMapAttack(ExplanationAttack[TargetMapState]):
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

    def init_state(self, clean):
        h, w = clean.maps.shape[1:]
        target_map = torch.roll(clean.maps, shifts=(h // 2, w // 2), dims=(1, 2)) / (h * w)
        return TargetMapState(clean, target_map, clean.logits.softmax(dim=1), AdamDirection(clean.x))

    def _map_distance(self, maps, state):
        hw = maps.shape[1] * maps.shape[2]
        return (maps / hw - state.target_map).pow(2).sum(dim=(1, 2))

    def score(self, maps, state):
        return -self._map_distance(maps, state)

    def objective(self, maps, logits, state):
        out_change = (logits.softmax(dim=1) - state.probs).pow(2).sum(dim=1)
        return -(self._map_distance(maps, state) + self.gamma * out_change)

    def step(self, iterate, state, generator):
        return _scaled(self.step_size, state.adam(self.ascent(iterate, state)))


class RandomSignAttack(ExplanationAttack[AttackState]):
    """The baseline of the same budget: random-sign steps clipped to the ball (one step of size eps by default,
    ``x + eps * sign(N(0, I))`` as in the paper; more steps give the code's random walk). No gradient, no
    selection: the last label-preserving iterate is kept. Damage score: ``1 - top-k intersection``, so it
    compares directly with `TopKAttack`."""

    short_name = "random_sign"

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

    def step(self, iterate, state, generator):
        maps = state.clean.maps  # the noise is drawn in the maps' dtype (as since the attack was written)
        noise = torch.randn(iterate.x.shape, generator=generator, device=maps.device, dtype=maps.dtype)
        return _scaled(self.step_size, noise.sign())

    def score(self, maps, state):
        return 1 - topk_intersection(state.clean.maps, maps, state.clean.k)

    def judge(self, clean):
        return LastEligible(clean)
