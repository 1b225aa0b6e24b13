"""The influence interface: which training points are responsible for a prediction (Koh & Liang 2017).

Sign and scale, the same for every backend: a score is positive when the training point *helps* the query
(removing it would raise the query's loss) and is Koh & Liang's ``-(1/n) I_up,loss``:

    score(z_train, z_query) = (1/n) grad L(z_query)^T (H + damping I)^{-1} grad L(z_train),

where H is the curvature (Hessian or Gauss-Newton) of the *average* cross-entropy training loss over the
parameter scope and n the number of training points, so a score approximates the change of the query's loss
when ``z_train`` is removed and the model retrained. TracIn (`TracIn`) has no Hessian: its score is
``sum_i lr_i grad l(w_i, z_query) . grad l(w_i, z_train)`` over the saved checkpoints, positive = helpful too.

Every backend is the same computation with a different ``(H + damping I)^{-1}``: query vectors
``v_q = (H + damping I)^{-1} grad L(z_q)`` are formed once, then the training set is streamed in batches of
per-sample gradients (torch.func, never all n of them in memory) and scores are ``v_q . grad L(z_i) / n``.
Under an initialised process group (Lightning's DDP) each process streams its shard of the training set and
the results are gathered in training-set order on every process.

The loss is the plain cross-entropy of each training point under the final model in eval mode (BatchNorm with
its running statistics): objective terms used in training (SSR, adversarial CE) are not part of it.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from robustattr.errors import ConfigError, NonFiniteError
from robustattr.influence import distributed as D
from robustattr.influence.data import TrainingSet
from robustattr.influence.layers import Batch, LayerGradients, LayerUnsupported, layer_gradients
from robustattr.influence.scope import Scope, ScopeSpec, resolve_scope

PerSample = Literal["auto", "layers", "torch.func"]
PER_SAMPLE = ("auto", "layers", "torch.func")


@dataclass
class InfluenceScores:
    """Scores with what produced them. ``values``: (queries, training points) for `Influence.scores`, (training
    points,) for `Influence.self_influence`; positive = helpful (see the module docstring)."""

    values: torch.Tensor
    backend: str
    damping: float | None
    scope: str
    settings: dict[str, Any] = field(default_factory=dict)

    def __repr__(self) -> str:
        shape = "x".join(map(str, self.values.shape))
        return f"InfluenceScores({shape}, backend={self.backend}, damping={self.damping}, scope={self.scope!r})"


@dataclass
class TopK:
    """For each query: the ``k`` training points with the largest scores (proponents, helpful) and the ``k`` with
    the smallest (opponents, harmful), as training-set indices and scores."""

    proponents: torch.Tensor
    proponent_scores: torch.Tensor
    opponents: torch.Tensor
    opponent_scores: torch.Tensor
    damping: float | None


def ce_per_sample(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy per sample, in at least fp32 (float64 stays float64: the exact reference needs it)."""
    return F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), y, reduction="none")


