"""Koh & Liang's training-set attack (their dog-vs-fish experiment) on a digits class pair, measured in one run.

    python benchmarks/training_set_attack.py [--pair 3 8] [--targets 40] [--budgets 1 2 5 10] [--epsilon 0.5]

Setup, as theirs: frozen features (a SmallCNN trained on the eight *other* digit classes, as their Inception was
trained on other images) and a logistic head on the pair, retrained to its optimum (L-BFGS, L2 penalty 0.01, which
is also the influence damping) after every change of the training set. For each correctly classified test image
(the target, taken in a seeded order) the attack perturbs the 1, 2, 5 or 10 training images with the largest
``I_pert,loss`` inside an L-infinity box of ``epsilon`` (signed steps against the gradient of their helpfulness to
the target, the head retrained before each step; labels unchanged), retrains the head and checks whether the
target's prediction flipped. The baseline perturbs the same training images by random signs of the same budget.

Writes benchmarks/results/training_set_attack.json with, at the top level, ``flipped_fraction`` and
``random_flipped_fraction`` (the fraction of targets whose prediction flipped, by number of poisoned images).
Koh & Liang: one poisoned image flipped 57% of their targets, two 77% (ImageNet-sized 299x299 images; digits are
8x8 with 17 grey levels, so the box here is much coarser).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from robustattr.data import DigitsDataModule
from robustattr.influence import ExactInfluence, TrainingSet
from robustattr.influence.attacks import TrainingSetAttack, random_sign
from robustattr.models import SmallCNN

DAMPING = 0.01


def _split(dm: DigitsDataModule, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    data = dm.plain_split(split)
    return torch.stack([data[i][0] for i in range(len(data))]), torch.tensor(
        [int(data[i][1]) for i in range(len(data))]
    )


class FrozenFeatureHead(nn.Module):
    """Frozen features (eval mode, no gradients to their parameters) and a trainable linear head."""

    def __init__(self, body: nn.Module, head: nn.Linear) -> None:
        super().__init__()
        self.body = body
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def feature_body(x: torch.Tensor, y: torch.Tensor, pair: tuple[int, int], width: int, epochs: int, seed: int):
    """A SmallCNN trained (Adam) on the classes outside ``pair``; its classifier removed, frozen, in float64."""
    torch.manual_seed(seed)
    keep = (y != pair[0]) & (y != pair[1])
    xs, ys = x[keep], y[keep]
    net = SmallCNN(width=width)
    opt = torch.optim.Adam(net.parameters(), 3e-3)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        net.train()
        for idx in torch.randperm(len(xs), generator=gen).split(64):
            opt.zero_grad()
            F.cross_entropy(net(xs[idx]), ys[idx]).backward()
            opt.step()
    net.classifier = nn.Identity()
    net = net.double().eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return net


def fit_head(body: nn.Module, x: torch.Tensor, y: torch.Tensor) -> FrozenFeatureHead:
    """The head at the optimum of mean cross-entropy + DAMPING / 2 |theta|^2 on the features of ``x`` (convex)."""
    with torch.no_grad():
        features = body(x.double())
    head = nn.Linear(features.shape[1], 2).double()
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    opt = torch.optim.LBFGS(head.parameters(), lr=1, max_iter=500, tolerance_grad=1e-10, tolerance_change=1e-12,
                            line_search_fn="strong_wolfe")  # fmt: skip

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(head(features), y) + DAMPING / 2 * sum((p**2).sum() for p in head.parameters())
        loss.backward()
        return loss

    opt.step(closure)
    return FrozenFeatureHead(body, head).eval()


def influence_of(model: FrozenFeatureHead, x: torch.Tensor, y: torch.Tensor) -> ExactInfluence:
    """Exact influence over the head; the damping is the L2 penalty, so H + damping I is the objective's Hessian."""
    return ExactInfluence(scope="last", damping=DAMPING, curvature="ggn", batch_size=512).fit(
        model, TrainingSet.from_tensors(x.double(), y)
    )


def setup(pair: tuple[int, int] = (3, 8), width: int = 32, epochs: int = 15, seed: int = 0):
    dm = DigitsDataModule()
    dm.prepare_data()
    dm.setup("fit")
    dm.setup("test")
    x, y = _split(dm, "train")
    x_test, y_test = _split(dm, "test")
    body = feature_body(x, y, pair, width, epochs, seed)

    def binary(xs, ys):
        keep = (ys == pair[0]) | (ys == pair[1])
        return xs[keep].double(), (ys[keep] == pair[1]).long()

    return body, *binary(x, y), *binary(x_test, y_test)


def attack_targets(body, x_train, y_train, x_test, y_test, targets: int, budgets, epsilon: float, steps: int,
                   seed: int = 0) -> dict:  # fmt: skip
    """The experiment: for each of ``targets`` correctly classified test images, every budget, attack vs random."""
    attack = TrainingSetAttack(epsilon, steps=steps)
    clean = fit_head(body, x_train, y_train)
    with torch.no_grad():
        correct = (clean(x_test).argmax(1) == y_test).nonzero().flatten()
    order = correct[torch.randperm(len(correct), generator=torch.Generator().manual_seed(seed))][:targets]
    influence = influence_of(clean, x_train, y_train)

    def fit(xs, ys):
        return influence_of(fit_head(body, xs, ys), xs, ys)

    flipped = {b: [] for b in budgets}
    random_flipped = {b: [] for b in budgets}
    for t, index in enumerate(order.tolist()):
        xq, yq = x_test[index : index + 1], y_test[index : index + 1]
        chosen = TrainingSetAttack.choose(influence, xq, yq, max(budgets))
        for b in budgets:
            poisoned = attack(fit, x_train, y_train, chosen[:b], xq, yq)
            rand = x_train.clone()
            rand[chosen[:b]] = random_sign(x_train[chosen[:b]], epsilon, seed + t)
            for images, out in ((poisoned, flipped), (rand, random_flipped)):
                with torch.no_grad():
                    out[b].append(bool(fit_head(body, images, y_train)(xq).argmax(1).item() != yq.item()))
    return {
        "flipped_fraction": {str(b): sum(v) / len(v) for b, v in flipped.items()},
        "random_flipped_fraction": {str(b): sum(v) / len(v) for b, v in random_flipped.items()},
        "targets": len(order),
        "clean_test_accuracy": float((clean(x_test).argmax(1) == y_test).double().mean()),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pair", type=int, nargs=2, default=[3, 8])
    parser.add_argument("--targets", type=int, default=40)
    parser.add_argument("--budgets", type=int, nargs="+", default=[1, 2, 5, 10])
    parser.add_argument("--epsilon", type=float, default=0.5)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "training_set_attack.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    start = time.perf_counter()
    body, x_train, y_train, x_test, y_test = setup(tuple(args.pair), seed=args.seed)
    result = attack_targets(body, x_train, y_train, x_test, y_test, args.targets, args.budgets, args.epsilon,
                            args.steps, args.seed)  # fmt: skip
    report = {
        **result,
        "pair": args.pair,
        "training_images": len(x_train),
        "epsilon": args.epsilon,
        "steps": args.steps,
        "seconds": round(time.perf_counter() - start, 1),
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "command": "python benchmarks/training_set_attack.py " + " ".join(argv or []),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps({k: report[k] for k in ("flipped_fraction", "random_flipped_fraction", "seconds")}))
    return report


if __name__ == "__main__":
    main()
