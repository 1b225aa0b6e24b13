"""Planted label noise (Koh & Liang's label-checking experiments): a reproducible fraction of training labels
flipped to other classes, the same from the config alone, never in validation or test, written by train.py."""

import json
from pathlib import Path

import pytest
import torch

from robustattr.data import DigitsDataModule
from robustattr.data.base import dataset_labels
from robustattr.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def test_a_fraction_of_training_labels_is_flipped_reproducibly_to_other_classes():
    noisy = DigitsDataModule(label_noise=0.1, noise_seed=3)
    clean = DigitsDataModule()
    flips = noisy.flipped_labels()
    n = len(clean.plain_split("train"))
    assert len(flips) == round(0.1 * n)
    original = dataset_labels(clean.plain_split("train"))
    plain = noisy.plain_split("train")
    planted = torch.tensor([int(plain[i][1]) for i in range(n)])
    changed = (planted != original).nonzero().flatten().tolist()
    assert changed == sorted(flips)  # exactly the flipped indices, each to another class
    assert all(original[i] == a and planted[i] == b and a != b for i, (a, b) in flips.items())
    assert DigitsDataModule(label_noise=0.1, noise_seed=3).flipped_labels() == flips  # from the config alone
    assert DigitsDataModule(label_noise=0.1, noise_seed=4).flipped_labels() != flips
    loader = DigitsDataModule(label_noise=0.1, noise_seed=3, batch_size=2000)
    ((_, y_train),) = list(loader.train_dataloader())  # the training loader sees the planted labels
    assert torch.equal(y_train.sort().values, planted.sort().values)
    for split in ("val", "test"):  # never touched
        assert torch.equal(dataset_labels(noisy.plain_split(split)), dataset_labels(clean.plain_split(split)))
    assert DigitsDataModule().flipped_labels() == {}


@pytest.mark.parametrize("fraction", [-0.1, 1.0, 1.5])
def test_an_impossible_fraction_is_refused(fraction):
    with pytest.raises(ConfigError, match="label_noise is a fraction"):
        DigitsDataModule(label_noise=fraction)


@pytest.mark.slow
def test_train_py_writes_the_flipped_indices_and_the_checkpoint_reproduces_them(tmp_path):
    from robustattr.checkpoint import checkpoint_config
    from robustattr.cli import main as train
    from robustattr.models.weights import safe_torch_load
    from robustattr.trust import instantiate_trusted

    summary = train(["--config", str(ROOT / "configs" / "quickstart_noisy.yaml"), "--trainer.max_epochs", "1",
                     "--trainer.logger", "false", "--trainer.default_root_dir", str(tmp_path),
                     "--trainer.enable_progress_bar", "false", "--trainer.callbacks",
                     '[{"class_path": "pytorch_lightning.callbacks.ModelCheckpoint"}]'])  # fmt: skip
    rows = json.loads((Path(summary["run_dir"]) / "flipped_labels.json").read_text())
    assert len(rows) == round(0.1 * 1257) and all(r["original"] != r["planted"] for r in rows)
    import pytorch_lightning as pl

    config = checkpoint_config(safe_torch_load(summary["checkpoint"]))
    datamodule = instantiate_trusted(config["data"], pl.LightningDataModule, "checkpoint")
    again = datamodule.flipped_labels()
    assert {r["index"]: (r["original"], r["planted"]) for r in rows} == again
