"""Every bad input ends in one ``error:`` line naming the problem, and a full disk never leaves a broken file."""

import json
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from robustattr.attacks import PGD, TopKAttack
from robustattr.audit import InfluenceAudit
from robustattr.audit import main as evaluate
from robustattr.cli import main as train
from robustattr.errors import ConfigError
from robustattr.regularizers import HessianNorm, IGNorm

ROOT = Path(__file__).resolve().parents[1]
QUICK = ["--config", str(ROOT / "configs" / "quickstart.yaml"), "--trainer.logger", "false"]


def _errors(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("error")]


def _one_line(capsys, run, *args) -> str:
    with pytest.raises(SystemExit) as info:
        run(list(args))
    captured = capsys.readouterr()
    assert info.value.code == 1, captured.err[-2000:]
    assert "Traceback" not in captured.err
    errors = _errors(captured.err)
    assert len(errors) == 1, captured.err[-2000:]
    return errors[0]


def _callback(class_path: str, **init_args) -> str:
    return json.dumps([{"class_path": class_path, "init_args": init_args}])


BIM_STEPS_0 = {"class_path": "robustattr.attacks.BIM", "init_args": {"steps": 0}}
BAD_VALUES = {
    "negative epsilon": (_callback("robustattr.callbacks.AdversarialValidation", epsilons=[-0.1]), "non-negative"),
    "epsilon above 1": (_callback("robustattr.callbacks.FragilityValidation", epsilons=[1.5]), "exceeds"),
    "num_samples 0": (_callback("robustattr.callbacks.CurvatureMonitor", num_samples=0), "must be positive"),
    "every_n_epochs 0": (_callback("robustattr.callbacks.AdversarialValidation", every_n_epochs=0), "positive"),
    "steps 0": (_callback("robustattr.callbacks.AdversarialValidation", attacks=[BIM_STEPS_0]), "at least 1"),
}


@pytest.mark.parametrize("case", list(BAD_VALUES))
def test_bad_callback_settings_end_in_one_line(capsys, tmp_path, case):
    callbacks, expected = BAD_VALUES[case]
    line = _one_line(
        capsys, train, *QUICK, "--trainer.default_root_dir", str(tmp_path), "--trainer.callbacks", callbacks
    )
    assert expected in line, line


def test_contradicting_lightning_settings_end_in_one_line(capsys, tmp_path):
    line = _one_line(capsys, train, "--config", str(ROOT / "configs" / "quickstart.yaml"), "--trainer.logger", "false",
                     "--trainer.default_root_dir", str(tmp_path), "--trainer.enable_progress_bar", "false")  # fmt: skip
    assert "enable_progress_bar=False" in line and "RichProgressBar" in line


def test_an_unwritable_run_directory_ends_in_one_line(capsys, tmp_path):
    blocked = tmp_path / "file"
    blocked.write_text("a file where a folder should go")
    line = _one_line(capsys, train, *QUICK, "--trainer.default_root_dir", str(blocked / "runs"))
    assert "cannot write" in line and str(blocked / "runs") in line


def test_evaluate_with_no_samples_ends_in_one_line(capsys, tmp_path):
    torch.save({"state_dict": {}}, tmp_path / "x.pt")
    line = _one_line(capsys, evaluate, "--checkpoint", str(tmp_path / "x.pt"), "--config",
                     str(ROOT / "configs" / "audit.yaml"), "--num_samples", "0", "--out", str(tmp_path))  # fmt: skip
    assert "num_samples" in line


def _image_tree(root: Path, size=12) -> None:
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for name in ("a", "b"):
            (root / split / name).mkdir(parents=True)
            for i in range(4):
                Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(
                    root / split / name / f"{i}.png"
                )


def _imagefolder_args(root: Path, tmp_path: Path, workers: int) -> list[str]:
    data = {
        "class_path": "robustattr.data.ImageFolderDataModule",
        "init_args": {"root": str(root), "image_size": 8, "resize_size": 8, "batch_size": 4, "num_workers": workers},
    }
    return [*QUICK, "--trainer.default_root_dir", str(tmp_path), "--trainer.callbacks", "[]",
            "--trainer.max_epochs", "1", "--data", json.dumps(data), "--model.net.init_args.in_channels", "3",
            "--model.net.init_args.num_classes", "2", "--model.net.init_args.mean", "[0.5, 0.5, 0.5]",
            "--model.net.init_args.std", "[0.29, 0.29, 0.29]"]  # fmt: skip


