"""Gradient-based attributions that can be differentiated with respect to the input.

Call: ``attribution(model, x, target, create_graph=False) -> tensor shaped like x``. With
``create_graph=True`` the result keeps its graph, including every path through x (the gradient term *and*
the ``x`` / ``x - x0`` factors), so an explanation attack or a training penalty can differentiate it. Captum
drops the second-order terms (REFERENCE.md section 1); these do not, and the tests check their
input-derivatives against finite differences.

Attributions do not change the model's mode: call them on a model in eval mode (attacks and callbacks do).
Noise-based methods are seeded, so the same call returns the same map: they are ``stochastic`` and `reseeded`
gives the same method with another draw of its noise (explanation attacks take fresh noise at every step, and
judge with draws they never ascended).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from typing import ClassVar, Literal

import torch
from torch import nn

from robustattr.errors import ConfigError
from robustattr.rng import Seed, generator_for, is_per_sample, mix, normal, uniform

Output = Literal["logit", "softmax"]


@contextmanager
def _grad_enabled() -> Iterator[None]:
    with torch.inference_mode(False), torch.enable_grad():
        yield


def _as_input(x: torch.Tensor) -> torch.Tensor:
    """x itself when it is part of a graph (so the attribution stays differentiable in it), else a fresh leaf."""
    return x if x.requires_grad else x.detach().clone().requires_grad_(True)


class Attribution:
    """Base class: ``output`` chooses the explained score, the logit or the softmax probability."""

    stochastic: ClassVar[bool] = False  # the map is a draw of a random quantity (its noise set by ``seed``)

    def __init__(self, output: Output = "logit") -> None:
        self.output = output

    def reseeded(self, seed: Seed) -> Attribution:
        """The same method with another draw of its noise (itself for a deterministic method): an int seeds the
        batch's noise, a tuple of ints each row's (`robustattr.rng`)."""
        if not self.stochastic:
            return self
        other = copy.copy(self)
        other.seed = tuple(int(s) for s in seed) if is_per_sample(seed) else int(seed)
        return other

    def for_samples(self, keys: Seed) -> Attribution:
        """The method with each row's noise its own: row i seeded from (this method's seed, ``keys[i]``), so a
        sample's map does not depend on the batch it is computed in. Itself for a deterministic method, or when
        ``keys`` is not one per row."""
        if not self.stochastic or not is_per_sample(keys):
            return self
        if is_per_sample(self.seed):
            raise ValueError(f"{type(self).__name__}: the noise is already seeded per sample")
        return self.reseeded(tuple(mix(self.seed, int(k)) for k in keys))

    def score(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Sum over the batch of each sample's explained score (samples are independent in eval mode)."""
        out = logits.softmax(dim=1) if self.output == "softmax" else logits
        return out.gather(1, target.view(-1, 1)).sum()

    def gradient_and_logits(
        self, model: nn.Module, x: torch.Tensor, target: torch.Tensor, create_graph: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        logits = model(x)
        (grad,) = torch.autograd.grad(self.score(logits, target), x, create_graph=create_graph)
        return grad, logits

    def input_gradient(
        self, model: nn.Module, x: torch.Tensor, target: torch.Tensor, create_graph: bool
    ) -> torch.Tensor:
        return self.gradient_and_logits(model, x, target, create_graph)[0]

    def attribute_and_logits(
        self, model: nn.Module, x: torch.Tensor, target: torch.Tensor, create_graph: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The attribution and the logits at x; methods that run the model at x anyway share that forward.
        Without ``create_graph`` both come back detached."""
        with _grad_enabled():
            x_in = _as_input(x)
            attr, logits = self._attribute_and_logits(model, x_in, target.to(x_in.device), create_graph)
        return (attr, logits) if create_graph else (attr.detach(), logits.detach())

    def _attribute_and_logits(self, model, x, target, create_graph):
        attr = self.attribute(model, x, target, create_graph)
        if create_graph:
            return attr, model(x)
        with torch.no_grad():
            return attr, model(x)

    def __call__(
        self, model: nn.Module, x: torch.Tensor, target: torch.Tensor, create_graph: bool = False
    ) -> torch.Tensor:
        with _grad_enabled():
            x_in = _as_input(x)
            out = self.attribute(model, x_in, target.to(x_in.device), create_graph)
        return out if create_graph else out.detach()

    def attribute(self, model: nn.Module, x: torch.Tensor, target: torch.Tensor, create_graph: bool) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(output={self.output!r})"


class Saliency(Attribution):
    """Simple gradient ``d score_y / dx`` (Simonyan et al. 2014), signed; the pixel map takes absolute values."""

    short_name = "saliency"

    def attribute(self, model, x, target, create_graph):
        return self.input_gradient(model, x, target, create_graph)

    def _attribute_and_logits(self, model, x, target, create_graph):
        return self.gradient_and_logits(model, x, target, create_graph)


class GradientXInput(Attribution):
    """``x * d score_y / dx`` (Shrikumar et al. 2016)."""

    short_name = "grad_x_input"

    def attribute(self, model, x, target, create_graph):
        return x * self.input_gradient(model, x, target, create_graph)

    def _attribute_and_logits(self, model, x, target, create_graph):
        grad, logits = self.gradient_and_logits(model, x, target, create_graph)
        return x * grad, logits


class _PathAverage(Attribution):
    """Mean input-gradient over ``samples`` points built from x, evaluated ``chunk`` points at a time so that
    memory does not grow with the number of points (without ``create_graph`` each chunk's graph is freed)."""

    def __init__(self, samples: int, chunk: int, output: Output, seed: Seed = 0) -> None:
        super().__init__(output)
        if samples < 1 or chunk < 1:
            raise ConfigError(f"{type(self).__name__}: the number of points and the chunk size must be positive")
        self.samples = samples
        self.chunk = chunk
        self.seed = seed

    def points(self, x: torch.Tensor, start: int, stop: int, generator: torch.Generator) -> torch.Tensor:
        """Points ``start..stop-1`` as a (stop - start, *x.shape) tensor, differentiable in x."""
        raise NotImplementedError

    def mean_gradient(self, model, x, target, create_graph) -> torch.Tensor:
        generator = generator_for(x.device, self.seed)
        total = torch.zeros_like(x)
        for start in range(0, self.samples, self.chunk):
            stop = min(start + self.chunk, self.samples)
            pts = self.points(x, start, stop, generator)
            flat = pts.reshape(-1, *x.shape[1:])
            if not create_graph:
                flat = flat.detach().requires_grad_(True)
            grad = self.input_gradient(model, flat, target.repeat(stop - start), create_graph)
            total = total + grad.reshape(pts.shape).sum(dim=0)
        return total / self.samples


class IntegratedGradients(_PathAverage):
    """Integrated Gradients (Sundararajan et al. 2017): ``(x - x0) * mean_k grad(x0 + k/m (x - x0))``, k = 1..m
    (the right Riemann sum, Captum's ``riemann_right``), baseline x0 a constant image (black by default).

    ``output="softmax"`` attributes the probability, as Ghorbani et al.'s code and the IG authors recommend.
    Completeness: ``sum(A) ~ score(x) - score(x0)``, closer as ``steps`` grows.
    """

    short_name = "ig"

    def __init__(self, steps: int = 50, baseline: float = 0.0, output: Output = "logit", chunk: int = 10) -> None:
        super().__init__(steps, chunk, output)
        self.baseline = baseline

    def points(self, x, start, stop, generator):
        x0 = torch.full_like(x, self.baseline)
        alphas = torch.arange(start + 1, stop + 1, device=x.device, dtype=x.dtype) / self.samples
        return x0 + alphas.view(-1, *[1] * x.dim()) * (x - x0)

    def attribute(self, model, x, target, create_graph):
        return (x - self.baseline) * self.mean_gradient(model, x, target, create_graph)


class _NoiseAverage(_PathAverage):
    """The mean gradient over ``samples`` noisy copies ``x + noise`` (SmoothGrad, Uniform Gradient): one
    attribution, a subclass names the noise distribution (`noise`)."""

    stochastic = True

    def noise(self, shape: tuple[int, ...], generator, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def points(self, x, start, stop, generator):
        return x + self.noise((stop - start, *x.shape), generator, x)

    def attribute(self, model, x, target, create_graph):
        return self.mean_gradient(model, x, target, create_graph)


class SmoothGrad(_NoiseAverage):
    """SmoothGrad (Smilkov et al. 2017): mean gradient over ``samples`` copies ``x + N(0, sigma^2)``; sigma is in
    pixel units of [0, 1] images (0.15 = 15% of the input range)."""

    short_name = "smoothgrad"

    def __init__(
        self, samples: int = 50, sigma: float = 0.15, output: Output = "logit", chunk: int = 25, seed: int = 0
    ) -> None:
        super().__init__(samples, chunk, output, seed)
        self.sigma = sigma

    def noise(self, shape, generator, x):
        return self.sigma * normal(shape, generator, x.device, x.dtype, dim=1)  # (points, samples, ...)


class UniformGradient(_NoiseAverage):
    """Uniform Gradient (Wang et al. 2020): mean gradient over ``x + U[-r, r]^d``, r = ``radius`` times the input
    range (0.2 by default); smooths attributions without retraining."""

    short_name = "uniform_gradient"

    def __init__(
        self, samples: int = 50, radius: float = 0.2, output: Output = "logit", chunk: int = 25, seed: int = 0
    ) -> None:
        super().__init__(samples, chunk, output, seed)
        self.radius = radius

    def noise(self, shape, generator, x):
        return self.radius * (2 * uniform(shape, generator, x.device, x.dtype, dim=1) - 1)  # (points, samples, ...)
