"""Command-line plumbing shared by train.py (and evaluate.py): LightningCLI in instantiation-only mode.

``python train.py --config X.yaml [--trainer.max_epochs 1 ...]`` parses and type-checks the whole config
(unknown keys and wrong types fail before anything runs), seeds, instantiates model, data and trainer, fits,
tests the best checkpoint, and prints the test accuracy, the checkpoint and the run directory.

Every error caused by the input ends in one ``error:`` line without a traceback: parse errors (exit status 2)
from jsonargparse, and errors found once the pieces meet (exit status 1): `RobustAttrError` wherever it was
raised (jsonargparse wraps errors of constructors, DataLoader workers re-raise them), an unwritable run
directory, W&B without credentials.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Any, NoReturn

import pytorch_lightning as pl
import yaml
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from pytorch_lightning.loggers import WandbLogger
from pytorch_lightning.utilities import rank_zero_only
from rich.console import Console
from rich.markup import escape

from robustattr.errors import ConfigError, RobustAttrError, exit_with_error, find_user_error
from robustattr.files import AtomicCheckpointIO
from robustattr.module import RobustClassifier
from robustattr.run import CONFIG_KEY, run_dir

console = Console(stderr=False, highlight=False)


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


def _check_config_files(args: list[str]) -> str | None:
    """The error for a ``--config`` file that is not UTF-8 text (jsonargparse would end in a traceback)."""
    for i, arg in enumerate(args):
        path = args[i + 1] if arg in ("--config", "-c") and i + 1 < len(args) else None
        if arg.startswith("--config="):
            path = arg.split("=", 1)[1]
        if path is None or not Path(path).is_file():
            continue
        try:
            Path(path).read_bytes().decode("utf-8")
        except UnicodeDecodeError as err:
            return f"--config {path}: not a YAML text file (byte {err.start} is not UTF-8); give a .yaml config"
    return None


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

    def parse_args(self, args: Any = None, *rest: Any, **kwargs: Any) -> Any:
        argv = sys.argv[1:] if args is None else args
        if isinstance(argv, list) and all(isinstance(a, str) for a in argv):
            problem = _check_config_files(argv)
            if problem:
                self.error(problem)
        return super().parse_args(args, *rest, **kwargs)


def check_writable(folder: Path, what: str) -> None:
    """Create ``folder`` if needed and write a probe file in it, or end with an error naming it."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        raise ConfigError(
            f"cannot write the {what} {folder}: {err.strerror or err}; point --trainer.logger.init_args.save_dir "
            "(or --trainer.default_root_dir) to a writable folder"
        ) from None


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

    def instantiate_trainer(self, **kwargs: Any) -> pl.Trainer:
        trainer = super().instantiate_trainer(**kwargs)
        # Checkpoints are written atomically (a full disk never leaves a truncated file under a real name),
        # unless the config chose its own CheckpointIO plugin.
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        folders = [(Path(trainer.default_root_dir), "trainer's root folder")]
        folders += [(Path(lg.save_dir), "logger's save_dir") for lg in trainer.loggers if lg.save_dir]
        for folder, what in folders:
            check_writable(folder, what)
        return trainer


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
    test = summary["test"]  # soft_wrap: a long path stays on its line, whatever the terminal's width
    if "test/acc" in test:
        console.print(f"[bold]test accuracy[/bold] {test['test/acc']:.4f}", soft_wrap=True)
    console.print(f"[bold]checkpoint[/bold]    {escape(summary['checkpoint'] or '(none saved)')}", soft_wrap=True)
    console.print(f"[bold]run dir[/bold]       {escape(summary['run_dir'])}", soft_wrap=True)


def user_error(err: BaseException) -> RobustAttrError | None:
    """The input error behind ``err``, if it has one: a `RobustAttrError` anywhere in its chain, or W&B refusing
    to log online (no credentials, no network)."""
    found = find_user_error(err)
    if found is not None:
        return found
    import wandb.errors
    from lightning_fabric.utilities.exceptions import MisconfigurationException

    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, MisconfigurationException):  # Lightning's word for settings that contradict each other
            return ConfigError(" ".join(str(err).split()))
        if isinstance(err, wandb.errors.Error):
            return ConfigError(
                f"W&B: {' '.join(str(err).split())} Log in once with `wandb login` (or set WANDB_API_KEY), or keep "
                "the run offline: --trainer.logger.init_args.offline true"
            )
        err = err.__cause__ or err.__context__
    return None


def main(args: list[str] | None = None) -> dict[str, Any]:
    """Entry point of train.py. An input error ends in one line on stderr and exit status 1; config parse errors
    are reported by jsonargparse (exit status 2)."""
    try:
        return fit_and_test(RobustCLI(args=args))
    except Exception as err:
        found = user_error(err)
        if found is None:
            raise
        exit_with_error(found)


if __name__ == "__main__":  # pragma: no cover
    main(sys.argv[1:])
