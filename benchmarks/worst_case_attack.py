"""The worst-case explanation attack against today's default fragility attack, measured in one run on the same
samples: how much robustness does the default overstate, and at what cost?

    python benchmarks/worst_case_attack.py [--checkpoint quickstart=A.ckpt quickstart_reg=B.ckpt]

Without ``--checkpoint``, trains configs/quickstart.yaml and quickstart_reg.yaml with train.py as users run it
(validation callbacks off; ``--epochs`` overrides the configs' epochs) and takes their best checkpoints. On the
first ``--num-samples`` test digits of the audit's subset (seed 0), saliency, L-infinity ``--epsilon`` (8/255):

- the default: the audit's ExplanationFragility top-k attack (``TopKAttack(steps=10)``, signed steps of eps/8);
- the ensemble: ``WorstCaseExplanationAttack`` with the audit's settings (25 steps x 2 rounds, betas 30 and 100
  on ReLU networks), with every member's own best.

Writes benchmarks/results/worst_case_attack.json with, at the top level, per checkpoint: ``default_topk``,
``worst_case_topk`` (means over the samples whose label was kept, each with its bootstrap 95% interval under
``*_ci``), ``member_topk`` (member -> mean), ``dominance`` (the share of samples where the ensemble is at least as
damaging as every member that kept the label: 1.0 by construction), ``dominance_over_default`` (the same against
the default attack, which is not a member: informational), ``cost_over_default`` (the ensemble's seconds over the
default's) and the seconds of each.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {"quickstart": "quickstart.yaml", "quickstart_reg": "quickstart_reg.yaml"}


def _train(work: Path, epochs: int | None) -> dict[str, str]:
    from robustattr.cli import main as train

    checkpoints = {}
    for name, config in CONFIGS.items():
        args = ["--config", str(ROOT / "configs" / config), "--trainer.logger", "false",
                "--trainer.default_root_dir", str(work / name), "--trainer.enable_progress_bar", "false",
                "--trainer.callbacks", '[{"class_path": "pytorch_lightning.callbacks.ModelCheckpoint", '
                '"init_args": {"monitor": "val/acc", "mode": "max"}}]']  # fmt: skip
        if epochs is not None:
            args += ["--trainer.max_epochs", str(epochs)]
        checkpoints[name] = train(args)["checkpoint"]
    return checkpoints


def measure(path: str, name: str, args) -> dict:
    from robustattr.attacks import LinfBall, TopKAttack, WorstCaseExplanationAttack
    from robustattr.attributions import Saliency
    from robustattr.audit.engine import build_data
    from robustattr.audit.loading import load_model
    from robustattr.metrics import default_k, topk_intersection
    from robustattr.metrics.intervals import mean_interval

    audited = load_model(path, None, (), name)
    model = audited.model.eval()
    data = build_data(audited.config["data"], "test", max(256, args.num_samples), 64, 0, path)
    x, y = data.x[: args.num_samples], data.y[: args.num_samples]
    threat = LinfBall(args.epsilon)

    start = time.perf_counter()
    default = TopKAttack(Saliency(), threat, steps=10, seed=0).run(model, x, y)
    default_seconds = time.perf_counter() - start
    k = default_k(*default.maps_clean.shape[1:])
    default_values = topk_intersection(default.maps_clean, default.maps_adv, k).float()
    default_values[~default.kept] = float("nan")

    ensemble = WorstCaseExplanationAttack(
        Saliency(), threat, steps=args.steps, restarts=args.restarts, betas=args.betas, seed=0
    )
    start = time.perf_counter()
    result = ensemble.run(model, x, y)
    ensemble_seconds = time.perf_counter() - start

    values = result.values
    dominated = torch.ones(len(x), dtype=torch.bool)
    for member in result.members.values():
        counted = member.isfinite()
        dominated &= ~counted | (values.isfinite() & (values <= member + 1e-6))
    both = values.isfinite() & default_values.isfinite()
    default_estimate, worst_estimate = mean_interval(default_values, 0), mean_interval(values, 0)
    return {
        "default_topk": default_estimate.mean,
        "default_topk_ci": [default_estimate.ci_low, default_estimate.ci_high],
        "worst_case_topk": worst_estimate.mean,
        "worst_case_topk_ci": [worst_estimate.ci_low, worst_estimate.ci_high],
        "member_topk": {m: float(v[v.isfinite()].mean()) for m, v in result.members.items()},
        "dominance": float(dominated.float().mean()),
        "dominance_over_default": float((values[both] <= default_values[both] + 1e-6).float().mean()),
        "label_kept": {"default": float(default.kept.float().mean()), "worst_case": float(result.kept.float().mean())},
        "converged": result.converged(0.01),
        "budget_steps": {"default": 10, "worst_case": int(result.budget[-1])},
        "default_seconds": round(default_seconds, 2),
        "worst_case_seconds": round(ensemble_seconds, 2),
        "cost_over_default": round(ensemble_seconds / default_seconds, 2),
        "samples": len(x),
        "attack": repr(ensemble),
        "checkpoint": str(path),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", nargs="*", default=None, help="name=path (default: train both quickstarts)")
    parser.add_argument("--epochs", type=int, default=None, help="training epochs (default: the configs')")
    parser.add_argument("--num-samples", type=int, default=64)
    parser.add_argument("--epsilon", type=float, default=8 / 255)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--restarts", type=int, default=2)
    parser.add_argument("--betas", type=float, nargs="+", default=[30.0, 100.0])
    parser.add_argument("--work", default=None, help="folder for trained runs (default: a temporary one)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "worst_case_attack.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        if args.checkpoint:
            checkpoints = dict(entry.split("=", 1) for entry in args.checkpoint)
        else:
            checkpoints = _train(Path(args.work or tmp), args.epochs)
        per_checkpoint = {name: measure(path, name, args) for name, path in checkpoints.items()}
    keys = ("default_topk", "worst_case_topk", "member_topk", "dominance", "cost_over_default")
    out = {
        **{key: {name: r[key] for name, r in per_checkpoint.items()} for key in keys},
        "worst_case_at_most_default": all(r["worst_case_topk"] <= r["default_topk"] for r in per_checkpoint.values()),
        "checkpoints": per_checkpoint,
        "epsilon": args.epsilon,
        "num_samples": args.num_samples,
        "seconds": round(time.perf_counter() - start, 1),
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "command": "python benchmarks/worst_case_attack.py " + " ".join(sys.argv[1:] if argv is None else argv),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps({k: out[k] for k in (*keys, "worst_case_at_most_default")}))
    return out


if __name__ == "__main__":
    main()
