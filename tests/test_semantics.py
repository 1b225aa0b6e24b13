"""Attacks and objectives mean what their papers mean: fresh randomness by default, faithful smooth surrogates,
independent L-BFGS runs per sample, and every attack, attribution, metric and callback for any batch size."""

import numpy as np
import pytest
import pytorch_lightning as pl
import scipy.stats
import torch
from torch import nn

from robustattr import attacks as A
from robustattr.attacks.base import with_seed
from robustattr.attributions import (
    GradientShap,
    SmoothGrad,
    UniformGradient,
)
from robustattr.callbacks import AdversarialValidation, AttributionPanels, CurvatureMonitor, FragilityValidation
from robustattr.data import DigitsDataModule
from robustattr.metrics import (
    CenterShift,
    CosineDistance,
    KendallTau,
    LabelKeptRate,
    SpearmanCorrelation,
    TopKIntersection,
    center_shift,
    cosine_distance,
    kendall_tau,
    pixel_map,
    spearman,
    topk_intersection,
)
from robustattr.models import SmallCNN, is_piecewise_linear, needs_smooth_surrogate, smooth_twin
from robustattr.module import RobustClassifier
from robustattr.regularizers import AdversarialCE
from tests.helpers.zoo import every_attack, every_attribution


def _data(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 8, 8, generator=g), torch.arange(n) % 10


# -- 1. fresh randomness by default, seeds where injected ---------------------------------------------------------
@pytest.mark.parametrize(
    "attack",
    [A.PGD(A.LinfBall(0.1), steps=2), A.PGD(A.L2Ball(0.5), steps=2), A.PGD(A.LinfBall(0.1), steps=1, step_size=0.125),
     A.BIM(A.LinfBall(0.1), steps=1, target="random"), A.MassCenterAttack(threat=A.LinfBall(0.1), steps=1),
     A.RandomSignAttack(threat=A.LinfBall(0.1))],
    ids=lambda a: repr(a)[:50],
)  # fmt: skip
def test_default_attacks_draw_fresh_randomness_and_seeded_ones_repeat(attack):
    net = SmallCNN(width=4).eval()
    x, y = _data()
    first, second = attack(net, x, y), attack(net, x, y)
    assert not torch.equal(first, second)  # e.g. PGD's random start: a new one on every call
    seeded = with_seed(attack, 3)
    assert torch.equal(seeded(net, x, y), seeded(net, x, y))
    pl.seed_everything(7)
    again = attack(net, x, y)
    pl.seed_everything(7)
    assert torch.equal(attack(net, x, y), again)  # reproducible under the run's seed


def test_adversarial_training_draws_a_new_start_every_step():
    """Fast FGSM-RS as its docstring writes it, and the default PGD-AT: every call a new random start."""
    net = SmallCNN(width=4).eval()
    x, y = _data(4)
    for term in (AdversarialCE(attack=A.PGD(steps=1, step_size=1.25 * 8 / 255)), AdversarialCE()):
        term.prepare(net, x, y)
        first = term._x_adv
        term.prepare(net, x, y)
        assert not torch.equal(first, term._x_adv)


def test_callbacks_stay_reproducible_with_random_attacks(tmp_path):
    pl.seed_everything(0)
    module = RobustClassifier(SmallCNN(width=4))

    def validate():
        callback = AdversarialValidation(attacks=[A.PGD(steps=2)], epsilons=[0.1], num_samples=24, batch_size=8)
        trainer = pl.Trainer(logger=False, enable_progress_bar=False, callbacks=[callback], default_root_dir=tmp_path)
        return trainer.validate(module, datamodule=DigitsDataModule(), verbose=False)[0]["val/adv/pgd_linf25.5/acc"]

    assert validate() == validate()


# -- 2. smooth twins converge to the activations they stand in for ------------------------------------------------
def _timm_activations():
    from timm.layers import activations as timm_act
    from timm.layers import activations_me as timm_me

    return [timm_act.HardSigmoid(), timm_act.HardSwish(), timm_act.HardMish(), timm_act.PReLU(),
            timm_me.HardSigmoidMe(), timm_me.HardSwishMe(), timm_me.HardMishMe()]  # fmt: skip


def _kinked():
    prelu = nn.PReLU(num_parameters=4)
    with torch.no_grad():
        prelu.weight.copy_(torch.tensor([0.1, -0.2, 0.5, 1.5]))
    return [nn.ReLU(), nn.ReLU(inplace=True), nn.LeakyReLU(0.2), prelu, nn.RReLU().eval(), nn.ReLU6(),
            nn.Hardtanh(-2.0, 3.0), nn.Hardsigmoid(), nn.Hardswish(), *_timm_activations()]  # fmt: skip


