"""The exact reference: the dense damped curvature of the average training loss over the scope, in float64.

For small scopes (a last layer, a few thousand parameters): the matrix is accumulated batch by batch with
torch.func (forward-over-reverse for the Hessian, per-sample Jacobians for the Gauss-Newton matrix), summed over
the processes of a process group, and eigendecomposed once; every inverse product is then a matrix product. Every
other backend is tested against it.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, jacfwd, jvp, vmap

from robustattr.errors import ConfigError, RobustAttrError
from robustattr.influence import distributed as D
from robustattr.influence.base import Curvature, CurvatureInfluence


class SingularCurvatureError(RobustAttrError, ValueError):
    """The damped curvature has a zero or negative eigenvalue: its inverse does not exist."""


class ExactInfluence(CurvatureInfluence):
    """Influence with the dense ``(H + damping I)^{-1}``. ``curvature``: "hessian" (Koh & Liang) or "ggn" (the
    Gauss-Newton matrix, positive semi-definite; equal to the Hessian for a linear head with cross-entropy).
    ``max_parameters``: larger scopes are refused (the matrix is P x P in float64; use CGInfluence or
    EKFACInfluence)."""

    name = "exact"

    def __init__(
        self,
        curvature: Curvature = "hessian",
        dtype: torch.dtype | str = torch.float64,
        max_parameters: int = 12000,
        chunk_size: int = 256,
        **common: Any,
    ) -> None:
        super().__init__(curvature=curvature, dtype=dtype, **common)  # scope, damping, batch_size: see Influence
        self.max_parameters = max_parameters
        self.chunk_size = chunk_size
        self.eigenvalues: torch.Tensor | None = None

    def _logits_of(self, x):
        """The network's logits on ``x`` as a function of the flattened scope parameters."""
        names = self.scope.names
        shapes = [p.shape for _, p in self.scope.parameters]
        sizes = [s.numel() for s in shapes]

        def unflatten(theta):
            return {n: t.reshape(s) for n, t, s in zip(names, theta.split(sizes), shapes, strict=True)}

        def logits(theta):
            return functional_call(self.model, unflatten(theta), (x,))

        return logits

    def _theta(self) -> torch.Tensor:
        return torch.cat([p.detach().reshape(-1) for _, p in self.scope.parameters])

    def _batch_curvature(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = self._logits_of(x)
        theta = self._theta()
        if self.curvature == "ggn":
            out = logits(theta)
            p = out.softmax(1)
            hout = torch.diag_embed(p) - p.unsqueeze(2) * p.unsqueeze(1)  # (B, C, C)
            jac = jacfwd(logits)(theta)  # (B, C, P)
            return torch.einsum("bcp,bcd,bdq->pq", jac, hout, jac)

        def loss(t):
            return F.cross_entropy(logits(t), y, reduction="sum")

        g = grad(loss)
        basis = torch.eye(len(theta), dtype=theta.dtype, device=theta.device)
        columns = vmap(lambda v: jvp(g, (theta,), (v,))[1], chunk_size=self.chunk_size)(basis)
        return (columns + columns.T) / 2

    def _fit(self) -> None:
        size = self.scope.size
        if size > self.max_parameters:
            raise ConfigError(
                f"ExactInfluence: the scope holds {size} parameters (a {size} x {size} matrix); the limit is "
                f"max_parameters={self.max_parameters}: use CGInfluence or EKFACInfluence, or a smaller scope"
            )
        theta = self._theta()
        total = torch.zeros(size, size, dtype=theta.dtype, device=theta.device)
        with torch.no_grad():
            for _, xb, yb in self._stream():
                total += self._batch_curvature(xb.to(self.device, self.dtype), yb.to(self.device))
        total = D.all_reduce_sum(total) / len(self.train)
        self.matrix = total
        evals, evecs = torch.linalg.eigh(total)
        damped = evals + self.damping
        if damped.min() <= 0:
            raise SingularCurvatureError(
                f"ExactInfluence: the {self.curvature} over {self.scope.describe()} plus damping {self.damping} is "
                f"singular or indefinite (smallest eigenvalue {float(evals.min()):.3g}): set damping above "
                f"{max(0.0, -float(evals.min())):.3g}, or use curvature='ggn'"
            )
        self.eigenvalues = evals
        self._evecs = evecs
        self._inv_evals = 1.0 / damped

    def _inverse(self, vectors: torch.Tensor) -> torch.Tensor:
        v = vectors.to(self._evecs.dtype)
        return ((v @ self._evecs) * self._inv_evals) @ self._evecs.T
