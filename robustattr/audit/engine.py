"""The audit engine behind evaluate.py: load checkpoints safely, take a fixed seeded subset of the dataset the
first checkpoint was trained on (or of an override), run each section with a progress bar, cache finished
(checkpoint, section) results so a re-run skips them, and write the reports."""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

import pytorch_lightning as pl
import torch

import robustattr
from robustattr.audit.cache import ResultCache, code_version, data_fingerprint, fingerprint, json_safe, key_of
from robustattr.audit.distributed import JobStopped, Shard, device_for, setup, teardown
from robustattr.audit.loading import AuditedModel, load_model
from robustattr.audit.progress import JobProgress, progress_display
from robustattr.audit.sections import AuditData, RenderContext, Section
from robustattr.audit.sections.base import TrainingData
from robustattr.data.base import seeded_subset
from robustattr.errors import ConfigError, exit_with_error, find_user_error
from robustattr.files import atomic_write
from robustattr.trust import instantiate_trusted


def build_data(
    data: dict[str, Any],
    split: str,
    num_samples: int,
    batch_size: int,
    seed: int,
    source: str,
    trusted_prefixes: Sequence[str] = (),
    from_checkpoint: bool = False,
) -> AuditData:
    """A fixed, seeded subset of ``split`` of the DataModule described by ``data`` ({class_path, init_args}).

    ``from_checkpoint``: the description came from a checkpoint, whose settings are data, not actions: the
    DataModule is built through the trusted-imports gate and never downloads (a missing dataset ends in its
    one-line error saying how to get it)."""
    datamodule = build_datamodule(data, source, trusted_prefixes, from_checkpoint)
    datamodule.setup("test" if split == "test" else "validate")
    dataset = (datamodule.test_dataloader() if split == "test" else datamodule.val_dataloader()).dataset
    x, y = seeded_subset(dataset, num_samples, seed)
    return AuditData(x=x, y=y, batch_size=batch_size, seed=seed)


def build_datamodule(
    data: dict[str, Any], source: str, trusted_prefixes: Sequence[str] = (), from_checkpoint: bool = False
) -> pl.LightningDataModule:
    """The DataModule ``data`` describes, through the trusted-imports gate; from a checkpoint it never downloads."""
    datamodule = instantiate_trusted(data, pl.LightningDataModule, source, trusted_prefixes)
    if from_checkpoint and getattr(datamodule, "download", False):
        datamodule.download = False
    datamodule.prepare_data()  # a missing dataset ends here, in one clear error
    return datamodule


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


def named_checkpoint(entry: str) -> tuple[str | None, str]:
    """``name=path`` -> (name, path); a plain path -> (None, path). A path that exists is never split."""
    name, sep, path = entry.partition("=")
    if sep and name and "/" not in name and not Path(entry).exists():
        return name, path
    return None, entry


def _note_cost(progress, label: str, result: dict) -> None:
    if isinstance(result.get("cost"), dict):  # a section that times its parts: say what each took
        progress.note(f"{label}: " + ", ".join(f"{part} {s:.1f} s" for part, s in result["cost"].items()))


