"""Sharding influence work across the processes of an initialised process group (Lightning's DDP, torchrun):
each process takes every world-th training point, and results are gathered in training-set order on every
process. Without a process group everything is local."""

from __future__ import annotations

import torch
import torch.distributed as dist


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def shard(n: int) -> torch.Tensor:
    """The training indices this process handles."""
    if not active():
        return torch.arange(n)
    return torch.arange(dist.get_rank(), n, dist.get_world_size())


def _comm_device() -> torch.device:
    """Where the process group's collectives take their tensors: the current GPU for NCCL (Lightning's DDP on
    GPUs), the CPU for gloo (CPU DDP, and the sharded audit, whose group is gloo whatever the device)."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if active():
        moved = t.to(_comm_device()).contiguous()
        dist.all_reduce(moved, op=dist.ReduceOp.SUM)
        t = moved.to(t.device)
    return t


def gather_rows(local: torch.Tensor, indices: torch.Tensor, n: int) -> torch.Tensor:
    """Rows computed for ``indices`` on each process, assembled into an (n, ...) tensor on every process."""
    if not active():
        out = local.new_zeros((n, *local.shape[1:]))
        out[indices.to(local.device)] = local
        return out
    world = dist.get_world_size()
    size = -(-n // world)  # every shard from `shard` has at most this many rows
    padded = local.new_zeros((size, *local.shape[1:]))
    padded[: len(local)] = local
    index = torch.full((size,), -1, dtype=torch.long, device=local.device)
    index[: len(indices)] = indices.to(local.device)
    comm = _comm_device()
    padded, index = padded.to(comm), index.to(comm)
    rows = [torch.empty_like(padded) for _ in range(world)]
    where = [torch.empty_like(index) for _ in range(world)]
    dist.all_gather(rows, padded)
    dist.all_gather(where, index)
    rows, where = torch.cat(rows).to(local.device), torch.cat(where).to(local.device)
    keep = where >= 0
    out = local.new_zeros((n, *local.shape[1:]))
    out[where[keep]] = rows[keep]
    return out


def all_reduce_max(value: int) -> int:
    if not active():
        return value
    t = torch.tensor([value], device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t)


def all_gather_varying(local: torch.Tensor, size: int) -> list[torch.Tensor]:
    """Every process's ``local`` (at most ``size`` rows), in rank order."""
    if not active():
        return [local]
    comm = _comm_device()
    padded = local.new_zeros((size, *local.shape[1:]), device=comm)
    padded[: len(local)] = local.to(comm)
    counts = [torch.zeros(1, dtype=torch.long, device=comm) for _ in range(dist.get_world_size())]
    dist.all_gather(counts, torch.tensor([len(local)], device=comm))
    rows = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(rows, padded)
    return [r[: int(c)].to(local.device) for r, c in zip(rows, counts, strict=True)]
