"""Attacks through influence: on the explanation (Ghorbani et al. 2019) and on the training set (Koh & Liang 2017).

- `InfluenceFragilityAttack`: a label-preserving L-infinity perturbation of a query image that lowers the summed
  score of its ``top`` most helpful training points (signed-gradient steps, projected; an iterate whose predicted
  label changed is never kept; the kept iterate is the one with the lowest score), compared with random signs of
  the same budget (`random_sign`); `compare_influence` measures what changed: the Spearman correlation of the
  whole influence vectors before and after, and the overlap of their top-k proponents.
- `TrainingSetAttack`: Koh & Liang's ``I_pert,loss`` attack: move chosen training images, inside an L-infinity
  box around the originals, against the gradient of their helpfulness to a target test point (so their presence
  raises its loss), retraining the model between steps; `TrainingSetAttack.choose` picks the training images
  whose perturbation matters most for the target.

The gradients are exact input gradients of influence scores (`Influence.pair_input_gradient`); with a ReLU
network they need no smooth surrogate (the score is bilinear in the parameter gradients, whose input derivative
is not zero almost everywhere, unlike the input gradient of a saliency map).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from robustattr.errors import ConfigError
from robustattr.influence.base import Influence
from robustattr.metrics.functional import spearman, topk_intersection


def _check_epsilon(owner: str, epsilon: float) -> None:
    if not 0 < epsilon <= 1:
        raise ConfigError(f"{owner}: epsilon must be in (0, 1] (images in [0, 1]), got {epsilon}")


def _predict(influence: Influence, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return influence.model(x.to(influence.device, influence.dtype)).argmax(1).cpu()


def random_sign(x: torch.Tensor, epsilon: float, seed: int) -> torch.Tensor:
    """The random-sign baseline of the same budget: ``clip(x + epsilon * sign(N(0, I)), 0, 1)`` (Ghorbani et al.)."""
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))
    return (x + epsilon * noise.sign().to(x.dtype)).clamp(0, 1)


def compare_influence(before: torch.Tensor, after: torch.Tensor, k: int = 5) -> dict[str, torch.Tensor]:
    """Per query (rows of (Q, n) score matrices): ``spearman`` of the two influence vectors and ``top_overlap``,
    the share of the ``k`` most helpful training points before that are still among the ``k`` after."""
    k = min(k, before.shape[1])
    return {"spearman": spearman(before.double(), after.double()).float(),
            "top_overlap": topk_intersection(before.double(), after.double(), k).float()}  # fmt: skip


@dataclass
class InfluenceAttackResult:
    x_adv: torch.Tensor
    kept: torch.Tensor  # the predicted label of every returned image equals the clean prediction
    objective_before: torch.Tensor  # summed score of the top training points, per query
    objective_after: torch.Tensor


class InfluenceFragilityAttack:
    """Lower the influence of each query's ``top`` most helpful training points (Ghorbani et al.: 3) within an
    L-infinity ball of ``epsilon``, by ``steps`` signed-gradient steps of ``step_size`` (default 2.5 epsilon /
    steps), keeping the predicted label. ``(influence, x, y)``: a fitted backend with explicit inverse products
    (exact or CG), query images in [0, 1] and the labels their influence is measured with (their true labels)."""

    def __init__(self, epsilon: float, steps: int = 20, step_size: float | None = None, top: int = 3) -> None:
        _check_epsilon("InfluenceFragilityAttack", epsilon)
        if steps < 1 or top < 1:
            raise ConfigError(f"InfluenceFragilityAttack: steps and top must be positive, got {steps} and {top}")
        self.epsilon = float(epsilon)
        self.steps = steps
        self.step_size = 2.5 * self.epsilon / steps if step_size is None else float(step_size)
        self.top = top

    def __call__(
        self, influence: Influence, x: torch.Tensor, y: torch.Tensor, before: torch.Tensor | None = None
    ) -> InfluenceAttackResult:
        """``before``: the (Q, n) scores of the clean queries, when already computed."""
        before = influence.scores(x, y).values if before is None else before
        top = before.topk(min(self.top, before.shape[1]), dim=1).indices  # (Q, top)
        x_top, y_top = influence.train.tensors(top.flatten())
        vectors = influence.query_vectors(x_top, y_top).detach()  # (Q * top, P): H^-1 grad L(z_i) of each
        targets = vectors.reshape(len(x), top.shape[1], -1).sum(1)  # per query: the sum over its top points

        def objective(images: torch.Tensor) -> torch.Tensor:
            """The summed score of the top points on the query's loss-gradient direction (its length scales every
            score alike and leaves the ranking as it is, so the attack must turn the direction)."""
            g = influence._train_vectors(images, y)
            blocks = g.split(influence.scope.size, dim=1)
            unit = torch.cat([b / b.norm(dim=1, keepdim=True).clamp_min(torch.finfo(b.dtype).tiny) for b in blocks], 1)
            return (unit * targets.to(g.dtype)).sum(1).cpu()

        clean_pred = _predict(influence, x)
        best = x.clone()
        start = objective(x)
        best_value = start.clone()
        current = x.clone()
        for _ in range(self.steps):
            step = influence.pair_input_gradient(current, y, targets, direction=True).sign().to(x.dtype)
            current = (current - self.step_size * step).clamp(x - self.epsilon, x + self.epsilon).clamp(0, 1)
            value = objective(current)
            better = (_predict(influence, current) == clean_pred) & (value < best_value)
            best[better] = current[better]
            best_value[better] = value[better]
        kept = _predict(influence, best) == clean_pred
        return InfluenceAttackResult(best, kept, start, best_value)


class TrainingSetAttack:
    """Koh & Liang's training-set attack. ``fit(x_train, y_train) -> Influence``: retrains the model on the
    (partly poisoned) training images and returns a fitted influence backend of it (exact or CG); it is called
    before each step (``refit_every``: every that many steps). Each step moves the chosen training images by
    ``step_size`` (default epsilon / 4) against the sign of the input gradient of their helpfulness to the
    targets (``I_pert,loss``), inside the L-infinity box of ``epsilon`` around the originals and [0, 1]."""

    def __init__(self, epsilon: float, steps: int = 10, step_size: float | None = None, refit_every: int = 1) -> None:
        _check_epsilon("TrainingSetAttack", epsilon)
        if steps < 1 or refit_every < 1:
            raise ConfigError(f"TrainingSetAttack: steps and refit_every must be positive, got {steps}, {refit_every}")
        self.epsilon = float(epsilon)
        self.steps = steps
        self.step_size = self.epsilon / 4 if step_size is None else float(step_size)
        self.refit_every = refit_every

    @staticmethod
    def choose(influence: Influence, x_target: torch.Tensor, y_target: torch.Tensor, k: int,
               batch_size: int = 256) -> torch.Tensor:  # fmt: skip
        """The ``k`` training points whose images move the targets' loss most per unit of L-infinity change: the
        largest L1 norms of ``I_pert,loss`` (Koh & Liang pick the most influential training images)."""
        x, y = influence.train.tensors()
        norms = torch.cat([
            influence.input_gradient(x_target, y_target, xb, yb).flatten(1).abs().sum(1)
            for xb, yb in zip(x.split(batch_size), y.split(batch_size), strict=True)
        ])  # fmt: skip
        return norms.topk(min(k, len(norms))).indices

    def __call__(
        self,
        fit: Callable[[torch.Tensor, torch.Tensor], Influence],
        x_train: torch.Tensor,
        y_train: torch.Tensor,
        indices: torch.Tensor,
        x_target: torch.Tensor,
        y_target: torch.Tensor,
    ) -> torch.Tensor:
        """The training images with those at ``indices`` poisoned (labels unchanged)."""
        indices = torch.as_tensor(indices, dtype=torch.long)
        if len(indices) == 0:
            raise ConfigError("TrainingSetAttack: no training points to perturb")
        original = x_train[indices]
        poisoned = x_train.clone()
        influence = None
        for step in range(self.steps):
            if influence is None or step % self.refit_every == 0:
                influence = fit(poisoned, y_train)
            g = influence.input_gradient(x_target, y_target, poisoned[indices], y_train[indices])
            moved = poisoned[indices] - self.step_size * g.sign().to(poisoned.dtype)
            poisoned[indices] = moved.clamp(original - self.epsilon, original + self.epsilon).clamp(0, 1)
        return poisoned
