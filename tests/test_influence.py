"""The influence engine against known answers: the exact backend against the Hessian by autograd, every backend
against the exact one, TracIn against Captum's TracInCP, leave-one-out retraining of a convex head, sharding
under a 2-process gloo group, and one clear error per bad input. Digits, tiny models, float64 where it matters."""

import copy
import os
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from scipy.stats import pearsonr, spearmanr
from torch import nn

from robustattr.data import DigitsDataModule
from robustattr.errors import ConfigError, NonFiniteError, RobustAttrError
from robustattr.influence import (
    CGInfluence,
    EKFACInfluence,
    ExactInfluence,
    SingularCurvatureError,
    TracIn,
    TrainingSet,
    resolve_scope,
)
from robustattr.models import SmallCNN

DAMPING = 0.01


def _digits():
    dm = DigitsDataModule()
    dm.prepare_data()
    return TrainingSet.from_datamodule(dm)


@pytest.fixture(scope="module")
def digits():
    return _digits()


@pytest.fixture(scope="module")
def cnn(digits):
    """A SmallCNN trained for a few full-batch steps (the loss is not flat, the head not saturated)."""
    torch.manual_seed(0)
    net = SmallCNN(width=4)
    x, y = digits.tensors()
    opt = torch.optim.Adam(net.parameters(), 1e-2)
    for _ in range(10):
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()
    return net.eval()


def _head_problem(cnn, digits, n=400):
    """Koh & Liang's convex setup: a linear head on frozen SmallCNN features, trained to its optimum of the mean
    cross-entropy + damping/2 |theta|^2 (whose Hessian is the training-loss Hessian + damping I)."""
    x, y = digits.tensors(range(n))
    feats = []
    cnn.classifier.register_forward_hook(lambda m, i, o: feats.append(i[0].detach()))
    with torch.no_grad():
        cnn(x)
    cnn.classifier._forward_hooks.clear()
    features = feats[0].double()
    head = nn.Linear(features.shape[1], 10).double()
    fit_head(head, features, y)
    return head, features, y


def fit_head(head, features, y, exclude=None):
    keep = torch.ones(len(y), dtype=torch.bool)
    if exclude is not None:
        keep[exclude] = False
    opt = torch.optim.LBFGS(head.parameters(), lr=1, max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-14,
                            history_size=50, line_search_fn="strong_wolfe")  # fmt: skip

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(head(features[keep]), y[keep])
        loss = loss + DAMPING / 2 * sum((p**2).sum() for p in head.parameters())
        loss.backward()
        return loss

    opt.step(closure)
    return head


# --------------------------------------------------------------------------------------------- known answers
def test_exact_curvature_equals_the_autograd_hessian_and_scores_follow_koh_and_liang(cnn, digits):
    sub = TrainingSet.from_tensors(*digits.tensors(range(200)))
    influence = ExactInfluence(damping=DAMPING, batch_size=64).fit(cnn, sub)
    model = influence.model
    x, y = sub.tensors()
    w, b = model.classifier.weight.detach(), model.classifier.bias.detach()
    theta = torch.cat([w.reshape(-1), b])

    def loss(t):
        weight, bias = t[: w.numel()].reshape(w.shape), t[w.numel() :]
        saved = model.classifier.forward
        model.classifier.forward = lambda h: F.linear(h, weight, bias)
        try:
            return F.cross_entropy(model(x.double()), y)
        finally:
            model.classifier.forward = saved

    hessian = torch.autograd.functional.hessian(loss, theta)
    assert torch.allclose(influence.matrix, hessian, atol=1e-10)
    # scores: (1/n) g_q^T (H + damping I)^{-1} g_i, positive = helpful
    g = influence.gradients(x, y)
    expected = g[:3] @ torch.linalg.solve(hessian + DAMPING * torch.eye(len(theta), dtype=torch.float64), g.T) / 200
    result = influence.scores(x[:3], y[:3])
    assert torch.allclose(result.values, expected, rtol=1e-8, atol=1e-14)
    assert result.damping == DAMPING and result.backend == "exact" and "classifier" in result.scope
    self_values = influence.self_influence().values
    inverse = torch.linalg.solve(hessian + DAMPING * torch.eye(len(theta), dtype=torch.float64), g.T)
    assert torch.allclose(self_values, (g * inverse.T).sum(1) / 200, rtol=1e-8, atol=1e-14)
    assert self_values.unique().numel() > 100  # one value per point, not broadcast


