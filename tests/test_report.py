"""The audit report states what was measured on this run: each section renders its own results, tables carry the
numbers their figures show, the trade-off epsilon is chosen where checkpoints differ, progress is readable in any
log, and names, timings and JSON keys are clean. Tiny untrained networks: these are tests of the report, not of
the numbers (tests/test_audit.py checks those on trained checkpoints)."""

import io
import json
import re

import pytest
import torch
from torch import nn

from robustattr.attributions import Saliency
from robustattr.audit import run_audit
from robustattr.audit.progress import PlainProgress, progress_display
from robustattr.audit.report import collect, tradeoff
from robustattr.audit.sections import (
    ExplanationFragility,
    RobustnessCurves,
    SemanticDirections,
    SmoothingWithoutRetraining,
)
from robustattr.audit.sections.base import RenderContext
from robustattr.errors import ConfigError
from robustattr.models import SmallCNN

DIGITS = {"class_path": "robustattr.data.DigitsDataModule"}


def _net(activation: str = "torch.nn.ReLU") -> dict:
    return {"class_path": "robustattr.models.SmallCNN", "init_args": {"width": 4, "activation": activation}}


def _weights(tmp_path, name: str, seed: int, activation=nn.ReLU) -> str:
    torch.manual_seed(seed)
    path = tmp_path / f"{name}.pt"
    torch.save(SmallCNN(width=4, activation=activation).state_dict(), path)
    return str(path)


def _sections():
    return [
        RobustnessCurves(
            epsilons=[2 / 255, 0.1, 0.3], steps=2, lbfgs_samples=2, lbfgs_search_steps=1, lbfgs_max_iter=2
        ),
        ExplanationFragility(methods=[Saliency()], epsilons=[2 / 255, 4 / 255], steps=1, num_samples=4, examples=1),
        SmoothingWithoutRetraining(num_samples=4, samples=2, betas=[3.0, 1.0]),
        SemanticDirections(top=4),
    ]


def _audit(tmp_path, checkpoints, net=None, **kwargs):
    return run_audit(checkpoints, _sections(), out=str(tmp_path / "audit"), num_samples=8, batch_size=8, html=False,
                     net=net or _net(), data=DIGITS, **kwargs)  # fmt: skip


def _robustness(acc: dict[str, list[float]], epsilons=(0.01, 0.03, 0.1)) -> dict:
    return {
        name: {"epsilons": list(epsilons), "clean_accuracy": 0.99, "accuracy": {"pgd": a}} for name, a in acc.items()
    }


def _fragility(values: dict[str, list[float]], epsilons=(0.01, 0.03, 0.1)) -> dict:
    return {
        name: {"epsilons": list(epsilons),
               "methods": {"saliency": {"topk": {"by_epsilon": [{"topk_intersection": v} for v in vs]}}}}
        for name, vs in values.items()
    }  # fmt: skip


def test_the_tradeoff_epsilon_is_where_the_checkpoints_differ_most_or_the_one_given():
    robustness = _robustness({"a": [0.9, 0.5, 0.0], "b": [0.95, 0.9, 0.0], "c": [0.9, 0.7, 0.01]})
    fragility = _fragility({"a": [0.8, 0.6, 0.4], "b": [0.9, 0.8, 0.7], "c": [0.85, 0.7, 0.5]})
    fig, table, chosen = tradeoff(robustness, fragility, None)
    assert chosen == 0.03  # spread 0.4 there, 0.05 and 0.01 elsewhere (at the largest epsilon every model is at 0)
    assert table.rows == [["a", 0.99, 0.5, 0.6], ["b", 0.99, 0.9, 0.8], ["c", 0.99, 0.7, 0.7]]
    ax = fig.axes[0]
    (x0, x1), (y0, y1) = ax.get_xlim(), ax.get_ylim()
    for _, _, robust, attribution in table.rows:  # every marker inside the axes, none clipped on an edge
        assert x0 < robust < x1 and y0 < attribution < y1
    assert "PGD accuracy at 7.65/255" in ax.get_xlabel()
    _, table, chosen = tradeoff(robustness, fragility, 0.1)
    assert chosen == 0.1 and [row[2] for row in table.rows] == [0.0, 0.0, 0.01]
    _, _, chosen = tradeoff(_robustness({"only": [0.9, 0.45, 0.1]}), _fragility({"only": [0.8, 0.6, 0.4]}), None)
    assert chosen == 0.03  # one checkpoint: where its accuracy is nearest 0.5


def test_each_section_renders_its_own_tables_with_every_number_of_its_figures(tmp_path):
    a, b = _weights(tmp_path, "a", 0), _weights(tmp_path, "b", 1)
    report = _audit(tmp_path, [f"first={a}", f"second={b}"])
    models = {"first": SmallCNN(width=4).eval(), "second": SmallCNN(width=4).eval()}
    from robustattr.audit.engine import build_data

    data = build_data(DIGITS, "test", 8, 8, 0, "test", (), from_checkpoint=False)
    parts = dict(collect(report, _sections(), RenderContext(models, data), None))
    assert next(iter(parts)) == "trade-off"
    robustness = report["results"]["robustness"]
    rows = parts[RobustnessCurves.title].tables[0].rows
    for name in ("first", "second"):  # FGSM, BIM and PGD accuracy at every epsilon, as plotted
        for attack in ("fgsm", "bim", "pgd"):
            (row,) = [r for r in rows if r[0] == name and r[1] == attack.upper()]
            assert [e.mean for e in row[2:]] == [robustness[name]["clean_accuracy"],
                                                 *robustness[name]["accuracy"][attack]]  # fmt: skip
            assert all(0 <= e.ci_low <= e.mean <= e.ci_high <= 1 for e in row[2:])  # with its Wilson interval
    lbfgs = parts[RobustnessCurves.title].tables[1]
    assert lbfgs.header[2] == "success rate" and all(0 <= r[2].mean <= 1 for r in lbfgs.rows)
    fragility = parts[ExplanationFragility.title]
    assert [name for name, _ in fragility.figures].count("example maps, first") == 1
    assert [name for name, _ in fragility.figures].count("example maps, second") == 1  # every checkpoint
    for name, fig in fragility.figures:  # titled with the epsilon it was drawn at, the largest audited
        if name.startswith("example"):
            assert "4/255" in fig._suptitle.get_text() and "8/255" not in fig._suptitle.get_text()


