"""The strongest explanation attack we can run: an ensemble, as AutoAttack is for accuracy (Croce & Hein 2020).

One attack of fixed budget gives an upper bound of unknown slack on an explanation's robustness. The ensemble runs
several attacks on the same inputs and keeps, per sample, the label-preserving iterate with the worst value of one
map metric found by any of them:

- the random-sign baseline of Ghorbani et al. (a floor: what noise of the same size does);
- the top-k, mass-center and targeted attacks with Croce & Hein's adaptive step (`APGDStep`: momentum, step
  halved when progress stalls, restart from the best point), every one of them judged by the ensemble's metric;
- on networks with kinked activations, each of those through softplus surrogates of several betas (a smooth
  surrogate sees curvature a sharp one hides, a sharp one follows the network more closely);
- ``restarts`` rounds: the first from each member's own start, the others from random points of the ball.

Members run one after another, each on the samples that can still get worse (a sample whose metric reached its
worst possible value, a top-k intersection of 0, is not attacked again: AutoAttack's "re-attack only what is not
broken"). Each member draws its random numbers for the whole batch, so a member's result on a sample does not
depend on which other samples it attacked: the ensemble is at least as damaging as each of its members run alone,
on every sample. Stochastic attributions are attacked with fresh noise at every step and selected with a draw no
step used; the ensemble's answer, and each member's, is measured with the method's own draw, which no step and no
selection used. The dominance above then holds for the selection draw; on the measurement draw a member can come out
a little ahead of the ensemble on a sample (the noise between two draws), and the trace (convergence curve) is on the
selection draw.

The result carries what a number needs to be trusted: every member's per-sample value, the worst value so far
against the budget spent (`WorstCaseResult.curve`, `converged`), and the attack's diagnostics (`sanity_checks`).
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from robustattr.attacks.base import IterativeAttack, gradient_context, prepare
from robustattr.attacks.explanation import (
    AttackDiagnostics,
    ExplanationAttack,
    ExplanationAttackResult,
    MassCenterAttack,
    RandomSignAttack,
    TargetedAttack,
    TopKAttack,
    check_metric,
    damage_to_metric,
    measured_maps,
    metric_damage,
)
from robustattr.attacks.surrogate import BetaSchedule
from robustattr.attacks.threat import L2Ball, LinfBall
from robustattr.attributions.gradient import Attribution, Saliency
from robustattr.errors import ConfigError
from robustattr.metrics.classes import MAP_METRICS
from robustattr.metrics.intervals import paired_difference
from robustattr.models.activations import needs_smooth_surrogate
from robustattr.rng import Seed, is_per_sample


def worst_possible_damage(metric: str) -> float | None:
    """The damage at the metric's worst possible value (a top-k intersection of 0); None for unbounded metrics."""
    cls = MAP_METRICS[metric]
    return None if cls.worst is None else (-cls.worst if cls.higher_is_better else cls.worst)


def default_members() -> list[ExplanationAttack]:
    """Random sign (the floor), then the top-k, mass-center and targeted attacks with the adaptive step."""
    return [
        RandomSignAttack(),
        TopKAttack(step_rule="apgd"),
        MassCenterAttack(step_rule="apgd"),
        TargetedAttack(step_rule="apgd"),
    ]


