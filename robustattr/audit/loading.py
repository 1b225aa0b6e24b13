"""Loading what an audit examines, safely: checkpoints never execute code.

- Lightning ``.ckpt`` files written by train.py carry their whole config: the model is rebuilt from it
  (trusted class paths only) and the data section names the dataset.
- Plain state dicts (``.pt``/``.pth``) and ``.safetensors`` files carry weights only: the audit config names
  the architecture (``net``); ``module.``/``model.``/``net.`` key prefixes are stripped.
Everything loads with ``torch.load(weights_only=True)`` or safetensors; a pickle that would need code is refused
before anything runs, and a truncated, corrupted or unknown file ends in one error naming it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jsonargparse import ArgumentParser
from torch import nn

from robustattr.checkpoint import TRUSTED_PREFIXES, _class_paths, checkpoint_config, classifier_from_checkpoint
from robustattr.errors import RobustAttrError
from robustattr.models.weights import UnsafeCheckpointError, load_weights, safe_torch_load

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


@dataclass
class AuditedModel:
    name: str
    path: Path
    sha256: str
    model: nn.Module  # images in [0, 1] -> logits, eval mode
    config: dict[str, Any] | None  # the run config stored by train.py, if any


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_trusted(config: Any, source: str) -> None:
    for class_path in _class_paths(config):
        if not class_path.startswith(TRUSTED_PREFIXES):
            raise UnsafeCheckpointError(f"{source}: refused to build '{class_path}': not in a trusted package")


def build_net(net_config: dict[str, Any], source: str = "audit config") -> nn.Module:
    """An ``nn.Module`` from a ``{class_path, init_args}`` mapping (trusted packages only)."""
    _check_trusted(net_config, source)
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--net", type=nn.Module)
    try:
        return parser.instantiate_classes(parser.parse_object({"net": net_config})).net
    except Exception as err:
        raise RobustAttrError(f"{source}: cannot build the network: {err}") from err


def load_model(path: str | Path, net: dict[str, Any] | None = None) -> AuditedModel:
    """The model stored in ``path``, in eval mode on the CPU (see the module docstring for the formats)."""
    path = Path(path)
    if not path.is_file():
        raise RobustAttrError(f"{path}: no such checkpoint file")
    if path.suffix not in (*PICKLE_SUFFIXES, ".safetensors"):
        raise RobustAttrError(
            f"{path}: unknown checkpoint format '{path.suffix}' (expected .ckpt, .pt, .pth or .safetensors)"
        )
    digest = sha256(path)
    content = None if path.suffix == ".safetensors" else safe_torch_load(path)  # refuses code, reports corruption
    config = checkpoint_config(content) if isinstance(content, dict) else None
    if config is not None and net is None:
        model = classifier_from_checkpoint(content, path).net
    else:
        if net is None:
            raise RobustAttrError(
                f"{path}: holds weights only (no train.py config): name the architecture in the audit config "
                "(net: {class_path: ..., init_args: ...})"
            )
        model = build_net(net)
        load_weights(model, path)
    return AuditedModel(name=path.stem, path=path, sha256=digest, model=model.eval(), config=config)