@pytest.mark.parametrize(
    "activation", _kinked(), ids=lambda m: f"{type(m).__module__.split('.')[0]}.{type(m).__name__}"
)
def test_every_smooth_twin_converges_to_its_activation(activation):
    x = torch.linspace(-8, 8, 1601).view(1, 1, -1).expand(2, 4, -1).contiguous()
    target = activation(x.clone())
    errors = [(smooth_twin(activation, beta)(x) - target).abs().max().item() for beta in (10.0, 100.0, 1000.0)]
    assert errors[0] > errors[1] > errors[2] and errors[2] < 2e-3, errors


@pytest.mark.parametrize("activation", _kinked(), ids=lambda m: type(m).__name__)
def test_a_surrogate_network_converges_to_the_network(activation):
    torch.manual_seed(0)
    factory = (lambda: nn.PReLU()) if isinstance(activation, nn.PReLU) else (lambda: activation)
    net = SmallCNN(width=4, activation=factory).double().eval()
    x = torch.rand(5, 1, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        out = net(x)
        errors = [(A.softplus_surrogate(net, beta)(x) - out).abs().max().item() for beta in (10.0, 100.0, 1000.0)]
    assert errors[0] > errors[2] and errors[2] < 1e-2 * out.abs().max().item(), errors


def test_hardswish_is_kinked_but_not_piecewise_linear():
    relu, hardswish = SmallCNN(), SmallCNN(activation=nn.Hardswish)
    assert is_piecewise_linear(relu) and needs_smooth_surrogate(relu)
    assert not is_piecewise_linear(hardswish) and needs_smooth_surrogate(hardswish)
    assert not is_piecewise_linear(SmallCNN(activation=nn.Softplus)) and not needs_smooth_surrogate(
        SmallCNN(activation=nn.Softplus)
    )


def test_curvature_warning_no_longer_calls_hardswish_piecewise_linear():
    from robustattr.regularizers import SSR

    module = RobustClassifier(SmallCNN(activation=nn.Hardswish), terms=[SSR()])
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        module._check_terms("32-true")  # no "piecewise-linear" warning for a curved activation


# -- 4. L-BFGS: a sample's result does not depend on its batch ----------------------------------------------------
def test_lbfgs_samples_are_independent_of_their_batch():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10)).double().eval()
    with torch.no_grad():
        net[1].weight.mul_(8)  # a responsive network, so that targets are reachable
    x, _ = _data(5)
    x = x.double()
    with torch.no_grad():
        logits = net(x)
    y = logits.argmax(dim=1)
    target = logits.scatter(1, y[:, None], float("-inf")).argmax(dim=1)  # the runner-up: reachable
    attack = A.LBFGS(search_steps=3, max_iter=15, c_init=0.01)
    alone = attack.run(net, x[:1], y[:1], target[:1])
    with_others = attack.run(net, x, y, target)
    with_one_other = attack.run(net, x[[0, 4]], y[[0, 4]], target[[0, 4]])
    assert with_others.success.any()
    for other in (with_others, with_one_other):
        torch.testing.assert_close(other.x_adv[:1], alone.x_adv, rtol=1e-9, atol=1e-9)
        assert other.c[0].item() == alone.c[0].item() or (other.c[0].isnan() and alone.c[0].isnan())


# -- 5. batches of one and three ----------------------------------------------------------------------------------
ATTACKS_AND_ATTRIBUTIONS = [
    *every_attack(0.1, l2_eps=0.5, lbfgs_search_steps=2, lbfgs_max_iter=5),
    *every_attribution(samples=4),
]
# These draw random numbers for the whole batch (starts, noise): on a batch of one they draw others.
SHARED_RANDOMNESS = (A.PGD, A.LBFGS, A.MassCenterAttack, A.RandomSignAttack, SmoothGrad, UniformGradient, GradientShap)


@pytest.mark.parametrize(
    "fn", ATTACKS_AND_ATTRIBUTIONS, ids=lambda f: type(f).__name__ + repr(getattr(f, "threat", ""))
)
def test_every_attack_and_attribution_gives_per_sample_results_on_batches_of_one_and_three(fn):
    torch.manual_seed(0)
    net = SmallCNN(width=4).eval()
    x, y = _data(3)
    three = fn(net, x, y)
    ones = torch.cat([fn(net, x[i : i + 1], y[i : i + 1]) for i in range(3)])
    assert three.shape == ones.shape == x.shape
    if not isinstance(fn, SHARED_RANDOMNESS):  # the same computation per sample: the same per-sample result
        torch.testing.assert_close(three, ones, rtol=0, atol=1e-6)