def test_for_a_linear_head_the_hessian_is_the_gauss_newton_matrix(cnn, digits):
    sub = TrainingSet.from_tensors(*digits.tensors(range(100)))
    h = ExactInfluence(curvature="hessian").fit(cnn, sub).matrix
    g = ExactInfluence(curvature="ggn").fit(cnn, sub).matrix
    assert torch.allclose(h, g, atol=1e-12)


def test_leave_one_out_retraining_of_a_convex_head_matches_the_prediction(cnn, digits):
    head, features, y = _head_problem(cnn, digits)
    train = TrainingSet.from_tensors(features, y)
    influence = ExactInfluence(damping=DAMPING, batch_size=400).fit(head, train)
    test_x, test_y = _digits_test_features(cnn)
    scores = influence.scores(test_x, test_y).values
    predicted, actual = [], []
    for q in range(3):
        before = F.cross_entropy(head(test_x[q : q + 1]), test_y[q : q + 1]).item()
        for i in scores[q].abs().topk(40).indices.tolist():
            retrained = fit_head(copy.deepcopy(head), features, y, exclude=i)
            after = F.cross_entropy(retrained(test_x[q : q + 1]), test_y[q : q + 1]).item()
            predicted.append(scores[q, i].item())
            actual.append(after - before)  # removing a helpful point (score > 0) raises the loss
    r = pearsonr(predicted, actual)[0]
    assert r >= 0.95, r
    assert np.sign(predicted).tolist().count(1) > 0 and np.mean(np.sign(predicted) == np.sign(actual)) > 0.9


def _digits_test_features(cnn):
    dm = DigitsDataModule()
    dm.prepare_data()
    dm.setup("test")
    data = dm.plain_split("test")
    x = torch.stack([data[i][0] for i in range(3)])
    y = torch.tensor([int(data[i][1]) for i in range(3)])
    feats = []
    handle = cnn.classifier.register_forward_hook(lambda m, i, o: feats.append(i[0].detach()))
    with torch.no_grad():
        cnn(x)
    handle.remove()
    return feats[0].double(), y


# ----------------------------------------------------------------------------------------- backends vs exact
def test_cg_agrees_with_exact(cnn, digits):
    sub = TrainingSet.from_tensors(*digits.tensors(range(300)))
    x, y = digits.tensors(range(300, 305))
    exact = ExactInfluence(curvature="ggn").fit(cnn, sub).scores(x, y).values
    cg = CGInfluence(curvature="ggn", dtype=torch.float64).fit(cnn, sub)
    values = cg.scores(x, y).values
    assert pearsonr(exact.flatten(), values.flatten())[0] >= 0.999
    assert torch.allclose(values, exact, rtol=1e-3, atol=1e-3 * exact.abs().max())


def test_ekfac_ranks_the_influential_points_as_exact_does_on_a_last_layer(cnn, digits):
    sub = TrainingSet.from_tensors(*digits.tensors(range(600)))
    x, y = digits.tensors(range(600, 610))
    exact = ExactInfluence(curvature="ggn").fit(cnn, sub).scores(x, y).values
    ekfac = EKFACInfluence().fit(cnn, sub).scores(x, y).values.double()
    top = exact.abs().argsort(1, descending=True)[:, :100]
    per_query = [spearmanr(exact[q, top[q]], ekfac[q, top[q]])[0] for q in range(len(x))]
    assert np.mean(per_query) >= 0.9, per_query
    assert pearsonr(exact.flatten(), ekfac.flatten())[0] >= 0.9  # the same scale (kronfluence's / n)


