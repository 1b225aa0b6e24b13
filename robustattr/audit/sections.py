"""Audit sections. Each one runs the library's own attacks, attributions and metrics (no second implementation)
on the audit's fixed, seeded subset and returns plain JSON-able results; `robustattr.audit.report` draws them.

Per-checkpoint sections implement ``run(model, data, progress)``; cross-checkpoint sections (transferability)
implement ``run_all(models, data, progress)``. The cache identifies a section by its complete state
(`robustattr.audit.cache.fingerprint`), so every setting a section holds takes part in its cache key.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from torch import nn

from robustattr.attacks import (
    BIM,
    FGSM,
    LBFGS,
    PGD,
    ExplanationAttack,
    LinfBall,
    MassCenterAttack,
    RandomSignAttack,
    TargetedAttack,
    TopKAttack,
    choose_target,
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
from robustattr.errors import ConfigError
from robustattr.metrics import functional as M
from robustattr.regularizers import top_hessian_eigenvalue

Progress = Callable[[int], None]


@dataclass
class AuditData:
    x: torch.Tensor  # (N, C, H, W) in [0, 1], CPU
    y: torch.Tensor
    batch_size: int
    seed: int

    def batches(self, limit: int | None = None) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        n = len(self.x) if limit is None else min(limit, len(self.x))
        for c, start in enumerate(range(0, n, self.batch_size)):
            stop = min(start + self.batch_size, n)
            yield c, self.x[start:stop], self.y[start:stop]

    def count(self, limit: int | None = None) -> int:
        n = len(self.x) if limit is None else min(limit, len(self.x))
        return math.ceil(n / self.batch_size)


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _mean(values: list[torch.Tensor]) -> float:
    cat = torch.cat([v.flatten().float().cpu() for v in values]) if values else torch.empty(0)
    cat = cat[~cat.isnan()]
    return float(cat.mean()) if cat.numel() else float("nan")


def _predict(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x.to(_device(model))).cpu()


class Section:
    """Base class of the audit sections."""

    name = "section"
    cross_model = False

    def work(self, data: AuditData) -> int:
        """Units of progress (for the progress bar)."""
        return data.count()

    def run(self, model: nn.Module, data: AuditData, progress: Progress) -> dict:
        raise NotImplementedError

    def run_all(self, models: dict[str, nn.Module], data: AuditData, progress: Progress) -> dict:
        raise NotImplementedError


def _default_epsilons(epsilons: list[float] | None) -> list[float]:
    return epsilons if epsilons is not None else [1 / 255, 2 / 255, 4 / 255, 8 / 255]


class RobustnessCurves(Section):
    """(a) Clean accuracy, accuracy under FGSM, BIM and PGD over an epsilon list, and Szegedy et al.'s L-BFGS
    minimum-distortion statistics (their Table 1: mean distortion ``sqrt(mean(r^2))`` over the examples found)."""

    name = "robustness"

    def __init__(
        self,
        epsilons: list[float] | None = None,
        steps: int = 10,
        lbfgs_samples: int = 32,
        lbfgs_search_steps: int = 6,
        lbfgs_max_iter: int = 50,
    ) -> None:
        self.epsilons = _default_epsilons(epsilons)
        self.steps = steps
        self.lbfgs_samples = lbfgs_samples
        self.lbfgs_search_steps = lbfgs_search_steps
        self.lbfgs_max_iter = lbfgs_max_iter

    def work(self, data):
        return data.count() + data.count(self.lbfgs_samples)

    def run(self, model, data, progress):
        attacks = {"fgsm": FGSM(), "bim": BIM(steps=self.steps), "pgd": PGD(steps=self.steps)}
        correct = {name: [[] for _ in self.epsilons] for name in attacks}
        clean = []
        for c, x, y in data.batches():
            clean.append((_predict(model, x).argmax(1) == y).float())
            for name, attack in attacks.items():
                for i, eps in enumerate(self.epsilons):
                    x_adv = with_seed(attack.with_eps(eps), data.seed + c)(model, x, y)
                    correct[name][i].append((_predict(model, x_adv).argmax(1) == y).float())
            progress(1)
        lbfgs = LBFGS(search_steps=self.lbfgs_search_steps, max_iter=self.lbfgs_max_iter, seed=data.seed)
        distortions, found = [], []
        for _, x, y in data.batches(self.lbfgs_samples):
            result = lbfgs.run(model, x, y)
            distortions.append(result.distortion[result.success])
            found.append(result.success.float())
            progress(1)
        d = torch.cat(distortions) if distortions else torch.empty(0)
        return {
            "epsilons": self.epsilons,
            "clean_accuracy": _mean(clean),
            "accuracy": {name: [_mean(v) for v in per_eps] for name, per_eps in correct.items()},
            "lbfgs": {
                "samples": int(sum(len(f) for f in found)),
                "success_rate": _mean(found),
                "distortion_mean": float(d.mean()) if d.numel() else float("nan"),
                "distortion_median": float(d.median()) if d.numel() else float("nan"),
                "distortion_min": float(d.min()) if d.numel() else float("nan"),
                "distortion_max": float(d.max()) if d.numel() else float("nan"),
            },
        }


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
    return [
        RandomSignAttack(),
        TopKAttack(steps=steps),
        MassCenterAttack(steps=steps),
        TargetedAttack(steps=steps),
    ]


def _attackable(method: Attribution) -> Attribution:
    """Captum's methods cannot be differentiated: attacks on them go through gradient x input, their closest
    differentiable relative (DeepLIFT's Rescale rule reduces to it on linear pieces), and are measured on the
    method itself."""
    return GradientXInput() if isinstance(method, CaptumAttribution) else method


def _map_metrics(clean: torch.Tensor, adv: torch.Tensor, kept: torch.Tensor, k: int) -> dict[str, torch.Tensor]:
    nan = torch.full(kept.shape, float("nan"))
    out = {
        "topk_intersection": M.topk_intersection(clean, adv, k),
        "spearman": M.spearman(clean, adv),
        "kendall": M.kendall_tau(clean, adv),
        "center_shift": M.center_shift(clean, adv),
        "cosine_distance": M.cosine_distance(clean, adv),
    }
    out = {name: torch.where(kept, value.cpu().float(), nan) for name, value in out.items()}
    out["label_kept"] = kept.float()
    return out


def _fragility(model, method, attack, data, progress, limit=None, measure_model=None) -> dict[str, float]:
    """Attack ``method`` on ``model`` over the subset; measure ``method``'s maps (on ``measure_model``)."""
    measure_model = measure_model or model
    values: dict[str, list[torch.Tensor]] = {}
    for c, x, y in data.batches(limit):
        configured = with_seed(attack, data.seed + c)
        configured.attribution = _attackable(method)
        result = configured.run(model, x, y)
        if configured.attribution is method and measure_model is model:
            clean, adv = result.maps_clean.cpu(), result.maps_adv.cpu()
        else:
            with gradient_context(measure_model):
                device = _device(measure_model)
                clean = M.pixel_map(method(measure_model, x.to(device), result.target.to(device))).cpu()
                adv = M.pixel_map(method(measure_model, result.x_adv.to(device), result.target.to(device))).cpu()
        k = attack.k or M.default_k(*clean.shape[1:])
        for name, value in _map_metrics(clean, adv, result.kept.cpu(), k).items():
            values.setdefault(name, []).append(value)
        progress(1)
    return {name: _mean(v) for name, v in values.items()}


class ExplanationFragility(Section):
    """(b) Each attribution method x each explanation attack x each epsilon: top-k intersection, Spearman,
    Kendall, centre shift, cosine distance (over samples whose label was kept) and the label-kept rate; and per
    method and attack the area under cosine distance over epsilon, from 0 to the largest epsilon and divided by
    it, i.e. the mean cosine distance over the sweep (Wang et al.'s summary: lower is more robust). Captum's
    DeepLift and GradientShap are evaluated on perturbations crafted through gradient x input (see
    `_attackable`)."""

    name = "fragility"

    def __init__(
        self,
        methods: list[Attribution] | None = None,
        attacks: list[ExplanationAttack] | None = None,
        epsilons: list[float] | None = None,
        steps: int = 10,
        num_samples: int = 64,
    ) -> None:
        self.methods = methods if methods is not None else _default_methods()
        self.attacks = attacks if attacks is not None else _default_attacks(steps)
        self.epsilons = epsilons if epsilons is not None else [2 / 255, 4 / 255, 8 / 255]
        self.num_samples = num_samples

    def work(self, data):
        return len(self.methods) * len(self.attacks) * len(self.epsilons) * data.count(self.num_samples)

    def run(self, model, data, progress):
        results: dict = {"epsilons": self.epsilons, "methods": {}}
        for method in self.methods:
            per_attack = {}
            for attack in self.attacks:
                rows = [
                    _fragility(model, method, attack.with_eps(eps), data, progress, self.num_samples)
                    for eps in self.epsilons
                ]
                cosine = [0.0] + [row["cosine_distance"] for row in rows]
                auc = np.trapezoid(cosine, [0.0, *self.epsilons]) / max(self.epsilons)
                per_attack[attack.short_name] = {"by_epsilon": rows, "auc_cosine_distance": float(auc)}
            results["methods"][method.short_name] = per_attack
        return results


class AttributionTransfer(Section):
    """(c) Perturbations crafted against one attribution method, measured on every method: the top-k
    intersection matrix (rows: crafted against, columns: measured on)."""

    name = "attribution_transfer"

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
        for i, crafted in enumerate(self.methods):
            values: list[list[torch.Tensor]] = [[] for _ in names]
            for c, x, y in data.batches(self.num_samples):
                attack = with_seed(self.attack, data.seed + c)
                attack.attribution = _attackable(crafted)
                result = attack.run(model, x, y)
                with gradient_context(model):
                    device = _device(model)
                    for j, measured in enumerate(self.methods):
                        clean = M.pixel_map(measured(model, x.to(device), result.target.to(device))).cpu()
                        adv = M.pixel_map(measured(model, result.x_adv.to(device), result.target.to(device))).cpu()
                        k = self.attack.k or M.default_k(*clean.shape[1:])
                        values[j].append(M.topk_intersection(clean, adv, k)[result.kept.cpu()])
                progress(1)
            matrix[i] = [_mean(v) for v in values]
        return {"methods": names, "topk_intersection": matrix.tolist()}


class SmoothingWithoutRetraining(Section):
    """(d) The same attack against plain saliency, SmoothGrad, Uniform Gradient, and saliency of softplus(beta)
    copies of the same network (Dombrowski et al.): smoother explanations without retraining."""

    name = "smoothing"

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

    def run(self, model, data, progress):
        rows = {}
        for label, method in (
            ("saliency", Saliency()),
            ("smoothgrad", SmoothGrad(samples=self.samples)),
            ("uniform_gradient", UniformGradient(samples=self.samples)),
        ):
            rows[label] = _fragility(model, method, self.attack, data, progress, self.num_samples)
        for beta in self.betas:
            smooth = softplus_surrogate(model, beta)
            attack = copy.copy(self.attack)
            attack.schedule = None  # the softplus copy is smooth: attack it directly
            rows[f"softplus_{beta:g}"] = _fragility(smooth, Saliency(), attack, data, progress, self.num_samples)
        return {"epsilon": self.attack.threat.eps, "explanations": rows}


class Curvature(Section):
    """(e) Distributions over the subset of the input-gradient norm of the loss and of the top input-Hessian
    eigenvalue (power iteration on exact Hessian-vector products)."""

    name = "curvature"

    def __init__(self, power_iters: int = 10, num_samples: int = 256) -> None:
        self.power_iters = power_iters
        self.num_samples = num_samples

    def work(self, data):
        return data.count(self.num_samples)

    def run(self, model, data, progress):
        norms, eigs = [], []
        for c, x, y in data.batches(self.num_samples):
            with gradient_context(model):
                device = _device(model)
                generator = torch.Generator(device=device).manual_seed(data.seed + c)
                norm, eig = top_hessian_eigenvalue(model, x.to(device), y.to(device), self.power_iters, generator)
            norms.append(norm.cpu())
            eigs.append(eig.cpu())
            progress(1)

        def stats(values: list[torch.Tensor]) -> dict:
            t = torch.cat(values)
            q = torch.quantile(t, torch.tensor([0.1, 0.5, 0.9]))
            return {"mean": float(t.mean()), "p10": float(q[0]), "median": float(q[1]), "p90": float(q[2]),
                    "values": [float(v) for v in t]}  # fmt: skip

        return {"grad_norm": stats(norms), "hessian_top_eig": stats(eigs)}


class ExplainingAway(Section):
    """(f) Attribution evidence of clean and targeted-BIM inputs (the seed blog post): for each input, the
    coherence ``sum(IG) / sum(|IG|)`` of the Integrated Gradients (softmax output) behind its predicted class.
    Adversarial evidence for a random target comes from scattered, cancelling attributions (low coherence);
    for the runner-up class it looks much like clean evidence. Reports the detection AUROC (clean vs
    successful adversarial, lower coherence = adversarial) for random and runner-up targets, with histograms."""

    name = "explaining_away"

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
            device = _device(model)
            attr = ig(model, x.to(device), target.to(device)).flatten(1).cpu()
        return attr.sum(1) / attr.abs().sum(1).clamp_min(1e-12)

    def run(self, model, data, progress):
        bim = BIM(LinfBall(self.epsilon), steps=self.steps, step_size=2.5 * self.epsilon / self.steps)
        scores: dict[str, list[torch.Tensor]] = {"clean": [], "random": [], "runner_up": []}
        success: dict[str, list[torch.Tensor]] = {"random": [], "runner_up": []}
        for c, x, y in data.batches(self.num_samples):
            logits = _predict(model, x)
            pred = logits.argmax(1)
            scores["clean"].append(self._coherence(model, x, pred))
            for mode in ("random", "runner_up"):
                target = choose_target(mode, logits, pred, torch.Generator().manual_seed(data.seed + c))
                x_adv = bim(model, x, y, target=target)
                reached = _predict(model, x_adv).argmax(1) == target
                success[mode].append(reached.float())
                scores[mode].append(self._coherence(model, x_adv[reached], target[reached]))
            progress(1)
        clean = torch.cat(scores["clean"])
        out = {"epsilon": self.epsilon, "clean": {"coherence": [float(v) for v in clean]}}
        for mode in ("random", "runner_up"):
            adv = torch.cat(scores[mode])
            labels = np.r_[np.zeros(len(clean)), np.ones(len(adv))]
            auroc = roc_auc_score(labels, -np.r_[clean.numpy(), adv.numpy()]) if len(adv) else float("nan")
            out[mode] = {
                "attack_success": _mean(success[mode]),
                "detection_auroc": float(auroc),
                "coherence": [float(v) for v in adv],
            }
        return out


class Transferability(Section):
    """(g) Szegedy et al.'s transfer study across the audited checkpoints: PGD adversaries crafted on each
    (rows) evaluated on every other (columns) as accuracy, with a baseline row of Gaussian noise of the same
    per-sample L2 norm; and top-k explanation attacks crafted on each, measured as the top-k intersection of
    every model's saliency maps."""

    name = "transferability"
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
        acc = [[[] for _ in names] for _ in range(n + 1)]  # last row: Gaussian noise
        topk = [[[] for _ in names] for _ in names]
        pgd = PGD(LinfBall(self.epsilon), steps=self.steps)
        explanation = TopKAttack(Saliency(), LinfBall(self.epsilon), steps=self.steps)
        for c, x, y in data.batches(self.num_samples):
            noise_norms = []
            for i, source in enumerate(names):
                x_adv = with_seed(pgd, data.seed + c)(models[source], x, y)
                noise_norms.append((x_adv - x).flatten(1).norm(dim=1))
                result = with_seed(explanation, data.seed + c).run(models[source], x, y)
                for j, target in enumerate(names):
                    acc[i][j].append((_predict(models[target], x_adv).argmax(1) == y).float())
                    with gradient_context(models[target]):
                        device = _device(models[target])
                        pred = _predict(models[target], x).argmax(1).to(device)
                        clean = M.pixel_map(Saliency()(models[target], x.to(device), pred)).cpu()
                        adv = M.pixel_map(Saliency()(models[target], result.x_adv.to(device), pred)).cpu()
                    topk[i][j].append(M.topk_intersection(clean, adv, M.default_k(*clean.shape[1:])))
            gen = torch.Generator().manual_seed(data.seed + c)
            noise = torch.randn(x.shape, generator=gen)
            norm = torch.stack(noise_norms).mean(0)
            x_noise = (x + noise / noise.flatten(1).norm(dim=1).view(-1, 1, 1, 1) * norm.view(-1, 1, 1, 1)).clamp(0, 1)
            for j, target in enumerate(names):
                acc[n][j].append((_predict(models[target], x_noise).argmax(1) == y).float())
            progress(1)
        return {
            "models": names,
            "epsilon": self.epsilon,
            "accuracy": [[_mean(cell) for cell in row] for row in acc],
            "rows": [*names, "gaussian noise (same L2 norm)"],
            "topk_intersection": [[_mean(cell) for cell in row] for row in topk],
        }


class SemanticDirections(Section):
    """(h) Szegedy et al.'s semantic directions: the held-out images that most activate single units of a layer
    and random directions of the same layer. ``layer`` names a module (default: the input of the last linear
    layer); the results hold the dataset indices of the top images, which the report draws as grids."""

    name = "semantic_directions"

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
                _predict(model, x)
                progress(1)
        finally:
            handle.remove()
        phi = torch.cat(features)
        gen = torch.Generator().manual_seed(data.seed)
        units = phi.var(0).argsort(descending=True)[: self.units].tolist()  # the most varied units
        directions = {f"unit {u}": torch.nn.functional.one_hot(torch.tensor(u), phi.shape[1]).float() for u in units}
        for r in range(self.random_directions):
            v = torch.randn(phi.shape[1], generator=gen)
            directions[f"random direction {r}"] = v / v.norm()
        return {
            "layer": name + (" (input)" if use_input else ""),
            "top_indices": {label: (phi @ v).topk(self.top).indices.tolist() for label, v in directions.items()},
        }
