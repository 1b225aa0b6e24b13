"""The audit engine behind evaluate.py: load checkpoints safely, take a fixed seeded subset of the dataset the
first checkpoint was trained on (or of an override), run each section with a progress bar, cache finished
(checkpoint, section) results so a re-run skips them, and write the reports."""

from __future__ import annotations

import hashlib
import json
import platform
from pathlib import Path
from typing import Any, Literal

import pytorch_lightning as pl
import torch
from jsonargparse import ArgumentParser
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

import robustattr
from robustattr.audit.loading import AuditedModel, _check_trusted, load_model
from robustattr.audit.sections import AuditData, Section
from robustattr.data.base import seeded_subset
from robustattr.errors import ConfigError, RobustAttrError


def build_data(
    data: dict[str, Any], split: str, num_samples: int, batch_size: int, seed: int, source: str
) -> AuditData:
    """A fixed, seeded subset of ``split`` of the DataModule described by ``data`` ({class_path, init_args})."""
    _check_trusted(data, source)
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--data", type=pl.LightningDataModule)
    try:
        datamodule = parser.instantiate_classes(parser.parse_object({"data": data})).data
    except Exception as err:
        raise ConfigError(f"{source}: cannot build the dataset: {err}") from err
    datamodule.prepare_data()  # a missing dataset ends here, in one clear error
    datamodule.setup("test" if split == "test" else "validate")
    dataset = (datamodule.test_dataloader() if split == "test" else datamodule.val_dataloader()).dataset
    x, y = seeded_subset(dataset, num_samples, seed)
    return AuditData(x=x, y=y, batch_size=batch_size, seed=seed)


def _key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


def versions() -> dict[str, str]:
    import captum
    import timm
    import torchmetrics
    import torchvision

    return {
        "robustattr": robustattr.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "pytorch_lightning": pl.__version__,
        "torchmetrics": torchmetrics.__version__,
        "captum": captum.__version__,
        "timm": timm.__version__,
    }


def run_audit(
    checkpoints: list[str],
    sections: list[Section],
    out: str = "audit",
    num_samples: int = 256,
    batch_size: int = 64,
    seed: int = 0,
    split: Literal["test", "val"] = "test",
    data: dict[str, Any] | None = None,
    net: dict[str, Any] | None = None,
    device: str = "cpu",
    html: bool = True,
    wandb: bool = False,
    config: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Audit ``checkpoints`` with ``sections``; returns the report (also written to ``out/report.json``)."""
    if not checkpoints:
        raise ConfigError("no checkpoint to audit: pass --checkpoint A.ckpt [B.ckpt ...]")
    models: list[AuditedModel] = [load_model(path, net) for path in checkpoints]
    names = [m.name for m in models]
    for i, m in enumerate(models):  # distinct names, also for two files called last.ckpt
        if names.count(m.name) > 1:
            m.name = f"{m.name}#{i}"
    data_config = data or (models[0].config or {}).get("data")
    if not data_config:
        raise ConfigError(
            f"{models[0].path}: no dataset named: the checkpoint has no train.py config; set data in the audit config"
        )
    audit_data = build_data(data_config, split, num_samples, batch_size, seed, str(models[0].path))
    torch_device = torch.device(device)
    for m in models:
        m.model.to(torch_device)
    out_dir = Path(out)
    cache = out_dir / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    data_key = [data_config, split, num_samples, batch_size, seed]
    results: dict[str, Any] = {}
    timings: dict[str, str] = {}
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    with Progress(*columns, transient=False) as progress:
        for section in sections:
            if section.name in results:
                raise ConfigError(f"the section {section.name!r} is listed twice")
            jobs = [(None, [m.sha256 for m in models])] if section.cross_model else [(m, [m.sha256]) for m in models]
            results[section.name] = {}
            for model, hashes in jobs:
                label = section.name if model is None else f"{section.name} [{model.name}]"
                label = escape(label)  # rich would read "[...]" as markup
                path = cache / f"{section.name}-{_key(section.name, section.settings(), data_key, hashes)}.json"
                if path.is_file():
                    result = json.loads(path.read_text())
                    progress.add_task(f"{label} (cached)", total=1, completed=1)
                    timings[label] = "cached"
                else:
                    task = progress.add_task(label, total=section.work(audit_data))
                    torch.manual_seed(seed)
                    if model is None:
                        result = section.run_all(
                            {m.name: m.model for m in models}, audit_data, lambda k, t=task: progress.advance(t, k)
                        )
                    else:
                        result = section.run(model.model, audit_data, lambda k, t=task: progress.advance(t, k))
                    path.write_text(json.dumps(result))
                    timings[label] = f"{progress.tasks[task].elapsed:.1f} s"
                if model is None:
                    results[section.name] = result
                else:
                    results[section.name][model.name] = result
    report = {
        "robustattr_audit": 1,
        "checkpoints": [{"name": m.name, "path": str(m.path), "sha256": m.sha256} for m in models],
        "data": {"config": data_config, "split": split, "num_samples": len(audit_data.x), "seed": seed},
        "seed": seed,
        "config": config or {},
        "versions": versions(),
        "timings": timings,
        "results": results,
    }
    (out_dir / "report.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    if html or wandb:
        from robustattr.audit.report import write_html, write_wandb

        figures = None
        if html:
            figures = write_html(report, models, audit_data, out_dir / "report.html")
        if wandb:
            write_wandb(report, out_dir, figures)
    return report


def main(args: list[str] | None = None) -> dict[str, Any]:
    """evaluate.py: ``--checkpoint A.ckpt [B.ckpt ...] --config configs/audit.yaml [--out DIR]``."""
    from rich.console import Console

    from robustattr.cli import RobustArgumentParser

    parser = RobustArgumentParser(description="Audit checkpoints: robustness of predictions and explanations.")
    parser.add_argument("-c", "--config", action="config")
    parser.add_argument(
        "--checkpoint", nargs="+", required=True, help="checkpoint files (.ckpt, .pt, .pth, .safetensors)"
    )
    parser.add_function_arguments(run_audit, skip={"checkpoints", "config"})
    cfg = parser.parse_args(args)
    dumped = json.loads(parser.dump(cfg, format="json", skip_none=False))
    init = parser.instantiate_classes(cfg)
    kwargs = {k: v for k, v in vars(init).items() if k not in ("config", "checkpoint", "__path__")}
    try:
        report = run_audit(list(cfg.checkpoint), config=dumped, **kwargs)
    except RobustAttrError as err:
        Console(stderr=True, highlight=False).print(f"[bold red]error:[/bold red] {err}", soft_wrap=True)
        raise SystemExit(1) from None
    Console(highlight=False).print(f"[bold]report[/bold] {Path(kwargs.get('out', 'audit')) / 'report.json'}")
    return report