def _checkpoints(cnn, digits, tmp_path, count=3):
    torch.manual_seed(1)
    net = copy.deepcopy(cnn).train()
    x, y = digits.tensors()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    paths, lrs = [], []
    for epoch in range(count):
        for xb, yb in zip(x.split(256), y.split(256), strict=True):
            opt.zero_grad()
            F.cross_entropy(net(xb), yb).backward()
            opt.step()
        path = tmp_path / f"epoch{epoch}.pt"
        torch.save(net.state_dict(), path)
        paths.append(str(path))
        lrs.append(0.1 / (epoch + 1))
    return paths, lrs


def test_tracin_equals_captums_tracincp(cnn, digits, tmp_path):
    from captum.influence import TracInCP

    paths, lrs = _checkpoints(cnn, digits, tmp_path)
    sub = TrainingSet.from_tensors(*digits.tensors(range(120)))
    x, y = digits.tensors(range(500, 506))
    ours = TracIn(paths, learning_rates=lrs, dtype=torch.float64).fit(cnn, sub)
    model = copy.deepcopy(cnn).double()

    def load(m, path):
        m.load_state_dict(torch.load(path, weights_only=True))
        m.double()
        return lrs[paths.index(path)]

    captum = TracInCP(model, torch.utils.data.TensorDataset(sub.tensors()[0].double(), sub.tensors()[1]), paths, load,
                      layers=["classifier"], loss_fn=nn.CrossEntropyLoss(reduction="sum"), batch_size=40,
                      sample_wise_grads_per_batch=True)  # fmt: skip
    theirs = captum.influence((x.double(), y))
    values = ours.scores(x, y).values
    assert (values - theirs).abs().max() / theirs.abs().max() < 1e-5
    theirs_self = captum.self_influence()
    assert ((ours.self_influence().values - theirs_self).abs().max() / theirs_self.abs().max()) < 1e-5


# ------------------------------------------------------------------------------------------- the interface
def test_streaming_never_holds_more_than_a_batch_and_does_not_change_the_result(cnn, digits, monkeypatch):
    sub = TrainingSet.from_tensors(*digits.tensors(range(150)))
    x, y = digits.tensors(range(150, 154))
    big = ExactInfluence(batch_size=150).fit(cnn, sub)
    reference = big.scores(x, y).values
    small = ExactInfluence(batch_size=16).fit(cnn, sub)
    seen = []
    original = small.gradients
    monkeypatch.setattr(small, "gradients", lambda a, b, model=None: seen.append(len(a)) or original(a, b, model))
    assert torch.allclose(small.scores(x, y).values, reference, rtol=1e-10, atol=1e-16)
    assert max(seen) <= 16
    top = small.top_k(x, y, k=5)
    assert torch.equal(top.proponents, reference.topk(5, dim=1).indices)
    assert torch.equal(top.opponents, reference.topk(5, dim=1, largest=False).indices)
    assert (top.proponent_scores[:, 0] > 0).all() and (top.opponent_scores[:, 0] < 0).all()


def test_the_input_gradient_is_the_derivative_of_the_score(cnn, digits):
    sub = TrainingSet.from_tensors(*digits.tensors(range(100)))
    smooth = SmallCNN(width=4, activation=nn.Softplus)  # smooth, so finite differences see no kinks
    smooth.load_state_dict(cnn.state_dict())
    influence = ExactInfluence().fit(smooth.eval(), sub)
    xq, yq = digits.tensors(range(200, 202))
    xt, yt = digits.tensors(range(5, 7))
    xt = xt + 0.01 * torch.rand(xt.shape, generator=torch.Generator().manual_seed(0))  # no max-pool ties
    grad = influence.input_gradient(xq, yq, xt, yt)
    direction = torch.randn_like(xt, dtype=torch.float64)
    h = 1e-5

    def total(images):  # the score of each training image on the queries, summed, with the curvature fixed
        q = influence.query_vectors(xq, yq).sum(0)
        return (influence.gradients(images, yt) @ q).sum() / len(sub)

    fd = (total(xt.double() + h * direction) - total(xt.double() - h * direction)) / (2 * h)
    assert torch.isclose((grad * direction).sum(), fd, rtol=1e-4)


