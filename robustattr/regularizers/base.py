"""The seam for training objectives: a term adds ``weight * term(model, x, y)`` to the training loss.

Terms are ``nn.Module``s so that they follow the LightningModule to its device and can hold buffers; they
are given the bare network (not the LightningModule) and a batch in [0, 1], and return an unweighted scalar,
which RobustClassifier logs as ``train/reg/<name>``.
"""

from __future__ import annotations

import math
import re

import torch
from torch import nn

from robustattr.errors import ConfigError


class ObjectiveTerm(nn.Module):
    """Base class of every training-objective term.

    Args:
        weight: multiplier of the term in the training loss (non-negative, finite).
        name: the name it is logged under (``train/reg/<name>``); defaults to the class name in snake case.
    """

    def __init__(self, weight: float = 1.0, name: str | None = None) -> None:
        super().__init__()
        if not math.isfinite(weight) or weight < 0:
            raise ConfigError(f"{type(self).__name__}: weight must be finite and non-negative, got {weight}")
        self.weight = float(weight)
        self.name = name or re.sub(r"(?<!^)(?=[A-Z])", "_", type(self).__name__).lower()

    def forward(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"name={self.name!r}, weight={self.weight}"
