"""The training set an influence computation runs over: the training split of a checkpoint's own DataModule as
evaluation sees it (no augmentation), or tensors given directly."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from robustattr.checkpoint import checkpoint_config
from robustattr.errors import ConfigError, RobustAttrError
from robustattr.models.weights import safe_torch_load
from robustattr.trust import instantiate_trusted


def collate(batch):
    """(images, labels) of a list of dataset samples, whatever their label type."""
    return torch.stack([torch.as_tensor(b[0]) for b in batch]), torch.as_tensor([int(b[1]) for b in batch])


class TrainingSet:
    """A dataset of (image in [0, 1], label) pairs, read in fixed order. ``num_workers`` for large image folders."""

    def __init__(self, dataset: Dataset, num_workers: int = 0) -> None:
        if len(dataset) == 0:
            raise ConfigError("influence: the training set is empty")
        self.dataset = dataset
        self.num_workers = num_workers

    @classmethod
    def from_tensors(cls, x: torch.Tensor, y: torch.Tensor) -> TrainingSet:
        if len(x) != len(y):
            raise ConfigError(f"influence: {len(x)} training images but {len(y)} labels")
        return cls(TensorDataset(x, y.long()))

    @classmethod
    def from_datamodule(cls, datamodule, num_workers: int = 0) -> TrainingSet:
        if not hasattr(datamodule, "plain_split"):
            raise ConfigError(f"influence: {type(datamodule).__name__} has no plain_split (robustattr DataModules do)")
        return cls(datamodule.plain_split("train"), num_workers)

    @classmethod
    def from_checkpoint(
        cls, path: str | Path, trusted_prefixes: Sequence[str] = (), num_workers: int = 0
    ) -> TrainingSet:
        """The training split of the DataModule stored in a train.py checkpoint, without augmentation. The stored
        settings are data: built through the trusted-imports gate, never downloading."""
        config = checkpoint_config(safe_torch_load(path))
        if not config or not config.get("data"):
            raise RobustAttrError(f"{path}: no train.py data config in the checkpoint; build the TrainingSet yourself")
        datamodule = instantiate_trusted(config["data"], pl.LightningDataModule, str(path), trusted_prefixes)
        if getattr(datamodule, "download", False):
            datamodule.download = False
        datamodule.prepare_data()
        return cls.from_datamodule(datamodule, num_workers)

    def __len__(self) -> int:
        return len(self.dataset)

    def example(self) -> tuple[torch.Tensor, torch.Tensor]:
        return collate([self.dataset[0]])

    def tensors(self, indices: Sequence[int] | torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The images and labels at ``indices`` (default: all), stacked."""
        indices = range(len(self)) if indices is None else [int(i) for i in indices]
        return collate([self.dataset[i] for i in indices])

    def batches(self, batch_size: int, indices: torch.Tensor | None = None) -> Iterator[tuple[torch.Tensor, ...]]:
        """(indices, images, labels) in order, over ``indices`` (default: all). The loader has its own generator:
        a DataLoader otherwise draws its base seed from the global RNG, and reading the training set (a callback
        during training) must not change a run's shuffling."""
        indices = torch.arange(len(self)) if indices is None else indices
        loader = DataLoader(Subset(self.dataset, indices.tolist()), batch_size=batch_size, shuffle=False,
                            num_workers=self.num_workers, collate_fn=collate,
                            generator=torch.Generator())  # fmt: skip
        start = 0
        with torch.inference_mode(False):
            for x, y in loader:
                yield indices[start : start + len(x)], x, y
                start += len(x)
