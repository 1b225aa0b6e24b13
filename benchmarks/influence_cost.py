"""Cost of the influence backends as ratios measured in one run, on the quickstart's SmallCNN and the whole digits
training split. Each part runs in a fresh process, so its peak memory (max RSS) is its own.

    python benchmarks/influence_cost.py

Writes benchmarks/results/influence_cost.json with, at the top level:
- tracin_self_influence_vs_captum_batched: our TracIn self-influence over Captum TracInCP's batched hook mode
  (sample_wise_grads_per_batch=True) on the same work (3 checkpoints, the last layer, every training point)
  (target <= 0.5); tracin_self_influence_vs_captum: the same against Captum's default per-sample loop (<= 0.2);
  both the median over ``--rounds`` interleaved rounds (tracin, captum, captum_batched, again) of the median of
  ``--repeats`` whole runs (construction, checkpoint loading, fit, scores) in one process;
- monitor_over_epoch_32px: SelfInfluenceMonitor's printed time over the last training epoch, as train.py prints it,
  on CIFAR-shaped digits (``image_size: 32, channels: 3``, 10% planted flips, SmallCNN, Adam, the quickstart's
  batches), the median over the epochs it ran (target <= 0.10); forward_pass_over_epoch_32px: its floor, one plain
  eval forward pass over the training split at the same batch size, over the same epoch;
- tracin_seconds_per_1k_resnet18_32px: TracIn self-influence (3 checkpoints, last layer) of the CIFAR ResNet-18 on
  the same 32x32 RGB digits, seconds per 1000 training points on the whole split, with
  ``tracin_resnet18_growth_quarter_to_full`` (linear: 4);
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


def monitor_epochs(epochs: int) -> dict:
    """A short train.py-like run on 32x32 RGB digits with the monitor at every epoch: its printed figures."""
    import pytorch_lightning as pl

    from robustattr.callbacks import SelfInfluenceMonitor
    from robustattr.module import RobustClassifier

    pl.seed_everything(0, verbose=False)
    dm = DigitsDataModule(image_size=32, channels=3, label_noise=0.1)
    monitor = SelfInfluenceMonitor(every_n_epochs=1)
    shares, seconds = [], []
    original = monitor.run

    def run(trainer, module):
        out = original(trainer, module)
        if monitor._epoch_seconds:
            shares.append(monitor.last_seconds / monitor._epoch_seconds)
            seconds.append((monitor.last_seconds, monitor._epoch_seconds))
        return out

    monitor.run = run
    model = RobustClassifier(SmallCNN(in_channels=3), optimizer=lambda p: torch.optim.Adam(p, 3e-3))
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[monitor])  # fmt: skip
    trainer.fit(model, datamodule=dm)
    # the floor: one plain forward pass over the training split in eval mode at the same batch size, nothing else
    x, _ = TrainingSet.from_datamodule(dm).tensors()
    net = model.net.eval()
    start = time.perf_counter()
    with torch.no_grad():
        for xb in x.split(dm.eval_batch_size):
            net(xb)
    forward = time.perf_counter() - start
    epochs = sorted(e for _, e in seconds)
    shares.sort()
    return {"share": shares[len(shares) // 2], "monitor_and_epoch_seconds": seconds,
            "forward_over_epoch": forward / epochs[len(epochs) // 2], "forward_seconds": forward}  # fmt: skip


def resnet_tracin(fraction: float, folder: str) -> float:
    from robustattr.models import ResNet18

    dm = DigitsDataModule(image_size=32, channels=3)
    dm.prepare_data()
    x, y = TrainingSet.from_datamodule(dm).tensors()
    n = int(len(x) * fraction)
    torch.manual_seed(0)
    net = ResNet18(in_channels=3).eval()
    paths = []
    for i in range(3):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(0.01 * torch.randn_like(p))
        paths.append(str(Path(folder) / f"resnet{i}.pt"))
        torch.save(net.state_dict(), paths[-1])
    start = time.perf_counter()
    train = TrainingSet.from_tensors(x[:n], y[:n])
    TracIn(paths, learning_rates=[0.1] * 3, batch_size=64).fit(net, train).self_influence()
    seconds = time.perf_counter() - start
    for p in paths:
        Path(p).unlink()
    return seconds, n


def part(name: str, fraction: float, folder: str, queue, repeats: int = 1) -> None:
    torch.set_num_threads(2)
    if name == "monitor":
        queue.put((monitor_epochs(int(fraction)), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))
        return
    if name == "resnet_tracin":
        queue.put((resnet_tracin(fraction, folder), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))
        return
    times = []
    for _ in range(repeats):
        times.append(once(name, fraction, folder))
    times.sort()
    queue.put((times[len(times) // 2], resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))


def once(name: str, fraction: float, folder: str) -> float:
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
    return time.perf_counter() - start


def measure(name: str, folder: Path, fraction: float = 1.0, repeats: int = 1):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    process = ctx.Process(target=part, args=(name, fraction, str(folder), queue, repeats))
    process.start()
    result = queue.get(timeout=3600)
    process.join()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "influence_cost.json"))
    parser.add_argument("--repeats", type=int, default=5, help="whole runs of each fast part; the median is kept")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the fast parts")
    parser.add_argument("--monitor_epochs", type=int, default=4)
    args = parser.parse_args()
    folder = Path(args.out).parent / "influence_cost_checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    net, train = setup()
    paths = checkpoints(net, train, folder)
    seconds, rss = {}, {}
    # the fast parts in interleaved rounds (a slow spell of this shared machine then hits both sides of a ratio),
    # each round a fresh process of `repeats` whole runs; the median of the rounds' medians is kept
    fast = ("tracin", "captum", "captum_batched")
    rounds = {name: [] for name in fast}
    for _ in range(args.rounds):
        for name in fast:
            value, rss[name] = measure(name, folder, repeats=args.repeats)
            rounds[name].append(value)
    for name in ("epoch", *fast, "ekfac_self", "ekfac_pairwise"):
        if name in fast:
            seconds[name] = sorted(rounds[name])[len(rounds[name]) // 2]
        else:
            seconds[name], rss[name] = measure(name, folder, repeats=1)
        print(f"{name:16s} {seconds[name]:8.2f} s  peak {rss[name]:7.0f} MB", flush=True)
    quarter = {name: measure(name, folder, 0.25, args.repeats if name == "tracin" else 1)[0]
               for name in ("tracin", "ekfac_self")}  # fmt: skip
    monitor, rss["monitor"] = measure("monitor", folder, args.monitor_epochs)
    print(f"monitor          {monitor['share']:.3f} of an epoch", flush=True)
    (resnet_full, n_full), rss["resnet_tracin"] = measure("resnet_tracin", folder, 1.0)
    (resnet_quarter, n_quarter), _ = measure("resnet_tracin", folder, 0.25)
    print(f"resnet tracin    {resnet_full:.2f} s on {n_full}, {resnet_quarter:.2f} s on {n_quarter}", flush=True)
    for p in paths:
        Path(p).unlink()
    folder.rmdir()
    result = {
        "tracin_self_influence_vs_captum_batched": seconds["tracin"] / seconds["captum_batched"],
        "monitor_over_epoch_32px": monitor["share"],
        "forward_pass_over_epoch_32px": monitor["forward_over_epoch"],
        "tracin_seconds_per_1k_resnet18_32px": resnet_full / n_full * 1000,
        "tracin_resnet18_growth_quarter_to_full": resnet_full / resnet_quarter,
        "tracin_self_influence_vs_captum": seconds["tracin"] / seconds["captum"],
        "ekfac_self_influence_over_epoch": seconds["ekfac_self"] / seconds["epoch"],
        "pairwise_100_over_epoch": seconds["ekfac_pairwise"] / seconds["epoch"],
        "peak_rss_mb": rss,
        "growth_quarter_to_full": {name: seconds[name] / quarter[name] for name in quarter},
        "seconds": seconds,
        "seconds_quarter": quarter,
        "fast_part_rounds_seconds": rounds,
        "monitor_and_epoch_seconds_32px": monitor["monitor_and_epoch_seconds"],
        "forward_pass_seconds_32px": monitor["forward_seconds"],
        "resnet18_tracin_seconds": {"full": resnet_full, "quarter": resnet_quarter, "points": [n_full, n_quarter]},
        "setup": {"model": "SmallCNN (quickstart, 67754 parameters)", "training_points": len(train),
                  "tracin": "3 checkpoints, last layer", "ekfac": "every Linear and Conv2d layer",
                  "repeats": args.repeats, "rounds": args.rounds,
                  "monitor": "SmallCNN(in_channels=3), digits 32x32 RGB, 10% flips, Adam",
                  "resnet18": "robustattr.models.ResNet18(in_channels=3), 11.2M parameters, batch 64"},
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "cpus": torch.get_num_threads()},
    }  # fmt: skip
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
