"""ImageFolder datasets (ImageNet and any `root/<split>/<class>/<image>` tree) with the standard transforms.

Under DDP, Lightning inserts a DistributedSampler into these loaders, so each process reads its own shard.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image, UnidentifiedImageError
from torchvision import datasets, transforms

from robustattr.data.base import SplitDataModule
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
        raise UnreadableImageError(f"{path}: cannot read this image ({err}); replace or remove the file") from None


class ImageFolderDataModule(SplitDataModule):
    """Train on ``root/train_dir``, validate on ``root/val_dir``, test on ``root/test_dir`` (default: val).

    Training: RandomResizedCrop(image_size) + horizontal flip; evaluation: Resize(resize_size) +
    CenterCrop(image_size). Images in [0, 1].
    """

    drop_last_train = True
    display_name = "ImageFolder dataset"
    how_to_get = "Put the images in class folders: <root>/<split>/<class name>/<image file>."

    def __init__(
        self,
        root: str,
        train_dir: str = "train",
        val_dir: str = "val",
        test_dir: str | None = None,
        image_size: int = 224,
        resize_size: int = 256,
        batch_size: int = 256,
        eval_batch_size: int | None = None,
        num_workers: int = 8,
        pin_memory: bool = True,
    ) -> None:
        super().__init__()
        if resize_size < image_size:
            raise ConfigError(f"resize_size ({resize_size}) must be at least image_size ({image_size})")
        self.root = Path(root)
        self.split_dirs = {"train": train_dir, "val": val_dir, "test": test_dir or val_dir}
        self.image_size = image_size
        self.resize_size = resize_size
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory

    @property
    def num_classes(self) -> int:
        self.setup()
        return len(self.splits["train"].classes)

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

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        self._check()
        train_tf = transforms.Compose(
            [
                transforms.RandomResizedCrop(self.image_size),
                transforms.RandomHorizontalFlip(),
                transforms.ToTensor(),
            ]
        )
        eval_tf = transforms.Compose(
            [
                transforms.Resize(self.resize_size),
                transforms.CenterCrop(self.image_size),
                transforms.ToTensor(),
            ]
        )
        for split, name in self.split_dirs.items():
            folder = self.root / name
            try:
                self.splits[split] = datasets.ImageFolder(
                    str(folder), transform=train_tf if split == "train" else eval_tf, loader=load_rgb
                )
            except FileNotFoundError as err:  # torchvision: "Found no valid file for the classes ..."
                empty = [p.name for p in sorted(folder.iterdir()) if p.is_dir() and not any(p.iterdir())]
                detail = f"the class folders {empty} are empty" if empty else str(err)
                raise DatasetNotFoundError(
                    f"{folder} (the {split} split): {detail}; every class folder needs at least one image "
                    f"({', '.join(datasets.folder.IMG_EXTENSIONS)})"
                ) from None


class ImageNetDataModule(ImageFolderDataModule):
    """ILSVRC-2012 as an ImageFolder tree (1000 class folders under train/ and val/)."""

    display_name = "ImageNet (ILSVRC-2012)"
    how_to_get = (
        "Download ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar from https://image-net.org (an account is "
        "needed), extract them into <root>/train/<wnid>/ and <root>/val/<wnid>/ (the validation images must be "
        "moved into class folders, e.g. with the valprep.sh script from the PyTorch ImageNet example)."
    )
