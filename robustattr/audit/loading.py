"""Loading what an audit examines, safely: checkpoints never execute code.

- Lightning ``.ckpt`` files written by train.py carry their whole config: the model is rebuilt from it
  (`robustattr.checkpoint`: only trusted packages are imported, initial-weight files it names are never read)
  and the data section names the dataset.
- Plain state dicts (``.pt``/``.pth``) and ``.safetensors`` files carry weights only: the audit config names
  the architecture (``net``); ``module.``/``model.``/``net.`` key prefixes are stripped.
Everything loads with ``torch.load(weights_only=True)`` or safetensors; a pickle that would need code is refused
before anything runs; a truncated, corrupted or unknown file, and weights with NaN or infinite entries, end in one
error naming the file.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from robustattr.checkpoint import check_finite, checkpoint_config, classifier_from_checkpoint
from robustattr.errors import RobustAttrError
from robustattr.models.weights import load_weights, safe_torch_load
from robustattr.trust import instantiate_trusted

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


def build_net(
    net_config: dict[str, Any], source: str = "audit config", trusted_prefixes: Sequence[str] = ()
) -> nn.Module:
    """An ``nn.Module`` from a ``{class_path, init_args}`` mapping (trusted packages only)."""
    return instantiate_trusted(net_config, nn.Module, source, trusted_prefixes)


def load_model(
    path: str | Path, net: dict[str, Any] | None = None, trusted_prefixes: Sequence[str] = (), name: str | None = None
) -> AuditedModel:
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
        model = classifier_from_checkpoint(content, path, trusted_prefixes).net
    else:
        if net is None:
            raise RobustAttrError(
                f"{path}: holds weights only (no train.py config): name the architecture in the audit config "
                "(net: {class_path: ..., init_args: ...})"
            )
        model = build_net(net, "the audit config's net", trusted_prefixes)
        load_weights(model, path)
        check_finite(model.state_dict(), path)
    return AuditedModel(name=name or path.stem, path=path, sha256=digest, model=model.eval(), config=config)
