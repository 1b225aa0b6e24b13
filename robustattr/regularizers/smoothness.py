"""Penalties on the input geometry of the loss: gradient norm, CURE, SSR and Hessian norms.

All take input gradients with ``torch.autograd.grad(create_graph=True)`` and reuse the training step's own
forward when it is handed to them (``uses_clean_forward``), so a penalty adds backward passes, not forwards.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Literal

import torch
from torch import nn

from robustattr.derivatives import (
    at_least_fp32,
    frozen_norm_stats,
    logit_jvp,
    logit_vjp,
    loss_hvp,
    loss_input_gradient,
    per_sample_norm,
)
from robustattr.errors import ConfigError, keep_counts
from robustattr.regularizers.base import ObjectiveTerm, full_precision, per_sample_sq_norm

_RELU_NOTE = (
    "the network's logits have zero input curvature almost everywhere, so the input Hessian of the loss is "
    "exactly its Gauss-Newton part J^T (diag(p) - p p^T) J (curvature of the softmax seen through the logit "
    "Jacobian J)"
)


class GradientNorm(ObjectiveTerm, second_order=True, uses_clean_forward=True):
    """Input-gradient norm, double backprop (Ross & Doshi-Velez 2018): ``0.5 * mean_i ||d CE_i / d x_i||^2``.

    Per-sample gradients make the value independent of the batch size; Ross & Doshi-Velez differentiate the
    batch-mean loss, so their lambda (about 10^4.75 on MNIST) corresponds to lambda / batch size here."""

    def forward(self, model, x, y, logits=None):
        _, _, g = loss_input_gradient(model, x, y, logits)
        return 0.5 * per_sample_sq_norm(g).mean()


class CURE(ObjectiveTerm, second_order=True, curvature=True, uses_clean_forward=True, ramps_weight=False):
    """CURE (Moosavi-Dezfooli et al. 2019): ``||grad CE(x + h z) - grad CE(x)||^2`` with
    ``z = sign(g) / ||sign(g)||`` held constant: a finite-difference Hessian-vector product along the
    gradient-sign direction. ``h`` (in L2 pixel units of [0, 1] images; 1.5 is about 7/255 per pixel on
    32x32x3) is ramped over ``warmup_epochs``, as in the paper; the weight is not."""

    def __init__(self, weight: float = 4.0, h: float = 1.5, name: str | None = None, warmup_epochs: float = 0.0):
        super().__init__(weight, name, warmup_epochs)
        self.h = h

    def piecewise_linear_note(self) -> str:
        return f"{_RELU_NOTE}; CURE's finite difference also sees the change of linear region between x and x + h z"

    def forward(self, model, x, y, logits=None):
        # A finite difference of gradients: under autocast both gradients are taken in fp32 (the training step's
        # bf16 forward cannot be reused), and the difference is formed in fp32.
        autocast = torch.is_autocast_enabled(x.device.type)
        with full_precision(x.device) if autocast else nullcontext():
            x, _, g0 = loss_input_gradient(model, x, y, None if autocast else logits)
            z = at_least_fp32(g0.detach().sign())
            z = z / per_sample_norm(z)
            x1 = (at_least_fp32(x.detach()) + self.h * self.ramp * z).to(x.dtype)
            _, _, g1 = loss_input_gradient(model, x1, y)
            return per_sample_sq_norm(at_least_fp32(g1) - at_least_fp32(g0)).mean()


def _softmax_factor(p: torch.Tensor) -> torch.Tensor:
    """L with ``L L^T = diag(p) - p p^T``: ``L = diag(sqrt p) - p sqrt(p)^T`` (smooth in p, no eigh in the graph)."""
    sqrt_p = p.clamp_min(1e-12).sqrt()
    return torch.diag_embed(sqrt_p) - p.unsqueeze(2) * sqrt_p.unsqueeze(1)


class SSR(ObjectiveTerm, second_order=True, curvature=True, uses_clean_forward=True):
    """Smooth Surface Regularisation (Wang et al. 2020): the largest eigenvalue of the Gauss-Newton input
    Hessian ``M = J^T (diag(p) - p p^T) J``, averaged over the batch.

    With ``L L^T = diag(p) - p p^T``, the non-zero eigenvalues of M are those of the C x C matrix
    ``L^T J J^T L``. Its top eigenvector u is found without a graph: exactly (J built by one batched
    backward over the C classes, ``method="exact"``) or by power iteration on Jacobian-vector products
    (``"power"``, for many classes). The penalty is then ``||J^T L u||^2`` with u held fixed: the same value,
    and by the envelope theorem the same parameter gradient, as lambda_max itself, for the cost of one
    double-backprop pass. ``method="auto"`` is exact up to ``exact_max_classes`` classes.

    ``channel_mean=True`` averages J over input channels first, as the authors' code does. Their objective
    ``(1 - alpha) * CE + alpha * s * lambda_max`` (alpha = 0.3) is ``ce_weight: 0.7`` and ``weight: 0.3 * s``.
    """

    def __init__(
        self,
        weight: float = 1.0,
        name: str | None = None,
        warmup_epochs: float = 0.0,
        method: Literal["auto", "exact", "power"] = "auto",
        power_iters: int = 10,
        exact_max_classes: int = 20,
        channel_mean: bool = False,
    ) -> None:
        super().__init__(weight, name, warmup_epochs)
        self.method = method
        self.power_iters = power_iters
        self.exact_max_classes = exact_max_classes
        self.channel_mean = channel_mean

    def piecewise_linear_note(self) -> str:
        return f"{_RELU_NOTE}, which is what SSR penalises on any network"

    def _reduce(self, t: torch.Tensor) -> torch.Tensor:
        """J^T w per sample as penalised: flattened, optionally averaged over channels."""
        if self.channel_mean and t.dim() == 4:
            t = t.mean(dim=1)
        return t.reshape(t.shape[0], -1)

    def top_eigenvector(self, model: nn.Module, x: torch.Tensor, logits: torch.Tensor, L: torch.Tensor):
        """(N, C) top eigenvector of ``L^T J J^T L`` per sample, and its eigenvalue (both without graph)."""
        n, c = logits.shape
        exact = self.method == "exact" or (self.method == "auto" and c <= self.exact_max_classes)
        if exact:
            eye = torch.eye(c, device=x.device, dtype=logits.dtype).unsqueeze(1).expand(c, n, c)
            (jac,) = torch.autograd.grad(logits, x, grad_outputs=eye, is_grads_batched=True, retain_graph=True)
            jac = self._reduce(jac.reshape(c * n, *x.shape[1:])).reshape(c, n, -1).transpose(0, 1)  # (N, C, d)
            with full_precision(x.device):  # the C x C eigenproblem in fp32, whatever the network runs in
                jac = at_least_fp32(jac)
                gram = jac @ jac.transpose(1, 2)
                # eigh raises on NaN input: a diverged batch gets a zero matrix here, its penalty still comes out
                # NaN (it is built from the same logits), and the training step's non-finite check names it.
                matrix = torch.nan_to_num(L.transpose(1, 2) @ gram @ L, nan=0.0, posinf=0.0, neginf=0.0)
                values, vectors = torch.linalg.eigh(matrix)
            return vectors[..., -1], values[..., -1]
        u = torch.randn(n, c, device=x.device, dtype=L.dtype)
        u = u / u.norm(dim=1, keepdim=True)
        for _ in range(self.power_iters):
            with full_precision(x.device):
                w = (L @ u.unsqueeze(2)).squeeze(2)
            jt_w = logit_vjp(logits, x, w.to(logits.dtype))
            if self.channel_mean and jt_w.dim() == 4:
                jt_w = jt_w.mean(dim=1, keepdim=True).expand_as(jt_w) / jt_w.shape[1]
            # forward-mode AD does not follow autocast (it casts the primal, not the tangent): graph-free, so in
            # the network's own precision
            with frozen_norm_stats(model), full_precision(x.device):
                _, j_v = logit_jvp(model, x, jt_w)
            with full_precision(x.device):  # the iteration's products and normalisation in fp32
                s_u = (L.transpose(1, 2) @ at_least_fp32(j_v).unsqueeze(2)).squeeze(2)
                value = (u * s_u).sum(dim=1)
                u = s_u / s_u.norm(dim=1, keepdim=True).clamp_min(1e-30)
        return u, value

    def forward(self, model, x, y, logits=None):
        if logits is None or not x.requires_grad:
            x = x.detach().requires_grad_(True)
            with frozen_norm_stats(model):
                logits = model(x)
        p = at_least_fp32(logits).softmax(dim=1)
        L = _softmax_factor(p)  # fp32: the softmax curvature factor stays out of bf16
        u, _ = self.top_eigenvector(model, x, logits, L.detach())
        w = (L @ u.detach().unsqueeze(2)).squeeze(2)
        jt_w = logit_vjp(logits, x, w.to(logits.dtype), create_graph=True)
        return per_sample_sq_norm(self._reduce(jt_w)).mean()


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


class HessianNorm(ObjectiveTerm, second_order=True, curvature=True, uses_clean_forward=True):
    """Norm of the input Hessian of the loss, from Hessian-vector products.

    ``norm="frobenius"``: Hutchinson's estimate ``||H||_F^2 = E ||H v||^2`` over ``probes`` Rademacher vectors.
    ``norm="spectral"``: ``|v^T H v|`` at the top eigenvector found by ``power_iters`` power iterations (no
    graph), with one graph-keeping product at the end (envelope theorem).

    ``hvp`` picks how products are computed (see `loss_hvp`): ``"auto"`` uses double backprop, or on
    networks with BatchNorm (no third derivative in PyTorch) a finite difference of input gradients with step
    ``fd_step``; ``"forward"`` (forward-over-reverse) serves the graph-free power iterations, the final
    product then uses ``"auto"``'s choice."""

    def __init__(
        self,
        weight: float = 1.0,
        name: str | None = None,
        warmup_epochs: float = 0.0,
        norm: Literal["frobenius", "spectral"] = "frobenius",
        probes: int = 1,
        power_iters: int = 5,
        hvp: Literal["auto", "reverse", "forward", "finite_difference"] = "auto",
        fd_step: float = 1e-2,
        seed: int | None = None,
    ) -> None:
        super().__init__(weight, name, warmup_epochs)
        keep_counts(self, probes=probes, power_iters=power_iters)
        if norm not in ("frobenius", "spectral") or hvp not in ("auto", "reverse", "forward", "finite_difference"):
            raise ConfigError(f"HessianNorm: norm must be frobenius or spectral and hvp auto, reverse, forward or "
                              f"finite_difference; got norm={norm!r}, hvp={hvp!r}")  # fmt: skip
        if not fd_step > 0:
            raise ConfigError(f"HessianNorm: fd_step must be positive, got {fd_step}")
        self.norm = norm
        self.hvp = hvp
        self.fd_step = fd_step
        self.seed = seed

    def piecewise_linear_note(self) -> str:
        return (
            f"{_RELU_NOTE}; this term measures the norm of that Gauss-Newton part, except with BatchNorm, where its "
            "finite-difference products also see jumps between linear regions (values can explode): prefer SSR "
            "or a smooth activation there"
        )

    def uses_finite_differences(self, model: nn.Module) -> bool:
        return has_batchnorm(model) or self.hvp == "finite_difference"

    def precision_problem(self, precision: str, model: nn.Module) -> str | None:
        if precision in ("bf16-true", "16-true") and self.uses_finite_differences(model):
            return (
                f"{self.name} takes finite differences of input gradients (step {self.fd_step}), which {precision} "
                "weights cannot resolve (bf16 keeps 3 significant digits); use bf16-mixed (the differences are "
                "then taken in fp32) or 32-true"
            )
        return None

    def forward(self, model, x, y, logits=None):
        if torch.is_autocast_enabled(x.device.type) and self.uses_finite_differences(model):
            with full_precision(x.device):  # both gradients in fp32: their difference is the signal
                return self.forward(model, x.detach(), y)
        batchnorm = has_batchnorm(model)
        graph_mode = "finite_difference" if batchnorm or self.hvp == "finite_difference" else "reverse"
        if self.hvp == "reverse" and batchnorm:
            raise ConfigError(
                "HessianNorm(hvp='reverse') on a network with BatchNorm: the penalty's gradient needs third "
                "derivatives, which PyTorch's batch_norm does not have. Use hvp: finite_difference (or auto)"
            )
        free_mode = graph_mode if self.hvp in ("auto", "reverse") else self.hvp
        x, logits, g = loss_input_gradient(model, x, y, logits)
        generator = None if self.seed is None else torch.Generator(device=x.device).manual_seed(self.seed)

        def product(v: torch.Tensor, create_graph: bool) -> torch.Tensor:
            mode = graph_mode if create_graph else free_mode
            with frozen_norm_stats(model):
                return loss_hvp(
                    model, x, y, v, mode, create_graph=create_graph, grad=g if mode != "forward" else None,
                    fd_step=self.fd_step,
                )  # fmt: skip

        if self.norm == "frobenius":
            total = 0.0
            for _ in range(self.probes):
                v = torch.randint(0, 2, x.shape, generator=generator, device=x.device).to(x.dtype) * 2 - 1
                total = total + per_sample_sq_norm(product(v, create_graph=True))
            return (total / self.probes).mean()
        v = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        for _ in range(self.power_iters):
            v = product(v / per_sample_norm(v), create_graph=False).detach()
        v = v / per_sample_norm(v)
        return (v * product(v, create_graph=True)).reshape(x.shape[0], -1).sum(dim=1).abs().mean()
