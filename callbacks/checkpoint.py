"""The checkpoint a killed run resumes from: ``<run dir>/checkpoints/last.ckpt``, the state at the end of the last
epoch (or at the moment a SIGTERM arrived), with the random number generators' states.

Lightning's own ``ModelCheckpoint(save_last=True)`` writes ``last.ckpt`` only when a monitored checkpoint is
saved (Lightning >= 2.6), so after epochs without improvement it holds an older state: resuming from it would
repeat epochs silently. train.py adds this callback to every run that keeps checkpoints.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.utilities.exceptions import SIGTERMException


def rng_states() -> dict[str, Any]:
    """The global generators' states as tensors and plain Python values (a checkpoint must stay loadable with
    ``torch.load(weights_only=True)``, which refuses numpy arrays)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()  # noqa: NPY002 - the generator libraries draw from
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    name, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))  # noqa: NPY002
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


class LastCheckpoint(ModelCheckpoint):
    """Writes ``last.ckpt`` (atomically, through the trainer's CheckpointIO) at the end of every epoch and when a
    SIGTERM stops training (preemptible clusters send one before killing a job), and carries the states of the
    torch, numpy and Python random number generators, so that a resumed run draws the same shuffles and random
    starts as one that was never interrupted."""

    def __init__(self, dirpath: str | None = None) -> None:
        super().__init__(
            dirpath=dirpath, filename="last", monitor=None, save_top_k=1, enable_version_counter=False, verbose=False
        )

    @property
    def state_key(self) -> str:
        return "LastCheckpoint"

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "rng_states": rng_states()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = dict(state_dict)
        states = state.pop("rng_states", None)
        super().load_state_dict(state)
        if states is not None:
            set_rng_states(states)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if isinstance(exception, SIGTERMException) and not trainer.fast_dev_run and not trainer.sanity_checking:
            self._save_checkpoint(trainer, self.format_checkpoint_name(self._monitor_candidates(trainer)))
