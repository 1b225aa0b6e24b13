"""Sections on the geometry behind the numbers: curvature, attribution evidence of adversarial inputs, and the
semantic directions of a layer."""

from __future__ import annotations

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from torch import nn

from robustattr.attacks import BIM, LinfBall, choose_target
from robustattr.attacks.base import gradient_context
from robustattr.attributions import IntegratedGradients
from robustattr.audit.sections.base import Rendered, Section, Table, device_of, eps_label, predict
from robustattr.audit.sections.uncertainty import ci, comparison_table, comparisons_of, describe, estimate
from robustattr.errors import ConfigError
from robustattr.metrics import PerSampleMean, top_hessian_eigenvalue
from robustattr.metrics.intervals import auroc_interval, mean_interval, proportion_interval
from robustattr.rng import generator_for
from robustattr.viz import figure, grid, image_array, style


class Curvature(Section):
    """(e) Distributions over the subset of the input-gradient norm of the loss and of the top input-Hessian
    eigenvalue (power iteration on exact Hessian-vector products)."""

    name = "curvature"
    title = "curvature of the loss in input space"

    def __init__(self, power_iters: int = 10, num_samples: int = 256) -> None:
        self.power_iters = power_iters
        self.num_samples = num_samples

    def work(self, data):
        return data.count(self.num_samples)

    def run(self, model, data, progress):
        norms, eigs = [], []
        for index, x, y in data.batches(self.num_samples):
            with gradient_context(model):
                device = device_of(model)
                generator = generator_for(device, data.seeds(index))  # each sample's own start vector
                norm, eig = top_hessian_eigenvalue(model, x.to(device), y.to(device), self.power_iters, generator)
            norms.append(norm.cpu())
            eigs.append(eig.cpu())
            progress(1)

        def stats(values: list[torch.Tensor]) -> dict:
            t = data.cat(values).float()  # every process's samples, in sample order
            q = torch.quantile(t, torch.tensor([0.1, 0.5, 0.9]))
            mean = mean_interval(t, data.seed)
            return {"mean": mean.mean, "ci": {"mean": ci(mean)}, "p10": float(q[0]), "median": float(q[1]),
                    "p90": float(q[2]), "values": [float(v) for v in t]}  # fmt: skip

        return {"grad_norm": stats(norms), "hessian_top_eig": stats(eigs)}

    def paired_values(self, result):
        return {(("quantity", key),): (result[key]["values"], False) for key in ("grad_norm", "hessian_top_eig")}

    def render(self, results, context):
        out = Rendered()
        with style():
            fig = figure(9, 3.6)
            axes = fig.subplots(1, 2)
            for name, r in results.items():
                for ax, key in zip(axes, ("grad_norm", "hessian_top_eig"), strict=True):
                    ax.hist(r[key]["values"], bins=30, alpha=0.5, label=name)
                    ax.set_xlabel(key.replace("_", " "))
            axes[0].set_ylabel("samples")
            axes[1].legend()
        out.figures.append(("input-gradient norms and top input-Hessian eigenvalues of the loss", fig))
        header = ["model", "quantity", "mean [95% interval]", "p10", "median", "p90"]
        rows = [[name, key.replace("_", " "), estimate(r[key], "mean"), *[r[key][s] for s in ("p10", "median", "p90")]]
                for name, r in results.items() for key in ("grad_norm", "hessian_top_eig")]  # fmt: skip
        out.tables.append(Table(header, rows))
        comparisons = comparisons_of(context, self.name)
        for c in comparisons:
            out.say(describe(c, f"{c['quantity'].replace('_', ' ')} (lower: smoother)"))
        if comparisons:
            out.tables.append(comparison_table(comparisons, ["quantity"], "paired differences on the same samples "
                                               "(lower: smoother)"))  # fmt: skip
        return out


