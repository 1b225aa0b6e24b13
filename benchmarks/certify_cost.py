"""What a certificate costs against one SmoothGrad of the same number of draws, in one run on the same images.

    python benchmarks/certify_cost.py [--device cpu|cuda] [--n 4096] [--resnet-n 256]

Both certificates (`robustattr.certify.certify`: Levine et al.'s top-k bound and Anani et al.'s per-pixel tests)
come from the same n noisy attributions; SmoothGrad with ``samples=n`` computes n gradients too, so the ratio says
what the binarisation, the per-draw top-k and the bounds add. Two networks: the quickstart CNN (SmallCNN, 8x8
digits) and a CIFAR ResNet-18 on 32x32 RGB inputs (``--resnet-n`` draws: the cost is linear in n, and 2 CPU cores
take seconds per image at a few hundred draws). Weights are the networks' initialisation: the cost does not depend
on them.

Writes benchmarks/results/certify_cost.json with, at the top level, per network: ``certify_over_smoothgrad`` (the
ratio), ``certify_seconds_per_image``, ``smoothgrad_seconds_per_image``, ``bounds_seconds_per_image`` (the bounds of
both certificates from the counts: the part that is not drawing), and ``draws``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
from timing import median_seconds

ROOT = Path(__file__).resolve().parents[1]


def measure(name: str, net: torch.nn.Module, x: torch.Tensor, n: int, batch_size: int, repeats: int) -> dict:
    from robustattr.attacks.base import gradient_context
    from robustattr.attributions import Saliency, SmoothGrad
    from robustattr.certify import _top_counts, certify, default_n0

    net.eval()
    with torch.no_grad():
        target = net(x).argmax(dim=1)
    smooth = SmoothGrad(samples=n, sigma=0.25, chunk=max(1, batch_size // len(x)))
    certify_s = median_seconds(
        lambda: certify(net, x, Saliency(), 0.25, n, target=target, batch_size=batch_size), repeats
    )

    def draws_only():
        with gradient_context(net):
            _top_counts(net, x, target, Saliency(), 0.25, n, default_n0(n), 8 if x.shape[-1] == 8 else 100,
                        batch_size, list(range(len(x))))  # fmt: skip

    draws_s = median_seconds(draws_only, repeats)
    smooth_s = median_seconds(lambda: smooth(net, x, target), repeats)
    images = len(x)
    return {
        "network": name,
        "images": images,
        "draws": n,
        "certify_seconds_per_image": round(certify_s / images, 4),
        "smoothgrad_seconds_per_image": round(smooth_s / images, 4),
        "bounds_seconds_per_image": round(max(0.0, certify_s - draws_s) / images, 4),
        "certify_over_smoothgrad": round(certify_s / smooth_s, 3),
    }


def main(argv: list[str] | None = None) -> dict:
    from robustattr.models import ResNet18, SmallCNN

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--n", type=int, default=4096, help="draws per digit (the default audit's)")
    parser.add_argument("--resnet-n", type=int, default=256, help="draws per 32x32 image for the ResNet-18")
    parser.add_argument("--images", type=int, default=8, help="digits certified together")
    parser.add_argument("--resnet-images", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "certify_cost.json"))
    args = parser.parse_args(argv)
    start = time.perf_counter()
    torch.manual_seed(0)
    device = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    runs = {
        "quickstart_cnn": measure(
            "SmallCNN (configs/quickstart.yaml), 1x8x8", SmallCNN().to(device),
            torch.rand(args.images, 1, 8, 8, generator=g).to(device), args.n, args.batch_size, args.repeats,
        ),
        "resnet18_32px": measure(
            "ResNet18, 3x32x32", ResNet18(num_classes=10, in_channels=3).to(device),
            torch.rand(args.resnet_images, 3, 32, 32, generator=g).to(device), args.resnet_n,
            min(args.batch_size, 256), args.repeats,
        ),
    }  # fmt: skip
    keys = ("certify_over_smoothgrad", "certify_seconds_per_image", "smoothgrad_seconds_per_image",
            "bounds_seconds_per_image", "draws")  # fmt: skip
    out = {
        **{key: {name: r[key] for name, r in runs.items()} for key in keys},
        "runs": runs,
        "device": str(device),
        "seconds": round(time.perf_counter() - start, 1),
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "torch": torch.__version__,
        "command": "python benchmarks/certify_cost.py " + " ".join(sys.argv[1:] if argv is None else argv),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps({k: out[k] for k in keys}))
    return out


if __name__ == "__main__":
    main()
