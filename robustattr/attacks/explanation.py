"""Attacks on explanations (Ghorbani, Abid & Zou 2019; Dombrowski et al. 2019): find x' in the L-infinity
ball of x that keeps the predicted label but changes the attribution map.

Every step ascends a dissimilarity D between the perturbed and the clean pixel maps, with the gradient taken
through the attribution (double backprop). On a piecewise-linear (ReLU) network that gradient is exactly zero,
so it is computed on a softplus(beta) surrogate that shares the network's weights, while every iterate is
judged on the ORIGINAL network: an iterate whose predicted label changed is not eligible, and per sample the
eligible iterate with the worst metric is kept. Samples with no eligible iterate are reported as not kept.

Steps are of a fixed size (the papers) or adaptive (``step_rule="apgd"``, Croce & Hein 2020); stochastic
attributions are attacked with fresh noise at every step (expectation over transformation) and measured with
draws the attack never ascended. `robustattr.attacks.worst_case` runs several of these as one ensemble.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, Literal, TypeVar

import torch
from torch import nn

from robustattr.attacks.base import IterativeAttack, generator_for, gradient_context, prepare
from robustattr.attacks.surrogate import BetaSchedule, require_second_order, softplus_surrogate
from robustattr.attacks.threat import L2Ball, LinfBall
from robustattr.attributions.gradient import Attribution, Saliency
from robustattr.errors import ConfigError
from robustattr.metrics.classes import MAP_METRICS
from robustattr.metrics.functional import (
    center_of_mass,
    center_shift,
    default_k,
    pixel_map,
    topk_intersection,
    topk_mask,
)
from robustattr.models.activations import needs_smooth_surrogate, set_beta
from robustattr.rng import SampleGenerator, Seed, integers, is_per_sample, normal, offset, select

S = TypeVar("S", bound="AttackState")
StepRule = Literal["fixed", "apgd"]


def _scaled(size: float | torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
    """A step length (one value, or one per sample under a per-sample threat) times a batch of directions."""
    if isinstance(size, torch.Tensor):
        size = size.to(direction).view(-1, *[1] * (direction.dim() - 1))
    return size * direction


def metric_damage(metric: str, maps_clean: torch.Tensor, maps: torch.Tensor, k: int) -> torch.Tensor:
    """(N,) damage of perturbed maps by a registered map metric (higher: more damage): the metric itself when
    lower is better (centre shift), its negation when higher is better (top-k intersection, Spearman)."""
    cls = MAP_METRICS[metric]
    value = cls.fn(maps_clean, maps, k).float()
    return -value if cls.higher_is_better else value


def damage_to_metric(metric: str, damage: torch.Tensor) -> torch.Tensor:
    return -damage if MAP_METRICS[metric].higher_is_better else damage


def check_metric(owner: str, metric: str | None) -> None:
    if metric is not None and metric not in MAP_METRICS:
        raise ConfigError(f"{owner}: metric {metric!r} is not a registered map metric ({', '.join(MAP_METRICS)})")


@dataclass
class AttackDiagnostics:
    """What an attack's own gradients looked like (sanity flags in the spirit of RobustBench): attack gradients
    taken per sample and step, how many were identically zero, and on kinked networks how often the smooth
    surrogate predicted what the network itself predicts at the same iterate. Counts are tensors on the attack's
    device (no host synchronisation inside the loop)."""

    gradients: torch.Tensor
    zero_gradients: torch.Tensor
    surrogate_checked: torch.Tensor
    surrogate_agreed: torch.Tensor

    @classmethod
    def empty(cls, device: torch.device) -> AttackDiagnostics:
        return cls(*[torch.zeros((), dtype=torch.long, device=device) for _ in range(4)])

    def merge(self, other: AttackDiagnostics) -> None:
        self.gradients = self.gradients + other.gradients.to(self.gradients.device)
        self.zero_gradients = self.zero_gradients + other.zero_gradients.to(self.gradients.device)
        self.surrogate_checked = self.surrogate_checked + other.surrogate_checked.to(self.gradients.device)
        self.surrogate_agreed = self.surrogate_agreed + other.surrogate_agreed.to(self.gradients.device)

    @property
    def zero_gradient_share(self) -> float:
        n = int(self.gradients)
        return int(self.zero_gradients) / n if n else float("nan")

    @property
    def surrogate_agreement(self) -> float:
        """Share of iterates where the surrogate's prediction equals the network's (NaN: no surrogate used)."""
        n = int(self.surrogate_checked)
        return int(self.surrogate_agreed) / n if n else float("nan")


@dataclass
class ExplanationAttackResult:
    x_adv: torch.Tensor  # the kept iterate (x itself where none kept the label)
    kept: torch.Tensor  # bool: an iterate kept the clean prediction
    score: torch.Tensor  # the attack's damage score at x_adv (higher: more damage); NaN where not kept
    target: torch.Tensor  # the explained class: the clean prediction
    maps_clean: torch.Tensor  # pixel maps of the clean inputs (N, H, W)
    maps_adv: torch.Tensor  # pixel maps at x_adv
    diagnostics: AttackDiagnostics | None = None


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
    kept (`keeps` says which eligible iterates replace the kept one).

    ``tracked``: registered map metrics whose worst value (and the iterate that has it) over the eligible iterates
    is kept too, whatever iterate the damage keeps. ``history`` holds each sample's best damage after every
    judged iterate (for convergence curves)."""

    def __init__(self, clean: CleanExplanation, tracked: Sequence[str] = ()) -> None:
        self.clean = clean
        n, device = clean.x.shape[0], clean.x.device
        self.x = clean.x.clone()
        self.maps = clean.maps.clone()
        self.score = torch.full((n,), float("-inf"), device=device)
        self.kept = torch.zeros(n, dtype=torch.bool, device=device)
        self.tracked = {name: (torch.full((n,), float("-inf"), device=device), clean.x.clone()) for name in tracked}
        self.history: list[torch.Tensor] = []

    def keeps(self, eligible: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
        return eligible & (score > self.score)

    def observe(self, x_adv: torch.Tensor, maps: torch.Tensor, logits: torch.Tensor, score: torch.Tensor) -> None:
        eligible = logits.argmax(dim=1) == self.clean.target
        better = self.keeps(eligible, score)
        self.x = torch.where(better.view(-1, 1, 1, 1), x_adv, self.x)
        self.maps = torch.where(better.view(-1, 1, 1), maps, self.maps)
        self.score = torch.where(better, score, self.score)
        self.kept |= eligible
        for name, (worst, x_worst) in self.tracked.items():
            damage = metric_damage(name, self.clean.maps, maps, self.clean.k)
            worse = eligible & (damage > worst)
            self.tracked[name] = torch.where(worse, damage, worst), torch.where(worse.view(-1, 1, 1, 1), x_adv, x_worst)
        self.history.append(self.score.clone())

    def result(
        self, device: torch.device, dtype: torch.dtype, diagnostics: AttackDiagnostics | None = None
    ) -> ExplanationAttackResult:
        clean = self.clean
        nan = torch.full_like(self.score, float("nan"))
        return ExplanationAttackResult(
            x_adv=self.x.detach().to(device=device, dtype=dtype),
            kept=self.kept.to(device),
            score=torch.where(self.kept, self.score, nan).to(device),
            target=clean.target.to(device),
            maps_clean=clean.maps.to(device),
            maps_adv=self.maps.detach().to(device),
            diagnostics=diagnostics,
        )


class LastEligible(Judge):
    """Keep the last eligible iterate, whatever its score (a random walk makes no selection)."""

    def keeps(self, eligible: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
        return eligible


class Iterate:
    """One iterate x_t of a search. Its attribution on the original network judges it; a step may ask for the
    ascent gradient of an objective of its attribution, taken by double backprop through the attribution: on
    the network itself when it is smooth (one pass then serves the step and the judge), else on a softplus
    surrogate sharing its weights, with beta annealed by the attack's schedule. A stochastic attribution is
    differentiated with fresh noise at every step and judged with a draw no step ascends."""

    def __init__(self, search: Search, x_adv: torch.Tensor, t: int) -> None:
        self.search, self.x, self.t = search, x_adv.detach(), t
        self._judged: tuple[torch.Tensor, torch.Tensor] | None = None
        self.value: torch.Tensor | None = None  # (N,) the ascended objective here, once a gradient was taken
        self.surrogate_pred: torch.Tensor | None = None  # the surrogate's prediction here, when one was used

    def judged(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(maps, logits) on the original network, detached."""
        if self._judged is None:
            search = self.search
            attr, logits = search.judging.attribute_and_logits(search.model, self.x, search.target)
            self._judged = pixel_map(attr), logits
        return self._judged

    def eligible(self) -> torch.Tensor:
        return self.judged()[1].argmax(dim=1) == self.search.target

    def ascent_gradient(
        self, objective: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], cause: Callable[[], str | None]
    ) -> torch.Tensor:
        """d objective(maps, logits).sum() / dx at this iterate; ``cause`` explains a gradient that is zero."""
        search = self.search
        network = search.gradient_network(self.t)
        attribution = search.step_attribution(self.t)
        x_in = self.x.detach().requires_grad_(True)  # a leaf sharing the iterate's storage: no copy
        attr, logits = attribution.attribute_and_logits(network, x_in, search.target, create_graph=True)
        maps = pixel_map(attr)
        if network is search.model and attribution is search.judging:
            self._judged = maps.detach(), logits.detach()
        if network is not search.model:
            self.surrogate_pred = logits.detach().argmax(dim=1)
        value = objective(maps, logits)
        self.value = value.detach()
        (grad,) = torch.autograd.grad(value.sum(), x_in, allow_unused=True)
        if not search.checked:
            search.checked = True
            require_second_order(grad, f"{type(search.attack).__name__} on {search.attribution!r}", cause())
        diagnostics = search.diagnostics
        diagnostics.gradients += len(self.x)
        diagnostics.zero_gradients += (grad.flatten(1).abs().amax(dim=1) == 0).sum()
        return grad


class Search:
    """One call of an attack on a batch: the networks, the explained class, the draws, the judge.

    The network gradients go through is built on the first gradient asked for (a softplus surrogate for networks
    with kinked activations, else the network itself). ``rows``: only these samples of the batch are attacked,
    with the random numbers each would get in the whole batch (random starts and random signs are drawn for the
    whole batch and indexed), so a sample's result does not depend on which others are attacked with it."""

    def __init__(
        self,
        attack: ExplanationAttack,
        model: nn.Module,
        x_full: torch.Tensor,
        rows: torch.Tensor | None,
        generator: torch.Generator | None,
        full_threat: Any,
    ) -> None:
        self.attack, self.model, self.generator = attack, model, generator
        self.x_full, self.rows = x_full, rows
        self.full_threat = full_threat
        self.x = x_full if rows is None else x_full[rows]
        self.attribution = attack.attribution
        # One seed per row (`robustattr.rng`): each attacked row draws from its own generator, and a
        # noise-based attribution's noise is the sample's own (`Attribution.for_samples`), the same as a direct
        # call with these seeds gives.
        self.per_sample = isinstance(generator, SampleGenerator)
        if self.per_sample:
            if rows is not None:
                self.generator = generator.rows(rows)
            if self.attribution.stochastic and is_per_sample(getattr(self.attribution, "seed", None)):
                self.attribution = self.attribution.reseeded(select(self.attribution.seed, rows))  # given per row
            else:
                self.attribution = self.attribution.for_samples(select(attack.seed, rows))
        self.stochastic = attack.fresh_noise and self.attribution.stochastic
        # Judged with a draw of the noise that no step ascends; reported with the method's own draw (`evaluated`).
        self.judging = (
            self.attribution.reseeded(offset(self.attribution.seed, 1)) if self.stochastic else self.attribution
        )
        self.checked = False
        self.diagnostics = AttackDiagnostics.empty(x_full.device)
        self._surrogate: nn.Module | None = None
        self._step_seeds: list[int] = []
        with torch.no_grad():
            self.target = model(self.x).argmax(dim=1)

    def whole_batch(self, draw: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """A random tensor drawn by ``draw(like)`` for the whole batch (``like``: its inputs), restricted to the
        attacked rows; with per-row generators, drawn for the attacked rows only (the same numbers)."""
        if self.per_sample:
            return draw(self.x)
        value = draw(self.x_full)
        return value if self.rows is None else value[self.rows]

    def random_start(self) -> torch.Tensor:
        if self.per_sample:
            return self.attack.threat.random_start(self.x, self.generator)
        return self.whole_batch(lambda like: self.full_threat.random_start(like, self.generator))

    def new_restart(self) -> None:
        """Fresh noise seeds for the steps of the next restart (stochastic attributions only; one per row with
        per-row generators)."""
        if self.stochastic:
            if self.per_sample:
                seeds = integers(0, 2**62, (len(self.x), self.attack.steps), self.generator, "cpu")
                self._step_seeds = [tuple(column) for column in seeds.t().tolist()]
                return
            device = self.generator.device if self.generator is not None else torch.device("cpu")
            seeds = torch.randint(0, 2**62, (self.attack.steps,), generator=self.generator, device=device)
            self._step_seeds = seeds.tolist()

    def step_attribution(self, t: int) -> Attribution:
        return self.attribution.reseeded(self._step_seeds[t]) if self.stochastic else self.judging

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

    def note(self, iterate: Iterate) -> None:
        """Count whether the surrogate predicted what the network predicts at a judged iterate."""
        if iterate.surrogate_pred is not None:
            logits = iterate.judged()[1]
            self.diagnostics.surrogate_checked += len(iterate.x)
            self.diagnostics.surrogate_agreed += (iterate.surrogate_pred == logits.argmax(dim=1)).sum()

    def clean(self) -> CleanExplanation:
        attr, logits = self.judging.attribute_and_logits(self.model, self.x, self.target)
        maps = pixel_map(attr)
        return CleanExplanation(self.x, self.target, logits, maps, self.attack.k or default_k(*maps.shape[1:]))


def measured_maps(attribution: Attribution, model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Pixel maps of ``attribution`` on ``model`` (detached)."""
    return pixel_map(attribution.attribute_and_logits(model, x, target)[0])


class FixedStep:
    """Steps of the attack's own size from each iterate (the papers' loop)."""

    def __init__(self, attack: ExplanationAttack, x: torch.Tensor) -> None:
        self.attack, self.x = attack, x

    def next(self, iterate: Iterate, state: AttackState, generator: torch.Generator | None) -> torch.Tensor:
        return self.attack.threat.project(iterate.x + self.attack.step(iterate, state, generator), self.x)


def apgd_checkpoints(steps: int) -> list[int]:
    """The iterations at which APGD may halve its step: p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} -
    0.03, 0.06) as fractions of the budget (Croce & Hein 2020)."""
    p = [0.0, 0.22]
    while p[-1] < 1:
        p.append(p[-1] + max(p[-1] - p[-2] - 0.03, 0.06))
    return sorted({math.ceil(q * steps) for q in p[1:] if 0 < math.ceil(q * steps) < steps})


class APGDStep:
    """Croce & Hein's (2020) adaptive step for one restart, per sample: the step starts at 2 eps; each step
    moves to ``x + 0.75 (z - x) + 0.25 (x - x_prev)`` with ``z`` the projected step along the attack's direction
    (momentum); at each checkpoint (`apgd_checkpoints`) the step is halved and the search restarts from its
    best point where fewer than 75% of the steps since the last checkpoint raised the objective, or where neither
    the step nor the best value changed since then. Progress is the attack's objective at iterates that keep the
    label (an iterate that changes it counts as no progress and is never the best point)."""

    momentum = 0.75
    oscillation = 0.75

    def __init__(self, attack: ExplanationAttack, x: torch.Tensor) -> None:
        self.attack, self.x = attack, x
        radius = attack.threat.radius(x)
        self.eta = (2 * radius * torch.ones(len(x), *[1] * (x.dim() - 1), device=x.device)).to(x.dtype)
        self.checks = set(apgd_checkpoints(attack.steps))
        self.last_check = 0
        self.prev: torch.Tensor | None = None

    def next(self, iterate: Iterate, state: AttackState, generator: torch.Generator | None) -> torch.Tensor:
        direction = self.attack.direction(iterate, state, generator)
        value = torch.where(iterate.eligible(), iterate.value, float("-inf"))
        base = iterate.x
        if self.prev is None:
            self.best_value, self.best_x, self.best_direction = value, base, direction
            self.previous_value = value
            self.improved = torch.zeros_like(value)
            self.reduced = torch.zeros_like(value, dtype=torch.bool)
            self.best_at_check = value
        else:
            self.improved += (value > self.previous_value).to(value)
            self.previous_value = value
            better = value > self.best_value
            self.best_value = torch.where(better, value, self.best_value)
            self.best_x = torch.where(better.view(-1, 1, 1, 1), base, self.best_x)
            self.best_direction = torch.where(better.view(-1, 1, 1, 1), direction, self.best_direction)
            if iterate.t in self.checks:
                since = iterate.t - self.last_check
                stalled = self.improved <= self.oscillation * since
                no_gain = ~self.reduced & (self.best_at_check >= self.best_value)
                reduce = stalled | no_gain
                self.eta = torch.where(reduce.view(-1, 1, 1, 1), self.eta / 2, self.eta)
                base = torch.where(reduce.view(-1, 1, 1, 1), self.best_x, base)
                direction = torch.where(reduce.view(-1, 1, 1, 1), self.best_direction, direction)
                self.reduced, self.best_at_check = reduce, self.best_value
                self.improved = torch.zeros_like(self.improved)
                self.last_check = iterate.t
        project = self.attack.threat.project
        z = project(base + self.eta * direction, self.x)
        a = 1.0 if self.prev is None else self.momentum
        prev = base if self.prev is None else self.prev
        self.prev = base
        return project(base + a * (z - base) + (1 - a) * (base - prev), self.x)


class ExplanationAttack(IterativeAttack, Generic[S]):
    """Base class of the explanation attacks: a shared loop around a per-attack `direction` and the shared `Judge`.

    A subclass defines its typed state (`init_state`, fresh per restart), its ascent `direction` (by default the
    signed gradient of its `objective`) and its damage `score`.

    Args:
        attribution: the attacked method (default Saliency); it must be differentiable (not a Captum adapter).
        threat: the L-infinity ball (default 8/255) or an L2 ball (`L2Ball`: normalised-gradient steps).
        steps: iterations per restart.
        step_size: default eps/8 (1/255 at 8/255, the RAR/ART setting); with ``step_rule="apgd"`` the adaptive
            step starts at 2 eps instead.
        restarts: independent runs (with ``random_start``), the best eligible iterate over all is kept.
        random_start: start from a random point of the ball.
        beta: softplus beta of the smooth surrogate used for the attack gradient on networks with kinked
            activations (`softplus_surrogate`); None attacks the network itself (right for smooth networks; on
            ReLU networks it raises).
        beta_end: anneal beta geometrically from ``beta`` to ``beta_end`` over the steps.
        k: top-k size for the metric (default: 100 for 32x32, 1000 for 224x224, 1/8 of smaller images).
        seed: seed of random starts and random directions; None (the default) draws from the global RNG, fresh on
            every call; an int gives the batch one private stream (the callbacks inject one per chunk); one int per
            row gives each sample its own (the audit seeds samples by index, `robustattr.rng`).
        metric: judge iterates by this registered map metric (`MAP_METRICS`: the kept iterate is the eligible one
            with its worst value) instead of the attack's own score.
        step_rule: ``"fixed"`` (steps of ``step_size``) or ``"apgd"`` (Croce & Hein's adaptive step: momentum,
            halved when progress stalls, restarts from the best point; `APGDStep`).
        fresh_noise: for stochastic attributions (SmoothGrad, Uniform Gradient): differentiate each step with a
            fresh draw of the noise (expectation over transformation, Athalye et al. 2018), judge iterates with a
            draw no step used, and report maps with the method's own draw. False reuses the method's one draw for
            everything, which lets the attack overfit it (kept to show that pitfall).
    """

    short_name = "explanation"
    gradient_free = False  # the attack ascends an objective of the attribution (the random walk does not)
    tracked: tuple[str, ...] = ()  # map metrics whose worst values the judge also keeps (set by ensembles)

    def __init__(
        self,
        attribution: Attribution | None = None,
        threat: LinfBall | L2Ball | None = None,
        steps: int = 100,
        step_size: float | None = None,
        restarts: int = 1,
        random_start: bool = False,
        beta: float | None = 10.0,
        beta_end: float | None = None,
        k: int | None = None,
        seed: Seed = None,
        metric: str | None = None,
        step_rule: StepRule = "fixed",
        fresh_noise: bool = True,
    ) -> None:
        threat = threat if threat is not None else LinfBall(8 / 255)
        if not isinstance(threat, LinfBall | L2Ball):
            raise ConfigError(
                f"{type(self).__name__}: explanation attacks use an L-infinity or an L2 ball (LinfBall, L2Ball), "
                f"got {type(threat).__name__}"
            )
        super().__init__(threat, steps, step_size, restarts, random_start, seed)
        self.attribution = attribution if attribution is not None else Saliency()
        self.schedule = BetaSchedule(beta, beta_end) if beta is not None else None
        self.k = k
        check_metric(type(self).__name__, metric)
        if step_rule not in ("fixed", "apgd"):
            raise ConfigError(f"{type(self).__name__}: step_rule must be 'fixed' or 'apgd', got {step_rule!r}")
        if step_rule == "apgd" and self.gradient_free:
            raise ConfigError(f"{type(self).__name__} ascends no objective: the APGD step rule does not apply")
        self.metric = metric
        self.step_rule = step_rule
        self.fresh_noise = fresh_noise

    @property
    def step_size(self) -> float:
        return self._step_size if self._step_size is not None else self.threat.eps / 8

    def __repr__(self) -> str:
        rule = "apgd" if self.step_rule == "apgd" else f"step_size={self.step_size:.6g}"
        judged = f", metric={self.metric}" if self.metric else ""
        return (
            f"{type(self).__name__}({self.attribution!r}, {self.threat}, steps={self.steps}, {rule}, "
            f"restarts={self.restarts}, surrogate={self.schedule}{judged})"
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

    def direction(self, iterate: Iterate, state: S, generator: torch.Generator | None) -> torch.Tensor:
        """The unit ascent direction at the iterate: the signed gradient of the objective."""
        return self.threat.direction(self.ascent(iterate, state))

    def step(self, iterate: Iterate, state: S, generator: torch.Generator | None) -> torch.Tensor:
        """The perturbation to add to the iterate (before projection): ``step_size`` along `direction`."""
        return _scaled(self.step_size, self.direction(iterate, state, generator))

    def ascent(self, iterate: Iterate, state: S) -> torch.Tensor:
        """The gradient of the objective at the iterate."""
        return iterate.ascent_gradient(
            lambda maps, logits: self.objective(maps, logits, state), lambda: self.zero_gradient_cause(state)
        )

    def judge(self, clean: CleanExplanation) -> Judge:
        return Judge(clean, self.tracked)

    def damage(self, maps: torch.Tensor, state: S) -> torch.Tensor:
        """(N,) what the judge ranks iterates by: ``metric`` when one is set, else the attack's own score."""
        if self.metric is not None:
            return metric_damage(self.metric, state.clean.maps, maps, state.clean.k)
        return self.score(maps, state)

    # -- the loop ----------------------------------------------------------------------------------------------
    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        return self.run(model, x, y).x_adv

    def run(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor | None = None, rows: torch.Tensor | None = None
    ) -> ExplanationAttackResult:
        """Attack the explanation of each sample's predicted class (``y`` is accepted for the common attack
        call; as in Ghorbani et al., the explained class is the clean prediction). ``rows``: attack only these
        samples of the batch (the result has one entry per row), each with the random numbers it would get in
        the whole batch.

        Cost per step: the attack gradient (a double backward through the attribution) plus judging the new
        iterate on the original network. Without a surrogate (a smooth network) and with a deterministic
        attribution both come from one pass: the attribution computed at x_t for the step also judges x_t."""
        input_device, input_dtype = x.device, x.dtype
        with gradient_context(model):
            (x,) = prepare(model, x)
            search, judge = self.search(model, x, rows)
            if search.stochastic:  # report with the method's own draw, which neither the steps nor the judge used
                clean = search.attribution
                judge.clean.maps = measured_maps(clean, model, judge.clean.x, judge.clean.target)
                judge.maps = measured_maps(clean, model, judge.x, judge.clean.target)
                judge.score = torch.where(
                    judge.kept, self.damage(judge.maps, self.init_state(judge.clean)), judge.score
                )
            return judge.result(input_device, input_dtype, search.diagnostics)

    def search(self, model: nn.Module, x: torch.Tensor, rows: torch.Tensor | None = None) -> tuple[Search, Judge]:
        """The attack on prepared inputs inside `gradient_context`: its `Search` and its `Judge` (with the values
        of the judging draw, for an ensemble that selects across attacks before measuring)."""
        attack = self
        if rows is not None:
            rows = rows.to(x.device)
            attack = copy.copy(self)
            attack.threat = self.threat.rows(rows)
        search = Search(attack, model, x, rows, generator_for(x.device, self.seed), self.threat)
        clean = search.clean()
        judge = attack.judge(clean)
        for _ in range(attack.restarts):
            state = attack.init_state(clean)
            rule = APGDStep(attack, search.x) if attack.step_rule == "apgd" else FixedStep(attack, search.x)
            search.new_restart()
            x_adv = search.random_start() if attack.random_start else search.x.clone()
            for t in range(attack.steps + 1):
                iterate = Iterate(search, x_adv, t)
                if t < attack.steps:
                    x_adv = rule.next(iterate, state, search.generator)
                if t > 0:  # the start is not judged
                    maps_t, logits_t = iterate.judged()
                    judge.observe(iterate.x, maps_t, logits_t, attack.damage(maps_t, state))
                    search.note(iterate)
        return search, judge


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

    def direction(self, iterate, state, generator):
        return state.adam(self.ascent(iterate, state))


class RandomSignAttack(ExplanationAttack[AttackState]):
    """The baseline of the same budget: random-sign steps clipped to the ball (one step of size eps by default,
    ``x + eps * sign(N(0, I))`` as in the paper; more steps give the code's random walk; in an L2 ball a step of
    size eps along a uniformly random direction). No gradient, no
    selection: the last label-preserving iterate is kept. Damage score: ``1 - top-k intersection``, so it
    compares directly with `TopKAttack`."""

    short_name = "random_sign"
    gradient_free = True

    def __init__(
        self,
        attribution: Attribution | None = None,
        threat: LinfBall | L2Ball | None = None,
        steps: int = 1,
        step_size: float | None = None,
        k: int | None = None,
        seed: Seed = None,
        metric: str | None = None,
    ) -> None:
        super().__init__(attribution, threat, steps, step_size, 1, False, None, None, k, seed, metric)

    @property
    def step_size(self) -> float:
        return self._step_size if self._step_size is not None else self.threat.eps

    def direction(self, iterate, state, generator):
        maps, search = state.clean.maps, iterate.search  # noise in the maps' dtype, drawn for the whole batch
        noise = search.whole_batch(lambda like: normal(like.shape, generator, maps.device, maps.dtype))
        return self.threat.direction(noise)  # L-infinity: random signs; L2: a uniform direction on the sphere

    def score(self, maps, state):
        return 1 - topk_intersection(state.clean.maps, maps, state.clean.k)

    def judge(self, clean):
        return LastEligible(clean, self.tracked)
