"""Sections on the explanations: fragility under explanation attacks, transfer of those attacks between methods,
and smoothing without retraining."""

from __future__ import annotations

import copy
import json
import warnings

import numpy as np
import torch

from robustattr.attacks import (
    ExplanationAttack,
    MassCenterAttack,
    RandomSignAttack,
    TargetedAttack,
    TopKAttack,
    softplus_surrogate,
)
from robustattr.attacks.base import gradient_context, with_seed
from robustattr.attributions import (
    Attribution,
    CaptumAttribution,
    DeepLift,
    GradientShap,
    GradientXInput,
    IntegratedGradients,
    Saliency,
    SmoothGrad,
    UniformGradient,
)
from robustattr.audit.cache import fingerprint
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
    PAIRED_MAP_METRICS,
    ci,
    collection_row,
    comparison_table,
    comparisons_of,
    describe,
    error_bars,
    estimate,
)
from robustattr.metrics import MAP_METRICS, TopKIntersection, fragility_collection
from robustattr.metrics import functional as M
from robustattr.metrics.intervals import Estimate, mean_interval, statistic_interval
from robustattr.models.activations import needs_smooth_surrogate
from robustattr.viz import figure, grid, heatmap, panel_figure, style

STYLES = ["-", "--", ":", "-."]


def _default_methods() -> list[Attribution]:
    return [
        Saliency(),
        GradientXInput(),
        IntegratedGradients(steps=16),
        SmoothGrad(samples=16),
        UniformGradient(samples=16),
        DeepLift(),
        GradientShap(samples=16),
    ]


def _default_attacks(steps: int) -> list[ExplanationAttack]:
    return [RandomSignAttack(), TopKAttack(steps=steps), MassCenterAttack(steps=steps), TargetedAttack(steps=steps)]


def attackable(method: Attribution) -> Attribution:
    """Captum's methods cannot be differentiated: attacks on them go through gradient x input, their closest
    differentiable relative (DeepLIFT's Rescale rule reduces to it on linear pieces), and are measured on the
    method itself."""
    return GradientXInput() if isinstance(method, CaptumAttribution) else method


def by_attack(methods: list[Attribution]) -> list[tuple[Attribution, list[Attribution]]]:
    """The methods grouped by the method their attacks go through: one attack serves the whole group."""
    groups: dict[str, tuple[Attribution, list[Attribution]]] = {}
    for method in methods:
        through = attackable(method)
        key = json.dumps(fingerprint(through), sort_keys=True)
        groups.setdefault(key, (through, []))[1].append(method)
    return list(groups.values())


def maps_of(method: Attribution, model, x: torch.Tensor, target: torch.Tensor, seeds=None) -> torch.Tensor:
    """Pixel maps of ``method``; ``seeds`` (one per row): a noise-based method draws each sample's own noise."""
    method = method.for_samples(seeds)
    with gradient_context(model):
        device = device_of(model)
        return M.pixel_map(method(model, x.to(device), target.to(device))).cpu()


def attack_sweep(model, through: Attribution, members, attack, epsilons, x, y, seeds):
    """Attack ``through`` at every epsilon in one batched pass; per member method and epsilon, the clean and attacked
    pixel maps, and the kept mask. ``seeds``: one per row of the stacked batch (`AuditData.seeds`)."""
    copies = len(epsilons)
    configured = with_seed(sweep(attack, epsilons, len(x)), seeds)
    configured.attribution = through
    result = configured.run(model, stacked(x, copies), stacked(y, copies))
    kept = result.kept.cpu().chunk(copies)
    maps = {}
    for method in members:
        if method is through:
            clean, adv = result.maps_clean.cpu(), result.maps_adv.cpu()
        else:
            clean = stacked(maps_of(method, model, x, result.target[: len(x)], seeds[: len(x)]), copies)
            adv = maps_of(method, model, result.x_adv, result.target, seeds)
        maps[method.short_name] = list(zip(clean.chunk(copies), adv.chunk(copies), kept, strict=True))
    return maps


