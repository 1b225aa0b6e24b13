"""What each activation is, as second-order methods see it, and its faithful smooth twin.

- Piecewise-linear activations (ReLU, LeakyReLU, PReLU, RReLU, ReLU6 / Hardtanh, Hardsigmoid): their second
  derivative is zero almost everywhere, so a network built only from them has a piecewise-constant gradient map
  and zero input curvature (REFERENCE.md section 8).
- Kinked activations: the piecewise-linear ones plus Hardswish and HardMish, which are piecewise quadratic (they
  have curvature between their kinks, so they are not piecewise linear, but they are not smooth either).
- Smooth twins (`smooth_twin`): every kinked activation is a sum of shifted ReLUs, linear terms and (for
  Hardswish and HardMish) a product with x; replacing each ReLU(x - t) by softplus_beta(x - t) gives a smooth
  function that converges to the original as beta grows, so that a surrogate network approximates the network
  itself, not another one: LeakyReLU(a) becomes ``a x + (1 - a) softplus(x)``, not ``softplus(x)``;
  ReLU6 becomes ``softplus(x) - softplus(x - 6)``; Hardswish ``x (softplus(x + 3) - softplus(x - 3)) / 6``.
  The twins' ``beta`` can be changed in place (`set_beta`) for annealing schedules.

timm's own activation layers are covered (its HardSigmoid, HardSwish, HardMish, their memory-efficient variants,
and its PReLU); timm is imported only when a model holds one of its modules, not when this module loads.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

ActivationFactory = Callable[[], nn.Module]

# Piecewise linear: zero second derivative almost everywhere. nn.ReLU covers ReLU(inplace=True); nn.ReLU6
# subclasses nn.Hardtanh; timm's PReLU subclasses nn.PReLU.
PIECEWISE_LINEAR: tuple[type[nn.Module], ...] = (
    nn.ReLU,
    nn.Hardtanh,
    nn.LeakyReLU,
    nn.PReLU,
    nn.RReLU,
    nn.Hardsigmoid,
)
# Kinked but curved between the kinks (piecewise quadratic).
PIECEWISE_QUADRATIC: tuple[type[nn.Module], ...] = (nn.Hardswish,)
# Smooth non-linearities: a network holding one of these has input curvature of its own.
SMOOTH: tuple[type[nn.Module], ...] = (
    nn.Softplus,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.ELU,
    nn.CELU,
    nn.SELU,
    nn.Tanh,
    nn.Sigmoid,
    nn.LogSigmoid,
    nn.Softsign,
)

_TIMM = {
    "HardSigmoid": "linear",
    "HardSigmoidMe": "linear",
    "HardSwish": "quadratic",
    "HardSwishMe": "quadratic",
    "HardMish": "quadratic",
    "HardMishMe": "quadratic",
    "GELU": "smooth",
    "GELUTanh": "smooth",
    "QuickGELU": "smooth",
    "Mish": "smooth",
    "MishMe": "smooth",
    "Swish": "smooth",
    "SwishMe": "smooth",
    "Sigmoid": "smooth",
    "Tanh": "smooth",
}


def _timm_kind(module: nn.Module) -> str | None:
    """The kind of a timm activation layer ("linear", "quadratic", "smooth"), without importing timm: a model
    that holds timm modules has imported timm already."""
    cls = type(module)
    if not cls.__module__.startswith("timm.layers.activations") or "timm" not in sys.modules:
        return None
    return _TIMM.get(cls.__name__)


def kind(module: nn.Module) -> str | None:
    """``"linear"`` (piecewise linear), ``"quadratic"`` (kinked, piecewise quadratic), ``"smooth"``, or None for
    modules that are not activations."""
    timm = _timm_kind(module)
    if timm is not None:
        return timm
    if isinstance(module, PIECEWISE_LINEAR):
        return "linear"
    if isinstance(module, PIECEWISE_QUADRATIC):
        return "quadratic"
    if isinstance(module, SMOOTH):
        return "smooth"
    return None


def is_kinked(module: nn.Module) -> bool:
    return kind(module) in ("linear", "quadratic")


def is_piecewise_linear(model: nn.Module) -> bool:
    """True when the model's activations are all piecewise linear (at least one): its logits then have zero
    input curvature almost everywhere (other non-linearities, such as attention or LayerNorm, are not seen)."""
    kinds = {kind(m) for m in model.modules()} - {None}
    return kinds == {"linear"}


def needs_smooth_surrogate(model: nn.Module) -> bool:
    """True when the model holds a kinked activation, which a smooth twin should stand in for in second-order work."""
    return any(is_kinked(m) for m in model.modules())


def count_activations(model: nn.Module, types: Sequence[type[nn.Module]] | None = None) -> int:
    """Number of kinked activation modules (those of ``types`` when given); 0 after a complete swap."""
    if types is not None:
        return sum(isinstance(m, tuple(types)) for m in model.modules())
    return sum(is_kinked(m) for m in model.modules())


def swap_activations(
    model: nn.Module, activation: ActivationFactory, types: Sequence[type[nn.Module]] | None = None
) -> int:
    """Replace, in place, every kinked activation (or every submodule of ``types``) with a fresh ``activation()``.

    Covers module activations of any nesting (Sequential, ModuleList, timm's activation layers, torchvision's
    shared ``self.relu``). Functional calls (``F.relu`` inside a ``forward``) cannot be swapped this way; every
    robustattr architecture uses module activations only. Returns the number of replaced modules. This changes
    the function (a new network to train or fine-tune); `smooth_twin` keeps it."""
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, tuple(types)) if types is not None else is_kinked(child):
                setattr(parent, name, activation())
                replaced += 1
    return replaced


# -- smooth twins -------------------------------------------------------------------------------------------------
class SmoothTwin(nn.Module):
    """Base class of the twins: ``beta`` sets the sharpness (softplus_beta(z) = log(1 + exp(beta z)) / beta)."""

    def __init__(self, beta: float) -> None:
        super().__init__()
        self.beta = float(beta)

    def sp(self, z: torch.Tensor) -> torch.Tensor:
        return F.softplus(z, beta=self.beta)

    def extra_repr(self) -> str:
        return f"beta={self.beta:g}"


class PiecewiseLinearTwin(SmoothTwin):
    """``offset + slope x + sum_i scale_i softplus_beta(x - knot_i)``: the twin of
    ``offset + slope x + sum_i scale_i relu(x - knot_i)``."""

    def __init__(self, beta: float, knots: Sequence[tuple[float, float]], slope: float = 0.0, offset: float = 0.0):
        super().__init__(beta)
        self.knots = [(float(scale), float(knot)) for scale, knot in knots]
        self.slope = float(slope)
        self.offset = float(offset)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.offset + self.slope * x if (self.slope or self.offset) else 0.0
        for scale, knot in self.knots:
            out = out + scale * self.sp(x - knot)
        return out


class PReLUTwin(SmoothTwin):
    """``a x + (1 - a) softplus_beta(x)`` with ``a`` the PReLU's own (shared, learned) slopes, one per channel."""

    def __init__(self, beta: float, prelu: nn.PReLU) -> None:
        super().__init__(beta)
        self.weight = prelu.weight  # the same Parameter: the twin follows the original

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.weight.view(1, -1, *[1] * (x.dim() - 2)) if self.weight.numel() > 1 and x.dim() > 1 else self.weight
        return a * x + (1 - a) * self.sp(x)