@dataclass
class WorstCaseResult(ExplanationAttackResult):
    metric: str = "topk_intersection"
    values: torch.Tensor | None = None  # (N,) the metric at x_adv; NaN where no iterate kept the label
    tracked: dict[str, torch.Tensor] = field(default_factory=dict)  # (N,) worst value of each tracked metric
    members: dict[str, torch.Tensor] = field(default_factory=dict)  # (N,) each member's best; NaN: not kept/attacked
    budget: torch.Tensor | None = None  # (T,) steps spent after each row of ``trace``
    trace: torch.Tensor | None = None  # (T, N) each sample's worst metric value so far (no damage before any)
    runs: list[dict[str, Any]] = field(default_factory=list)  # member, round, beta, samples attacked, seconds

    def select(self, index: torch.Tensor | slice) -> WorstCaseResult:
        """The result on some of the samples (e.g. one epsilon of a stacked sweep); diagnostics stay those of the
        whole call."""

        def pick(t: torch.Tensor) -> torch.Tensor:
            return t[index]

        return WorstCaseResult(
            x_adv=pick(self.x_adv), kept=pick(self.kept), score=pick(self.score), target=pick(self.target),
            maps_clean=pick(self.maps_clean), maps_adv=pick(self.maps_adv), diagnostics=self.diagnostics,
            metric=self.metric, values=pick(self.values), tracked={m: pick(v) for m, v in self.tracked.items()},
            members={m: pick(v) for m, v in self.members.items()}, budget=self.budget, trace=self.trace[:, index],
            runs=self.runs,
        )  # fmt: skip

    @classmethod
    def concatenate(cls, results: list[WorstCaseResult]) -> WorstCaseResult:
        """Results of the same attack on consecutive chunks of samples as one. A call stops when every sample
        reached the metric's floor, so its trace ends early: it is extended with its last row (nothing changed after),
        and the runs are those of the longest call, with the seconds of every call."""
        if not results:
            raise ValueError("WorstCaseResult.concatenate: no results")
        longest = max(results, key=lambda r: len(r.budget))
        length = len(longest.budget)
        traces = [torch.cat([r.trace, r.trace[-1:].expand(length - len(r.trace), -1)]) for r in results]
        names = list(dict.fromkeys(name for r in results for name in r.members))

        def cat(get) -> torch.Tensor:
            return torch.cat([get(r) for r in results])

        def member(r: WorstCaseResult, name: str) -> torch.Tensor:
            return r.members.get(name, torch.full_like(r.values, float("nan")))

        diagnostics = None
        if all(r.diagnostics is not None for r in results):
            diagnostics = AttackDiagnostics.empty(results[0].diagnostics.gradients.device)
            for r in results:
                diagnostics.merge(r.diagnostics)
        seconds: dict[tuple, float] = {}
        for r in results:
            for run in r.runs:
                key = (run["member"], run["round"])
                seconds[key] = seconds.get(key, 0.0) + run["seconds"]
        runs = [{**run, "seconds": round(seconds[(run["member"], run["round"])], 3),
                 "samples": sum(x["samples"] for r in results for x in r.runs
                                if (x["member"], x["round"]) == (run["member"], run["round"]))}
                for run in longest.runs]  # fmt: skip
        return cls(
            x_adv=cat(lambda r: r.x_adv), kept=cat(lambda r: r.kept), score=cat(lambda r: r.score),
            target=cat(lambda r: r.target), maps_clean=cat(lambda r: r.maps_clean),
            maps_adv=cat(lambda r: r.maps_adv), diagnostics=diagnostics, metric=results[0].metric,
            values=cat(lambda r: r.values), tracked={m: cat(lambda r, m=m: r.tracked[m]) for m in results[0].tracked},
            members={name: cat(lambda r, name=name: member(r, name)) for name in names}, budget=longest.budget,
            trace=torch.cat(traces, dim=1), runs=runs,
        )  # fmt: skip

    def curve(self) -> tuple[np.ndarray, np.ndarray]:
        """(steps spent, mean worst-so-far metric over the samples kept in the end)."""
        keep = self.kept.cpu()
        budget = self.budget.cpu().numpy()
        if not bool(keep.any()):
            return budget, np.full(len(budget), np.nan)
        return budget, self.trace.cpu()[:, keep].double().mean(dim=1).numpy()

    def gain(self, start: int, stop: int) -> float:
        """How far the steps of trace rows ``start`` to ``stop`` moved the mean metric towards more damage."""
        _, mean = self.curve()
        moved = mean[start] - mean[stop]
        return float(moved if MAP_METRICS[self.metric].higher_is_better else -moved)

    def last_quarter_gains(self) -> dict[str, float]:
        """What the last quarter of the budget still gained (``budget``: more restarts would help) and the most
        that the last quarter of any one gradient run gained (``steps``: more steps per run would help), in metric
        units towards more damage. The ensemble's result does not depend on the order of its runs, but a gain
        measured only at the end of the whole budget would: a weak member run last would hide that the strongest
        one had not converged, so every run's last quarter is checked too."""
        last = len(self.budget) - 1
        gains = {"budget": self.gain(math.floor(0.75 * last), last), "steps": 0.0}
        for run in self.runs:
            start, stop = run["rows"]
            if run["steps"] > 1:
                gains["steps"] = max(gains["steps"], self.gain(start + math.floor(0.75 * (stop - start)), stop))
        return gains

    def converged(self, tolerance: float = 0.01) -> bool:
        """False when the last quarter of the budget, or of any one run's steps, still moved the mean metric by more
        than ``tolerance``."""
        gains = self.last_quarter_gains().values()
        return bool(all(math.isfinite(g) for g in gains) and max(gains) <= tolerance)