class ExplanationFragility(Section):
    """(b) Each attribution method x each explanation attack x each epsilon: top-k intersection, Spearman, Kendall,
    centre shift, cosine distance (over samples whose label was kept) and the label-kept rate; and per method and
    attack the area under cosine distance over epsilon, from 0 to the largest epsilon and divided by it, i.e. the
    mean cosine distance over the sweep (Wang et al.'s summary: lower is more robust).

    Cost: each attack runs its whole epsilon sweep as one batch, once per group of methods it goes through:
    Captum's DeepLift and GradientShap are attacked through gradient x input (see `attackable`), so one attack
    serves all three. ``examples`` rows of example maps per checkpoint are drawn in the report."""

    name = "fragility"
    title = "fragility of the explanations"

    def __init__(
        self,
        methods: list[Attribution] | None = None,
        attacks: list[ExplanationAttack] | None = None,
        epsilons: list[float] | None = None,
        steps: int = 10,
        num_samples: int = 64,
        examples: int = 3,
    ) -> None:
        self.methods = methods if methods is not None else _default_methods()
        self.attacks = attacks if attacks is not None else _default_attacks(steps)
        self.epsilons = epsilons if epsilons is not None else [2 / 255, 4 / 255, 8 / 255]
        self.num_samples = num_samples
        self.examples = examples

    def work(self, data):
        return len(self.attacks) * len(by_attack(self.methods)) * data.count(self.num_samples, len(self.epsilons))

    def run(self, model, data, progress):
        groups = by_attack(self.methods)
        metrics = {
            m.short_name: {
                a.short_name: [fragility_collection(a.k, per_sample=True) for _ in self.epsilons] for a in self.attacks
            }
            for m in self.methods
        }
        for index, x, y in data.batches(self.num_samples, len(self.epsilons)):
            seeds = data.seeds(index, len(self.epsilons))
            for attack in self.attacks:
                for through, members in groups:
                    swept = attack_sweep(model, through, members, attack, self.epsilons, x, y, seeds)
                    for method, per_eps in swept.items():
                        for collection, (clean, adv, kept) in zip(metrics[method][attack.short_name], per_eps,
                                                                  strict=True):  # fmt: skip
                            collection.update(maps_clean=clean, maps_adv=adv, kept=kept)
                    progress(1)
        results: dict = {"epsilons": self.epsilons, "methods": {}}
        for method, per_attack in metrics.items():
            results["methods"][method] = {}
            for attack, per_eps in per_attack.items():
                rows = [collection_row(collection, data.seed, PAIRED_MAP_METRICS) for collection in per_eps]
                cosine = [collection["cosine_distance"].by_sample() for collection in per_eps]
                auc = statistic_interval(self._auc, cosine, data.seed)
                results["methods"][method][attack] = {
                    "by_epsilon": rows,
                    "auc_cosine_distance": auc.mean,
                    "ci": {"auc_cosine_distance": ci(auc)},
                }
        return results

    def _auc(self, *cosine: np.ndarray, axis: int) -> np.ndarray:
        """Area under the mean cosine distance (samples along ``axis``, NaN: label not kept) over epsilon from 0,
        divided by the largest epsilon."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a resample in which no label was kept
            means = [np.nan_to_num(np.nanmean(c, axis=axis), nan=0.0) for c in cosine]
        curve = np.stack([np.zeros_like(means[0]), *means], axis=-1)
        return np.trapezoid(curve, [0.0, *self.epsilons], axis=-1) / max(self.epsilons)

    def paired_values(self, result):
        return {
            (("method", method), ("attack", attack), ("epsilon", eps_label(e)), ("metric", name)): (
                values,
                MAP_METRICS[name].higher_is_better,
            )
            for method, per_attack in result["methods"].items()
            for attack, v in per_attack.items()
            for e, row in zip(result["epsilons"], v["by_epsilon"], strict=True)
            for name, values in row.get("per_sample", {}).items()
        }

    @staticmethod
    def curve(result: dict, method: str = "saliency", attack: str = "topk") -> tuple[list[float], list[float]]:
        """(epsilons, top-k intersection) of one checkpoint's result for ``method`` under ``attack``."""
        rows = result["methods"][method][attack]["by_epsilon"]
        return result["epsilons"], [row["topk_intersection"] for row in rows]

    def render(self, results, context):
        out = Rendered()
        first = next(iter(results.values()))
        methods = list(first["methods"])

        def draw(ax, method):
            for k, (name, r) in enumerate(results.items()):
                eps = [e * 255 for e in r["epsilons"]]
                for j, (attack, v) in enumerate(r["methods"][method].items()):
                    estimates = [estimate(row, "topk_intersection") for row in v["by_epsilon"]]
                    means = [getattr(e, "mean", e) for e in estimates]
                    ax.errorbar(eps, means, yerr=error_bars(estimates), fmt=STYLES[j % 4], marker=".", capsize=2,
                                color=f"C{k}", label=f"{name}: {attack}")  # fmt: skip

        fig = method_panels(methods, draw, "top-k intersection")
        out.figures.append(("fragility vs epsilon per method (top-k intersection; higher is more robust)", fig))
        header = ["model", "method", "attack", "epsilon", *MAP_METRICS, "label kept", "AUC cosine dist."]
        rows = [
            [name, method, attack, eps_label(e), *[estimate(row, m) for m in MAP_METRICS], estimate(row, "label_kept"),
             estimate(v, "auc_cosine_distance")]
            for name, r in results.items() for method, per_attack in r["methods"].items()
            for attack, v in per_attack.items() for e, row in zip(r["epsilons"], v["by_epsilon"], strict=True)
        ]  # fmt: skip
        out.tables.append(Table(header, rows, "metrics over the samples whose label was kept, mean [bootstrap 95% "
                                              "interval]; label kept with its Wilson interval; AUC of cosine "
                                              "distance over epsilon from 0 (lower: more robust)"))  # fmt: skip
        comparisons = [c for c in comparisons_of(context, self.name) if c["metric"] == "topk_intersection"]
        largest = eps_label(max(first["epsilons"]))
        for c in comparisons:
            if c["attack"] == "topk" and c["epsilon"] == largest:
                out.say(describe(c, f"{c['method']} top-k intersection under the top-k attack at {largest}"))
        if comparisons:
            out.tables.append(comparison_table(comparisons, ["method", "attack", "epsilon"],
                                               "paired differences of top-k intersection on the same samples "
                                               "(higher: more robust)"))  # fmt: skip
        if self.examples > 0:
            for name, model in context.models.items():
                out.figures.append(self._examples(name, model, context))
        return out

    def _examples(self, name, model, context):
        eps = max(self.epsilons)
        attack = TopKAttack(Saliency(), steps=10, seed=context.data.seed).with_eps(eps)
        x, y = context.data.x[: self.examples], context.data.y[: self.examples]
        result = attack.run(model, x.to(device_of(model)), y)
        clean, adv = result.maps_clean.cpu(), result.maps_adv.cpu()
        k = M.default_k(*clean.shape[1:])
        values = {"top-k intersection": M.topk_intersection(clean, adv, k), "spearman": M.spearman(clean, adv),
                  "center shift": M.center_shift(clean, adv)}  # fmt: skip
        title = f"{name}: saliency under the top-k attack (10 steps), {eps_label(eps)}, k = {k}"
        masks = (M.topk_mask(clean, k), M.topk_mask(adv, k))
        return f"example maps, {name}", panel_figure(x, result.x_adv.cpu(), clean, adv, masks, values, title)


