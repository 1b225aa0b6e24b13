"""RobustClassifier: a network, cross-entropy plus a list of objective terms, accuracy metrics.

It knows nothing of attacks, callbacks or loggers: validation-time attacks live in callbacks, which reach the
model only through its public ``forward`` (images in [0, 1] -> logits).
"""

from __future__ import annotations

from typing import Any, Literal

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.cli import LRSchedulerCallable, OptimizerCallable
from pytorch_lightning.utilities import rank_zero_warn
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from robustattr.attacks.surrogate import is_piecewise_linear
from robustattr.errors import ConfigError
from robustattr.models.weights import load_weights
from robustattr.regularizers.base import ObjectiveTerm

try:  # set by LightningCLI while it instantiates the model from a config
    from pytorch_lightning.core.mixins.hparams_mixin import _given_hyperparameters
except ImportError:  # pragma: no cover - older Lightning
    _given_hyperparameters = None


class RobustClassifier(pl.LightningModule):
    """Image classifier trained on ``ce_weight * CE + sum(term.weight * term(net, x, y))``.

    Args:
        net: the network (images in [0, 1] -> logits); it normalises its input itself.
        terms: objective terms added to the loss (regularisers, adversarial objectives); none by default.
        optimizer: optimizer factory, e.g. ``{class_path: torch.optim.SGD, init_args: {lr: 0.1}}`` in YAML.
        scheduler: optional learning-rate scheduler factory, stepped every ``scheduler_interval``.
        ce_weight: weight of the clean cross-entropy (0 for objectives that replace it, such as PGD-AT).
        label_smoothing: label smoothing of the cross-entropy.
        num_classes: number of classes; read from ``net.num_classes`` when not given.
        weights: initialise the network from a local file (a train.py checkpoint, a state dict, safetensors),
            e.g. to fine-tune a ReLU model with softplus activations; loaded with ``weights_only=True``.
        nonfinite: what a NaN or infinite training loss does: ``"raise"`` stops with an error naming the term
            and the step; ``"skip"`` warns and skips the parameter update (single process only).

    Logs ``train/loss``, ``train/ce``, ``train/acc``, ``train/reg/<name>`` per term, ``val/loss``, ``val/acc``,
    ``test/loss``, ``test/acc``.
    """

    def __init__(
        self,
        net: nn.Module,
        terms: list[ObjectiveTerm] | None = None,
        optimizer: OptimizerCallable = torch.optim.Adam,
        scheduler: LRSchedulerCallable | None = None,
        scheduler_interval: Literal["epoch", "step"] = "epoch",
        ce_weight: float = 1.0,
        label_smoothing: float = 0.0,
        num_classes: int | None = None,
        weights: str | None = None,
        nonfinite: Literal["raise", "skip"] = "raise",
    ) -> None:
        super().__init__()
        # From a config (LightningCLI) the hyper-parameters are the config itself, plain data that rebuilds the
        # model; built in Python, the module arguments are objects, already saved in the state dict.
        from_config = _given_hyperparameters is not None and _given_hyperparameters.get() is not None
        # logger=False: train.py logs the whole resolved config (model, data, trainer) to the logger instead.
        self.save_hyperparameters(
            ignore=None if from_config else ["net", "terms", "optimizer", "scheduler"], logger=False
        )
        self.net = net
        if weights:
            load_weights(self.net, weights)
        self.nonfinite = nonfinite
        self.terms = nn.ModuleList(terms or [])
        names = [term.name for term in self.terms]
        if len(set(names)) != len(names):
            raise ConfigError(f"RobustClassifier: objective terms need distinct names, got {names}")
        if ce_weight < 0:
            raise ConfigError(f"RobustClassifier: ce_weight must be non-negative, got {ce_weight}")
        self.num_classes = num_classes or getattr(net, "num_classes", None)
        if not self.num_classes:
            raise ConfigError(
                f"RobustClassifier: cannot tell the number of classes of {type(net).__name__}; set num_classes"
            )
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.scheduler_interval = scheduler_interval
        self.ce_weight = ce_weight
        self.label_smoothing = label_smoothing
        self.train_acc = MulticlassAccuracy(self.num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(self.num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(self.num_classes, average="micro")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        data_classes = getattr(datamodule, "num_classes", None)
        if isinstance(data_classes, int) and data_classes != self.num_classes:
            raise ConfigError(
                f"the model predicts {self.num_classes} classes but {type(datamodule).__name__} has "
                f"{data_classes}: set num_classes of the net to {data_classes}"
            )
        if stage == "fit" and self._trainer is not None:
            self._check_terms(str(self.trainer.precision))
            if self.nonfinite == "skip" and self.trainer.world_size > 1:
                raise ConfigError(
                    "model.nonfinite: skip is not supported under DDP (a skipped step on one process would leave "
                    "the others waiting in the gradient all-reduce); use raise"
                )

    def _check_terms(self, precision: str) -> None:
        second_order = [t.name for t in self.terms if t.second_order]
        if second_order and precision.startswith("16"):
            raise ConfigError(
                f"precision {precision!r} (fp16 autocast) with the second-order term(s) {second_order}: fp16 "
                "makes double backward produce NaNs. Use --trainer.precision bf16-mixed or 32-true"
            )
        if is_piecewise_linear(self.net):
            for term in self.terms:
                if term.curvature:
                    rank_zero_warn(
                        f"{term.name} on a piecewise-linear (ReLU) network: {term.piecewise_linear_note()}. "
                        "Use a smooth activation (e.g. torch.nn.Softplus with a beta) to penalise the network's "
                        "own curvature too."
                    )

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor | None:
        x, y = batch
        if any(term.uses_clean_forward for term in self.terms):
            x = x.detach().requires_grad_(True)  # terms reuse this forward for their input gradients
        logits = self(x)
        ce = F.cross_entropy(logits, y, label_smoothing=self.label_smoothing)
        loss = self.ce_weight * ce
        epoch = self.current_epoch + batch_idx / max(1, self._batches_per_epoch())
        values = {}
        for term in self.terms:
            term.epoch = epoch
            args = (self.net, x, y, logits) if term.uses_clean_forward else (self.net, x, y)
            values[term.name] = term(*args)
            self.log(f"train/reg/{term.name}", values[term.name].detach())
            loss = loss + term.current_weight * values[term.name]
        if values and not torch.isfinite(loss):  # one sync per step, and only with terms
            return self._nonfinite(values, loss)
        self.train_acc(logits.detach(), y)
        self.log("train/loss", loss.detach(), prog_bar=True)
        self.log("train/ce", ce.detach())
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True)
        return loss

    def _batches_per_epoch(self) -> int:
        batches = self.trainer.num_training_batches if self._trainer is not None else 1
        return int(batches) if isinstance(batches, int | float) and batches != float("inf") else 1

    def _nonfinite(self, values: dict[str, torch.Tensor], loss: torch.Tensor) -> None:
        bad = [f"{name}={value.item()}" for name, value in values.items() if not torch.isfinite(value)]
        where = f"at step {self.global_step} (epoch {self.current_epoch})"
        message = f"non-finite training loss {loss.item()} {where}: " + (
            f"penalty {', '.join(bad)}" if bad else "the penalties are finite, the cross-entropy is not"
        )
        if self.nonfinite == "raise":
            raise FloatingPointError(message + " (set model.nonfinite: skip to skip such steps)")
        rank_zero_warn(message + "; step skipped")
        return None

    def _evaluate(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str, metric: MulticlassAccuracy) -> None:
        x, y = batch
        logits = self(x)
        self.log(f"{stage}/loss", F.cross_entropy(logits, y), sync_dist=True)
        metric(logits, y)
        self.log(f"{stage}/acc", metric, prog_bar=True)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "val", self.val_acc)

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "test", self.test_acc)

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x = batch[0] if isinstance(batch, list | tuple) else batch
        return self(x).argmax(dim=1)

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(self.parameters())
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": self.scheduler_interval}}