def member_seed(seed: Seed, *salt: int) -> Seed:
    """The seed of a member run (an int: numpy's SeedSequence of (seed, *salt); per row, the same row by row)."""
    if is_per_sample(seed):
        return tuple(member_seed(s, *salt) for s in seed)
    return None if seed is None else int(np.random.SeedSequence([seed, *salt]).generate_state(1)[0])


class WorstCaseExplanationAttack(IterativeAttack):
    """Per sample, the worst value of ``metric`` that any member finds: see the module docstring.

    The call shape is that of `ExplanationAttack` (``run(model, x, y) -> WorstCaseResult``, an
    `ExplanationAttackResult` with more fields), so callbacks and audit sections take it where they take one
    attack; ``attribution``, ``threat`` (one radius or one per sample), ``k`` and ``seed`` are set on every member.

    Args:
        attribution: the attacked method (default Saliency).
        threat: the L-infinity ball (default 8/255) or an L2 ball (`L2Ball`, e.g. beside an L2 certificate).
        metric: the registered map metric whose worst value is sought (`MAP_METRICS`), default top-k intersection.
        members: the attacks run (default `default_members`); each is judged by ``metric``. The members' own
            steps, restarts, surrogates and seeds are replaced by the ensemble's budget, except the steps of
            gradient-free members (random sign).
        steps: iterations of every gradient member per run.
        restarts: rounds; round 0 starts each member where it starts by default, later rounds from random points.
        betas: softplus betas of the surrogates on networks with kinked activations (each gradient member runs once
            per beta per round); ignored on smooth networks, which are attacked directly. Default [30, 100]: on the
            quickstart ReLU CNN at 8/255 the ensemble's top-k intersection was 0.605 with betas [3, 1], 0.548 with
            [10, 3] and 0.481 with [10, 30] (128 test digits, 50 steps x 2 rounds), and 0.494 with [30], 0.486 with
            [30, 100] (64 test digits, 25 steps x 2 rounds): sharp surrogates follow this network more closely.
        k: top-k size of the maps' comparison (default `default_k`).
        seed: seed of every member's random numbers (each run gets its own stream from it); None draws from the
            global RNG.
        tracked: other map metrics whose worst value over every iterate visited is kept too (default Spearman).
    """

    short_name = "worst_case"

    def __init__(
        self,
        attribution: Attribution | None = None,
        threat: LinfBall | L2Ball | None = None,
        metric: str = "topk_intersection",
        members: list[ExplanationAttack] | None = None,
        steps: int = 100,
        restarts: int = 2,
        betas: list[float] | None = None,
        k: int | None = None,
        seed: int | None = None,
        tracked: list[str] | None = None,
    ) -> None:
        threat = threat if threat is not None else LinfBall(8 / 255)
        if not isinstance(threat, LinfBall | L2Ball):
            raise ConfigError(
                "WorstCaseExplanationAttack: explanation attacks use an L-infinity or an L2 ball (LinfBall, L2Ball), "
                f"got {type(threat).__name__}"
            )
        super().__init__(threat, steps, None, restarts, True, seed)
        check_metric("WorstCaseExplanationAttack", metric)
        self.attribution = attribution if attribution is not None else Saliency()
        self.metric = metric
        self.members = list(members) if members is not None else default_members()
        if not self.members or not all(isinstance(m, ExplanationAttack) for m in self.members):
            raise ConfigError("WorstCaseExplanationAttack: members must be a non-empty list of explanation attacks")
        names = [m.short_name for m in self.members]
        if len(set(names)) != len(names):
            raise ConfigError(f"WorstCaseExplanationAttack: members {names} repeat an attack")
        self.betas = [float(b) for b in betas] if betas is not None else [30.0, 100.0]
        if not self.betas or any(b <= 0 for b in self.betas):
            raise ConfigError(f"WorstCaseExplanationAttack: betas must be positive, got {self.betas}")
        self.k = k
        tracked = list(tracked) if tracked is not None else ["spearman"]
        for name in tracked:
            check_metric("WorstCaseExplanationAttack (tracked)", name)
        self.tracked = tuple(name for name in tracked if name != metric)

    def __repr__(self) -> str:
        members = ", ".join(m.short_name for m in self.members)
        return (
            f"WorstCaseExplanationAttack({self.attribution!r}, {self.threat}, metric={self.metric}, "
            f"members=[{members}], steps={self.steps}, restarts={self.restarts}, betas={self.betas})"
        )

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        return self.run(model, x, y).x_adv

    # -- the plan ------------------------------------------------------------------------------------------------
    def plan(self, kinked: bool) -> list[tuple[str, int, ExplanationAttack]]:
        """(name, round, configured member) of every run, in order: in round 0 the gradient-free members first
        (a cheap floor), then every gradient member at every beta; later rounds the gradient members only."""
        betas: list[float | None] = list(self.betas) if kinked else [None]
        runs = []
        for r in range(self.restarts):
            for i, member in enumerate(self.members):
                if member.gradient_free:
                    if r == 0:
                        runs.append((member.short_name, r, self._configure(member, None, r, i)))
                    continue
                for beta in betas:
                    name = member.short_name + (f"@beta{beta:g}" if beta is not None and len(betas) > 1 else "")
                    runs.append((name, r, self._configure(member, beta, r, i)))
        return sorted(runs, key=lambda run: (run[1], not run[2].gradient_free))

    def _configure(self, member: ExplanationAttack, beta: float | None, round_: int, index: int) -> ExplanationAttack:
        m = copy.copy(member)
        m.attribution, m.threat, m.k, m.metric, m.tracked = (
            self.attribution.for_samples(self.seed),  # per-row seeds: every member draws each sample's own noise
            self.threat,
            self.k,
            self.metric,
            self.tracked,
        )
        if not m.gradient_free:
            m.steps, m.restarts = self.steps, 1
            m.random_start = member.random_start or round_ > 0
            m.schedule = BetaSchedule(beta) if beta is not None else None
        m.seed = member_seed(self.seed, index, round_)
        if beta is not None and m.seed is not None:
            m.seed = member_seed(m.seed, int(beta * 1000))
        return m

    def budget(self, kinked: bool) -> int:
        """Steps of every run of the plan together (each step: one attack gradient and one judged iterate)."""
        return sum(m.steps * m.restarts for _, _, m in self.plan(kinked))

    # -- the run ---------------------------------------------------------------------------------------------------
    def run(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor | None = None) -> WorstCaseResult:
        input_device, input_dtype = x.device, x.dtype
        with gradient_context(model):
            (x,) = prepare(model, x)
            n, device = len(x), x.device
            worst_damage = worst_possible_damage(self.metric)
            best = torch.full((n,), float("-inf"), device=device)  # damage: higher is worse for the explanation
            best_x, kept = x.clone(), torch.zeros(n, dtype=torch.bool, device=device)
            tracked = {name: (torch.full((n,), float("-inf"), device=device), x.clone()) for name in self.tracked}
            members: dict[str, torch.Tensor] = {}
            members_x: dict[str, torch.Tensor] = {}
            diagnostics = AttackDiagnostics.empty(device)
            trace: list[torch.Tensor] = []  # damage so far per sample, after every judged iterate of every run
            runs: list[dict[str, Any]] = []
            for name, round_, member in self.plan(needs_smooth_surrogate(model)):
                done = kept & (best >= worst_damage) if worst_damage is not None else torch.zeros_like(kept)
                active = (~done).nonzero().flatten()
                if len(active) == 0:
                    break
                start = time.perf_counter()
                search, judge = member.search(model, x, None if len(active) == n else active)
                if not trace:  # the first run attacks every sample: its clean explanation is the ensemble's
                    clean, target, stochastic = judge.clean, search.target, search.stochastic
                    best_maps = clean.maps.clone()
                    trace.append(metric_damage(self.metric, clean.maps, clean.maps, clean.k))  # no damage yet
                damage = torch.where(judge.kept, judge.score, float("-inf"))
                better = damage > best[active]
                best[active] = torch.where(better, damage, best[active])
                best_x[active] = torch.where(better.view(-1, 1, 1, 1), judge.x, best_x[active])
                best_maps[active] = torch.where(better.view(-1, 1, 1), judge.maps, best_maps[active])
                kept[active] |= judge.kept
                for metric, (value, x_worst) in judge.tracked.items():
                    ensemble_value, ensemble_x = tracked[metric]
                    worse = value > ensemble_value[active]
                    ensemble_value[active] = torch.where(worse, value, ensemble_value[active])
                    ensemble_x[active] = torch.where(worse.view(-1, 1, 1, 1), x_worst, ensemble_x[active])
                record = members.setdefault(name, torch.full((n,), float("-inf"), device=device))
                improved = damage > record[active]
                record[active] = torch.where(improved, damage, record[active])
                if stochastic:  # each member's own iterate, to measure it as the ensemble's is measured
                    member_x = members_x.setdefault(name, x.clone())
                    member_x[active] = torch.where(improved.view(-1, 1, 1, 1), judge.x, member_x[active])
                first_row = len(trace) - 1
                for row in judge.history:  # the judge's best so far (-inf before any eligible iterate)
                    now = trace[-1].clone()
                    now[active] = torch.maximum(now[active], row)
                    trace.append(now)
                diagnostics.merge(search.diagnostics)
                runs.append(
                    {
                        "member": name,
                        "round": round_,
                        "beta": None if member.schedule is None else member.schedule.start,
                        "steps": member.steps,
                        "samples": len(active),
                        "rows": (first_row, len(trace) - 1),
                        "seconds": round(time.perf_counter() - start, 3),
                    }
                )
            values = damage_to_metric(self.metric, best)
            tracked_values = {m: damage_to_metric(m, v) for m, (v, _) in tracked.items()}
            if stochastic:  # measured with the method's own draw: no step and no selection used it
                own = self.attribution.for_samples(self.seed)
                maps_clean = measured_maps(own, model, x, target)
                best_maps = measured_maps(own, model, best_x, target)
                values = MAP_METRICS[self.metric].fn(maps_clean, best_maps, clean.k).float()
                for name, x_member in members_x.items():  # every member measured with the same unseen draw
                    measured = metric_damage(
                        self.metric, maps_clean, measured_maps(own, model, x_member, target), clean.k
                    )
                    members[name] = torch.where(torch.isfinite(members[name]), measured, members[name])
                for m, (_, x_worst) in tracked.items():
                    tracked_values[m] = (
                        MAP_METRICS[m].fn(maps_clean, measured_maps(own, model, x_worst, target), clean.k).float()
                    )
            else:
                maps_clean = clean.maps
            nan = torch.tensor(float("nan"), device=device)
            return WorstCaseResult(
                x_adv=best_x.detach().to(device=input_device, dtype=input_dtype),
                kept=kept.to(input_device),
                score=torch.where(kept, metric_damage(self.metric, maps_clean, best_maps, clean.k), nan).to(
                    input_device
                ),
                target=target.to(input_device),
                maps_clean=maps_clean.to(input_device),
                maps_adv=best_maps.detach().to(input_device),
                diagnostics=diagnostics,
                metric=self.metric,
                values=torch.where(kept, values, nan).to(input_device),
                tracked={m: torch.where(kept, v, nan).to(input_device) for m, v in tracked_values.items()},
                members={
                    name: torch.where(torch.isfinite(d), damage_to_metric(self.metric, d), nan).to(input_device)
                    for name, d in members.items()
                },
                budget=torch.arange(len(trace)),
                trace=damage_to_metric(self.metric, torch.stack(trace)).to(input_device),
                runs=runs,
            )


