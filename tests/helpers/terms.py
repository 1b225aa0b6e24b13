"""Objective terms for tests, named by class_path in configs that launched processes read."""

import torch.distributed as dist

from robustattr.regularizers import ObjectiveTerm


class NanAtSteps(ObjectiveTerm):
    """Zero, except NaN at the listed steps, on the listed global ranks only (all ranks when empty)."""

    def __init__(self, steps: list[int], ranks: list[int] | None = None, weight: float = 1.0, name: str | None = None):
        super().__init__(weight, name)
        self.steps = set(steps)
        self.ranks = set(ranks or [])
        self.calls = 0

    def forward(self, model, x, y, logits=None):
        step, self.calls = self.calls, self.calls + 1
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        nan = step in self.steps and (not self.ranks or rank in self.ranks)
        zero = model(x).sum() * 0.0
        return zero + (float("nan") if nan else 0.0)
