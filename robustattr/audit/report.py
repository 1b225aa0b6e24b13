"""Audit reports: a self-contained HTML page (tables and matplotlib figures inlined as PNG) and an optional
offline W&B run with the same tables and images. Figures are drawn from the results alone (plus the audit's
data for image grids and a few example maps), so a cached audit re-renders without re-running."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from robustattr.attacks import TopKAttack
from robustattr.attacks.base import gradient_context
from robustattr.audit.sections import AuditData
from robustattr.callbacks.panels import _image, panel_figure
from robustattr.metrics import center_shift, default_k, spearman, topk_intersection, topk_mask


def _png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=80, bbox_inches="tight")
    return buffer.getvalue()


def _table(header: list[str], rows: list[list[Any]]) -> str:
    def cell(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) else html.escape(str(v))

    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _heatmap(ax, matrix, rows, cols, title) -> None:
    m = np.asarray(matrix, dtype=float)
    ax.imshow(m, cmap="viridis", vmin=0, vmax=1)
    ax.set_xticks(range(len(cols)), cols, rotation=30, ha="right", fontsize=7)
    ax.set_yticks(range(len(rows)), rows, fontsize=7)
    for i in range(m.shape[0]):
        for j in range(m.shape[1]):
            ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", color="w", fontsize=7)
    ax.set_title(title, fontsize=9)


def _robustness(results):
    figure = Figure(figsize=(6, 4))
    ax = figure.subplots()
    styles = ["-", "--", ":", "-."]
    for k, (name, r) in enumerate(results.items()):
        eps = [0.0, *[e * 255 for e in r["epsilons"]]]
        for attack, acc in r["accuracy"].items():
            ax.plot(eps, [r["clean_accuracy"], *acc], styles[k % 4], marker="o", label=f"{name}: {attack}")
    ax.set_xlabel("epsilon (x/255)")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=7)
    rows = [[name, r["clean_accuracy"], *[r["lbfgs"][k] for k in ("samples", "success_rate", "distortion_mean",
             "distortion_median", "distortion_min", "distortion_max")]] for name, r in results.items()]  # fmt: skip
    table = _table(["model", "clean acc", "L-BFGS samples", "found", "mean dist.", "median", "min", "max"], rows)
    return [("accuracy vs epsilon", figure)], table


def _fragility(results):
    methods = list(next(iter(results.values()))["methods"])
    cols = min(4, len(methods))
    figure = Figure(figsize=(3.2 * cols, 2.8 * ((len(methods) + cols - 1) // cols)))
    axes = figure.subplots((len(methods) + cols - 1) // cols, cols, squeeze=False).flatten()
    rows = []
    for ax, method in zip(axes, methods, strict=False):
        for name, r in results.items():
            eps = [e * 255 for e in r["epsilons"]]
            for attack, values in r["methods"][method].items():
                ax.plot(
                    eps,
                    [row["topk_intersection"] for row in values["by_epsilon"]],
                    marker=".",
                    label=f"{name}: {attack}",
                )
                last = values["by_epsilon"][-1]
                rows.append([name, method, attack, values["auc_cosine_distance"], last["topk_intersection"],
                             last["spearman"], last["kendall"], last["center_shift"], last["cosine_distance"],
                             last["label_kept"]])  # fmt: skip
        ax.set_title(method, fontsize=9)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("epsilon (x/255)", fontsize=8)
    axes[0].set_ylabel("top-k intersection")
    axes[0].legend(fontsize=6)
    for ax in axes[len(methods) :]:
        ax.axis("off")
    figure.tight_layout()
    header = ["model", "method", "attack", "AUC cosine dist.", "top-k", "Spearman", "Kendall", "center shift",
              "cosine dist.", "label kept"]  # fmt: skip
    return [("fragility vs epsilon per method (top-k intersection)", figure)], _table(header, rows) + (
        "<p>Metrics at the largest epsilon; AUC of cosine distance over epsilon from 0 (lower: more robust).</p>"
    )


def _matrix_section(results, key, title):
    figure = Figure(figsize=(3.6 * len(results), 3.2))
    axes = figure.subplots(1, len(results), squeeze=False)[0]
    for ax, (name, r) in zip(axes, results.items(), strict=True):
        _heatmap(ax, r[key], r["methods"], r["methods"], f"{name}: {title}")
    figure.tight_layout()
    return [(title, figure)], "<p>Rows: crafted against; columns: measured on.</p>"


def _smoothing(results):
    figure = Figure(figsize=(7, 3.2))
    ax = figure.subplots()
    width = 0.8 / len(results)
    rows = []
    for k, (name, r) in enumerate(results.items()):
        labels = list(r["explanations"])
        values = [r["explanations"][e]["topk_intersection"] for e in labels]
        ax.bar(np.arange(len(labels)) + k * width, values, width, label=name)
        rows += [[name, e, r["explanations"][e]["topk_intersection"], r["explanations"][e]["spearman"]] for e in labels]
    ax.set_xticks(np.arange(len(labels)) + width * (len(results) - 1) / 2, labels, fontsize=8)
    ax.set_ylabel("top-k intersection")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7)
    return [("the same attack against smoothed explanations", figure)], _table(
        ["model", "explanation", "top-k", "Spearman"], rows
    )


def _curvature(results):
    figure = Figure(figsize=(8, 3))
    axes = figure.subplots(1, 2)
    rows = []
    for name, r in results.items():
        for ax, key in zip(axes, ("grad_norm", "hessian_top_eig"), strict=True):
            ax.hist(r[key]["values"], bins=30, alpha=0.5, label=name)
            ax.set_title(key.replace("_", " "), fontsize=9)
        rows.append([name, r["grad_norm"]["mean"], r["grad_norm"]["median"], r["hessian_top_eig"]["mean"],
                     r["hessian_top_eig"]["median"], r["hessian_top_eig"]["p90"]])  # fmt: skip
    axes[0].legend(fontsize=7)
    header = ["model", "grad norm mean", "median", "top eig mean", "median", "p90"]
    return [("input-gradient norms and top input-Hessian eigenvalues", figure)], _table(header, rows)


def _explaining_away(results):
    figure = Figure(figsize=(4 * len(results), 3))
    axes = figure.subplots(1, len(results), squeeze=False)[0]
    rows = []
    for ax, (name, r) in zip(axes, results.items(), strict=True):
        bins = np.linspace(-1, 1, 31)
        ax.hist(r["clean"]["coherence"], bins=bins, alpha=0.5, label="clean")
        for mode in ("random", "runner_up"):
            ax.hist(r[mode]["coherence"], bins=bins, alpha=0.5, label=f"targeted BIM, {mode.replace('_', '-')}")
            rows.append([name, mode, r[mode]["attack_success"], r[mode]["detection_auroc"]])
        ax.set_title(f"{name}: IG coherence", fontsize=9)
        ax.legend(fontsize=6)
    header = ["model", "targets", "attack success", "detection AUROC"]
    return [("attribution evidence, clean vs adversarial", figure)], _table(header, rows)


def _transferability(result):
    figure = Figure(figsize=(8, 3.4))
    a, b = figure.subplots(1, 2)
    _heatmap(a, result["accuracy"], result["rows"], result["models"], "accuracy on adversaries (PGD)")
    _heatmap(b, result["topk_intersection"], result["models"], result["models"], "top-k intersection (saliency)")
    figure.tight_layout()
    return [("transferability across checkpoints", figure)], "<p>Rows: crafted on; columns: evaluated on.</p>"


def _semantic(results, data: AuditData):
    figures = []
    for name, r in results.items():
        directions = r["top_indices"]
        top = len(next(iter(directions.values())))
        figure = Figure(figsize=(1.1 * top, 1.2 * len(directions)))
        axes = figure.subplots(len(directions), top, squeeze=False)
        for i, (label, indices) in enumerate(directions.items()):
            for j, index in enumerate(indices):
                image = _image(data.x[index])
                axes[i][j].imshow(image, cmap="gray" if image.ndim == 2 else None)
                axes[i][j].axis("off")
            axes[i][0].set_title(label, fontsize=8, loc="left")
        figure.suptitle(f"{name}: images that most activate {r['layer']} along each direction", fontsize=9)
        figures.append((f"semantic directions: {name}", figure))
    return (
        figures,
        "<p>Single units and random directions of the same layer give equally coherent sets (Szegedy et al.).</p>",
    )


def _tradeoff(report):
    results = report["results"]
    if "robustness" not in results or "fragility" not in results:
        return None
    figure = Figure(figsize=(5, 4))
    ax = figure.subplots()
    for name, r in results["robustness"].items():
        robust = r["accuracy"]["pgd"][-1]
        frag = results["fragility"][name]["methods"]
        method = "saliency" if "saliency" in frag else next(iter(frag))
        attack = "topk" if "topk" in frag[method] else next(iter(frag[method]))
        attribution = frag[method][attack]["by_epsilon"][-1]["topk_intersection"]
        ax.scatter(robust, attribution, s=40 + 400 * r["clean_accuracy"])
        ax.annotate(f"{name} (clean {r['clean_accuracy']:.2f})", (robust, attribution), fontsize=7)
    ax.set_xlabel(f"PGD accuracy at {r['epsilons'][-1] * 255:.3g}/255")
    ax.set_ylabel("attribution robustness (top-k intersection)")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    return figure


def _examples(models, data: AuditData) -> Figure:
    model = models[0].model
    x, y = data.x[:4], data.y[:4]
    attack = TopKAttack(steps=10, seed=data.seed)
    with gradient_context(model):
        result = attack.run(model, x.to(next(model.parameters()).device), y)
    clean, adv = result.maps_clean.cpu(), result.maps_adv.cpu()
    k = default_k(*clean.shape[1:])
    values = {"top-k intersection": topk_intersection(clean, adv, k), "spearman": spearman(clean, adv),
              "center shift": center_shift(clean, adv)}  # fmt: skip
    masks = (topk_mask(clean, k), topk_mask(adv, k))
    return panel_figure(
        x, result.x_adv.cpu(), clean, adv, masks, values, f"{models[0].name}: saliency, top-k attack, 8/255"
    )


RENDER = {
    "robustness": _robustness,
    "fragility": _fragility,
    "attribution_transfer": lambda r: _matrix_section(r, "topk_intersection", "top-k intersection"),
    "smoothing": _smoothing,
    "curvature": _curvature,
    "explaining_away": _explaining_away,
    "transferability": _transferability,
}

STYLE = """body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}
table{border-collapse:collapse;font-size:12px;margin:0.5em 0}td,th{border:1px solid #ccc;padding:2px 6px}
th{background:#f3f3f3}img{max-width:100%}h2{border-bottom:1px solid #ddd;margin-top:2em}"""


def write_html(report: dict, models, data: AuditData, path: Path) -> dict[str, bytes]:
    """Write the self-contained HTML report; returns the figures as PNG bytes, by title."""
    figures: dict[str, bytes] = {}
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>robustattr audit</title><style>{STYLE}</style>"
             "</head><body><h1>robustattr audit</h1>"]  # fmt: skip
    parts.append(
        _table(
            ["checkpoint", "file", "sha256"], [[c["name"], c["path"], c["sha256"][:16]] for c in report["checkpoints"]]
        )
    )
    d = report["data"]
    dataset = html.escape(str(d["config"].get("class_path")))
    libraries = html.escape(", ".join(f"{k} {v}" for k, v in report["versions"].items()))
    parts.append(
        f"<p>Data: {dataset}, {d['split']} split, {d['num_samples']} samples, seed {d['seed']}. "
        f"Versions: {libraries}.</p>"
    )

    def add(title: str, figure: Figure) -> None:
        png = _png(figure)
        figures[title] = png
        parts.append(f"<h3>{html.escape(title)}</h3><img src='data:image/png;base64,{base64.b64encode(png).decode()}'>")

    tradeoff = _tradeoff(report)
    if tradeoff is not None:
        parts.append("<h2>Trade-off</h2>")
        add("clean accuracy (marker size), robust accuracy and attribution robustness", tradeoff)
    for name, results in report["results"].items():
        parts.append(f"<h2>{html.escape(name.replace('_', ' '))}</h2>")
        if name == "semantic_directions":
            figs, text = _semantic(results, data)
        elif name in RENDER:
            figs, text = RENDER[name](results)
        else:
            figs, text = [], f"<pre>{html.escape(str(results))[:4000]}</pre>"
        parts.append(text)
        for title, figure in figs:
            add(title, figure)
        if name == "fragility":
            add("example maps, clean and attacked", _examples(models, data))
    parts.append("</body></html>")
    path.write_text("".join(parts))
    return figures


def write_wandb(report: dict, out_dir: Path, figures: dict[str, bytes] | None) -> None:
    """An offline W&B run (``out_dir/wandb``) with the report's scalars as tables and its figures as images."""
    import wandb
    from PIL import Image

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
            flatten(section, {k: v for k, v in results.items() if k not in ("values",)})
        run.log({"audit/numbers": wandb.Table(columns=["name", "value"], data=rows)})
        for title, png in (figures or {}).items():
            run.log({f"audit/figures/{title}": wandb.Image(Image.open(io.BytesIO(png)))})
    finally:
        run.finish()
