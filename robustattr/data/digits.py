"""scikit-learn's handwritten digits: 1797 real 8x8 grayscale images shipped inside scikit-learn.

The embedded default dataset: no download, no network, trains in seconds on a CPU. Optional resizing and
channel replication turn it into a CIFAR-shaped stand-in (3x32x32) for exercising CIFAR models.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch.utils.data import TensorDataset

from robustattr.data.base import SplitDataModule
from robustattr.errors import ConfigError


class DigitsDataModule(SplitDataModule):
    """Digits as tensors in [0, 1], split into train/val/test with a fixed seed (stratified by class).

    Args:
        val_fraction: share of the 1797 images held out for validation.
        test_fraction: share held out for the test set.
        split_seed: seed of the split; independent of the training seed so runs compare on the same images.
        image_size: resize the 8x8 images to this size (bilinear), e.g. 32 for CIFAR-shaped models.
        channels: 1 (grayscale) or 3 (the gray channel replicated).
        batch_size, eval_batch_size, num_workers, pin_memory: loader settings (`SplitDataModule`); the data is in
            memory, so loading in the main process (``num_workers: 0``) is fastest.
    """

    num_classes = 10

    def __init__(
        self,
        val_fraction: float = 0.15,
        test_fraction: float = 0.15,
        split_seed: int = 0,
        image_size: int = 8,
        channels: int = 1,
        num_workers: int | None = 0,
        pin_memory: bool = False,
        **loader: Any,
    ) -> None:
        super().__init__(num_workers=num_workers, pin_memory=pin_memory, **loader)
        if not (0 < val_fraction < 1 and 0 < test_fraction < 1 and val_fraction + test_fraction < 1):
            raise ConfigError(
                f"DigitsDataModule: val_fraction ({val_fraction}) and test_fraction ({test_fraction}) must be in "
                "(0, 1) and sum to less than 1"
            )
        if channels not in (1, 3):
            raise ConfigError(f"DigitsDataModule: channels must be 1 or 3, got {channels}")
        if image_size < 4:
            raise ConfigError(f"DigitsDataModule: image_size must be at least 4, got {image_size}")
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.split_seed = split_seed
        self.image_size = image_size
        self.channels = channels

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (self.channels, self.image_size, self.image_size)

    def _images(self) -> tuple[torch.Tensor, torch.Tensor]:
        digits = load_digits()
        x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # pixel values are 0..16
        if self.image_size != 8:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
            x = x.clamp_(0.0, 1.0)
        if self.channels == 3:
            x = x.expand(-1, 3, -1, -1).contiguous()
        return x, torch.tensor(digits.target, dtype=torch.long)

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        x, y = self._images()
        index = torch.arange(len(y)).numpy()
        held_out = self.val_fraction + self.test_fraction
        train_idx, rest_idx = train_test_split(
            index, test_size=held_out, random_state=self.split_seed, stratify=y.numpy()
        )
        val_idx, test_idx = train_test_split(
            rest_idx,
            test_size=self.test_fraction / held_out,
            random_state=self.split_seed,
            stratify=y[rest_idx].numpy(),
        )
        for name, idx in (("train", train_idx), ("val", val_idx), ("test", test_idx)):
            idx = torch.as_tensor(idx)
            self.splits[name] = TensorDataset(x[idx], y[idx])
