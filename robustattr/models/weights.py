"""Loading weights from local files, safely.

Nothing is fetched from the network, and nothing in a file is executed: pickles load with
``torch.load(weights_only=True)`` (tensors and plain containers only) and ``.safetensors`` files hold tensors
only. Key prefixes added by wrappers (``module.`` from DDP, ``model.``/``net.`` from Lightning modules and our
wrappers, ``_orig_mod.`` from torch.compile) are stripped until the keys match the target model.
"""

from __future__ import annotations

import contextvars
import pickle
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from robustattr.errors import RobustAttrError

WRAPPER_PREFIXES = ("module.", "model.", "net.", "_orig_mod.")
STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model", "net", "module")


_initial_weights_disabled = contextvars.ContextVar("robustattr_initial_weights_disabled", default=False)


@contextmanager
def initial_weights_disabled() -> Iterator[None]:
    """Inside, `load_weights` reads nothing: used while a model is rebuilt from a checkpoint, whose own state dict
    replaces whatever initial weights its config names (the file a run was fine-tuned from may be long gone,
    and a checkpoint's config must never make us read another file)."""
    token = _initial_weights_disabled.set(True)
    try:
        yield
    finally:
        _initial_weights_disabled.reset(token)


class UnsafeCheckpointError(RobustAttrError):
    """A pickle that would need to run code (objects beyond tensors and plain containers) to load."""


def safe_torch_load(path: str | Path) -> Any:
    """``torch.load(weights_only=True)`` with one clear error per failure: missing, truncated/corrupted,
    or carrying code."""
    path = Path(path)
    if not path.is_file():
        raise RobustAttrError(f"{path}: no such file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        detail = next(
            (line for line in lines if "global" in line.lower() or "unsupported" in line.lower()),
            lines[0] if lines else type(err).__name__,
        )
        if "global" in str(err).lower():  # the pickle's GLOBAL opcode names a function or class to call: code
            raise UnsafeCheckpointError(
                f"{path}: refused to load: the file's pickle references code or objects beyond tensors and "
                f"plain containers, and such code is never executed here ({detail})"
            ) from err
        raise RobustAttrError(f"{path}: not a readable PyTorch file (corrupted or truncated?): {detail}") from err
    except Exception as err:  # any other failure of a weights-only load: an unreadable file
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise RobustAttrError(f"{path}: not a readable PyTorch file (corrupted or truncated?): {first}") from err


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensor state dict stored in ``path`` (.pt/.pth/.ckpt pickle, or .safetensors)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        if not path.is_file():
            raise RobustAttrError(f"{path}: no such file")
        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as err:
            raise RobustAttrError(f"{path}: not a readable safetensors file: {err}") from err
    obj = safe_torch_load(path)
    if isinstance(obj, Mapping):
        for key in STATE_DICT_KEYS:
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise RobustAttrError(f"{path}: no state dict of tensors found (top-level type {type(obj).__name__})")
    return dict(obj)


def match_state_dict(state: Mapping[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Strip wrapper prefixes from ``state`` until its keys overlap the model's best."""
    wanted = set(model.state_dict())
    state = dict(state)
    while not wanted & set(state):
        prefix = next((p for p in WRAPPER_PREFIXES if all(k.startswith(p) for k in state)), None)
        if prefix is None:
            break
        state = {k[len(prefix) :]: v for k, v in state.items()}
    return state


def load_weights(model: nn.Module, path: str | Path, strict: bool = True) -> None:
    """Load the weights in ``path`` into ``model``; errors name the file and the offending keys. Does nothing
    inside `initial_weights_disabled` (a model being rebuilt from a checkpoint)."""
    if _initial_weights_disabled.get():
        return
    state = match_state_dict(load_state_dict_file(path), model)
    target = model.state_dict()
    shape_mismatch = [k for k, v in state.items() if k in target and target[k].shape != v.shape]
    if shape_mismatch and strict:
        details = ", ".join(f"{k} {tuple(state[k].shape)} vs {tuple(target[k].shape)}" for k in shape_mismatch[:5])
        raise RobustAttrError(f"{path}: shapes do not match the model: {details}")
    state = {k: v for k, v in state.items() if k not in shape_mismatch}
    result = model.load_state_dict(state, strict=False)
    if strict and (result.missing_keys or result.unexpected_keys):
        raise RobustAttrError(
            f"{path}: keys do not match the model: missing {result.missing_keys[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}"
        )
