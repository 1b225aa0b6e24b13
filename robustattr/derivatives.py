"""Input-space derivatives: the input gradient of the loss (`loss_input_gradient`, the one place it is taken
for penalties, products and diagnostics), Hessian-vector products of the loss, by reverse-over-reverse (double
backprop) or forward-over-reverse (forward-mode AD through the gradient), and logit Jacobian products.
REFERENCE.md section 8: reverse-over-reverse is the safe default; forward-over-reverse can be faster but has
op-coverage gaps. Both are tested against torch.autograd.functional.hessian, and
benchmarks/regularizer_cost.py measures both.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


def at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    """``t`` in fp32 when it is a 16-bit float, unchanged otherwise (fp64 stays fp64)."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


@contextmanager
def frozen_norm_stats(model: nn.Module) -> Iterator[None]:
    """Forward passes inside leave BatchNorm running statistics as they were. Modules keep their mode: in
    training mode they still normalise with batch statistics (the function being trained).

    The update is prevented rather than undone: with momentum 0 the running averages are rewritten with their
    own values (BatchNorm saves them for backward, so they must not be modified in place afterwards); only
    the batch counter, which backward never reads, is restored."""
    saved = [
        (m, m.momentum, m.num_batches_tracked.clone())
        for m in model.modules()
        if isinstance(m, _BatchNorm) and m.training and m.track_running_stats and m.num_batches_tracked is not None
    ]
    for module, _, _ in saved:
        module.momentum = 0.0
    try:
        yield
    finally:
        with torch.no_grad():
            for module, momentum, count in saved:
                module.momentum = momentum
                module.num_batches_tracked.copy_(count)


def loss_input_gradient(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    logits: torch.Tensor | None = None,
    create_graph: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x, logits, g) with ``g = d sum_i CE_i / dx``, kept in the graph with ``create_graph``. Reuses ``logits``
    when they were computed from an ``x`` that requires grad (the gradient then follows x back through the
    caller's graph); otherwise runs its own forward on a fresh leaf copy of x with frozen BatchNorm statistics."""
    if logits is None or not x.requires_grad:
        x = x.detach().requires_grad_(True)
        with frozen_norm_stats(model):
            logits = model(x)
    ce = F.cross_entropy(logits, y, reduction="sum")
    (g,) = torch.autograd.grad(ce, x, create_graph=create_graph)
    return x, logits, g


HVPMode = Literal["reverse", "forward", "finite_difference"]


def per_sample_norm(v: torch.Tensor) -> torch.Tensor:
    """The L2 norm of each sample in at least fp32, shaped to broadcast against ``v`` (N, 1, 1, 1), never below
    1e-30."""
    flat = v.reshape(v.shape[0], -1).to(torch.promote_types(v.dtype, torch.float32))
    return flat.norm(dim=1).clamp_min(1e-30).view(-1, *[1] * (v.dim() - 1))


def loss_hvp(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    v: torch.Tensor,
    mode: HVPMode = "reverse",
    create_graph: bool = True,
    grad: torch.Tensor | None = None,
    fd_step: float = 1e-2,
) -> torch.Tensor:
    """``H v`` per sample, H the input Hessian of ``sum_i CE_i``.

    - ``"reverse"``: double backprop. Differentiating the result again (a penalty's parameter gradient) needs
      third derivatives, which PyTorch's batch_norm lacks: use a finite difference on BatchNorm networks.
    - ``"forward"``: forward-mode AD through the gradient. Correct values, but its result cannot be
      differentiated again (an in-place op in forward-mode softmax): products without graph only.
    - ``"finite_difference"``: ``(g(x + h v/|v|) - g(x)) |v| / h`` with ``h = fd_step``: second order only.

    ``grad`` (the input gradient, computed with create_graph from this ``x``) is reused when given."""
    if mode == "reverse":
        reuse = grad is not None  # the caller's gradient graph may serve several products: keep it
        if grad is None:
            x, _, grad = loss_input_gradient(model, x, y)
        (hv,) = torch.autograd.grad((grad * v).sum(), x, create_graph=create_graph, retain_graph=reuse or None)
        return hv
    if mode == "finite_difference":
        if grad is None:
            x, _, grad = loss_input_gradient(model, x, y)
        norm = per_sample_norm(v)
        x1 = (at_least_fp32(x.detach()) + fd_step * v / norm).to(x.dtype)
        _, _, g1 = loss_input_gradient(model, x1, y, create_graph=create_graph)
        return (at_least_fp32(g1) - at_least_fp32(grad)) * norm / fd_step  # formed in (at least) fp32
    if create_graph:
        raise ValueError("forward-over-reverse Hessian-vector products cannot be differentiated again here")
    # forward-mode AD does not follow autocast (it casts the primal, not the tangent): the network's own precision
    with fwAD.dual_level(), torch.autocast(device_type=x.device.type, enabled=False):
        x_in = x.detach().requires_grad_(True) if not x.requires_grad else x
        dual = fwAD.make_dual(x_in, v)
        loss = F.cross_entropy(model(dual), y, reduction="sum")
        (g,) = torch.autograd.grad(loss, dual, create_graph=True)
        return fwAD.unpack_dual(g).tangent.detach()


def logit_jvp(model: nn.Module, x: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, J v) by forward-mode AD, J the Jacobian of the logits with respect to the input."""
    with fwAD.dual_level():
        out = model(fwAD.make_dual(x.detach(), v))
        primal, tangent = fwAD.unpack_dual(out)
    return primal, tangent


def logit_vjp(logits: torch.Tensor, x: torch.Tensor, u: torch.Tensor, create_graph: bool = False) -> torch.Tensor:
    """``J^T u`` per sample (u: (N, C)), from logits computed on an ``x`` that requires grad."""
    (g,) = torch.autograd.grad(logits, x, grad_outputs=u, create_graph=create_graph, retain_graph=True)
    return g