class AttributionTransfer(Section):
    """(c) Perturbations crafted against one attribution method, measured on every method: the top-k
    intersection matrix (rows: crafted against, columns: measured on)."""

    name = "attribution_transfer"
    title = "transfer of explanation attacks between methods"

    def __init__(
        self,
        methods: list[Attribution] | None = None,
        attack: ExplanationAttack | None = None,
        epsilon: float = 8 / 255,
        num_samples: int = 64,
    ) -> None:
        self.methods = methods if methods is not None else [Saliency(), GradientXInput(), IntegratedGradients(steps=16)]
        self.attack = (attack if attack is not None else TopKAttack(steps=10)).with_eps(epsilon)
        self.num_samples = num_samples

    def work(self, data):
        return len(self.methods) * data.count(self.num_samples)

    def run(self, model, data, progress):
        names = [m.short_name for m in self.methods]
        matrix = np.zeros((len(names), len(names)))
        bounds = np.zeros((len(names), len(names), 2))
        for i, crafted in enumerate(self.methods):
            measured_on = [TopKIntersection(self.attack.k, per_sample=True) for _ in names]
            for index, x, y in data.batches(self.num_samples):
                seeds = data.seeds(index)
                attack = with_seed(self.attack, seeds)
                attack.attribution = attackable(crafted)
                result = attack.run(model, x, y)
                for metric, measured in zip(measured_on, self.methods, strict=True):
                    clean = maps_of(measured, model, x, result.target, seeds)
                    adv = maps_of(measured, model, result.x_adv, result.target, seeds)
                    metric.update(clean, adv, result.kept.cpu())
                progress(1)
            matrix[i] = [float(metric.compute()) for metric in measured_on]
            bounds[i] = [ci(mean_interval(metric.by_sample(), data.seed)) for metric in measured_on]
        return {
            "methods": names,
            "epsilon": self.attack.threat.eps,
            "topk_intersection": matrix.tolist(),
            "ci": {"topk_intersection": bounds.tolist()},  # [row][column] -> [low, high]
        }

    def render(self, results, context):
        out = Rendered()
        with style():
            fig, axes = grid(len(results), 2, 4.8, 4.2)
            for ax, (name, r) in zip(axes, results.items(), strict=True):
                heatmap(ax, r["topk_intersection"], r["methods"], r["methods"], f"{name}, {eps_label(r['epsilon'])}")
        out.figures.append(("top-k intersection when crafted against one method and measured on another", fig))
        out.say("Rows: crafted against; columns: measured on.")
        for name, r in results.items():
            bounds = r.get("ci", {}).get("topk_intersection")
            rows = [
                [m, *[v if bounds is None else Estimate(v, *bounds[i][j], 0) for j, v in enumerate(values)]]
                for i, (m, values) in enumerate(zip(r["methods"], r["topk_intersection"], strict=True))
            ]
            out.tables.append(Table([f"{name}: crafted \\ measured", *r["methods"]], rows,
                                    "top-k intersection, mean [bootstrap 95% interval]"))  # fmt: skip
        return out


