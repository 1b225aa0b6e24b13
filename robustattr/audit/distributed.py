"""An audit over the processes of a torchrun or SLURM job.

`Shard` is what a process knows about the job: its rank, the number of processes, and how to exchange results
with the others. `setup` reads the environment Lightning reads (torchrun's ``RANK``/``WORLD_SIZE``/``MASTER_*``,
or SLURM's ``SLURM_PROCID``/``SLURM_NTASKS``/node list, through Lightning's cluster environments) and joins the
job's process group; outside such a job it returns the single-process shard and nothing is initialised.

Results travel over gloo whatever the device: sections keep their per-sample results on the CPU, and the
exchanges are a few kilobytes per chunk, so a GPU job needs no NCCL group (whose collectives would want those
tensors on the GPU). The group's timeout is long (`TIMEOUT`): a process that finishes its share first waits for
the others, and fitting the influence engine on an ImageNet training split can take hours between two exchanges; a
process that dies is noticed at once, by its closed connection, not by the timeout.

Progress goes through the job's key-value store: every process adds the chunks it finished to a counter per
part, and rank 0, the only one that displays, shows the counter: the progress of the whole job.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import os
import signal
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from robustattr.errors import RobustAttrError

TIMEOUT = datetime.timedelta(hours=24)


class JobStopped(RobustAttrError):
    """Another process of the job ended, or the launcher asked this one to stop: every process shares it, so
    only rank 0 prints it (`robustattr.errors.exit_with_error`)."""

    collective = True
    speaks: bool | None = None  # set by the job: True on the one process that says it (`Shard.claim`)


@dataclass(frozen=True)
class Shard:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    launcher: str = "none"  # "torchrun", "slurm" or "none"

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def block(self, n: int, rank: int | None = None) -> range:
        """This process's (or ``rank``'s) contiguous share of ``n`` samples: shares in rank order make up 0..n-1,
        so results gathered in rank order are in sample order."""
        r = self.rank if rank is None else rank
        return range(r * n // self.world, (r + 1) * n // self.world)

    def gather(self, items: list[Any]) -> list[Any]:
        """Every process's ``items``, concatenated in rank order (on every process)."""
        if not self.distributed:
            return list(items)
        parts: list[Any] = [None] * self.world
        _collective(dist.all_gather_object, parts, on_cpu(list(items)))
        return [item for part in parts for item in part]

    def broadcast(self, value: Any, src: int = 0) -> Any:
        """``value`` of process ``src``, on every process."""
        if not self.distributed:
            return value
        box = [value]
        _collective(dist.broadcast_object_list, box, src=src)
        return box[0]

    def claim(self, key: str) -> bool:
        """True for the first process of the job to claim ``key`` (through the job's store); without a store
        (rank 0's process hosted it and is gone), rank 0 claims it, or every other process where rank 0 is gone."""
        try:
            counted = self.add(key, 1)
        except JobStopped:
            return True  # the store died with the process that hosted it: rank 0, so no other would speak
        return self.main if counted is None else counted == 1

    def add(self, key: str, amount: int) -> int | None:
        """Add ``amount`` to the job's counter ``key``; its new value (None without a job store)."""
        store = _store()
        if store is None:
            return None
        try:
            return int(store.add(key, amount))
        except Exception as err:  # the store lives in rank 0 or the launcher: gone means the job is gone
            raise JobStopped(f"the job's store is gone ({type(err).__name__}: {err})") from err


SINGLE = Shard()


def on_cpu(obj: Any) -> Any:
    """``obj`` with every tensor in it (in lists, tuples, dicts and dataclasses) moved to the CPU, so that it
    pickles the same on every process whatever its GPU."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, list | tuple):
        return type(obj)(on_cpu(v) for v in obj)
    if isinstance(obj, dict):
        return {k: on_cpu(v) for k, v in obj.items()}
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        moved = copy.copy(obj)
        for f in dataclasses.fields(obj):
            object.__setattr__(moved, f.name, on_cpu(getattr(obj, f.name)))
        return moved
    return obj


def _collective(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except JobStopped:
        raise
    except Exception as err:  # gloo: "Connection closed by peer", "Socket Timeout", ...
        raise JobStopped(f"lost another process of the job ({type(err).__name__}: {str(err).splitlines()[0]})") from err


def _store():
    if not (dist.is_available() and dist.is_initialized()):
        return None
    try:
        from torch.distributed.distributed_c10d import _get_default_store

        return _get_default_store()
    except Exception:  # a torch without it: rank 0 then shows its own share's progress
        return None


def environment():
    """Lightning's environment of the current job (torchrun first, then SLURM), or None outside a job."""
    from lightning_fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment

    if TorchElasticEnvironment.detect():
        return "torchrun", TorchElasticEnvironment()
    if SLURMEnvironment.detect() and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        try:
            return "slurm", SLURMEnvironment()
        except Exception as err:  # Lightning's checks of the srun variables (e.g. --ntasks without --ntasks-per-node)
            raise RobustAttrError(f"SLURM: {err}") from err
    return None


def setup() -> tuple[Shard, bool]:
    """Join the job this process belongs to (see the module docstring): (its shard, whether the process group
    was created here); the single-process shard outside a job."""
    found = environment()
    if found is None:
        return SINGLE, False
    launcher, env = found
    world, rank = int(env.world_size()), int(env.global_rank())
    if world <= 1:
        return SINGLE, False
    shard = Shard(rank=rank, world=world, local_rank=int(env.local_rank()), launcher=launcher)
    joined = not dist.is_initialized()
    if joined:
        os.environ.setdefault("MASTER_ADDR", env.main_address)
        os.environ.setdefault("MASTER_PORT", str(env.main_port))
        dist.init_process_group("gloo", init_method="env://", rank=rank, world_size=world, timeout=TIMEOUT)
    _stop_on_sigterm()
    return shard, joined


def teardown(shard: Shard) -> None:
    if shard.distributed and dist.is_initialized():
        dist.destroy_process_group()


def _stop_on_sigterm() -> None:
    """torchrun and SLURM stop the other processes of a job with SIGTERM when one fails: end with one error line
    (rank 0's; the others end quietly) instead of a traceback."""

    def stop(signum, frame):
        raise JobStopped("the launcher stopped this process (SIGTERM): another process of the job ended")

    signal.signal(signal.SIGTERM, stop)


def device_for(device: str, shard: Shard) -> torch.device:
    """``device`` for this process: each process of a job on GPUs takes the GPU of its local rank."""
    d = torch.device(device)
    if d.type == "cuda" and d.index is None and shard.distributed:
        d = torch.device("cuda", shard.local_rank % max(1, torch.cuda.device_count()))
    if d.type == "cuda":
        torch.cuda.set_device(d)
    return d
