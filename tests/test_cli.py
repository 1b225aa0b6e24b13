"""train.py end to end: configs, the quickstart run, checkpoints, the offline W&B run, and error messages."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from robustattr.checkpoint import load_classifier
from robustattr.cli import RobustCLI, fit_and_test, main
from robustattr.module import RobustClassifier
from robustattr.wandb_offline import find_offline_runs, read_offline_run

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p for p in (ROOT / "configs").glob("*.yaml") if not p.name.startswith("audit"))
AUDIT_CONFIGS = sorted((ROOT / "configs").glob("audit*.yaml"))
DIGITS_AS_CIFAR = json.dumps(
    {"class_path": "robustattr.data.DigitsDataModule", "init_args": {"image_size": 32, "channels": 3, "num_workers": 0}}
)
QUIET = ["--trainer.enable_model_summary", "false"]


def _data_present(config: dict) -> bool:
    data = config.get("data", {})
    args = data.get("init_args", {})
    if data.get("class_path", "").endswith(("CIFAR10DataModule", "CIFAR100DataModule")):
        folder = "cifar-10-batches-py" if "CIFAR10D" in data["class_path"] else "cifar-100-python"
        return (ROOT / args.get("root", "data") / folder).is_dir()
    if data.get("class_path", "").endswith(("ImageNetDataModule", "ImageFolderDataModule")):
        return "root" in args and Path(args["root"]).is_dir()
    return True


def _cpu_args(config_path: Path, tmp_path: Path) -> list[str]:
    config = yaml.safe_load(config_path.read_text())
    args = ["--config", str(config_path), "--trainer.accelerator", "cpu", "--trainer.devices", "1"]
    args += ["--trainer.default_root_dir", str(tmp_path)]
    args += ["--trainer.strategy", "auto", "--trainer.num_nodes", "1"]
    if config["trainer"].get("logger"):
        args += ["--trainer.logger.init_args.save_dir", str(tmp_path)]
    if not _data_present(config):
        args += ["--data", DIGITS_AS_CIFAR]
        if config["model"]["net"].get("init_args", {}).get("num_classes", 10) != 10:
            args += ["--model.net.init_args.num_classes", "10"]  # an ImageNet head on the 10 digits
    if config["model"].get("weights"):
        args += ["--model.weights", "null"]  # fine-tuning configs start from a run of yours (tested below)
    if config["model"]["net"].get("init_args", {}).get("weights"):
        args += ["--model.net.init_args.weights", "null"]  # ... or from your local copy of published weights
    return args


def test_every_config_opens_with_a_comment_on_purpose_and_cost():
    assert {p.name for p in CONFIGS} >= {
        "quickstart.yaml",
        "cifar_baseline.yaml",
        "cifar_reg.yaml",
        "imagenet_ddp.yaml",
    }
    for path in CONFIGS:
        head = path.read_text().splitlines()[:8]
        assert head[0].startswith("# "), path.name
        assert any("Cost" in line or "cost" in line or "minute" in line for line in head), path.name


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["config", "bf16-true"])
@pytest.mark.parametrize("config_path", CONFIGS, ids=lambda p: p.stem)
def test_every_config_parses_instantiates_and_takes_a_training_step(config_path, tmp_path, precision):
    """Real datasets are replaced by the embedded digits (3x32x32) when they are not on disk. In bf16-true (weights,
    activations and the batch in bf16) the first step flushes dtype bugs that fp32 runs hide (GPU configs run
    bf16-mixed; CPU autocast does not apply CUDA's rules, tests/test_precision.py emulates them)."""
    args = (
        _cpu_args(config_path, tmp_path) + QUIET + ["--trainer.fast_dev_run", "1", "--data.init_args.batch_size", "4"]
    )
    if precision != "config":
        args += ["--trainer.precision", precision]
    cli = RobustCLI(args=args)
    assert isinstance(cli.model, RobustClassifier)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert cli.trainer.state.finished and torch.isfinite(cli.trainer.callback_metrics["train/loss"])


@pytest.fixture(scope="module")
def quickstart_run(tmp_path_factory):
    """One epoch of the quickstart config, logged to an offline W&B run in a temporary folder."""
    tmp_path = tmp_path_factory.mktemp("quickstart")
    args = _cpu_args(ROOT / "configs" / "quickstart.yaml", tmp_path) + QUIET + ["--trainer.max_epochs", "1"]
    cli = RobustCLI(args=args)
    summary = fit_and_test(cli)
    return cli, summary, tmp_path


@pytest.mark.slow
def test_quickstart_trains_end_to_end_and_saves_config_with_the_run(quickstart_run):
    _cli, summary, tmp_path = quickstart_run
    assert summary["test"]["test/acc"] > 0.6  # one epoch already separates the digits
    checkpoint = Path(summary["checkpoint"])
    run_dir = Path(summary["run_dir"])
    assert checkpoint.is_file() and checkpoint.parent.parent == run_dir
    assert str(run_dir).startswith(str(tmp_path))
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["model"]["net"]["class_path"] == "robustattr.models.SmallCNN"
    assert saved["trainer"]["max_epochs"] == 1 and saved["seed_everything"] == 0


@pytest.mark.slow
def test_reloaded_checkpoint_gives_identical_predictions(quickstart_run):
    cli, summary, _ = quickstart_run
    x, _ = next(iter(cli.datamodule.test_dataloader()))
    trained = cli.model.eval()  # trainer.test loaded the best checkpoint into it
    with torch.no_grad():
        expected = trained(x)
        rebuilt = load_classifier(summary["checkpoint"])  # from the file alone, weights_only=True
        assert torch.equal(rebuilt(x), expected)
        via_lightning = RobustClassifier.load_from_checkpoint(summary["checkpoint"], weights_only=True).eval()
        assert torch.equal(via_lightning(x), expected)


@pytest.mark.slow
def test_offline_wandb_run_holds_the_logged_metrics_and_config(quickstart_run):
    _, summary, tmp_path = quickstart_run
    runs = find_offline_runs(tmp_path)
    assert len(runs) == 1
    run = read_offline_run(runs[0])
    assert run.values("val/acc") and run.values("train/loss") and run.values("train/ce")
    assert run.values("test/acc")[-1] == pytest.approx(summary["test"]["test/acc"])
    assert run.config["model"]["net"]["class_path"] == "robustattr.models.SmallCNN"
    assert run.config["data"]["class_path"] == "robustattr.data.DigitsDataModule"
    assert run.config["seed_everything"] == 0


@pytest.mark.slow
def test_same_seed_same_weights(tmp_path):
    def train(seed):
        args = _cpu_args(ROOT / "configs" / "quickstart.yaml", tmp_path) + QUIET
        args += ["--trainer.max_epochs", "1", "--trainer.logger", "false", "--trainer.limit_train_batches", "5"]
        args += ["--trainer.enable_checkpointing", "false", "--trainer.callbacks", "[]", "--seed_everything", str(seed)]
        cli = RobustCLI(args=args)
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        return torch.cat([p.detach().flatten() for p in cli.model.parameters()])

    first, again, other = train(0), train(0), train(1)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


@pytest.mark.slow
def test_csv_logger_alternative(tmp_path):
    args = ["--config", str(ROOT / "configs" / "quickstart.yaml"), *QUIET, "--trainer.max_epochs", "1"]
    args += ["--trainer.logger", "pytorch_lightning.loggers.CSVLogger", "--trainer.logger.save_dir", str(tmp_path)]
    summary = main(args)
    run_dir = Path(summary["run_dir"])
    assert (run_dir / "config.yaml").is_file()
    assert "val/acc" in (run_dir / "metrics.csv").read_text().splitlines()[0]


def _train_py(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *args], capture_output=True, text=True, cwd=cwd, timeout=300
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    "override, key",
    [
        (["--model.net.init_args.widht", "3"], "widht"),
        (["--trainer.max_epochs", "ten"], "trainer.max_epochs"),
        (["--model.nonsense", "1"], "model.nonsense"),
        (["--data.init_args.batch_size", "1.5"], "batch_size"),
    ],
)
def test_config_errors_fail_early_and_name_the_key(override, key):
    proc = _train_py("--config", "configs/quickstart.yaml", *override)
    assert proc.returncode == 2
    assert key in proc.stderr
    assert "Traceback" not in proc.stderr and "usage:" not in proc.stderr