@dataclass
class Check:
    """One sanity check of an attack's result: the measured value, the threshold, whether it raised its flag."""

    raised: bool
    value: float
    threshold: float
    message: str

    def as_dict(self) -> dict[str, Any]:
        return {"raised": self.raised, "value": self.value, "threshold": self.threshold, "message": self.message}


GRADIENT_FREE = ("random_sign",)


def sanity_checks(
    result: WorstCaseResult,
    tolerance: float = 0.01,
    min_kept: float = 0.5,
    max_zero_gradients: float = 0.05,
    min_surrogate_agreement: float = 0.9,
    seed: int = 0,
) -> dict[str, Check]:
    """Flags in the spirit of RobustBench's, for one result:

    - ``not_converged``: the last quarter of the budget still moved the mean metric by more than ``tolerance``;
    - ``random_sign_as_strong``: the strongest gradient member is not resolved as more damaging than random signs
      (paired 95% interval of their per-sample difference; Kamath et al. 2024: under rank metrics a random
      perturbation can look as strong as an attack);
    - ``few_kept``: the label was kept for fewer than ``min_kept`` of the samples;
    - ``vanishing_gradients``: more than ``max_zero_gradients`` of the attack gradients were identically zero;
    - ``surrogate_disagrees``: a smooth surrogate predicted what the network predicts at fewer than
      ``min_surrogate_agreement`` of the judged iterates (its gradients then describe another function)."""
    checks: dict[str, Check] = {}
    gains = result.last_quarter_gains()
    moved = max(gains.values())
    checks["not_converged"] = Check(
        not result.converged(tolerance),
        moved,
        tolerance,
        f"the last quarter of the budget moved the mean {result.metric} by {gains['budget']:.3g} towards more "
        f"damage, the last quarter of one run's steps by up to {gains['steps']:.3g}",
    )
    higher = MAP_METRICS[result.metric].higher_is_better
    gradient = {name: v for name, v in result.members.items() if name.split("@")[0] not in GRADIENT_FREE}
    floor = next((v for name, v in result.members.items() if name in GRADIENT_FREE), None)
    if gradient and floor is not None:

        def damage(v: torch.Tensor) -> np.ndarray:
            v = v.detach().double().cpu().numpy()
            return -v if higher else v

        strongest = max(
            gradient,
            key=lambda name: (
                np.nanmean(damage(gradient[name])) if np.isfinite(damage(gradient[name])).any() else -np.inf
            ),
        )
        compared = paired_difference(damage(gradient[strongest]), damage(floor), seed=seed)
        ahead = compared["resolved"] and compared["better"] == "a"
        checks["random_sign_as_strong"] = Check(
            not ahead,
            compared["difference"],
            0.0,
            f"the strongest attack ({strongest}) is {'' if ahead else 'not '}resolved as more damaging than random "
            f"signs (mean difference {compared['difference']:.3g}, 95% interval [{compared['ci_low']:.3g}, "
            f"{compared['ci_high']:.3g}] over {compared['samples']} samples)",
        )
    share = float(result.kept.float().mean()) if len(result.kept) else float("nan")
    checks["few_kept"] = Check(
        not share >= min_kept, share, min_kept, f"the label was kept for {share:.0%} of the samples"
    )
    diagnostics = result.diagnostics
    zero = diagnostics.zero_gradient_share if diagnostics is not None else float("nan")
    checks["vanishing_gradients"] = Check(
        bool(zero > max_zero_gradients),
        zero,
        max_zero_gradients,
        f"{zero:.1%} of the attack gradients were identically zero",
    )
    agreement = diagnostics.surrogate_agreement if diagnostics is not None else float("nan")
    if math.isfinite(agreement):
        checks["surrogate_disagrees"] = Check(
            agreement < min_surrogate_agreement,
            agreement,
            min_surrogate_agreement,
            f"the softplus surrogate predicted the network's class at {agreement:.1%} of the judged iterates",
        )
    return checks


def raised(checks: dict[str, Check]) -> list[str]:
    return [name for name, check in checks.items() if check.raised]


__all__ = [
    "Check",
    "WorstCaseExplanationAttack",
    "WorstCaseResult",
    "default_members",
    "raised",
    "sanity_checks",
]
