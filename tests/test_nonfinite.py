"""Non-finite training: found at the first bad step, named, never saved, decided by all processes together."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback

from robustattr.data import DigitsDataModule
from robustattr.errors import NonFiniteError
from robustattr.models import SmallCNN
from robustattr.module import RobustClassifier
from robustattr.regularizers import SSR
from tests.helpers.terms import NanAtSteps

ROOT = Path(__file__).resolve().parents[1]
CHECKPOINTING = json.dumps([{"class_path": "pytorch_lightning.callbacks.ModelCheckpoint"}])


class Weights(Callback):
    """The classifier's weights after every training batch."""

    def __init__(self):
        self.after = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.after.append(pl_module.net.classifier.weight.detach().clone())


def _fit(module, tmp_path, callbacks=(), batches=6):
    trainer = pl.Trainer(
        max_epochs=1, limit_train_batches=batches, limit_val_batches=2, logger=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path, callbacks=list(callbacks),
    )  # fmt: skip
    trainer.fit(module, datamodule=DigitsDataModule())
    return trainer


def _train_py(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *args], capture_output=True, text=True, cwd=ROOT, timeout=300
    )


@pytest.mark.slow
def test_a_diverging_run_without_terms_stops_in_one_line_and_saves_no_checkpoint(tmp_path):
    proc = _train_py(
        "--config", "configs/quickstart.yaml", "--model.optimizer.init_args.lr", "1e30", "--trainer.logger", "false",
        "--trainer.default_root_dir", str(tmp_path), "--trainer.callbacks", CHECKPOINTING,
    )  # fmt: skip
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and "non-finite training loss at step 1 " in errors[0], proc.stderr[-2000:]
    assert "cross-entropy is not finite" in errors[0]
    assert not list(tmp_path.glob("**/*.ckpt")) and "test accuracy" not in proc.stdout


def test_raise_names_the_term_and_the_first_bad_step(tmp_path):
    pl.seed_everything(0)
    module = RobustClassifier(SmallCNN(width=4), terms=[NanAtSteps(steps=[3])], nonfinite_check_every=50)
    with pytest.raises(NonFiniteError, match=r"at step 3 \(epoch 0\): the penalty nan_at_steps is not finite"):
        _fit(module, tmp_path)
    assert not list(tmp_path.glob("**/*.ckpt"))


def test_skip_skips_exactly_the_bad_steps(tmp_path):
    pl.seed_everything(0)
    module = RobustClassifier(SmallCNN(width=4), terms=[NanAtSteps(steps=[2, 3])], nonfinite="skip")
    weights = Weights()
    with pytest.warns(UserWarning, match="update skipped"):
        trainer = _fit(module, tmp_path, [weights])
    moved = [not torch.equal(a, b) for a, b in zip(weights.after, weights.after[1:], strict=False)]
    assert moved == [True, False, False, True, True]  # batches 2 and 3 left the weights as they were
    assert trainer.global_step == 6 and all(torch.isfinite(p).all() for p in module.parameters())


def test_skip_gives_up_after_max_consecutive_skips(tmp_path):
    pl.seed_everything(0)
    module = RobustClassifier(
        SmallCNN(width=4), terms=[NanAtSteps(steps=list(range(1, 50)))], nonfinite="skip", max_consecutive_skips=3
    )
    with pytest.warns(UserWarning, match="update skipped"), pytest.raises(NonFiniteError, match="4 consecutive"):
        _fit(module, tmp_path, batches=20)


def test_ssr_on_a_diverged_batch_gives_a_nan_penalty_instead_of_failing_in_eigh():
    net = SmallCNN(width=4, activation=torch.nn.Softplus).eval()
    x = torch.rand(3, 1, 8, 8)
    x[1, 0, 2, 2] = float("nan")
    value = SSR()(net, x, torch.tensor([0, 1, 2]))
    assert torch.isnan(value)


def test_a_checkpoint_with_non_finite_weights_is_never_written():
    module = RobustClassifier(SmallCNN(width=4))
    state = {k: v.clone() for k, v in module.state_dict().items()}
    state["net.classifier.bias"][0] = float("inf")
    with pytest.raises(NonFiniteError, match=r"net\.classifier\.bias"):
        module.on_save_checkpoint({"state_dict": state})


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize("policy", ["raise", "skip"])
def test_under_ddp_the_decision_is_collective(tmp_path, policy):
    """A NaN on rank 1 only: both processes stop together (raise) or skip together (skip); none waits for a
    timeout. Launched as users launch it: train.py with two CPU processes."""
    term = {"class_path": "tests.helpers.terms.NanAtSteps", "init_args": {"steps": [2], "ranks": [1]}}
    proc = _train_py(
        "--config", "configs/quickstart.yaml", "--trainer.strategy", "ddp", "--trainer.devices", "2",
        "--trainer.accelerator", "cpu", "--trainer.max_epochs", "1", "--trainer.logger", "false",
        "--trainer.default_root_dir", str(tmp_path), "--trainer.callbacks", CHECKPOINTING,
        "--model.terms", json.dumps([term]), "--model.nonfinite", policy,
    )  # fmt: skip
    if policy == "raise":
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error")]
        assert len(errors) == 1 and "at step 2" in errors[0] and "nan_at_steps" in errors[0]
    else:
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "update skipped" in proc.stderr and "test accuracy" in proc.stdout