@pytest.mark.slow
def test_unknown_key_in_yaml_file_is_named(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  net:\n    class_path: robustattr.models.SmallCNN\n  learning_rate: 0.1\n")
    proc = _train_py("--config", "configs/quickstart.yaml", "--config", str(bad))
    assert proc.returncode == 2 and "learning_rate" in proc.stderr


@pytest.mark.slow
def test_missing_cifar_ends_in_one_clear_message(tmp_path):
    proc = _train_py(
        "--config", "configs/cifar_reg.yaml", "--data.init_args.root", str(tmp_path / "data"),
        "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"),
    )  # fmt: skip
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "CIFAR-10 not found" in errors[0] and "download" in errors[0]


@pytest.mark.slow
def test_class_count_mismatch_is_a_one_line_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(_cpu_args(ROOT / "configs" / "quickstart.yaml", tmp_path) + QUIET
             + ["--trainer.logger", "false", "--model.net.init_args.num_classes", "7"])  # fmt: skip
    assert info.value.code == 1
    assert "predicts 7 classes but DigitsDataModule has 10" in capsys.readouterr().err


@pytest.mark.slow
def test_finetune_config_loads_its_weights_and_names_a_missing_file(tmp_path, capsys):
    path = ROOT / "configs" / "cifar_softplus_finetune.yaml"
    args = _cpu_args(path, tmp_path)[:-2] + QUIET + ["--trainer.fast_dev_run", "1", "--data.init_args.batch_size", "4"]
    with pytest.raises(SystemExit) as info:
        main([*args, "--model.weights", str(tmp_path / "missing.ckpt")])
    assert info.value.code == 1 and "missing.ckpt: no such file" in capsys.readouterr().err
    from robustattr.models import ResNet18

    relu = ResNet18()
    torch.save({"state_dict": {f"net.{k}": v for k, v in relu.state_dict().items()}}, tmp_path / "relu.ckpt")
    cli = RobustCLI(args=[*args, "--model.weights", str(tmp_path / "relu.ckpt")])
    torch.testing.assert_close(cli.model.net.fc.weight, relu.fc.weight)
    assert isinstance(cli.model.net.stem[2], torch.nn.Softplus)


