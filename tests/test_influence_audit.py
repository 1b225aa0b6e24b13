"""The influence audit and the findings it reproduces (Koh & Liang 2017, section 5; Ghorbani et al. 2019), on the
digits: a quickstart trained with 10% planted label flips, audited through evaluate.py as users run it."""

import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from robustattr.audit import InfluenceAudit, run_audit
from robustattr.errors import ConfigError
from robustattr.influence import ExactInfluence, TrainingSet
from robustattr.influence.analysis import dataset_groups, error_influence, found_curve, group_sums
from robustattr.wandb_offline import find_offline_runs, read_offline_run

ROOT = Path(__file__).resolve().parents[1]
FLIPS = round(0.1 * 1257)


@pytest.fixture(scope="module")
def noisy(tmp_path_factory):
    """train.py on configs/quickstart_noisy.yaml (20 epochs; the validation callbacks left out), then evaluate.py
    with the influence section alone: the checkpoint ModelCheckpoint keeps (best validation accuracy)."""
    from robustattr.audit import main as evaluate
    from robustattr.cli import main as train

    root = tmp_path_factory.mktemp("noisy")
    summary = train(["--config", str(ROOT / "configs" / "quickstart_noisy.yaml"), "--trainer.logger", "false",
                     "--trainer.default_root_dir", str(root), "--trainer.enable_progress_bar", "false",
                     "--trainer.callbacks", '[{"class_path": "pytorch_lightning.callbacks.ModelCheckpoint", '
                     '"init_args": {"monitor": "val/acc", "mode": "max"}}]'])  # fmt: skip
    config = root / "audit.yaml"
    config.write_text(
        "num_samples: 256\nwandb: true\nsections:\n  - class_path: robustattr.audit.InfluenceAudit\n"
        "    init_args:\n      epsilons: [0.0078431, 0.0156863, 0.0313725]\n"
    )
    out = root / "audit"
    report = evaluate(["--config", str(config), "--checkpoint", f"noisy={summary['checkpoint']}", "--out", str(out)])
    return {"summary": summary, "report": report, "out": out, "config": config}


def _result(noisy):
    return noisy["report"]["results"]["influence"]["noisy"]


def test_the_report_holds_every_part_under_the_keys_scripts_look_for(noisy):
    saved = json.loads((noisy["out"] / "report.json").read_text())
    r = saved["results"]["influence"]["noisy"]
    assert len(r["proponents"]) == 8 and any(q["misclassified"] for q in r["proponents"])
    for q in r["proponents"]:
        assert len(q["proponents"]) == 5 and len(q["opponents"]) == 5
        assert min(p["score"] for p in q["proponents"]) >= max(p["score"] for p in q["opponents"])
    assert set(r["label_checking"]["found_at_20"]) == {"self_influence", "loss", "gradient_norm", "random"}
    assert r["label_checking"]["planted_flips"] == FLIPS
    for key in ("top5_overlap", "spearman"):
        assert set(r["fragility"][key]) == {"targeted", "random_sign"}
        assert all(len(v) == 3 for v in r["fragility"][key].values())
    assert r["domain_mismatch"]["test_errors"] >= 1 and r["domain_mismatch"]["most_harmful"]
    assert set(r["cost"]) == {"fit", "proponents", "label_checking", "domain_mismatch", "fragility"}


def test_label_checking_finds_the_flips_by_self_influence(noisy):
    """Koh & Liang: checking the training points in order of self-influence finds the flipped labels early. At 20%
    checked self-influence finds >= 80% and random about 20%; the training loss is reported beside it (on this
    checkpoint it is close behind, as on their digits)."""
    c = _result(noisy)["label_checking"]
    found = c["found_at_20"]
    print("found at 20%:", found, "AUC:", c["auc"])
    assert found["self_influence"] >= 0.8
    assert 0.1 <= found["random"] <= 0.3
    assert found["self_influence"] > found["random"] + 0.5
    assert 0 <= found["loss"] <= 1 and 0 <= found["gradient_norm"] <= 1
    top = c["top_self_influence"]
    assert sum(e["flipped"] for e in top) >= len(top) // 2  # the top of the ranking is mostly flips
    assert all(e["original_label"] != e["label"] for e in top if e["flipped"])