def run_audit(
    checkpoints: list[str],
    sections: list[Section],
    out: str = "audit",
    names: list[str] | None = None,
    num_samples: int = 256,
    batch_size: int = 64,
    seed: int = 0,
    split: Literal["test", "val"] = "test",
    data: dict[str, Any] | None = None,
    net: dict[str, Any] | None = None,
    trusted_prefixes: list[str] | None = None,
    device: str = "cpu",
    dtype: Literal["float32", "bfloat16"] = "float32",
    html: bool = True,
    wandb: bool = False,
    tradeoff_epsilon: float | None = None,
    config: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Audit ``checkpoints`` with ``sections``; returns the report (also written to ``out/report.json``).

    ``trusted_prefixes``: packages besides robustattr, torch.nn, torch.optim and torchvision.transforms that a
    checkpoint's stored config (or ``net``/``data`` here) may name, e.g. ``[mylab.models]`` for your own nets.
    ``checkpoints`` entries may read ``name=path``; ``names`` gives the names otherwise (default: the file names).
    ``tradeoff_epsilon``: the epsilon of the trade-off figure (default: where the checkpoints differ most).
    ``dtype``: the networks' precision (``bfloat16`` halves memory and time on GPUs that have it; attacks keep
    their iterates in fp32 and metrics are computed in fp32 either way).

    Under ``torchrun --nproc_per_node N evaluate.py ...`` or ``srun`` (the environments Lightning reads), the N
    processes run one audit: each section's samples are dealt to them in contiguous shares, each sample seeded
    by its index, and gathered in sample order, so the numbers equal a one-process audit's; a section whose
    engine shares the work itself (``split = "engine"``: the influence section, whose engine shards the training
    set) runs on every process; rank 0 alone shows the progress (of the whole job) and writes the cache and the
    reports. Other processes return ``{}``."""
    shard, joined = setup()
    try:
        return _audit(shard, **{k: v for k, v in locals().items() if k not in ("shard", "joined")})
    except JobStopped as err:
        stopped = JobStopped(
            f"{err}; the sections that finished are cached in {Path(out) / 'cache'}: the same command reuses them"
        )
        stopped.speaks = shard.claim("robustattr/audit/stopped")  # one process of the job says it, whichever died
        raise stopped from None
    finally:
        if joined:
            teardown(shard)


def _audit(
    shard: Shard,
    checkpoints: list[str],
    sections: list[Section],
    out: str,
    names: list[str] | None,
    num_samples: int,
    batch_size: int,
    seed: int,
    split: Literal["test", "val"],
    data: dict[str, Any] | None,
    net: dict[str, Any] | None,
    trusted_prefixes: list[str] | None,
    device: str,
    dtype: Literal["float32", "bfloat16"],
    html: bool,
    wandb: bool,
    tradeoff_epsilon: float | None,
    config: dict[str, Any] | None,
) -> dict[str, Any]:
    if not checkpoints:
        raise ConfigError("no checkpoint to audit: pass --checkpoint A.ckpt [B.ckpt ...]")
    if num_samples < 1 or batch_size < 1:
        raise ConfigError(f"num_samples and batch_size must be positive, got {num_samples} and {batch_size}")
    prefixes = tuple(trusted_prefixes or ())
    named = [named_checkpoint(entry) for entry in checkpoints]
    if names is not None:
        if len(names) != len(named):
            raise ConfigError(f"{len(names)} names for {len(named)} checkpoints: give one name per checkpoint")
        named = [(name, path) for name, (_, path) in zip(names, named, strict=True)]
    models: list[AuditedModel] = [load_model(path, net, prefixes, name) for name, path in named]
    given = [m.name for m in models]
    for i, m in enumerate(models):  # distinct names, also for two files called last.ckpt
        if given.count(m.name) > 1:
            m.name = f"{m.name}#{i}"
    data_config = data or (models[0].config or {}).get("data")
    if not data_config:
        raise ConfigError(
            f"{models[0].path}: no dataset named: the checkpoint has no train.py config; set data in the audit config"
        )
    source = "the audit config's data" if data else str(models[0].path)
    audit_data = build_data(
        data_config, split, num_samples, batch_size, seed, source, prefixes, from_checkpoint=not data
    )
    torch_device = device_for(device, shard)
    audit_data = replace(audit_data, shard=shard, stack_copies=torch_device.type == "cuda")
    for m in models:
        m.model.to(device=torch_device, dtype=getattr(torch, dtype))
    out_dir = Path(out)
    cache = ResultCache(out_dir / "cache")
    common = {
        "data": {"config": data_config, "split": split, "num_samples": num_samples, "batch_size": batch_size,
                 "seed": seed, "subset": data_fingerprint(audit_data.x, audit_data.y)},
        "code": code_version(),
        "device": device,  # as given: every process of a job, and a one-process audit, share the cache
        "dtype": dtype,
    }  # fmt: skip
    training: dict[str, TrainingData] = {}
    for m in models:  # each checkpoint's own training split (its stored data settings), built on first use
        own = (m.config or {}).get("data")
        training[m.name] = TrainingData(
            own or data_config,
            lambda config, own=own, path=str(m.path): build_datamodule(
                config, path if own else source, prefixes, from_checkpoint=bool(own) or not data
            ),
        )
    results: dict[str, Any] = {}
    timings: dict[str, dict[str, Any]] = {}
    with progress_display(quiet=not shard.main) as display:
        progress = JobProgress(display, shard)
        for section in sections:
            if section.name in results:
                raise ConfigError(f"the section {section.name!r} is listed twice")
            if section.uses_training and section.cross_model:
                raise ConfigError(f"{type(section).__name__}: a section reading training data runs per checkpoint")
            jobs = [(None, [m.sha256 for m in models])] if section.cross_model else [(m, [m.sha256]) for m in models]
            results[section.name] = {}
            keys = []
            for model, hashes in jobs:
                parts = [section.name, fingerprint(section), hashes, common]
                if section.uses_training:
                    parts.append({"training": training[model.name].config})
                keys.append(key_of(parts))
            cached = [cache.load(section.name, key) for key in keys] if shard.main else [None] * len(jobs)
            is_cached = shard.broadcast([r is not None for r in cached])  # rank 0's cache decides for the job
            for j, (model, _) in enumerate(jobs):
                label = section.name if model is None else f"{section.name} [{model.name}]"
                if is_cached[j]:
                    progress.add_task(label, total=1, completed=1, cached=True)
                    timings[label] = {"seconds": 0.0, "cached": True}
                    continue
                by_samples = section.split == "samples"
                data_here = audit_data if by_samples else audit_data.local()
                task = progress.add_task(label, total=section.work(data_here))
                advance = (lambda k, t=task: progress.advance(t, k)) if by_samples else (
                    lambda k, t=task: progress.advance_here(t, k))  # fmt: skip
                torch.manual_seed(seed)
                start = time.perf_counter()
                if model is None:
                    result = section.run_all({m.name: m.model for m in models}, data_here, advance)
                else:
                    data_for = replace(data_here, training=training[model.name]) if section.uses_training else data_here
                    result = section.run(model.model, data_for, advance)
                seconds = time.perf_counter() - start
                progress.finish(task)
                if shard.main:  # rank 0 alone writes the cache: finished jobs are kept if the job stops later
                    cache.store(section.name, keys[j], result, seconds)
                    cached[j] = result
                    timings[label] = {"seconds": round(seconds, 3), "cached": False}
                    if shard.distributed:
                        timings[label]["ran_on"] = (
                            f"{shard.world} processes, " + ("samples dealt to them" if by_samples else
                                                            "the section's engine sharding its work")
                        )  # fmt: skip
                    _note_cost(progress, label, result)
            if not shard.main:
                continue
            for j, (model, _) in enumerate(jobs):
                if model is None:
                    results[section.name] = cached[j]
                else:
                    results[section.name][model.name] = cached[j]
    if not shard.main:  # rank 0 alone writes the report, the HTML and the W&B run
        return {}
    comparisons: dict[str, list[dict[str, Any]]] = {}
    if len(models) > 1:  # every pair of checkpoints, on the per-sample values each section compares them on
        from robustattr.audit.sections.uncertainty import compare

        for section in sections:
            if not section.cross_model:
                found = compare(results[section.name], section.paired_values, seed)
                if found:
                    comparisons[section.name] = found
    report = {
        "robustattr_audit": 1,
        "processes": {"world_size": shard.world, "launcher": shard.launcher},
        "checkpoints": [{"name": m.name, "path": str(m.path), "sha256": m.sha256} for m in models],
        "data": {"config": data_config, "split": split, "num_samples": len(audit_data.x), "seed": seed},
        "seed": seed,
        "config": config or {},
        "versions": versions(),
        "timings": timings,
        "results": results,
        "comparisons": comparisons,
    }
    atomic_write(out_dir / "report.json", json.dumps(json_safe(report), indent=1, default=str, allow_nan=False) + "\n")
    if html or wandb:
        from robustattr.audit.report import write_html, write_wandb

        context = RenderContext({m.name: m.model for m in models}, audit_data.local(), training, comparisons)
        figures, parts = write_html(report, sections, context, out_dir / "report.html", tradeoff_epsilon)
        if not html:
            (out_dir / "report.html").unlink()
        if wandb:
            write_wandb(report, out_dir, figures, parts)
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
    try:
        init = parser.instantiate_classes(cfg)
        kwargs = {k: v for k, v in vars(init).items() if k not in ("config", "checkpoint", "__path__")}
        report = run_audit(list(cfg.checkpoint), config=dumped, **kwargs)
    except Exception as err:
        user_error = find_user_error(err)
        if user_error is None:
            raise
        exit_with_error(user_error)
    if report:  # rank 0 (the other processes of a job return nothing)
        Console(highlight=False).print(f"[bold]report[/bold] {Path(kwargs.get('out', 'audit')) / 'report.json'}")
    return report
