"""Images per second of a plain training step, of each objective term's step, and of each validation callback's
work, for ResNet-18 at 32x32 and ResNet-50 at 224x224, in fp32 and bf16 (autocast), with channels_last off and on.

    python benchmarks/gpu_throughput.py --device cuda            # the real sizes, on a GPU
    python benchmarks/gpu_throughput.py --sizes tiny             # the same code paths, tiny, on the CPU (tested)

Writes benchmarks/results/gpu_throughput.json (``--out`` elsewhere): one row per (model, precision,
channels_last, workload) with ``images_per_second`` and ``ratio_to_plain`` (the plain step's throughput over the
workload's, in that row's setting), plus the top-level ``plain_images_per_second`` of each model. Timing is
torch.utils.benchmark's (it synchronises CUDA), after a warm-up call. Softplus(10) networks, random images:
the cost, not the accuracy, is measured.
"""

from __future__ import annotations

import argparse
import json
import platform
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.utils.benchmark as benchmark
from torch import nn

from robustattr.attacks import BIM, PGD, RandomSignAttack, TopKAttack
from robustattr.attributions import Saliency
from robustattr.metrics import pixel_map, top_hessian_eigenvalue
from robustattr.models import ResNet18, TorchvisionNet
from robustattr.module import RobustClassifier
from robustattr.regularizers import CURE, SSR, TRADES, AdversarialCE, GradientNorm, HessianNorm, IGNorm

SOFTPLUS = lambda: nn.Softplus(beta=10.0)  # noqa: E731

SIZES = {
    # name: (factory, image size, batch, classes)
    "full": {
        "resnet18_32": (lambda: ResNet18(activation=SOFTPLUS), 32, 256, 10),
        "resnet50_224": (lambda: TorchvisionNet("resnet50", activation=SOFTPLUS), 224, 64, 1000),
    },
    "tiny": {
        "resnet18_32": (lambda: ResNet18(width=4, activation=SOFTPLUS), 16, 4, 10),
        "resnet50_224": (lambda: TorchvisionNet("resnet18", num_classes=10, activation=SOFTPLUS), 16, 2, 10),
    },
}


def terms(classes: int, small: bool) -> dict[str, Callable[[], list]]:
    steps = 2 if small else 10
    return {
        "plain": lambda: [],
        "gradient_norm": lambda: [GradientNorm()],
        "cure": lambda: [CURE()],
        "ssr": lambda: [SSR(method="exact" if classes <= 20 else "power", power_iters=steps)],
        "hessian_norm": lambda: [HessianNorm()],
        "ig_norm": lambda: [IGNorm(attack_steps=2 if small else 7, ig_steps=4 if small else 50, attack_ig_steps=2)],
        "pgd_at": lambda: [AdversarialCE(attack=PGD(steps=steps))],
        "trades": lambda: [TRADES(steps=steps)],
    }


def callbacks(small: bool) -> dict[str, Callable[[nn.Module, torch.Tensor, torch.Tensor], object]]:
    """What each validation callback does per chunk (the callbacks' own `process`, without a Trainer)."""
    steps = 2 if small else 10
    bim, topk, random_sign = BIM(steps=steps, seed=0), TopKAttack(steps=steps, seed=0), RandomSignAttack(seed=0)

    def fragility(model, x, y):
        topk.run(model, x, y)
        random_sign.run(model, x, y)

    def panels(model, x, y):
        pixel_map(Saliency()(model, x, y))

    return {
        "adversarial_validation": lambda model, x, y: bim(model, x, y),
        "fragility_validation": fragility,
        "curvature_monitor": lambda model, x, y: top_hessian_eigenvalue(model, x, y, steps),
        "attribution_panels": panels,
    }


def throughput(fn: Callable[[], object], images: int, min_time: float) -> float:
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn})
    if min_time <= 0:  # a smoke run of the code paths: one call, no warm-up
        return images / timer.timeit(1).median
    fn()  # warm-up (lazy initialisation, cuDNN autotuning)
    return images / timer.blocked_autorange(min_run_time=min_time).median


def measure(device: torch.device, sizes: str, min_time: float) -> dict:
    rows = []
    plain = {}
    small = sizes == "tiny"
    for model_name, (factory, size, batch, classes) in SIZES[sizes].items():
        g = torch.Generator().manual_seed(0)
        x = torch.rand(batch, 3, size, size, generator=g).to(device)
        y = torch.randint(0, classes, (batch,), generator=g).to(device)
        for precision in ("fp32", "bf16"):
            for channels_last in (False, True):
                autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
                layout = torch.channels_last if channels_last else torch.contiguous_format
                xs = x.contiguous(memory_format=layout)
                setting = {"model": model_name, "image_size": size, "batch": batch, "precision": precision,
                           "channels_last": channels_last}  # fmt: skip
                baseline = None
                for workload, make_terms in terms(classes, small).items():
                    torch.manual_seed(0)
                    module = RobustClassifier(factory(), terms=make_terms()).to(device, memory_format=layout).train()
                    optimizer = torch.optim.SGD(module.parameters(), lr=0.0)  # the work of a step, weights unchanged

                    def step(module=module, optimizer=optimizer, autocast=autocast, xs=xs, y=y):
                        optimizer.zero_grad(set_to_none=True)
                        with autocast, warnings.catch_warnings():
                            warnings.simplefilter("ignore")  # self.log without a Trainer
                            loss = module.training_step((xs, y), 0)
                        loss.backward()
                        optimizer.step()

                    rate = throughput(step, batch, min_time)
                    baseline = rate if workload == "plain" else baseline
                    rows.append({**setting, "workload": workload, "images_per_second": rate,
                                 "ratio_to_plain": baseline / rate})  # fmt: skip
                net = factory().to(device, memory_format=layout).eval()
                for workload, work in callbacks(small).items():

                    def run(work=work, net=net, autocast=autocast, xs=xs, y=y):
                        with autocast:
                            work(net, xs, y)

                    rate = throughput(run, batch, min_time)
                    rows.append({**setting, "workload": workload, "images_per_second": rate,
                                 "ratio_to_plain": baseline / rate})  # fmt: skip
                if precision == "fp32" and not channels_last:
                    plain[model_name] = baseline
    return {"rows": rows, "plain": plain}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sizes", choices=sorted(SIZES), default="full")
    parser.add_argument(
        "--min-time", type=float, default=1.0, help="seconds of timed runs per measurement (0: one timed call)"
    )
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "gpu_throughput.json"))
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    result = measure(device, args.sizes, args.min_time)
    report = {
        "command": "python benchmarks/gpu_throughput.py " + " ".join(argv if argv is not None else []),
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu ({torch.get_num_threads()} threads)",
        "sizes": args.sizes,
        "plain_images_per_second": result["plain"],
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "rows": result["rows"],
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    for row in result["rows"]:
        print(f"{row['model']:>13} {row['precision']} cl={int(row['channels_last'])} {row['workload']:>22} "
              f"{row['images_per_second']:10.1f} img/s  x{row['ratio_to_plain']:.2f}")  # fmt: skip
    return report


if __name__ == "__main__":
    main()
