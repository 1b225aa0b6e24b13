"""TracIn (Pruthi et al. 2020, TracInCP): gradient dot products over the checkpoints a run saved,

    score(z_train, z_query) = sum_i lr_i grad l(w_i, z_query) . grad l(w_i, z_train),

with lr_i the learning rate checkpoint i was being trained at, read from its optimizer state. Positive = helpful
(a proponent), as for the influence functions; its scale is TracIn's own (no Hessian, no 1/n). Self-influence
``sum_i lr_i |grad l(w_i, z)|^2`` flags mislabelled and rare examples.

Where the scope is made of Linear, Conv2d and BatchNorm layers (the default last layer above all), self-influence,
gradient norms and scores come from each layer's inputs and output gradients (`robustattr.influence.layers`): for
the last layer one forward pass per batch and checkpoint and no backward, ``|grad l|^2 = |p - y|^2 (|h|^2 + 1)``
and ``grad l(z_q) . grad l(z) = ((p_q - y_q) . (p - y)) (h_q . h + 1)``; no per-sample gradient is formed. Other
scopes batch per-sample gradients with torch.func (one vectorised pass per batch and checkpoint).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from robustattr.checkpoint import check_finite, checkpoint_config, classifier_from_checkpoint
from robustattr.errors import ConfigError, RobustAttrError
from robustattr.influence.base import Influence, InfluenceScores, PerSample, ce_per_sample
from robustattr.models.weights import load_weights, safe_torch_load


def checkpoint_learning_rate(content: dict, path: str | Path) -> float:
    """The learning rate of the first parameter group in a Lightning checkpoint's optimizer state."""
    try:
        return float(content["optimizer_states"][0]["param_groups"][0]["lr"])
    except (KeyError, IndexError, TypeError) as err:
        raise RobustAttrError(
            f"{path}: no optimizer state with a learning rate (TracIn needs train.py checkpoints, or give "
            "learning_rates)"
        ) from err


