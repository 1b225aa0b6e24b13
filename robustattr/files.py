"""Writing files so that a fault (a full disk, a killed process) never leaves a truncated file under its real name.

Every file robustattr writes that a later run reads back (checkpoints, audit caches and reports) goes through
`atomic_write`: the content is written to a temporary file in the same folder, flushed to disk, and renamed over
the target in one step (``os.replace``, atomic on POSIX file systems). A failed write removes its temporary file
and leaves the target as it was.
"""

from __future__ import annotations

import errno
import io
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch
from fsspec.implementations.local import LocalFileSystem
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning_fabric.utilities.cloud_io import get_filesystem
from lightning_fabric.utilities.types import _PATH

from robustattr.errors import RobustAttrError

_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


class DiskFullError(RobustAttrError, OSError):
    """A write failed for lack of space (or a file-size limit); nothing was left half-written."""


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], Any] | bytes | memoryview | str) -> None:
    """Write ``path`` atomically: ``write`` is the content (bytes or text) or a function that writes to a binary
    file object. The temporary file lives next to the target (``.<name>.<random>.tmp``), so the final rename
    never crosses file systems."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            if isinstance(write, str):
                f.write(write.encode())
            elif isinstance(write, bytes | memoryview):
                f.write(write)
            else:
                write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, path)
    except BaseException as err:
        try:
            os.unlink(temp)
        except FileNotFoundError:
            pass
        if isinstance(err, OSError) and err.errno in _FULL:
            raise DiskFullError(
                f"{path}: cannot write it ({err.strerror}); free some space and run again: nothing was left "
                "half-written, and the previous file (if any) is intact"
            ) from err
        raise


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, saving through `atomic_write` on local paths: a full disk or a kill while
    saving leaves the previous files intact and no partial checkpoint under a real name. (Lightning's own writer
    stages the file in the system temporary folder and moves it into place, which becomes a plain,
    interruptible copy when the checkpoint folder is on another file system, the usual case on clusters.)
    Remote paths (``s3://`` and friends) keep Lightning's behaviour."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        if storage_options is not None or not isinstance(get_filesystem(path), LocalFileSystem):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        buffer = io.BytesIO()  # serialised first (as Lightning does): a failed write is then a plain OSError
        torch.save(checkpoint, buffer)
        atomic_write(path, buffer.getbuffer())
