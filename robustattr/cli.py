"""Command-line plumbing shared by train.py (and evaluate.py): LightningCLI in instantiation-only mode.

``python train.py --config X.yaml [--trainer.max_epochs 1 ...]`` parses and type-checks the whole config
(unknown keys and wrong types fail before anything runs), seeds, instantiates model, data and trainer, fits,
tests the best checkpoint, and prints the test accuracy, the checkpoint and the run directory.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, NoReturn

import pytorch_lightning as pl
import yaml
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger, WandbLogger
from pytorch_lightning.utilities import rank_zero_only
from rich.console import Console

from robustattr.errors import RobustAttrError
from robustattr.module import RobustClassifier

CONFIG_KEY = "robustattr_config"
console = Console(stderr=False, highlight=False)


def run_dir(trainer: pl.Trainer) -> Path:
    """The folder of this run: ``save_dir/name/version`` of the first logger, where ModelCheckpoint puts its
    ``checkpoints/`` folder too; the trainer's root folder when there is no logger."""
    if not trainer.loggers:
        return Path(trainer.default_root_dir)
    logger = trainer.loggers[0]
    if isinstance(logger, CSVLogger | TensorBoardLogger):
        return Path(logger.log_dir)
    if isinstance(logger, WandbLogger) and trainer.is_global_zero:
        _ = logger.experiment  # creates the run, which fixes its id (the version)
    version = logger.version
    version = version if isinstance(version, str) else f"version_{version}"
    return Path(logger.save_dir or trainer.default_root_dir) / str(logger.name) / version


class RunConfig(SaveConfigCallback):
    """Saves the resolved config as ``config.yaml`` in the run directory, logs it to the logger (W&B run
    config), and stores it in every checkpoint so that a checkpoint alone rebuilds model and data."""

    def __init__(self, parser: LightningArgumentParser, config: Any, **kwargs: Any) -> None:
        kwargs["save_to_log_dir"] = False
        super().__init__(parser, config, **kwargs)
        dumped = yaml.safe_load(parser.dump(config, skip_none=False, skip_link_targets=False))
        dumped.pop("config", None)  # the paths of the YAML files, not part of the configuration
        self.config_dict: dict[str, Any] = dumped

    def save_config(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if trainer.fast_dev_run:  # a smoke test: no run directory, nothing to save
            return
        folder = run_dir(trainer)
        folder.mkdir(parents=True, exist_ok=True)
        self.parser.save(self.config, str(folder / self.config_filename), skip_none=False, overwrite=True)
        for logger in trainer.loggers:
            logger.log_hyperparams(self.config_dict)

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        checkpoint[CONFIG_KEY] = self.config_dict


class RobustArgumentParser(LightningArgumentParser):
    """Reports a config error as the message alone (the key and what is wrong with it), without the usage
    screen of several hundred options that argparse would print first."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if not self.exit_on_error:
            super().error(message, ex)
        sys.stderr.write(f"error: {message}\n")
        sys.stderr.write(
            f"tip: `{self.prog} --help` lists the accepted options, `--print_config` the resolved config\n"
        )
        raise SystemExit(2)


class RobustCLI(LightningCLI):
    def __init__(self, args: list[str] | None = None, **kwargs: Any) -> None:
        super().__init__(
            RobustClassifier,
            pl.LightningDataModule,
            subclass_mode_data=True,
            save_config_callback=RunConfig,
            seed_everything_default=0,
            auto_configure_optimizers=False,  # the optimizer is a RobustClassifier argument, not a CLI group
            run=False,
            args=args,
            parser_class=RobustArgumentParser,
            parser_kwargs={"description": "Train a robustattr classifier from a YAML config."},
            **kwargs,
        )


def fit_and_test(cli: RobustCLI) -> dict[str, Any]:
    trainer, model, datamodule = cli.trainer, cli.model, cli.datamodule
    trainer.fit(model, datamodule=datamodule)
    checkpoint = trainer.checkpoint_callback
    best = checkpoint.best_model_path if checkpoint is not None else ""
    results = trainer.test(model, datamodule=datamodule, ckpt_path=best or None, verbose=False)
    summary = {
        "test": {k: float(v) for k, v in (results[0] if results else {}).items()},
        "checkpoint": best or None,
        "run_dir": str(run_dir(trainer)),
    }
    _print_summary(trainer, summary)
    _finish_wandb(trainer)
    return summary


@rank_zero_only
def _finish_wandb(trainer: pl.Trainer) -> None:
    """Close the W&B run (Lightning leaves it open), so its files are complete when train.py returns."""
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger) and logger._experiment is not None:
            logger.experiment.finish()


@rank_zero_only
def _print_summary(trainer: pl.Trainer, summary: dict[str, Any]) -> None:
    test = summary["test"]
    if "test/acc" in test:
        console.print(f"[bold]test accuracy[/bold] {test['test/acc']:.4f}")
    console.print(f"[bold]checkpoint[/bold]    {summary['checkpoint'] or '(none saved)'}")
    console.print(f"[bold]run dir[/bold]       {summary['run_dir']}")


def main(args: list[str] | None = None) -> dict[str, Any]:
    """Entry point of train.py. A RobustAttrError (missing data, inconsistent config) ends in one line on
    stderr and exit status 1; config parse errors are reported by jsonargparse (exit status 2)."""
    try:
        return fit_and_test(RobustCLI(args=args))
    except RobustAttrError as err:
        Console(stderr=True, highlight=False).print(f"[bold red]error:[/bold red] {err}", soft_wrap=True)
        raise SystemExit(1) from None


if __name__ == "__main__":  # pragma: no cover
    main(sys.argv[1:])
