"""The input geometry of the loss during validation: gradient norms and top Hessian eigenvalues."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchmetrics import Metric

from robustattr.callbacks.base import AttackCallback
from robustattr.metrics import PerSampleMean
from robustattr.regularizers import loss_hvp


class _Mean(PerSampleMean):
    higher_is_better = False


class CurvatureMonitor(AttackCallback):
    """Logs ``val/curv/grad_norm`` (mean ``||d CE_i / d x_i||``) and ``val/curv/hessian_top_eig`` (mean of each
    sample's top input-Hessian eigenvalue of the loss, by ``power_iters`` power iterations on exact
    Hessian-vector products), so a run shows its geometry getting smoother, or not."""

    short_name = "curv"

    def __init__(
        self,
        power_iters: int = 10,
        num_samples: int = 256,
        batch_size: int = 64,
        every_n_epochs: int = 1,
        seed: int = 0,
    ) -> None:
        super().__init__(num_samples, batch_size, every_n_epochs, seed)
        self.power_iters = power_iters

    def build_metrics(self) -> dict[str, Metric]:
        return {"curv/grad_norm": _Mean(), "curv/hessian_top_eig": _Mean()}

    def process(self, model, x, y, seed):
        metrics = self.metrics()
        x = x.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(F.cross_entropy(model(x), y, reduction="sum"), x, create_graph=True)
        metrics["curv/grad_norm"].update(g.detach().flatten(1).norm(dim=1))
        generator = torch.Generator(device=x.device).manual_seed(seed)
        v = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        eig = torch.zeros(x.shape[0], device=x.device)
        for _ in range(self.power_iters):
            v = v / v.flatten(1).norm(dim=1).clamp_min(1e-30).view(-1, *[1] * (x.dim() - 1))
            hv = loss_hvp(model, x, y, v, "reverse", create_graph=False, grad=g)
            eig = (v * hv).flatten(1).sum(dim=1)  # Rayleigh quotient at the current vector
            v = hv.detach()
        metrics["curv/hessian_top_eig"].update(eig.detach())
