"""The two places robustattr reaches into Lightning's private members, each because no public API does the job.
Both are isolated here; tests/test_lightning_private.py fails as soon as a Lightning release changes either.

- `built_from_config`: LightningCLI sets the context variable ``_given_hyperparameters`` while it instantiates a
  model from a config; only then are the hyper-parameters plain data (the config) that rebuild the model, and a
  module built in Python must not store its objects as hyper-parameters. Lightning offers no public query.
- `wandb_run_started`: ``WandbLogger.experiment`` (public) *creates* the run when there is none, so closing a run
  only if one was started needs the logger's ``_experiment`` attribute.
"""

from __future__ import annotations

from pytorch_lightning.loggers import WandbLogger

try:
    from pytorch_lightning.core.mixins.hparams_mixin import _given_hyperparameters
except ImportError:  # pragma: no cover - a Lightning without it: the test of this module fails first
    _given_hyperparameters = None


def built_from_config() -> bool:
    """True while LightningCLI instantiates a LightningModule from a config (its hyper-parameters are the config)."""
    return _given_hyperparameters is not None and _given_hyperparameters.get() is not None


def wandb_run_started(logger: WandbLogger) -> bool:
    """Whether ``logger`` has started its W&B run (without starting one)."""
    return getattr(logger, "_experiment", None) is not None
