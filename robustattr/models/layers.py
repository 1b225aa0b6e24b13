"""Building blocks shared by every architecture: input normalisation and activations.

Activations are given as factories (`Callable[[], nn.Module]`): a class such as ``torch.nn.ReLU`` or, in YAML,
``{class_path: torch.nn.Softplus, init_args: {beta: 10}}``. Each layer calls the factory for its own instance.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

ActivationFactory = Callable[[], nn.Module]


def _timm_piecewise_linear() -> tuple[type[nn.Module], ...]:
    try:
        from timm.layers import activations as timm_act
    except ImportError:  # pragma: no cover - timm is a dependency, but keep this module importable alone
        return ()
    names = ("HardSigmoid", "HardSwish", "PReLU")
    return tuple(getattr(timm_act, name) for name in names if hasattr(timm_act, name))


# Activations whose second derivative is zero almost everywhere: the gradient map of a network built from them
# is piecewise constant, so second-order attacks and curvature penalties see nothing (REFERENCE.md section 8).
# nn.ReLU covers nn.ReLU(inplace=True); nn.ReLU6 subclasses nn.Hardtanh.
PIECEWISE_LINEAR: tuple[type[nn.Module], ...] = (
    nn.ReLU,
    nn.Hardtanh,
    nn.LeakyReLU,
    nn.PReLU,
    nn.RReLU,
    nn.Hardswish,
    nn.Hardsigmoid,
    *_timm_piecewise_linear(),
)


class Normalize(nn.Module):
    """``(x - mean) / std`` per channel; the first layer of every robustattr network, so that inputs, epsilons
    and clamps all live in [0, 1] pixel space. A single value broadcasts over all channels."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        mean_t = torch.as_tensor(mean, dtype=torch.float32).reshape(1, -1, 1, 1)
        std_t = torch.as_tensor(std, dtype=torch.float32).reshape(1, -1, 1, 1)
        if mean_t.numel() != std_t.numel():
            raise ValueError(f"Normalize: mean has {mean_t.numel()} values but std has {std_t.numel()}")
        if (std_t <= 0).any():
            raise ValueError(f"Normalize: std must be positive, got {list(std)}")
        self.register_buffer("mean", mean_t)
        self.register_buffer("std", std_t)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        return f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}"


def swap_activations(
    model: nn.Module,
    activation: ActivationFactory,
    types: Sequence[type[nn.Module]] = PIECEWISE_LINEAR,
) -> int:
    """Replace, in place, every submodule of one of ``types`` with a fresh ``activation()``.

    Covers module activations of any nesting (Sequential, ModuleList, timm's activation layers, torchvision's
    shared ``self.relu``). Functional calls (``F.relu`` inside a ``forward``) cannot be swapped this way; every
    robustattr architecture uses module activations only. Returns the number of replaced modules.
    """
    types = tuple(types)
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, types):
                setattr(parent, name, activation())
                replaced += 1
    return replaced


def count_activations(model: nn.Module, types: Sequence[type[nn.Module]] = PIECEWISE_LINEAR) -> int:
    """Number of submodules of ``types`` (0 after a complete swap)."""
    types = tuple(types)
    return sum(isinstance(m, types) for m in model.modules())
