"""Share of training time spent in the validation callbacks, for a config's own settings (quickstart by default).

    python benchmarks/callback_overhead.py [--config configs/quickstart.yaml]

Fits the config once (W&B offline into a temporary folder) and records, in that one run, the wall time of
the fit and the seconds each callback spent in each of its validations. Writes
benchmarks/results/callback_overhead.json with ``callback_share_of_epoch_time`` (callback seconds over fit
seconds, target <= 0.30) and each callback's mean seconds per validation.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import pytorch_lightning as pl
import torch

from robustattr.callbacks import AttackCallback, AttributionPanels
from robustattr.cli import RobustCLI


class CostRecorder(pl.Callback):
    """Collects each robustattr callback's ``last_seconds`` after every validation it ran."""

    def __init__(self, watched: list[pl.Callback]) -> None:
        self.watched = watched
        self.seconds: dict[str, list[float]] = {type(cb).__name__: [] for cb in watched}

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        # runs after the watched callbacks (it is appended last); count only the runs of this epoch
        for cb in self.watched:
            if cb.last_seconds is not None:
                self.seconds[type(cb).__name__].append(cb.last_seconds)
                cb.last_seconds = None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/quickstart.yaml")
    parser.add_argument("--out", default="benchmarks/results/callback_overhead.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cli = RobustCLI(
            args=[
                "--config",
                args.config,
                "--trainer.logger.init_args.save_dir",
                tmp,
                "--trainer.default_root_dir",
                tmp,
            ]
        )
        trainer = cli.trainer
        watched = [cb for cb in trainer.callbacks if isinstance(cb, AttackCallback | AttributionPanels)]
        recorder = CostRecorder(watched)
        trainer.callbacks.append(recorder)
        start = time.perf_counter()
        trainer.fit(cli.model, datamodule=cli.datamodule)
        fit_seconds = time.perf_counter() - start
        for logger in trainer.loggers:
            getattr(logger, "experiment", None) and hasattr(logger.experiment, "finish") and logger.experiment.finish()
    callback_seconds = sum(sum(v) for v in recorder.seconds.values())
    result = {
        "command": f"python benchmarks/callback_overhead.py --config {args.config}",
        "config": args.config,
        "epochs": trainer.current_epoch,
        "threads": torch.get_num_threads(),
        "fit_seconds": round(fit_seconds, 2),
        "callback_seconds": round(callback_seconds, 2),
        "callback_share_of_epoch_time": round(callback_seconds / fit_seconds, 3),
        "target": "callback_share_of_epoch_time <= 0.30",
        "met": callback_seconds / fit_seconds <= 0.30,
        "seconds_per_validation": {
            name: {"mean": round(sum(v) / len(v), 3), "runs": len(v)} for name, v in recorder.seconds.items() if v
        },
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
