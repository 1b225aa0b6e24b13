"""Killed and preempted runs resume where they stopped: same weights as an uninterrupted run, same run directory,
same W&B run."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from robustattr.wandb_offline import find_offline_runs, read_offline_run

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow
EPOCHS = "6"


def _train(save_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "--config", str(ROOT / "configs" / "quickstart.yaml"),
         "--trainer.logger.init_args.save_dir", str(save_dir), "--trainer.max_epochs", EPOCHS, *extra],
        capture_output=True, text=True, cwd=ROOT, timeout=600,
    )  # fmt: skip


def _with(callback: str, **init_args) -> str:
    return "--trainer.callbacks+=" + json.dumps(
        {"class_path": f"tests.helpers.callbacks.{callback}", "init_args": init_args}
    )


def _run_dir(save_dir: Path) -> Path:
    (folder,) = (save_dir / "robustattr").iterdir()
    return folder


def test_a_killed_run_resumes_to_the_weights_of_an_uninterrupted_one(tmp_path):
    full = _train(tmp_path / "full")
    assert full.returncode == 0, full.stderr[-3000:]
    killed = _train(tmp_path / "killed", _with("KillAtEpochStart", epoch=3))
    assert killed.returncode == -9  # SIGKILL after epoch 2's checkpoints were written
    run_dir = _run_dir(tmp_path / "killed")
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["epoch"] == 2

    resumed = _train(tmp_path / "killed", "--ckpt_path", "last", "--run_dir", str(run_dir))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert _run_dir(tmp_path / "killed") == run_dir and "test accuracy" in resumed.stdout
    a = torch.load(_run_dir(tmp_path / "full") / "checkpoints" / "last.ckpt", weights_only=True)
    b = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert a["global_step"] == b["global_step"] == 6 * 20
    for name, value in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][name], value, rtol=0, atol=0, msg=name)  # exactly equal
    for key in ("optimizer_states", "lr_schedulers"):
        assert str(a[key]) == str(b[key])

    # The same W&B run, continued (`wandb sync` merges its files). What W&B still held in memory when the process
    # was SIGKILLed is lost (a SIGTERM, below, closes the run properly); the resumed part logs epochs 3 to 5.
    runs = find_offline_runs(tmp_path / "killed")
    assert len(runs) == 2 and len({p.parent.name.rsplit("-", 1)[1] for p in runs}) == 1
    epochs = sorted({row["epoch"] for row in read_offline_run(runs[-1]).history if "val/acc" in row})
    assert epochs == [3, 4, 5]


def test_sigterm_saves_last_ckpt_and_exits_non_zero_then_the_run_resumes(tmp_path):
    stopped = _train(tmp_path, _with("SignalAtStep", step=25, signal="SIGTERM"))
    assert stopped.returncode == 143 and "Traceback" not in stopped.stderr, stopped.stderr[-3000:]
    (line,) = [line for line in stopped.stderr.splitlines() if line.startswith("error")]
    run_dir = _run_dir(tmp_path)
    assert "stopped by SIGTERM" in line and f"--ckpt_path {run_dir}" in line and "test accuracy" not in stopped.stdout
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 26

    other = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "--config", str(ROOT / "configs" / "quickstart_reg.yaml"),
         "--trainer.logger.init_args.save_dir", str(tmp_path), "--ckpt_path", str(run_dir)],
        capture_output=True, text=True, cwd=ROOT, timeout=600,
    )  # fmt: skip
    assert other.returncode == 1 and "resuming with other settings than the run's" in other.stderr

    resumed = _train(tmp_path, "--ckpt_path", str(run_dir))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["epoch"] == int(EPOCHS) - 1
    first, second = find_offline_runs(tmp_path)  # a SIGTERM closes the W&B run: its history is complete
    assert [row["epoch"] for row in read_offline_run(first).history if "val/acc" in row] == [0]
    assert read_offline_run(second).values("val/acc")


def test_resume_options_are_checked(tmp_path, capsys):
    from robustattr.cli import main

    for args, message in (
        (["--ckpt_path", "last"], "needs the run directory"),
        (["--run_dir", str(tmp_path)], "use it with --ckpt_path last"),
        (["--ckpt_path", str(tmp_path)], "no checkpoint to resume from"),
    ):
        with pytest.raises(SystemExit):
            main(["--config", str(ROOT / "configs" / "quickstart.yaml"), "--trainer.logger", "false", *args])
        assert message in capsys.readouterr().err
