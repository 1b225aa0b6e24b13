"""CIFAR-10 and CIFAR-100 through torchvision, with the standard augmentation (random crop with 4-pixel
padding, horizontal flip) or transforms of your own (torchvision.transforms.v2 by class_path). Images stay in
[0, 1]: normalisation lives inside the model.

The official training set is split (seeded) into train and validation; the official test set is the test set.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset, Subset
from torchvision import datasets

from robustattr.data.transforms import ImageDataModule, default_transforms
from robustattr.errors import ConfigError, DatasetNotFoundError


class CIFAR10DataModule(ImageDataModule):
    """CIFAR-10 (50k train / 10k test, 32x32 RGB, 10 classes).

    Args:
        root: folder that holds (or will hold) the extracted python version of the dataset.
        download: fetch the archive into ``root`` when it is missing (needs network access).
        val_size: images of the official training set held out for validation (0: validate on the test set).
        split_seed: seed of the train/validation split.
        augment: random crop (padding 4) and horizontal flip for training (the default pipeline).
        train_transforms, eval_transforms: torchvision.transforms.v2 transforms replacing the defaults (see
            `robustattr.data.transforms`).
        batch_size, eval_batch_size, num_workers, pin_memory: loader settings (`SplitDataModule`).
    """

    dataset_class = datasets.CIFAR10
    folder = "cifar-10-batches-py"
    archive_url = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
    drop_last_train = True
    display_name = "CIFAR-10"
    num_classes = 10
    image_shape = (3, 32, 32)

    def __init__(
        self,
        root: str = "data",
        download: bool = False,
        val_size: int = 5000,
        split_seed: int = 0,
        augment: bool = True,
        batch_size: int = 128,
        **loader: Any,
    ) -> None:
        super().__init__(batch_size=batch_size, **loader)  # transforms and loader: see ImageDataModule
        if not 0 <= val_size < 50000:
            raise ConfigError(f"{type(self).__name__}: val_size must be in [0, 50000), got {val_size}")
        self.root = root
        self.download = download
        self.val_size = val_size
        self.split_seed = split_seed
        self.augment = augment

    def default_steps(self, train: bool) -> list[nn.Module]:
        return default_transforms(32, 32, train=True) if train and self.augment else []

    def _missing_message(self, reason: str) -> str:
        return (
            f"{self.display_name} not found: {reason}. Expected the extracted python version in "
            f"{Path(self.root) / self.folder}. Either run once with network access and `--data.init_args.download "
            f"true`, or download {self.archive_url} yourself and extract it into {self.root}/ "
            f"(`tar -xzf {Path(self.archive_url).name} -C {self.root}`); set `--data.init_args.root` to use "
            "another folder."
        )

    def _dataset(self, train: bool, transform) -> torch.utils.data.Dataset:
        try:
            return self.dataset_class(self.root, train=train, transform=transform, download=False)
        except RuntimeError as err:  # torchvision: "Dataset not found or corrupted"
            raise DatasetNotFoundError(self._missing_message(f"no valid copy in '{self.root}'")) from err

    def prepare_data(self) -> None:
        if not self.download:
            self._dataset(train=True, transform=None)
            return
        try:
            for train in (True, False):
                self.dataset_class(self.root, train=train, download=True)
        except (OSError, RuntimeError) as err:  # URLError is an OSError: no network, DNS failure, ...
            raise DatasetNotFoundError(self._missing_message(f"download failed ({err})")) from err

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        train_aug = self._dataset(train=True, transform=self.transform(train=True))
        train_plain = self._dataset(train=True, transform=self.transform(train=False))
        test = self._dataset(train=False, transform=self.transform(train=False))
        order = torch.randperm(len(train_aug), generator=torch.Generator().manual_seed(self.split_seed)).tolist()
        val_idx, train_idx = order[: self.val_size], order[self.val_size :]
        self.splits["train"] = Subset(train_aug, train_idx)
        self.splits["val"] = Subset(train_plain, val_idx) if self.val_size else test
        self.splits["test"] = test
        self._train_plain = Subset(train_plain, train_idx)

    def _plain_split(self, split: str) -> Dataset:
        self.setup()
        return self._train_plain if split == "train" else self.splits[split]


class CIFAR100DataModule(CIFAR10DataModule):
    """CIFAR-100 (50k train / 10k test, 32x32 RGB, 100 classes); same options as CIFAR-10."""

    dataset_class = datasets.CIFAR100
    folder = "cifar-100-python"
    archive_url = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
    display_name = "CIFAR-100"
    num_classes = 100
