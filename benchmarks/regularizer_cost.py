"""Cost of each objective term relative to a plain cross-entropy training step, on one model and batch.

    python benchmarks/regularizer_cost.py [--device cuda] [--model resnet18] [--batch 64]

Writes benchmarks/results/regularizer_cost.json: for each term, ``time_ratio`` (median training-step time,
forward + penalty + one backward + SGD step, over the plain step's) and ``memory_ratio`` (extra memory of a
step over the plain step's: CUDA peak allocated memory; on CPU the peak resident-memory increase of one step,
each term measured in a fresh process). Targets: gradient_norm <= 3.0, cure <= 2.5, ssr <= 3.5 (10 classes),
hessian_norm (one probe) <= 3.5. It also times the Hessian-vector products by reverse-over-reverse,
forward-over-reverse and finite differences, with their errors against reverse-over-reverse.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import warnings
from pathlib import Path

import torch
from timing import median_seconds
from torch import nn

from robustattr.data import DigitsDataModule
from robustattr.models import ResNet18, SmallCNN
from robustattr.module import RobustClassifier
from robustattr.regularizers import CURE, SSR, TRADES, AdversarialCE, GradientNorm, HessianNorm, IGNorm, loss_hvp

TERMS = {
    "plain": lambda: [],
    "gradient_norm": lambda: [GradientNorm()],
    "cure": lambda: [CURE()],
    "ssr": lambda: [SSR()],
    "ssr_power_10": lambda: [SSR(method="power", power_iters=10)],
    "hessian_norm": lambda: [HessianNorm(probes=1)],
    "ig_norm": lambda: [IGNorm()],
    "pgd_at": lambda: [AdversarialCE()],
    "trades": lambda: [TRADES()],
}
TARGETS = {"gradient_norm": 3.0, "cure": 2.5, "ssr": 3.5, "hessian_norm": 3.5}


ACTIVATIONS = {"relu": nn.ReLU, "softplus": lambda: nn.Softplus(beta=10.0)}


def build(model_name: str, activation: str, batch_norm: bool = True) -> nn.Module:
    torch.manual_seed(0)
    if model_name == "smallcnn":
        return SmallCNN(in_channels=3, width=32, activation=ACTIVATIONS[activation], batch_norm=batch_norm)
    return ResNet18(activation=ACTIVATIONS[activation])


def batch(size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = next(iter(DigitsDataModule(image_size=32, channels=3, batch_size=size).train_dataloader()))
    return x.to(device), y.to(device)


def make_step(model_name: str, activation: str, term_name: str, x: torch.Tensor, y: torch.Tensor):
    module = RobustClassifier(build(model_name, activation), terms=TERMS[term_name]()).to(x.device).train()
    # lr 0: every operation of a training step runs, but repeated steps cannot diverge and change the timing
    optimizer = torch.optim.SGD(module.parameters(), lr=0.0, momentum=0.9)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # self.log outside a Trainer
            loss = module.training_step((x, y), 0)
        loss.backward()
        optimizer.step()

    return step


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def peak_rss_bytes() -> int:
    """VmHWM: the peak resident memory of this address space (reset by exec, unlike ru_maxrss)."""
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def memory_of_one_step(model_name: str, activation: str, term_name: str, size: int, device: torch.device) -> int:
    """Extra memory of one training step: CUDA peak allocated, or CPU peak RSS increase (fresh process)."""
    x, y = batch(size, device)
    step = make_step(model_name, activation, term_name, x, y)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated(device) - base
    base = rss_bytes()
    step()
    return peak_rss_bytes() - base


def cpu_memory_in_fresh_process(args: argparse.Namespace, activation: str, term_name: str) -> int:
    cmd = [sys.executable, __file__, "--memory-of", term_name, "--model", args.model, "--batch", str(args.batch)]
    cmd += ["--activation", activation]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return int(out.strip().splitlines()[-1])


def hvp_comparison(model_name: str, x: torch.Tensor, y: torch.Tensor, repeats: int) -> dict:
    """One graph-free input Hessian-vector product of the loss, three ways, on the BatchNorm-free softplus
    network (on a ReLU network the finite difference would measure region changes, not curvature)."""
    net = build(model_name, "softplus", batch_norm=False).to(x.device).eval()
    v = torch.randn_like(x)
    results, reference = {}, None
    for mode in ("reverse", "forward", "finite_difference"):
        seconds = median_seconds(lambda m=mode: loss_hvp(net, x, y, v, m, create_graph=False), repeats)
        hv = loss_hvp(net, x, y, v, mode, create_graph=False)
        reference = hv if reference is None else reference
        error = ((hv - reference).norm() / reference.norm()).item()
        results[mode] = {"seconds": round(seconds, 5), "relative_error_vs_reverse": float(f"{error:.3g}")}
    base = results["reverse"]["seconds"]
    for mode in results:
        results[mode]["time_vs_reverse"] = round(results[mode]["seconds"] / base, 3)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", choices=["smallcnn", "resnet18"], default=None)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="benchmarks/results/regularizer_cost.json")
    parser.add_argument("--activations", nargs="+", choices=list(ACTIVATIONS), default=["softplus", "relu"],
                        help="the first gives the top-level ratios")  # fmt: skip
    parser.add_argument("--activation", default="relu", help=argparse.SUPPRESS)
    parser.add_argument("--memory-of", default=None, help=argparse.SUPPRESS)  # internal: one CPU memory probe
    args = parser.parse_args()
    device = torch.device(args.device)
    args.model = args.model or ("resnet18" if device.type == "cuda" else "smallcnn")

    if args.memory_of:
        print(memory_of_one_step(args.model, args.activation, args.memory_of, args.batch, device))
        return

    x, y = batch(args.batch, device)
    by_activation = {}
    for activation in args.activations:
        seconds = {
            name: median_seconds(
                make_step(args.model, activation, name, x, y), args.repeats if name != "ig_norm" else 1
            )
            for name in TERMS
        }
        memory = {
            name: (
                memory_of_one_step(args.model, activation, name, args.batch, device)
                if device.type == "cuda"
                else cpu_memory_in_fresh_process(args, activation, name)
            )
            for name in TERMS
        }
        terms = {
            name: {
                "time_ratio": round(seconds[name] / seconds["plain"], 3),
                "memory_ratio": round(memory[name] / max(memory["plain"], 1), 3),
                "step_seconds": round(seconds[name], 5),
                "step_memory_bytes": memory[name],
            }
            for name in TERMS
            if name != "plain"
        }
        by_activation[activation] = {
            "plain_step_seconds": round(seconds["plain"], 5),
            "plain_step_memory_bytes": memory["plain"],
            **terms,
            "met": {k: terms[k]["time_ratio"] <= v for k, v in TARGETS.items()},
        }
    primary = by_activation[args.activations[0]]
    result = {
        "command": f"python benchmarks/regularizer_cost.py --device {args.device} --model {args.model} "
        f"--batch {args.batch} --repeats {args.repeats}",
        "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        "threads": torch.get_num_threads(),
        "model": f"{args.model} with BatchNorm; top-level ratios: {args.activations[0]} activations",
        "batch": args.batch,
        "input": list(x.shape[1:]),
        "classes": 10,
        "memory_measure": "CUDA peak allocated" if device.type == "cuda" else "CPU peak RSS increase, fresh process",
        **{k: v for k, v in primary.items()},
        "targets": {k: f"time_ratio <= {v}" for k, v in TARGETS.items()},
        "by_activation": by_activation,
        "hvp_comparison": hvp_comparison(args.model, x, y, args.repeats),
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    for activation, numbers in by_activation.items():
        summary = {
            k: (v["time_ratio"], v["memory_ratio"])
            for k, v in numbers.items()
            if isinstance(v, dict) and "time_ratio" in v
        }
        print(activation, json.dumps({"time_ratio, memory_ratio": summary, "met": numbers["met"]}))
    print(json.dumps(result["hvp_comparison"], indent=2))
    print(f"written to {out}")


if __name__ == "__main__":
    main()
