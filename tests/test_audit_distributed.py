"""evaluate.py as users launch it over several processes: ``torchrun --nproc_per_node 2`` on gloo (CPU).

Every section's samples are dealt to the two processes and each sample is seeded by its index, so the report's
results equal those of one process, and of one process at another batch size, number for number; rank 0 alone
shows the progress, writes the cache and the reports. A killed process ends the job with one error line, and
what finished stays cached for the next run."""

import copy
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests import test_audit
from tests.test_audit import TINY_AUDIT, timings_aside

ROOT = Path(__file__).resolve().parents[1]
checkpoints = test_audit.checkpoints  # the two quickstart checkpoints the audit tests train (a module fixture)

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]


def _config(tmp_path: Path) -> Path:
    """The tiny every-section audit with noise-based methods (per-sample noise) and the influence section (the
    influence engine's own sharding of the training set)."""
    config = copy.deepcopy(TINY_AUDIT)
    by_name = {s["class_path"].rsplit(".", 1)[1]: s["init_args"] for s in config["sections"]}
    smoothgrad = {"class_path": "robustattr.attributions.SmoothGrad", "init_args": {"samples": 4}}
    by_name["ExplanationFragility"]["methods"].append(smoothgrad)
    by_name["WorstCaseFragility"]["methods"].append(smoothgrad)
    by_name["WorstCaseFragility"]["budgets"]["smoothgrad"] = {"steps": 2}
    config["sections"].append(
        {"class_path": "robustattr.audit.InfluenceAudit", "init_args": {"queries": 4, "epsilons": [0.0313725]}}
    )
    path = tmp_path / "audit.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _args(checkpoints, config: Path, out: Path, *extra: str) -> list[str]:
    return [str(ROOT / "evaluate.py"), "--checkpoint", f"a={checkpoints['baseline']}", f"b={checkpoints['ssr']}",
            "--config", str(config), "--out", str(out), *extra]  # fmt: skip


def _env() -> dict[str, str]:
    env = dict(os.environ)
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_NTASKS", "SLURM_PROCID"):
        env.pop(name, None)
    return env


def _torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]


def _run(command: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=_env(), timeout=900)


def _differences(a, b, where="results"):
    """Paths where two results differ beyond float tolerance (rel 1e-5)."""
    if isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            return [(where, sorted(set(a) ^ set(b)))]
        return [d for k in a for d in _differences(a[k], b[k], f"{where}.{k}")]
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [(where, len(a), len(b))]
        return [d for i, (u, v) in enumerate(zip(a, b, strict=True)) for d in _differences(u, v, f"{where}[{i}]")]
    if isinstance(a, float) and isinstance(b, float):
        return [] if math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-9) else [(where, a, b)]
    return [] if a == b else [(where, a, b)]


def test_two_processes_give_the_numbers_of_one(checkpoints, tmp_path):
    config = _config(tmp_path)
    one = _run([sys.executable, *_args(checkpoints, config, tmp_path / "one")])
    assert one.returncode == 0, one.stderr[-3000:]
    two = _run(_torchrun(*_args(checkpoints, config, tmp_path / "two")))
    assert two.returncode == 0, two.stderr[-3000:]
    single = json.loads((tmp_path / "one" / "report.json").read_text())
    sharded = json.loads((tmp_path / "two" / "report.json").read_text())
    assert set(single["results"]) == {
        "robustness", "fragility", "attribution_transfer", "smoothing", "curvature", "explaining_away",
        "transferability", "semantic_directions", "worst_case_fragility", "certified_attributions", "influence",
    }  # fmt: skip
    differences = _differences(timings_aside(single["results"]), timings_aside(sharded["results"]))
    assert not differences, differences[:20]
    assert not _differences(single["comparisons"], sharded["comparisons"], "comparisons")
    assert sharded["processes"] == {"world_size": 2, "launcher": "torchrun"} and single["processes"]["world_size"] == 1
    ran_on = {label: t["ran_on"] for label, t in sharded["timings"].items()}
    assert ran_on["fragility [a]"] == "2 processes, samples dealt to them"
    assert ran_on["influence [a]"] == "2 processes, the section's engine sharding its work"
    # Rank 0 alone speaks and writes: one report line, each part's last progress line once, one set of files.
    assert two.stdout.count("report ") == 1
    assert sum(line.startswith("fragility [a]:") and "done" in line for line in two.stdout.splitlines()) == 1
    entries = sorted(p.name.split("-")[0] for p in (tmp_path / "two" / "cache").iterdir())
    assert len(entries) == 21 and (tmp_path / "two" / "report.html").is_file()
    # Seeded by sample index, not by chunk: one process at another batch size gives the same numbers.
    other = _run([sys.executable, *_args(checkpoints, config, tmp_path / "b7", "--batch_size", "7")])
    assert other.returncode == 0, other.stderr[-3000:]
    rebatched = json.loads((tmp_path / "b7" / "report.json").read_text())
    differences = _differences(timings_aside(single["results"]), timings_aside(rebatched["results"]))
    assert not differences, differences[:20]
    # The two-process cache serves one process: the cache key does not hold the number of processes.
    again = _run([sys.executable, *_args(checkpoints, config, tmp_path / "two")])
    assert again.returncode == 0, again.stderr[-3000:]
    cached = json.loads((tmp_path / "two" / "report.json").read_text())
    assert all(t["cached"] for t in cached["timings"].values())


