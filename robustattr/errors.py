"""Errors that end a run with one clear message.

`train.py` and `evaluate.py` print a `RobustAttrError` as a single line and exit non-zero without a
traceback: the message is the whole story (what is wrong, and what to do about it). Libraries between the
raise and the CLI may wrap it (jsonargparse reports a constructor's error inside its own ValueError, a
DataLoader worker re-raises it with the worker's traceback in the text); `find_user_error` digs it out.
"""

from __future__ import annotations

import operator
import os
import sys
from typing import NoReturn


class RobustAttrError(Exception):
    """An error caused by the user's input (config, data, checkpoint) rather than by a bug.

    ``collective``: every process of a distributed run raises the same error at the same point (a decision
    they took together), so only global rank 0 prints it."""

    collective = False


class ConfigError(RobustAttrError, ValueError):
    """A configuration value that parses but cannot work (wrong class count, impossible epsilon, ...)."""


class DatasetNotFoundError(RobustAttrError, FileNotFoundError):
    """A dataset is not on disk and cannot be downloaded."""


class NonFiniteError(RobustAttrError, FloatingPointError):
    """A NaN or infinite value where training or an audit needs finite numbers (loss, weights)."""


def keep_counts(owner: object, **counts: int) -> None:
    """Check each count (steps, samples, iterations: whole numbers of at least 1) and keep it on ``owner`` under
    its own name; the first bad one ends with a ConfigError naming the owner, the option and the value."""
    for name, value in counts.items():
        try:
            count = operator.index(value)  # ints and integer-like numbers (numpy), not floats or bools' kin
        except TypeError:
            count = None
        if count is None or isinstance(value, bool) or count < 1:
            raise ConfigError(f"{type(owner).__name__}: {name} must be a whole number of at least 1, got {value!r}")
        setattr(owner, name, count)


def find_user_error(err: BaseException | None) -> RobustAttrError | None:
    """The first `RobustAttrError` in ``err`` or the exceptions it was raised from or while handling."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, RobustAttrError):
            return err
        err = err.__cause__ or err.__context__
    return None


def one_line(err: BaseException) -> str:
    """The message of ``err`` on one line. A DataLoader worker re-raises an error with the text
    ``Caught <Type> in DataLoader worker process N.\\nOriginal Traceback ...\\n<module.Type>: <message>``: the
    original message is its last line."""
    text = str(err).strip()
    if text.startswith("Caught ") and "Original Traceback" in text:
        last = text.splitlines()[-1]
        prefix = f"{type(err).__module__}.{type(err).__name__}: "
        text = last[len(prefix) :] if last.startswith(prefix) else last
    return " ".join(text.split())


def _rank_and_world() -> tuple[int, int]:
    """This process's global rank and the number of processes: from torch.distributed once a process group
    exists, else from the launcher's environment (torchrun, SLURM, Lightning's launcher)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    names = ("RANK", "SLURM_PROCID", "LOCAL_RANK")
    rank = next((int(os.environ[n]) for n in names if os.environ.get(n, "").isdigit()), 0)
    world = int(os.environ["WORLD_SIZE"]) if os.environ.get("WORLD_SIZE", "").isdigit() else 1
    return rank, world


def exit_with_error(err: BaseException, status: int = 1) -> NoReturn:
    """Print ``error: <message>`` on stderr and exit with ``status``, without a traceback. In a distributed run
    each process prints its own error prefixed with its rank, except a ``collective`` error, which all processes
    share and only global rank 0 prints, or the one process its ``speaks`` names (a job that lost a process, maybe
    rank 0)."""
    from rich.console import Console
    from rich.markup import escape

    rank, world = _rank_and_world()
    speaks = getattr(err, "speaks", None)  # True/False: the job chose the process that says it
    if speaks is None:
        speaks = not (getattr(err, "collective", False) and rank != 0)
    if speaks:
        where = f" (rank {rank})" if world > 1 and not getattr(err, "collective", False) else ""
        Console(stderr=True, highlight=False).print(
            f"[bold red]error{where}:[/bold red] {escape(one_line(err))}", soft_wrap=True
        )
        sys.stderr.flush()
    raise SystemExit(status) from None
