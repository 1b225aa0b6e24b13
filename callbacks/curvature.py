"""The input geometry of the loss during validation: gradient norms and top Hessian eigenvalues."""

from __future__ import annotations

from typing import Any

import torch
from torchmetrics import MetricCollection

from robustattr.callbacks.base import AttackCallback
from robustattr.metrics import PerSampleMean, top_hessian_eigenvalue


class _GradientNorm(PerSampleMean):
    higher_is_better = False

    def update(self, grad_norm: torch.Tensor) -> None:
        self._add(grad_norm)


class _TopEigenvalue(PerSampleMean):
    higher_is_better = False

    def update(self, hessian_top_eig: torch.Tensor) -> None:
        self._add(hessian_top_eig)


class CurvatureMonitor(AttackCallback):
    """Logs ``val/curv/grad_norm`` (mean ``||d CE_i / d x_i||``) and ``val/curv/hessian_top_eig`` (mean of each
    sample's top input-Hessian eigenvalue of the loss, by ``power_iters`` power iterations on exact
    Hessian-vector products), so a run shows its geometry getting smoother, or not."""

    short_name = "curv"

    def __init__(
        self,
        power_iters: int = 10,
        num_samples: int = 256,
        **schedule: Any,
    ) -> None:
        super().__init__(num_samples, **schedule)  # batch_size, every_n_epochs, seed: see AttackCallback
        self.power_iters = power_iters

    def build_metrics(self) -> dict[str, MetricCollection]:
        metrics = {"grad_norm": _GradientNorm(), "hessian_top_eig": _TopEigenvalue()}
        return {"curv": MetricCollection(metrics, prefix="curv/", compute_groups=False)}

    def process(self, model, x, y, seed):
        generator = torch.Generator(device=x.device).manual_seed(seed)
        norms, eigs = top_hessian_eigenvalue(model, x, y, self.power_iters, generator)
        self.metrics()["curv"].update(grad_norm=norms, hessian_top_eig=eigs)
