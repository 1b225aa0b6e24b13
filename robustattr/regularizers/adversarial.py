"""Objectives that need an inner maximisation: PGD adversarial training (and its fast FGSM variant),
TRADES, IG-NORM and IG-SUM-NORM. The inner maximisation runs through the attack engine, in eval mode with
parameters frozen (`gradient_context`), as the TRADES authors' code crafts its adversaries.

BatchNorm: PGD-AT and TRADES train on adversarial batches, and so do their statistics, as in the authors' code:
the outer forward on x' runs in the network's training mode and updates the running statistics (with
``ce_weight: 0``, PGD-AT's clean forward is skipped altogether, so the statistics come from adversarial batches
only, the ones the network is trained on). IG-NORM's many path points are a penalty, not training inputs: its
outer passes keep the statistics frozen.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from robustattr.attacks.base import gradient_context
from robustattr.attacks.gradient import PGD, projected_ascent
from robustattr.attacks.threat import LinfBall
from robustattr.derivatives import at_least_fp32, frozen_norm_stats, loss_input_gradient
from robustattr.errors import ConfigError, keep_counts
from robustattr.regularizers.base import ObjectiveTerm


class _Crafted(ObjectiveTerm):
    """A term that trains on inputs it crafts in `prepare` (called by the training step before its forwards);
    called directly (a notebook, a test), it crafts them then."""

    _x_adv: torch.Tensor | None = None

    def _take_prepared(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self._x_adv is None or self._x_adv.shape != x.shape:
            self.prepare(model, x, y)
        return self._x_adv


class AdversarialCE(_Crafted):
    """PGD adversarial training (Madry et al. 2018): the cross-entropy on ``attack(model, x, y)``.

    The default attack is PGD with 10 steps of 2/255 at 8/255 from a fresh random start each step (attacks draw
    fresh randomness by default). The fast variant (Wong et al. 2020) is ``attack: PGD(steps=1, step_size=1.25 *
    eps, random_start=True)``. Madry's objective is ``ce_weight: 0`` with this term at weight 1: the training
    step then runs no clean forward (nothing would use it), and BatchNorm learns its statistics from the
    adversarial batches, as in the authors' code. ``training_logits`` holds the last adversarial logits, logged
    as ``train/<name>/acc`` (robust training accuracy)."""

    default_name = "pgd_at"

    def __init__(
        self, weight: float = 1.0, name: str | None = None, warmup_epochs: float = 0.0, attack: PGD | None = None
    ):
        super().__init__(weight, name, warmup_epochs)
        self.attack = attack if attack is not None else PGD(LinfBall(8 / 255), steps=10)

    def prepare(self, model, x, y):
        self._x_adv = self.attack(model, x.detach(), y)

    def forward(self, model, x, y, logits=None):
        x_adv, self._x_adv = self._take_prepared(model, x, y), None
        logits_adv = model(x_adv)  # the network's own mode: in training, BatchNorm learns from this batch
        self.training_logits = logits_adv.detach()
        return F.cross_entropy(logits_adv, y)


class TRADES(_Crafted, uses_clean_forward=True):
    """TRADES (Zhang et al. 2019): ``KL(f(x) || f(x'))`` with x' maximising it in the ball, as the authors' code
    computes it: x' by PGD from ``x + 0.001 N(0, 1)`` against the clean probabilities of the network in eval
    mode, before the step's training-mode forwards; the loss then compares the training-mode outputs on x (the
    training step's own forward, with gradient) and on x' (which updates BatchNorm statistics, as theirs does).
    With the clean CE this is ``CE(x) + beta * KL``, beta = ``weight`` = 6."""

    def __init__(
        self,
        weight: float = 6.0,
        name: str | None = None,
        warmup_epochs: float = 0.0,
        threat: LinfBall | None = None,
        steps: int = 10,
        step_size: float | None = None,
        init_sigma: float = 0.001,
    ):
        super().__init__(weight, name, warmup_epochs)
        keep_counts(self, steps=steps)
        self.threat = threat if threat is not None else LinfBall(8 / 255)
        self.step_size = step_size if step_size is not None else 2.5 * self.threat.eps / steps
        self.init_sigma = init_sigma

    def prepare(self, model, x, y):
        x0 = at_least_fp32(x.detach())  # iterates in fp32 even under bf16-true
        with gradient_context(model):  # eval mode, as the authors' code crafts x'
            with torch.no_grad():
                target = model(x0).softmax(dim=1)
            start = x0 + self.init_sigma * torch.randn_like(x0)  # not clamped, as theirs

            def kl(x_adv: torch.Tensor) -> torch.Tensor:
                return F.kl_div(model(x_adv).log_softmax(dim=1), target, reduction="sum")

            self._x_adv = projected_ascent(kl, x0, self.threat, self.steps, self.step_size, start)

    def forward(self, model, x, y, logits=None):
        x_adv, self._x_adv = self._take_prepared(model, x, y), None
        if logits is None:
            logits = model(x)
        log_q = model(x_adv).log_softmax(dim=1)  # training mode: BatchNorm statistics see x' too
        return F.kl_div(log_q, logits.softmax(dim=1), reduction="batchmean")


def integrated_loss_gradients(
    model: nn.Module, x: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor, steps: int
) -> torch.Tensor:
    """IG of the per-sample loss along the straight path x -> x_adv (baseline x): ``(x_adv - x) * mean_k
    grad CE(x + k/m (x_adv - x))``, differentiable in x_adv and in the parameters."""
    total = torch.zeros_like(x_adv)
    for k in range(1, steps + 1):
        point = x + (k / steps) * (x_adv - x)
        if not point.requires_grad:
            point = point.requires_grad_(True)
        _, _, g = loss_input_gradient(model, point, y, model(point))  # through x_adv: its own forward, kept
        total = total + g
    return (x_adv - x) * total / steps


class IGNorm(ObjectiveTerm, second_order=True):
    """IG-NORM (Chen et al. 2019): ``max_{x' in B(x, eps)} ||IG^loss(x, x')||_1``, the inner maximum by PGD
    (7 steps of 2/255 at 8/255 from a random start, ``attack_ig_steps`` path points), the penalty with
    ``ig_steps`` points (50). ``sum_norm=True`` gives IG-SUM-NORM, ``max_{x'} CE(x') + beta ||IG(x, x')||_1``,
    which replaces the clean loss: use it with ``ce_weight: 0``."""

    def __init__(
        self,
        weight: float = 1.0,
        name: str | None = None,
        warmup_epochs: float = 0.0,
        threat: LinfBall | None = None,
        attack_steps: int = 7,
        attack_step_size: float = 2 / 255,
        ig_steps: int = 50,
        attack_ig_steps: int = 10,
        sum_norm: bool = False,
        beta: float = 1.0,
    ):
        super().__init__(weight, name or ("ig_sum_norm" if sum_norm else "ig_norm"), warmup_epochs)
        keep_counts(self, attack_steps=attack_steps, ig_steps=ig_steps, attack_ig_steps=attack_ig_steps)
        if attack_step_size <= 0:
            raise ConfigError(f"IGNorm: attack_step_size must be positive, got {attack_step_size}")
        self.threat = threat if threat is not None else LinfBall(8 / 255)
        self.attack_step_size = attack_step_size
        self.sum_norm = sum_norm
        self.beta = beta

    def _objective(self, model, x, x_adv, y, steps) -> torch.Tensor:
        ig = integrated_loss_gradients(model, x, x_adv, y, steps).reshape(x.shape[0], -1).abs().sum(dim=1)
        if not self.sum_norm:
            return ig
        return F.cross_entropy(model(x_adv), y, reduction="none") + self.beta * ig

    def forward(self, model, x, y, logits=None):
        x0 = at_least_fp32(x.detach())  # iterates in fp32 even under bf16-true
        with gradient_context(model):
            start = self.threat.random_start(x0)  # at x' = x the IG is zero, and so is its gradient
            x_adv = projected_ascent(
                lambda xa: self._objective(model, x0, xa, y, self.attack_ig_steps).sum(),
                x0, self.threat, self.attack_steps, self.attack_step_size, start,
            )  # fmt: skip
        with frozen_norm_stats(model):
            return self._objective(model, x0, x_adv, y, self.ig_steps).mean()
