"""Sections on the predictions: robustness curves (FGSM, BIM, PGD, L-BFGS) and transferability across checkpoints."""

from __future__ import annotations

import torch

from robustattr.attacks import BIM, FGSM, LBFGS, PGD, LinfBall, TopKAttack
from robustattr.attacks.base import gradient_context, with_seed
from robustattr.attributions import Saliency
from robustattr.audit.sections.base import (
    Rendered,
    Section,
    Table,
    device_of,
    eps_label,
    predict,
    stacked,
    sweep,
)
from robustattr.audit.sections.uncertainty import (
    ci,
    comparison_table,
    comparisons_of,
    describe,
    error_bars,
    values_list,
)
from robustattr.metrics import PerSampleMean, RobustAccuracy, TopKIntersection
from robustattr.metrics import functional as M
from robustattr.metrics.intervals import Estimate, mean_interval, proportion_interval
from robustattr.rng import generator_for, normal
from robustattr.viz import figure, heatmap, style

STYLES = ["-", "--", ":", "-."]


class RobustnessCurves(Section):
    """(a) Clean accuracy, accuracy under FGSM, BIM and PGD over an epsilon list (each attack's whole sweep in one
    batched pass), and Szegedy et al.'s L-BFGS minimum-distortion statistics (their Table 1: mean distortion
    ``sqrt(mean(r^2))`` over the examples found)."""

    name = "robustness"
    title = "robustness of the predictions"

    def __init__(
        self,
        epsilons: list[float] | None = None,
        steps: int = 10,
        lbfgs_samples: int = 32,
        lbfgs_search_steps: int = 6,
        lbfgs_max_iter: int = 50,
    ) -> None:
        self.epsilons = epsilons if epsilons is not None else [1 / 255, 2 / 255, 4 / 255, 8 / 255]
        self.steps = steps
        self.lbfgs_samples = lbfgs_samples
        self.lbfgs_search_steps = lbfgs_search_steps
        self.lbfgs_max_iter = lbfgs_max_iter

    def work(self, data):
        return data.count(copies=len(self.epsilons)) + data.count(self.lbfgs_samples)

    def run(self, model, data, progress):
        attacks = {"fgsm": FGSM(), "bim": BIM(steps=self.steps), "pgd": PGD(steps=self.steps)}
        accuracy = {name: [RobustAccuracy(per_sample=True) for _ in self.epsilons] for name in attacks}
        clean = RobustAccuracy(per_sample=True)
        copies = len(self.epsilons)
        for index, x, y in data.batches(copies=copies):
            clean.update(predict(model, x), y)
            for name, attack in attacks.items():
                swept = with_seed(sweep(attack, self.epsilons, len(x)), data.seeds(index, copies))
                x_adv = swept(model, stacked(x, copies), stacked(y, copies))
                for metric, logits in zip(accuracy[name], predict(model, x_adv).chunk(copies), strict=True):
                    metric.update(logits, y)
            progress(1)
        lbfgs = LBFGS(search_steps=self.lbfgs_search_steps, max_iter=self.lbfgs_max_iter)
        found, distortion = PerSampleMean(), PerSampleMean(per_sample=True)  # the median, min and max need them all
        attempted = min(self.lbfgs_samples, len(data.x))  # over every process's share
        for index, x, y in data.batches(self.lbfgs_samples):
            result = with_seed(lbfgs, data.seeds(index)).run(model, x, y)
            distortion.update(result.distortion, keep=result.success)
            found.update(result.success.float())
            progress(1)
        d = distortion.per_sample()
        correct = {name: [m.by_sample() for m in per_eps] for name, per_eps in accuracy.items()}
        success = proportion_interval(found.compute() * attempted, attempted) if attempted else None
        return {
            "epsilons": self.epsilons,
            "clean_accuracy": float(clean.compute()),
            "accuracy": {name: [float(m.compute()) for m in per_eps] for name, per_eps in accuracy.items()},
            "ci": {  # Wilson 95% intervals of the accuracies; a bootstrap one of the mean distortion
                "clean_accuracy": ci(proportion_interval(clean.by_sample())),
                "accuracy": {name: [ci(proportion_interval(v)) for v in per_eps] for name, per_eps in correct.items()},
                "lbfgs": {
                    "success_rate": ci(success) if success else [float("nan")] * 2,
                    "distortion_mean": ci(mean_interval(d, data.seed)),
                },
            },
            "per_sample": {  # 1: still correct; for paired comparisons (the same samples for every checkpoint)
                "clean": values_list(clean.by_sample()),
                **{name: [values_list(v) for v in per_eps] for name, per_eps in correct.items()},
            },
            "lbfgs": {
                "samples": attempted,
                "success_rate": float(found.compute()),
                "distortion_mean": float(distortion.compute()),
                "distortion_median": float(d.median()) if d.numel() else float("nan"),
                "distortion_min": float(d.min()) if d.numel() else float("nan"),
                "distortion_max": float(d.max()) if d.numel() else float("nan"),
            },
        }

    def paired_values(self, result):
        if "per_sample" not in result:
            return {}
        out = {(("attack", "none"), ("epsilon", "0/255")): (result["per_sample"]["clean"], True)}
        for attack, per_eps in result["per_sample"].items():
            if attack != "clean":
                for e, values in zip(result["epsilons"], per_eps, strict=True):
                    out[(("attack", attack), ("epsilon", eps_label(e)))] = (values, True)
        return out

    @staticmethod
    def curve(result: dict, attack: str = "pgd") -> tuple[list[float], list[float]]:
        """(epsilons, accuracy under ``attack``) of one checkpoint's result."""
        return result["epsilons"], result["accuracy"][attack]

    def render(self, results, context):
        out = Rendered()
        with style():
            fig = figure(9, 4.6)
            ax = fig.subplots()
            for k, (name, r) in enumerate(results.items()):
                eps = [0.0, *[e * 255 for e in r["epsilons"]]]
                for j, attack in enumerate(r["accuracy"]):
                    estimates = self._estimates(r, attack)
                    ax.errorbar(eps, [e.mean for e in estimates], yerr=error_bars(estimates), fmt=STYLES[j % 4],
                                marker="o", capsize=2, color=f"C{k}", label=f"{name}: {attack.upper()}")  # fmt: skip
            ax.set_xlabel("epsilon (x/255, L-infinity)")
            ax.set_ylabel("accuracy")
            ax.set_ylim(-0.02, 1.02)
            ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0))
        out.figures.append(("accuracy vs epsilon", fig))
        first = next(iter(results.values()))
        header = ["model", "attack", "clean", *[eps_label(e) for e in first["epsilons"]]]
        rows = [[name, attack.upper(), *self._estimates(r, attack)] for name, r in results.items()
                for attack in r["accuracy"]]  # fmt: skip
        out.tables.append(Table(header, rows, "accuracy under attack [Wilson 95% interval]"))
        comparisons = comparisons_of(context, self.name)
        for c in comparisons:
            if c["attack"] in ("none", "pgd"):
                what = "clean accuracy" if c["attack"] == "none" else f"PGD accuracy at {c['epsilon']}"
                out.say(describe(c, what))
        if comparisons:
            out.tables.append(comparison_table(comparisons, ["attack", "epsilon"], "paired differences of accuracy "
                                               "on the same samples"))  # fmt: skip
        keys = ("samples", "success_rate", "distortion_mean", "distortion_median", "distortion_min", "distortion_max")
        rows = [[name, *[Estimate(r["lbfgs"][k], *r["ci"]["lbfgs"][k], 0) if k in r.get("ci", {}).get("lbfgs", {})
                         else r["lbfgs"][k] for k in keys]] for name, r in results.items()]  # fmt: skip
        header = ["model", "L-BFGS samples", "success rate", "mean distortion", "median", "min", "max"]
        out.tables.append(Table(header, rows, "L-BFGS minimum distortion, sqrt(mean(r^2)) over the examples found"))
        return out

    @staticmethod
    def _estimates(r: dict, attack: str) -> list[Estimate]:
        """Clean accuracy, then the accuracy under ``attack`` at each epsilon, with their intervals."""
        bounds = r.get("ci", {})
        clean = bounds.get("clean_accuracy", [float("nan")] * 2)
        per_eps = bounds.get("accuracy", {}).get(attack, [[float("nan")] * 2] * len(r["epsilons"]))
        return [Estimate(r["clean_accuracy"], *clean, 0),
                *[Estimate(a, *b, 0) for a, b in zip(r["accuracy"][attack], per_eps, strict=True)]]  # fmt: skip


