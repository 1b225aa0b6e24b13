"""What the DataModules share: named splits, their loaders, the loader settings, and samples of plain images."""

from __future__ import annotations

import os
import warnings

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, default_collate

from robustattr.errors import ConfigError


def seeded_subset(dataset: Dataset, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``size`` samples of ``dataset`` drawn by a seeded permutation, stacked as (images, labels). Built outside
    inference mode, so the tensors can take gradients wherever they are used."""
    with torch.inference_mode(False):
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:size]
        samples = [dataset[i] for i in order.tolist()]
        samples = [s for s in samples if s is not None]  # unreadable images skipped by the dataset
        x = torch.stack([torch.as_tensor(s[0]) for s in samples])
        y = torch.as_tensor([int(s[1]) for s in samples])
    return x, y


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS, Windows
        return os.cpu_count() or 1


def collate_readable(batch: list) -> object:
    """The default collate, without the samples a dataset returned as None (unreadable images it was told to skip)."""
    kept = [sample for sample in batch if sample is not None]
    if not kept:
        raise RuntimeError("every sample of a batch was unreadable")
    return default_collate(kept)


class SplitDataModule(pl.LightningDataModule):
    """A DataModule whose ``setup`` fills ``self.splits`` ("train", "val", "test"); the loaders follow.

    Args:
        batch_size: training batch size (per process under DDP).
        eval_batch_size: batch size for validation and test (default: ``batch_size``).
        num_workers: DataLoader worker processes; None (the default) gives each process an equal share of the CPUs
            this process may use (at most 8), 0 loads in the main process.
        pin_memory: pin host memory for faster copies to a GPU (ignored without one).

    Subclasses set ``drop_last_train`` (the last, smaller training batch is dropped for the large datasets) and
    may override `plain_split` (a split without random augmentation, for samples and statistics)."""

    drop_last_train: bool = False

    def __init__(
        self,
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        num_workers: int | None = None,
        pin_memory: bool = True,
    ) -> None:
        super().__init__()
        if batch_size < 1 or (eval_batch_size is not None and eval_batch_size < 1):
            raise ConfigError(
                f"{type(self).__name__}: batch sizes must be positive, got {batch_size} and {eval_batch_size}"
            )
        if num_workers is not None and num_workers < 0:
            raise ConfigError(f"{type(self).__name__}: num_workers must be non-negative, got {num_workers}")
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.splits: dict[str, Dataset] = {}

    def workers(self) -> int:
        """The worker count: as configured, or this process's share of the CPUs (at most 8)."""
        if self.num_workers is not None:
            return self.num_workers
        trainer = getattr(self, "trainer", None)  # set by Lightning when the module is attached
        processes = max(1, int(getattr(trainer, "num_devices", 1) or 1)) if trainer is not None else 1
        return max(0, min(8, available_cpus() // processes - 1))

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        self.setup()
        workers = self.workers()
        return DataLoader(
            self.splits[split],
            batch_size=self.batch_size if split == "train" else self.eval_batch_size,
            shuffle=shuffle,
            num_workers=workers,
            pin_memory=self.pin_memory and torch.cuda.is_available(),  # pinning needs an accelerator
            persistent_workers=workers > 0,
            drop_last=self.drop_last_train and split == "train",
            collate_fn=collate_readable,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def plain_split(self, split: str) -> Dataset:
        """``split`` without random augmentation (training images as evaluation sees them)."""
        self.setup()
        return self.splits[split]

    def sample_images(self, size: int = 32, split: str = "train", seed: int = 0) -> torch.Tensor:
        """A seeded sample of ``size`` plain images of ``split`` (N, C, H, W) in [0, 1]."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dataset = self.plain_split(split)
        return seeded_subset(dataset, min(size, len(dataset)), seed)[0]
