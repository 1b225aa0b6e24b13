"""What a training run leaves behind, below the CLI: where its folder is, and under which key its checkpoints
carry the resolved config. Callbacks, checkpoint loading and the audit read these without importing the CLI."""

from __future__ import annotations

from pathlib import Path

import pytorch_lightning as pl
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger, WandbLogger

CONFIG_KEY = "robustattr_config"  # a train.py checkpoint's resolved config (model, data, trainer, seed)
RUN_KEY = "robustattr_run"  # where its run lives: {"run_dir": ..., "logger": class name, "version": id}


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
