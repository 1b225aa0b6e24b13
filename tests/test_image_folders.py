"""Real image folders, as a new user brings them: small generated PNG trees."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from robustattr.cli import RobustCLI
from robustattr.cli import main as train
from robustattr.data import CIFAR10DataModule, ImageFolderDataModule
from robustattr.data.base import available_cpus
from robustattr.data.stats import main as stats
from robustattr.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
RGB_STATS = ["--model.net.init_args.mean", "[0.5, 0.5, 0.5]", "--model.net.init_args.std", "[0.29, 0.29, 0.29]"]


def tree(root: Path, size: int = 32, classes=("cat", "dog", "eel"), per_class: int = 4, gray: bool = False) -> Path:
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for name in classes:
            (root / split / name).mkdir(parents=True)
            for i in range(per_class):
                shape = (size, size) if gray else (size, size, 3)
                Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(root / split / name / f"{i}.png")
    return root


def _pixels(path: Path) -> torch.Tensor:
    return torch.from_numpy(np.asarray(Image.open(path).convert("RGB"))).permute(2, 0, 1).float() / 255


def test_small_images_keep_their_size_and_evaluation_sees_them_as_they_are(tmp_path):
    root = tree(tmp_path)
    dm = ImageFolderDataModule(str(root), batch_size=4, num_workers=0)
    assert dm.image_size == 32 and dm.num_classes == 3
    x, _ = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 32, 32) and 0 <= x.min() and x.max() <= 1
    image, _ = dm.splits["val"][0]
    path, _ = dm.splits["val"].samples[0]
    torch.testing.assert_close(image, _pixels(Path(path)))  # the identity: no upsampling, no crop of the middle
    steps = [type(t).__name__ for t in dm.splits["train"].transform.transforms]
    assert "RandomCrop" in steps and "RandomHorizontalFlip" in steps and "RandomResizedCrop" not in steps


def test_image_size_alone_resizes_the_whole_image_for_evaluation(tmp_path):
    """The old default resize of 256 then a 16-pixel centre crop looked at the middle 1/256 of each image."""
    root = tree(tmp_path)
    dm = ImageFolderDataModule(str(root), image_size=16, batch_size=4, num_workers=0)
    dm.setup()
    image, _ = dm.splits["val"][0]
    path, _ = dm.splits["val"].samples[0]
    whole = v2.functional.resize(_pixels(Path(path)), [16, 16])
    assert image.shape == (3, 16, 16)
    torch.testing.assert_close(image, whole, atol=2 / 255, rtol=0)


@pytest.mark.parametrize("resize_size", [12, 40])
def test_contradicting_sizes_are_refused_before_any_file_is_read(tmp_path, resize_size):
    with pytest.raises(ConfigError, match="contradict"):
        ImageFolderDataModule(str(tmp_path / "nowhere"), image_size=16, resize_size=resize_size)


def test_large_images_get_the_imagenet_recipe(tmp_path):
    root = tree(tmp_path, size=80, per_class=1)
    dm = ImageFolderDataModule(str(root), image_size=72, num_workers=0)
    dm.setup()
    train_steps = [type(t).__name__ for t in dm.splits["train"].transform.transforms]
    eval_steps = dm.splits["val"].transform.transforms
    assert "RandomResizedCrop" in train_steps
    assert [type(t).__name__ for t in eval_steps][1:3] == ["Resize", "CenterCrop"] and eval_steps[1].size == [82]


def test_transforms_from_yaml_by_class_path(tmp_path):
    root = tree(tmp_path)
    data = {
        "class_path": "robustattr.data.ImageFolderDataModule",
        "init_args": {
            "root": str(root), "batch_size": 4, "num_workers": 0,
            "train_transforms": [{"class_path": "torchvision.transforms.v2.RandomResizedCrop",
                                  "init_args": {"size": 24, "scale": [0.5, 1.0]}},
                                 {"class_path": "torchvision.transforms.v2.ColorJitter",
                                  "init_args": {"brightness": 0.2}}],
            "eval_transforms": [{"class_path": "torchvision.transforms.v2.CenterCrop", "init_args": {"size": 24}}],
        },
    }  # fmt: skip
    cli = RobustCLI(args=["--config", str(ROOT / "configs" / "quickstart.yaml"), "--trainer.logger", "false",
                          "--trainer.callbacks", "[]", "--trainer.default_root_dir", str(tmp_path), "--data",
                          json.dumps(data), "--model.net.init_args.in_channels", "3",
                          "--model.net.init_args.num_classes", "3", *RGB_STATS])  # fmt: skip
    x, _ = next(iter(cli.datamodule.train_dataloader()))
    assert x.shape == (4, 3, 24, 24) and x.dtype == torch.float32
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)  # and it trains on them


def test_a_normalize_transform_is_refused(tmp_path):
    dm = ImageFolderDataModule(str(tree(tmp_path)), train_transforms=[v2.Normalize([0.5] * 3, [0.2] * 3)])
    with pytest.raises(ConfigError, match="normalise inside"):
        dm.setup()


def _one_line(capsys, *args) -> str:
    with pytest.raises(SystemExit) as info:
        train(list(args))
    err = capsys.readouterr().err
    assert info.value.code == 1 and "Traceback" not in err
    (line,) = [line for line in err.splitlines() if line.startswith("error")]
    return line


def _args(tmp_path, root, *extra):
    data = {"class_path": "robustattr.data.ImageFolderDataModule",
            "init_args": {"root": str(root), "batch_size": 4, "num_workers": 0}}  # fmt: skip
    return ["--config", str(ROOT / "configs" / "quickstart.yaml"), "--trainer.logger", "false", "--trainer.callbacks",
            "[]", "--trainer.default_root_dir", str(tmp_path), "--trainer.fast_dev_run", "1", "--data",
            json.dumps(data), "--model.net.init_args.num_classes", "3", *extra]  # fmt: skip


def test_channels_and_normalisation_are_checked_against_the_data(tmp_path, capsys):
    root = tree(tmp_path / "rgb")
    line = _one_line(capsys, *_args(tmp_path, root))  # a 1-channel net on RGB images
    assert "the data has 3 channel(s)" in line and "model.net.init_args.in_channels: 3" in line
    line = _one_line(capsys, *_args(tmp_path, root, "--model.net.init_args.in_channels", "3"))
    assert "one mean and std" in line and "model.net.init_args.mean" in line and "robustattr.data.stats" in line
    train(_args(tmp_path, root, "--model.net.init_args.in_channels", "3", *RGB_STATS))  # fits now


def test_grayscale_folders_and_digits_as_rgb_pass_the_check(tmp_path):
    train(_args(tmp_path, tree(tmp_path / "gray", gray=True), "--data.init_args.channels", "1",
                "--model.net.init_args.mean", "[0.5]", "--model.net.init_args.std", "[0.29]"))  # fmt: skip
    digits = json.dumps({"class_path": "robustattr.data.DigitsDataModule", "init_args": {"channels": 3}})
    train(["--config", str(ROOT / "configs" / "quickstart.yaml"), "--trainer.logger", "false", "--trainer.callbacks",
           "[]", "--trainer.default_root_dir", str(tmp_path), "--trainer.fast_dev_run", "1", "--data", digits,
           "--model.net.init_args.in_channels", "3"])  # gray copies: one mean and std is right  # fmt: skip


def test_num_classes_comes_from_the_folder_names_without_scanning_images(tmp_path, monkeypatch):
    root = tree(tmp_path, classes=("a", "b", "c", "d"), per_class=1)

    def no_scan(*args, **kwargs):
        raise AssertionError("scanned the image files")

    monkeypatch.setattr("torchvision.datasets.folder.make_dataset", no_scan)
    assert ImageFolderDataModule(str(root)).num_classes == 4


def test_workers_default_to_a_share_of_the_machine():
    assert ImageFolderDataModule("x").workers() == max(0, min(8, available_cpus() - 1))
    assert ImageFolderDataModule("x", num_workers=3).workers() == 3
    assert CIFAR10DataModule().workers() == max(0, min(8, available_cpus() - 1))


def test_unreadable_images_can_be_skipped_with_a_warning(tmp_path):
    root = tree(tmp_path)
    bad = root / "train" / "dog" / "1.png"
    bad.write_bytes(b"not a png")
    dm = ImageFolderDataModule(str(root), batch_size=12, num_workers=0, unreadable="skip")
    with pytest.warns(RuntimeWarning, match="1.png: cannot read"):
        sizes = [len(y) for _, y in dm.train_dataloader()]
    assert sum(sizes) == 11  # 12 images, one dropped (drop_last keeps only full batches otherwise)


def test_the_stats_command_measures_the_training_images(tmp_path, capsys):
    root = tree(tmp_path)
    data = json.dumps({"class_path": "robustattr.data.ImageFolderDataModule", "init_args": {"root": str(root)}})
    result = stats(["--config", str(ROOT / "configs" / "quickstart.yaml"), "--data", data, "--num_samples", "1000",
                    "--model.net.init_args.in_channels", "3", "--model.net.init_args.num_classes", "3",
                    *RGB_STATS])  # fmt: skip
    pixels = torch.stack([_pixels(p) for p in sorted((root / "train").rglob("*.png"))])
    expected_mean = pixels.transpose(0, 1).reshape(3, -1).mean(dim=1)
    torch.testing.assert_close(
        torch.tensor(result["mean"], dtype=torch.float64), expected_mean.double(), atol=1e-6, rtol=0
    )
    out = capsys.readouterr().out
    assert "12 training images" in out and "mean: [" in out and "std: [" in out
