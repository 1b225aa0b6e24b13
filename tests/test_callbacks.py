"""Validation callbacks: values, behaviour under fit / validate / test, and what they must not touch."""

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger

from robustattr.attacks import BIM, LinfBall, RandomSignAttack, TopKAttack
from robustattr.callbacks import AdversarialValidation, AttributionPanels, CurvatureMonitor, FragilityValidation
from robustattr.data import DigitsDataModule
from robustattr.metrics import default_k, robust_accuracy, topk_intersection
from robustattr.models import SmallCNN
from robustattr.module import RobustClassifier


def _trainer(tmp_path, callbacks, **kwargs):
    defaults = dict(
        max_epochs=1, logger=CSVLogger(tmp_path), enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, callbacks=callbacks,
    )  # fmt: skip
    return pl.Trainer(**{**defaults, **kwargs})


@pytest.fixture(scope="module")
def trained():
    pl.seed_everything(0)
    module = RobustClassifier(SmallCNN(width=16), optimizer=lambda p: torch.optim.Adam(p, lr=3e-3))
    pl.Trainer(
        max_epochs=3, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False
    ).fit(module, datamodule=DigitsDataModule())
    return module


def _callbacks():
    return [
        AdversarialValidation(attacks=[BIM(steps=5)], epsilons=[8 / 255, 0.1], num_samples=48, batch_size=16),
        FragilityValidation(attacks=[TopKAttack(steps=8), RandomSignAttack()], num_samples=48, batch_size=16),
        CurvatureMonitor(num_samples=48, batch_size=16, power_iters=5),
    ]


NAMES = [
    "val/adv/clean_acc",
    "val/adv/bim_linf8/acc",
    "val/adv/bim_linf8/success",
    "val/adv/bim_linf25.5/acc",
    "val/frag/saliency/topk_linf8/topk_intersection",
    "val/frag/saliency/topk_linf8/spearman",
    "val/frag/saliency/topk_linf8/kendall",
    "val/frag/saliency/topk_linf8/center_shift",
    "val/frag/saliency/topk_linf8/cosine_distance",
    "val/frag/saliency/topk_linf8/label_kept",
    "val/frag/saliency/random_sign_linf8/topk_intersection",
    "val/curv/grad_norm",
    "val/curv/hessian_top_eig",
    "val/time/frag",
]


def test_validate_logs_every_metric_under_inference_mode_and_touches_nothing(trained, tmp_path):
    state = {k: v.clone() for k, v in trained.state_dict().items()}
    trained.train()
    trainer = _trainer(tmp_path, _callbacks())
    (results,) = trainer.validate(trained, datamodule=DigitsDataModule(), verbose=False)
    assert set(NAMES) <= set(results)
    assert trained.training  # mode restored
    assert all(torch.equal(v, state[k]) for k, v in trained.state_dict().items())  # BatchNorm stats included
    assert all(p.grad is None and p.requires_grad for p in trained.parameters())
    assert 0 <= results["val/adv/bim_linf25.5/acc"] <= results["val/adv/bim_linf8/acc"] <= results["val/adv/clean_acc"]
    assert (
        results["val/frag/saliency/topk_linf8/topk_intersection"]
        < results["val/frag/saliency/random_sign_linf8/topk_intersection"]
    )