def test_influence_fragility_targeted_beats_random_sign_with_labels_kept(noisy):
    """Ghorbani et al.: a targeted perturbation rewrites the influence explanation far more than random signs of the
    same budget, and the predicted label stays."""
    f = _result(noisy)["fragility"]
    print("top-5 overlap:", f["top5_overlap"], "spearman:", f["spearman"], "label kept:", f["label_kept"])
    i = f["epsilons"].index(max(f["epsilons"]))
    assert f["label_kept"]["targeted"] == [1.0, 1.0, 1.0]
    assert 1 - f["top5_overlap"]["targeted"][i] >= 1.5 * (1 - f["top5_overlap"]["random_sign"][i])
    assert 1 - f["spearman"]["targeted"][i] >= 1.5 * (1 - f["spearman"]["random_sign"][i])
    assert f["top5_overlap"]["targeted"] == sorted(f["top5_overlap"]["targeted"], reverse=True)  # more budget, more


def test_the_wandb_run_has_the_proponents_as_a_table_of_images(noisy):
    (run_file,) = find_offline_runs(noisy["out"] / "wandb")
    run = read_offline_run(run_file)
    keys = {k.rsplit(".", 1)[0] for row in run.history for k in row}
    tables = sorted(k for k in keys if k.startswith("audit/tables/influence of training points/"))
    assert tables, sorted(keys)[:20]
    (key,) = [k for k in tables if "query" in json.loads((run.files / run.media(k)[0]["path"]).read_text())["columns"]]
    files = run.artifact_files(f"{key}.table.json")  # images in table cells travel in an artifact `wandb sync` uploads
    (table,) = [f for f in files if f["path"].endswith(".table.json")]
    data = json.loads(Path(table["local_path"]).read_text())
    assert data["columns"][:3] == ["model", "query", "proponent 1"] and len(data["data"]) == 8
    assert all(cell["_type"] == "image-file" for row in data["data"] for cell in row[1:])
    assert sum(f["path"].endswith(".png") for f in files) >= 8 * 5  # distinct thumbnails (repeats stored once)


def test_the_html_report_shows_the_parts_and_a_rerun_is_cached(noisy):
    page = (noisy["out"] / "report.html").read_text()
    for text in ("proponent 1", "opponent 5", "found at 20%", "planted flips", "top-5 overlap: targeted",
                 "cost of each part", "most responsible"):  # fmt: skip
        assert text in page, text
    assert page.count("<td class='t'><img") >= 8 * 11  # every query with its proponents and opponents
    from robustattr.audit import main as evaluate

    again = evaluate(["--config", str(noisy["config"]), "--checkpoint", f"noisy={noisy['summary']['checkpoint']}",
                      "--out", str(noisy["out"])])  # fmt: skip
    assert again["timings"]["influence [noisy]"]["cached"]
    assert again["results"] == json.loads(json.dumps(noisy["report"]["results"]))


def test_domain_mismatch_ranks_the_mismatched_group_first():
    """Koh & Liang's domain mismatch: a small, distinctive group of training images (inverted digits), most of them
    mislabelled, and the same kind of image common in the test set: the summed influence of the training points on
    the test errors ranks that group's members first, and per member the group is the most harmful."""
    from torch.utils.data import TensorDataset

    from robustattr.data import DigitsDataModule
    from robustattr.models import SmallCNN

    dm = DigitsDataModule()
    dm.prepare_data()
    train, test = dm.plain_split("train"), dm.plain_split("test")
    x = torch.stack([train[i][0] for i in range(len(train))])
    y = torch.tensor([int(train[i][1]) for i in range(len(train))])
    xt = torch.stack([test[i][0] for i in range(len(test))])
    yt = torch.tensor([int(test[i][1]) for i in range(len(test))])
    gen = torch.Generator().manual_seed(0)
    pick = torch.randperm(len(x), generator=gen)[:40]
    x_odd, y_odd = 1 - x[pick], y[pick].clone()
    wrong = torch.rand(40, generator=gen) < 0.8
    y_odd[wrong] = (y_odd[wrong] + 1 + torch.randint(0, 9, (int(wrong.sum()),), generator=gen)) % 10
    x_all, y_all = torch.cat([x, x_odd]), torch.cat([y, y_odd])

    class Grouped(TensorDataset):
        groups = torch.cat([torch.zeros(len(x)), torch.ones(40)]).long()
        group_names = ["upright", "inverted"]

    torch.manual_seed(0)
    net = SmallCNN(width=8)
    opt = torch.optim.Adam(net.parameters(), 3e-3)
    for _ in range(30):
        net.train()
        for idx in torch.randperm(len(x_all), generator=gen).split(64):
            opt.zero_grad()
            F.cross_entropy(net(x_all[idx]), y_all[idx]).backward()
            opt.step()
    net.eval()
    x_test = torch.cat([xt[:150], 1 - xt[150:300]])  # the inverted kind is common at test time
    y_test = torch.cat([yt[:150], yt[150:300]])
    with torch.no_grad():
        errors = net(x_test).argmax(1) != y_test
    influence = ExactInfluence(curvature="ggn").fit(net, TrainingSet(Grouped(x_all, y_all)))
    total = error_influence(influence, x_test[errors], y_test[errors])
    first = total.argsort()[:40]
    share = float((first >= len(x)).float().mean())
    groups = group_sums(total, *dataset_groups(influence.train.dataset))
    print(f"{int(errors.sum())} test errors; inverted among the 40 most harmful: {share:.2f}; groups: {groups}")
    assert share >= 0.3  # 40 of 1297 training points: 3% by chance
    assert groups[0]["group"] == "inverted" and groups[0]["mean"] < 3 * groups[1]["mean"] < 0


