import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from robustattr.data import CIFAR10DataModule, CIFAR100DataModule, DigitsDataModule, ImageNetDataModule
from robustattr.errors import ConfigError, DatasetNotFoundError


def _all(dm, split):
    xs, ys = zip(*[(x, y) for x, y in getattr(dm, f"{split}_dataloader")()], strict=True)
    return torch.cat(xs), torch.cat(ys)


def test_digits_are_real_images_in_unit_range_with_a_stratified_seeded_split():
    dm = DigitsDataModule(batch_size=100)
    dm.setup()
    sizes = {name: len(ds) for name, ds in dm.splits.items()}
    assert sum(sizes.values()) == 1797
    assert sizes["val"] == pytest.approx(0.15 * 1797, abs=2) and sizes["test"] == pytest.approx(0.15 * 1797, abs=2)
    x, _y = _all(dm, "train")
    assert x.shape[1:] == (1, 8, 8) and x.dtype == torch.float32
    assert x.min() == 0.0 and x.max() == 1.0
    # Every class present in every split (stratified), and the splits are disjoint images.
    for split in ("train", "val", "test"):
        assert set(_all(dm, split)[1].tolist()) == set(range(10))
    flat = {split: {tuple(img.flatten().tolist()) for img in _all(dm, split)[0]} for split in ("train", "test")}
    assert len(flat["train"] & flat["test"]) <= 5  # a handful of digits are pixel-identical duplicates in the data

    again = DigitsDataModule(batch_size=100)
    torch.testing.assert_close(_all(again, "test")[0], _all(dm, "test")[0])
    other = DigitsDataModule(batch_size=100, split_seed=1)
    assert not torch.equal(_all(other, "test")[1], _all(dm, "test")[1])


def test_digits_resize_and_channel_replication_give_cifar_shaped_inputs():
    dm = DigitsDataModule(image_size=32, channels=3, batch_size=16)
    x, _ = next(iter(dm.val_dataloader()))
    assert x.shape == (16, 3, 32, 32)
    assert x.min() >= 0 and x.max() <= 1
    torch.testing.assert_close(x[:, 0], x[:, 2])


@pytest.mark.parametrize(
    "kwargs", [{"channels": 2}, {"val_fraction": 0.6, "test_fraction": 0.5}, {"image_size": 2}, {"batch_size": 0}]
)
def test_digits_rejects_impossible_settings(kwargs):
    with pytest.raises(ConfigError):
        DigitsDataModule(**kwargs)


@pytest.mark.parametrize("cls, folder", [(CIFAR10DataModule, "cifar-10-batches-py"), (CIFAR100DataModule, "cifar-100")])
def test_missing_cifar_says_where_to_put_it_and_how_to_download(tmp_path, cls, folder):
    dm = cls(root=str(tmp_path / "nowhere"))
    with pytest.raises(DatasetNotFoundError) as info:
        dm.prepare_data()
    message = str(info.value)
    assert folder in message and "nowhere" in message
    assert "--data.init_args.download true" in message and "https://" in message
    with pytest.raises(DatasetNotFoundError):
        dm.setup("fit")  # every DDP process checks, not only the one that prepares


def test_cifar_download_without_network_ends_in_the_same_clear_error(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr("torchvision.datasets.utils.download_and_extract_archive", offline)
    monkeypatch.setattr("torchvision.datasets.cifar.download_and_extract_archive", offline)
    dm = CIFAR10DataModule(root=str(tmp_path), download=True)
    with pytest.raises(DatasetNotFoundError, match="download failed"):
        dm.prepare_data()


def _write_image_tree(root: Path, classes=("cat", "dog"), per_class=3, size=40):
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for name in classes:
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, (size, size + 7, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")


def test_imagefolder_standard_transforms_give_unit_range_crops(tmp_path):
    _write_image_tree(tmp_path)
    dm = ImageNetDataModule(root=str(tmp_path), image_size=32, resize_size=36, batch_size=4, num_workers=0)
    dm.prepare_data()
    assert dm.num_classes == 2
    x, _y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 32, 32) and x.min() >= 0 and x.max() <= 1
    xv, _ = _all(dm, "val")
    assert xv.shape == (6, 3, 32, 32)
    assert len(dm.splits["test"]) == 6  # test defaults to the validation split


def test_missing_imagenet_explains_the_expected_layout(tmp_path):
    dm = ImageNetDataModule(root=str(tmp_path))
    with pytest.raises(DatasetNotFoundError) as info:
        dm.prepare_data()
    assert "train" in str(info.value) and "image-net.org" in str(info.value)
