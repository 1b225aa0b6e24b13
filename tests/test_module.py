import warnings

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.loggers import CSVLogger

from robustattr.data import DigitsDataModule
from robustattr.errors import ConfigError
from robustattr.models import SmallCNN
from robustattr.module import RobustClassifier
from robustattr.regularizers import ObjectiveTerm


class LogitEnergy(ObjectiveTerm):
    """A small term for testing the seam: the mean squared logit."""

    def forward(self, model, x, y):
        return model(x).pow(2).mean()


class LabelMargin(ObjectiveTerm):
    def forward(self, model, x, y):
        return -model(x).gather(1, y[:, None]).mean()


def test_term_defaults():
    term = LogitEnergy()
    assert term.name == "logit_energy" and term.weight == 1.0
    assert LogitEnergy(weight=0.5, name="e").name == "e"
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ConfigError, match="weight"):
            LogitEnergy(weight=bad)


def test_training_loss_is_weighted_ce_plus_weighted_terms():
    torch.manual_seed(0)
    module = RobustClassifier(
        SmallCNN(batch_norm=False), terms=[LogitEnergy(weight=0.5), LabelMargin(weight=2.0)], ce_weight=0.7
    )
    x, y = torch.rand(8, 1, 8, 8), torch.randint(0, 10, (8,))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # self.log without a Trainer
        loss = module.training_step((x, y), 0)
    logits = module.net(x)
    expected = 0.7 * F.cross_entropy(logits, y) + 0.5 * logits.pow(2).mean() - 2.0 * logits.gather(1, y[:, None]).mean()
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert all(p.grad is not None for p in module.net.parameters())


def _fit(tmp_path, terms, epochs=3):
    pl.seed_everything(0)
    module = RobustClassifier(SmallCNN(), terms=terms)
    trainer = pl.Trainer(
        max_epochs=epochs,
        logger=CSVLogger(tmp_path),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
    )
    dm = DigitsDataModule()
    trainer.fit(module, datamodule=dm)
    return module, trainer, dm


def test_terms_are_logged_and_change_what_is_learned(tmp_path):
    plain, _, dm = _fit(tmp_path / "plain", [])
    regular, trainer, _ = _fit(tmp_path / "reg", [LogitEnergy(weight=0.3)])
    metrics = (tmp_path / "reg" / "lightning_logs" / "version_0" / "metrics.csv").read_text()
    header = metrics.splitlines()[0].split(",")
    assert {"train/reg/logit_energy", "train/loss", "train/ce", "train/acc", "val/acc", "val/loss"} <= set(header)
    x, _ = next(iter(dm.test_dataloader()))
    with torch.no_grad():
        energy_plain = plain.eval()(x).pow(2).mean()
        energy_reg = regular.eval()(x).pow(2).mean()
    assert energy_reg < 0.5 * energy_plain  # the term lowered what it penalises
    assert trainer.callback_metrics["val/acc"] > 0.8  # and the classifier still learned


def test_inconsistent_settings_fail_early(tmp_path):
    with pytest.raises(ConfigError, match="distinct names"):
        RobustClassifier(SmallCNN(), terms=[LogitEnergy(), LogitEnergy()])
    with pytest.raises(ConfigError, match="ce_weight"):
        RobustClassifier(SmallCNN(), ce_weight=-1)
    with pytest.raises(ConfigError, match="number of classes"):
        RobustClassifier(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10)))
    module = RobustClassifier(SmallCNN(num_classes=7))
    trainer = pl.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    with pytest.raises(ConfigError, match="predicts 7 classes but DigitsDataModule has 10"):
        trainer.fit(module, datamodule=DigitsDataModule())


def test_scheduler_factory_and_interval():
    module = RobustClassifier(
        SmallCNN(),
        optimizer=lambda params: torch.optim.SGD(params, lr=0.1),
        scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=1),
        scheduler_interval="step",
    )
    config = module.configure_optimizers()
    assert isinstance(config["optimizer"], torch.optim.SGD)
    assert config["lr_scheduler"]["interval"] == "step"
    assert isinstance(RobustClassifier(SmallCNN()).configure_optimizers(), torch.optim.Adam)