def test_found_curve_known_answers():
    flipped = torch.tensor([True, False, True, False, False, False, False, False, False, False])
    perfect = found_curve(flipped.double(), flipped, fractions=(0.1, 0.2, 0.3))
    assert perfect["found_at"] == {"10": 0.5, "20": 1.0, "30": 1.0}
    assert perfect["auc"] == pytest.approx(0.025 + 0.075 + 0.8)  # trapezoids over 0, 1/2, 1, 1, ... at steps of 0.1
    worst = found_curve(-flipped.double(), flipped, fractions=(0.8, 0.9))
    assert worst["found_at"] == {"80": 0.0, "90": 0.5}
    with pytest.raises(ConfigError, match="no flipped labels"):
        found_curve(torch.zeros(3), torch.zeros(3, dtype=torch.bool))


@pytest.mark.parametrize(
    "kwargs, match",
    [({"epsilons": [2.0]}, "epsilons"), ({"queries": 0}, "queries"), ({"k": 0}, "k must"), ({"steps": 0}, "steps")],
)
def test_bad_settings_are_refused_in_one_line(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        InfluenceAudit(**kwargs)


def test_a_checkpoint_without_noise_still_gets_its_top_self_influence_images(tmp_path):
    from robustattr.cli import main as train

    summary = train(["--config", str(ROOT / "configs" / "quickstart.yaml"), "--trainer.max_epochs", "2",
                     "--trainer.logger", "false", "--trainer.default_root_dir", str(tmp_path),
                     "--trainer.enable_progress_bar", "false", "--trainer.callbacks",
                     '[{"class_path": "pytorch_lightning.callbacks.ModelCheckpoint"}]'])  # fmt: skip
    section = InfluenceAudit(queries=4, epsilons=[8 / 255], steps=3)
    report = run_audit([summary["checkpoint"]], [section], out=str(tmp_path / "audit"), num_samples=64)
    (r,) = report["results"]["influence"].values()
    assert r["label_checking"]["planted_flips"] == 0 and "found_at_20" not in r["label_checking"]
    assert len(r["label_checking"]["top_self_influence"]) == 16
    assert "not measured" in (tmp_path / "audit" / "report.html").read_text()


sys.path.insert(0, str(ROOT / "benchmarks"))


@pytest.mark.slow
def test_poisoned_training_images_flip_targets_that_random_signs_do_not():
    """Koh & Liang's training-set attack on a frozen-feature linear head (digits 3 vs 8): perturbing the most
    influential training images of a target inside the L-infinity box flips targeted predictions; random signs of
    the same budget on the same images flip none. (The full run, benchmarks/training_set_attack.py: 1, 2, 5, 10
    poisoned images flip 7.5%, 20%, 42.5%, 60% of 40 targets; random signs 0% at every budget.)"""
    import training_set_attack as tsa

    body, x_train, y_train, x_test, y_test = tsa.setup()
    result = tsa.attack_targets(body, x_train, y_train, x_test, y_test, targets=8, budgets=[5], epsilon=0.5, steps=10)
    print(result)
    assert result["random_flipped_fraction"] == {"5": 0.0}
    assert result["flipped_fraction"]["5"] >= 0.25


# -- the callback ---------------------------------------------------------------------------------------------------
def test_the_monitor_scores_are_last_layer_tracin_self_influence():
    """Known answer: one snapshot's score is lr |grad_theta l|^2 over the last linear layer, equal to the squared
    norm of the per-sample gradients robustattr.influence computes with torch.func; snapshots add up (TracInCP)."""
    from robustattr.callbacks import SelfInfluenceMonitor
    from robustattr.models import SmallCNN

    torch.manual_seed(0)
    net = SmallCNN(width=4).eval()
    x, y = torch.rand(7, 1, 8, 8), torch.randint(0, 10, (7,))
    dataset = torch.utils.data.TensorDataset(x, y)

    class Module(torch.nn.Module):
        dtype = torch.float32
        device = torch.device("cpu")

        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, images):
            return self.net(images)

    monitor = SelfInfluenceMonitor(batch_size=3)
    norms = monitor._squared_norms(Module(), dataset, torch.arange(7))
    reference = ExactInfluence(scope="last").fit(net, TrainingSet.from_tensors(x, y)).gradients(x, y)
    torch.testing.assert_close(norms.double(), reference.pow(2).sum(1), rtol=1e-5, atol=1e-8)


