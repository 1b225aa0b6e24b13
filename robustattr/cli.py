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

import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, NoReturn

import pytorch_lightning as pl
import yaml
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from pytorch_lightning.loggers import WandbLogger
from pytorch_lightning.utilities import rank_zero_only
from pytorch_lightning.utilities.exceptions import SIGTERMException
from rich.console import Console
from rich.markup import escape

from robustattr.callbacks.checkpoint import LastCheckpoint
from robustattr.errors import ConfigError, RobustAttrError, exit_with_error, find_user_error
from robustattr.files import AtomicCheckpointIO, atomic_write
from robustattr.lightning_private import wandb_run_started
from robustattr.models.weights import safe_torch_load
from robustattr.module import RobustClassifier
from robustattr.run import CONFIG_KEY, RUN_KEY, run_dir

console = Console(stderr=False, highlight=False)


class RunConfig(SaveConfigCallback):
    """Saves the resolved config as ``config.yaml`` in the run directory, logs it to the logger (W&B run
    config), and stores it in every checkpoint so that a checkpoint alone rebuilds model and data."""

    def __init__(self, parser: LightningArgumentParser, config: Any, **kwargs: Any) -> None:
        kwargs["save_to_log_dir"] = False
        super().__init__(parser, config, **kwargs)
        self.config_dict: dict[str, Any] = resolved_config(parser, config)

    def save_config(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if trainer.fast_dev_run:  # a smoke test: no run directory, nothing to save
            return
        folder = run_dir(trainer)
        folder.mkdir(parents=True, exist_ok=True)
        self.parser.save(self.config, str(folder / self.config_filename), skip_none=False, overwrite=True)
        flips = getattr(trainer.datamodule, "flipped_labels", None)
        if flips is not None and getattr(trainer.datamodule, "label_noise", 0) > 0:
            rows = [{"index": i, "original": a, "planted": b} for i, (a, b) in flips().items()]
            atomic_write(folder / "flipped_labels.json", json.dumps(rows) + "\n")
        for logger in trainer.loggers:
            logger.log_hyperparams(self.config_dict)

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        checkpoint[CONFIG_KEY] = self.config_dict
        logger = trainer.loggers[0] if trainer.loggers else None
        checkpoint[RUN_KEY] = {
            "run_dir": str(run_dir(trainer)),
            "logger": type(logger).__name__ if logger is not None else None,
            "version": logger.version if logger is not None else None,
        }


def resolved_config(parser: LightningArgumentParser, config: Any) -> dict[str, Any]:
    """The run's configuration as plain data: without the config files' paths and the resume options, which say
    how this process was started, not what the run is."""
    dumped = yaml.safe_load(parser.dump(config, skip_none=False, skip_link_targets=False))
    for key in ("config", "ckpt_path", "run_dir"):
        dumped.pop(key, None)
    return dumped


def resume_checkpoint(ckpt_path: str | None, folder: str | None) -> Path | None:
    """The checkpoint a run resumes from: ``ckpt_path`` itself, a run directory's ``checkpoints/last.ckpt``, or
    ``last`` with ``folder`` (the run directory)."""
    if ckpt_path is None:
        if folder is not None:
            raise ConfigError("--run_dir names the run to resume: use it with --ckpt_path last")
        return None
    if ckpt_path == "last":
        if folder is None:
            raise ConfigError("--ckpt_path last needs the run directory: --run_dir runs/<project>/<run id>")
        path = Path(folder) / "checkpoints" / "last.ckpt"
    else:
        path = Path(ckpt_path)
        if path.is_dir():
            path = path / "checkpoints" / "last.ckpt"
    if not path.is_file():
        raise ConfigError(
            f"{path}: no checkpoint to resume from (a run keeps <run dir>/checkpoints/last.ckpt at every epoch end)"
        )
    return path


def _differences(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [
            d for k in sorted(set(a) | set(b)) for d in _differences(a.get(k), b.get(k), f"{prefix}.{k}".strip("."))
        ]
    return [] if a == b else [prefix]


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

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--ckpt_path", type=str | None, default=None,
            help="resume a run: a checkpoint, a run directory (its checkpoints/last.ckpt), or 'last' with --run_dir",
        )  # fmt: skip
        parser.add_argument("--run_dir", type=str | None, default=None, help="the run directory, for --ckpt_path last")

    def before_instantiate_classes(self) -> None:
        """Resuming: the run continues in its own run directory and W&B run (the logger's version is the stored
        run's), after checking that model and data are configured as the checkpoint's."""
        self.resume_from = resume_checkpoint(self.config.get("ckpt_path"), self.config.get("run_dir"))
        if self.resume_from is None:
            return
        stored = safe_torch_load(self.resume_from)
        run = stored.get(RUN_KEY) or {}
        config = stored.get(CONFIG_KEY) or {}
        current = resolved_config(self.parser, self.config)
        changed = [
            d
            for key in ("model", "data", "seed_everything")
            for d in _differences(config.get(key), current.get(key), key)
        ]
        if config and changed:
            raise ConfigError(
                f"{self.resume_from}: resuming with other settings than the run's ({', '.join(changed[:8])}); give the "
                "run's own config (its run directory holds config.yaml)"
            )
        logger = self.config.get("trainer", {}).get("logger")
        version = run.get("version")
        if version is None or not hasattr(logger, "class_path"):
            return
        if logger.class_path.endswith("WandbLogger"):
            logger.init_args.id = version
            os.environ.setdefault("WANDB_RESUME", "allow")  # the same W&B run continues
        elif hasattr(logger.init_args, "version"):
            logger.init_args.version = version

    def instantiate_trainer(self, **kwargs: Any) -> pl.Trainer:
        trainer = super().instantiate_trainer(**kwargs)
        # Checkpoints are written atomically (a full disk never leaves a truncated file under a real name),
        # unless the config chose its own CheckpointIO plugin.
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        if trainer.checkpoint_callbacks:
            if any(c.save_last for c in trainer.checkpoint_callbacks if type(c) is ModelCheckpoint):
                raise ConfigError(
                    "ModelCheckpoint(save_last: true) rewrites last.ckpt only when it saves a monitored checkpoint "
                    "(Lightning >= 2.6), so resuming from it can repeat epochs; train.py keeps last.ckpt at every "
                    "epoch end itself: remove save_last from the config"
                )
            if not any(isinstance(c, LastCheckpoint) for c in trainer.callbacks):
                trainer.callbacks.append(LastCheckpoint())
        folders = [(Path(trainer.default_root_dir), "trainer's root folder")]
        folders += [(Path(lg.save_dir), "logger's save_dir") for lg in trainer.loggers if lg.save_dir]
        for folder, what in folders:
            check_writable(folder, what)
        return trainer


def fit_and_test(cli: RobustCLI) -> dict[str, Any]:
    trainer, model, datamodule = cli.trainer, cli.model, cli.datamodule
    resume = getattr(cli, "resume_from", None)
    try:
        trainer.fit(model, datamodule=datamodule, ckpt_path=str(resume) if resume else None)
    except SIGTERMException:
        raise Preempted(trainer) from None
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
        if isinstance(logger, WandbLogger) and wandb_run_started(logger):
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


class Preempted(RobustAttrError):
    """Training stopped by SIGTERM (a preemptible cluster's notice): last.ckpt holds the state it stopped at."""

    collective = True
    exit_status = 143  # 128 + SIGTERM: a stopped run must not look finished

    def __init__(self, trainer: pl.Trainer) -> None:
        folder = run_dir(trainer)
        super().__init__(
            f"stopped by SIGTERM at epoch {trainer.current_epoch}, step {trainer.global_step}: the state is in "
            f"{folder / 'checkpoints' / 'last.ckpt'}; resume with `python train.py --config <the same config> "
            f"--ckpt_path {folder}`"
        )


def main(args: list[str] | None = None) -> dict[str, Any]:
    """Entry point of train.py. An input error ends in one line on stderr and exit status 1 (143 for a run stopped
    by SIGTERM); config parse errors are reported by jsonargparse (exit status 2)."""
    try:
        return fit_and_test(RobustCLI(args=args))
    except Preempted as err:
        exit_with_error(err, err.exit_status)
    except Exception as err:
        found = user_error(err)
        if found is None:
            raise
        exit_with_error(found)


if __name__ == "__main__":  # pragma: no cover
    main(sys.argv[1:])
