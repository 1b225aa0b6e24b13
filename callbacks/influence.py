"""Noisy labels while training: the training points of highest self-influence, logged every few epochs."""

from __future__ import annotations

import time

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import WandbLogger
from pytorch_lightning.utilities import rank_zero_info
from torch import nn

from robustattr.data.base import dataset_labels
from robustattr.errors import ConfigError
from robustattr.influence import distributed as D
from robustattr.influence.analysis import found_curve
from robustattr.influence.data import TrainingSet
from robustattr.influence.layers import LayerGradients
from robustattr.viz import image_array


class SelfInfluenceMonitor(pl.Callback):
    """Every ``every_n_epochs`` validation epochs, the TracIn self-influence of every training point over the last
    linear layer, accumulated over the run's own snapshots: at each run of the callback ``t`` (a checkpoint of
    TracInCP), ``lr_t |grad_theta l(w_t, z)|^2`` is added for each training point ``z``, with ``lr_t`` the
    optimizer's current learning rate and theta the last ``nn.Linear``; for it the squared per-sample gradient
    norm has the closed form ``|softmax - onehot|^2 (|a|^2 + 1)`` (``a`` the layer's input;
    `robustattr.influence.layers`), so one forward pass over the training set (eval mode, no augmentation, the labels
    it is trained on, the DataModule's loader workers) is the whole cost. The split is decoded once per fit:
    where this process's share of it takes at most ``cache_bytes`` (default 1 GiB; 0 turns it off) as the tensors
    the evaluation transform gives, the first run reads it with the loader workers and keeps it, and later runs
    only run the network (an image folder's decoding is otherwise repeated every run, and its loader workers then
    compete with the network for the cores). ``batch_size``: default the DataModule's ``eval_batch_size`` (what
    validation runs at on this device), and on a CPU at most as many images as keep the network's largest
    activation of one batch within 8 MiB (``CPU_BATCH_BYTES``), at least 16: batches that fall out of a CPU's caches
    run slower per image (a 32x32 SmallCNN forward: 0.81 s at 64, 1.0 s at 256, 2.1 s at 512 on 2400 images on 2
    cores). After the
    first run the ranking is the gradient norm's; later runs add the history TracIn sums over.

    Logs ``train/self_influence_table`` (W&B, rank 0): the ``top`` training images with index, training label,
    original label where a flip was planted, and score; ``train/self_influence/found_at_10`` and ``..._20`` (the
    share of the planted flips among the top 10% and 20%) when the DataModule planted label noise; and
    ``time/self_influence`` (seconds), printed with its share of the last training epoch. Under DDP each
    process takes a shard of the training set and the scores are gathered."""

    def __init__(
        self, every_n_epochs: int = 5, top: int = 16, batch_size: int | None = None, cache_bytes: int = 2**30
    ) -> None:
        super().__init__()
        if every_n_epochs < 1 or top < 1 or (batch_size is not None and batch_size < 1):
            raise ConfigError("SelfInfluenceMonitor: every_n_epochs, top and batch_size must be positive")
        if cache_bytes < 0:
            raise ConfigError(f"SelfInfluenceMonitor: cache_bytes must be non-negative (0: none), got {cache_bytes}")
        self.every_n_epochs = every_n_epochs
        self.top = top
        self.batch_size = batch_size
        self.cache_bytes = cache_bytes
        self._cache: tuple | None = None  # (datamodule, shard indices, images, labels) of this fit
        self.scores: torch.Tensor | None = None  # accumulated TracIn self-influence (n,)
        self.snapshots = 0
        self.last_seconds: float | None = None
        self._epoch_start: float | None = None
        self._epoch_seconds: float | None = None

    # TracIn's sum over snapshots is this callback's state: a resumed run continues it
    def state_dict(self) -> dict:
        return {"scores": self.scores, "snapshots": self.snapshots}

    def load_state_dict(self, state_dict: dict) -> None:
        self.scores = state_dict.get("scores")
        self.snapshots = int(state_dict.get("snapshots", 0))

    def on_fit_start(self, trainer, pl_module) -> None:
        self._cache = None  # a new fit may run on other data

    def on_fit_end(self, trainer, pl_module) -> None:
        self._cache = None  # the memory goes back

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._epoch_start = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self._epoch_start is not None:
            self._epoch_seconds = time.perf_counter() - self._epoch_start

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or trainer.fast_dev_run or trainer.state.fn != "fit":
            return
        if (trainer.current_epoch + 1) % self.every_n_epochs != 0:
            return
        self.run(trainer, pl_module)

    @staticmethod
    def _last_linear(module: nn.Module) -> nn.Linear:
        linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
        if not linears:
            raise ConfigError("SelfInfluenceMonitor: the network has no nn.Linear layer (its last layer is scored)")
        return linears[-1]

    def _dataset(self, trainer: pl.Trainer):
        datamodule = trainer.datamodule
        if datamodule is None or not hasattr(datamodule, "plain_split"):
            raise ConfigError("SelfInfluenceMonitor: needs a robustattr DataModule (plain_split of the training set)")
        return datamodule, datamodule.plain_split("train")

    CPU_BATCH_BYTES = 8 * 2**20

    def _default_batch_size(self, pl_module, datamodule, dataset, indices: torch.Tensor) -> int:
        """The DataModule's ``eval_batch_size``; on a CPU at most ``CPU_BATCH_BYTES`` of the largest activation
        (measured by one forward of one image, in eval mode, without grad), at least 16."""
        size = getattr(datamodule, "eval_batch_size", None) or 256
        if pl_module.device.type != "cpu" or not len(indices):
            return size
        largest = [0]

        def hook(module, inputs, output):
            if isinstance(output, torch.Tensor):
                largest[0] = max(largest[0], output.nbytes)

        image = torch.as_tensor(dataset[int(indices[0])][0])[None].to(pl_module.dtype)
        handles = [m.register_forward_hook(hook) for m in pl_module.modules() if not list(m.children())]
        was_training = pl_module.training
        pl_module.eval()
        try:
            with torch.no_grad():
                pl_module(image)
        finally:
            pl_module.train(was_training)
            for handle in handles:
                handle.remove()
        return max(1, min(size, max(16, self.CPU_BATCH_BYTES // max(largest[0], 1))))

    def _split(self, datamodule, dataset, indices: torch.Tensor, workers: int, batch_size: int):
        """The training points at ``indices`` as (images, labels) tensors, read once per fit where they fit in
        ``cache_bytes``; None where they do not (the pass then streams them from the loader)."""
        cache = self._cache
        if cache is not None and cache[0] is datamodule and torch.equal(cache[1], indices):
            return cache[2], cache[3]
        self._cache = None
        first = torch.as_tensor(dataset[int(indices[0])][0]) if len(indices) else None
        if first is None or first.nbytes * len(indices) > self.cache_bytes:
            return None
        parts = list(TrainingSet(dataset, workers).batches(batch_size, indices))
        images, labels = torch.cat([x for _, x, _ in parts]), torch.cat([y for _, _, y in parts])
        self._cache = (datamodule, indices.clone(), images, labels)
        return images, labels

    def _squared_norms(self, pl_module, dataset, indices: torch.Tensor, workers: int = 0, batch_size=None, split=None):
        """``|grad l(w, z)|^2`` over the last Linear layer for the training points at ``indices`` (their images and
        labels ``split`` where already read), on the layer path of robustattr.influence (one forward pass per
        batch, no backward where that layer gives the logits)."""
        layer = self._last_linear(pl_module)
        name = next(n for n, m in pl_module.named_modules() if m is layer)
        path = LayerGradients([name])
        size = batch_size or self.batch_size or 256
        if split is None:
            # TrainingSet's loader draws nothing from the global RNG: the run's shuffling stays as without the monitor
            batches = ((x, y) for _, x, y in TrainingSet(dataset, workers).batches(size, indices))
        else:
            batches = ((split[0][s : s + size], split[1][s : s + size]) for s in range(0, len(split[0]), size))
        parts = []
        was_training = pl_module.training
        pl_module.eval()
        try:
            for x, y in batches:
                batch = path.capture(pl_module, x.to(pl_module.device, pl_module.dtype), y.to(pl_module.device))
                parts.append(batch.squared_norms().float())
        finally:
            pl_module.train(was_training)
        return torch.cat(parts) if parts else torch.zeros(0, device=pl_module.device)

    def run(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> torch.Tensor:
        start = time.perf_counter()
        datamodule, dataset = self._dataset(trainer)
        n = len(dataset)
        local = D.shard(n)
        workers = datamodule.workers() if hasattr(datamodule, "workers") else 0
        batch_size = self.batch_size or self._default_batch_size(pl_module, datamodule, dataset, local)
        split = self._split(datamodule, dataset, local, workers, batch_size)
        norms = self._squared_norms(pl_module, dataset, local, workers, batch_size, split)
        values = D.gather_rows(norms.double().unsqueeze(1), local.to(norms.device), n)[:, 0].cpu()
        lr = float(trainer.optimizers[0].param_groups[0]["lr"]) if trainer.optimizers else 1.0
        if self.scores is None or len(self.scores) != n:
            self.scores = torch.zeros(n, dtype=torch.float64)
            self.snapshots = 0
        self.scores = self.scores + lr * values
        self.snapshots += 1
        flips = datamodule.flipped_labels() if hasattr(datamodule, "flipped_labels") else {}
        if flips:
            flipped = torch.zeros(n, dtype=torch.bool)
            flipped[list(flips)] = True
            found = found_curve(self.scores, flipped, fractions=(0.1, 0.2))["found_at"]
            pl_module.log("train/self_influence/found_at_10", found["10"], sync_dist=False)
            pl_module.log("train/self_influence/found_at_20", found["20"], sync_dist=False)
        if trainer.is_global_zero:
            self._log_table(trainer, dataset, dataset_labels(dataset), flips)
        self.last_seconds = time.perf_counter() - start
        pl_module.log("time/self_influence", self.last_seconds, sync_dist=False)
        share = ""
        if self._epoch_seconds:
            ratio = self.last_seconds / self._epoch_seconds
            amortised = ratio / self.every_n_epochs
            share = (f", {ratio:.1%} of the last training epoch ({amortised:.1%} of the training time at every "
                     f"{self.every_n_epochs} epochs)")  # fmt: skip
        rank_zero_info(
            f"SelfInfluenceMonitor: {self.last_seconds:.2f} s on {n} training points{share} "
            f"(epoch {trainer.current_epoch}, {self.snapshots} snapshot(s))"
        )
        return self.scores

    def _log_table(self, trainer, dataset, labels, flips) -> None:
        loggers = [logger for logger in trainer.loggers if isinstance(logger, WandbLogger)]
        if not loggers:
            return
        import wandb

        top = self.scores.topk(min(self.top, len(self.scores)))
        rows = []
        for index, score in zip(top.indices.tolist(), top.values.tolist(), strict=True):
            image = image_array(torch.as_tensor(dataset[index][0]))
            original = flips[index][0] if index in flips else None
            rows.append([wandb.Image(image), index, int(labels[index]), original, index in flips, score])
        columns = ["image", "index", "label", "original label", "flipped", "self-influence"]
        for logger in loggers:
            logger.log_table(key="train/self_influence_table", columns=columns, data=rows)
