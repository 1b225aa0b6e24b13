"""The influence audit: which training points a checkpoint's predictions rest on, and how far to trust that answer
(Koh & Liang 2017, section 5; Ghorbani et al. 2019 on influence explanations).

Per checkpoint, on its own training split (the stored data settings: the planted label noise included):
(a) proponents and opponents of a seeded set of audited test points, misclassified ones included;
(b) label checking: training points ranked by self-influence, training loss, gradient norm and at random, and the
    share of the planted flips found after checking 5, 10, 20 and 30% of them (with the area under that curve);
    the top self-influence training images whatever the data;
(c) domain mismatch: the summed influence of every training point on the loss of the audited test errors (true
    labels), the most harmful first, summed by group where the training data carries groups;
(d) influence fragility: a label-preserving perturbation of each query lowering the influence of its top training
    points, against random signs of the same budget: Spearman of the influence vectors and top-5 overlap;
(e) the cost of each part.
"""

from __future__ import annotations

import copy
import time

import numpy as np
import torch

from robustattr.audit.sections.base import Rendered, Section, Table, Thumbnail, eps_label, predict
from robustattr.audit.sections.uncertainty import ci, error_bars
from robustattr.data.base import dataset_labels
from robustattr.errors import ConfigError, keep_counts
from robustattr.influence import ExactInfluence, Influence
from robustattr.influence.analysis import (
    FRACTIONS,
    dataset_groups,
    error_influence,
    found_curve,
    group_sums,
    random_signal,
)
from robustattr.influence.attacks import InfluenceFragilityAttack, compare_influence, random_sign
from robustattr.metrics.intervals import Estimate, mean_interval, proportion_interval
from robustattr.viz import grid, style

SIGNALS = ("self_influence", "loss", "gradient_norm", "random")
SIGNAL_NAMES = {"self_influence": "self-influence", "loss": "training loss", "gradient_norm": "gradient norm",
                "random": "random"}  # fmt: skip


def _default_backend() -> Influence:
    return ExactInfluence(scope="last", curvature="ggn", damping=0.01)