def test_target_map_attack_targets_a_function_of_the_sample_alone():
    net = SmallCNN(width=4).eval()
    x, y = _data(3)
    attack = A.TargetMapAttack(threat=A.LinfBall(0.1), steps=3)
    one = attack.run(net, x[:1], y[:1])  # used to fail: a single image was its own target (zero gradient)
    three = attack.run(net, x, y)
    torch.testing.assert_close(three.maps_adv[:1], one.maps_adv, rtol=0, atol=1e-5)


FUNCTIONS = [lambda a, b: topk_intersection(a, b, 8), spearman, kendall_tau, center_shift, cosine_distance]
CLASSES = [lambda: TopKIntersection(k=8), SpearmanCorrelation, KendallTau, CenterShift, CosineDistance]


def test_every_metric_on_one_map_and_on_three():
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(3, 8, 8, generator=g), torch.rand(3, 8, 8, generator=g)
    b[1] = a[1]
    for fn, make in zip(FUNCTIONS, CLASSES, strict=True):
        three = fn(a, b)
        ones = torch.cat([fn(a[i : i + 1], b[i : i + 1]) for i in range(3)])
        torch.testing.assert_close(three, ones)
        metric = make()
        for i in range(3):
            metric.update(a[i : i + 1], b[i : i + 1], torch.tensor([True]))
        torch.testing.assert_close(metric.compute(), three.mean())
    kept = LabelKeptRate()
    kept.update(torch.tensor([True]))
    assert kept.compute() == 1.0


@pytest.mark.parametrize("ties", [False, True])
def test_rank_correlations_equal_scipy_for_one_large_map(ties):
    """224 x 224 maps: the pairwise Kendall of torchmetrics took minutes (and failed on one map)."""
    g = torch.Generator().manual_seed(0)
    a = torch.rand(1, 224, 224, generator=g)
    b = a + 0.2 * torch.rand(1, 224, 224, generator=g)
    if ties:
        a, b = (a * 20).round(), (b * 10).round()
    flat_a, flat_b = a.flatten().double().numpy(), b.flatten().double().numpy()
    assert kendall_tau(a, b).item() == pytest.approx(scipy.stats.kendalltau(flat_a, flat_b).statistic, abs=1e-6)
    assert spearman(a, b).item() == pytest.approx(scipy.stats.spearmanr(flat_a, flat_b).statistic, abs=1e-6)


def test_constant_maps_give_nan_as_scipy_does():
    constant, other = torch.ones(1, 4, 4), torch.rand(1, 4, 4)
    assert np.isnan(kendall_tau(constant, other).item()) and np.isnan(spearman(constant, other).item())
    assert pixel_map(torch.zeros(1, 1, 4, 4)).sum() == 0


def test_every_callback_runs_with_chunks_of_one_and_three_and_gets_the_same_numbers(tmp_path):
    pl.seed_everything(0)
    module = RobustClassifier(SmallCNN(width=4))
    deterministic = ["val/adv/bim_linf25.5/acc", "val/frag/saliency/topk_linf8/kendall",
                     "val/frag/saliency/target_map_linf8/spearman", "val/curv/grad_norm"]  # fmt: skip

    def validate(batch_size):
        callbacks = [
            AdversarialValidation(attacks=[A.BIM(steps=2)], epsilons=[0.1], num_samples=5, batch_size=batch_size),
            FragilityValidation(attacks=[A.TopKAttack(steps=2), A.TargetMapAttack(steps=2)], num_samples=5,
                                batch_size=batch_size),
            CurvatureMonitor(num_samples=5, batch_size=batch_size, power_iters=2),
            AttributionPanels(attack=A.TopKAttack(steps=2), num_examples=batch_size),
        ]  # fmt: skip
        trainer = pl.Trainer(logger=False, enable_progress_bar=False, callbacks=callbacks, default_root_dir=tmp_path)
        (results,) = trainer.validate(module, datamodule=DigitsDataModule(), verbose=False)
        return {name: results[name] for name in deterministic}

    ones, threes = validate(1), validate(3)
    assert all(np.isfinite(v) for v in ones.values())
    for name in deterministic[:3]:  # the per-sample work does not depend on the chunking
        assert ones[name] == pytest.approx(threes[name], abs=1e-5), name
