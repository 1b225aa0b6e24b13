"""A checkpoint cannot make us import, construct, create or read what it likes.

Each crafted checkpoint is a real train.py checkpoint with one edit to its stored config, loaded in a fresh
process under Python audit hooks (tests/helpers/probe.py), which record every import, opened file, created
directory, connection and process. A module planted on the path writes a marker file when imported and when
one of its classes is constructed, so "nothing of it ran" is checked on disk too."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jsonargparse
import pytest
import torch

from robustattr.checkpoint import load_classifier
from robustattr.cli import main as train
from robustattr.errors import NonFiniteError
from robustattr.run import CONFIG_KEY
from robustattr.trust import TRUSTED_IMPORTS, UntrustedConfigError, instantiate_trusted

ROOT = Path(__file__).resolve().parents[1]
ONLY_CHECKPOINTING = json.dumps(
    [{"class_path": "pytorch_lightning.callbacks.ModelCheckpoint", "init_args": {"monitor": "val/acc", "mode": "max"}}]
)
EVIL = """
import os, pathlib
import torch
pathlib.Path(os.environ["EVIL_MARKER"]).write_text("imported")

class EvilNet(torch.nn.Module):
    def __init__(self, num_classes: int = 10):
        super().__init__()
        pathlib.Path(os.environ["EVIL_MARKER"] + ".constructed").write_text("constructed")
        self.num_classes = num_classes
        self.linear = torch.nn.Linear(64, num_classes)

    def forward(self, x):
        return self.linear(x.flatten(1))

class EvilActivation(torch.nn.ReLU):
    def __init__(self):
        super().__init__()
        pathlib.Path(os.environ["EVIL_MARKER"] + ".constructed").write_text("constructed")