class InfluenceAudit(Section):
    """Influence of training points on the audited checkpoint's predictions.

    ``backend``: the influence backend (default: the exact damped Gauss-Newton matrix of the last linear layer,
    which for a linear head with cross-entropy equals its Hessian; `CGInfluence` for larger scopes). Its input
    gradients drive the fragility attack, so it needs explicit inverse products (exact, CG, TracIn; not EK-FAC).
    ``queries``: audited test points for (a) and (d), up to half of them misclassified ones. ``k``: proponents
    and opponents shown per query. ``top_self_influence``: training images shown by self-influence.
    ``epsilons``, ``steps``, ``top``: the fragility attack (budgets, signed steps, training points whose influence
    it lowers). ``overlap_k``: the top-k of the overlap measure (5)."""

    name = "influence"
    title = "influence of training points"
    uses_training = True
    split = "engine"  # under a job the influence engine shards the training split over the processes

    def __init__(
        self,
        backend: Influence | None = None,
        queries: int = 8,
        k: int = 5,
        top_self_influence: int = 16,
        harmful: int = 10,
        epsilons: list[float] | None = None,
        steps: int = 10,
        top: int = 3,
        overlap_k: int = 5,
    ) -> None:
        self.backend = backend if backend is not None else _default_backend()
        self.epsilons = [2 / 255, 4 / 255, 8 / 255] if epsilons is None else [float(e) for e in epsilons]
        for eps in self.epsilons:
            if not 0 < eps <= 1:
                raise ConfigError(f"InfluenceAudit: epsilons must lie in (0, 1] (images in [0, 1]), got {eps}")
        keep_counts(self, queries=queries, k=k, top_self_influence=top_self_influence, harmful=harmful, steps=steps,
                    top=top, overlap_k=overlap_k)  # fmt: skip

    def work(self, data):
        return 4 + len(self.epsilons)

    # ---------------------------------------------------------------------------------------------------- run
    def _queries(self, pred: torch.Tensor, y: torch.Tensor, seed: int) -> torch.Tensor:
        """Seeded audited test points: up to half of them misclassified, the rest correct, in subset order."""
        gen = torch.Generator().manual_seed(seed)
        wrong = (pred != y).nonzero().flatten()
        right = (pred == y).nonzero().flatten()
        count = min(self.queries, len(y))
        take_wrong = min(len(wrong), count // 2)
        chosen = torch.cat([wrong[torch.randperm(len(wrong), generator=gen)[:take_wrong]],
                            right[torch.randperm(len(right), generator=gen)[: count - take_wrong]]])  # fmt: skip
        return chosen.sort().values

    def run(self, model, data, progress):
        if data.training is None:
            raise ConfigError("InfluenceAudit: no training data for this checkpoint")
        cost: dict[str, float] = {}
        clock = time.perf_counter()

        def lap(part: str, units: int = 1) -> None:
            nonlocal clock
            now = time.perf_counter()
            cost[part] = round(now - clock, 3)
            clock = now
            progress(units)

        train = data.training.training_set()
        influence = copy.deepcopy(self.backend).fit(model, train)
        labels = dataset_labels(train.dataset)
        flips = data.training.flipped_labels()
        lap("fit")

        # (a) proponents and opponents
        pred = predict(model, data.x).argmax(1)
        chosen = self._queries(pred, data.y, data.seed)
        xq, yq = data.x[chosen], data.y[chosen]
        scored = influence.scores(xq, yq)
        before = scored.values  # (Q, n)

        def points(indices: torch.Tensor, scores: torch.Tensor) -> list[dict]:
            return [{"index": int(i), "label": int(labels[i]), "score": float(s), "flipped": int(i) in flips}
                    for i, s in zip(indices, scores, strict=True)]  # fmt: skip

        k = min(self.k, before.shape[1])
        top, bottom = before.topk(k, dim=1), before.topk(k, dim=1, largest=False)
        proponents = [
            {"query": int(q), "label": int(data.y[q]), "predicted": int(pred[q]),
             "misclassified": bool(pred[q] != data.y[q]), "proponents": points(top.indices[i], top.values[i]),
             "opponents": points(bottom.indices[i], bottom.values[i])}
            for i, q in enumerate(chosen.tolist())
        ]  # fmt: skip
        lap("proponents")

        # (b) label checking
        signals = influence.training_signals()
        signals["random"] = random_signal(len(train), data.seed)
        checking: dict = {"planted_flips": len(flips)}
        if flips:
            flipped = torch.zeros(len(train), dtype=torch.bool)
            flipped[list(flips)] = True
            curves = {name: found_curve(signals[name], flipped) for name in SIGNALS}
            checking["found_at"] = {name: c["found_at"] for name, c in curves.items()}
            checking["found_at_20"] = {name: c["found_at"]["20"] for name, c in curves.items()}
            checking["auc"] = {name: c["auc"] for name, c in curves.items()}
            checking["curve"] = {name: c["curve"] for name, c in curves.items()}
        most = signals["self_influence"].topk(min(self.top_self_influence, len(train)))
        checking["top_self_influence"] = [
            {**p, "original_label": flips[p["index"]][0] if p["flipped"] else None}
            for p in points(most.indices, most.values)
        ]  # fmt: skip
        lap("label_checking")

        # (c) domain mismatch: the training points behind the audited test errors
        errors = (pred != data.y).nonzero().flatten()
        mismatch: dict = {"test_errors": len(errors), "groups": None}
        if len(errors):
            total = error_influence(influence, data.x[errors], data.y[errors])
            order = total.argsort()
            count = min(self.harmful, len(total))
            mismatch["most_harmful"] = points(order[:count], total[order[:count]])
            mismatch["most_helpful"] = points(order.flip(0)[:count], total[order.flip(0)[:count]])
            if flips:
                harmful = set(order[: len(flips)].tolist())
                mismatch["flips_among_most_harmful"] = len(harmful & set(flips)) / len(flips)
            grouped = dataset_groups(train.dataset)
            if grouped is not None:
                mismatch["groups"] = group_sums(total, *grouped)
        lap("domain_mismatch")

        # (d) influence fragility
        fragility: dict = {"epsilons": self.epsilons, "queries": len(chosen), "top": self.top,
                           "top5_overlap": {"targeted": [], "random_sign": []},
                           "spearman": {"targeted": [], "random_sign": []},
                           "label_kept": {"targeted": [], "random_sign": []},
                           "ci": {key: {"targeted": [], "random_sign": []}
                                  for key in ("top5_overlap", "spearman", "label_kept")}}  # fmt: skip
        for e, eps in enumerate(self.epsilons):
            attack = InfluenceFragilityAttack(eps, steps=self.steps, top=self.top)
            result = attack(influence, xq, yq, before)
            noisy = random_sign(xq, eps, data.seed + e)
            for kind, images, kept in (
                ("targeted", result.x_adv, result.kept),
                ("random_sign", noisy, predict(model, noisy).argmax(1) == pred[chosen]),
            ):
                measured = compare_influence(before, influence.scores(images, yq).values, self.overlap_k)
                estimates = {
                    "top5_overlap": mean_interval(measured["top_overlap"], data.seed),
                    "spearman": mean_interval(measured["spearman"], data.seed),  # NaN (constant vector): dropped
                    "label_kept": proportion_interval(kept.float()),
                }  # over the queries
                for key, e in estimates.items():
                    fragility[key][kind].append(e.mean)
                    fragility["ci"][key][kind].append(ci(e))
            progress(1)
        lap("fragility", units=0)
        return {
            "backend": {"name": scored.backend, "damping": scored.damping, "scope": scored.scope, **scored.settings},
            "training_points": len(train),
            "proponents": proponents,
            "label_checking": checking,
            "domain_mismatch": mismatch,
            "fragility": fragility,
            "cost": cost,
        }

    # ------------------------------------------------------------------------------------------------- render
    def render(self, results, context):
        out = Rendered()
        first = next(iter(results.values()))["backend"]
        out.say(f"Backend {first['name']} over {first['scope']}, damping {first['damping']}; scores are positive when "
                "a training point helps (removing it would raise the query's loss), as Koh & Liang's -(1/n) I_up,loss. "
                "Every image below is a training image of the checkpoint's own training split, with the label it "
                "was trained on.")  # fmt: skip
        for name, r in results.items():
            self._render_proponents(out, name, r, context)
        self._render_label_checking(out, results, context)
        self._render_mismatch(out, results, context)
        self._render_fragility(out, results)
        rows = [[name, *[r["cost"].get(part, float("nan")) for part in
                         ("fit", "proponents", "label_checking", "domain_mismatch", "fragility")]]
                for name, r in results.items()]  # fmt: skip
        out.tables.append(Table(["model", "fit (s)", "proponents (s)", "label checking (s)", "domain mismatch (s)",
                                 "fragility (s)"], rows, "cost of each part"))  # fmt: skip
        return out

    @staticmethod
    def _thumbs(context, name: str, entries: list[dict], caption) -> list[Thumbnail]:
        training = context.training.get(name)
        if training is None or not entries:
            return [caption(e) for e in entries]
        images, _ = training.training_set().tensors([e["index"] for e in entries])
        return [Thumbnail.of(image, caption(e)) for image, e in zip(images, entries, strict=True)]

    def _render_proponents(self, out, name, r, context):
        k = len(r["proponents"][0]["proponents"]) if r["proponents"] else 0
        header = ["model", "query", *[f"proponent {i + 1}" for i in range(k)], *[f"opponent {i + 1}" for i in range(k)]]
        rows = []
        for q in r["proponents"]:
            query = Thumbnail.of(context.data.x[q["query"]],
                                 f"#{q['query']} label {q['label']}, predicted {q['predicted']}"
                                 + (" (wrong)" if q["misclassified"] else ""))  # fmt: skip

            def caption(e):
                return f"label {e['label']}{' (flipped)' if e['flipped'] else ''}, {e['score']:+.2g}"

            rows.append([name, query, *self._thumbs(context, name, q["proponents"], caption),
                         *self._thumbs(context, name, q["opponents"], caption)])  # fmt: skip
        wrong = sum(q["misclassified"] for q in r["proponents"])
        out.tables.append(
            Table(
                header,
                rows,
                f"{name}: proponents (most helpful) and opponents (most harmful) "
                f"training points of {len(rows)} test points, {wrong} misclassified",
            )
        )

    def _render_label_checking(self, out, results, context):
        noisy = {name: r["label_checking"] for name, r in results.items() if r["label_checking"]["planted_flips"]}
        if noisy:
            with style():
                fig, axes = grid(len(noisy), 2, 4.6, 3.6, extra_width=1.6)
                for ax, (name, c) in zip(axes, noisy.items(), strict=True):
                    checked = np.linspace(0, 1, len(next(iter(c["curve"].values()))))
                    for signal in SIGNALS:
                        ax.plot(
                            checked, c["curve"][signal], label=f"{SIGNAL_NAMES[signal]} (AUC {c['auc'][signal]:.3f})"
                        )
                    ax.set_xlim(0, 0.5)
                    ax.set_xlabel("fraction of training points checked")
                    ax.set_ylabel("fraction of flipped labels found")
                    ax.set_title(f"{name}: {c['planted_flips']} planted flips")
                    ax.grid(alpha=0.3)
                    ax.legend(fontsize=8, loc="lower right")
            out.figures.append(("label checking: flipped labels found vs training points checked", fig))
            header = ["model", "ranking", *[f"found at {100 * f:g}%" for f in FRACTIONS], "AUC"]
            rows = [[name, SIGNAL_NAMES[s], *[c["found_at"][s][f"{100 * f:g}"] for f in FRACTIONS], c["auc"][s]]
                    for name, c in noisy.items() for s in SIGNALS]  # fmt: skip
            out.tables.append(Table(header, rows, "share of the planted flips found after checking the training points "
                                                  "in each order"))  # fmt: skip
            for name, c in noisy.items():
                best = max(SIGNALS, key=lambda s: c["found_at"][s]["20"])
                out.say(f"{name}: checking 20% of the training points by self-influence finds "
                        f"{c['found_at_20']['self_influence']:.0%} of the {c['planted_flips']} planted flips; by "
                        f"training loss {c['found_at_20']['loss']:.0%}, by gradient norm "
                        f"{c['found_at_20']['gradient_norm']:.0%}, at random {c['found_at_20']['random']:.0%} "
                        f"(best here: {SIGNAL_NAMES[best]}).")  # fmt: skip
        else:
            out.say("No checkpoint's training data has planted label noise (label_noise): the flipped-label search is "
                    "not measured; the training points with the highest self-influence are shown.")  # fmt: skip
        for name, r in results.items():
            entries = r["label_checking"]["top_self_influence"]

            def caption(e):
                was = f" (was {e['original_label']})" if e["flipped"] else ""
                return f"#{e['index']} label {e['label']}{was}"

            thumbs = self._thumbs(context, name, entries, caption)
            width = 8
            rows = [[name, *thumbs[i : i + width]] for i in range(0, len(thumbs), width)]
            flipped = sum(e["flipped"] for e in entries)
            out.tables.append(Table(["model", *[""] * min(width, len(thumbs))], rows,
                                    f"{name}: the {len(entries)} training images of highest self-influence, with their "
                                    f"training labels ({flipped} of them planted flips)"))  # fmt: skip

    def _render_mismatch(self, out, results, context):
        for name, r in results.items():
            m = r["domain_mismatch"]
            if not m["test_errors"]:
                out.say(f"{name}: no audited test point is misclassified; nothing to trace.")
                continue

            def caption(e):
                return f"#{e['index']} label {e['label']}{' (flipped)' if e['flipped'] else ''}, {e['score']:+.2g}"

            thumbs = self._thumbs(context, name, m["most_harmful"], caption)
            out.tables.append(Table(["model", *[f"{i + 1}" for i in range(len(thumbs))]], [[name, *thumbs]],
                                    f"{name}: the training points most responsible for the {m['test_errors']} audited "
                                    "test errors (summed influence on their loss, most harmful first)"))  # fmt: skip
            if "flips_among_most_harmful" in m:
                out.say(f"{name}: of as many most-harmful training points as there are planted flips, "
                        f"{m['flips_among_most_harmful']:.0%} are flips.")  # fmt: skip
            if m["groups"]:
                rows = [[name, g["group"], g["size"], g["sum"], g["mean"]] for g in m["groups"]]
                out.tables.append(Table(["model", "group", "training points", "summed influence on the errors",
                                         "mean per training point"], rows, "by group (most harmful per training "
                                         "point first)"))  # fmt: skip

    def _render_fragility(self, out, results):
        with style():
            fig, axes = grid(2, 2, 4.6, 3.4, extra_width=1.4)
            for k, (name, r) in enumerate(results.items()):
                f = r["fragility"]
                x = [e * 255 for e in f["epsilons"]]
                for ax, key in zip(axes, ("top5_overlap", "spearman"), strict=True):
                    for kind, fmt in (("targeted", "-o"), ("random_sign", "--s")):
                        estimates = self._estimates(f, key, kind)
                        ax.errorbar(
                            x,
                            f[key][kind],
                            yerr=error_bars(estimates),
                            fmt=fmt,
                            capsize=2,
                            color=f"C{k}",
                            label=f"{name}: {kind.replace('_', ' ')}",
                        )
                    ax.set_xlabel("epsilon (/255)")
                    ax.set_ylabel(key.replace("_", " ").replace("top5", "top-5"))
                    ax.grid(alpha=0.3)
            axes[1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        out.figures.append(("influence fragility: targeted perturbation vs random sign", fig))
        rows = [[name, eps_label(e), *[self._estimates(f, key, kind)[i] for key in ("top5_overlap", "spearman",
                                                                                     "label_kept")
                                       for kind in ("targeted", "random_sign")]]
                for name, r in results.items()
                for f in [r["fragility"]]
                for i, e in enumerate(f["epsilons"])]  # fmt: skip
        out.tables.append(Table(["model", "epsilon", "top-5 overlap: targeted", "top-5 overlap: random sign",
                                 "Spearman: targeted", "Spearman: random sign", "label kept: targeted",
                                 "label kept: random sign"], rows,
                                f"influence vectors of {next(iter(results.values()))['fragility']['queries']} "
                                "test points before and after each perturbation, mean [95% interval over the "
                                "queries]"))  # fmt: skip

    @staticmethod
    def _estimates(f: dict, key: str, kind: str) -> list[Estimate]:
        bounds = f.get("ci", {}).get(key, {}).get(kind) or [[float("nan")] * 2] * len(f[key][kind])
        return [Estimate(v, *b, 0) for v, b in zip(f[key][kind], bounds, strict=True)]
