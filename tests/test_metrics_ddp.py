"""The metric classes gather per-sample values across processes (two CPU processes on gloo)."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from robustattr.metrics import (
    LabelKeptRate,
    LensRecall,
    SpearmanCorrelation,
    TopKIntersection,
    kendall_tau,
    lens_recall,
    lens_recall_div,
    map_collection,
    spearman,
    topk_intersection,
)

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]


def _data():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(10, 6, 6, generator=g)
    b = a + 0.5 * torch.rand(10, 6, 6, generator=g)
    kept = torch.tensor([1, 1, 0, 1, 1, 1, 0, 1, 1, 1], dtype=torch.bool)
    return a, b, kept


def _worker(rank: int, world: int, port: int, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    a, b, kept = _data()
    shard = slice(rank * 5, (rank + 1) * 5)  # uneven kept counts per process on purpose
    topk, rho, rate = TopKIntersection(k=4, per_sample=True), SpearmanCorrelation(), LabelKeptRate()
    topk.update(a[shard], b[shard], kept[shard])
    rho.update(a[shard], b[shard], kept[shard])
    rate.update(kept[shard])
    collection = map_collection(k=4)  # one compute group: the shared state syncs for every member
    collection.update(a[shard], b[shard], kept[shard])
    values = collection.compute()
    lens = LensRecall(k=4, per_sample=True)  # a locality-aware metric on its own, gathered per sample
    lens.update(a[shard], b[shard], kept[shard])
    out[rank] = (topk.compute().item(), rho.compute().item(), rate.compute().item(), topk.per_sample().numel(),
                 values["topk_intersection"].item(), values["kendall"].item(), lens.compute().item(),
                 lens.by_sample().tolist(), values["lens_recall_div"].item())  # fmt: skip
    dist.destroy_process_group()


def test_two_processes_report_the_single_process_values():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = mp.Manager().dict()
    mp.spawn(_worker, args=(2, port, out), nprocs=2, join=True)
    a, b, kept = _data()
    expected = (
        topk_intersection(a, b, 4)[kept].mean().item(),
        spearman(a, b)[kept].mean().item(),
        kept.float().mean().item(),
        int(kept.sum()),
        topk_intersection(a, b, 4)[kept].mean().item(),
        kendall_tau(a, b)[kept].mean().item(),
        lens_recall(a, b, 4)[kept].mean().item(),
    )
    lens = torch.where(kept, lens_recall(a, b, 4), float("nan")).tolist()
    for rank in (0, 1):
        assert out[rank][:7] == pytest.approx(expected, abs=1e-6)
        assert out[rank][7] == pytest.approx(lens, abs=1e-6, nan_ok=True)  # every sample, in process order
        assert out[rank][8] == pytest.approx(lens_recall_div(a, b, 4)[kept].mean().item(), abs=1e-6)
