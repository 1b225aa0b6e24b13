"""What every validation-time attack callback shares.

- A fixed, seeded subset of the validation (or test) set, the same every epoch and every run, so numbers
  compare across epochs and runs.
- The subset is cut into fixed chunks of ``batch_size`` samples; chunk c is attacked with seed ``seed + c``
  and whole chunks are dealt to the DDP processes in turn, so every sample gets the same random start
  whatever the number of processes, and the synced metrics equal a single process's.
- Under DDP every process measures with rank 0's BatchNorm statistics (`rank_zero_buffers`): the network a
  checkpoint saves, so two processes give one process's numbers on that checkpoint.
- Work runs under `gradient_context`: gradients on even inside ``trainer.validate`` / ``trainer.test``
  (inference mode), modules in eval mode (BatchNorm statistics frozen), parameters frozen (their ``.grad``
  untouched), everything restored afterwards. The model is reached only through its public forward.
- Metrics are torchmetrics collections, one per setting (an attack at an epsilon), updated together and synced
  across processes (sum and count states); every process logs the same synced value (so ModelCheckpoint can
  monitor it on any rank); media go out from rank 0 only.
- Each run prints and logs its own cost in seconds.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytorch_lightning as pl
import torch
import torch.distributed as dist
from pytorch_lightning.loggers import WandbLogger
from pytorch_lightning.utilities import rank_zero_info
from torchmetrics import Metric, MetricCollection

from robustattr.attacks.base import gradient_context
from robustattr.data.base import seeded_subset
from robustattr.errors import ConfigError


@contextmanager
def rank_zero_buffers(module: torch.nn.Module) -> Iterator[None]:
    """Under DDP, the processes' BatchNorm running statistics differ after training steps (each process updates
    them with its own batch; DDP broadcasts rank 0's only at the start of the next training forward). Inside,
    every process uses rank 0's buffers, the ones a checkpoint saves, so each chunk is measured on the network
    that will be saved and audited; each process's own buffers are put back afterwards."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        yield
        return
    buffers = [b for b in module.buffers() if b.numel()]
    saved = [b.clone() for b in buffers]
    with torch.no_grad():
        for buffer in buffers:
            dist.broadcast(buffer, src=0)
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in zip(buffers, saved, strict=True):
                buffer.copy_(value)


def eval_dataset(trainer: pl.Trainer, stage: str) -> torch.utils.data.Dataset:
    loaders = trainer.val_dataloaders if stage == "val" else trainer.test_dataloaders
    if isinstance(loaders, list | tuple):
        loaders = loaders[0]
    if loaders is None:
        raise ConfigError(f"no {stage} dataloader to take the attack subset from")
    return loaders.dataset


class AttackCallback(pl.Callback):
    """Base class of the validation-time attack callbacks.

    Args:
        num_samples: size of the fixed subset (the whole set if smaller).
        batch_size: samples per chunk (and per attack call).
        every_n_epochs: during fit, run after every n-th validation epoch; always under validate/test.
        seed: seed of the subset and of the attacks' random starts.
    """

    short_name = "attack"

    def __init__(self, num_samples: int = 256, batch_size: int = 64, every_n_epochs: int = 1, seed: int = 0) -> None:
        super().__init__()
        if num_samples < 1 or batch_size < 1 or every_n_epochs < 1:
            raise ConfigError(f"{type(self).__name__}: num_samples, batch_size, every_n_epochs must be positive")
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.every_n_epochs = every_n_epochs
        self.seed = seed
        self._subsets: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self.last_seconds: float | None = None

    # -- what a subclass defines -------------------------------------------------------------------------------
    def build_metrics(self) -> dict[str, MetricCollection]:
        """The metrics, one collection per setting updated together, keyed by the setting's logged prefix without
        the stage; each collection's ``prefix`` gives its names (``adv/bim_linf8/`` + ``acc``)."""
        raise NotImplementedError

    def process(self, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, seed: int) -> None:
        """Attack one chunk and update the metrics."""
        raise NotImplementedError

    # -- machinery ---------------------------------------------------------------------------------------------
    def metrics(self) -> dict[str, MetricCollection]:
        if getattr(self, "_metrics", None) is None:
            self._metrics = self.build_metrics()
        return self._metrics

    def named_metrics(self) -> Iterator[tuple[str, Metric]]:
        """Every metric by its logged name without the stage."""
        for collection in self.metrics().values():
            yield from collection.items(keep_base=False, copy_state=False)

    def subset(self, trainer: pl.Trainer, stage: str) -> tuple[torch.Tensor, torch.Tensor]:
        dataset = eval_dataset(trainer, stage)
        key = (stage, id(dataset))
        if key not in self._subsets:
            self._subsets[key] = seeded_subset(dataset, self.num_samples, self.seed)
        return self._subsets[key]

    def chunks(self, n: int, rank: int, world: int) -> Iterator[tuple[int, slice]]:
        for c, start in enumerate(range(0, n, self.batch_size)):
            if c % world == rank:
                yield c, slice(start, min(start + self.batch_size, n))

    def _due(self, trainer: pl.Trainer) -> bool:
        # fast_dev_run is a smoke test of the training code: like Lightning's checkpointing and logging, these
        # validation extras (which cost seconds to minutes) step aside.
        if trainer.sanity_checking or trainer.fast_dev_run:
            return False
        if not trainer.training and trainer.state.fn != "fit":
            return True  # trainer.validate / trainer.test
        return (trainer.current_epoch + 1) % self.every_n_epochs == 0

    def run(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> dict[str, torch.Tensor]:
        start = time.perf_counter()
        collections = self.metrics().values()
        with torch.inference_mode(False):  # states made under validate's inference mode could not be updated
            for collection in collections:
                collection.to(pl_module.device)
                collection.reset()
        x_all, y_all = self.subset(trainer, stage)
        with gradient_context(pl_module), rank_zero_buffers(pl_module):
            for c, part in self.chunks(len(x_all), trainer.global_rank, trainer.world_size):
                x = x_all[part].to(pl_module.device).clone()  # fresh tensors, whatever the caller's mode
                y = y_all[part].to(pl_module.device).clone()
                self.process(pl_module, x, y, self.seed + c)
        values = {name: value for collection in collections for name, value in collection.compute().items()}
        for name, value in values.items():
            pl_module.log(f"{stage}/{name}", value, sync_dist=False)
        self.last_seconds = time.perf_counter() - start
        pl_module.log(f"{stage}/time/{self.short_name}", self.last_seconds, sync_dist=False)
        rank_zero_info(
            f"{type(self).__name__}: {self.last_seconds:.2f} s on {len(x_all)} {stage} samples "
            f"(epoch {trainer.current_epoch})"
        )
        return values

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._due(trainer):
            self.run(trainer, pl_module, "val")

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.fast_dev_run:
            self.run(trainer, pl_module, "test")

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """W&B summaries keep each metric's best value (max or min), so dashboards show the best epoch."""
        if not trainer.is_global_zero:
            return
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                for name, metric in self.named_metrics():
                    if metric.higher_is_better is not None:
                        summary = "max" if metric.higher_is_better else "min"
                        logger.experiment.define_metric(f"val/{name}", summary=summary)
