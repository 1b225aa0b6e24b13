"""LightningDataModules. Every one yields images in [0, 1] (normalisation lives inside the model) and
exposes `num_classes`."""

from robustattr.data.base import SplitDataModule
from robustattr.data.cifar import CIFAR10DataModule, CIFAR100DataModule
from robustattr.data.digits import DigitsDataModule
from robustattr.data.imagefolder import ImageFolderDataModule, ImageNetDataModule
from robustattr.data.transforms import ImageDataModule

__all__ = [
    "CIFAR10DataModule",
    "CIFAR100DataModule",
    "DigitsDataModule",
    "ImageDataModule",
    "ImageFolderDataModule",
    "ImageNetDataModule",
    "SplitDataModule",
]
