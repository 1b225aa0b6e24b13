"""RobustClassifier: a network, cross-entropy plus a list of objective terms, accuracy metrics.

It knows nothing of attacks, callbacks or loggers: validation-time attacks live in callbacks, which reach the
model only through its public ``forward`` (images in [0, 1] -> logits).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Literal

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.utilities import rank_zero_warn
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torchmetrics.classification import MulticlassAccuracy

from robustattr.data.stats import check_net_fits_data
from robustattr.errors import ConfigError, NonFiniteError
from robustattr.lightning_private import built_from_config
from robustattr.models.activations import is_piecewise_linear
from robustattr.models.weights import load_weights
from robustattr.regularizers.base import ObjectiveTerm

# The same types as pytorch_lightning.cli's (so configs name optimizers and schedulers as for any LightningCLI),
# written here so that building or loading a model does not import the CLI.
OptimizerCallable = Callable[[Iterable], torch.optim.Optimizer]
LRSchedulerCallable = Callable[
    [torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler | torch.optim.lr_scheduler.ReduceLROnPlateau
]


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
        nonfinite: what a NaN or infinite training loss does. ``"raise"`` stops training with an error naming the
            first such step and which parts (the cross-entropy, a term) were not finite. The check costs no host
            synchronisation per step: each step records its finiteness on the device, and the record is read every
            ``nonfinite_check_every`` steps, at the last step of each epoch and before validation (so no checkpoint is
            saved from a diverged run). ``"skip"`` decides every step (one host sync and, under DDP, one small
            all-gather, so that every process skips together) and skips the update, BatchNorm statistics
            included, with a warning; after ``max_consecutive_skips`` skips in a row it stops as ``"raise"`` does.
            (A skipped step still counts as a step for Lightning's step counter and step-wise schedulers.) Either
            way a checkpoint with non-finite weights is never written.
        nonfinite_check_every: steps between reads of the device-side record (``"raise"``).
        max_consecutive_skips: consecutive skipped steps after which ``"skip"`` gives up.

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
        nonfinite_check_every: int = 50,
        max_consecutive_skips: int = 10,
    ) -> None:
        super().__init__()
        # From a config (LightningCLI) the hyper-parameters are the config itself, plain data that rebuilds the
        # model; built in Python, the module arguments are objects, already saved in the state dict.
        from_config = built_from_config()
        # logger=False: train.py logs the whole resolved config (model, data, trainer) to the logger instead.
        self.save_hyperparameters(
            ignore=None if from_config else ["net", "terms", "optimizer", "scheduler"], logger=False
        )
        self.net = net
        if weights:
            load_weights(self.net, weights)
        if nonfinite_check_every < 1 or max_consecutive_skips < 1:
            raise ConfigError(
                "RobustClassifier: nonfinite_check_every and max_consecutive_skips must be at least 1, got "
                f"{nonfinite_check_every} and {max_consecutive_skips}"
            )
        self.nonfinite = nonfinite
        self.nonfinite_check_every = nonfinite_check_every
        self.max_consecutive_skips = max_consecutive_skips
        self._first_bad_step: torch.Tensor | None = None  # device-side record of the first non-finite step
        self._bad_parts: torch.Tensor | None = None  # which parts of the loss were non-finite at that step
        self._part_names: list[str] = []
        self._consecutive_skips = 0
        self._skip_update = False
        self._norm_stats: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.terms = nn.ModuleList(terms or [])
        names = [term.name for term in self.terms]
        if len(set(names)) != len(names):
            raise ConfigError(f"RobustClassifier: objective terms need distinct names, got {names}")
        if ce_weight < 0:
            raise ConfigError(f"RobustClassifier: ce_weight must be non-negative, got {ce_weight}")
        if ce_weight == 0 and not self.terms:
            raise ConfigError("RobustClassifier: ce_weight is 0 and there are no terms: nothing would be trained")
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
        if hasattr(datamodule, "sample_images"):  # channels and normalisation against a sample of the data
            split = "val" if stage in ("fit", "validate") else "test"
            for warning in check_net_fits_data(self.net, datamodule.sample_images(16, split=split)):
                rank_zero_warn(warning)
        if stage == "fit" and self._trainer is not None:
            self._check_terms(str(self.trainer.precision))

    def _check_terms(self, precision: str) -> None:
        second_order = [t.name for t in self.terms if t.second_order]
        if second_order and precision.startswith("16"):
            raise ConfigError(
                f"precision {precision!r} (fp16 autocast) with the second-order term(s) {second_order}: fp16 "
                "makes double backward produce NaNs. Use --trainer.precision bf16-mixed or 32-true"
            )
        problems = [problem for term in self.terms if (problem := term.precision_problem(precision, self.net))]
        if problems:
            raise ConfigError("; ".join(problems))
        if is_piecewise_linear(self.net):
            for term in self.terms:
                if term.curvature:
                    rank_zero_warn(
                        f"{term.name} on a piecewise-linear (ReLU) network: {term.piecewise_linear_note()}. "
                        "Use a smooth activation (e.g. torch.nn.Softplus with a beta) to penalise the network's "
                        "own curvature too."
                    )

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        if self.nonfinite == "skip":  # a skipped step must not move BatchNorm statistics either
            self._norm_stats = [
                (b, b.clone()) for m in self.net.modules() if isinstance(m, _BatchNorm) for b in m.buffers()
            ]
        for term in self.terms:  # adversaries are crafted against the network as it is at the start of the step
            term.prepare(self.net, x, y)
        reuse = any(term.uses_clean_forward for term in self.terms)
        logits, values, loss = None, {}, 0.0
        if self.ce_weight > 0 or reuse:  # with ce_weight 0 and no term reusing it, the clean forward is skipped
            if reuse:
                x = x.detach().requires_grad_(True)  # terms reuse this forward for their input gradients
            logits = self(x)
            ce = F.cross_entropy(logits, y, label_smoothing=self.label_smoothing)
            values["cross-entropy"] = ce
            loss = self.ce_weight * ce
        epoch = self.current_epoch + batch_idx / max(1, self._batches_per_epoch())
        for term in self.terms:
            term.epoch = epoch
            args = (self.net, x, y, logits) if term.uses_clean_forward else (self.net, x, y)
            values[term.name] = term(*args)
            self.log(f"train/reg/{term.name}", values[term.name].detach())
            if term.training_logits is not None:
                accuracy = (term.training_logits.argmax(dim=1) == y).float().mean()
                self.log(f"train/{term.name}/acc", accuracy, on_step=False, on_epoch=True)
            loss = loss + term.current_weight * values[term.name]
        values["total loss"] = loss
        finite = torch.stack([torch.isfinite(v.detach()).all() for v in values.values()])
        if self.nonfinite == "skip":
            self._skip_update = not self._decide_step(finite, list(values))
            if self._skip_update:
                return loss  # backward runs on every process (DDP needs it); optimizer_step skips the update
        else:
            self._record(finite, list(values))
            if self._check_due(batch_idx):
                self.check_finite_training()
        self.log("train/loss", loss.detach(), prog_bar=True)
        if logits is not None:
            self.train_acc(logits.detach(), y)
            self.log("train/ce", values["cross-entropy"].detach())
            self.log("train/acc", self.train_acc, on_step=False, on_epoch=True)
        return loss

    def _batches_per_epoch(self) -> int:
        batches = self.trainer.num_training_batches if self._trainer is not None else 1
        return int(batches) if isinstance(batches, int | float) and batches != float("inf") else 1

    # -- non-finite losses ---------------------------------------------------------------------------------------

    def _gather(self, record: torch.Tensor) -> torch.Tensor:
        """(processes, n) rows of ``record`` from every process (one row without a process group)."""
        gathered = self.all_gather(record) if self._trainer is not None else record
        return gathered.reshape(-1, record.numel())

    def _record(self, finite: torch.Tensor, names: list[str]) -> None:
        """Remember, on the device and without synchronising, the first step whose loss was not finite."""
        self._part_names = names
        if self._first_bad_step is None or self._first_bad_step.device != finite.device:
            self._first_bad_step = torch.full((), -1.0, dtype=torch.float64, device=finite.device)
            self._bad_parts = torch.zeros(finite.shape, dtype=torch.bool, device=finite.device)
        newly = ~finite.all() & (self._first_bad_step < 0)
        self._first_bad_step = torch.where(newly, float(self.global_step), self._first_bad_step)
        self._bad_parts = torch.where(newly, ~finite, self._bad_parts)

    def _message(self, step: int, bad: list[str]) -> str:
        epoch = f" (epoch {self.current_epoch})" if self._trainer is not None else ""
        terms = [name for name in bad if name not in ("cross-entropy", "total loss")]
        if "cross-entropy" in bad:
            what = "the cross-entropy is not finite: the network's outputs are NaN or infinite (a diverging run: lower "
            what += "the learning rate, or look for NaN in the data)"
            if terms:
                what += f", and so are the penalties {', '.join(terms)}"
        elif terms:
            what = f"the penalty {', '.join(terms)} is not finite (the cross-entropy is)"
        else:
            what = "the weighted sum of finite parts overflowed"
        return f"non-finite training loss at step {step}{epoch}: {what}"

    def check_finite_training(self) -> None:
        """Read the device-side record of every process (one collective) and stop training if any step so far
        had a non-finite loss. Every process takes the same decision at the same point."""
        if self.nonfinite != "raise" or self._first_bad_step is None:
            return
        record = torch.cat([self._first_bad_step.view(1), self._bad_parts.to(torch.float64)])
        rows = self._gather(record)
        bad_rows = rows[rows[:, 0] >= 0]
        if len(bad_rows):
            names = self._part_names
            mask = bad_rows[:, 1:].amax(dim=0) > 0
            error = NonFiniteError(
                self._message(int(bad_rows[:, 0].min()), [n for n, m in zip(names, mask.tolist(), strict=True) if m])
                + " (model.nonfinite: skip skips such steps instead)"
            )
            error.collective = True
            raise error

    def _decide_step(self, finite: torch.Tensor, parts: list[str]) -> bool:
        """``skip``: whether this step may update the weights, decided by all processes together."""
        rows = self._gather(finite.to(torch.float64))
        if bool(rows.min() > 0):
            self._consecutive_skips = 0
            return True
        self._consecutive_skips += 1
        bad = [n for n, ok in zip(parts, (rows.amin(dim=0) > 0).tolist(), strict=True) if not ok]
        message = self._message(self.global_step, bad)
        if self._consecutive_skips > self.max_consecutive_skips:
            error = NonFiniteError(
                f"{message}; {self._consecutive_skips} consecutive steps skipped "
                f"(model.max_consecutive_skips: {self.max_consecutive_skips}): the run has diverged"
            )
            error.collective = True
            raise error
        rank_zero_warn(f"{message}; update skipped")
        return False

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None) -> None:
        """``skip``: run the step's closure (forward, backward), then update only if the step was finite. (Lightning
        refuses a training step that returns None under DDP, so the skip happens here, on every process.)"""
        if self.nonfinite != "skip" or optimizer_closure is None:
            return super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        optimizer_closure()
        if self._skip_update:
            optimizer.zero_grad()
            with torch.no_grad():  # after backward, which reads the statistics the forward saved
                for buffer, saved in self._norm_stats:
                    buffer.copy_(saved)
            return None
        optimizer.step()
        return None

    def _check_due(self, batch_idx: int) -> bool:
        """Whether this step reads the record: every ``nonfinite_check_every`` steps, at the last step of an epoch,
        before a validation (so no validation metric or checkpoint comes from a diverged run) and at the last step
        of training. The read is a collective, so it happens here, where all processes are in step; not in epoch
        hooks, where rank-0-only callbacks (progress bars) already synchronise metrics, in another order."""
        if (batch_idx + 1) % self.nonfinite_check_every == 0 or self._trainer is None:
            return True
        trainer = self.trainer
        batches = trainer.num_training_batches
        if isinstance(batches, int | float) and batches != float("inf") and batch_idx + 1 >= batches:
            return True
        every = trainer.val_check_batch
        if isinstance(every, int | float) and every != float("inf") and every > 0 and (batch_idx + 1) % int(every) == 0:
            return True
        return 0 < trainer.max_steps <= self.global_step + 1

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Never write a checkpoint with NaN or infinite weights."""
        for name, tensor in checkpoint.get("state_dict", {}).items():
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                error = NonFiniteError(
                    f"refused to save a checkpoint at step {self.global_step}: the weight '{name}' holds NaN or "
                    "infinite values (the run diverged)"
                )
                error.collective = True  # the weights are the same on every process
                raise error

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
