"""FGSM, BIM and PGD: one projected sign/normalised-gradient loop with different defaults.

- FGSM (Goodfellow et al. 2015): one step of size eps from x.
- BIM / I-FGSM (Kurakin et al. 2017): ``steps`` steps of ``step_size`` from x.
- PGD (Madry et al. 2018): BIM from a uniform random start in the ball, with optional restarts.

All are batched, untargeted or targeted (a given class, random, least likely, runner-up), optionally stop
per sample once they succeed, and draw fresh randomness by default or a fixed stream with ``seed`` (the same seed
gives the same adversaries).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from robustattr.attacks.base import (
    IterativeAttack,
    TargetMode,
    choose_target,
    generator_for,
    gradient_context,
    prepare,
)
from robustattr.attacks.threat import LinfBall, ThreatModel


class PGD(IterativeAttack):
    """Projected gradient descent on the cross-entropy.

    Args:
        threat: the ball (default ``LinfBall(8/255)``).
        steps: gradient steps per restart.
        step_size: step length in the threat model's norm; default ``2.5 * eps / steps`` (2/255 for 10 steps at
            8/255, the common CIFAR setting).
        random_start: start from a uniform random point of the ball instead of x.
        restarts: independent random starts; per sample the best result is kept (a success, else the highest loss).
        target: ``"none"`` (untargeted), ``"random"``, ``"least_likely"`` or ``"runner_up"``; an explicit
            ``target`` tensor passed to the call overrides it.
        early_stop: freeze each sample at its first successful iterate.
        seed: None (the default) draws random starts and random targets from the global RNG: fresh on every call,
            as adversarial training needs, and reproducible under ``seed_everything``. An int gives a private
            generator: the same adversaries on every call (the validation callbacks inject one per chunk); one int
            per row gives each sample its own (the audit seeds samples by index, `robustattr.rng`).
    """

    short_name = "pgd"

    def __init__(
        self,
        threat: ThreatModel | None = None,
        steps: int = 10,
        step_size: float | None = None,
        random_start: bool = True,
        restarts: int = 1,
        target: TargetMode = "none",
        early_stop: bool = False,
        seed: int | None = None,
    ) -> None:
        threat = threat if threat is not None else LinfBall(8 / 255)
        super().__init__(threat, steps, step_size, restarts, random_start, seed)
        self.target = target
        self.early_stop = early_stop

    @property
    def step_size(self) -> float:
        return self._step_size if self._step_size is not None else 2.5 * self.threat.eps / self.steps

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.threat}, steps={self.steps}, step_size={self.step_size:.6g}, "
            f"random_start={self.random_start}, restarts={self.restarts}, target={self.target!r})"
        )

    def __call__(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None = None
    ) -> torch.Tensor:
        input_device, input_dtype = x.device, x.dtype
        with gradient_context(model):
            x, y, target = prepare(model, x, y, target)
            generator = generator_for(x.device, self.seed)
            if target is None and self.target != "none":
                with torch.no_grad():
                    target = choose_target(self.target, model(x), y, generator)
            best = best_loss = best_success = None
            for _ in range(self.restarts):
                x_adv = self._run(model, x, y, target, generator)
                if self.restarts == 1:
                    best = x_adv
                    break
                loss, success = self._judge(model, x_adv, y, target)
                if best is None:
                    best, best_loss, best_success = x_adv, loss, success
                    continue
                # Per sample, a success beats a failure; between equals, the higher loss wins.
                better = (success & ~best_success) | ((success == best_success) & (loss > best_loss))
                best = torch.where(better.view(-1, *[1] * (x.dim() - 1)), x_adv, best)
                best_loss = torch.where(better, loss, best_loss)
                best_success = best_success | success
        return best.detach().to(device=input_device, dtype=input_dtype)

    def _success(self, logits: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor:
        pred = logits.argmax(dim=1)
        return pred == target if target is not None else pred != y

    def _run(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        target: torch.Tensor | None,
        generator: torch.Generator,
    ) -> torch.Tensor:
        threat, alpha = self.threat, self.step_size
        x_adv = threat.random_start(x, generator) if self.random_start else x.clone()
        labels, sign = (target, -1.0) if target is not None else (y, 1.0)
        active = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
        for _ in range(self.steps):
            x_adv.requires_grad_(True)
            logits = model(x_adv)
            loss = sign * F.cross_entropy(logits, labels, reduction="sum")
            (grad,) = torch.autograd.grad(loss, x_adv)
            x_next = threat.step(x_adv.detach(), x, grad, alpha)
            if self.early_stop:
                active &= ~self._success(logits.detach(), y, target)
                x_next = torch.where(active.view(-1, *[1] * (x.dim() - 1)), x_next, x_adv.detach())
            x_adv = x_next
        return x_adv.detach()

    def _judge(
        self, model: nn.Module, x_adv: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            logits = model(x_adv)
        labels, sign = (target, -1.0) if target is not None else (y, 1.0)
        return sign * F.cross_entropy(logits, labels, reduction="none"), self._success(logits, y, target)


class BIM(PGD):
    """Basic iterative method (I-FGSM): PGD from x itself, no random start, one run."""

    short_name = "bim"

    def __init__(
        self,
        threat: ThreatModel | None = None,
        steps: int = 10,
        step_size: float | None = None,
        target: TargetMode = "none",
        early_stop: bool = False,
        seed: int | None = None,
    ) -> None:
        super().__init__(threat, steps, step_size, False, 1, target, early_stop, seed)


class FGSM(PGD):
    """Fast gradient sign method: one step of size eps (L2: one normalised-gradient step of length eps)."""

    short_name = "fgsm"

    def __init__(self, threat: ThreatModel | None = None, target: TargetMode = "none", seed: int | None = None) -> None:
        super().__init__(threat, 1, None, False, 1, target, False, seed)

    @property
    def step_size(self) -> float:
        return self.threat.eps


def projected_ascent(
    objective: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    threat: ThreatModel,
    steps: int,
    step_size: float,
    start: torch.Tensor | None = None,
) -> torch.Tensor:
    """Maximise ``objective(x_adv)`` (a scalar, typically a sum over the batch) over the threat model's ball
    around x by steepest-ascent steps, starting from ``start`` (default x). The inner maximisation of
    TRADES and IG-NORM; the caller provides the gradient context (see `gradient_context`)."""
    x_adv = (x if start is None else start).detach().clone()
    for _ in range(steps):
        x_adv.requires_grad_(True)
        (grad,) = torch.autograd.grad(objective(x_adv), x_adv)
        x_adv = threat.step(x_adv.detach(), x, grad, step_size)
    return x_adv.detach()