class TracIn(Influence):
    """TracInCP over ``checkpoints`` (train.py ``.ckpt`` files, read with ``weights_only=True``; plain state dicts
    need ``learning_rates``). ``fit(model, training_set)``: ``model`` gives the architecture and scope; the
    checkpoints give the weights. ``learning_rates``: overrides the ones read from the optimizer states."""

    name = "tracin"

    def __init__(
        self,
        checkpoints: Sequence[str | Path],
        scope="last",
        learning_rates: Sequence[float] | None = None,
        batch_size: int = 128,
        dtype: torch.dtype | str = torch.float32,
        trusted_prefixes: Sequence[str] = (),
        per_sample: PerSample = "auto",
    ) -> None:
        super().__init__(scope, 0.0, batch_size, dtype, per_sample)
        self.checkpoints = [str(c) for c in checkpoints]
        if len(self.checkpoints) < 2:
            raise ConfigError(
                f"TracIn needs the checkpoints a run saved during training (at least 2), got {len(self.checkpoints)}: "
                "keep several with ModelCheckpoint(save_top_k=-1) or every_n_epochs"
            )
        if learning_rates is not None and len(learning_rates) != len(self.checkpoints):
            raise ConfigError(f"TracIn: {len(learning_rates)} learning rates for {len(self.checkpoints)} checkpoints")
        self.given_learning_rates = None if learning_rates is None else [float(lr) for lr in learning_rates]
        self.trusted_prefixes = tuple(trusted_prefixes)
        self.models: list[nn.Module] = []
        self.learning_rates: list[float] = []

    @property
    def scale(self) -> float:
        return 1.0

    def _damping_recorded(self):
        return None

    def settings(self):
        return {**super().settings(), "checkpoints": self.checkpoints, "learning_rates": self.learning_rates}

    def _load(self, path: str, index: int) -> tuple[nn.Module, float]:
        if Path(path).suffix == ".safetensors":
            content = None
        else:
            content = safe_torch_load(path)
        if isinstance(content, dict) and checkpoint_config(content) is not None:
            net = classifier_from_checkpoint(content, path, self.trusted_prefixes).net
            lr = checkpoint_learning_rate(content, path) if self.given_learning_rates is None else None
        else:
            if self.given_learning_rates is None:
                raise RobustAttrError(f"{path}: weights only, no optimizer state: give TracIn learning_rates")
            net = copy.deepcopy(self.model)
            load_weights(net, path)
            check_finite(net.state_dict(), path)
            lr = None
        lr = self.given_learning_rates[index] if lr is None else lr
        if not lr > 0:
            raise RobustAttrError(f"{path}: learning rate {lr} is not positive")
        return net.eval().to(self.device, self.dtype), lr

    def _fit(self) -> None:
        self.models, self.learning_rates = [], []
        for i, path in enumerate(self.checkpoints):
            net, lr = self._load(path, i)
            names = {n for n, _ in net.named_parameters()}
            if not set(self.scope.names) <= names:
                raise RobustAttrError(f"{path}: the architecture differs from the model given to fit()")
            for n, p in net.named_parameters():
                p.requires_grad_(n in set(self.scope.names))
            self.models.append(net)
            self.learning_rates.append(lr)

    def _models(self):
        return self.models

    def _inverse(self, vectors):
        """TracIn has no Hessian: each checkpoint's block of the vector is weighted by its learning rate."""
        blocks = vectors.split(self.scope.size, dim=1)
        return torch.cat([lr * b for lr, b in zip(self.learning_rates, blocks, strict=True)], 1)

    # ---------------------------------------------------------------------------- the layer path (factored)
    def scores(self, x: torch.Tensor, y: torch.Tensor) -> InfluenceScores:
        if self.layers is None:
            return super().scores(x, y)
        self._require_fitted()
        self._check_fits(x, y)
        queries = [self.capture(x, y, model) for model in self.models]  # the queries' factors, once per checkpoint

        def rows(xb, yb):
            return sum(lr * self.capture(xb, yb, m).dots(q) for lr, m, q in zip(self.learning_rates, self.models,
                                                                                  queries, strict=True)).T  # fmt: skip

        return self._result(self._per_training_point(rows, len(x)).T.contiguous().to(self.dtype))

    def _self_rows(self, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        """(B,): ``sum_i lr_i |grad l(w_i, z)|^2`` from the layers' factors."""
        return sum(lr * self.capture(xb, yb, m).squared_norms() for lr, m in zip(self.learning_rates, self.models,
                                                                                   strict=True))  # fmt: skip

    def self_influence(self) -> InfluenceScores:
        if self.layers is None:
            return super().self_influence()
        self._require_fitted()
        values = self._per_training_point(lambda xb, yb: self._self_rows(xb, yb).unsqueeze(1), 1)[:, 0]
        return self._result(values.contiguous().to(self.dtype))

    def training_signals(self) -> dict[str, torch.Tensor]:
        """As `Influence.training_signals`, in one pass over the training set on the layer path (the gradient-norm
        signal is the square root of the self-influence there)."""
        if self.layers is None:
            return super().training_signals()
        self._require_fitted()

        def rows(xb, yb):
            with torch.no_grad():
                loss = ce_per_sample(self.model(xb.to(self.device, self.dtype)), yb.to(self.device))
            own = self._self_rows(xb, yb)
            return torch.stack([own.to(loss.dtype), loss], 1)

        values = self._per_training_point(rows, 2).to(self.dtype)
        own = self._result(values[:, 0].contiguous()).values
        return {"self_influence": own, "loss": values[:, 1].contiguous(), "gradient_norm": own.sqrt()}

    def _weighted_norm(self, g):
        """TracIn's gradient-norm signal: ``sqrt(sum_i lr_i |grad l(w_i, z)|^2)`` over the checkpoints."""
        blocks = g.split(self.scope.size, dim=1)
        return (
            torch.stack([lr * b.pow(2).sum(1) for lr, b in zip(self.learning_rates, blocks, strict=True)]).sum(0).sqrt()
        )