class _CountingSet(torch.utils.data.Dataset):
    """A dataset that counts its reads (an image folder's decoding)."""

    def __init__(self, x, y):
        self.x, self.y, self.reads = x, y, 0

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        self.reads += 1
        return self.x[i], self.y[i]


def test_the_monitor_reads_the_split_once_per_fit_and_its_scores_do_not_change():
    """Later runs reuse the images the first read (no decoding); the scores equal those of a pass that streams
    from the loader; another shard, another DataModule, a new fit or a cache too small reads again."""
    from robustattr.callbacks import SelfInfluenceMonitor
    from robustattr.models import SmallCNN

    torch.manual_seed(0)
    module = SmallCNN(width=4).eval()
    module.device, module.dtype = torch.device("cpu"), torch.float32
    data = _CountingSet(torch.rand(11, 1, 8, 8), torch.randint(0, 10, (11,)))
    datamodule, local = object(), torch.arange(11)
    monitor = SelfInfluenceMonitor(batch_size=4)
    split = monitor._split(datamodule, data, local, 0, 4)
    reads = data.reads
    assert split is not None and reads == 11 + 1  # the split, and one image to size it
    assert monitor._split(datamodule, data, local, 0, 4) is not None and data.reads == reads  # no read at all
    cached = monitor._squared_norms(module, data, local, 0, 4, split)
    streamed = monitor._squared_norms(module, data, local, 0, 4)
    torch.testing.assert_close(cached, streamed, rtol=0, atol=0)
    reads = data.reads
    monitor._split(datamodule, data, local[:5], 0, 4)  # another shard
    monitor._split(object(), data, local[:5], 0, 4)  # another DataModule
    assert data.reads == reads + 2 * (5 + 1)
    monitor.on_fit_start(None, module)
    assert monitor._cache is None
    small = SelfInfluenceMonitor(cache_bytes=11 * 64 * 4 - 1)  # one byte short of the split
    assert small._split(datamodule, data, local, 0, 4) is None and small._cache is None
    assert SelfInfluenceMonitor(cache_bytes=0)._split(datamodule, data, local, 0, 4) is None
    with pytest.raises(ConfigError, match="cache_bytes"):
        SelfInfluenceMonitor(cache_bytes=-1)


def test_the_monitors_cpu_batches_keep_the_largest_activation_within_its_budget():
    """On a CPU the default batch holds at most 8 MiB of the largest activation (32 channels at 32x32 in float32:
    128 KiB an image, so 64), never more than eval_batch_size and never fewer than 16; a batch_size given wins."""
    from types import SimpleNamespace

    from robustattr.callbacks import SelfInfluenceMonitor
    from robustattr.models import SmallCNN

    def size(side, channels=3, eval_batch_size=256, **kwargs):
        module = SmallCNN(in_channels=channels).train()
        module.device, module.dtype = torch.device("cpu"), torch.float32
        data = torch.utils.data.TensorDataset(torch.rand(2, channels, side, side), torch.zeros(2, dtype=torch.long))
        before = {k: v.clone() for k, v in module.state_dict().items()}
        found = SelfInfluenceMonitor(**kwargs)._default_batch_size(
            module, SimpleNamespace(eval_batch_size=eval_batch_size), data, torch.arange(2)
        )
        assert module.training and all(torch.equal(before[k], v) for k, v in module.state_dict().items())
        return found

    assert size(32) == 64
    assert size(8, channels=1) == 256 and size(8, channels=1, eval_batch_size=48) == 48
    assert size(128) == 16  # 2 MiB an image: the floor
    assert size(32, eval_batch_size=8) == 8