def test_an_empty_class_folder_is_named(capsys, tmp_path):
    _image_tree(tmp_path / "images")
    (tmp_path / "images" / "train" / "empty").mkdir()
    line = _one_line(capsys, train, *_imagefolder_args(tmp_path / "images", tmp_path, 0))
    assert "['empty']" in line and "train" in line


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 2])
def test_a_corrupt_image_is_named_in_one_line(tmp_path, workers):
    """With workers the error crosses a process boundary (the DataLoader re-raises it with a traceback in its
    text): still one line, naming the file. Launched as a user would."""
    _image_tree(tmp_path / "images")
    bad = tmp_path / "images" / "train" / "b" / "2.png"
    bad.write_bytes(bad.read_bytes()[:40])
    args = _imagefolder_args(tmp_path / "images", tmp_path, workers)
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), *args], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    (line,) = _errors(proc.stderr)
    assert str(bad) in line and "cannot read this image" in line


@pytest.mark.slow
def test_a_binary_config_file_ends_in_one_line(tmp_path):
    binary = tmp_path / "model.yaml"
    binary.write_bytes(bytes(range(256)) * 4)
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "--config", str(binary)],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    (line,) = _errors(proc.stderr)
    assert str(binary) in line and "not a YAML text file" in line


@pytest.mark.slow
def test_wandb_online_without_credentials_ends_in_one_line(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(HOME=str(tmp_path), WANDB_CONFIG_DIR=str(tmp_path / ".config"), NETRC=str(tmp_path / "netrc"))
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "--config", str(ROOT / "configs" / "quickstart.yaml"),
         "--trainer.logger.init_args.offline", "false", "--trainer.logger.init_args.save_dir", str(tmp_path)],
        capture_output=True, text=True, timeout=300, env=env, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    (line,) = _errors(proc.stderr)
    assert "W&B" in line and "wandb login" in line and "offline true" in line


def _limit_file_size():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead of killing
    resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))  # below a quickstart checkpoint (~800 kB)


@pytest.mark.slow
def test_a_full_disk_while_saving_a_checkpoint_leaves_no_broken_file(tmp_path):
    """The file-size limit makes every write past 200 kB fail, as a full disk does."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *QUICK, "--trainer.default_root_dir", str(tmp_path),
         "--trainer.callbacks", json.dumps([{"class_path": "pytorch_lightning.callbacks.ModelCheckpoint"}]),
         "--trainer.max_epochs", "1"],
        capture_output=True, text=True, timeout=300, preexec_fn=_limit_file_size,
        env={**os.environ, "TMPDIR": str(tmp_path)},
    )  # fmt: skip
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    (line,) = _errors(proc.stderr)
    assert "cannot write it" in line and ".ckpt" in line
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert not [p for p in files if p.suffix in (".ckpt", ".tmp")], files


@pytest.mark.parametrize(
    ("make", "named"),
    [
        (lambda: PGD(steps=0), "PGD: steps"),
        (lambda: TopKAttack(restarts=2.5), "restarts"),
        (lambda: IGNorm(ig_steps=True), "ig_steps"),
        (lambda: HessianNorm(probes=0), "probes"),
        (lambda: HessianNorm(hvp="fwd"), "hvp"),
        (lambda: HessianNorm(fd_step=0.0), "fd_step"),
        (lambda: InfluenceAudit(queries=0), "queries"),
    ],
)
def test_counts_and_choices_are_checked_where_they_are_kept(make, named):
    """One check (errors.keep_counts) for every whole-number option: a ConfigError naming the class and the option;
    integer-like numbers are kept as ints."""
    with pytest.raises(ConfigError, match=named):
        make()


def test_integer_like_counts_are_kept_as_ints():
    attack = PGD(steps=np.int64(3), restarts=np.int32(2))
    assert (attack.steps, attack.restarts) == (3, 2) and type(attack.steps) is int
