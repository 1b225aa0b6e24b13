"""Callbacks for tests, named by class_path in configs of launched processes."""

import os
import signal

import pytorch_lightning as pl


class KillAtEpochStart(pl.Callback):
    """Sends ``signal`` to this process when epoch ``epoch`` starts: the end of the previous epoch, with its
    checkpoints, is on disk."""

    def __init__(self, epoch: int, signal: str = "SIGKILL") -> None:
        self.epoch = epoch
        self.signal = signal

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch == self.epoch:
            os.kill(os.getpid(), getattr(signal, self.signal))


class SignalAtStep(pl.Callback):
    """Sends ``signal`` to this process after training batch ``step`` (counted from 0 across epochs)."""

    def __init__(self, step: int, signal: str = "SIGTERM") -> None:
        self.step = step
        self.signal = signal

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step + 1:
            os.kill(os.getpid(), getattr(signal, self.signal))
