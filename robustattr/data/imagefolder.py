"""ImageFolder datasets (ImageNet and any ``root/<split>/<class>/<image>`` tree).

Under DDP, Lightning inserts a DistributedSampler into these loaders, so each process reads its own shard.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Literal

from PIL import Image, UnidentifiedImageError
from torch import nn
from torch.utils.data import Dataset
from torchvision import datasets

from robustattr.data.transforms import ImageDataModule, default_transforms, resize_size_for
from robustattr.errors import ConfigError, DatasetNotFoundError, RobustAttrError


class UnreadableImageError(RobustAttrError):
    """An image file of a dataset that cannot be decoded."""


def load_rgb(path: str) -> Image.Image:
    """The image at ``path`` as RGB, or an error naming the file (a truncated download, a stray non-image)."""
    try:
        with open(path, "rb") as f:
            image = Image.open(f)
            return image.convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError) as err:
        raise UnreadableImageError(
            f"{path}: cannot read this image ({err}); replace or remove the file (or set unreadable: skip)"
        ) from None


class SkippingImageFolder(datasets.ImageFolder):
    """An ImageFolder that returns None for an unreadable image (dropped from its batch), with one warning each."""

    def __getitem__(self, index: int):
        try:
            return super().__getitem__(index)
        except UnreadableImageError as err:
            warnings.warn(f"skipped: {err}", RuntimeWarning, stacklevel=2)
            return None


class ImageFolderDataModule(ImageDataModule):
    """Train on ``root/train_dir``, validate on ``root/val_dir``, test on ``root/test_dir`` (default: val).

    Args:
        root: the folder that holds the split folders, each holding one folder per class.
        image_size: the side of the square images the network gets; None (the default) takes the size of the
            first training image, so a folder of 32x32 images trains at 32x32, not upsampled to 224.
        resize_size: the evaluation resize before the centre crop; None derives it from ``image_size`` (equal for
            small images, x 256/224 for large ones); given, it must lie between ``image_size`` and twice it.
        train_transforms, eval_transforms: torchvision.transforms.v2 transforms (class_path in YAML) replacing the
            defaults (see `robustattr.data.transforms`); images are decoded before and scaled to [0, 1] after.
        channels: 3 (RGB) or 1 (converted to grayscale).
        unreadable: an image that cannot be decoded ends the run naming the file (``raise``), or is dropped from
            its batch with a warning (``skip``).
        batch_size, eval_batch_size, num_workers, pin_memory: loader settings (`SplitDataModule`).

    ``num_classes`` comes from the class folder names of the training split, without scanning the images.
    """

    drop_last_train = True
    display_name = "ImageFolder dataset"
    how_to_get = "Put the images in class folders: <root>/<split>/<class name>/<image file>."
    default_image_size: int | None = None

    def __init__(
        self,
        root: str,
        train_dir: str = "train",
        val_dir: str = "val",
        test_dir: str | None = None,
        image_size: int | None = None,
        resize_size: int | None = None,
        channels: Literal[1, 3] = 3,
        unreadable: Literal["raise", "skip"] = "raise",
        batch_size: int = 256,
        **loader: Any,
    ) -> None:
        super().__init__(batch_size=batch_size, **loader)
        image_size = image_size if image_size is not None else self.default_image_size
        if image_size is not None and image_size < 1:
            raise ConfigError(f"{type(self).__name__}: image_size must be positive, got {image_size}")
        if image_size is not None:
            resize_size_for(image_size, resize_size)  # contradictions end here, before any file is read
        self.root = Path(root)
        self.split_dirs = {"train": train_dir, "val": val_dir, "test": test_dir or val_dir}
        self._image_size = image_size
        self.resize_size = resize_size
        self.channels = channels
        self.unreadable = unreadable

    @property
    def num_classes(self) -> int:
        self._check()
        classes, _ = datasets.folder.find_classes(str(self.root / self.split_dirs["train"]))
        return len(classes)

    @property
    def image_size(self) -> int:
        """The configured size, or that of the first training image (one file opened, not the whole tree)."""
        if self._image_size is None:
            self._check()
            train = self.root / self.split_dirs["train"]
            first = next(
                (p for c in sorted(train.iterdir()) if c.is_dir() for p in sorted(c.iterdir())
                 if p.suffix.lower() in datasets.folder.IMG_EXTENSIONS),
                None,
            )  # fmt: skip
            if first is None:
                raise DatasetNotFoundError(f"{train}: no image files in its class folders")
            width, height = load_rgb(str(first)).size
            self._image_size = min(width, height)
        return self._image_size

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (self.channels, self.image_size, self.image_size)

    def _check(self) -> None:
        for split, name in self.split_dirs.items():
            folder = self.root / name
            if not folder.is_dir() or not any(p.is_dir() for p in folder.iterdir()):
                raise DatasetNotFoundError(
                    f"{self.display_name} not found: {folder} (the {split} split) is missing or has no class "
                    f"folders. {self.how_to_get} Set `--data.init_args.root` to the folder that holds "
                    f"'{self.split_dirs['train']}/' and '{self.split_dirs['val']}/'."
                )

    def prepare_data(self) -> None:
        self._check()

    def default_steps(self, train: bool) -> list[nn.Module]:
        size = self.image_size
        return default_transforms(size, resize_size_for(size, self.resize_size), train)

    def grayscale(self) -> bool:
        return self.channels == 1

    def _folder(self, split: str, train: bool) -> Dataset:
        folder = self.root / self.split_dirs[split]
        kind = SkippingImageFolder if self.unreadable == "skip" else datasets.ImageFolder
        try:
            return kind(str(folder), transform=self.transform(train), loader=load_rgb)
        except FileNotFoundError as err:  # torchvision: "Found no valid file for the classes ..."
            empty = [p.name for p in sorted(folder.iterdir()) if p.is_dir() and not any(p.iterdir())]
            detail = f"the class folders {empty} are empty" if empty else str(err)
            raise DatasetNotFoundError(
                f"{folder} (the {split} split): {detail}; every class folder needs at least one image "
                f"({', '.join(datasets.folder.IMG_EXTENSIONS)})"
            ) from None

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        self._check()
        for split in self.split_dirs:
            self.splits[split] = self._folder(split, train=split == "train")
        classes = {split: dataset.classes for split, dataset in self.splits.items()}
        if any(names != classes["train"] for names in classes.values()):
            raise DatasetNotFoundError(
                f"{self.root}: the splits have different class folders ({ {k: len(v) for k, v in classes.items()} }); "
                "every split needs the same class names"
            )

    def _plain_split(self, split: str) -> Dataset:
        if split != "train":
            return super()._plain_split(split)
        self._check()
        return self._folder("train", train=False)


class ImageNetDataModule(ImageFolderDataModule):
    """ILSVRC-2012 as an ImageFolder tree (1000 class folders under train/ and val/); images at 224 by default."""

    display_name = "ImageNet (ILSVRC-2012)"
    how_to_get = (
        "Download ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar from https://image-net.org (an account is "
        "needed), extract them into <root>/train/<wnid>/ and <root>/val/<wnid>/ (the validation images must be "
        "moved into class folders, e.g. with the valprep.sh script from the PyTorch ImageNet example)."
    )
    default_image_size = 224
