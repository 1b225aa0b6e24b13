"""Cost of the influence backends as ratios measured in one run, on the quickstart's SmallCNN and the whole digits
training split. Each part runs in a fresh process, so its peak memory (max RSS) is its own.

    python benchmarks/influence_cost.py

Writes benchmarks/results/influence_cost.json with, at the top level:
- tracin_self_influence_vs_captum: our TracIn self-influence over Captum TracInCP's on the same work (3
  checkpoints, the last layer, every training point; Captum with its default per-sample loop) (target <= 0.2);
  tracin_self_influence_vs_captum_batched: the same against Captum's batched hook mode
  (sample_wise_grads_per_batch=True);
- ekfac_self_influence_over_epoch: EK-FAC fit + self-influence of every training point (every Linear and Conv2d
  layer) over one training epoch of the quickstart (batch 64, Adam) (target <= 10);
- pairwise_100_over_epoch: 100 queries x every training point with EK-FAC (scoring, factors fitted) over one
  epoch (target <= 10);
- peak_rss_mb: the peak memory of each part's process;
- growth_quarter_to_full: the time on the whole training split over the time on a quarter of it (linear: 4).
"""

from __future__ import annotations

import argparse
import copy
import json
import multiprocessing as mp
import platform
import resource
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from robustattr.data import DigitsDataModule
from robustattr.influence import EKFACInfluence, TracIn, TrainingSet
from robustattr.models import SmallCNN


def setup(fraction: float = 1.0):
    torch.manual_seed(0)
    dm = DigitsDataModule()
    dm.prepare_data()
    train = TrainingSet.from_datamodule(dm)
    x, y = train.tensors()
    n = int(len(x) * fraction)
    return SmallCNN(), TrainingSet.from_tensors(x[:n], y[:n])


def checkpoints(net, train, folder: Path) -> list[str]:
    paths = []
    model = copy.deepcopy(net)
    for epoch in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01 * torch.randn_like(p))
        paths.append(str(folder / f"epoch{epoch}.pt"))
        torch.save(model.state_dict(), paths[-1])
    return paths


def part(name: str, fraction: float, folder: str, queue) -> None:
    torch.set_num_threads(2)
    net, train = setup(fraction)
    x, y = train.tensors()
    paths = sorted(str(p) for p in Path(folder).glob("epoch*.pt"))
    start = time.perf_counter()
    if name == "epoch":
        model = copy.deepcopy(net).train()
        opt = torch.optim.Adam(model.parameters(), 1e-3)
        for xb, yb in zip(x.split(64), y.split(64), strict=True):
            opt.zero_grad()
            F.cross_entropy(model(xb), yb).backward()
            opt.step()
    elif name == "tracin":
        TracIn(paths, learning_rates=[0.1] * 3, batch_size=256).fit(net, train).self_influence()
    elif name.startswith("captum"):
        from captum.influence import TracInCP

        def load(m, path):
            m.load_state_dict(torch.load(path, weights_only=True))
            return 0.1

        batched = name == "captum_batched"
        loss = nn.CrossEntropyLoss(reduction="sum" if batched else "none")
        TracInCP(net.eval(), torch.utils.data.TensorDataset(x, y), paths, load, layers=["classifier"], loss_fn=loss,
                 batch_size=256, sample_wise_grads_per_batch=batched).self_influence()  # fmt: skip
    elif name == "ekfac_self":
        EKFACInfluence(scope="all", batch_size=256).fit(net, train).self_influence()
    elif name == "ekfac_pairwise":
        influence = EKFACInfluence(scope="all", batch_size=256).fit(net, train)
        start = time.perf_counter()  # scoring only: the factors are fitted once per model
        influence.scores(x[:100], y[:100])
    seconds = time.perf_counter() - start
    queue.put((seconds, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))


def measure(name: str, folder: Path, fraction: float = 1.0) -> tuple[float, float]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    process = ctx.Process(target=part, args=(name, fraction, str(folder), queue))
    process.start()
    result = queue.get(timeout=3600)
    process.join()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "influence_cost.json"))
    args = parser.parse_args()
    folder = Path(args.out).parent / "influence_cost_checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    net, train = setup()
    paths = checkpoints(net, train, folder)
    seconds, rss = {}, {}
    for name in ("epoch", "tracin", "captum", "captum_batched", "ekfac_self", "ekfac_pairwise"):
        seconds[name], rss[name] = measure(name, folder)
        print(f"{name:16s} {seconds[name]:8.2f} s  peak {rss[name]:7.0f} MB", flush=True)
    quarter = {name: measure(name, folder, 0.25)[0] for name in ("tracin", "ekfac_self")}
    for p in paths:
        Path(p).unlink()
    folder.rmdir()
    result = {
        "tracin_self_influence_vs_captum": seconds["tracin"] / seconds["captum"],
        "tracin_self_influence_vs_captum_batched": seconds["tracin"] / seconds["captum_batched"],
        "ekfac_self_influence_over_epoch": seconds["ekfac_self"] / seconds["epoch"],
        "pairwise_100_over_epoch": seconds["ekfac_pairwise"] / seconds["epoch"],
        "peak_rss_mb": rss,
        "growth_quarter_to_full": {name: seconds[name] / quarter[name] for name in quarter},
        "seconds": seconds,
        "seconds_quarter": quarter,
        "setup": {"model": "SmallCNN (quickstart, 67754 parameters)", "training_points": len(train),
                  "tracin": "3 checkpoints, last layer", "ekfac": "every Linear and Conv2d layer"},
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "cpus": torch.get_num_threads()},
    }  # fmt: skip
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