def test_smoothing_of_a_smooth_network_says_so_instead_of_repeating_rows(tmp_path):
    smooth = _weights(tmp_path, "smooth", 0, activation=nn.Softplus)
    report = _audit(tmp_path, [f"smooth={smooth}"], net=_net("torch.nn.Softplus"))
    result = report["results"]["smoothing"]["smooth"]
    assert result["softplus_applicable"] is False
    assert set(result["explanations"]) == {"saliency", "smoothgrad", "uniform_gradient"}
    rendered = SmoothingWithoutRetraining(betas=[3.0, 1.0]).render(report["results"]["smoothing"], None)
    assert any("do not apply" in text and "smooth already" in text for text in rendered.text)
    kinked = _weights(tmp_path, "kinked", 0)
    report = _audit(tmp_path, [f"kinked={kinked}"])
    result = report["results"]["smoothing"]["kinked"]
    assert result["softplus_applicable"] is True and {"softplus_3", "softplus_1"} <= set(result["explanations"])


def test_semantic_directions_state_only_measured_purities(tmp_path):
    a = _weights(tmp_path, "a", 0)
    report = _audit(tmp_path, [f"a={a}"])
    r = report["results"]["semantic_directions"]["a"]
    from robustattr.audit.engine import build_data

    data = build_data(DIGITS, "test", 8, 8, 0, "test", (), from_checkpoint=False)
    for label, indices in r["top_indices"].items():  # the purity is the share of the most common label
        labels = data.y[indices]
        assert r["label_purity"][label] == pytest.approx(labels.bincount().max().item() / len(labels))
    rendered = SemanticDirections(top=4).render(report["results"]["semantic_directions"],
                                                RenderContext({"a": SmallCNN(width=4)}, data))  # fmt: skip
    (sentence,) = rendered.text
    assert f"single units {r['purity_units']:.2f}" in sentence
    assert f"random directions {r['purity_random_directions']:.2f}" in sentence
    assert "equally coherent" not in sentence


def test_progress_off_a_terminal_prints_plain_lines_and_cached_parts_take_no_time(tmp_path, capsys):
    a = _weights(tmp_path, "a", 0)
    first = _audit(tmp_path, [f"a={a}"])
    out = capsys.readouterr().out
    assert re.search(r"^robustness \[a\]: 0/\d+$", out, re.M)
    assert re.search(r"^fragility \[a\]: \d+/\d+ \(100%\), 0:\d\d elapsed, done$", out, re.M)
    assert all(not t["cached"] and t["seconds"] > 0 for t in first["timings"].values())
    second = _audit(tmp_path, [f"a={a}"])
    out = capsys.readouterr().out
    assert "robustness [a]: cached (0 s)" in out
    assert all(t["cached"] and t["seconds"] == 0.0 for t in second["timings"].values())
    keys = json.loads((tmp_path / "audit" / "report.json").read_text())["timings"]
    assert set(keys) == {f"{s.name} [a]" for s in _sections()}  # no console markup in the keys


def test_plain_progress_prints_periodic_lines_with_an_eta():
    stream = io.StringIO()
    progress = PlainProgress(stream, every=0.0)
    task = progress.add_task("fragility [m]", total=4)
    progress.advance(task, 1)
    progress.advance(task, 3)
    lines = stream.getvalue().splitlines()
    assert lines[0] == "fragility [m]: 0/4"
    assert re.fullmatch(r"fragility \[m\]: 1/4 \(25%\), 0:00 elapsed, ETA 0:00", lines[1])
    assert lines[2].endswith("done")
    assert isinstance(progress_display(io.StringIO()), PlainProgress)  # not a terminal


def test_names_from_name_equals_path_or_the_names_option(tmp_path):
    a, b = _weights(tmp_path, "a", 0), _weights(tmp_path, "b", 1)
    report = run_audit([f"baseline={a}", b], [SemanticDirections(top=2)], out=str(tmp_path / "one"), num_samples=4,
                       batch_size=4, html=False, net=_net(), data=DIGITS)  # fmt: skip
    assert [c["name"] for c in report["checkpoints"]] == ["baseline", "b"]
    report = run_audit([a, b], [SemanticDirections(top=2)], names=["x", "y"], out=str(tmp_path / "two"),
                       num_samples=4, batch_size=4, html=False, net=_net(), data=DIGITS)  # fmt: skip
    assert [c["name"] for c in report["checkpoints"]] == ["x", "y"]
    assert set(report["results"]["semantic_directions"]) == {"x", "y"}
    with pytest.raises(ConfigError, match="1 names for 2 checkpoints"):
        run_audit([a, b], [SemanticDirections()], names=["x"], out=str(tmp_path / "three"), net=_net(), data=DIGITS)