@pytest.mark.parametrize("config_path", AUDIT_CONFIGS, ids=lambda p: p.stem)
def test_audit_configs_parse_and_build_every_section(config_path):
    from robustattr.audit.engine import run_audit
    from robustattr.audit.sections import Section
    from robustattr.cli import RobustArgumentParser

    parser = RobustArgumentParser()
    parser.add_argument("-c", "--config", action="config")
    parser.add_argument("--checkpoint", nargs="+", required=True)
    parser.add_function_arguments(run_audit, skip={"checkpoints", "config"})
    init = parser.instantiate_classes(parser.parse_args(["--config", str(config_path), "--checkpoint", "x.ckpt"]))
    expected = 11 if config_path.name == "audit.yaml" else 10  # the influence audit: on the digits-sized config
    assert len(init.sections) == expected and all(isinstance(s, Section) for s in init.sections)
    assert {"worst_case_fragility", "certified_attributions"} <= {s.name for s in init.sections}


def test_every_package_directory_is_listed_in_pyproject():
    """setuptools installs only the listed packages: a missing one works in editable mode and breaks pip install ."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    inner = (ROOT / "robustattr").rglob("*/__init__.py")
    found = {"robustattr." + p.parent.relative_to(ROOT / "robustattr").as_posix().replace("/", ".") for p in inner}
    found |= {"robustattr", "robustattr.callbacks"}
    assert found == listed


@pytest.mark.slow
def test_the_printed_summary_keeps_each_path_on_its_line(tmp_path):
    """Scripts read the checkpoint path from the output: off a terminal, rich used to wrap it at 80 columns."""
    deep = tmp_path / ("a-long-folder-name-" * 4) / "runs"
    proc = _train_py("--config", "configs/quickstart.yaml", "--trainer.max_epochs", "1", "--trainer.logger", "false",
                     "--trainer.default_root_dir", str(deep), "--trainer.callbacks", json.dumps(
                         [{"class_path": "pytorch_lightning.callbacks.ModelCheckpoint"}]))  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = {
        line.split()[0]: line.split(maxsplit=1)[1]
        for line in proc.stdout.splitlines()
        if line.startswith(("checkpoint", "run dir"))
    }
    assert Path(lines["checkpoint"]).is_file() and lines["checkpoint"].startswith(str(deep))


IMAGENET_CONFIGS = sorted((ROOT / "configs").glob("imagenet_*.yaml"))


@pytest.mark.slow
@pytest.mark.parametrize("config_path", IMAGENET_CONFIGS, ids=lambda p: p.stem)
def test_imagenet_recipes_take_two_steps_on_a_tiny_image_folder(config_path, tmp_path):
    """The ImageNet configs end to end (their terms, callbacks, data pipeline) on a generated 3-class ImageFolder of
    40x40 PNGs at 32 pixels, with a ResNet-18 for the ResNet-50 and no pretrained file, on the CPU."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for name in ("a", "b", "c"):
            (tmp_path / "imagenet" / split / name).mkdir(parents=True)
            for i in range(4):
                pixels = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(tmp_path / "imagenet" / split / name / f"{i}.png")
    args = ["--config", str(config_path), "--trainer.accelerator", "cpu", "--trainer.devices", "1",
            "--trainer.strategy", "auto", "--trainer.precision", "bf16-true", "--trainer.fast_dev_run", "2",
            "--trainer.logger.init_args.save_dir", str(tmp_path), "--trainer.default_root_dir", str(tmp_path),
            "--data.init_args.root", str(tmp_path / "imagenet"), "--data.init_args.image_size", "32",
            "--data.init_args.batch_size", "4", "--data.init_args.num_workers", "0",
            "--model.net.init_args.name", "resnet18", "--model.net.init_args.num_classes", "3", *QUIET]  # fmt: skip
    if yaml.safe_load(config_path.read_text())["model"]["net"]["init_args"].get("weights"):
        args += ["--model.net.init_args.weights", "null"]
    cli = RobustCLI(args=args)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert cli.trainer.global_step == 2 and torch.isfinite(cli.trainer.callback_metrics["train/loss"])
