"""Audit reports: a self-contained HTML page and an optional offline W&B run with the same tables and figures.

Each section renders its own results (`Section.render`); this module lays the parts out, adds the checkpoints,
data, timings and the trade-off figure across checkpoints, and inlines every figure as PNG. A cached audit
re-renders without re-running its sections.
"""

from __future__ import annotations

import base64
import html
import io
import math
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from robustattr.audit.sections import ExplanationFragility, RobustnessCurves
from robustattr.audit.sections.base import RenderContext, Rendered, Section, Table, Thumbnail, eps_label
from robustattr.files import atomic_write
from robustattr.metrics.intervals import Estimate
from robustattr.viz import figure, png, style

STYLE = """body{font-family:sans-serif;max-width:1120px;margin:2em auto;color:#222;line-height:1.4}
table{border-collapse:collapse;font-size:13px;margin:0.6em 0}td,th{border:1px solid #ccc;padding:2px 6px}
th{background:#f3f3f3}td.n{text-align:right;font-variant-numeric:tabular-nums}img{max-width:100%}
h2{border-bottom:1px solid #ddd;margin-top:2em}caption{text-align:left;font-size:13px;color:#555;padding:2px}
td.t{text-align:center;font-size:11px}td.t img{width:56px;height:56px;image-rendering:pixelated;display:block;
margin:auto}"""
MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*"]


def thumbnail_png(thumb: Thumbnail) -> bytes:
    from PIL import Image

    array = np.clip(np.asarray(thumb.image, dtype=np.float64), 0, 1)
    image = Image.fromarray((array * 255).round().astype(np.uint8))
    image.thumbnail((112, 112))  # large images shrink to thumbnails; small ones stay as they are
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def cell(value: Any) -> str:
    if isinstance(value, Thumbnail):
        data = base64.b64encode(thumbnail_png(value)).decode()
        caption = html.escape(value.caption)
        return f"<img alt='{caption}' src='data:image/png;base64,{data}'>{caption}"
    if isinstance(value, Estimate):
        return html.escape(str(value))
    if isinstance(value, bool) or value is None:
        return html.escape(str(value)) if value is not None else "n/a"
    if isinstance(value, float):
        return "n/a" if not math.isfinite(value) else f"{value:.4g}"
    return html.escape(str(value))


def table_html(table: Table) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in table.header)

    def td(v: Any) -> str:
        numeric = isinstance(v, int | float | Estimate) and not isinstance(v, bool)
        kind = " class='n'" if numeric else (" class='t'" if isinstance(v, Thumbnail) else "")
        return f"<td{kind}>{cell(v)}</td>"

    body = "".join("<tr>" + "".join(td(v) for v in row) + "</tr>" for row in table.rows)
    caption = f"<caption>{html.escape(table.title)}</caption>" if table.title else ""
    return f"<table>{caption}<tr>{head}</tr>{body}</table>"


def default_render(section: Section, results: dict) -> Rendered:
    """For a section without its own rendering: every number of its results, by key."""
    rows: list[list] = []

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}/{k}" if prefix else str(k), v)
        elif isinstance(value, int | float) and not isinstance(value, bool):
            rows.append([prefix, float(value)])

    walk("", results)
    return Rendered(tables=[Table(["result", "value"], rows)])


def render_section(section: Section, results: dict, context: RenderContext) -> Rendered:
    if type(section).render is Section.render:
        return default_render(section, results)
    return section.render(results, context)


def tradeoff(
    robustness: dict[str, dict], fragility: dict[str, dict], epsilon: float | None
) -> tuple[Figure, Table, float]:
    """Clean accuracy, PGD accuracy at one epsilon and attribution robustness (saliency under the top-k attack, or
    the first method and attack audited) per checkpoint. ``epsilon`` None picks the audited epsilon where the
    checkpoints' PGD accuracies differ most (one checkpoint: where its accuracy is nearest 0.5)."""
    names = list(robustness)
    epsilons = robustness[names[0]]["epsilons"]
    acc = {name: RobustnessCurves.curve(r)[1] for name, r in robustness.items()}
    if epsilon is None:
        if len(names) > 1:
            spread = [
                np.nanmax([acc[n][i] for n in names]) - np.nanmin([acc[n][i] for n in names])
                for i in range(len(epsilons))
            ]
            index = int(np.nanargmax(spread))
        else:
            index = int(np.nanargmin([abs(a - 0.5) for a in acc[names[0]]]))
    else:
        index = int(np.argmin([abs(e - epsilon) for e in epsilons]))
    chosen = epsilons[index]
    first = next(iter(fragility.values()))["methods"]
    method = "saliency" if "saliency" in first else next(iter(first))
    attack = "topk" if "topk" in first[method] else next(iter(first[method]))
    frag_eps, _ = ExplanationFragility.curve(next(iter(fragility.values())), method, attack)
    frag_index = int(np.argmin([abs(e - chosen) for e in frag_eps]))
    rows = []
    with style():
        fig = figure(8.5, 5)
        ax = fig.subplots()
        for k, name in enumerate(names):
            robust = acc[name][index]
            attribution = (
                ExplanationFragility.curve(fragility[name], method, attack)[1][frag_index]
                if name in fragility
                else float("nan")
            )
            clean = robustness[name]["clean_accuracy"]
            rows.append([name, clean, robust, attribution])
            ax.scatter([robust], [attribution], s=90, marker=MARKERS[k % len(MARKERS)], color=f"C{k}",
                       label=f"{name} (clean {clean:.3f})", zorder=3)  # fmt: skip
        xs = [r[2] for r in rows if math.isfinite(r[2])] or [0.0, 1.0]
        ys = [r[3] for r in rows if math.isfinite(r[3])] or [0.0, 1.0]
        pad_x, pad_y = max(0.05, 0.15 * (max(xs) - min(xs))), max(0.05, 0.15 * (max(ys) - min(ys)))
        ax.set_xlim(max(-0.02, min(xs) - pad_x), min(1.02, max(xs) + pad_x))
        ax.set_ylim(max(-0.02, min(ys) - pad_y), min(1.02, max(ys) + pad_y))
        ax.set_xlabel(f"PGD accuracy at {eps_label(chosen)}")
        ax.set_ylabel(f"{method} top-k intersection, {attack} attack at {eps_label(frag_eps[frag_index])}")
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0))
    header = ["model", "clean accuracy", f"PGD accuracy at {eps_label(chosen)}",
              f"{method} top-k intersection ({attack}, {eps_label(frag_eps[frag_index])})"]  # fmt: skip
    return fig, Table(header, rows), chosen


