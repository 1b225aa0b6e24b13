"""The audit cache never returns a stale number, survives broken entries, and a fault leaves nothing behind.

Runs on a small random network saved as a plain state dict (no training), with the digits named in the call."""

import errno
import json
import warnings

import pytest
import torch

from robustattr.attacks import LinfBall, RandomSignAttack, TopKAttack
from robustattr.attributions import IntegratedGradients, Saliency
from robustattr.audit import ExplanationFragility, Section, run_audit
from robustattr.audit.cache import fingerprint
from robustattr.errors import NonFiniteError
from robustattr.files import DiskFullError, atomic_write
from robustattr.models import SmallCNN

NET = {"class_path": "robustattr.models.SmallCNN", "init_args": {"width": 4}}
DIGITS = {"class_path": "robustattr.data.DigitsDataModule"}


@pytest.fixture
def weights(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "net.pt"
    torch.save(SmallCNN(width=4).state_dict(), path)
    return path


def fragility(method=None, attack=None, epsilons=(4 / 255,)):
    return ExplanationFragility(
        methods=[method or IntegratedGradients(steps=4)],
        attacks=[attack or TopKAttack(steps=2, k=5)],
        epsilons=list(epsilons),
        num_samples=4,
    )


def audit(weights, out, section, **kwargs):
    options = {"num_samples": 4, "batch_size": 4, "html": False, "net": NET, "data": DIGITS, **kwargs}
    return run_audit([str(weights)], [section], out=str(out), **options)


def cached(report) -> bool:
    (timing,) = report["timings"].values()
    return timing["cached"]


def values(report):
    (result,) = report["results"]["fragility"].values()
    return result


CHANGES = {
    "IG steps 4 -> 32": (dict(method=IntegratedGradients(steps=32)), {}),
    "IG output logit -> softmax": (dict(method=IntegratedGradients(steps=4, output="softmax")), {}),
    "top-k k 5 -> 12": (dict(attack=TopKAttack(steps=2, k=12)), {}),
    "attack steps 2 -> 3": (dict(attack=TopKAttack(steps=3, k=5)), {}),
    "attack step size": (dict(attack=TopKAttack(steps=2, k=5, step_size=0.01)), {}),
    "attack seed": (dict(attack=TopKAttack(steps=2, k=5, seed=1)), {}),
    "surrogate beta": (dict(attack=TopKAttack(steps=2, k=5, beta=3.0)), {}),
    "epsilons": (dict(epsilons=(8 / 255,)), {}),
    "attack kind": (dict(attack=RandomSignAttack(k=5)), {}),
    "audit seed": ({}, dict(seed=1)),
    "subset size": ({}, dict(num_samples=5)),
    "batch size": ({}, dict(batch_size=2)),
    "split": ({}, dict(split="val")),
    "data settings": ({}, dict(data={**DIGITS, "init_args": {"split_seed": 1}})),
}


@pytest.mark.parametrize("change", list(CHANGES))
def test_every_setting_change_is_a_cache_miss(weights, tmp_path, change):
    section_kwargs, audit_kwargs = CHANGES[change]
    first = audit(weights, tmp_path, fragility())
    assert not cached(first) and cached(audit(weights, tmp_path, fragility()))
    changed = audit(weights, tmp_path, fragility(**section_kwargs), **audit_kwargs)
    assert not cached(changed), change


def test_a_changed_setting_reports_new_numbers_beside_new_settings(weights, tmp_path):
    """The issue's case: IG steps 4 -> 32 in the same --out used to print "(cached)" and the old numbers."""
    few = values(audit(weights, tmp_path, fragility(IntegratedGradients(steps=4))))
    many = values(audit(weights, tmp_path, fragility(IntegratedGradients(steps=32))))
    fresh = values(audit(weights, tmp_path / "fresh", fragility(IntegratedGradients(steps=32))))
    assert many == fresh and many != few


def test_other_weights_are_a_cache_miss(weights, tmp_path):
    audit(weights, tmp_path, fragility())
    other = tmp_path / "other.pt"
    torch.save(SmallCNN(width=4).state_dict(), other)
    assert not cached(audit(other, tmp_path, fragility()))


@pytest.mark.parametrize("content", ["", '{"key": "', "null", '{"key": "elsewhere", "result": {}}'])
def test_a_broken_cache_entry_is_recomputed_with_a_warning(weights, tmp_path, content):
    first = audit(weights, tmp_path, fragility())
    (entry,) = (tmp_path / "cache").glob("fragility-*.json")
    entry.write_text(content)
    with pytest.warns(RuntimeWarning, match="unreadable cache entry"):
        again = audit(weights, tmp_path, fragility())
    assert not cached(again) and values(again) == values(first)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cached(audit(weights, tmp_path, fragility()))  # rewritten whole


def test_a_full_disk_leaves_nothing_that_blocks_the_next_run(weights, tmp_path, monkeypatch):
    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("robustattr.files.os.fsync", full)
    with pytest.raises(DiskFullError, match="No space left on device"):
        audit(weights, tmp_path, fragility())
    assert not list(tmp_path.glob("**/*.tmp")) and not list((tmp_path / "cache").glob("*.json"))
    monkeypatch.undo()
    report = audit(weights, tmp_path, fragility())
    assert not cached(report) and (tmp_path / "report.json").is_file()


def test_atomic_write_keeps_the_previous_file_when_a_write_fails(tmp_path):
    path = tmp_path / "file.json"
    atomic_write(path, "previous")

    def half(f):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(DiskFullError):
        atomic_write(path, half)
    assert path.read_text() == "previous" and [p.name for p in tmp_path.iterdir()] == ["file.json"]


class NaNSection(Section):
    name = "nan_section"

    def run(self, model, data, progress):
        progress(1)
        return {"value": float("nan"), "values": [1.0, float("inf")]}


def test_report_json_is_standard_json(weights, tmp_path):
    report = audit(weights, tmp_path, NaNSection())
    assert report["results"]["nan_section"]  # NaN in memory, for the HTML report

    def refuse(name):
        raise ValueError(f"bare {name} in report.json")

    saved = json.loads((tmp_path / "report.json").read_text(), parse_constant=refuse)
    (result,) = saved["results"]["nan_section"].values()
    assert result == {"value": None, "values": [1.0, None]}


def test_fingerprint_sees_every_attribute_and_refuses_what_it_cannot_describe():
    base = TopKAttack(Saliency(), LinfBall(8 / 255), steps=2)
    assert fingerprint(base) == fingerprint(TopKAttack(Saliency(), LinfBall(8 / 255), steps=2))
    for other in (
        TopKAttack(Saliency(output="softmax"), LinfBall(8 / 255), steps=2),
        TopKAttack(Saliency(), LinfBall(4 / 255), steps=2),
        TopKAttack(Saliency(), LinfBall(8 / 255), steps=2, beta_end=100.0),
    ):
        assert fingerprint(other) != fingerprint(base)
    assert fingerprint(torch.zeros(3)) != fingerprint(torch.zeros(3, dtype=torch.float64))
    assert fingerprint(float("nan")) == fingerprint(float("nan"))

    class Opaque:
        __slots__ = ("value",)

    with pytest.raises(TypeError, match="cannot fingerprint"):
        fingerprint(Opaque())


def test_a_checkpoint_with_non_finite_weights_is_refused_not_reported_robust(tmp_path):
    """An all-NaN model used to be reported as perfectly robust (every attack "failed" to change its output)."""
    state = {
        k: torch.full_like(v, float("nan")) if v.is_floating_point() else v
        for k, v in SmallCNN(width=4).state_dict().items()
    }
    torch.save(state, tmp_path / "nan.pt")
    with pytest.raises(NonFiniteError, match=r"nan\.pt: the weights are not finite"):
        audit(tmp_path / "nan.pt", tmp_path, fragility())
    assert not (tmp_path / "report.json").exists()