def test_scopes(cnn):
    assert resolve_scope(cnn, "last").modules == ("classifier",)
    everything = resolve_scope(cnn, "all")
    assert everything.size == sum(p.numel() for p in cnn.parameters())
    without_norm = resolve_scope(cnn, "all", exclude_norm=True)
    assert all("BatchNorm" not in type(dict(cnn.named_modules())[m]).__name__ for m in without_norm.modules)
    assert resolve_scope(cnn, "all", kinds=(nn.Linear, nn.Conv2d)).size < everything.size
    with pytest.raises(ConfigError, match="names no module"):
        resolve_scope(cnn, ["features.99"])
    with pytest.raises(ConfigError, match="expected 'last', 'all'"):
        resolve_scope(cnn, "everything")


def test_bad_inputs_end_in_one_clear_error(cnn, digits, tmp_path):
    sub = TrainingSet.from_tensors(*digits.tensors(range(60)))
    influence = ExactInfluence().fit(cnn, sub)
    with pytest.raises(ConfigError, match=r"query images of shape \(1, 9, 9\)"):
        influence.scores(torch.zeros(2, 1, 9, 9), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ConfigError, match=r"labels must lie in \[0, 10\)"):
        influence.scores(torch.zeros(2, 1, 8, 8), torch.tensor([0, 12]))
    with pytest.raises(SingularCurvatureError, match="singular or indefinite"):
        ExactInfluence(damping=0.0, curvature="ggn").fit(cnn, sub)  # softmax: the GGN has a null space
    with pytest.raises(ConfigError, match="at least 2"):
        TracIn([tmp_path / "one.ckpt"])
    with pytest.raises(ConfigError, match="max_parameters"):
        ExactInfluence(scope="all", max_parameters=1000).fit(cnn, sub)
    with pytest.raises(ConfigError, match="call fit"):
        ExactInfluence().scores(torch.zeros(1, 1, 8, 8), torch.zeros(1, dtype=torch.long))
    broken = copy.deepcopy(cnn)
    with torch.no_grad():
        broken.classifier.weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="non-finite"):
        ExactInfluence(damping=0.01).fit(broken, sub).scores(*digits.tensors(range(2)))
    with pytest.raises(RobustAttrError, match="learning_rates"):
        paths, _ = _checkpoints(cnn, digits, tmp_path, count=2)
        TracIn(paths).fit(cnn, sub)


@pytest.mark.slow
def test_train_py_checkpoints_give_their_training_split_and_learning_rates(tmp_path):
    from robustattr.cli import main as train

    summary = train(["--config", "configs/quickstart.yaml", "--trainer.max_epochs", "3", "--trainer.logger", "false",
                     "--trainer.default_root_dir", str(tmp_path), "--trainer.enable_progress_bar", "false",
                     "--trainer.callbacks", '[{"class_path": "pytorch_lightning.callbacks.ModelCheckpoint", '
                     '"init_args": {"save_top_k": -1, "every_n_epochs": 1}}]'])  # fmt: skip
    paths = sorted((tmp_path).rglob("epoch=*.ckpt"))
    assert len(paths) == 3
    exact = ExactInfluence().fit_checkpoint(str(paths[-1]))
    assert len(exact.train) == 1257 and exact.self_influence().values.shape == (1257,)
    train_set = TrainingSet.from_checkpoint(paths[-1])
    again = TrainingSet.from_checkpoint(paths[-1])
    assert torch.equal(train_set.tensors(range(20))[0], again.tensors(range(20))[0])  # no random augmentation
    from robustattr.checkpoint import load_classifier

    net = load_classifier(summary["checkpoint"]).net
    tracin = TracIn(paths).fit(net, train_set)
    assert len(tracin.learning_rates) == 3 and all(lr > 0 for lr in tracin.learning_rates)
    stored = torch.load(paths[0], weights_only=True)["optimizer_states"][0]["param_groups"][0]["lr"]
    assert tracin.learning_rates[0] == stored
    values = tracin.self_influence().values
    assert values.shape == (len(train_set),) and (values >= 0).all()