def collect(report: dict, sections: list[Section], context: RenderContext, tradeoff_epsilon: float | None):
    """(title, Rendered) parts of the report, in order: the trade-off, then each section."""
    parts: list[tuple[str, Rendered]] = []
    by_type = {type(s): report["results"].get(s.name) for s in sections}
    robustness, fragility = by_type.get(RobustnessCurves), by_type.get(ExplanationFragility)
    if robustness and fragility:
        fig, table, chosen = tradeoff(robustness, fragility, tradeoff_epsilon)
        part = Rendered(
            tables=[table], figures=[("trade-off: clean accuracy, robust accuracy, attribution robustness", fig)]
        )
        how = "given" if tradeoff_epsilon is not None else "where the checkpoints differ most"
        part.say(f"Epsilon {eps_label(chosen)} ({how}; set tradeoff_epsilon to choose).")
        parts.append(("trade-off", part))
    for section in sections:
        results = report["results"].get(section.name)
        if results:
            parts.append((section.title, render_section(section, results, context)))
    return parts


def write_html(
    report: dict, sections: list[Section], context: RenderContext, path: Path, tradeoff_epsilon: float | None = None
) -> tuple[dict[str, bytes], list[tuple[str, Rendered]]]:
    """Write the self-contained HTML report; returns the figures as PNG bytes by title, and the rendered parts."""
    parts = collect(report, sections, context, tradeoff_epsilon)
    figures: dict[str, bytes] = {}
    out = [f"<!doctype html><html><head><meta charset='utf-8'><title>robustattr audit</title><style>{STYLE}</style>"
           "</head><body><h1>robustattr audit</h1>"]  # fmt: skip
    checkpoints = Table(
        ["checkpoint", "file", "sha256"], [[c["name"], c["path"], c["sha256"][:16]] for c in report["checkpoints"]]
    )
    out.append(table_html(checkpoints))
    d = report["data"]
    out.append(
        f"<p>Data: {html.escape(str(d['config'].get('class_path')))}, {d['split']} split, {d['num_samples']} samples, "
        f"seed {d['seed']}. Versions: {html.escape(', '.join(f'{k} {v}' for k, v in report['versions'].items()))}.</p>"
    )
    timings = [[label, t["seconds"], "cached" if t["cached"] else "computed"] for label, t in report["timings"].items()]
    out.append(table_html(Table(["part", "seconds", ""], timings, "time of each (section, checkpoint)")))
    for title, part in parts:
        out.append(f"<h2>{html.escape(title)}</h2>")
        out.extend(f"<p>{paragraph}</p>" for paragraph in part.text)
        for name, fig in part.figures:
            data = png(fig)
            figures[name] = data
            out.append(f"<h3>{html.escape(name)}</h3><img alt='{html.escape(name)}' "
                       f"src='data:image/png;base64,{base64.b64encode(data).decode()}'>")  # fmt: skip
        out.extend(table_html(t) for t in part.tables)
    out.append("</body></html>")
    atomic_write(path, "".join(out))
    return figures, parts


def write_wandb(report: dict, out_dir: Path, figures: dict[str, bytes], parts: list[tuple[str, Rendered]]) -> None:
    """An offline W&B run (``out_dir/wandb``) with the report's tables and figures."""
    import wandb
    from PIL import Image

    def media(v: Any) -> Any:
        if isinstance(v, Thumbnail):
            return wandb.Image(Image.open(io.BytesIO(thumbnail_png(v))), caption=v.caption)
        return v if isinstance(v, int | float | str) else str(v)

    run = wandb.init(project="robustattr-audit", dir=str(out_dir), mode="offline", config={"audit": report["config"]})
    try:
        rows = []

        def flatten(prefix: str, value: Any) -> None:
            if isinstance(value, dict):
                for k, v in value.items():
                    flatten(f"{prefix}/{k}", v)
            elif isinstance(value, int | float) and not isinstance(value, bool):
                rows.append([prefix, float(value)])

        for section, results in report["results"].items():
            flatten(section, results)
        run.log({"audit/numbers": wandb.Table(columns=["name", "value"], data=rows)})
        for title, part in parts:
            for i, table in enumerate(part.tables):
                data = [[media(v) for v in row] for row in table.rows]
                run.log({f"audit/tables/{title}/{i}": wandb.Table(columns=table.header, data=data)})
        for title, data in figures.items():
            run.log({f"audit/figures/{title}": wandb.Image(Image.open(io.BytesIO(data)))})
    finally:
        run.finish()