def test_values_equal_a_direct_computation_on_the_same_subset(trained, tmp_path):
    adv = AdversarialValidation(attacks=[BIM(steps=5)], epsilons=[0.1], num_samples=40, batch_size=16)
    frag = FragilityValidation(attacks=[TopKAttack(steps=6)], num_samples=40, batch_size=16)
    trainer = _trainer(tmp_path, [adv, frag])
    (results,) = trainer.validate(trained, datamodule=DigitsDataModule(), verbose=False)
    x, y = adv.subset(trainer, "val")
    trained.eval()
    bim = BIM(LinfBall(0.1), steps=5)
    expected_acc = robust_accuracy(trained(bim(trained, x, y)), y).mean()
    assert results["val/adv/bim_linf25.5/acc"] == pytest.approx(expected_acc.item())
    values = []
    for c, start in enumerate(range(0, 40, 16)):  # the same chunks and seeds
        r = TopKAttack(steps=6, seed=c).run(trained, x[start : start + 16], y[start : start + 16])
        values.append(topk_intersection(r.maps_clean, r.maps_adv, default_k(8, 8))[r.kept])
    expected = torch.cat(values).mean().item()
    assert results["val/frag/saliency/topk_linf8/topk_intersection"] == pytest.approx(expected)


def test_a_worst_case_ensemble_in_the_callback_logs_what_the_ensemble_finds_on_the_same_subset(trained, tmp_path):
    from robustattr.attacks import WorstCaseExplanationAttack

    ensemble = WorstCaseExplanationAttack(steps=3, restarts=1, betas=[30.0])
    frag = FragilityValidation(attacks=[ensemble, TopKAttack(steps=3)], num_samples=32, batch_size=16)
    trainer = _trainer(tmp_path, [frag])
    (results,) = trainer.validate(trained, datamodule=DigitsDataModule(), verbose=False)
    x, y = frag.subset(trainer, "val")
    trained.eval()
    values, kept = [], []
    for c, start in enumerate(range(0, 32, 16)):  # the same chunks and seeds
        attack = WorstCaseExplanationAttack(threat=LinfBall(8 / 255), steps=3, restarts=1, betas=[30.0], seed=c)
        r = attack.run(trained, x[start : start + 16], y[start : start + 16])
        values.append(r.values[r.kept])
        kept.append(r.kept)
    name = "val/frag/saliency/worst_case_linf8"
    assert results[f"{name}/topk_intersection"] == pytest.approx(torch.cat(values).mean().item(), abs=1e-6)
    assert results[f"{name}/label_kept"] == pytest.approx(torch.cat(kept).float().mean().item())
    assert results[f"{name}/topk_intersection"] < results["val/frag/saliency/topk_linf8/topk_intersection"]


def test_same_seed_same_numbers_and_another_seed_another_subset(trained, tmp_path):
    def run(seed):
        cb = FragilityValidation(attacks=[TopKAttack(steps=4)], num_samples=32, batch_size=16, seed=seed)
        trainer = _trainer(tmp_path, [cb])
        (results,) = trainer.validate(trained, datamodule=DigitsDataModule(), verbose=False)
        return results["val/frag/saliency/topk_linf8/spearman"], cb.subset(trainer, "val")[1]

    first, again, other = run(0), run(0), run(1)
    assert first[0] == again[0] and torch.equal(first[1], again[1])
    assert not torch.equal(first[1], other[1])


def test_test_stage_and_every_n_epochs_during_fit(tmp_path):
    pl.seed_everything(0)
    module = RobustClassifier(SmallCNN(width=8))
    adv = AdversarialValidation(attacks=[BIM(steps=2)], num_samples=16, every_n_epochs=2)
    trainer = _trainer(tmp_path, [adv], max_epochs=3)
    trainer.fit(module, datamodule=DigitsDataModule())
    metrics = (tmp_path / "lightning_logs" / "version_0" / "metrics.csv").read_text().splitlines()
    header = metrics[0].split(",")
    column = header.index("val/adv/bim_linf8/acc")
    epochs = [row.split(",")[header.index("epoch")] for row in metrics[1:] if row.split(",")[column]]
    assert epochs == ["1"]  # only after the second epoch
    (results,) = trainer.test(module, datamodule=DigitsDataModule(), verbose=False)
    assert "test/adv/bim_linf8/acc" in results and "test/time/adv" in results