def test_backends_are_chosen_in_yaml_by_class_path():
    from jsonargparse import ArgumentParser

    from robustattr.influence import Influence

    parser = ArgumentParser()
    parser.add_argument("--influence", type=Influence)
    cfg = parser.parse_string(
        "influence:\n  class_path: robustattr.influence.CGInfluence\n"
        "  init_args: {scope: [features.9, classifier], damping: 0.001, curvature: hessian, dtype: float64}\n"
    )
    backend = parser.instantiate(cfg).influence
    assert isinstance(backend, CGInfluence) and backend.scope_spec == ["features.9", "classifier"]
    assert backend.dtype == torch.float64 and backend.damping == 0.001 and backend.curvature == "hessian"


# ---------------------------------------------------------------------------------------------------- DDP
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, cnn, train, paths, lrs, queue):
    import torch.distributed as dist

    # RANK/WORLD_SIZE as torchrun and Lightning set them: kronfluence reads its process layout from them (accelerate)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))  # fmt: skip
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        x, y = train.tensors(range(5))
        out = {}
        exact = ExactInfluence(batch_size=32).fit(cnn, train)
        out["exact_scores"] = exact.scores(x, y).values
        out["exact_self"] = exact.self_influence().values
        cg = CGInfluence(batch_size=32, rhs_batch=40, dtype=torch.float64).fit(cnn, train)
        out["cg_scores"] = cg.scores(x, y).values
        out["cg_self"] = cg.self_influence().values
        out["tracin_scores"] = TracIn(paths, learning_rates=lrs, batch_size=32).fit(cnn, train).scores(x, y).values
        ekfac = EKFACInfluence(batch_size=32).fit(cnn, train)
        # kronfluence shards across the group on CUDA only; on a CPU group every process computes everything
        assert ekfac.analyzer.state.num_processes == (world if torch.cuda.is_available() else 1)
        out["ekfac_scores"], out["ekfac_self"] = ekfac.scores(x, y).values, ekfac.self_influence().values
        queue.put((rank, {key: value.numpy().copy() for key, value in out.items()}))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_sharded_over_two_processes_equals_one_process(cnn, digits, tmp_path):
    paths, lrs = _checkpoints(cnn, digits, tmp_path, count=2)
    train = TrainingSet.from_tensors(*digits.tensors(range(101)))  # odd: the shards differ in size
    x, y = train.tensors(range(5))
    single = {}
    exact = ExactInfluence(batch_size=32).fit(cnn, train)
    single["exact_scores"], single["exact_self"] = exact.scores(x, y).values, exact.self_influence().values
    cg = CGInfluence(batch_size=32, rhs_batch=40, dtype=torch.float64).fit(cnn, train)
    single["cg_scores"], single["cg_self"] = cg.scores(x, y).values, cg.self_influence().values
    single["tracin_scores"] = TracIn(paths, learning_rates=lrs, batch_size=32).fit(cnn, train).scores(x, y).values
    ekfac = EKFACInfluence(batch_size=32).fit(cnn, train)
    single["ekfac_scores"], single["ekfac_self"] = ekfac.scores(x, y).values, ekfac.self_influence().values
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, 2, port, cnn, train, paths, lrs, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=300) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    for rank in (0, 1):
        for key, value in single.items():
            assert torch.allclose(torch.from_numpy(results[rank][key]).double(), value.double(), rtol=1e-5,
                                  atol=1e-5 * value.abs().max()), (rank, key)  # fmt: skip