@pytest.mark.slow
def test_the_monitor_logs_the_flips_while_training_and_leaves_the_run_unchanged(tmp_path):
    """On the noisy quickstart the monitor's top 10% holds most of the flips after a few epochs, its W&B table holds
    the images, and the run trains exactly as without it (it draws nothing from the global random state)."""
    from robustattr.cli import main as train

    def run(folder, monitor):
        callbacks = [{"class_path": "pytorch_lightning.callbacks.ModelCheckpoint"}]
        if monitor:
            callbacks.append({"class_path": "robustattr.callbacks.SelfInfluenceMonitor",
                              "init_args": {"every_n_epochs": 2}})  # fmt: skip
        train(["--config", str(ROOT / "configs" / "quickstart_noisy.yaml"), "--trainer.max_epochs", "6",
               "--trainer.logger.init_args.save_dir", str(tmp_path / folder), "--trainer.enable_progress_bar", "false",
               "--trainer.callbacks", json.dumps(callbacks)])  # fmt: skip
        (run_file,) = find_offline_runs(tmp_path / folder)
        return read_offline_run(run_file)

    with_monitor, without = run("with", True), run("without", False)
    assert with_monitor.values("val/acc") == without.values("val/acc")  # the same trajectory, epoch by epoch
    found = with_monitor.values("train/self_influence/found_at_10")
    assert len(found) == 3 and found[-1] >= 0.6, found
    assert len(with_monitor.values("time/self_influence")) == 3
    (table,) = with_monitor.media("train/self_influence_table")[-1:]
    files = with_monitor.artifact_files(table["_latest_artifact_path"].split(":latest/")[1])
    assert sum(f["path"].endswith(".png") for f in files) >= 8


@pytest.mark.slow
def test_the_influence_report_in_chromium(noisy, tmp_path):
    """report.html as readers see it: every figure and thumbnail loaded, figures at their own size, thumbnails
    enlarged without smoothing; a screenshot is kept next to the report."""
    from tests.test_report_browser import CHROMIUM, DRIVER, chromium

    if not (CHROMIUM and DRIVER):
        pytest.skip("Debian's chromium and chromium-driver are not installed")
    driver = chromium(tmp_path)
    try:
        driver.get((noisy["out"] / "report.html").as_uri())
        images = driver.execute_script(
            "return Array.from(document.images).map(i => [i.alt, i.complete, i.naturalWidth, i.width, "
            "i.closest('td') !== null])"
        )
        text = driver.execute_script("return document.body.innerText")
        driver.save_screenshot(str(noisy["out"] / "report.png"))
    finally:
        driver.quit()
    figures = [i for i in images if not i[4]]
    thumbnails = [i for i in images if i[4]]
    assert len(figures) == 2 and len(thumbnails) >= 8 * 11 + 16
    for alt, complete, natural, _shown, _ in images:
        assert complete and natural > 0, alt
    assert all(shown == natural for _, _, natural, shown, _ in figures)
    assert all(shown == 56 for *_, shown, _ in thumbnails)
    assert "found at 20%" in text and "top-5 overlap: targeted" in text and "planted flips" in text
    assert (noisy["out"] / "report.png").stat().st_size > 10_000


@pytest.mark.slow
def test_a_resumed_run_continues_the_monitors_tracin_sum(tmp_path):
    """TracIn sums over the run's snapshots: killed and resumed, the run keeps the snapshots taken before."""
    from robustattr.callbacks import SelfInfluenceMonitor
    from robustattr.cli import main as train

    callbacks = json.dumps(
        [{"class_path": "robustattr.callbacks.SelfInfluenceMonitor", "init_args": {"every_n_epochs": 2}}]
    )
    common = ["--config", str(ROOT / "configs" / "quickstart_noisy.yaml"), "--trainer.logger", "false",
              "--trainer.default_root_dir", str(tmp_path), "--trainer.enable_progress_bar", "false",
              "--trainer.callbacks", callbacks]  # fmt: skip
    first = train([*common, "--trainer.max_epochs", "2"])
    state = torch.load(Path(first["run_dir"]) / "checkpoints" / "last.ckpt", weights_only=True)["callbacks"]
    (saved,) = [v for k, v in state.items() if k.startswith(SelfInfluenceMonitor.__qualname__)]
    assert saved["snapshots"] == 1 and saved["scores"].shape == (1257,)
    second = train([*common, "--trainer.max_epochs", "4", "--ckpt_path", first["run_dir"]])
    state = torch.load(Path(second["run_dir"]) / "checkpoints" / "last.ckpt", weights_only=True)["callbacks"]
    (resumed,) = [v for k, v in state.items() if k.startswith(SelfInfluenceMonitor.__qualname__)]
    assert resumed["snapshots"] == 2
    assert (resumed["scores"] > saved["scores"]).all()  # the second snapshot adds to the first