def test_model_checkpoint_can_monitor_a_fragility_metric(tmp_path):
    pl.seed_everything(0)
    module = RobustClassifier(SmallCNN(width=8))
    name = "val/frag/saliency/topk_linf8/topk_intersection"
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor=name, mode="max")
    frag = FragilityValidation(attacks=[TopKAttack(steps=3)], num_samples=16)
    trainer = _trainer(tmp_path, [frag, checkpoint], max_epochs=2, enable_checkpointing=True)
    trainer.fit(module, datamodule=DigitsDataModule())
    assert checkpoint.best_model_path and checkpoint.best_model_score is not None
    assert 0 <= checkpoint.best_model_score.item() <= 1


def test_panels_are_saved_with_any_logger(trained, tmp_path):
    panels = AttributionPanels(attack=TopKAttack(steps=3), num_examples=2)
    trainer = _trainer(tmp_path, [panels])
    trainer.validate(trained, datamodule=DigitsDataModule(), verbose=False)
    assert panels.last_png is not None and panels.last_png.is_file()
    assert panels.last_png.parent.parent == tmp_path / "lightning_logs" / "version_0"


def _small_callbacks(panels_every=1):
    return [
        AdversarialValidation(attacks=[BIM(steps=2)], num_samples=16),
        FragilityValidation(attacks=[TopKAttack(steps=2), RandomSignAttack()], num_samples=16),
        CurvatureMonitor(num_samples=16, power_iters=2),
        AttributionPanels(attack=TopKAttack(steps=2), num_examples=2, every_n_epochs=panels_every),
    ]


@pytest.mark.slow
def test_offline_wandb_run_holds_scalars_best_value_summaries_and_panels(tmp_path):
    from pytorch_lightning.loggers import WandbLogger

    from robustattr.wandb_offline import find_offline_runs, read_offline_run

    pl.seed_everything(0)
    logger = WandbLogger(project="robustattr-test", save_dir=str(tmp_path), offline=True)
    trainer = _trainer(tmp_path, _small_callbacks(), max_epochs=2, logger=logger)
    trainer.fit(RobustClassifier(SmallCNN(width=8)), datamodule=DigitsDataModule())
    logger.experiment.finish()
    (path,) = find_offline_runs(tmp_path)
    run = read_offline_run(path)
    name = "val/frag/saliency/topk_linf8/topk_intersection"
    values = run.values(name)
    assert len(values) == 2 and len(run.values("val/adv/bim_linf8/acc")) == 2
    assert run.values("val/curv/hessian_top_eig") and run.values("val/time/frag")
    assert run.summary[name] == {"max": max(values)}  # define_metric: dashboards show the best value
    assert run.summary["val/frag/saliency/topk_linf8/center_shift"]["min"] == min(
        run.values("val/frag/saliency/topk_linf8/center_shift")
    )
    images, tables = run.media("val/panels"), run.media("val/panels_table")
    assert len(images) == 2 and len(tables) == 2
    assert images[0]["_type"] == "images/separated" and (run.files / images[0]["filenames"][0]).is_file()
    assert tables[0]["_type"] == "table-file" and (run.files / tables[0]["path"]).is_file()


@pytest.mark.slow
def test_metrics_work_with_the_tensorboard_logger(tmp_path):
    from pytorch_lightning.loggers import TensorBoardLogger

    pl.seed_everything(0)
    trainer = _trainer(tmp_path, _small_callbacks(), logger=TensorBoardLogger(tmp_path))
    trainer.fit(RobustClassifier(SmallCNN(width=8)), datamodule=DigitsDataModule())
    (events,) = (tmp_path / "lightning_logs" / "version_0").glob("events.out.tfevents.*")
    content = events.read_bytes()
    for tag in (b"val/frag/saliency/topk_linf8/spearman", b"val/adv/bim_linf8/acc", b"val/curv/grad_norm"):
        assert tag in content
    assert (tmp_path / "lightning_logs" / "version_0" / "panels" / "val_epoch000.png").is_file()
