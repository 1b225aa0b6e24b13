"""Rebuilding a RobustClassifier from a checkpoint file alone, without executing anything it carries.

A checkpoint written by train.py holds the resolved config (``robustattr_config``) next to the weights. The
file loads with ``torch.load(weights_only=True)``; the model is rebuilt from the config's ``class_path``
entries, which must name classes in trusted packages (ours, torch, torchvision, timm, Lightning, torchmetrics,
or prefixes the caller adds): a checkpoint cannot make us import and run arbitrary code.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from pytorch_lightning.cli import instantiate_module

from robustattr.cli import CONFIG_KEY
from robustattr.errors import RobustAttrError
from robustattr.models.weights import UnsafeCheckpointError, safe_torch_load
from robustattr.module import RobustClassifier

TRUSTED_PREFIXES = (
    "robustattr.",
    "torch.",
    "torchvision.",
    "timm.",
    "pytorch_lightning.",
    "torchmetrics.",
)


def _class_paths(config: Any) -> Iterator[str]:
    if isinstance(config, dict):
        for key, value in config.items():
            if key in ("class_path", "_class_path") and isinstance(value, str):
                yield value
            else:
                yield from _class_paths(value)
    elif isinstance(config, list):
        for item in config:
            yield from _class_paths(item)


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


def load_classifier(
    path: str | Path, trusted_prefixes: Sequence[str] = (), map_location: str = "cpu"
) -> RobustClassifier:
    """The RobustClassifier saved in ``path`` (a Lightning checkpoint from train.py), in eval mode."""
    return classifier_from_checkpoint(safe_torch_load(path), path, trusted_prefixes, map_location)


def classifier_from_checkpoint(
    checkpoint: Any, path: str | Path = "checkpoint", trusted_prefixes: Sequence[str] = (), map_location: str = "cpu"
) -> RobustClassifier:
    """`load_classifier` for a checkpoint already read with ``weights_only=True``."""
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise RobustAttrError(f"{path}: not a Lightning checkpoint (no 'state_dict' entry)")
    config = model_config(checkpoint, path)
    allowed = TRUSTED_PREFIXES + tuple(trusted_prefixes)
    for class_path in _class_paths(config):
        if not class_path.startswith(allowed):
            raise UnsafeCheckpointError(
                f"{path}: refused to build '{class_path}': not in a trusted package ({', '.join(allowed)}); "
                "pass trusted_prefixes if you trust this checkpoint"
            )
    try:
        model = instantiate_module(RobustClassifier, config)
    except Exception as err:  # jsonargparse reports the offending key
        raise RobustAttrError(f"{path}: cannot rebuild the model from its stored config: {err}") from err
    try:
        model.load_state_dict(checkpoint["state_dict"])
    except RuntimeError as err:
        raise RobustAttrError(f"{path}: weights do not fit the stored architecture: {err}") from err
    return model.to(map_location).eval()
