"""Two CPU processes (DDP on gloo) give the callbacks' single-process values on the same subset."""

import pytest
import pytorch_lightning as pl

from robustattr.attacks import BIM, PGD, RandomSignAttack, TopKAttack
from robustattr.callbacks import AdversarialValidation, CurvatureMonitor, FragilityValidation
from robustattr.data import DigitsDataModule
from robustattr.models import SmallCNN
from robustattr.module import RobustClassifier

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]


@pytest.fixture(scope="module")
def module():
    pl.seed_everything(0)
    module = RobustClassifier(SmallCNN(width=8))
    trainer = pl.Trainer(max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.fit(module, datamodule=DigitsDataModule())
    return module


def _validate(module, tmp_path, devices):
    callbacks = [
        # PGD's random starts and the random-sign baseline make the per-chunk seeding matter
        AdversarialValidation(attacks=[BIM(steps=3), PGD(steps=3)], epsilons=[0.1], num_samples=40, batch_size=8),
        FragilityValidation(attacks=[TopKAttack(steps=3), RandomSignAttack()], num_samples=40, batch_size=8),
        CurvatureMonitor(num_samples=40, batch_size=8, power_iters=3),
    ]
    trainer = pl.Trainer(
        accelerator="cpu", devices=devices, strategy="ddp_spawn" if devices > 1 else "auto",
        logger=False, enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
        default_root_dir=tmp_path,
    )  # fmt: skip
    (results,) = trainer.validate(module, datamodule=DigitsDataModule(), verbose=False)
    return {k: v for k, v in results.items() if "/time/" not in k and k not in ("val/acc", "val/loss")}


def test_two_processes_equal_one(module, tmp_path):
    single = _validate(module, tmp_path / "one", 1)
    double = _validate(module, tmp_path / "two", 2)
    assert set(single) == set(double) and len(single) == 27  # 9 map metrics (4 of them LENS) per fragility setting
    assert single["val/adv/clean_acc"] > 0.7 and single["val/adv/pgd_linf25.5/success"] > 0
    assert sum("lens_" in name or "topk_div" in name for name in single) == 8
    for name, value in single.items():
        assert double[name] == pytest.approx(value, rel=1e-5, abs=1e-6), name
