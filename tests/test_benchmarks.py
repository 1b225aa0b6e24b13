"""The benchmark scripts run (tiny sizes, on the CPU) and write the JSON their README sections quote."""

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


@pytest.mark.slow
def test_gpu_throughput_runs_on_the_cpu_at_tiny_sizes(tmp_path):
    import gpu_throughput

    out = tmp_path / "gpu_throughput.json"
    report = gpu_throughput.main(["--sizes", "tiny", "--min-time", "0", "--device", "cpu", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["plain_images_per_second"] == report["plain_images_per_second"]
    assert set(saved["plain_images_per_second"]) == {"resnet18_32", "resnet50_224"}
    workloads = {row["workload"] for row in saved["rows"]}
    assert {"plain", "gradient_norm", "ssr", "pgd_at", "fragility_validation", "curvature_monitor"} <= workloads
    settings = {(r["model"], r["precision"], r["channels_last"]) for r in saved["rows"]}
    assert len(settings) == 2 * 2 * 2 and len(saved["rows"]) == 8 * len(workloads)
    assert all(row["images_per_second"] > 0 for row in saved["rows"])


@pytest.mark.slow
def test_influence_fragility_by_training_runs_at_tiny_sizes(tmp_path):
    import influence_fragility_by_training as bench

    out = tmp_path / "by_training.json"
    report = bench.main(["--epochs", "1", "--queries", "4", "--work", str(tmp_path / "runs"), "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["most_stable"] == report["most_stable"] in {"plain", "ssr", "pgd_at"}
    for key in ("top5_overlap", "spearman"):
        assert set(saved[key]) == {"plain", "ssr", "pgd_at"}
        assert all(len(v["targeted"]) == len(v["random_sign"]) == 3 for v in saved[key].values())


@pytest.mark.slow
def test_worst_case_attack_benchmark_runs_at_tiny_sizes(tmp_path):
    import worst_case_attack as bench

    out = tmp_path / "worst_case.json"
    argv = ["--epochs", "1", "--num-samples", "8", "--steps", "2", "--restarts", "1", "--betas", "30"]
    report = bench.main([*argv, "--work", str(tmp_path / "runs"), "--out", str(out)])
    saved = json.loads(out.read_text())
    for key in ("default_topk", "worst_case_topk", "member_topk", "dominance", "cost_over_default"):
        assert set(saved[key]) == {"quickstart", "quickstart_reg"} and saved[key] == report[key]
    assert all(d == 1.0 for d in saved["dominance"].values())
    assert all(set(m) == {"random_sign", "topk", "mass_center", "targeted"} for m in saved["member_topk"].values())
    assert all(c > 0 for c in saved["cost_over_default"].values())


@pytest.mark.slow
def test_certify_cost_benchmark_runs_at_tiny_sizes(tmp_path):
    import certify_cost as bench

    out = tmp_path / "certify_cost.json"
    argv = ["--n", "32", "--resnet-n", "4", "--images", "2", "--resnet-images", "1", "--repeats", "1"]
    report = bench.main([*argv, "--device", "cpu", "--out", str(out)])
    saved = json.loads(out.read_text())
    for key in ("certify_over_smoothgrad", "certify_seconds_per_image", "smoothgrad_seconds_per_image"):
        assert set(saved[key]) == {"quickstart_cnn", "resnet18_32px"} and saved[key] == report[key]
        assert all(v > 0 for v in saved[key].values())
    assert saved["draws"] == {"quickstart_cnn": 32, "resnet18_32px": 4}


@pytest.mark.slow
@pytest.mark.multiprocess
def test_audit_throughput_benchmark_runs_one_and_two_processes(tmp_path):
    import audit_throughput as bench
    import yaml

    config = tmp_path / "audit.yaml"
    config.write_text(yaml.safe_dump({"num_samples": 16, "batch_size": 8, "sections": [
        {"class_path": "robustattr.audit.RobustnessCurves",
         "init_args": {"epsilons": [0.0313725], "steps": 2, "lbfgs_samples": 4, "lbfgs_search_steps": 1,
                       "lbfgs_max_iter": 3}},
        {"class_path": "robustattr.audit.Curvature", "init_args": {"power_iters": 2}},
    ]}))  # fmt: skip
    out = tmp_path / "audit_throughput.json"
    argv = ["--epochs", "1", "--config", str(config), "--processes", "1", "2", "--work", str(tmp_path / "w")]
    report = bench.main([*argv, "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["equal_results"] == {"1": True, "2": True} == report["equal_results"]
    assert set(saved["images_per_second"]) == {"robustness", "curvature"}
    assert all(set(v) == {"1", "2"} and all(r > 0 for r in v.values()) for v in saved["images_per_second"].values())
    assert saved["speedup"]["1"] == 1.0 and saved["speedup"]["2"] > 0 and set(saved["total_seconds"]) == {"1", "2"}
