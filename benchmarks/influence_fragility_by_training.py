"""Influence fragility across training methods, measured in one run: which digits model's influence explanations
are hardest to rewrite by a label-preserving perturbation of the query (Ghorbani et al. 2019's attack on influence)?

    python benchmarks/influence_fragility_by_training.py [--epochs 20]

Trains configs/quickstart.yaml (plain), quickstart_reg.yaml (SSR curvature penalty) and quickstart_pgd_at.yaml
(PGD adversarial training) with train.py as users run it (validation callbacks off), then audits the three
best checkpoints side by side with evaluate.py's InfluenceAudit alone (last-layer exact influence, 32 audited test
points, 2/4/8 /255). Writes benchmarks/results/influence_fragility_by_training.json with, at the top level,
``top5_overlap`` and ``spearman`` (model -> {"targeted": [...], "random_sign": [...]} over the epsilons),
``epsilons``, ``clean_test_accuracy`` and ``most_stable`` (the model keeping the highest top-5 overlap under the
targeted perturbation at the largest epsilon).
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {"plain": "quickstart.yaml", "ssr": "quickstart_reg.yaml", "pgd_at": "quickstart_pgd_at.yaml"}
AUDIT = """num_samples: 256
sections:
  - class_path: robustattr.audit.InfluenceAudit
    init_args:
      queries: {queries}
      epsilons: [0.0078431, 0.0156863, 0.0313725]
"""


def main(argv: list[str] | None = None) -> dict:
    from robustattr.audit import main as evaluate
    from robustattr.cli import main as train

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--queries", type=int, default=32)
    parser.add_argument("--work", default=None, help="folder for the runs (default: a temporary one)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "influence_fragility_by_training.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        checkpoints, accuracy, seconds = {}, {}, {}
        for name, config in CONFIGS.items():
            begin = time.perf_counter()
            summary = train(["--config", str(ROOT / "configs" / config), "--trainer.max_epochs", str(args.epochs),
                             "--trainer.logger", "false", "--trainer.default_root_dir", str(work / name),
                             "--trainer.enable_progress_bar", "false", "--trainer.callbacks",
                             '[{"class_path": "pytorch_lightning.callbacks.ModelCheckpoint", '
                             '"init_args": {"monitor": "val/acc", "mode": "max"}}]'])  # fmt: skip
            seconds[name] = round(time.perf_counter() - begin, 1)
            checkpoints[name] = summary["checkpoint"]
            accuracy[name] = summary["test"]["test/acc"]
        audit = work / "audit.yaml"
        audit.write_text(AUDIT.format(queries=args.queries))
        report = evaluate(["--config", str(audit), "--out", str(work / "audit"), "--checkpoint",
                           *[f"{name}={path}" for name, path in checkpoints.items()]])  # fmt: skip
    results = report["results"]["influence"]
    epsilons = next(iter(results.values()))["fragility"]["epsilons"]
    out = {
        "top5_overlap": {name: r["fragility"]["top5_overlap"] for name, r in results.items()},
        "spearman": {name: r["fragility"]["spearman"] for name, r in results.items()},
        "label_kept": {name: r["fragility"]["label_kept"] for name, r in results.items()},
        "epsilons": epsilons,
        "clean_test_accuracy": accuracy,
        "most_stable": max(results, key=lambda n: results[n]["fragility"]["top5_overlap"]["targeted"][-1]),
        "queries": args.queries,
        "epochs": args.epochs,
        "training_seconds": seconds,
        "seconds": round(time.perf_counter() - start, 1),
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "command": "python benchmarks/influence_fragility_by_training.py " + " ".join(argv or []),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps({k: out[k] for k in ("top5_overlap", "spearman", "most_stable", "seconds")}))
    return out


if __name__ == "__main__":
    main()
