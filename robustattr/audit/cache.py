"""The audit's cache of finished (checkpoint, section) results.

An entry is keyed on everything that determines its numbers, so a stale result cannot be returned:
- the section's complete state (`fingerprint`: every attribute of the section and of the attacks, attributions
  and threat models it holds, recursively; not a hand-written ``repr``, which leaves settings out);
- the data: the resolved dataset config, split, subset size, batch size, seed and a hash of the subset itself;
- the checkpoint files' SHA-256;
- the code: the robustattr version and a hash of its source files, the torch version, and the device.

Entries are written atomically (`robustattr.files.atomic_write`); an entry that cannot be read back (empty,
truncated by a full disk, edited) is recomputed with a warning.
"""

from __future__ import annotations

import enum
import functools
import hashlib
import json
import math
import types
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import robustattr
from robustattr.files import atomic_write

_ATOMS = (type(None), bool, int, str)


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def fingerprint(obj: Any, _active: frozenset[int] = frozenset()) -> Any:
    """A JSON-able description of ``obj`` that changes whenever any of its state does: numbers exactly (floats
    by ``repr``), containers element by element, tensors by dtype, shape and a hash of their bytes, classes and
    functions by qualified name, and any other object by its type and all of its attributes, recursively.
    An object that cannot be described raises TypeError rather than being described incompletely."""
    if isinstance(obj, _ATOMS):
        return obj
    if isinstance(obj, float):
        return {"float": repr(obj)}
    if isinstance(obj, enum.Enum):
        return {"enum": f"{type(obj).__qualname__}.{obj.name}"}
    if id(obj) in _active:
        return {"cycle": type(obj).__qualname__}
    active = _active | {id(obj)}
    if isinstance(obj, list | tuple):
        return {type(obj).__name__: [fingerprint(v, active) for v in obj]}
    if isinstance(obj, dict):
        items = [[fingerprint(k, active), fingerprint(v, active)] for k, v in obj.items()]
        return {"dict": sorted(items, key=lambda kv: json.dumps(kv, sort_keys=True))}
    if isinstance(obj, set | frozenset):
        return {"set": sorted(json.dumps(fingerprint(v, active), sort_keys=True) for v in obj)}
    if isinstance(obj, torch.Tensor):
        flat = obj.detach().cpu().contiguous().reshape(-1)
        raw = flat.to(torch.uint8) if flat.dtype == torch.bool else flat.view(torch.uint8)
        return {"tensor": [str(obj.dtype), list(obj.shape), _digest(raw.numpy().tobytes())]}
    if isinstance(obj, np.ndarray):
        return {"ndarray": [str(obj.dtype), list(obj.shape), _digest(np.ascontiguousarray(obj).tobytes())]}
    if isinstance(obj, np.generic):
        return fingerprint(obj.item(), active)
    if isinstance(obj, type | types.FunctionType | types.BuiltinFunctionType | types.MethodType):
        return {"callable": f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"}
    if isinstance(obj, functools.partial):
        return {"partial": [fingerprint(part, active) for part in (obj.func, obj.args, obj.keywords)]}
    if isinstance(obj, torch.device | torch.dtype):
        return {type(obj).__name__: str(obj)}
    if isinstance(obj, nn.Module):
        public = {k: v for k, v in vars(obj).items() if not k.startswith("_")}
        return {
            "module": f"{type(obj).__module__}.{type(obj).__qualname__}",
            "attributes": fingerprint(public, active),
            "children": fingerprint(dict(obj.named_children()), active),
            "state": fingerprint(obj.state_dict(), active),
        }
    if hasattr(obj, "__dict__"):
        return {"object": f"{type(obj).__module__}.{type(obj).__qualname__}", "state": fingerprint(vars(obj), active)}
    raise TypeError(f"cannot fingerprint a {type(obj).__qualname__}: give it a __dict__ or describe it explicitly")


def key_of(parts: Any) -> str:
    return _digest(json.dumps(parts, sort_keys=True).encode())[:24]


@functools.cache
def code_version() -> dict[str, str]:
    """The robustattr version, a hash of its source files (so an edited checkout never reuses old numbers), and
    the torch version."""
    root = Path(robustattr.__file__).parent
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return {"robustattr": robustattr.__version__, "source": digest.hexdigest()[:16], "torch": torch.__version__}


def data_fingerprint(x: torch.Tensor, y: torch.Tensor) -> str:
    return key_of([fingerprint(x), fingerprint(y)])


def json_safe(obj: Any) -> Any:
    """``obj`` with every NaN or infinite float replaced by None, so that ``json.dumps(allow_nan=False)`` writes
    standard JSON (a bare ``NaN`` is not JSON, and many readers refuse it)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    return obj


class ResultCache:
    """One JSON file per (section, checkpoint(s), key) in ``folder``; see the module docstring."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)

    def path(self, section: str, key: str) -> Path:
        return self.folder / f"{section}-{key}.json"

    def load(self, section: str, key: str) -> dict[str, Any] | None:
        path = self.path(section, key)
        if not path.is_file():
            return None
        try:
            entry = json.loads(path.read_text())  # Python's JSON reads back the NaN it wrote
            if not isinstance(entry, dict) or entry.get("key") != key or "result" not in entry:
                raise ValueError("not a cache entry of this key")
            return entry["result"]
        except (ValueError, UnicodeDecodeError, OSError) as err:
            warnings.warn(f"{path}: unreadable cache entry ({err}); recomputing it", RuntimeWarning, stacklevel=2)
            return None

    def store(self, section: str, key: str, result: dict[str, Any], seconds: float) -> None:
        entry = {"key": key, "seconds": seconds, "result": result}
        atomic_write(self.path(section, key), json.dumps(entry))
