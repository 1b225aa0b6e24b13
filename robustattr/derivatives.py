"""Input-space derivative products for curvature terms: Hessian-vector products of the loss, by
reverse-over-reverse (double backprop) or forward-over-reverse (forward-mode AD through the gradient), and
logit Jacobian products. REFERENCE.md section 8: reverse-over-reverse is the safe default; forward-over-reverse
can be faster but has op-coverage gaps. Both are tested against torch.autograd.functional.hessian, and
benchmarks/regularizer_cost.py measures both.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import nn


def at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    """``t`` in fp32 when it is a 16-bit float, unchanged otherwise (fp64 stays fp64)."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


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
            x = x if x.requires_grad else x.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(F.cross_entropy(model(x), y, reduction="sum"), x, create_graph=True)
        (hv,) = torch.autograd.grad((grad * v).sum(), x, create_graph=create_graph, retain_graph=reuse or None)
        return hv
    if mode == "finite_difference":
        if grad is None:
            x = x if x.requires_grad else x.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(F.cross_entropy(model(x), y, reduction="sum"), x, create_graph=True)
        norm = per_sample_norm(v)
        x1 = (at_least_fp32(x.detach()) + fd_step * v / norm).to(x.dtype).requires_grad_(True)
        (g1,) = torch.autograd.grad(F.cross_entropy(model(x1), y, reduction="sum"), x1, create_graph=create_graph)
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