class Transferability(Section):
    """(g) Szegedy et al.'s transfer study across the audited checkpoints: PGD adversaries crafted on each
    (rows) evaluated on every other (columns) as accuracy, with a baseline row of Gaussian noise of the same
    per-sample L2 norm; and top-k explanation attacks crafted on each, measured as the top-k intersection of
    every model's saliency maps."""

    name = "transferability"
    title = "transferability across checkpoints"
    cross_model = True

    def __init__(self, epsilon: float = 8 / 255, steps: int = 10, num_samples: int = 128) -> None:
        self.epsilon = epsilon
        self.steps = steps
        self.num_samples = num_samples

    def work(self, data):
        return data.count(self.num_samples)

    def run_all(self, models, data, progress):
        names = list(models)
        n = len(names)
        acc = [[RobustAccuracy(per_sample=True) for _ in names] for _ in range(n + 1)]  # last row: Gaussian noise
        topk = [[TopKIntersection(per_sample=True) for _ in names] for _ in names]
        pgd = PGD(LinfBall(self.epsilon), steps=self.steps)
        explanation = TopKAttack(Saliency(), LinfBall(self.epsilon), steps=self.steps)
        for index, x, y in data.batches(self.num_samples):
            noise_norms = []
            seeds = data.seeds(index)
            for i, source in enumerate(names):
                x_adv = with_seed(pgd, seeds)(models[source], x, y)
                noise_norms.append((x_adv - x).flatten(1).norm(dim=1))
                result = with_seed(explanation, seeds).run(models[source], x, y)
                for j, target in enumerate(names):
                    acc[i][j].update(predict(models[target], x_adv), y)
                    with gradient_context(models[target]):
                        device = device_of(models[target])
                        pred = predict(models[target], x).argmax(1).to(device)
                        clean = M.pixel_map(Saliency()(models[target], x.to(device), pred)).cpu()
                        adv = M.pixel_map(Saliency()(models[target], result.x_adv.to(device), pred)).cpu()
                    topk[i][j].update(clean, adv)
            noise = normal(x.shape, generator_for("cpu", data.seeds(index, salt=1)), "cpu")
            norm = torch.stack(noise_norms).mean(0)
            x_noise = (x + noise / noise.flatten(1).norm(dim=1).view(-1, 1, 1, 1) * norm.view(-1, 1, 1, 1)).clamp(0, 1)
            for j, target in enumerate(names):
                acc[n][j].update(predict(models[target], x_noise), y)
            progress(1)
        return {
            "models": names,
            "epsilon": self.epsilon,
            "accuracy": [[float(cell.compute()) for cell in row] for row in acc],
            "rows": [*names, "gaussian noise (same L2 norm)"],
            "topk_intersection": [[float(cell.compute()) for cell in row] for row in topk],
            "ci": {  # [row][column] -> [low, high]: Wilson for accuracies, bootstrap for top-k intersections
                "accuracy": [[ci(proportion_interval(cell.by_sample())) for cell in row] for row in acc],
                "topk_intersection": [[ci(mean_interval(cell.by_sample(), data.seed)) for cell in row] for row in topk],
            },
        }

    def render(self, result, context):
        out = Rendered()
        eps = eps_label(result["epsilon"])
        with style():
            fig = figure(10, 4.2)
            a, b = fig.subplots(1, 2)
            heatmap(a, result["accuracy"], result["rows"], result["models"], f"accuracy on PGD adversaries, {eps}")
            heatmap(b, result["topk_intersection"], result["models"], result["models"],
                    f"saliency top-k intersection, {eps}")  # fmt: skip
        out.figures.append(("transferability across checkpoints", fig))
        out.say("Rows: crafted on; columns: evaluated on.")
        header = ["crafted on \\ evaluated on", *result["models"]]

        def cells(key: str, labels: list[str]) -> list[list]:
            bounds = result.get("ci", {}).get(key)
            return [[label, *[v if bounds is None else Estimate(v, *bounds[i][j], 0) for j, v in enumerate(row)]]
                    for i, (label, row) in enumerate(zip(labels, result[key], strict=True))]  # fmt: skip

        out.tables.append(Table(header, cells("accuracy", result["rows"]),
                                f"accuracy on adversaries (PGD, {eps}) [Wilson 95% interval]"))  # fmt: skip
        out.tables.append(Table(header, cells("topk_intersection", result["models"]),
                                f"top-k intersection of saliency maps under top-k attacks ({eps}) "
                                "[bootstrap 95% interval]"))  # fmt: skip
        return out