class GatedTwin(SmoothTwin):
    """``x * gate(x)`` with a piecewise-linear gate replaced by its twin: Hardswish (gate: hard sigmoid) and
    HardMish (gate: ``0.5 clamp(x + 2, 0, 2)``)."""

    def __init__(self, beta: float, gate: PiecewiseLinearTwin) -> None:
        super().__init__(beta)
        self.gate = gate

    @property
    def beta(self) -> float:
        return self.gate.beta

    @beta.setter
    def beta(self, value: float) -> None:
        if "gate" in self._modules:
            self.gate.beta = float(value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(x)


def _hard_sigmoid_twin(beta: float) -> PiecewiseLinearTwin:  # relu6(x + 3) / 6
    return PiecewiseLinearTwin(beta, [(1 / 6, -3.0), (-1 / 6, 3.0)])


def smooth_twin(module: nn.Module, beta: float) -> nn.Module | None:
    """The smooth twin of a kinked activation module (None for anything else); it shares learned parameters."""
    name = type(module).__name__ if _timm_kind(module) else None
    if name in ("HardSigmoid", "HardSigmoidMe"):
        return _hard_sigmoid_twin(beta)
    if name in ("HardSwish", "HardSwishMe"):
        return GatedTwin(beta, _hard_sigmoid_twin(beta))
    if name in ("HardMish", "HardMishMe"):  # 0.5 x clamp(x + 2, 0, 2)
        return GatedTwin(beta, PiecewiseLinearTwin(beta, [(0.5, -2.0), (-0.5, 0.0)]))
    if isinstance(module, nn.PReLU):
        return PReLUTwin(beta, module)
    if isinstance(module, nn.RReLU):  # in eval mode, a LeakyReLU with the mean slope
        slope = (module.lower + module.upper) / 2
        return PiecewiseLinearTwin(beta, [(1 - slope, 0.0)], slope=slope)
    if isinstance(module, nn.LeakyReLU):
        return PiecewiseLinearTwin(beta, [(1 - module.negative_slope, 0.0)], slope=module.negative_slope)
    if isinstance(module, nn.ReLU):
        return PiecewiseLinearTwin(beta, [(1.0, 0.0)])
    if isinstance(module, nn.Hardtanh):  # ReLU6 included: min + relu(x - min) - relu(x - max)
        lo, hi = module.min_val, module.max_val
        return PiecewiseLinearTwin(beta, [(1.0, lo), (-1.0, hi)], offset=lo)
    if isinstance(module, nn.Hardsigmoid):
        return _hard_sigmoid_twin(beta)
    if isinstance(module, nn.Hardswish):
        return GatedTwin(beta, _hard_sigmoid_twin(beta))
    if is_kinked(module):  # a kinked type listed above without a twin here would be a silent approximation
        raise TypeError(f"no smooth twin for {type(module).__name__}")
    return None


def set_beta(model: nn.Module, beta: float) -> None:
    """Set the sharpness of every smooth twin in ``model``."""
    for module in model.modules():
        if isinstance(module, SmoothTwin):
            module.beta = float(beta)
