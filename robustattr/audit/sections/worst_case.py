"""Explanation robustness under the strongest attack we run: the worst-case ensemble, with intervals, convergence
and sanity flags, the noise floor of stochastic methods, and paired comparisons between checkpoints."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from robustattr.attacks import LinfBall, WorstCaseExplanationAttack, WorstCaseResult, raised, sanity_checks
from robustattr.attacks.base import gradient_context, with_seed
from robustattr.attributions import Attribution, IntegratedGradients, Saliency, SmoothGrad
from robustattr.audit.sections.base import (
    Rendered,
    Section,
    Table,
    device_of,
    eps_label,
    method_panels,
    stacked,
    sweep,
)
from robustattr.audit.sections.uncertainty import (
    comparison_table,
    comparisons_of,
    describe,
    error_bars,
    interval,
    values_list,
)
from robustattr.errors import ConfigError
from robustattr.metrics import MAP_METRICS
from robustattr.metrics import functional as M
from robustattr.metrics.intervals import Estimate, mean_interval
from robustattr.rng import offset

BUDGET_KEYS = {"steps", "restarts", "betas"}
REPORTED = ("topk_intersection", "spearman")
CURVE_POINTS = 60


def _default_methods() -> list[Attribution]:
    return [Saliency(), IntegratedGradients(steps=16), SmoothGrad(samples=16)]


def _default_budgets() -> dict[str, dict[str, Any]]:
    # IG and SmoothGrad cost 16 attributions a step: a smaller budget keeps the default audit within minutes; the
    # convergence flag says when it was not enough.
    return {
        "ig": {"steps": 10, "restarts": 1, "betas": [30.0]},
        "smoothgrad": {"steps": 10, "restarts": 1, "betas": [30.0]},
    }


def _thinned(budget: np.ndarray, mean: np.ndarray) -> dict[str, list[float]]:
    keep = np.unique(np.linspace(0, len(budget) - 1, min(len(budget), CURVE_POINTS)).round().astype(int))
    return {"steps": [int(b) for b in budget[keep]], "mean": [float(m) for m in mean[keep]]}


class WorstCaseFragility(Section):
    """Per method and epsilon, the worst-case ensemble (`WorstCaseExplanationAttack`): top-k intersection and
    Spearman with bootstrap 95% intervals over the samples whose label was kept, the label-kept rate (Wilson), each
    member's mean, the convergence curve (mean worst-so-far against the steps spent) with its ``converged`` flag,
    the sanity flags (`sanity_checks`), the per-sample values (for paired comparisons between checkpoints) and,
    for stochastic methods, the noise floor: the same metrics between two clean explanations with independent noise
    (a value under attack near the floor is noise, not damage).

    Args:
        methods: attributions attacked (default saliency, IG with 16 steps, SmoothGrad with 16 samples).
        epsilons: L-infinity radii (default 2, 4, 8 /255), stacked into one batch per chunk.
        metric: the map metric the ensemble minimises (default top-k intersection); Spearman is tracked beside it.
        steps, restarts, betas: the ensemble's budget (`WorstCaseExplanationAttack`).
        budgets: per method short name, overrides of ``steps``, ``restarts`` and ``betas`` (default: 10 steps, one
            round and beta 30 for IG and SmoothGrad, whose steps cost 16 attributions each).
        num_samples: audited samples (the first of the audit's subset).
        tolerance: the ``converged`` flag's tolerance, in metric units over the last quarter of the budget.
    """

    name = "worst_case_fragility"
    title = "worst-case explanation robustness (attack ensemble, 95% intervals)"

    def __init__(
        self,
        methods: list[Attribution] | None = None,
        epsilons: list[float] | None = None,
        metric: str = "topk_intersection",
        steps: int = 25,
        restarts: int = 2,
        betas: list[float] | None = None,
        budgets: dict[str, dict[str, Any]] | None = None,
        num_samples: int = 64,
        tolerance: float = 0.01,
    ) -> None:
        self.methods = methods if methods is not None else _default_methods()
        self.epsilons = [float(e) for e in (epsilons if epsilons is not None else [2 / 255, 4 / 255, 8 / 255])]
        for eps in self.epsilons:
            LinfBall(eps)  # an impossible epsilon is refused here, with its reason
        if metric not in MAP_METRICS:
            raise ConfigError(f"WorstCaseFragility: metric {metric!r} is not a registered map metric")
        self.metric = metric
        self.budgets = budgets if budgets is not None else _default_budgets()
        names = [m.short_name for m in self.methods]
        for method, budget in self.budgets.items():
            unknown = set(budget) - BUDGET_KEYS
            if unknown:
                raise ConfigError(
                    f"WorstCaseFragility: budgets[{method!r}] has unknown keys {sorted(unknown)} "
                    f"(allowed: {sorted(BUDGET_KEYS)})"
                )
        self.attacks = {
            m.short_name: WorstCaseExplanationAttack(
                m,
                LinfBall(max(self.epsilons)),
                metric,
                None,
                **{"steps": steps, "restarts": restarts, "betas": betas, **self.budgets.get(m.short_name, {})},
            )
            for m in self.methods
        }
        if len(set(names)) != len(names):
            raise ConfigError(f"WorstCaseFragility: methods {names} repeat a method")
        if num_samples < 2:
            raise ConfigError(f"WorstCaseFragility: num_samples must be at least 2 for an interval, got {num_samples}")
        self.num_samples = num_samples
        self.tolerance = tolerance

    def work(self, data):
        return len(self.methods) * data.count(self.num_samples, len(self.epsilons))

    def run(self, model, data, progress):
        out: dict[str, Any] = {
            "epsilons": self.epsilons,
            "metric": self.metric,
            "worst_case": {},
            "noise_floor": {},
            "cost": {},
            "attacks": {},
        }
        copies = len(self.epsilons)
        kinked = None
        for method in self.methods:
            attack = self.attacks[method.short_name]
            start = time.perf_counter()
            chunks: list[list[WorstCaseResult]] = [[] for _ in self.epsilons]
            for index, x, y in data.batches(self.num_samples, copies):
                configured = with_seed(sweep(attack, self.epsilons, len(x)), data.seeds(index, copies))
                result = configured.run(model, stacked(x, copies), stacked(y, copies))
                for e in range(copies):
                    chunks[e].append(result.select(slice(e * len(x), (e + 1) * len(x))))
                progress(1)
            chunks = [data.gather(per_eps) for per_eps in chunks]  # every process's chunks, in sample order
            if kinked is None:
                from robustattr.models.activations import needs_smooth_surrogate

                kinked = needs_smooth_surrogate(model)
            out["cost"][method.short_name] = round(time.perf_counter() - start, 3)
            out["attacks"][method.short_name] = {"repr": repr(attack), "budget_steps": attack.budget(kinked)}
            out["worst_case"][method.short_name] = {
                eps_label(eps): self._entry(WorstCaseResult.concatenate(per_eps), data.seed)
                for eps, per_eps in zip(self.epsilons, chunks, strict=True)
            }
            if method.stochastic:
                out["noise_floor"][method.short_name] = self._noise_floor(model, method, data)
        return out

    def _entry(self, result: WorstCaseResult, seed: int) -> dict[str, Any]:
        values = {self.metric: result.values, **result.tracked}
        entry: dict[str, Any] = {
            name: mean_interval(values[name], seed).as_dict() for name in REPORTED if name in values
        }
        entry["label_kept"] = interval(result.kept.float(), seed, proportion=True).as_dict()
        entry["members"] = {name: mean_interval(v, seed).as_dict() for name, v in result.members.items()}
        checks = sanity_checks(result, tolerance=self.tolerance, seed=seed)
        entry["converged"] = result.converged(self.tolerance)
        entry["flags"] = raised(checks)
        entry["checks"] = {name: check.as_dict() for name, check in checks.items()}
        entry["curve"] = _thinned(*result.curve())
        entry["per_sample"] = {name: values_list(values[name]) for name in REPORTED if name in values}
        entry["runs"] = [{k: v for k, v in run.items() if k != "rows"} for run in result.runs]
        return entry

    def _noise_floor(self, model, method: Attribution, data) -> dict[str, Any]:
        """The reported metrics between the method's own clean maps and those of an independent draw."""
        values: dict[str, list[torch.Tensor]] = {name: [] for name in REPORTED}
        with gradient_context(model):
            device = device_of(model)
            for index, x, _ in data.batches(self.num_samples):
                x = x.to(device)
                own = method.for_samples(data.seeds(index))  # the draw the attack's clean maps use
                other = own.reseeded(offset(own.seed, 1))
                with torch.no_grad():
                    target = model(x).argmax(dim=1)
                a = M.pixel_map(own(model, x, target)).cpu()
                b = M.pixel_map(other(model, x, target)).cpu()
                k = M.default_k(*a.shape[1:])
                for name in REPORTED:
                    values[name].append(MAP_METRICS[name].fn(a, b, k).float())
        return {name: mean_interval(data.cat(v), data.seed).as_dict() for name, v in values.items()}

    def paired_values(self, result):
        higher = MAP_METRICS
        return {
            (("method", method), ("epsilon", eps), ("metric", name)): (values, higher[name].higher_is_better)
            for method, per_eps in result["worst_case"].items()
            for eps, entry in per_eps.items()
            for name, values in entry["per_sample"].items()
        }

    def render(self, results, context):
        out = Rendered()
        first = next(iter(results.values()))
        methods = list(first["worst_case"])

        def values(ax, method):
            for k, (name, r) in enumerate(results.items()):
                eps = [e * 255 for e in r["epsilons"]]
                estimates = [Estimate.of(r["worst_case"][method][eps_label(e)][self.metric]) for e in r["epsilons"]]
                ax.errorbar(eps, [e.mean for e in estimates], yerr=error_bars(estimates), marker="o", capsize=3,
                            color=f"C{k}", label=name)  # fmt: skip
                floor = r["noise_floor"].get(method, {}).get(self.metric)
                if floor is not None:
                    ax.axhline(floor["mean"], color=f"C{k}", ls=":", lw=1, label=f"{name}: noise floor")

        fig = method_panels(methods, values, self.metric.replace("_", " "))
        out.figures.append((f"worst-case {self.metric.replace('_', ' ')} vs epsilon with 95% intervals", fig))

        def curves(ax, method):
            for k, (name, r) in enumerate(results.items()):
                for j, e in enumerate(r["epsilons"]):
                    curve = r["worst_case"][method][eps_label(e)]["curve"]
                    ax.plot(curve["steps"], curve["mean"], ["-", "--", ":", "-."][j % 4], color=f"C{k}",
                            label=f"{name}, {eps_label(e)}")  # fmt: skip

        fig = method_panels(methods, curves, "mean worst value so far",
                            xlabel="attack steps spent (all members)", ylim=None)  # fmt: skip
        out.figures.append(("convergence: the ensemble's mean against its budget", fig))
        rows, member_rows = [], []
        for name, r in results.items():
            for method, per_eps in r["worst_case"].items():
                for eps, entry in per_eps.items():
                    rows.append(
                        [
                            name,
                            method,
                            eps,
                            *[Estimate.of(entry[m]) for m in REPORTED],
                            Estimate.of(entry["label_kept"]),
                            entry["converged"],
                            ", ".join(entry["flags"]) or "none",
                            r["attacks"][method]["budget_steps"],
                        ]
                    )
                    for member, est in entry["members"].items():
                        member_rows.append([name, method, eps, member, Estimate.of(est)])
                    for flag in entry["flags"]:
                        out.say(f"{name}, {method} at {eps}: {flag}: {entry['checks'][flag]['message']}.")
        out.tables.append(
            Table(
                [
                    "model",
                    "method",
                    "epsilon",
                    "top-k intersection",
                    "spearman",
                    "label kept",
                    "converged",
                    "flags",
                    "budget (steps)",
                ],
                rows,
                "the worst case over the ensemble's members, mean [bootstrap 95% interval] over the "
                "samples whose label was kept; label kept with its Wilson interval",
            )
        )
        floors = [
            [name, method, *[Estimate.of(f[m]) for m in REPORTED]]
            for name, r in results.items()
            for method, f in r["noise_floor"].items()
        ]
        if floors:
            out.say(
                "Noise floor of stochastic methods: the same metrics between two clean explanations with "
                "independent noise. Values under attack near the floor measure the method's noise, not damage. "
                "Their convergence curves follow the draws the attack judged its iterates with; the reported values "
                "re-measure the chosen iterate with a draw it never saw, so they lie above the curves' ends."
            )
            out.tables.append(Table(["model", "method", "top-k intersection", "spearman"], floors, "noise floor"))
        out.tables.append(
            Table(
                ["model", "method", "epsilon", "member", self.metric],
                member_rows,
                "each member's mean (the ensemble keeps, per sample, the worst over them)",
            )
        )
        comparisons = comparisons_of(context, self.name)
        for c in comparisons:
            if c["metric"] == self.metric:
                out.say(describe(c, f"{c['method']} {self.metric.replace('_', ' ')} at {c['epsilon']}"))
        if comparisons:
            out.tables.append(
                comparison_table(
                    comparisons,
                    ["method", "epsilon", "metric"],
                    "paired differences on the same samples (higher: more robust)",
                )
            )
        costs = [[name, method, seconds] for name, r in results.items() for method, seconds in r["cost"].items()]
        out.tables.append(Table(["model", "method", "seconds"], costs, "cost of the ensemble"))
        return out