class SmoothingWithoutRetraining(Section):
    """(d) The same attack against plain saliency, SmoothGrad, Uniform Gradient, and saliency of softplus(beta)
    twins of the same network (Dombrowski et al.): smoother explanations without retraining. The softplus rows
    apply to networks with kinked activations only: on an already smooth network they would repeat plain saliency,
    so the section says so instead."""

    name = "smoothing"
    title = "smoothing without retraining"

    def __init__(
        self,
        attack: ExplanationAttack | None = None,
        epsilon: float = 8 / 255,
        betas: list[float] | None = None,
        samples: int = 16,
        num_samples: int = 64,
    ) -> None:
        self.attack = (attack if attack is not None else TopKAttack(steps=10)).with_eps(epsilon)
        self.betas = betas if betas is not None else [10.0, 3.0, 1.0]
        self.samples = samples
        self.num_samples = num_samples

    def work(self, data):
        return (3 + len(self.betas)) * data.count(self.num_samples)

    def _measure(self, model, method, attack, data, progress) -> dict[str, float]:
        collection = fragility_collection(attack.k, per_sample=True)
        for index, x, y in data.batches(self.num_samples):
            ((clean, adv, kept),) = attack_sweep(model, method, [method], attack, [attack.threat.eps], x, y,
                                                 data.seeds(index))[method.short_name]  # fmt: skip
            collection.update(maps_clean=clean, maps_adv=adv, kept=kept)
            progress(1)
        return collection_row(collection, data.seed)

    def run(self, model, data, progress):
        rows = {}
        for label, method in (
            ("saliency", Saliency()),
            ("smoothgrad", SmoothGrad(samples=self.samples)),
            ("uniform_gradient", UniformGradient(samples=self.samples)),
        ):
            rows[label] = self._measure(model, method, self.attack, data, progress)
        applicable = needs_smooth_surrogate(model)
        for beta in self.betas if applicable else []:
            smooth = softplus_surrogate(model, beta)
            attack = copy.copy(self.attack)
            attack.schedule = None  # the softplus twin is smooth: attack it directly
            rows[f"softplus_{beta:g}"] = self._measure(smooth, Saliency(), attack, data, progress)
        if not applicable:
            progress(len(self.betas) * data.local_count(self.num_samples))
        return {"epsilon": self.attack.threat.eps, "explanations": rows, "softplus_applicable": applicable}

    def paired_values(self, result):
        return {
            (("explanation", label), ("metric", name)): (values, MAP_METRICS[name].higher_is_better)
            for label, row in result["explanations"].items()
            for name, values in row.get("per_sample", {}).items()
        }

    def render(self, results, context):
        out = Rendered()
        with style():
            fig = figure(9, 4.2)
            ax = fig.subplots()
            labels = sorted({e for r in results.values() for e in r["explanations"]}, key=_explanation_order)
            width = 0.8 / len(results)
            for k, (name, r) in enumerate(results.items()):
                estimates = [
                    estimate(r["explanations"][e], "topk_intersection") if e in r["explanations"] else np.nan
                    for e in labels
                ]
                values = [getattr(e, "mean", e) for e in estimates]
                ax.bar(np.arange(len(labels)) + k * width, values, width, yerr=error_bars(estimates), capsize=3,
                       label=name)  # fmt: skip
            ax.set_xticks(np.arange(len(labels)) + width * (len(results) - 1) / 2, labels, rotation=25, ha="right")
            ax.set_ylabel("top-k intersection")
            ax.set_ylim(0, 1)
            ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0))
        eps = eps_label(next(iter(results.values()))["epsilon"])
        out.figures.append((f"the same top-k attack ({eps}) against smoothed explanations", fig))
        for name, r in results.items():
            if not r["softplus_applicable"]:
                out.say(f"{name}: softplus(beta) explanations do not apply: the network has no kinked activations "
                        "(it is smooth already), so they would equal its saliency.")  # fmt: skip
        header = ["model", "explanation", *MAP_METRICS, "label kept"]
        rows = [[name, e, *[estimate(v, m) for m in MAP_METRICS], estimate(v, "label_kept")]
                for name, r in results.items() for e, v in r["explanations"].items()]  # fmt: skip
        out.tables.append(Table(header, rows, f"metrics under the top-k attack at {eps}, mean [95% interval]"))
        comparisons = [c for c in comparisons_of(context, self.name) if c["metric"] == "topk_intersection"]
        for c in comparisons:
            out.say(describe(c, f"{c['explanation']} top-k intersection under the top-k attack at {eps}"))
        if comparisons:
            out.tables.append(comparison_table(comparisons, ["explanation"], "paired differences of top-k "
                                               "intersection on the same samples (higher: more robust)"))  # fmt: skip
        return out


def _explanation_order(label: str) -> tuple[int, float]:
    fixed = {"saliency": 0, "smoothgrad": 1, "uniform_gradient": 2}
    return (fixed[label], 0.0) if label in fixed else (3, -float(label.split("_")[1]))
