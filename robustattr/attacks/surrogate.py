"""Smooth surrogates for second-order work on networks with kinked activations.

The gradient map of a ReLU network is piecewise constant, so the gradient of any function of a gradient-based
explanation is exactly zero and an explanation attack would do nothing (REFERENCE.md sections 3 and 8). The
papers compute the attack gradient on a copy with ReLU replaced by softplus(beta) and judge every iterate on
the original model. `softplus_surrogate` builds that copy without copying weights: it shares the original's
parameters and buffers, so it is cheap and always in sync, and replaces every kinked activation by its smooth
twin (`robustattr.models.activations.smooth_twin`: LeakyReLU by ``a x + (1 - a) softplus(x)``, ReLU6 by
``softplus(x) - softplus(x - 6)``, ...), so the surrogate converges to the network itself as beta grows.
`BetaSchedule` anneals beta (Dombrowski et al.). `require_second_order` turns a silent all-zero attack gradient
into a clear error.
"""

from __future__ import annotations

import copy
import math
import types

import torch
from torch import nn

from robustattr.errors import ConfigError, RobustAttrError
from robustattr.models.activations import is_piecewise_linear, needs_smooth_surrogate, set_beta, smooth_twin


class SecondOrderZeroError(RobustAttrError):
    """A second-order gradient (of an explanation, a curvature term) is identically zero."""


def shared_weight_copy(model: nn.Module) -> nn.Module:
    """A structural copy of ``model`` whose parameters and buffers are the original's own tensors: replacing a
    submodule of the copy leaves the original untouched, and no weight is duplicated.

    Methods stored on the instance and bound to the original (Lightning's DDP strategy leaves
    ``module.forward`` as such an attribute after redirecting a training or validation step through the DDP
    wrapper) are rebound to the copy: a plain shallow copy would keep calling the original's forward, so a
    surrogate would silently run the original network. Hook dictionaries are copied too, so hooks added to
    either do not reach the other."""
    clone = copy.copy(model)
    for key, value in vars(model).items():
        if isinstance(value, types.MethodType) and value.__self__ is model:
            clone.__dict__[key] = types.MethodType(value.__func__, clone)
        elif key.endswith("hooks") or "_hooks_" in key:
            clone.__dict__[key] = copy.copy(value)
    clone._parameters = dict(model._parameters)
    clone._buffers = dict(model._buffers)
    clone._modules = {
        name: None if child is None else shared_weight_copy(child) for name, child in model._modules.items()
    }
    return clone


def softplus_surrogate(model: nn.Module, beta: float) -> nn.Module:
    """``model`` with every kinked activation replaced by its smooth twin of sharpness ``beta`` (softplus for
    ReLU), sharing its weights; as beta grows, its outputs converge to the model's.

    A model without kinked activations (already smooth) comes back as a plain shared-weight copy."""
    if beta <= 0:
        raise ConfigError(f"softplus surrogate: beta must be positive, got {beta}")
    surrogate = shared_weight_copy(model)
    for parent in list(surrogate.modules()):
        for name, child in list(parent.named_children()):
            twin = smooth_twin(child, beta)
            if twin is not None:
                setattr(parent, name, twin)
    return surrogate


__all__ = [
    "BetaSchedule",
    "SecondOrderZeroError",
    "is_piecewise_linear",
    "needs_smooth_surrogate",
    "require_second_order",
    "set_beta",
    "shared_weight_copy",
    "softplus_surrogate",
]


class BetaSchedule:
    """Softplus beta over an attack's steps: constant (``end=None``) or geometric from ``start`` to ``end``
    (Dombrowski et al. anneal 10 -> 100: smooth enough to see curvature early, close to ReLU late)."""

    def __init__(self, start: float = 10.0, end: float | None = None) -> None:
        if start <= 0 or (end is not None and end <= 0):
            raise ConfigError(f"BetaSchedule: betas must be positive, got {start}, {end}")
        self.start = start
        self.end = end

    def __call__(self, step: int, steps: int) -> float:
        if self.end is None or steps <= 1:
            return self.start
        return math.exp(math.log(self.start) + (math.log(self.end) - math.log(self.start)) * step / (steps - 1))

    def __repr__(self) -> str:
        return f"BetaSchedule(start={self.start}, end={self.end})"


def require_second_order(grad: torch.Tensor | None, what: str, cause: str | None = None) -> None:
    """Raise when ``grad`` (a gradient through a gradient) is missing or identically zero; ``cause`` is the
    reason when the caller can tell it."""
    if grad is None or not bool((grad != 0).any()):
        if cause:
            raise SecondOrderZeroError(f"{what}: the attack gradient is identically zero: {cause}")
        raise SecondOrderZeroError(
            f"{what}: the second-order gradient is identically zero, so this would silently do nothing. Usual "
            "cause: the network is piecewise linear (ReLU-like), whose gradient map has no curvature: use a "
            "softplus surrogate (beta=10.0) or a smooth activation. An objective at its minimum where the attack "
            "starts (a distance to the clean map, at x itself) also gives zero: use random_start."
        )
