"""Attack throughput, as ratios measured in one run on the same model and batch.

    python benchmarks/attack_throughput.py [--device cuda] [--model resnet18] [--batch 64]

Writes benchmarks/results/attack_throughput.json:
- bim_step_over_forward_backward: one BIM step over one plain forward + input-gradient pass (target <= 1.15)
- explanation_step_over_bim_step: one top-k saliency-attack step over one BIM step, on the benchmark model as
  it is (a ReLU network: the attack gradient comes from a softplus surrogate and every iterate is judged on
  the original network) (target <= 3.0); `..._smooth` is the same on the softplus version of the network,
  where one pass serves both the step and the judging
- pgd_vs_captum, pgd_vs_torchattacks: our PGD over captum.robust.PGD and torchattacks.PGD, same steps (<= 1.0)
- ig_vs_captum: our Integrated Gradients over Captum's, same steps (<= 1.0)
- batched_speedup: a batch of explanation attacks against a per-image loop of the same code (>= 10)
and images per second for every attack. torchattacks is not a dependency of robustattr: install it for the
benchmark only, without its pinned dependencies: `pip install --no-deps torchattacks`.
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import captum
import captum.attr
import captum.robust
import torch
import torch.nn.functional as F
from timing import median_seconds
from torch import nn

from robustattr.attacks import (
    BIM,
    FGSM,
    LBFGS,
    PGD,
    LinfBall,
    MassCenterAttack,
    RandomSignAttack,
    TargetedAttack,
    TargetMapAttack,
    TopKAttack,
)
from robustattr.attributions import IntegratedGradients
from robustattr.data import DigitsDataModule
from robustattr.models import ResNet18, SmallCNN, swap_activations

TARGETS = {
    "bim_step_over_forward_backward": ("<=", 1.15),
    "explanation_step_over_bim_step": ("<=", 3.0),
    "pgd_vs_captum": ("<=", 1.0),
    "pgd_vs_torchattacks": ("<=", 1.0),
    "ig_vs_captum": ("<=", 1.0),
    "batched_speedup": (">=", 10.0),
}


def build_model(name: str) -> nn.Module:
    torch.manual_seed(0)
    if name == "smallcnn":
        return SmallCNN(in_channels=3, width=32)
    return ResNet18()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", choices=["smallcnn", "resnet18"], default=None,
                        help="default: smallcnn on cpu, resnet18 on cuda")  # fmt: skip
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10, help="steps of the iterative attacks")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results/attack_throughput.json")
    args = parser.parse_args()

    device = torch.device(args.device)
    model_name = args.model or ("resnet18" if device.type == "cuda" else "smallcnn")
    model = build_model(model_name).to(device).eval()
    smooth = build_model(model_name).to(device).eval()
    swap_activations(smooth, lambda: nn.Softplus(beta=10.0))

    data = DigitsDataModule(image_size=32, channels=3, batch_size=args.batch)  # CIFAR-shaped real images
    x, y = next(iter(data.train_dataloader()))
    x, y = x.to(device), y.to(device)
    n, steps = x.shape[0], args.steps

    def time_it(fn, repeats: int | None = None) -> float:
        return median_seconds(fn, repeats or args.repeats)

    eps = LinfBall(8 / 255)
    seconds: dict[str, float] = {}

    def forward_input_gradient():
        xr = x.clone().requires_grad_(True)
        torch.autograd.grad(F.cross_entropy(model(xr), y, reduction="sum"), xr)

    seconds["forward_input_gradient"] = time_it(forward_input_gradient)
    seconds["bim_step"] = time_it(lambda: BIM(eps, steps=steps)(model, x, y)) / steps
    topk = TopKAttack(threat=eps, steps=steps)
    seconds["topk_step"] = time_it(lambda: topk.run(model, x, y)) / steps
    seconds["bim_step_smooth"] = time_it(lambda: BIM(eps, steps=steps)(smooth, x, y)) / steps
    seconds["topk_step_smooth"] = time_it(lambda: topk.run(smooth, x, y)) / steps

    alpha = 2 / 255
    ours_pgd = PGD(eps, steps=steps, step_size=alpha)
    seconds["pgd_ours"] = time_it(lambda: ours_pgd(model, x, y))
    captum_pgd = captum.robust.PGD(model, loss_func=nn.CrossEntropyLoss(reduction="none"))
    seconds["pgd_captum"] = time_it(
        lambda: captum_pgd.perturb(x, radius=eps.eps, step_size=alpha, step_num=steps, target=y, random_start=True)
    )
    try:
        import torchattacks

        ta_pgd = torchattacks.PGD(model, eps=eps.eps, alpha=alpha, steps=steps, random_start=True)
        seconds["pgd_torchattacks"] = time_it(lambda: ta_pgd(x, y))
    except ImportError:
        torchattacks = None

    target = model(x).argmax(dim=1).detach()
    ig = IntegratedGradients(steps=50)
    seconds["ig_ours"] = time_it(lambda: ig(model, x, target))
    captum_ig = captum.attr.IntegratedGradients(model)
    seconds["ig_captum"] = time_it(
        lambda: captum_ig.attribute(x, baselines=0.0, target=target, n_steps=50, method="riemann_right")
    )

    seconds["topk_batch"] = time_it(lambda: topk.run(model, x, y), repeats=1)
    seconds["topk_per_image_loop"] = time_it(
        lambda: [topk.run(model, x[i : i + 1], y[i : i + 1]) for i in range(n)], repeats=1
    )

    ratios = {
        "bim_step_over_forward_backward": seconds["bim_step"] / seconds["forward_input_gradient"],
        "explanation_step_over_bim_step": seconds["topk_step"] / seconds["bim_step"],
        "explanation_step_over_bim_step_smooth": seconds["topk_step_smooth"] / seconds["bim_step_smooth"],
        "pgd_vs_captum": seconds["pgd_ours"] / seconds["pgd_captum"],
        "pgd_vs_torchattacks": seconds["pgd_ours"] / seconds["pgd_torchattacks"] if torchattacks else None,
        "ig_vs_captum": seconds["ig_ours"] / seconds["ig_captum"],
        "batched_speedup": seconds["topk_per_image_loop"] / seconds["topk_batch"],
    }

    attacks = {
        "fgsm": FGSM(eps),
        f"bim_{steps}": BIM(eps, steps=steps),
        f"pgd_{steps}": PGD(eps, steps=steps),
        "lbfgs_3x20": LBFGS(search_steps=3, max_iter=20),
        f"topk_{steps}": TopKAttack(threat=eps, steps=steps),
        f"mass_center_{steps}": MassCenterAttack(threat=eps, steps=steps),
        f"targeted_{steps}": TargetedAttack(threat=eps, steps=steps),
        f"target_map_{steps}": TargetMapAttack(threat=eps, steps=steps),
        "random_sign": RandomSignAttack(threat=eps),
    }
    images_per_second = {
        name: n / time_it(lambda a=attack: a(model, x, y), repeats=1) for name, attack in attacks.items()
    }

    result = {
        "command": "python benchmarks/attack_throughput.py " + " ".join(f"--{k} {v}" for k, v in vars(args).items()),
        "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        "threads": torch.get_num_threads(),
        "model": model_name,
        "batch": n,
        "input": list(x.shape[1:]),
        "steps": steps,
        "versions": {
            "torch": torch.__version__,
            "captum": captum.__version__,
            "python": platform.python_version(),
            "torchattacks": getattr(torchattacks, "__version__", None),
        },
        "ratios": {k: (round(v, 3) if v is not None else None) for k, v in ratios.items()},
        "targets": {k: f"{op} {v}" for k, (op, v) in TARGETS.items()},
        "met": {
            k: (None if ratios[k] is None else (ratios[k] <= v if op == "<=" else ratios[k] >= v))
            for k, (op, v) in TARGETS.items()
        },
        "images_per_second": {k: round(v, 1) for k, v in images_per_second.items()},
        "seconds": {k: round(v, 5) for k, v in seconds.items()},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({"ratios": result["ratios"], "met": result["met"]}, indent=2))
    print(f"written to {out}")


if __name__ == "__main__":
    main()
