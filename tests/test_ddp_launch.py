"""train.py as users launch it: two CPU processes on gloo, with every callback, every objective term and W&B.

The callbacks' DDP test inside pytest (test_callbacks_ddp.py) validated with ddp_spawn and no progress bar and
passed, while the launched quickstart died at its first fragility validation: after Lightning's DDP strategy
routes a step through the DDP wrapper, it leaves ``module.forward`` as an attribute bound to the original
module, which a shallow copy (the softplus surrogate) kept calling, so the surrogate ran the ReLU network. Here
train.py itself is launched, and what its processes logged is compared with one process validating the same
checkpoint."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from robustattr.attacks import softplus_surrogate
from robustattr.checkpoint import load_classifier
from robustattr.cli import RobustCLI
from robustattr.wandb_offline import find_offline_runs, read_offline_run

ROOT = Path(__file__).resolve().parents[1]
CALLBACK_METRICS = ("val/adv/", "val/frag/", "val/curv/")


def _launch(config: str, strategy: str, tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "--config", str(ROOT / "configs" / config),
         "--trainer.strategy", strategy, "--trainer.devices", "2", "--trainer.accelerator", "cpu",
         "--trainer.logger.init_args.save_dir", str(tmp_path), *extra],
        capture_output=True, text=True, cwd=ROOT, timeout=900,
    )  # fmt: skip


def _single_process_validate(config: str, checkpoint: Path, tmp_path: Path) -> dict[str, float]:
    """The same callbacks (built from the same config) on one process, validating the checkpoint's weights."""
    cli = RobustCLI(
        args=["--config", str(ROOT / "configs" / config), "--trainer.devices", "1", "--trainer.strategy", "auto",
              "--trainer.accelerator", "cpu", "--trainer.logger", "false", "--trainer.default_root_dir", str(tmp_path),
              "--trainer.enable_progress_bar", "false",
              "--trainer.callbacks", json.dumps(_callbacks_of(config))]
    )  # fmt: skip
    (results,) = cli.trainer.validate(load_classifier(checkpoint), datamodule=cli.datamodule, verbose=False)
    return results


def _callbacks_of(config: str) -> list[dict]:
    import yaml

    callbacks = yaml.safe_load((ROOT / "configs" / config).read_text())["trainer"]["callbacks"]
    return [c for c in callbacks if c["class_path"].startswith("robustattr.callbacks")]


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize(
    "config, strategy", [("quickstart.yaml", "ddp"), ("quickstart_reg.yaml", "ddp"), ("quickstart.yaml", "ddp_spawn")]
)
def test_launched_ddp_logs_what_one_process_measures(tmp_path, config, strategy):
    proc = _launch(config, strategy, tmp_path, "--trainer.max_epochs", "10")  # the callbacks run every 10 epochs
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = [line for line in proc.stdout.splitlines() if line.startswith(("test accuracy", "checkpoint", "run dir"))]
    assert len(summary) == 3, proc.stdout[-3000:]  # one summary, from rank 0
    run_dirs = [p for p in (tmp_path / "robustattr").iterdir() if p.is_dir()]
    assert len(run_dirs) == 1 and (run_dirs[0] / "config.yaml").is_file()
    (run_file,) = find_offline_runs(tmp_path)  # one W&B run
    run = read_offline_run(run_file)
    logged = {k: run.values(k)[-1] for k in {k for row in run.history for k in row} if k.startswith(CALLBACK_METRICS)}
    assert len(logged) >= 10, sorted(logged)

    single = _single_process_validate(config, run_dirs[0] / "checkpoints" / "last.ckpt", tmp_path / "single")
    different = {k: (v, single[k]) for k, v in logged.items() if single[k] != pytest.approx(v, rel=1e-4, abs=1e-5)}
    assert not different, different


@pytest.mark.slow
@pytest.mark.multiprocess
def test_every_objective_term_trains_under_launched_ddp(tmp_path):
    terms = [
        {"class_path": "robustattr.regularizers.GradientNorm", "init_args": {"weight": 0.1}},
        {"class_path": "robustattr.regularizers.CURE", "init_args": {"weight": 0.1, "h": 0.1}},
        {"class_path": "robustattr.regularizers.SSR", "init_args": {"weight": 0.1}},
        {"class_path": "robustattr.regularizers.SSR", "init_args": {"weight": 0.1, "method": "power", "power_iters": 2,
                                                                    "name": "ssr_power"}},
        {"class_path": "robustattr.regularizers.HessianNorm", "init_args": {"weight": 0.01}},
        {"class_path": "robustattr.regularizers.IGNorm", "init_args": {"weight": 0.1, "attack_steps": 1, "ig_steps": 2,
                                                                       "attack_ig_steps": 1}},
        {"class_path": "robustattr.regularizers.AdversarialCE", "init_args": {"attack": {
            "class_path": "robustattr.attacks.PGD", "init_args": {"steps": 2}}}},
        {"class_path": "robustattr.regularizers.TRADES", "init_args": {"steps": 2}},
    ]  # fmt: skip
    proc = _launch(
        "quickstart_reg.yaml", "ddp", tmp_path, "--model.terms", json.dumps(terms), "--trainer.max_epochs", "1",
        "--trainer.limit_train_batches", "3", "--trainer.limit_val_batches", "2", "--trainer.log_every_n_steps", "1",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    (run_file,) = find_offline_runs(tmp_path)
    run = read_offline_run(run_file)
    for name in ("gradient_norm", "cure", "ssr", "ssr_power", "hessian_norm", "ig_norm", "pgd_at", "trades"):
        assert run.values(f"train/reg/{name}"), name


def test_a_surrogate_runs_its_own_twins_even_with_a_forward_left_on_the_instance():
    """What Lightning's DDP forward redirection leaves behind: ``module.forward`` bound to the module itself."""
    import torch

    from robustattr.models import SmallCNN

    net = SmallCNN(width=4).eval()
    net.forward = net.forward  # an instance attribute, bound to net
    surrogate = softplus_surrogate(net, beta=1.0)
    x = torch.rand(2, 1, 8, 8)
    with torch.no_grad():
        assert not torch.allclose(surrogate(x), net(x))  # the twins run, not the ReLU network
        assert torch.allclose(softplus_surrogate(net, beta=1e4)(x), net(x), atol=1e-3)