class Influence:
    """Base of the influence backends (`ExactInfluence`, `CGInfluence`, `EKFACInfluence`, `TracIn`).

    ``scope``: "last" (the last Linear layer, default), "all", or a list of module names (robustattr.influence.
    scope). ``damping``: added to the curvature (Koh & Liang: 0.01). ``batch_size``: training points per streamed
    batch. ``dtype``: the precision of gradients and curvature (default float32; the exact reference uses
    float64). ``per_sample``: how per-sample gradients are formed: "auto" (default) takes the layer path of
    `robustattr.influence.layers` (one batched backward; norms and dot products without per-sample gradients) where
    the scope is made of Linear, Conv2d and eval-mode BatchNorm layers and it agrees with torch.func on the first
    training points, torch.func otherwise; "layers" insists on it; "torch.func" never takes it. Results record the
    path under ``settings["per_sample"]``. Use: ``backend.fit(model, training_set)`` then ``scores``,
    ``self_influence``, ``top_k``, ``input_gradient``."""

    name = "influence"
    streams_gradients = True  # False: the backend forms no per-sample gradients of its own (EK-FAC: kronfluence)
    exclude_norm = False
    kinds: tuple = ()

    def __init__(
        self,
        scope: ScopeSpec = "last",
        damping: float = 0.01,
        batch_size: int = 128,
        dtype: torch.dtype | str = torch.float32,
        per_sample: PerSample = "auto",
    ) -> None:
        if damping < 0:
            raise ConfigError(f"{type(self).__name__}: damping must be >= 0, got {damping}")
        if batch_size < 1:
            raise ConfigError(f"{type(self).__name__}: batch_size must be positive, got {batch_size}")
        if per_sample not in PER_SAMPLE:
            raise ConfigError(f"{type(self).__name__}: per_sample must be one of {PER_SAMPLE}, got {per_sample!r}")
        self.per_sample = per_sample
        self.layers: LayerGradients | None = None
        self.per_sample_path = "unfitted"
        self.scope_spec = scope
        self.damping = float(damping)
        self.batch_size = batch_size
        self.dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        self.model: nn.Module | None = None
        self.train: TrainingSet | None = None
        self.scope: Scope | None = None

    # ----------------------------------------------------------------------------------------------- fitting
    def fit(self, model: nn.Module, train: TrainingSet) -> Influence:
        """Prepare the backend on ``model`` (images in [0, 1] -> logits; the raw module, not a DDP wrapper) and the
        training set (without augmentation). Returns self."""
        model = getattr(model, "module", model)  # a DDP wrapper: the raw module
        self.model = copy.deepcopy(model).eval().to(self.dtype)  # the caller's model keeps its dtype and mode
        self.train = train
        self.scope = resolve_scope(self.model, self.scope_spec, self.exclude_norm, self.kinds)
        inside = {id(p) for _, p in self.scope.parameters}
        for p in self.model.parameters():  # gradients flow to the scope only
            p.requires_grad_(id(p) in inside)
        self._check_fits(*train.example())
        self.layers, self.per_sample_path = layer_gradients(self.model, self.scope, self.per_sample)
        if not self.streams_gradients:
            self.layers, self.per_sample_path = None, self.name
        if self.layers is not None and self.per_sample == "auto":
            self._verify_layers()
        self._fit()
        return self

    def _verify_layers(self) -> None:
        """The layer path against torch.func on the first training points: a model whose samples interact or whose
        scoped layers are reused in ways `unsupported` cannot see falls back to torch.func (recorded in settings)."""
        x, y = self.train.tensors(range(min(2, len(self.train))))
        try:
            fast = self.gradients(x, y)
        except LayerUnsupported as err:
            self.layers, self.per_sample_path = None, f"torch.func ({err})"
            return
        layers, self.layers = self.layers, None
        slow = self.gradients(x, y)
        tolerance = 1e-4 if self.dtype in (torch.float32, torch.float64) else 5e-2
        if (fast - slow).norm() > tolerance * slow.norm().clamp_min(torch.finfo(slow.dtype).tiny):
            self.per_sample_path = "torch.func (the layer path disagreed with it on this model)"
        else:
            self.layers = layers

    def fit_checkpoint(self, path: str, trusted_prefixes: tuple[str, ...] = (), num_workers: int = 0) -> Influence:
        """`fit` on a train.py checkpoint: its network (read with ``weights_only=True`` through the trusted-imports
        gate) and the training split of its own DataModule without augmentation (never downloading)."""
        from robustattr.checkpoint import load_classifier

        net = load_classifier(path, trusted_prefixes).net
        return self.fit(net, TrainingSet.from_checkpoint(path, trusted_prefixes, num_workers))

    def _fit(self) -> None:
        """Backend-specific preparation (curvature, factors)."""

    def _inverse(self, vectors: torch.Tensor) -> torch.Tensor:
        """``(H + damping I)^{-1}`` applied to each row of ``vectors`` (K, P)."""
        raise NotImplementedError

    @property
    def scale(self) -> float:
        """Influence functions: 1/n (Koh & Liang's -(1/n) I_up,loss); TracIn overrides with 1."""
        return 1.0 / len(self.train)

    def settings(self) -> dict[str, Any]:
        return {"batch_size": self.batch_size, "dtype": str(self.dtype).removeprefix("torch."),
                "per_sample": self.per_sample_path}  # fmt: skip

    def _result(self, values: torch.Tensor) -> InfluenceScores:
        if not torch.isfinite(values).all():
            bad = int((~torch.isfinite(values)).sum())
            raise NonFiniteError(
                f"{type(self).__name__}: {bad} non-finite influence score(s) (scope {self.scope.describe()}, "
                f"damping {self.damping}): the curvature is too ill-conditioned; raise the damping"
            )
        return InfluenceScores(values, self.name, self._damping_recorded(), self.scope.describe(), self.settings())

    def _damping_recorded(self) -> float | None:
        return self.damping

    # --------------------------------------------------------------------------------------------- checking
    def _require_fitted(self) -> None:
        if self.model is None:
            raise ConfigError(f"{type(self).__name__}: call fit(model, training_set) first")

    def _check_fits(self, x: torch.Tensor, y: torch.Tensor) -> None:
        expected = tuple(self.train.example()[0].shape[1:]) if self.train is not None else None
        if expected is not None and tuple(x.shape[1:]) != expected:
            raise ConfigError(
                f"influence: query images of shape {tuple(x.shape[1:])} do not fit the training images {expected}"
            )
        try:
            with torch.no_grad():
                classes = self.model(x[:1].to(self.device, self.dtype)).shape[1]
        except RuntimeError as err:
            raise ConfigError(f"influence: images of shape {tuple(x.shape[1:])} do not fit the model: {err}") from err
        if len(y) and (int(y.min()) < 0 or int(y.max()) >= classes):
            raise ConfigError(f"influence: labels must lie in [0, {classes}) for this model, got {y.tolist()[:10]}")
        if len(x) != len(y):
            raise ConfigError(f"influence: {len(x)} images but {len(y)} labels")

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # ------------------------------------------------------------------------------------------- gradients
    def _models(self) -> list[nn.Module]:
        """The networks whose gradients make a training point's vector (TracIn: one per checkpoint)."""
        return [self.model]

    def _scope_parameters(self, model: nn.Module) -> list[torch.Tensor]:
        named = dict(model.named_parameters())
        return [named[name] for name in self.scope.names]

    def gradients(self, x: torch.Tensor, y: torch.Tensor, model: nn.Module | None = None) -> torch.Tensor:
        """Per-sample gradients of the cross-entropy over the scope, (B, P): from one batched forward and backward
        where the scope is made of Linear, Conv2d and BatchNorm layers (`robustattr.influence.layers`), batched with
        torch.func otherwise (and where ``x`` requires a gradient of its own)."""
        model = self.model if model is None else model
        if self.layers is not None and not x.requires_grad:
            return self.capture(x, y, model).dense().to(self.dtype)
        params = {name: p.detach() for name, p in zip(self.scope.names, self._scope_parameters(model), strict=True)}

        def loss(p, xi, yi):
            return ce_per_sample(functional_call(model, p, (xi.unsqueeze(0),)), yi.unsqueeze(0)).sum()

        x = x.to(self.device, self.dtype)
        y = y.to(self.device)
        g = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
        return torch.cat([g[name].reshape(len(x), -1) for name in self.scope.names], 1).to(self.dtype)

    def capture(self, x: torch.Tensor, y: torch.Tensor, model: nn.Module | None = None) -> Batch:
        """The scoped layers' inputs and output gradients for a batch (the layer path; see `layers`)."""
        model = self.model if model is None else model
        return self.layers.capture(model, x.to(self.device, self.dtype), y.to(self.device))

    def query_vectors(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``(H + damping I)^{-1} grad L(z_q)`` per query, (Q, P)."""
        return self._inverse(self._train_vectors(x, y))

    def _train_vectors(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.gradients(x, y, model=m) for m in self._models()], 1)

    def _stream(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(indices, images, labels) of this process's shard of the training set, in batches."""
        yield from self.train.batches(self.batch_size, D.shard(len(self.train)))

    def _per_training_point(self, rows, width: int) -> torch.Tensor:
        """``rows(images, labels) -> (B, width)`` over this process's shard of the training set, gathered in
        training-set order on every process: (n, width), on the CPU."""
        parts, indices = [], []
        for idx, xb, yb in self._stream():
            parts.append(rows(xb, yb))
            indices.append(idx)
        local = torch.cat(parts) if parts else torch.zeros(0, width, dtype=self.dtype, device=self.device)
        index = torch.cat(indices) if indices else torch.zeros(0, dtype=torch.long)
        return D.gather_rows(local, index, len(self.train)).cpu()

    # ---------------------------------------------------------------------------------------------- scores
    def scores(self, x: torch.Tensor, y: torch.Tensor) -> InfluenceScores:
        """Scores of every training point for each query, (Q, n), streamed over the training set."""
        self._require_fitted()
        self._check_fits(x, y)
        queries = self.query_vectors(x, y)
        values = self._per_training_point(lambda xb, yb: (queries @ self._train_vectors(xb, yb).T).T * self.scale,
                                          len(x))  # fmt: skip
        return self._result(values.T.contiguous())

    def self_influence(self) -> InfluenceScores:
        """Each training point's influence on its own loss, (n,): ``grad L(z)^T (H + damping I)^{-1} grad L(z) / n``
        (large for mislabelled and atypical points)."""
        self._require_fitted()

        def rows(xb, yb):
            g = self._train_vectors(xb, yb)
            return (self._inverse(g) * g).sum(1, keepdim=True) * self.scale

        return self._result(self._per_training_point(rows, 1)[:, 0].contiguous())

    def training_signals(self) -> dict[str, torch.Tensor]:
        """The three rankings label checking compares, per training point (n,): ``self_influence`` (as
        `self_influence`), ``loss`` (its cross-entropy under the fitted model) and ``gradient_norm`` (the norm of
        its loss gradient over the scope; TracIn: over every checkpoint's block, learning-rate weighted)."""
        self._require_fitted()

        def rows(xb, yb):
            g = self._train_vectors(xb, yb)
            with torch.no_grad():
                loss = ce_per_sample(self.model(xb.to(self.device, self.dtype)), yb.to(self.device))
            return torch.stack([loss.to(g.dtype), self._weighted_norm(g)], 1)

        values = self._per_training_point(rows, 2)
        return {"self_influence": self.self_influence().values, "loss": values[:, 0].contiguous(),
                "gradient_norm": values[:, 1].contiguous()}  # fmt: skip

    def _weighted_norm(self, g: torch.Tensor) -> torch.Tensor:
        return g.norm(dim=1)

    def top_k(self, x: torch.Tensor, y: torch.Tensor, k: int = 10) -> TopK:
        """The ``k`` most helpful (proponents) and most harmful (opponents) training points of each query."""
        if k < 1:
            raise ConfigError(f"top_k: k must be positive, got {k}")
        values = self.scores(x, y).values
        k = min(k, values.shape[1])
        top = values.topk(k, dim=1)
        bottom = values.topk(k, dim=1, largest=False)
        return TopK(top.indices, top.values, bottom.indices, bottom.values, self._damping_recorded())

    def input_gradient(
        self, x_query: torch.Tensor, y_query: torch.Tensor, x_train: torch.Tensor, y_train: torch.Tensor
    ) -> torch.Tensor:
        """Koh & Liang's ``I_pert,loss`` up to sign and 1/n: the gradient, with respect to each training image, of
        its score on each query summed over the queries (Q queries, B training images -> (B, C, H, W)). Moving a
        training image along it makes it more helpful to the queries (lower their loss); against it, the attack
        direction that raises the queries' loss."""
        self._require_fitted()
        self._check_fits(x_query, y_query)
        self._check_fits(x_train, y_train)
        target = self.query_vectors(x_query, y_query).sum(0).detach()
        return self.pair_input_gradient(x_train, y_train, target.expand(len(x_train), -1)) * self.scale

    def pair_input_gradient(
        self, x: torch.Tensor, y: torch.Tensor, vectors: torch.Tensor, direction: bool = False
    ) -> torch.Tensor:
        """For each image ``x[i]`` (label ``y[i]``), the gradient with respect to ``x[i]`` of ``grad L(z_i) .
        vectors[i]`` (its loss gradient over the scope, every checkpoint's block for TracIn, against its own
        vector), (B, C, H, W), batched with torch.func. The score of a point on fixed training (or query) vectors
        is this dot product up to the scale, so this is the input gradient of influence on either side.
        ``direction``: of ``grad L(z_i) / |grad L(z_i)| . vectors[i]`` instead (blocks normalised one by one): what
        decides the ranking of training points for a query, whatever the size of its loss gradient."""
        self._require_fitted()
        names = self.scope.names
        x = x.to(self.device, self.dtype).detach()
        y = y.to(self.device)
        blocks = vectors.to(self.device, self.dtype).split(self.scope.size, dim=1)
        total = torch.zeros(x.shape, dtype=self.dtype)
        for model, block in zip(self._models(), blocks, strict=True):  # TracIn: one block per checkpoint
            params = {n: p.detach() for n, p in zip(names, self._scope_parameters(model), strict=True)}

            def dot(xi, yi, vi, model=model, params=params):
                def loss(theta):
                    return ce_per_sample(functional_call(model, theta, (xi.unsqueeze(0),)), yi.unsqueeze(0)).sum()

                g = grad(loss)(params)
                flat = torch.cat([g[n].reshape(-1) for n in names])
                if direction:
                    flat = flat / flat.norm().clamp_min(torch.finfo(flat.dtype).tiny)
                return flat @ vi

            with torch.enable_grad():
                total += vmap(grad(dot))(x, y, block).detach().cpu()
        if not torch.isfinite(total).all():
            raise NonFiniteError(f"{type(self).__name__}: non-finite input gradient of the influence")
        return total


Curvature = Literal["hessian", "ggn"]


class CurvatureInfluence(Influence):
    """A backend that inverts the damped Hessian (Koh & Liang) or Gauss-Newton matrix (positive semi-definite;
    equal to the Hessian for a linear head with cross-entropy) of the training loss: ``curvature`` chooses."""

    def __init__(self, curvature: Curvature = "ggn", **common: Any) -> None:
        super().__init__(**common)
        if curvature not in ("hessian", "ggn"):
            raise ConfigError(f"{type(self).__name__}: curvature must be 'hessian' or 'ggn', got {curvature!r}")
        self.curvature = curvature

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "curvature": self.curvature}
