"""Audit throughput: images per second of every section, with one process and with N (torchrun), in one run.

    python benchmarks/audit_throughput.py [--config configs/audit.yaml] [--checkpoint name=path ...]
        [--epochs E] [--processes 1 2] [--device cpu|cuda] [--work DIR] [--out benchmarks/results/audit_throughput.json]

The same audit (the config, both quickstart checkpoints unless ``--checkpoint`` names others) is launched as
users launch it: ``python evaluate.py`` for one process, ``python -m torch.distributed.run --nproc_per_node N
evaluate.py`` for N (gloo on CPUs; on a GPU node each process takes the GPU of its local rank), each into a fresh
``--out``. A section's images per second are the images it audited (its ``num_samples``, at most the audit's,
times the checkpoints) over its seconds in report.json. On a CPU the N processes share the cores: torchrun gives
each one thread (OMP_NUM_THREADS=1) where one process has them all, so the speed-up says how much better the
work parallelises over processes than over threads.

Writes ``--out`` with, at the top level: ``images_per_second`` (section -> processes -> value), ``seconds``
(section -> processes -> seconds of all its checkpoints), ``total_seconds`` (processes -> wall clock of the whole
command), ``speedup`` (processes -> one process's wall clock over theirs), ``equal_results`` (processes -> whether
report.json's results equal the one-process audit's, every number within rel 1e-5, timings aside), ``device``,
``cores``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from worst_case_attack import _train  # both quickstart checkpoints, as the worst-case benchmark trains them

ROOT = Path(__file__).resolve().parents[1]


def _aside(value):
    if isinstance(value, dict):
        return {k: _aside(v) for k, v in value.items() if k not in ("cost", "seconds")}
    if isinstance(value, list):
        return [_aside(v) for v in value]
    return value


def equal(a, b) -> bool:
    """Every number within rel 1e-5 (timings aside)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return set(a) == set(b) and all(equal(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(equal(u, v) for u, v in zip(a, b, strict=True))
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-9)
    return a == b


def images_of(report: dict) -> dict[str, int]:
    """Section name -> images it audited per checkpoint (its num_samples, capped by the audit's subset)."""
    total = report["data"]["num_samples"]
    out = {}
    for entry in report["config"].get("sections", []):
        init = entry.get("init_args") or {}
        cls = entry["class_path"].rsplit(".", 1)[1]
        out[cls] = min(total, init["num_samples"]) if init.get("num_samples") else total
    return out


def launch(processes: int, checkpoints: dict[str, str], config: str, device: str, out: Path) -> tuple[float, dict]:
    args = [str(ROOT / "evaluate.py"), "--checkpoint", *[f"{n}={p}" for n, p in checkpoints.items()],
            "--config", config, "--out", str(out), "--device", device, "--html", "false"]  # fmt: skip
    if processes > 1:
        # --standalone: a rendezvous on a free port of its own
        launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
        command = [sys.executable, *launcher, *args]
    else:
        command = [sys.executable, *args]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    start = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"the {processes}-process audit failed:\n{proc.stderr[-3000:]}")
    return seconds, json.loads((out / "report.json").read_text())


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "audit.yaml"))
    parser.add_argument("--checkpoint", nargs="*", default=None, help="name=path (default: train both quickstarts)")
    parser.add_argument("--epochs", type=int, default=None, help="training epochs (default: the configs')")
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--work", default=None, help="folder for trained runs and audits (default: a temporary one)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "audit_throughput.json"))
    args = parser.parse_args(argv)
    if 1 not in args.processes:
        args.processes = [1, *args.processes]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        if args.checkpoint:
            checkpoints = dict(e.split("=", 1) for e in args.checkpoint)
        else:
            checkpoints = _train(work / "runs", args.epochs)
        runs = {n: launch(n, checkpoints, args.config, args.device, work / f"audit_{n}") for n in args.processes}
    single = runs[1][1]
    names = [s["class_path"].rsplit(".", 1)[1] for s in single["config"]["sections"]]
    classes = dict(zip(single["results"], names, strict=True))  # report section name -> class, in config order
    images = images_of(single)
    seconds: dict[str, dict[str, float]] = {}
    rate: dict[str, dict[str, float]] = {}
    for n, (_, report) in runs.items():
        for section_name, cls in classes.items():
            parts = [t["seconds"] for label, t in report["timings"].items()
                     if label == section_name or label.startswith(f"{section_name} [")]  # fmt: skip
            count = 1 if section_name == "transferability" else len(checkpoints)  # one job over all checkpoints
            spent = sum(parts)
            seconds.setdefault(section_name, {})[str(n)] = round(spent, 2)
            rate.setdefault(section_name, {})[str(n)] = round(images[cls] * count / spent, 2) if spent else None
    total = {str(n): round(s, 1) for n, (s, _) in runs.items()}
    out = {
        "images_per_second": rate,
        "seconds": seconds,
        "total_seconds": total,
        "speedup": {str(n): round(runs[1][0] / s, 3) for n, (s, _) in runs.items()},
        "equal_results": {str(n): equal(_aside(single["results"]), _aside(r["results"])) for n, (_, r) in runs.items()},
        "device": args.device,
        "cores": os.cpu_count(),
        "checkpoints": list(checkpoints),
        "config": str(Path(args.config).resolve().relative_to(ROOT)) if ROOT in Path(args.config).resolve().parents
        else args.config,
        "machine": platform.processor() or platform.machine(),
        "command": "python benchmarks/audit_throughput.py " + " ".join(sys.argv[1:] if argv is None else argv),
    }  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps({k: out[k] for k in ("total_seconds", "speedup", "equal_results")}))
    return out


if __name__ == "__main__":
    main()