class ExplainingAway(Section):
    """(f) Attribution evidence of clean and targeted-BIM inputs (the seed blog post): for each input, the
    coherence ``sum(IG) / sum(|IG|)`` of the Integrated Gradients (softmax output) behind its predicted class.
    Adversarial evidence for a random target comes from scattered, cancelling attributions (low coherence);
    for the runner-up class it looks much like clean evidence. Reports the detection AUROC (clean vs
    successful adversarial, lower coherence = adversarial) for random and runner-up targets, with histograms."""

    name = "explaining_away"
    title = "explaining adversarial examples away"

    def __init__(self, epsilon: float = 8 / 255, steps: int = 20, ig_steps: int = 16, num_samples: int = 128) -> None:
        self.epsilon = epsilon
        self.steps = steps
        self.ig_steps = ig_steps
        self.num_samples = num_samples

    def work(self, data):
        return data.count(self.num_samples)

    def _coherence(self, model, x, target) -> torch.Tensor:
        ig = IntegratedGradients(steps=self.ig_steps, output="softmax")
        with gradient_context(model):
            device = device_of(model)
            attr = ig(model, x.to(device), target.to(device)).flatten(1).float().cpu()
        return attr.sum(1) / attr.abs().sum(1).clamp_min(1e-12)

    def run(self, model, data, progress):
        bim = BIM(LinfBall(self.epsilon), steps=self.steps, step_size=2.5 * self.epsilon / self.steps)
        scores: dict[str, list[torch.Tensor]] = {"clean": [], "random": [], "runner_up": []}
        success = {"random": PerSampleMean(per_sample=True), "runner_up": PerSampleMean(per_sample=True)}
        for index, x, y in data.batches(self.num_samples):
            logits = predict(model, x)
            pred = logits.argmax(1)
            scores["clean"].append(self._coherence(model, x, pred))
            for mode in ("random", "runner_up"):
                target = choose_target(mode, logits, pred, generator_for("cpu", data.seeds(index)))
                x_adv = bim(model, x, y, target=target)
                reached = predict(model, x_adv).argmax(1) == target
                success[mode].update(reached.float())
                scores[mode].append(self._coherence(model, x_adv[reached], target[reached]))
            progress(1)
        clean = data.cat(scores["clean"])
        out = {"epsilon": self.epsilon, "clean": {"coherence": [float(v) for v in clean]}}
        for mode in ("random", "runner_up"):
            adv = data.cat(scores[mode])
            labels = np.r_[np.zeros(len(clean)), np.ones(len(adv))]
            auroc = roc_auc_score(labels, -np.r_[clean.numpy(), adv.numpy()]) if len(adv) else float("nan")
            interval = auroc_interval(-clean, -adv, data.seed)  # lower coherence: adversarial
            reached = proportion_interval(success[mode].by_sample())
            out[mode] = {"attack_success": float(success[mode].compute()), "detection_auroc": float(auroc),
                         "ci": {"attack_success": ci(reached), "detection_auroc": ci(interval)},
                         "coherence": [float(v) for v in adv]}  # fmt: skip
        return out

    def render(self, results, context):
        out = Rendered()
        with style():
            fig, axes = grid(len(results), 2, 4.8, 3.8)
            bins = np.linspace(-1, 1, 31)
            for ax, (name, r) in zip(axes, results.items(), strict=True):
                ax.hist(r["clean"]["coherence"], bins=bins, alpha=0.5, label="clean")
                for mode in ("random", "runner_up"):
                    ax.hist(r[mode]["coherence"], bins=bins, alpha=0.5, label=f"targeted BIM, {mode.replace('_', '-')}")
                ax.set_title(f"{name}: IG coherence")
                ax.set_xlabel("sum(IG) / sum(|IG|)")
            axes[0].legend(loc="upper left")
        eps = eps_label(next(iter(results.values()))["epsilon"])
        out.figures.append((f"attribution evidence, clean vs targeted BIM at {eps}", fig))
        rows = [[name, mode.replace("_", "-"), estimate(r[mode], "attack_success"), len(r[mode]["coherence"]),
                 estimate(r[mode], "detection_auroc")]
                for name, r in results.items() for mode in ("random", "runner_up")]  # fmt: skip
        out.tables.append(Table(["model", "targets", "attack success", "adversarial samples", "detection AUROC"], rows))
        return out


