"""evaluate.py checkpoint audits on checkpoints trained on the digits inside the tests."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from robustattr.attacks import TopKAttack
from robustattr.attributions import Saliency, SmoothGrad
from robustattr.audit import (
    CertifiedAttributions,
    ExplainingAway,
    ExplanationFragility,
    Transferability,
    WorstCaseFragility,
    load_model,
    main,
    run_audit,
)
from robustattr.audit.cache import json_safe
from robustattr.cli import main as train
from robustattr.errors import RobustAttrError
from robustattr.models import SmallCNN
from robustattr.models.weights import UnsafeCheckpointError
from robustattr.wandb_offline import find_offline_runs, read_offline_run

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow
ONLY_CHECKPOINTING = json.dumps(
    [{"class_path": "pytorch_lightning.callbacks.ModelCheckpoint", "init_args": {"monitor": "val/acc", "mode": "max"}}]
)


def _train(config: str, folder: Path, epochs: int) -> Path:
    args = ["--config", str(ROOT / "configs" / config), "--trainer.max_epochs", str(epochs)]
    args += ["--trainer.logger", "false", "--trainer.default_root_dir", str(folder)]
    args += ["--trainer.callbacks", ONLY_CHECKPOINTING, "--trainer.enable_progress_bar", "false"]
    summary = train(args)
    return Path(summary["checkpoint"])


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    folder = tmp_path_factory.mktemp("runs")
    return {
        "baseline": _train("quickstart.yaml", folder / "baseline", epochs=8),
        "ssr": _train("quickstart_reg.yaml", folder / "ssr", epochs=8),
    }


TINY_AUDIT = {
    "num_samples": 48,
    "batch_size": 24,
    "seed": 0,
    "sections": [
        {"class_path": "robustattr.audit.RobustnessCurves",
         "init_args": {"epsilons": [0.0313725, 0.1], "steps": 3, "lbfgs_samples": 8, "lbfgs_search_steps": 2,
                       "lbfgs_max_iter": 10}},
        {"class_path": "robustattr.audit.ExplanationFragility",
         "init_args": {"epsilons": [0.0156863, 0.0313725], "steps": 2, "num_samples": 24,
                       "methods": [{"class_path": "robustattr.attributions.Saliency"},
                                   {"class_path": "robustattr.attributions.IntegratedGradients",
                                    "init_args": {"steps": 4}},
                                   {"class_path": "robustattr.attributions.DeepLift"}]}},
        {"class_path": "robustattr.audit.AttributionTransfer", "init_args": {"num_samples": 24}},
        {"class_path": "robustattr.audit.SmoothingWithoutRetraining",
         "init_args": {"num_samples": 24, "samples": 4, "betas": [3.0]}},
        {"class_path": "robustattr.audit.Curvature", "init_args": {"power_iters": 3}},
        {"class_path": "robustattr.audit.ExplainingAway", "init_args": {"epsilon": 0.1, "steps": 5, "ig_steps": 4}},
        {"class_path": "robustattr.audit.Transferability", "init_args": {"steps": 3, "num_samples": 24}},
        {"class_path": "robustattr.audit.SemanticDirections", "init_args": {"top": 4}},
        {"class_path": "robustattr.audit.WorstCaseFragility",
         "init_args": {"epsilons": [0.0313725], "steps": 2, "restarts": 1, "betas": [30.0], "num_samples": 12,
                       "methods": [{"class_path": "robustattr.attributions.Saliency"}],
                       "budgets": {"saliency": {"steps": 3}}}},
        {"class_path": "robustattr.audit.CertifiedAttributions",
         "init_args": {"n": 64, "radii": [0.0, 0.25], "attack_radii": [0.25], "steps": 2, "surrogate_samples": 2,
                       "eval_draws": 16, "num_samples": 8}},
    ],
}  # fmt: skip


def timings_aside(value):
    """A result without what a clock measured (a section's ``cost`` and its runs' ``seconds``)."""
    if isinstance(value, dict):
        return {k: timings_aside(v) for k, v in value.items() if k not in ("cost", "seconds")}
    if isinstance(value, list):
        return [timings_aside(v) for v in value]
    return value


def bracketed_intervals(value, found=None) -> dict[str, int]:
    """Every ``ci`` beside a mean in a result, checked: low <= mean <= high (NaN bounds only where fewer than two
    samples counted). Returns the count of intervals checked per top-level key."""
    found = {} if found is None else found

    def check(mean, bounds, where):
        if isinstance(bounds, dict):
            for k, b in bounds.items():
                check(mean[k], b, f"{where}.{k}")
        elif isinstance(mean, list) and mean and not isinstance(bounds[0], (float, int, type(None))):
            for m, b in zip(mean, bounds, strict=True):
                check(m, b, where)
        else:
            low, high = bounds
            if mean is not None and low is not None and math.isfinite(low):
                assert low - 1e-9 <= mean <= high + 1e-9, (where, low, mean, high)
            found[where] = found.get(where, 0) + 1

    if isinstance(value, dict):
        for k, bounds in value.get("ci", {}).items():
            check(value[k], bounds, k)
        for k, v in value.items():
            if k != "ci":
                bracketed_intervals(v, found)
    elif isinstance(value, list):
        for v in value:
            bracketed_intervals(v, found)
    return found


def test_every_section_reports_json_and_html_and_a_rerun_is_cached(checkpoints, tmp_path):
    config = tmp_path / "audit.yaml"
    config.write_text(yaml.safe_dump(TINY_AUDIT))
    args = ["--checkpoint", str(checkpoints["baseline"]), str(checkpoints["ssr"]), "--config", str(config)]
    report = main([*args, "--out", str(tmp_path / "a")])
    results = report["results"]
    assert set(results) == {
        "robustness", "fragility", "attribution_transfer", "smoothing", "curvature", "explaining_away",
        "transferability", "semantic_directions", "worst_case_fragility", "certified_attributions",
    }  # fmt: skip
    names = [c["name"] for c in report["checkpoints"]]
    assert len(set(names)) == 2 and all(len(c["sha256"]) == 64 for c in report["checkpoints"])
    for name in names:
        assert 0.8 < results["robustness"][name]["clean_accuracy"] <= 1
        assert set(results["fragility"][name]["methods"]) == {"saliency", "ig", "deeplift"}
    for section, per_model in results.items():  # every mean with its interval
        if section not in ("worst_case_fragility", "certified_attributions"):
            assert bracketed_intervals(per_model), f"{section} reports no interval"
    checked = bracketed_intervals(results["robustness"])
    assert {"clean_accuracy", "accuracy.pgd", "accuracy.fgsm", "lbfgs.success_rate"} <= set(checked)
    assert set(report["comparisons"]) >= {"robustness", "fragility", "smoothing", "curvature", "worst_case_fragility"}
    assert report["comparisons"]["worst_case_fragility"][0]["samples"] <= 12
    assert len(results["transferability"]["accuracy"]) == 3  # two models and the Gaussian-noise row
    assert report["versions"]["torch"] == torch.__version__ and report["seed"] == 0
    saved = json.loads((tmp_path / "a" / "report.json").read_text())
    assert saved["results"] == json_safe(results)  # NaN (a statistic over no samples) is written as null
    page = (tmp_path / "a" / "report.html").read_text()
    assert page.count("src='data:image/png;base64,") >= 10 and "<table>" in page
    again = main([*args, "--out", str(tmp_path / "a")])
    assert all(t == {"seconds": 0.0, "cached": True} for t in again["timings"].values())
    assert json_safe(again["results"]) == saved["results"]
    fresh = main([*args, "--out", str(tmp_path / "b")])  # recomputed: the same seed gives the same numbers
    assert not any(t["cached"] for t in fresh["timings"].values())
    assert timings_aside(json_safe(fresh["results"])) == timings_aside(saved["results"])


def test_the_audit_ranks_the_ssr_model_above_the_baseline(checkpoints, tmp_path):
    section = ExplanationFragility(
        methods=[Saliency()], attacks=[TopKAttack(steps=10)], epsilons=[8 / 255], num_samples=128
    )
    report = run_audit(
        [str(checkpoints["baseline"]), str(checkpoints["ssr"])], [section], out=str(tmp_path), html=False
    )
    names = [c["name"] for c in report["checkpoints"]]  # in the order given: baseline, ssr
    (base, reg) = (report["results"]["fragility"][name]["methods"]["saliency"]["topk"] for name in names)
    assert reg["by_epsilon"][0]["topk_intersection"] > base["by_epsilon"][0]["topk_intersection"]
    assert reg["auc_cosine_distance"] < base["auc_cosine_distance"]


def test_worst_case_section_gives_intervals_flags_noise_floor_and_paired_comparisons(checkpoints, tmp_path):
    section = WorstCaseFragility(
        methods=[Saliency(), SmoothGrad(samples=4)], epsilons=[4 / 255, 8 / 255], steps=8, restarts=1,
        betas=[30.0], budgets={"smoothgrad": {"steps": 3}}, num_samples=32,
    )  # fmt: skip
    paths = [f"base={checkpoints['baseline']}", f"ssr={checkpoints['ssr']}", f"again={checkpoints['baseline']}"]
    report = run_audit(paths, [section], out=str(tmp_path), num_samples=32)
    results = report["results"]["worst_case_fragility"]
    for name in ("base", "ssr", "again"):
        r = results[name]
        assert set(r["worst_case"]) == {"saliency", "smoothgrad"} and set(r["noise_floor"]) == {"smoothgrad"}
        for method, per_eps in r["worst_case"].items():
            assert set(per_eps) == {"4/255", "8/255"}
            for entry in per_eps.values():
                for metric in ("topk_intersection", "spearman"):
                    e = entry[metric]
                    assert e["ci_low"] <= e["mean"] <= e["ci_high"] and e["n"] == 32
                assert isinstance(entry["converged"], bool) and isinstance(entry["flags"], list)
                assert set(entry["flags"]) <= set(entry["checks"])
                assert entry["curve"]["steps"][-1] == r["attacks"][method]["budget_steps"]
                assert len(entry["per_sample"]["topk_intersection"]) == 32
            # a larger ball is at least as damaging: the 8/255 iterate search contains the 4/255 one
            assert per_eps["8/255"]["topk_intersection"]["mean"] <= per_eps["4/255"]["topk_intersection"]["mean"] + 0.02
        assert 0 < r["noise_floor"]["smoothgrad"]["topk_intersection"]["mean"] < 1
    assert timings_aside(results["again"]) == timings_aside(results["base"])  # same seed, same numbers
    saliency = results["ssr"]["worst_case"]["saliency"]["8/255"]["topk_intersection"]["mean"]
    assert saliency > results["base"]["worst_case"]["saliency"]["8/255"]["topk_intersection"]["mean"]
    comparisons = report["comparisons"]["worst_case_fragility"]
    assert len(comparisons) == 3 * 2 * 2 * 2  # pairs x methods x epsilons x metrics
    itself = [c for c in comparisons if {c["a"], c["b"]} == {"base", "again"}]
    assert itself and all(not c["resolved"] and c["difference"] == 0 and c["more_robust"] is None for c in itself)
    for c in comparisons:
        assert c["ci_low"] <= c["difference"] <= c["ci_high"]
        assert c["resolved"] == (c["ci_low"] > 0 or c["ci_high"] < 0)
    page = (tmp_path / "report.html").read_text()
    assert "do not differ" in page and "95%" in page and page.count("src='data:image/png;base64,") >= 2


def test_certified_section_reports_both_certificates_beside_the_l2_attack_with_intervals(checkpoints, tmp_path):
    section = CertifiedAttributions(
        sigma=0.25, n=512, radii=[0.0, 0.05, 0.1, 0.25], attack_radii=[0.1, 0.25], steps=4, surrogate_samples=4,
        eval_draws=256, num_samples=24,
    )  # fmt: skip
    paths = [f"base={checkpoints['baseline']}", f"again={checkpoints['baseline']}"]
    report = run_audit(paths, [section], out=str(tmp_path), num_samples=24)
    results = report["results"]["certified_attributions"]
    entry = results["base"]["certified"]["saliency"]
    assert entry["radius"] == [0.0, 0.05, 0.1, 0.25]
    for key in ("certified_topk_fraction", "certified_pixel_fraction", "certified_top_fraction"):
        means = [e["mean"] for e in entry[key]]
        assert all(e["ci_low"] <= e["mean"] <= e["ci_high"] and e["n"] == 24 for e in entry[key]), key
        assert means == sorted(means, reverse=True), key  # a larger radius certifies no more
    assert entry["certified_topk_fraction"][0]["mean"] > 0.3  # not vacuous at radius 0
    assert entry["empirical_topk"][0] is None and entry["empirical_topk"][1] is None
    for i in (2, 3):  # the lower bound lies below the upper bound the attack found
        assert entry["certified_topk_fraction"][i]["mean"] <= entry["empirical_topk"][i]["mean"]
    assert 0 < entry["noise_floor"]["mean"] <= 1 and entry["max_radius"]["levine"] > 0.25
    assert len(entry["per_sample"]["0.25"]["empirical_topk"]) == 24
    assert timings_aside(results["again"]) == timings_aside(results["base"])  # same seed, same numbers
    comparisons = report["comparisons"]["certified_attributions"]
    assert comparisons and all(not c["resolved"] and c["difference"] == 0 for c in comparisons)
    page = (tmp_path / "report.html").read_text()
    assert "Levine" in page and "Anani" in page and "L2 radius" in page


def test_detection_auroc_is_higher_for_random_than_for_runner_up_targets(checkpoints, tmp_path):
    section = ExplainingAway(epsilon=0.2, steps=30, num_samples=256)
    report = run_audit([str(checkpoints["baseline"])], [section], out=str(tmp_path), num_samples=256, html=False)
    (result,) = report["results"]["explaining_away"].values()
    assert result["random"]["attack_success"] > 0.5 and result["runner_up"]["attack_success"] > 0.5
    assert result["random"]["detection_auroc"] > result["runner_up"]["detection_auroc"]


def test_transferability_and_the_wandb_report(checkpoints, tmp_path):
    paths = [str(checkpoints["baseline"]), str(checkpoints["ssr"])]
    section = Transferability(epsilon=0.1, steps=5, num_samples=64)
    report = run_audit(paths, [section], out=str(tmp_path), num_samples=64, wandb=True)
    acc = report["results"]["transferability"]["accuracy"]
    assert acc[0][0] < acc[0][1] or acc[1][1] < acc[1][0]  # adversaries hurt their own model more (white box)
    assert acc[2][0] > acc[0][0]  # Gaussian noise of the same norm hurts less than the adversaries
    (run_file,) = find_offline_runs(tmp_path / "wandb")
    run = read_offline_run(run_file)
    assert run.media("audit/numbers")[0]["_type"] == "table-file"
    assert any(key.startswith("audit/figures/") for row in run.history for key in row)


# -- loading safely ------------------------------------------------------------------------------------------------
def test_a_checkpoint_carrying_code_is_refused_and_the_code_never_runs(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "robustattr_config": {"model": {}}, "extra": Payload()}, evil)
    with pytest.raises(UnsafeCheckpointError, match="refused"):
        load_model(evil)
    assert not marker.exists()
    command = [sys.executable, str(ROOT / "evaluate.py"), "--checkpoint", str(evil)]
    command += ["--config", str(ROOT / "configs" / "audit.yaml"), "--out", str(tmp_path / "out")]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "evil.ckpt" in errors[0] and "refused" in errors[0]
    assert not marker.exists()


def test_corrupted_truncated_and_unknown_files_end_in_one_error_naming_them(checkpoints, tmp_path):
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(checkpoints["baseline"].read_bytes()[:5000])
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(os.urandom(4096))
    unknown = tmp_path / "weights.npz"
    unknown.write_bytes(b"not a checkpoint")
    for path, message in ((truncated, "corrupted or truncated"), (garbage, "not a readable"), (unknown, "unknown")):
        with pytest.raises(RobustAttrError, match=message) as info:
            load_model(path)
        assert path.name in str(info.value)
    untrusted = tmp_path / "untrusted.ckpt"
    torch.save({"state_dict": {}, "robustattr_config": {"model": {"net": {"class_path": "os.system"}}}}, untrusted)
    with pytest.raises(UnsafeCheckpointError, match="outside the trusted packages"):
        load_model(untrusted)


def test_state_dicts_and_safetensors_load_with_the_architecture_named_in_the_config(checkpoints, tmp_path):
    reference = load_model(checkpoints["baseline"]).model
    state = reference.state_dict()
    plain = tmp_path / "plain.pth"
    torch.save({f"module.{k}": v for k, v in state.items()}, plain)
    safe = tmp_path / "weights.safetensors"
    save_file({f"model.{k}": v.contiguous() for k, v in state.items()}, str(safe))
    net = {"class_path": "robustattr.models.SmallCNN"}
    x = torch.rand(4, 1, 8, 8)
    for path in (plain, safe):
        loaded = load_model(path, net=net).model
        torch.testing.assert_close(loaded(x), reference(x))
        with pytest.raises(RobustAttrError, match="name the architecture"):
            load_model(path)
    assert isinstance(load_model(plain, net=net).model, SmallCNN)
