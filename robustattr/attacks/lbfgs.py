"""Box-constrained L-BFGS (Szegedy et al. 2014): the smallest perturbation that reaches a target class.

For each sample, ``minimise c * ||r||^2 + CE(f(x + r), l)`` subject to ``x + r in [0, 1]``, for a target
``l != f(x)``, and search over ``c`` for the largest value (the least distortion) that still reaches ``l``.
The box-constrained minimisation is scipy's L-BFGS-B (the method the paper names), one independent run per
sample: its own line searches, curvature pairs and iteration budget, so a sample's result does not depend on
which others share its batch (one L-BFGS over the flattened batch would share all three). The runs still share
the network's forward and backward passes: each runs in its own thread, and whenever every unfinished run waits
for its next objective value, one batched pass computes them all (`_lockstep`). The squared norm keeps the
objective smooth at r = 0, where L-BFGS starts. Distortion is reported as ``sqrt(mean((x' - x)^2))``, the
measure of the paper's Table 1.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
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
        seed: seed of random targets; None (the default) draws them from the global RNG.
    """

    short_name = "lbfgs"

    def __init__(
        self,
        target: TargetMode = "random",
        c_init: float = 0.1,
        search_steps: int = 8,
        max_iter: int = 100,
        seed: int | None = None,
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
        shape, dtype = x.shape[1:], x.dtype

        def evaluate(index: list[int], points: list[np.ndarray]) -> list[tuple[float, np.ndarray]]:
            rows = torch.as_tensor(index, device=x.device)
            z = torch.from_numpy(np.stack(points)).to(device=x.device, dtype=dtype).view(len(index), *shape)
            z.requires_grad_(True)
            distortion = (z - x[rows]).pow(2).flatten(1).sum(dim=1) * c[rows]
            losses = distortion + F.cross_entropy(model(z), target[rows], reduction="none")
            (grad,) = torch.autograd.grad(losses.sum(), z)  # samples are independent: row i is d loss_i / d z_i
            grad = grad.detach().double().cpu().numpy().reshape(len(index), -1)
            return [(float(v), g) for v, g in zip(losses.tolist(), grad, strict=True)]

        starts = x.detach().double().cpu().numpy().reshape(len(x), -1)
        options = {"maxiter": self.max_iter}
        results = _lockstep(
            [lambda fun, z0=z0: minimize(fun, z0, jac=True, method="L-BFGS-B", bounds=[(0.0, 1.0)], options=options)
             for z0 in starts],
            evaluate,
        )  # fmt: skip
        return torch.from_numpy(np.stack([r.x for r in results])).to(device=x.device, dtype=dtype).view(x.shape)

    def run(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None = None
    ) -> LBFGSResult:
        input_device, input_dtype = x.device, x.dtype
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
            x_adv=best.detach().to(device=input_device, dtype=input_dtype),
            success=found.to(input_device),
            distortion=torch.where(found, best_dist, torch.full_like(best_dist, float("nan"))).to(input_device),
            c=best_c.to(input_device),
            target=target.to(input_device),
        )


def _lockstep(
    runs: list[Callable[[Callable[[np.ndarray], tuple[float, np.ndarray]]], object]],
    evaluate: Callable[[list[int], list[np.ndarray]], list[tuple[float, np.ndarray]]],
) -> list:
    """Run independent optimisations that share one batched objective.

    ``runs[i](fun)`` is an optimiser (scipy's ``minimize``) that calls ``fun(z)`` for (value, gradient) at z. Each
    runs in its own thread; ``fun`` hands z to this thread and waits. Once every unfinished run waits, this thread
    evaluates all their points in one ``evaluate(indices, points)`` call (the network's work stays on the caller's
    thread, in its autograd context and on its device) and hands the values back. Returns each run's result."""
    lock = threading.Condition()
    pending: dict[int, np.ndarray] = {}
    answers: dict[int, tuple[float, np.ndarray]] = {}
    active = set(range(len(runs)))
    failure: list[BaseException] = []

    def fun_for(i: int) -> Callable[[np.ndarray], tuple[float, np.ndarray]]:
        def fun(z: np.ndarray) -> tuple[float, np.ndarray]:
            with lock:
                pending[i] = np.array(z, dtype=np.float64)
                lock.notify_all()
                lock.wait_for(lambda: i in answers or bool(failure))
                if failure:
                    raise RuntimeError("the batched objective failed")
                return answers.pop(i)

        return fun

    def work(i: int) -> object:
        try:
            return runs[i](fun_for(i))
        finally:
            with lock:
                active.discard(i)
                lock.notify_all()

    with ThreadPoolExecutor(max_workers=max(1, len(runs))) as pool:
        futures = [pool.submit(work, i) for i in range(len(runs))]
        while True:
            with lock:
                lock.wait_for(lambda: not active or len(pending) == len(active))
                if not active:
                    break
                index = sorted(pending)
                points = [pending.pop(i) for i in index]
            try:
                values = evaluate(index, points)
            except BaseException as err:
                with lock:
                    failure.append(err)
                    lock.notify_all()
                raise
            with lock:
                answers.update(zip(index, values, strict=True))
                lock.notify_all()
        return [future.result() for future in futures]
