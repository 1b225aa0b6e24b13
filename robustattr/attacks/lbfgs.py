"""Box-constrained L-BFGS (Szegedy et al. 2014): the smallest perturbation that reaches a target class.

For each sample, ``minimise c * ||r||^2 + CE(f(x + r), l)`` subject to ``x + r in [0, 1]``, for a target
``l != f(x)``, and search over ``c`` for the largest value (the least distortion) that still reaches ``l``.
The box-constrained minimisation is scipy's L-BFGS-B (the method the paper names), run on the whole batch at
once: the objective is a sum of per-sample terms, so the batch problem separates. The squared norm keeps the
objective smooth at r = 0, where L-BFGS starts. Distortion is reported as ``sqrt(mean((x' - x)^2))``, the
measure of the paper's Table 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import minimize
from torch import nn

from robustattr.attacks.base import TargetMode, choose_target, generator_for, gradient_context, prepare
from robustattr.errors import ConfigError


@dataclass
class LBFGSResult:
    x_adv: torch.Tensor  # the minimum-distortion example found (x itself where none was)
    success: torch.Tensor  # bool: the target class was reached
    distortion: torch.Tensor  # sqrt(mean((x' - x)^2)) per sample; NaN where no example was found
    c: torch.Tensor  # the c of the returned example
    target: torch.Tensor


def rms_distortion(x_adv: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return (x_adv - x).reshape(x.shape[0], -1).pow(2).mean(dim=1).sqrt()


class LBFGS:
    """Szegedy's minimum-distortion targeted attack.

    Args:
        target: how to pick the target class (``random``, ``least_likely``, ``runner_up``); an explicit
            ``target`` tensor passed to the call overrides it.
        c_init: the first c tried; then c grows tenfold while the target is reached, shrinks tenfold while it is
            not, and is bisected (geometrically) once bracketed.
        search_steps: values of c tried per sample.
        max_iter: L-BFGS-B iterations per value of c.
        seed: seed of random targets.
    """

    short_name = "lbfgs"

    def __init__(
        self,
        target: TargetMode = "random",
        c_init: float = 0.1,
        search_steps: int = 8,
        max_iter: int = 100,
        seed: int = 0,
    ) -> None:
        if target == "none":
            raise ConfigError("LBFGS is a targeted attack: target must be random, least_likely or runner_up")
        if c_init <= 0 or search_steps < 1 or max_iter < 1:
            raise ConfigError("LBFGS: c_init must be positive, search_steps and max_iter at least 1")
        self.target = target
        self.c_init = c_init
        self.search_steps = search_steps
        self.max_iter = max_iter
        self.seed = seed

    def __call__(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None = None
    ) -> torch.Tensor:
        return self.run(model, x, y, target).x_adv

    def _minimise(self, model: nn.Module, x: torch.Tensor, target: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shape, dtype = x.shape, x.dtype
        c_full = c.view(-1, *[1] * (x.dim() - 1))

        def objective(z: np.ndarray) -> tuple[float, np.ndarray]:
            x_adv = torch.from_numpy(z).to(device=x.device, dtype=dtype).view(shape).requires_grad_(True)
            distortion = (c_full * (x_adv - x).pow(2)).sum()
            loss = distortion + F.cross_entropy(model(x_adv), target, reduction="sum")
            (grad,) = torch.autograd.grad(loss, x_adv)
            return loss.item(), grad.detach().double().cpu().numpy().ravel()

        start = x.detach().double().cpu().numpy().ravel()
        result = minimize(
            objective, start, jac=True, method="L-BFGS-B", bounds=[(0.0, 1.0)], options={"maxiter": self.max_iter}
        )
        return torch.from_numpy(result.x).to(device=x.device, dtype=dtype).view(shape)

    def run(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None = None
    ) -> LBFGSResult:
        input_device = x.device
        with gradient_context(model):
            x, y, target = prepare(model, x, y, target)
            if target is None:
                with torch.no_grad():
                    target = choose_target(self.target, model(x), y, generator_for(x.device, self.seed))
            n = x.shape[0]
            c = torch.full((n,), self.c_init, device=x.device)
            lo, hi = torch.zeros_like(c), torch.full_like(c, float("inf"))
            best = x.clone()
            best_dist = torch.full_like(c, float("inf"))
            best_c = torch.full_like(c, float("nan"))
            for _ in range(self.search_steps):
                x_adv = self._minimise(model, x, target, c)
                with torch.no_grad():
                    success = model(x_adv).argmax(dim=1) == target
                dist = rms_distortion(x_adv, x)
                improved = success & (dist < best_dist)
                best = torch.where(improved.view(-1, *[1] * (x.dim() - 1)), x_adv, best)
                best_dist = torch.where(improved, dist, best_dist)
                best_c = torch.where(improved, c, best_c)
                # Reached: a larger c (less distortion) may still reach it. Missed: c must shrink.
                lo = torch.where(success, torch.maximum(lo, c), lo)
                hi = torch.where(success, hi, torch.minimum(hi, c))
                c = torch.where(hi.isinf(), lo * 10, torch.where(lo == 0, hi / 10, (lo * hi).sqrt()))
        found = best_dist.isfinite()
        return LBFGSResult(
            x_adv=best.detach().to(input_device),
            success=found.to(input_device),
            distortion=torch.where(found, best_dist, torch.full_like(best_dist, float("nan"))).to(input_device),
            c=best_c.to(input_device),
            target=target.to(input_device),
        )
