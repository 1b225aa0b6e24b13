"""Intervals and paired comparisons in the audit: what every section uses to say how sure its numbers are.

A mean that a section reports keeps its 95% interval beside it: ``ci`` -> name -> [low, high] in the section's
existing structures, ``{mean, ci_low, ci_high, n}`` in the newer ones (`robustattr.metrics.intervals`). A section
that measures every checkpoint on the same samples keeps the per-sample values of the quantities worth comparing
(`Section.paired_values`), and the engine compares every pair of audited checkpoints on them with paired intervals
(`compare`): the report calls one checkpoint more robust only where the interval of the difference excludes zero,
and otherwise says the difference is not resolved at this sample count, with the count that would resolve it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from robustattr.audit.sections.base import Table, eps_label
from robustattr.metrics.intervals import Estimate, mean_interval, paired_difference, proportion_interval

PROPORTIONS = ("label_kept", "accuracy", "success_rate", "attack_success")


def values_list(values: torch.Tensor | Sequence[float]) -> list[float]:
    """Per-sample values for report.json (NaN, written as null, where a sample does not count)."""
    if isinstance(values, torch.Tensor):
        values = values.detach().float().cpu().tolist()
    return [float(v) for v in values]


def interval(values: Any, seed: int, proportion: bool = False) -> Estimate:
    return proportion_interval(values) if proportion else mean_interval(values, seed)


def ci(estimate: Estimate) -> list[float]:
    return [estimate.ci_low, estimate.ci_high]


def estimate(row: dict[str, Any], name: str) -> Estimate | float:
    """The mean ``row[name]`` with its stored interval (``row["ci"][name]``), for tables and error bars."""
    bounds = row.get("ci", {}).get(name)
    if bounds is None:
        return row[name]
    number = [float("nan") if v is None else float(v) for v in (row[name], *bounds)]
    return Estimate(number[0], number[1], number[2], int(row.get("n", {}).get(name, 0)))


PAIRED_MAP_METRICS = ("topk_intersection", "spearman")


def collection_row(collection, seed: int, paired: Sequence[str] = PAIRED_MAP_METRICS) -> dict[str, Any]:
    """A computed per-sample collection (``per_sample=True``; e.g. `fragility_collection`) as one row: each
    member's mean, ``ci`` -> member -> [low, high] (Wilson for the shares in `PROPORTIONS`, bootstrap otherwise),
    ``n`` -> member -> samples counted, and ``per_sample`` -> member -> values (NaN where not counted) for the
    members in ``paired``, on which checkpoints are compared."""
    values = collection.compute()
    row: dict[str, Any] = {name: float(v) for name, v in values.items()}
    row["ci"], row["n"], row["per_sample"] = {}, {}, {}
    for name, metric in collection.items(keep_base=True):
        samples = metric.by_sample()
        e = interval(samples, seed, proportion=name in PROPORTIONS)
        row["ci"][name], row["n"][name] = ci(e), e.n
        if name in paired:
            row["per_sample"][name] = values_list(samples)
    return row


def error_bars(estimates: Sequence[Estimate | float]) -> np.ndarray:
    """(2, N) distances below and above each mean, for matplotlib's ``yerr`` (0 where no interval)."""
    below, above = [], []
    for e in estimates:
        if isinstance(e, Estimate) and math.isfinite(e.ci_low) and math.isfinite(e.ci_high):
            below.append(max(0.0, e.mean - e.ci_low))
            above.append(max(0.0, e.ci_high - e.mean))
        else:
            below.append(0.0)
            above.append(0.0)
    return np.array([below, above])


def compare(
    results: dict[str, dict],
    paired_values: Callable[[dict], dict[tuple, tuple[list[float], bool]]],
    seed: int,
) -> list[dict[str, Any]]:
    """Every pair of checkpoints (in audit order) on every quantity both measured on the same samples.

    ``paired_values(result)``: (label, ...) -> (per-sample values, higher is more robust). Each comparison holds
    the label's fields, ``a``/``b``, the mean of ``a - b`` with its paired 95% interval, ``resolved``,
    ``more_robust`` (a checkpoint's name where resolved, else None), ``samples`` and ``samples_to_resolve``."""
    names = list(results)
    out = []
    for i, a in enumerate(names):
        values_a = paired_values(results[a])
        for b in names[i + 1 :]:
            values_b = paired_values(results[b])
            for key, (va, higher) in values_a.items():
                if key not in values_b:
                    continue
                vb = values_b[key][0]
                if len(va) != len(vb):
                    continue  # not the same samples
                d = paired_difference(va, vb, seed=seed, higher_is_better=higher)
                more = {"a": a, "b": b, None: None}[d.pop("better")]
                out.append({**dict(key), "a": a, "b": b, **d, "more_robust": more})
    return out


def describe(c: dict[str, Any], what: str) -> str:
    """One sentence for one comparison: which checkpoint is more robust, or that the difference is not resolved."""
    interval_text = f"{c['difference']:+.3f} [{c['ci_low']:+.3f}, {c['ci_high']:+.3f}]"
    if c["resolved"]:
        other = c["b"] if c["more_robust"] == c["a"] else c["a"]
        return f"{c['more_robust']} is more robust than {other} in {what}: {c['a']} - {c['b']} = {interval_text}."
    if c["samples_to_resolve"] is None:
        return f"{c['a']} and {c['b']} do not differ in {what} on these {c['samples']} samples."
    return (
        f"{c['a']} vs {c['b']}, {what}: not resolved at {c['samples']} samples ({c['a']} - {c['b']} = "
        f"{interval_text}); about {c['samples_to_resolve']} samples would resolve a difference of this size at "
        "the measured spread."
    )


def comparisons_of(context: Any, section: str) -> list[dict[str, Any]]:
    """The engine's paired comparisons of one section (none when rendered without a context or one checkpoint)."""
    return [] if context is None else getattr(context, "comparisons", {}).get(section, [])


def comparison_table(comparisons: list[dict[str, Any]], fields: Sequence[str], title: str) -> Table:
    """Comparisons as a table: the label fields, then the difference with its interval and the verdict."""
    rows = []
    for c in comparisons:
        labels = [eps_label(c[f]) if f == "epsilon" and isinstance(c[f], float) else c[f] for f in fields]
        verdict = (
            f"{c['more_robust']} more robust"
            if c["resolved"]
            else f"not resolved at {c['samples']} samples"
            + (f" (~{c['samples_to_resolve']} would resolve it)" if c["samples_to_resolve"] else "")
        )
        difference = Estimate(c["difference"], c["ci_low"], c["ci_high"], c["samples"])
        rows.append([*labels, f"{c['a']} - {c['b']}", difference, verdict])
    return Table([*fields, "difference", "mean [95% interval]", "verdict"], rows, title)
