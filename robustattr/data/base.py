"""What the DataModules share: named splits and their loaders."""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset


def seeded_subset(dataset: Dataset, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``size`` samples of ``dataset`` drawn by a seeded permutation, stacked as (images, labels). Built outside
    inference mode, so the tensors can take gradients wherever they are used."""
    with torch.inference_mode(False):
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:size]
        samples = [dataset[i] for i in order.tolist()]
        x = torch.stack([torch.as_tensor(s[0]) for s in samples])
        y = torch.as_tensor([int(s[1]) for s in samples])
    return x, y


class SplitDataModule(pl.LightningDataModule):
    """A DataModule whose ``setup`` fills ``self.splits`` ("train", "val", "test"); the loaders follow.

    Subclasses set ``batch_size``, ``eval_batch_size``, ``num_workers`` and, optionally, ``pin_memory`` and
    ``drop_last_train`` (the last, smaller training batch is dropped for the large datasets)."""

    batch_size: int
    eval_batch_size: int
    num_workers: int = 0
    pin_memory: bool = False
    drop_last_train: bool = False

    def __init__(self) -> None:
        super().__init__()
        self.splits: dict[str, Dataset] = {}

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        self.setup()
        return DataLoader(
            self.splits[split],
            batch_size=self.batch_size if split == "train" else self.eval_batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory and torch.cuda.is_available(),  # pinning needs an accelerator
            persistent_workers=self.num_workers > 0,
            drop_last=self.drop_last_train and split == "train",
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)