"""


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("run")
    args = ["--config", str(ROOT / "configs" / "quickstart.yaml"), "--trainer.max_epochs", "1"]
    args += ["--trainer.logger", "false", "--trainer.default_root_dir", str(folder)]
    args += ["--trainer.callbacks", ONLY_CHECKPOINTING, "--trainer.enable_progress_bar", "false"]
    return Path(train(args)["checkpoint"])


def craft(source: Path, target: Path, edits: dict[str, object]) -> Path:
    """``source`` with ``edits`` ({"model.net.init_args.activation": value, ...}) applied to its stored config."""
    content = torch.load(source, weights_only=True)
    for dotted, value in edits.items():
        node = content[CONFIG_KEY]
        *parents, last = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = value
    torch.save(content, target)
    return target


def probe(tmp_path: Path, route: str, *paths: Path) -> list[dict]:
    """One report per file (see tests/helpers/probe.py), from one fresh process."""
    (tmp_path / "evilmod.py").write_text(textwrap.dedent(EVIL))
    out = tmp_path / "probe.json"
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}", "EVIL_MARKER": str(tmp_path / "marker")}
    proc = subprocess.run(
        [sys.executable, "-m", "tests.helpers.probe", str(out), route, *map(str, paths)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.is_file(), proc.stderr[-3000:]
    return json.loads(out.read_text())


def untouched(report: dict, tmp_path: Path) -> None:
    assert not any(name.split(".")[0] in ("evilmod", "this") for name in report["imports"]), report["imports"]
    assert not (tmp_path / "marker").exists() and not (tmp_path / "marker.constructed").exists()
    assert "Beautiful is better than ugly" not in report["stdout"] and "Ornhgvshy" not in report["stdout"]
    assert not report["network"] and not report["processes"]


ROUTES = {
    "plain string for a Callable (activation: this.s)": ({"model.net.init_args.activation": "this.s"}, "this.s"),
    "class_path of the net": ({"model.net": {"class_path": "evilmod.EvilNet"}}, "evilmod.EvilNet"),
    "class_path of the activation": (
        {"model.net.init_args.activation": {"class_path": "evilmod.EvilActivation"}}, "evilmod.EvilActivation",
    ),
    "plain string for the activation class": ({"model.net.init_args.activation": "evilmod.EvilActivation"}, "evilmod"),
    "optimizer": ({"model.optimizer": {"class_path": "evilmod.EvilNet"}}, "evilmod.EvilNet"),
    "a trusted package's CLI": ({"model.net.init_args.activation": "robustattr.cli.main"}, "robustattr.cli.main"),
    "shell through os": ({"model.net.init_args.activation": "os.system"}, "os.system"),
}  # fmt: skip


@pytest.mark.slow
def test_a_crafted_config_imports_and_constructs_nothing(checkpoint, tmp_path):
    files = [craft(checkpoint, tmp_path / f"crafted{i}.ckpt", ROUTES[r][0]) for i, r in enumerate(ROUTES)]
    reports = probe(tmp_path, "classifier", *files)
    for (route, (_, named)), path, report in zip(ROUTES.items(), files, reports, strict=True):
        assert not report["ok"] and report["error"].startswith("UntrustedConfigError"), (route, report["error"])
        assert named in report["error"] and path.name in report["error"], route
        untouched(report, tmp_path)


@pytest.mark.slow
def test_the_gate_is_what_stops_it(checkpoint, tmp_path, monkeypatch):
    """Positive control: with the planted package trusted explicitly, the same file imports and builds it."""
    crafted = craft(checkpoint, tmp_path / "crafted.ckpt", {"model.net.init_args.activation": "evilmod.EvilActivation"})
    (tmp_path / "evilmod.py").write_text(textwrap.dedent(EVIL))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("EVIL_MARKER", str(tmp_path / "marker"))
    model = load_classifier(crafted, trusted_prefixes=["evilmod"])
    assert (tmp_path / "marker.constructed").is_file()
    assert type(model.net.features[2]).__name__ == "EvilActivation"
    sys.modules.pop("evilmod", None)


@pytest.mark.slow
def test_stored_weights_paths_are_never_read_and_a_moved_finetune_loads(checkpoint, tmp_path):
    sentinel = tmp_path / "start.ckpt"
    sentinel.write_bytes(checkpoint.read_bytes())
    paths = [str(sentinel), str(tmp_path / "moved_away.ckpt")]
    files = [craft(checkpoint, tmp_path / f"finetuned{i}.ckpt", {"model.weights": p}) for i, p in enumerate(paths)]
    for weights, path, report in zip(paths, files, probe(tmp_path, "classifier", *files), strict=True):
        assert report["ok"], report["error"]
        assert str(path) in report["opened"] and weights not in report["opened"]  # the hook sees opens; not this one
    crafted = files[0]
    x = torch.rand(3, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(load_classifier(crafted)(x), load_classifier(checkpoint)(x))


@pytest.mark.slow
def test_stored_data_settings_never_download_or_create_directories(checkpoint, tmp_path):
    root = tmp_path / "somewhere" / "data"
    cifar = {"class_path": "robustattr.data.CIFAR10DataModule", "init_args": {"root": str(root), "download": True}}
    crafted = craft(checkpoint, tmp_path / "crafted.ckpt", {"data": cifar})
    (report,) = probe(tmp_path, "audit", crafted, tmp_path / "audit")
    assert not report["ok"] and "CIFAR-10 not found" in report["error"]
    assert not report["network"] and not any(str(tmp_path / "somewhere") in d for d in report["mkdir"])
    assert not (tmp_path / "somewhere").exists()


@pytest.mark.slow
def test_evaluate_refuses_a_crafted_checkpoint_in_one_line(checkpoint, tmp_path):
    crafted = craft(checkpoint, tmp_path / "crafted.ckpt", {"model.net.init_args.activation": "this.s"})
    proc = subprocess.run(
        [sys.executable, str(ROOT / "evaluate.py"), "--checkpoint", str(crafted), "--config",
         str(ROOT / "configs" / "audit.yaml"), "--out", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "this.s" in errors[0] and "refused" in errors[0]
    assert "Beautiful is better" not in proc.stdout and not (tmp_path / "out" / "report.json").exists()


@pytest.mark.slow
def test_non_finite_weights_are_refused(checkpoint, tmp_path):
    content = torch.load(checkpoint, weights_only=True)
    content["state_dict"]["net.classifier.bias"][3] = float("nan")
    torch.save(content, tmp_path / "nan.ckpt")
    with pytest.raises(NonFiniteError, match=r"net\.classifier\.bias"):
        load_classifier(tmp_path / "nan.ckpt")


def test_the_import_policy_is_restored_and_jsonargparse_still_has_what_we_use():
    """`robustattr.trust._only_imports` saves and restores jsonargparse's private policy settings: this fails if
    jsonargparse renames them, instead of the gate silently leaving the policy switched on (or off)."""
    from jsonargparse import _common

    before = {k: _common.parsing_settings[k] for k in ("import_path_verdicts", "import_paths_enforced")}
    net = instantiate_trusted({"class_path": "robustattr.models.SmallCNN"}, torch.nn.Module, "test")
    assert type(net).__name__ == "SmallCNN"
    with pytest.raises(UntrustedConfigError, match=r"collections\.OrderedDict"):
        instantiate_trusted({"class_path": "collections.OrderedDict"}, torch.nn.Module, "test")
    after = {k: _common.parsing_settings[k] for k in ("import_path_verdicts", "import_paths_enforced")}
    assert after == before
    # outside the gate, the user's own configs parse as before (no policy left switched on)
    parser = jsonargparse.ArgumentParser(exit_on_error=False)
    parser.add_argument("--net", type=torch.nn.Module)
    parser.parse_object({"net": {"class_path": "torch.nn.Identity"}})
    assert "robustattr.cli" not in TRUSTED_IMPORTS and "torch.nn" in TRUSTED_IMPORTS