def _children(pid: int) -> list[int]:
    found = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return [int(p) for p in found]


def _rank_of(pid: int) -> int | None:
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    for item in environ:
        if item.startswith(b"RANK="):
            return int(item[5:])
    return None


@pytest.mark.parametrize("killed", [1, 0])
def test_a_killed_process_ends_the_job_with_one_error_line_and_the_cache_stays_usable(checkpoints, tmp_path, killed):
    config = tmp_path / "audit.yaml"  # three sections, six (section, checkpoint) jobs
    config.write_text(yaml.safe_dump({**TINY_AUDIT, "sections": TINY_AUDIT["sections"][:3]}))
    out = tmp_path / "killed"
    proc = subprocess.Popen(_torchrun(*_args(checkpoints, config, out)), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT, env=_env())  # fmt: skip
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and len(list((out / "cache").glob("*.json"))) < 3:
        time.sleep(0.2)  # until three (section, checkpoint) results are cached
    workers = {_rank_of(p): p for p in _children(proc.pid)}
    assert killed in workers, workers
    os.kill(workers[killed], signal.SIGKILL)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode != 0
    ours = [line for line in (stdout + stderr).splitlines() if line.startswith("error")]
    assert len(ours) == 1, ours
    assert "the sections that finished are cached" in ours[0], ours[0]
    assert "Traceback" not in stdout
    entries = list((out / "cache").glob("*.json"))
    assert len(entries) >= 3 and all(json.loads(p.read_text())["result"] for p in entries)  # whole, readable entries
    assert not list((out / "cache").glob(".*.tmp")) and not (out / "report.json").exists()
    rerun = _run([sys.executable, *_args(checkpoints, config, out)])
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    timings = json.loads((out / "report.json").read_text())["timings"]
    assert sum(t["cached"] for t in timings.values()) >= 3 and not all(t["cached"] for t in timings.values())


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _slurm_env(rank: int, port: int) -> dict[str, str]:
    env = _env()
    env.update({"SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "2", "SLURM_PROCID": str(rank),
                "SLURM_LOCALID": str(rank), "SLURM_NODEID": "0",
                "SLURM_NODELIST": "localhost", "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "audit",
                "MASTER_PORT": str(port)})  # fmt: skip
    return env


def test_under_srun_the_tasks_run_one_audit(checkpoints, tmp_path):
    """The environment srun gives its tasks (SLURM_NTASKS, SLURM_PROCID, the node list), as Lightning reads it."""
    config = tmp_path / "audit.yaml"
    config.write_text(yaml.safe_dump({**TINY_AUDIT, "sections": TINY_AUDIT["sections"][:2]}))
    port = _free_port()
    tasks = [subprocess.Popen([sys.executable, *_args(checkpoints, config, tmp_path / "srun")], cwd=ROOT,
                              env=_slurm_env(rank, port), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for rank in range(2)]  # fmt: skip
    outputs = [task.communicate(timeout=600) for task in tasks]
    assert all(task.returncode == 0 for task in tasks), [err[-2000:] for _, err in outputs]
    assert outputs[0][0].count("report ") == 1 and "report " not in outputs[1][0]  # rank 0 alone speaks
    one = _run([sys.executable, *_args(checkpoints, config, tmp_path / "one")])
    assert one.returncode == 0, one.stderr[-3000:]
    sharded = json.loads((tmp_path / "srun" / "report.json").read_text())
    single = json.loads((tmp_path / "one" / "report.json").read_text())
    assert sharded["processes"] == {"world_size": 2, "launcher": "slurm"}
    differences = _differences(timings_aside(single["results"]), timings_aside(sharded["results"]))
    assert not differences, differences[:20]


def test_srun_tasks_without_tasks_per_node_stop_with_one_error_line(checkpoints, tmp_path):
    env = _slurm_env(0, _free_port())
    del env["SLURM_NTASKS_PER_NODE"]
    proc = subprocess.run([sys.executable, *_args(checkpoints, _config(tmp_path), tmp_path / "x")], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert [line for line in proc.stderr.splitlines() if line.startswith("error")] == [
        line for line in proc.stderr.splitlines() if "SLURM" in line and line.startswith("error")
    ] and "ntasks-per-node" in proc.stderr