class SemanticDirections(Section):
    """(h) Szegedy et al.'s semantic directions: the held-out images that most activate single units of a layer
    and random directions of the same layer. ``layer`` names a module (default: the input of the last linear
    layer). Coherence is measured, not asserted: the label purity of each direction's top images (the share of
    its most common class), for units, for random directions, and for random sets of images (chance)."""

    name = "semantic_directions"
    title = "semantic directions (units vs random directions)"

    def __init__(self, layer: str | None = None, units: int = 2, random_directions: int = 2, top: int = 8) -> None:
        self.layer = layer
        self.units = units
        self.random_directions = random_directions
        self.top = top

    def _module(self, model: nn.Module) -> tuple[str, nn.Module, bool]:
        if self.layer is not None:
            modules = dict(model.named_modules())
            if self.layer not in modules:
                raise ConfigError(f"SemanticDirections: no layer {self.layer!r}; layers: {list(modules)[:20]} ...")
            return self.layer, modules[self.layer], False
        name, last = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)][-1]
        return name, last, True

    def run(self, model, data, progress):
        name, module, use_input = self._module(model)
        features = []

        def hook(mod, inputs, output):
            features.append((inputs[0] if use_input else output).detach().flatten(1).float().cpu())

        handle = module.register_forward_hook(hook)
        try:
            for _, x, _ in data.batches():
                predict(model, x)
                progress(1)
        finally:
            handle.remove()
        phi = data.cat(features)  # every process's samples, in sample order
        gen = torch.Generator().manual_seed(data.seed)
        units = phi.var(0).argsort(descending=True)[: self.units].tolist()  # the most varied units
        directions = {f"unit {u}": torch.nn.functional.one_hot(torch.tensor(u), phi.shape[1]).float() for u in units}
        for r in range(self.random_directions):
            v = torch.randn(phi.shape[1], generator=gen)
            directions[f"random direction {r}"] = v / v.norm()
        top = min(self.top, len(phi))
        indices = {label: (phi @ v).topk(top).indices.tolist() for label, v in directions.items()}
        purity = {label: _purity(data.y[idx]) for label, idx in indices.items()}
        chance = [_purity(data.y[torch.randperm(len(data.y), generator=gen)[:top]]) for _ in range(200)]
        means = {
            "purity_units": mean_interval([p for k, p in purity.items() if k.startswith("unit")], data.seed),
            "purity_random_directions": mean_interval(
                [p for k, p in purity.items() if k.startswith("random")], data.seed
            ),
            "purity_random_images": mean_interval(chance, data.seed),
        }  # intervals over the directions (units, random directions) and over the 200 random sets of images
        return {
            "layer": name + (" (input)" if use_input else ""),
            "top_indices": indices,
            "label_purity": purity,
            **{key: e.mean for key, e in means.items()},
            "ci": {key: ci(e) for key, e in means.items()},
            "n": {key: e.n for key, e in means.items()},
        }

    def render(self, results, context):
        out = Rendered()
        for name, r in results.items():
            directions = r["top_indices"]
            top = len(next(iter(directions.values())))
            with style():
                fig = figure(1.2 * top + 1.2, 1.35 * len(directions) + 0.5)
                axes = fig.subplots(len(directions), top, squeeze=False)
                for i, (label, indices) in enumerate(directions.items()):
                    for j, index in enumerate(indices):
                        image = image_array(context.data.x[index])
                        axes[i][j].imshow(image, cmap="gray" if image.ndim == 2 else None)
                        axes[i][j].set_xticks([])
                        axes[i][j].set_yticks([])
                    axes[i][0].set_ylabel(f"{label}\npurity {r['label_purity'][label]:.2f}", fontsize=9)
                fig.suptitle(f"{name}: images that most activate {r['layer']} along each direction")
            out.figures.append((f"semantic directions: {name}", fig))
            out.say(f"{name}: label purity of the top images (share of their most common class): single units "
                    f"{r['purity_units']:.2f}, random directions {r['purity_random_directions']:.2f}, random sets of "
                    f"images {r['purity_random_images']:.2f} (chance).")  # fmt: skip
        rows = [[name, r["layer"], *[estimate(r, key) for key in ("purity_units", "purity_random_directions",
                                                                   "purity_random_images")]]
                for name, r in results.items()]  # fmt: skip
        out.tables.append(Table(["model", "layer", "purity: units", "purity: random directions",
                                 "purity: random images"], rows))  # fmt: skip
        return out


def _purity(labels: torch.Tensor) -> float:
    return float(torch.bincount(labels).max()) / max(1, len(labels))
