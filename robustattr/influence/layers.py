"""Per-sample gradients of the cross-entropy over Linear, Conv2d and eval-mode BatchNorm layers from ONE batched
forward and backward, with their squared norms and dot products computed from the layer inputs and output gradients
(Goodfellow 2015 for Linear; the unfold form for Conv2d), never as an N x P tensor of per-sample gradients.

For a layer ``out = W a + b`` the gradient of sample i's loss is ``g_i a_i^T`` (``g_i = d l_i / d out_i``):
- a Linear layer on (B, in) inputs, the last layer above all: rank one, so ``|grad|^2 = |g_i|^2 (|a_i|^2 + 1)`` and
  ``<grad_i, grad_j> = (g_i . g_j)(a_i . a_j + 1)``; when the layer's output is the network's logits,
  ``g_i = softmax(z_i) - onehot(y_i)`` and one forward pass (no backward) is the whole cost;
- a Conv2d layer: with ``U_i`` the unfolded input (C_in k k, L positions) and ``G_i`` the output gradient (C_out, L),
  the gradient is ``G_i U_i^T``; its squared norm is either that matrix's (materialised one layer and a chunk of
  the batch at a time, cost L C_in k k C_out) or ``sum_lm (U_i^T U_i)_lm (G_i^T G_i)_lm`` (the Gram form, cost
  L^2 (C_in k k + C_out)), whichever is cheaper: late, wide layers with few positions take the Gram form;
- an eval-mode BatchNorm: ``sum_spatial g x_hat`` and ``sum_spatial g`` per channel (its affine parameters).
A Linear layer on (B, T, in) inputs is treated like a convolution with T positions.

Samples are independent only in eval mode (BatchNorm with its running statistics), which is how every influence
backend runs its model. The output gradients are taken with respect to zero "probe" tensors added to each layer's
output by a forward hook, so an in-place operation after the layer (``ReLU(inplace=True)``) cannot change them and no
parameter gradient is computed or touched.

Why by hand: Captum's ``sample_wise_grads_per_batch`` and torch.func materialise every per-sample gradient (B x P
per batch: 1.4 GB at batch 128 for a ResNet-18); Opacus and BackPACK compute norms this way but are not among the
toolkit's packages, and neither gives the pairwise dot products TracIn scores need.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from robustattr.errors import ConfigError
from robustattr.influence.scope import Scope

NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
CHUNK_ELEMENTS = 1 << 25  # 32M numbers (128 MB in float32): the largest temporary of one layer and batch chunk


def _conv_padding(module: nn.Conv2d) -> tuple[int, int] | None:
    if isinstance(module.padding, str):
        return (0, 0) if module.padding == "valid" else None  # "same" may pad asymmetrically: torch.func serves it
    return tuple(module.padding)


def unsupported(model: nn.Module, scope: Scope) -> str | None:
    """Why the layer path cannot serve ``scope`` of ``model`` (None when it can): every parameter must be the
    ``weight`` or ``bias`` of a plain Linear or Conv2d (zero padding) or of a BatchNorm with running statistics."""
    modules = dict(model.named_modules())
    owned = set()
    for name in scope.modules:
        module = modules[name]
        kind = type(module)
        if isinstance(module, nn.Linear):
            if kind.forward is not nn.Linear.forward:
                return f"{name}: {kind.__name__} overrides Linear.forward"
        elif isinstance(module, nn.Conv2d):
            if kind.forward is not nn.Conv2d.forward or kind._conv_forward is not nn.Conv2d._conv_forward:
                return f"{name}: {kind.__name__} overrides Conv2d.forward"
            if module.padding_mode != "zeros" or _conv_padding(module) is None:
                return f"{name}: padding {module.padding!r} ({module.padding_mode})"
        elif isinstance(module, NORMS):
            if kind.forward is not nn.modules.batchnorm._BatchNorm.forward or module.running_mean is None:
                return f"{name}: {kind.__name__} without running statistics"
        else:
            return f"{name}: {kind.__name__} is not Linear, Conv2d or BatchNorm"
        owned |= {f"{name}.{n}" if name else n for n, _ in module.named_parameters(recurse=False)}
        extra = {n for n, _ in module.named_parameters(recurse=False)} - {"weight", "bias"}
        if extra:
            return f"{name}: parameters {sorted(extra)} besides weight and bias"
    if set(scope.names) != owned:
        return "the scope holds parameters of other modules"
    ids = [id(p) for _, p in scope.parameters]
    if len(set(ids)) != len(ids):
        return "a parameter is shared between modules"
    return None


class LayerUnsupported(Exception):
    """The model used a scoped layer in a way the layer path does not handle (called twice, not called, shared)."""


@dataclass
class Layer:
    """One scoped layer of one batch: what its per-sample gradients follow from."""

    module: nn.Module
    inputs: torch.Tensor  # the layer's input (detached)
    grad: torch.Tensor  # d l_i / d out_i, the layer's output gradient per sample
    gram: bool | None = None  # force the Gram form (True) or materialising (False); None: the cheaper one

    # ------------------------------------------------------------------------------------------- forms
    def _matrices(self) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(A, G, groups): inputs (B, groups, d_in, L) and output gradients (B, groups, d_out, L)."""
        m, a, g = self.module, self.inputs, self.grad
        b = len(a)
        if isinstance(m, nn.Linear):
            return a.reshape(b, 1, -1, a.shape[-1]).transpose(2, 3), g.reshape(b, 1, -1, g.shape[-1]).transpose(2, 3), 1
        u = F.unfold(a, m.kernel_size, m.dilation, _conv_padding(m), m.stride)  # (B, C_in k k, L)
        groups = m.groups
        return u.reshape(b, groups, -1, u.shape[-1]), g.reshape(b, groups, -1, g.shape[-2] * g.shape[-1]), groups

    @property
    def rank_one(self) -> bool:
        return isinstance(self.module, nn.Linear) and self.inputs.dim() == 2

    @property
    def is_norm(self) -> bool:
        return isinstance(self.module, NORMS)

    def _norm_dense(self) -> torch.Tensor:
        m, x, g = self.module, self.inputs, self.grad
        shape = (1, -1) + (1,) * (x.dim() - 2)
        x_hat = (x - m.running_mean.reshape(shape)) / (m.running_var.reshape(shape) + m.eps).sqrt()
        dims = tuple(range(2, x.dim()))
        parts = []
        if m.weight is not None:
            parts.append((g * x_hat).sum(dims) if dims else g * x_hat)
        if m.bias is not None:
            parts.append(g.sum(dims) if dims else g)
        return torch.cat(parts, 1)

    def _use_gram(self, length: int, d_in: int, d_out: int) -> bool:
        if self.gram is not None:
            return self.gram
        return length * (d_in + d_out) < d_in * d_out

    def _chunk(self, per_sample: int) -> int:
        return max(1, CHUNK_ELEMENTS // max(1, per_sample))

    # ------------------------------------------------------------------------------------------- results
    def dense(self) -> torch.Tensor:
        """The per-sample gradients of this layer, (B, P_layer): weight then bias, as named_parameters orders them."""
        if self.is_norm:
            return self._norm_dense()
        g = self.grad
        if self.rank_one:
            parts = [torch.einsum("bo,bi->boi", g, self.inputs).reshape(len(g), -1)]
        else:
            a, gg, _ = self._matrices()
            parts = [torch.einsum("bgol,bgkl->bgok", gg, a).reshape(len(g), -1)]
        bias = self._bias_grad()
        if bias is not None:
            parts.append(bias)
        return torch.cat(parts, 1)

    def _linear_bias(self) -> torch.Tensor:
        g = self.grad
        return g if g.dim() == 2 else g.reshape(len(g), -1, g.shape[-1]).sum(1)

    def _bias_grad(self) -> torch.Tensor | None:
        m, g = self.module, self.grad
        if m.bias is None:
            return None
        if isinstance(m, nn.Linear):
            return self._linear_bias()
        return g.flatten(2).sum(2)

    def squared_norms(self) -> torch.Tensor:
        """|per-sample gradient of this layer|^2, (B,)."""
        if self.is_norm:
            return self._norm_dense().pow(2).sum(1)
        bias = self._bias_grad()
        total = bias.pow(2).sum(1) if bias is not None else torch.zeros(len(self.grad), dtype=self.grad.dtype,
                                                                          device=self.grad.device)  # fmt: skip
        if self.rank_one:
            return total + self.grad.pow(2).sum(1) * self.inputs.pow(2).sum(1)
        a, g, _ = self._matrices()
        length, d_in, d_out = a.shape[-1], a.shape[2], g.shape[2]
        out = []
        if self._use_gram(length, d_in, d_out):
            step = self._chunk(a.shape[1] * length * length)
            for s in range(0, len(a), step):
                ga = torch.einsum("bgkl,bgkm->bglm", a[s : s + step], a[s : s + step])
                gg = torch.einsum("bgol,bgom->bglm", g[s : s + step], g[s : s + step])
                out.append((ga * gg).flatten(1).sum(1))
        else:
            step = self._chunk(a.shape[1] * d_in * d_out)
            for s in range(0, len(a), step):
                out.append(torch.einsum("bgol,bgkl->bgok", g[s : s + step], a[s : s + step]).flatten(1).pow(2).sum(1))
        return total + torch.cat(out)

    def dots(self, other: Layer) -> torch.Tensor:
        """<per-sample gradient of other's sample q, this layer's sample b>, (Q, B)."""
        if self.is_norm:
            return other._norm_dense() @ self._norm_dense().T
        bias, other_bias = self._bias_grad(), other._bias_grad()
        total = other_bias @ bias.T if bias is not None else 0.0
        if self.rank_one:
            return total + (other.grad @ self.grad.T) * (other.inputs @ self.inputs.T)
        a, g, _ = self._matrices()
        qa, qg, _ = other._matrices()
        length, d_in, d_out = a.shape[-1], a.shape[2], g.shape[2]
        queries = len(qa)
        gram_cost = queries * length * length * (d_in + d_out)
        dense_cost = (1 + queries) * length * d_in * d_out
        use_gram = self.gram if self.gram is not None else gram_cost < dense_cost
        if not use_gram:
            q = torch.einsum("qgol,qgkl->qgok", qg, qa).flatten(1)  # the queries' gradients: Q is small
            step = self._chunk(a.shape[1] * d_in * d_out)
            cols = [q @ torch.einsum("bgol,bgkl->bgok", g[s : s + step], a[s : s + step]).flatten(1).T
                    for s in range(0, len(a), step)]  # fmt: skip
            return total + torch.cat(cols, 1)
        step = self._chunk(queries * a.shape[1] * length * length)
        cols = []
        for s in range(0, len(a), step):
            ga = torch.einsum("qgkl,bgkm->qbglm", qa, a[s : s + step])
            gg = torch.einsum("qgol,bgom->qbglm", qg, g[s : s + step])
            cols.append((ga * gg).flatten(2).sum(2))
        return total + torch.cat(cols, 1)


class Batch:
    """The scoped layers of one batch under one model, with the logits."""

    def __init__(self, layers: list[Layer], logits: torch.Tensor) -> None:
        self.layers = layers
        self.logits = logits

    def dense(self) -> torch.Tensor:
        """Per-sample gradients over the scope, (B, P), in scope order."""
        return torch.cat([layer.dense() for layer in self.layers], 1)

    def squared_norms(self) -> torch.Tensor:
        return torch.stack([layer.squared_norms() for layer in self.layers]).sum(0)

    def dots(self, queries: Batch) -> torch.Tensor:
        """(Q, B): gradient dot products of the queries' samples with this batch's."""
        return sum(mine.dots(theirs) for mine, theirs in zip(self.layers, queries.layers, strict=True))

    def dot_vectors(self, vectors: torch.Tensor) -> torch.Tensor:
        """(B, K): this batch's per-sample gradients against dense vectors (K, P), one layer at a time."""
        total, start = 0.0, 0
        for layer in self.layers:
            d = layer.dense()
            total = total + d @ vectors[:, start : start + d.shape[1]].T.to(d.dtype)
            start += d.shape[1]
        return total


class LayerGradients:
    """The layer path for a scope made only of Linear, Conv2d and eval-mode BatchNorm layers (`unsupported` says
    which scopes). ``capture(model, x, y)`` runs one forward (and, unless the scope is a Linear layer giving the
    logits, one backward) and returns a `Batch`. The model must be in eval mode; the samples of a batch must not
    interact (eval mode guarantees it for the standard layers)."""

    def __init__(self, modules: Sequence[str], gram: bool | None = None) -> None:
        self.modules = list(modules)
        self.gram = gram
        self.forward_only: bool | None = None  # decided on the first batch

    def capture(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Batch:
        named = dict(model.named_modules())
        chosen = [named[m] for m in self.modules]
        if model.training:
            raise LayerUnsupported("the model is in training mode: its samples are not independent")
        if self.forward_only is None:
            self.forward_only = self._gives_logits(model, chosen[-1], x) if len(chosen) == 1 else False
        if self.forward_only:
            return self._capture_forward(model, chosen[0], x, y)
        return self._capture_backward(model, chosen, x, y)

    @staticmethod
    def _gives_logits(model: nn.Module, module: nn.Module, x: torch.Tensor) -> bool:
        if not isinstance(module, nn.Linear):
            return False
        seen = []
        handle = module.register_forward_hook(lambda mod, i, out: seen.append(out))
        try:
            with torch.no_grad():
                logits = model(x[:1])
        finally:
            handle.remove()
        return len(seen) == 1 and seen[0] is logits and seen[0].dim() == 2

    def _capture_forward(self, model, module, x, y) -> Batch:
        seen = []
        handle = module.register_forward_hook(lambda mod, i, out: seen.append(i[0].detach()))
        try:
            with torch.no_grad():
                logits = model(x)
        finally:
            handle.remove()
        if len(seen) != 1:
            raise LayerUnsupported(f"the last layer ran {len(seen)} times in one forward pass")
        z = logits.to(torch.promote_types(logits.dtype, torch.float32))
        g = z.softmax(1) - F.one_hot(y, z.shape[1]).to(z.dtype)  # d CE / d logits, per sample
        inputs = seen[0].to(g.dtype)
        return Batch([Layer(module, inputs, g, self.gram)], logits)

    def _capture_backward(self, model, modules, x, y) -> Batch:
        from robustattr.influence.base import ce_per_sample

        records: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

        def hook(mod, inputs, out):
            if id(mod) in records:
                raise LayerUnsupported(f"{type(mod).__name__} ran twice in one forward pass")
            probe = torch.zeros_like(out, requires_grad=True)
            records[id(mod)] = (inputs[0].detach(), probe)
            return out + probe

        handles = [m.register_forward_hook(hook) for m in modules]
        try:
            with torch.enable_grad():
                logits = model(x)
                missing = [m for m in modules if id(m) not in records]
                if missing:
                    raise LayerUnsupported(f"{len(missing)} scoped layer(s) did not run")
                probes = [records[id(m)][1] for m in modules]
                grads = torch.autograd.grad(ce_per_sample(logits, y).sum(), probes, allow_unused=True)
        finally:
            for h in handles:
                h.remove()
        layers = []
        for m, probe, g in zip(modules, probes, grads, strict=True):
            g = torch.zeros_like(probe) if g is None else g
            layers.append(Layer(m, records[id(m)][0].to(g.dtype), g.detach(), self.gram))
        return Batch(layers, logits.detach())


def layer_gradients(model: nn.Module, scope: Scope, mode: str) -> tuple[LayerGradients | None, str]:
    """The layer path for ``scope`` under ``mode`` ("auto", "layers", "torch.func"), and why not where it is None."""
    if mode == "torch.func":
        return None, "torch.func (asked)"
    reason = unsupported(model, scope)
    if reason is not None:
        if mode == "layers":
            raise ConfigError(f"influence: per_sample 'layers' cannot serve this scope: {reason}; use 'auto'")
        return None, f"torch.func ({reason})"
    return LayerGradients(scope.modules), "layers"
