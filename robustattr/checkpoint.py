"""Rebuilding a RobustClassifier from a checkpoint file alone, without executing anything it carries.

A checkpoint written by train.py holds the resolved config (``robustattr_config``) next to the weights.
- The file loads with ``torch.load(weights_only=True)``: tensors and plain containers only.
- The model is rebuilt from the stored config through `robustattr.trust.instantiate_trusted`: every import
  path the config names, ``class_path`` entries and plain strings alike, must lie in the trusted packages
  (`robustattr.trust.TRUSTED_IMPORTS`, plus prefixes the caller adds); anything else is refused before it is
  imported.
- The stored config is data, not instructions: initial-weight files it names (``model.weights``, a net's
  ``weights``: the file a run was fine-tuned from) are never read, since the checkpoint's own state dict
  replaces them; a checkpoint therefore loads wherever it is moved.
- Weights must be finite: a NaN or infinite tensor is refused, naming it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from robustattr.errors import NonFiniteError, RobustAttrError
from robustattr.models.weights import initial_weights_disabled, safe_torch_load
from robustattr.module import RobustClassifier
from robustattr.run import CONFIG_KEY
from robustattr.trust import instantiate_trusted


def checkpoint_config(checkpoint: dict[str, Any]) -> dict[str, Any] | None:
    """The full run config stored by train.py, or None for checkpoints made outside it."""
    config = checkpoint.get(CONFIG_KEY)
    return config if isinstance(config, dict) else None


def model_config(checkpoint: dict[str, Any], path: str | Path = "checkpoint") -> dict[str, Any]:
    config = checkpoint_config(checkpoint)
    if config is not None and isinstance(config.get("model"), dict):
        return config["model"]
    hparams = dict(checkpoint.get("hyper_parameters") or {})
    hparams.pop("_instantiator", None)
    hparams.pop("_class_path", None)
    if "net" not in hparams:
        raise RobustAttrError(
            f"{path}: the checkpoint carries no model configuration (it was not written by train.py); "
            "rebuild the network yourself and load the state dict with robustattr.models.load_weights"
        )
    return hparams


def check_finite(state: dict[str, torch.Tensor], source: str | Path) -> None:
    """Refuse weights with NaN or infinite entries (a diverged run), naming the first such tensor."""
    for name, tensor in state.items():
        if isinstance(tensor, torch.Tensor) and tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise NonFiniteError(
                f"{source}: the weights are not finite ({bad} of {tensor.numel()} entries of '{name}' are NaN or "
                "infinite): the run that saved them diverged, and no number measured on them would mean anything"
            )


def load_classifier(
    path: str | Path, trusted_prefixes: Sequence[str] = (), map_location: str = "cpu"
) -> RobustClassifier:
    """The RobustClassifier saved in ``path`` (a Lightning checkpoint from train.py), in eval mode."""
    return classifier_from_checkpoint(safe_torch_load(path), path, trusted_prefixes, map_location)


def classifier_from_checkpoint(
    checkpoint: Any, path: str | Path = "checkpoint", trusted_prefixes: Sequence[str] = (), map_location: str = "cpu"
) -> RobustClassifier:
    """`load_classifier` for a checkpoint already read with ``weights_only=True``."""
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise RobustAttrError(f"{path}: not a Lightning checkpoint (no 'state_dict' entry)")
    config = model_config(checkpoint, path)
    check_finite(checkpoint["state_dict"], path)
    with initial_weights_disabled():
        model = instantiate_trusted(config, RobustClassifier, str(path), trusted_prefixes, init_args_only=True)
    try:
        model.load_state_dict(checkpoint["state_dict"])
    except RuntimeError as err:
        raise RobustAttrError(f"{path}: weights do not fit the stored architecture: {err}") from err
    return model.to(map_location).eval()
