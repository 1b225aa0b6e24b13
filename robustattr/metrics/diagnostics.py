"""Measurements of a network's input geometry, shared by the validation callbacks and the audit."""

from __future__ import annotations

import torch
from torch import nn

from robustattr.derivatives import loss_hvp, loss_input_gradient, per_sample_norm
from robustattr.rng import Generator, normal


def top_hessian_eigenvalue(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, iters: int, generator: Generator = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-sample input-gradient norms of the loss, per-sample top input-Hessian eigenvalue estimates) by
    ``iters`` power iterations on exact Hessian-vector products (double backprop, no parameter gradients)."""
    x, _, g = loss_input_gradient(model, x, y)
    v = normal(x.shape, generator, x.device, x.dtype)  # one generator, or one per sample (`robustattr.rng`)
    eig = torch.zeros(x.shape[0], device=x.device, dtype=x.dtype)
    for _ in range(iters):
        v = v / per_sample_norm(v)
        hv = loss_hvp(model, x, y, v, "reverse", create_graph=False, grad=g)
        eig = (v * hv).reshape(x.shape[0], -1).sum(dim=1)  # Rayleigh quotient at the current vector
        v = hv.detach()
    return g.detach().reshape(x.shape[0], -1).norm(dim=1), eig.detach()
