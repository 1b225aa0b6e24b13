"""The seam for training objectives: a term adds ``weight * term(model, x, y)`` to the training loss.

Terms are ``nn.Module``s so that they follow the LightningModule to its device and can hold buffers; they
are given the bare network (not the LightningModule), a batch in [0, 1] and, when the term asks for it
(``uses_clean_forward``), the logits of the training step's own forward on ``x`` (then ``x`` requires
grad), which saves a forward pass. They return an unweighted scalar, logged as ``train/reg/<name>``.

Rules every term follows (REFERENCE.md section 8): input gradients by ``torch.autograd.grad(create_graph=True)``,
never ``.backward()``, so the training step ends in ONE ordinary backward of CE plus penalties (DDP-safe);
extra forward passes run under `derivatives.frozen_norm_stats`, so penalties never move BatchNorm statistics;
input gradients of the loss come from `derivatives.loss_input_gradient`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from robustattr.derivatives import frozen_norm_stats, loss_input_gradient  # noqa: F401 (re-exported)
from robustattr.errors import ConfigError


def _snake(name: str) -> str:
    """GradientNorm -> gradient_norm, SSR -> ssr, IGNorm -> ig_norm."""
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "_", name).lower()


class ObjectiveTerm(nn.Module):
    """Base class of every training-objective term.

    Args:
        weight: multiplier of the term in the training loss (non-negative, finite).
        name: the name it is logged under (``train/reg/<name>``); defaults to the class name in snake case.
        warmup_epochs: ramp linearly over this many epochs (fractional epochs count): the weight, or for terms
            whose paper ramps something else (CURE's step h), that quantity.
    """

    second_order = False  # differentiates an input gradient: refuses fp16 autocast
    curvature = False  # measures input curvature: warns on piecewise-linear networks
    uses_clean_forward = False  # wants the training step's logits on x (x then requires grad)
    ramps_weight = True
    default_name: str | None = None
    # A term that trains the network on inputs of its own (adversarial training) leaves the detached logits of
    # its last training-mode forward here; RobustClassifier logs their accuracy as train/<name>/acc.
    training_logits: torch.Tensor | None = None

    def __init_subclass__(
        cls,
        second_order: bool | None = None,
        curvature: bool | None = None,
        uses_clean_forward: bool | None = None,
        ramps_weight: bool | None = None,
        **kwargs,
    ) -> None:
        """A term states its traits in its class line (``class SSR(ObjectiveTerm, second_order=True, ...)``);
        those it does not state are inherited."""
        super().__init_subclass__(**kwargs)
        traits = dict(second_order=second_order, curvature=curvature, uses_clean_forward=uses_clean_forward,
                      ramps_weight=ramps_weight)  # fmt: skip
        for trait, value in traits.items():
            if value is not None:
                setattr(cls, trait, value)

    def __init__(self, weight: float = 1.0, name: str | None = None, warmup_epochs: float = 0.0) -> None:
        super().__init__()
        if not math.isfinite(weight) or weight < 0:
            raise ConfigError(f"{type(self).__name__}: weight must be finite and non-negative, got {weight}")
        if warmup_epochs < 0:
            raise ConfigError(f"{type(self).__name__}: warmup_epochs must be non-negative, got {warmup_epochs}")
        self.weight = float(weight)
        self.name = name or self.default_name or _snake(type(self).__name__)
        self.warmup_epochs = warmup_epochs
        self.epoch = 0.0  # set by RobustClassifier before each training step (epochs as a float)

    @property
    def ramp(self) -> float:
        """Warm-up progress in [0, 1]."""
        return 1.0 if self.warmup_epochs <= 0 else min(1.0, self.epoch / self.warmup_epochs)

    @property
    def current_weight(self) -> float:
        return self.weight * (self.ramp if self.ramps_weight else 1.0)

    def prepare(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
        """Called by the training step before any of its forward passes: adversarial objectives craft their
        inputs here, against the network as it is at the start of the step (the authors' order: attack, then
        train), before this step's training-mode forwards move the BatchNorm statistics."""

    def precision_problem(self, precision: str, model: nn.Module) -> str | None:
        """Why this term cannot train in ``precision`` (a Lightning precision string), if it cannot."""
        return None

    def piecewise_linear_note(self) -> str:
        """What the term measures on a ReLU network (whose logits have zero input curvature)."""
        return ""

    def forward(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, logits: torch.Tensor | None = None
    ) -> torch.Tensor:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"name={self.name!r}, weight={self.weight}, warmup_epochs={self.warmup_epochs}"


def per_sample_sq_norm(t: torch.Tensor) -> torch.Tensor:
    """Squared L2 norm of each sample, summed in at least fp32 (a bf16 sum over 3072 or 150528 entries is not)."""
    return t.reshape(t.shape[0], -1).to(torch.promote_types(t.dtype, torch.float32)).pow(2).sum(dim=1)


@contextmanager
def full_precision(device: torch.device) -> Iterator[None]:
    """Autocast off: inside, the network runs in its own (fp32, under bf16-mixed) precision. For the linear
    algebra and the finite differences of gradients that bf16 cannot carry (REFERENCE.md section 8): CUDA's
    autocast, unlike the CPU's, runs matmuls in bf16 and casts nothing back before eigh."""
    with torch.autocast(device_type=device.type, enabled=False):
        yield
