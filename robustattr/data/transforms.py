"""Image pipelines: the defaults that follow the image size, and the user's own from YAML.

Every pipeline starts from the decoded image (``v2.ToImage``: a uint8 tensor image), runs its transforms, and ends
in ``v2.ToDtype(float32, scale=True)``: images in [0, 1], as every robustattr network expects (normalisation
lives inside the model, so epsilons stay in pixel units; a ``Normalize`` transform is refused).

Defaults:
- small images (``image_size`` <= 64, CIFAR-like): training resizes only images of another size, then pads by an
  eighth of the size, crops randomly and flips (the CIFAR recipe); evaluation resizes to ``image_size`` and
  centre-crops, which is the identity on images of that size;
- large images (ImageNet-like): training RandomResizedCrop(image_size) and flip; evaluation Resize(resize_size) and
  CenterCrop(image_size), ``resize_size`` = image_size * 256 / 224 unless given.

In YAML, transforms are torchvision.transforms.v2 classes named by class_path::

    train_transforms:
      - class_path: torchvision.transforms.v2.RandomResizedCrop
        init_args: {size: 96, scale: [0.35, 1.0]}
      - class_path: torchvision.transforms.v2.RandomHorizontalFlip
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torchvision.transforms import v2

from robustattr.data.base import SplitDataModule
from robustattr.errors import ConfigError

SMALL = 64  # largest image size that gets the small-image recipe


def resize_size_for(image_size: int, resize_size: int | None) -> int:
    """The evaluation resize: given, or derived from the crop (1 for small images, 256/224 for large ones); never
    below the crop, nor above twice it (a centre crop would then see less than a quarter of the image)."""
    if resize_size is None:
        return image_size if image_size <= SMALL else round(image_size * 256 / 224)
    if not image_size <= resize_size <= 2 * image_size:
        raise ConfigError(
            f"resize_size ({resize_size}) and image_size ({image_size}) contradict each other: evaluation resizes to "
            "resize_size and centre-crops image_size, so resize_size must lie between image_size and twice it "
            "(leave resize_size unset to derive it)"
        )
    return resize_size


def default_transforms(image_size: int, resize_size: int, train: bool) -> list[nn.Module]:
    if not train:
        return [v2.Resize(resize_size), v2.CenterCrop(image_size)]
    if image_size <= SMALL:
        return [
            v2.Resize(image_size),
            v2.CenterCrop(image_size),
            v2.RandomCrop(image_size, padding=max(1, image_size // 8)),
            v2.RandomHorizontalFlip(),
        ]
    return [v2.RandomResizedCrop(image_size), v2.RandomHorizontalFlip()]


def pipeline(transforms: Sequence[nn.Module], grayscale: bool = False) -> v2.Compose:
    """``ToImage``, (grayscale,) ``transforms``, ``ToDtype(float32, scale=True)``."""
    for transform in transforms:
        if isinstance(transform, v2.Normalize):
            raise ConfigError(
                "a Normalize transform in the data pipeline: robustattr networks normalise inside (set the net's mean "
                "and std), so that images, epsilons and clamps stay in [0, 1] pixel units"
            )
    head: list[nn.Module] = [v2.ToImage()] + ([v2.Grayscale(num_output_channels=1)] if grayscale else [])
    return v2.Compose([*head, *transforms, v2.ToDtype(torch.float32, scale=True)])


class ImageDataModule(SplitDataModule):
    """A DataModule of decoded images whose pipelines a config may replace.

    Args:
        train_transforms, eval_transforms: torchvision.transforms.v2 transforms (class_path in YAML) replacing the
            subclass's defaults (`default_steps`); ``ToImage`` and ``ToDtype(float32, scale=True)`` always frame
            them, and a ``Normalize`` is refused (networks normalise inside).
        batch_size, eval_batch_size, num_workers, pin_memory, label_noise, noise_seed: see `SplitDataModule`.
    """

    def __init__(
        self,
        train_transforms: list[nn.Module] | None = None,
        eval_transforms: list[nn.Module] | None = None,
        **loader: Any,
    ) -> None:
        super().__init__(**loader)
        self.train_transforms = train_transforms
        self.eval_transforms = eval_transforms

    def default_steps(self, train: bool) -> list[nn.Module]:
        """The transforms used when the config gives none for this stage."""
        raise NotImplementedError

    def grayscale(self) -> bool:
        return False

    def transform(self, train: bool) -> v2.Compose:
        given = self.train_transforms if train else self.eval_transforms
        return pipeline(given if given is not None else self.default_steps(train), grayscale=self.grayscale())
