"""The private Lightning members robustattr relies on (robustattr.lightning_private): these fail when a Lightning
release renames or changes them, before anything silently saves the wrong hyper-parameters or leaks a W&B run."""

import contextvars

from pytorch_lightning.core.mixins import hparams_mixin
from pytorch_lightning.loggers import WandbLogger

from robustattr.lightning_private import built_from_config, wandb_run_started


def test_lightning_still_has_the_context_variable_the_cli_sets():
    assert isinstance(hparams_mixin._given_hyperparameters, contextvars.ContextVar)
    assert not built_from_config()
    token = hparams_mixin._given_hyperparameters.set({"net": {"class_path": "robustattr.models.SmallCNN"}})
    try:
        assert built_from_config()
    finally:
        hparams_mixin._given_hyperparameters.reset(token)


def test_a_model_built_by_the_cli_stores_its_config_and_one_built_in_python_does_not():
    from robustattr.cli import RobustCLI
    from robustattr.models import SmallCNN
    from robustattr.module import RobustClassifier

    assert "net" not in RobustClassifier(SmallCNN(width=4)).hparams
    cli = RobustCLI(
        args=[
            "--model.net",
            "robustattr.models.SmallCNN",
            "--data",
            "robustattr.data.DigitsDataModule",
            "--trainer.logger",
            "false",
        ]
    )
    assert cli.model.hparams["net"]["class_path"] == "robustattr.models.SmallCNN"


def test_wandb_logger_keeps_its_run_in_experiment_until_it_is_started(tmp_path):
    logger = WandbLogger(save_dir=str(tmp_path), offline=True)
    assert "_experiment" in vars(logger) and not wandb_run_started(logger)
    try:
        _ = logger.experiment
        assert wandb_run_started(logger)
    finally:
        logger.experiment.finish()


def test_loading_a_checkpoint_imports_neither_the_cli_nor_captum(tmp_path):
    """The layering the package map promises: rebuilding a model from a checkpoint needs neither the CLI nor Captum."""
    import subprocess
    import sys
    from pathlib import Path

    from robustattr.cli import main as train

    root = Path(__file__).resolve().parents[1]
    summary = train(["--config", str(root / "configs" / "quickstart.yaml"), "--trainer.max_epochs", "1",
                     "--trainer.logger", "false", "--trainer.default_root_dir", str(tmp_path),
                     "--trainer.enable_progress_bar", "false", "--trainer.callbacks",
                     '[{"class_path": "pytorch_lightning.callbacks.ModelCheckpoint"}]'])  # fmt: skip
    code = (
        "import sys; from robustattr.checkpoint import load_classifier; "
        f"load_classifier({summary['checkpoint']!r}); "
        "bad = [m for m in ('robustattr.cli', 'pytorch_lightning.cli', 'captum') "
        "if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]
