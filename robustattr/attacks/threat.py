"""Threat models: an L-infinity or L2 ball around x, intersected with the [0, 1] box.

Each owns its random start, its unit ascent direction and its projection, so the attacks built on them carry
no norm-specific branches. Epsilons are in pixel units of [0, 1] images (8/255 = 0.0313725).
"""

from __future__ import annotations

import copy
import math

import torch

from robustattr.errors import ConfigError
from robustattr.rng import Generator, normal, uniform


def _per_sample(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(N,) per-sample values shaped to broadcast against ``like`` (N, C, H, W)."""
    return v.reshape(-1, *([1] * (like.dim() - 1)))


class ThreatModel:
    """Base class: a ball of radius ``eps`` around x, inside the [0, 1] box.

    ``eps`` is one radius, or (see `per_sample`) one radius per sample of the batch, so that an epsilon sweep runs as
    one batch of copies (one pass instead of one per epsilon)."""

    def __init__(self, eps: float) -> None:
        self.eps: float | torch.Tensor = self._check(float(eps))

    def _check(self, eps: float) -> float:
        if not math.isfinite(eps) or eps < 0:
            raise ConfigError(f"{type(self).__name__}: eps must be finite and non-negative, got {eps}")
        return eps

    def with_eps(self, eps: float) -> ThreatModel:
        """The same threat model with another radius (for epsilon sweeps)."""
        other = copy.copy(self)
        other.eps = other._check(float(eps))
        return other

    def per_sample(self, eps: torch.Tensor) -> ThreatModel:
        """The same threat model with one radius per sample: ``eps`` of shape (N,)."""
        for value in eps.flatten().tolist():
            self._check(value)
        other = copy.copy(self)
        other.eps = eps.detach().reshape(-1)
        return other

    def rows(self, index: torch.Tensor) -> ThreatModel:
        """The threat of the samples ``index`` of the batch (itself when the radius is one value)."""
        if isinstance(self.eps, float):
            return self
        other = copy.copy(self)
        other.eps = self.eps[index.to(self.eps.device)]
        return other

    def radius(self, like: torch.Tensor) -> float | torch.Tensor:
        """The radius, shaped to broadcast against a batch like ``like``."""
        return self.eps if isinstance(self.eps, float) else _per_sample(self.eps.to(like), like)

    def step(
        self, x_adv: torch.Tensor, x: torch.Tensor, grad: torch.Tensor, size: float | torch.Tensor
    ) -> torch.Tensor:
        """One steepest-ascent step of length ``size`` (one value, or one per sample) from x_adv, projected."""
        size = size if isinstance(size, float | int) else _per_sample(size.to(grad), grad)
        return self.project(x_adv + size * self.direction(grad), x)

    def norm(self, delta: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def random_start(self, x: torch.Tensor, generator: Generator = None) -> torch.Tensor:
        raise NotImplementedError

    def direction(self, grad: torch.Tensor) -> torch.Tensor:
        """The steepest-ascent direction of unit size in this norm."""
        raise NotImplementedError

    def project(self, x_adv: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        eps = f"{self.eps:.6g}" if isinstance(self.eps, float) else f"per sample, {self.eps.numel()} values"
        return f"{type(self).__name__}(eps={eps})"

    @property
    def label(self) -> str:
        """A short name for logged metrics: ``linf8`` for 8/255, ``l2_0.5``."""
        raise NotImplementedError


class LinfBall(ThreatModel):
    """``||x' - x||_inf <= eps``; sign-gradient steps; projection is exact (a box inside a box)."""

    def _check(self, eps: float) -> float:
        eps = super()._check(eps)
        if eps > 1:
            raise ConfigError(f"LinfBall: eps={eps} exceeds the whole [0, 1] pixel range (8/255 = 0.0313725)")
        return eps

    @property
    def label(self) -> str:
        return f"linf{self.eps * 255:.3g}"

    def norm(self, delta: torch.Tensor) -> torch.Tensor:
        return delta.reshape(delta.shape[0], -1).abs().amax(dim=1)

    def random_start(self, x: torch.Tensor, generator: Generator = None) -> torch.Tensor:
        noise = uniform(x.shape, generator, x.device, x.dtype)
        return (x + (2 * noise - 1) * self.radius(x)).clamp(0, 1)

    def direction(self, grad: torch.Tensor) -> torch.Tensor:
        return grad.sign()

    def project(self, x_adv: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        eps = self.radius(x)
        return torch.minimum(torch.maximum(x_adv, x - eps), x + eps).clamp(0, 1)


class L2Ball(ThreatModel):
    """``||x' - x||_2 <= eps``; normalised-gradient steps; projection onto the ball, then the box."""

    @property
    def label(self) -> str:
        return f"l2_{self.eps:.3g}"

    def norm(self, delta: torch.Tensor) -> torch.Tensor:
        return delta.reshape(delta.shape[0], -1).norm(dim=1)

    def random_start(self, x: torch.Tensor, generator: Generator = None) -> torch.Tensor:
        # Uniform in the ball: a Gaussian direction scaled to radius eps * u^(1/d).
        d = x[0].numel()
        direction = normal(x.shape, generator, x.device, x.dtype)
        direction = direction / _per_sample(self.norm(direction), x).clamp_min(1e-12)
        u = uniform((x.shape[0],), generator, x.device, x.dtype)
        eps = self.eps if isinstance(self.eps, float) else self.eps.to(x)
        return (x + direction * _per_sample(eps * u ** (1.0 / d), x)).clamp(0, 1)

    def direction(self, grad: torch.Tensor) -> torch.Tensor:
        return grad / _per_sample(self.norm(grad), grad).clamp_min(1e-12)

    def project(self, x_adv: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        delta = x_adv - x
        eps = self.eps if isinstance(self.eps, float) else self.eps.to(delta)
        scale = (eps / self.norm(delta).clamp_min(1e-12)).clamp(max=1.0)
        return (x + delta * _per_sample(scale, delta)).clamp(0, 1)
