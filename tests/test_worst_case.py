"""The worst-case explanation attack: never weaker than any member on any sample, finds a planted weakness the
fixed-step attack misses, attacks stochastic explanations honestly (EOT, unseen measurement draws), and says when
its own number cannot be trusted (convergence and sanity flags)."""

from functools import partial

import numpy as np
import pytest
import torch
from torch import nn

from robustattr.attacks import (
    L2Ball,
    LinfBall,
    MassCenterAttack,
    RandomSignAttack,
    ThreatModel,
    TopKAttack,
    WorstCaseExplanationAttack,
    default_members,
    raised,
    sanity_checks,
)
from robustattr.attacks.explanation import AttackDiagnostics, damage_to_metric, pixel_map
from robustattr.attacks.worst_case import WorstCaseResult
from robustattr.attributions import Saliency, SmoothGrad
from robustattr.errors import ConfigError
from robustattr.metrics.functional import topk_intersection
from robustattr.models import SmallCNN

EPS = 8 / 255
TOP, TRAP = (0, 1), (2, 3)


class Planted(nn.Module):
    """A 4x4 one-channel "network" with a known weakness inside the 8/255 ball.

    The logit of class 0 is ``sum_i s(v_i) x[TOP_i] + c sum x[4:]`` with ``v_i = (x[TRAP_i] - 0.5) / eps``: the
    saliency of the two top pixels (k = 2 of 16) is s(v), of the others c = 0.6. At the clean point (v = 0) the
    gradient of s points to a local minimum s(-0.25) = 0.99 > c, so a gradient attack from the clean point drains
    no top-k pixel; across the ball, at v = +1, s = 0.23 < c and both top pixels leave the top-k. Class 1 is a
    constant far below, so every perturbation keeps the label."""

    p, q, slope, c = -0.25, 0.1, 2.0, 0.6

    def s(self, v):
        return 1 + self.slope * (-(v**3) / 3 + (self.p + self.q) * v**2 / 2 - self.p * self.q * v)

    def forward(self, x):
        x = x.flatten(1)
        v = (x[:, list(TRAP)] - 0.5) / EPS
        f = (self.s(v) * x[:, list(TOP)]).sum(1) + self.c * x[:, 4:].sum(1)
        return torch.stack([f, torch.full_like(f, -10.0)], 1)


def planted_data(n=32):
    g = torch.Generator().manual_seed(0)
    x = 0.2 + 0.6 * torch.rand(n, 1, 4, 4, generator=g)
    x.view(n, -1)[:, list(TOP)] = 0.02 + 0.06 * torch.rand(n, 2, generator=g)
    x.view(n, -1)[:, list(TRAP)] = 0.5
    return x


def maps_of(net, x, attribution=None):
    attribution = attribution or Saliency()
    target = net(x).argmax(dim=1)
    return pixel_map(attribution.attribute_and_logits(net, x, target)[0])


def test_the_ensemble_finds_a_planted_weakness_that_the_fixed_step_attack_misses():
    net, x = Planted(), planted_data()
    planted = x.clone()
    planted.view(len(x), -1)[:, list(TRAP)] += EPS  # the known perturbation, on the ball's boundary
    assert topk_intersection(maps_of(net, x), maps_of(net, planted), 2).max() == 0  # it breaks the top-k
    for steps in (10, 100):  # the audit's fixed-step attack, and ten times its budget
        fixed = TopKAttack(threat=LinfBall(EPS), steps=steps, seed=0).run(net, x)
        assert fixed.kept.all() and torch.equal(fixed.score, torch.zeros(len(x)))  # intersection 1 everywhere
    result = WorstCaseExplanationAttack(threat=LinfBall(EPS), steps=20, restarts=2, seed=0).run(net, x)
    assert result.kept.all() and result.values.max() == 0  # every sample broken
    assert ((result.x_adv - x).abs() <= EPS + 1e-6).all()
    torch.testing.assert_close(topk_intersection(maps_of(net, x), maps_of(net, result.x_adv), 2), result.values)
    # samples at the metric's floor are not attacked again: the later members ran on none of them
    assert result.runs[0]["member"] == "random_sign" and result.runs[0]["samples"] == len(x)
    assert len(result.runs) < len(WorstCaseExplanationAttack(steps=20, restarts=2).plan(False))


@pytest.fixture
def relu_net():
    torch.manual_seed(0)
    return SmallCNN(width=8).eval()


def test_the_ensemble_is_never_weaker_than_any_member_run_alone_on_any_sample(relu_net):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(12, 1, 8, 8, generator=g)
    attack = WorstCaseExplanationAttack(threat=LinfBall(0.1), steps=6, restarts=2, betas=[10, 3], seed=0)
    result = attack.run(relu_net, x)
    plan = attack.plan(kinked=True)
    assert {name for name, _, _ in plan} == set(result.members)
    assert len(plan) == 1 + 2 * 3 * 2  # random sign once; three gradient members, two betas, two rounds
    dominated = 0
    for name, _, member in plan:
        alone = member.run(relu_net, x)
        value = damage_to_metric("topk_intersection", alone.score)
        both = alone.kept & result.kept
        assert not (alone.kept & ~result.kept).any(), name  # a member that kept the label, the ensemble did too
        assert (result.values[both] <= value[both] + 1e-6).all(), name
        dominated += int(both.sum())
        if name == "random_sign":  # run first, on every sample: its record in the ensemble is what it finds alone
            torch.testing.assert_close(result.members[name], value, equal_nan=True)
    assert dominated > 0
    # the ensemble's convergence curve: worst so far, never rising, ending at its mean
    budget, curve = result.curve()
    assert len(budget) == len(curve) == result.trace.shape[0]
    assert curve[0] == 1.0 and np.all(np.diff(curve) <= 1e-7)
    assert curve[-1] == pytest.approx(float(result.values[result.kept].mean()), abs=1e-6)
    assert attack.budget(kinked=True) == sum(m.steps * m.restarts for _, _, m in plan)


def test_seeded_and_independent_of_which_samples_share_the_batch(relu_net):
    g = torch.Generator().manual_seed(1)
    x = torch.rand(10, 1, 8, 8, generator=g)
    attack = WorstCaseExplanationAttack(threat=LinfBall(0.1), steps=4, restarts=1, betas=[10], seed=3)
    a, b = attack.run(relu_net, x), attack.run(relu_net, x)
    assert torch.equal(a.x_adv, b.x_adv) and torch.equal(
        a.values,
        b.values,
    )
    part = attack.run(relu_net, x[:4])
    # a sample's random start and signs are drawn per position in the batch: the first four agree
    torch.testing.assert_close(part.values, a.values[:4], equal_nan=True)
    rows = torch.tensor([1, 5, 7])
    member = TopKAttack(threat=LinfBall(0.1), steps=4, random_start=True, seed=2, step_rule="apgd", beta=10)
    whole, some = member.run(relu_net, x), member.run(relu_net, x, rows=rows)
    torch.testing.assert_close(some.x_adv, whole.x_adv[rows])


def test_adaptive_step_stays_in_the_ball_and_is_at_least_as_strong_as_fixed_steps_here(relu_net):
    g = torch.Generator().manual_seed(2)
    x = torch.rand(16, 1, 8, 8, generator=g)
    fixed = TopKAttack(threat=LinfBall(0.1), steps=20, seed=0, beta=10, metric="topk_intersection").run(relu_net, x)
    apgd = TopKAttack(
        threat=LinfBall(0.1), steps=20, seed=0, beta=10, metric="topk_intersection", step_rule="apgd"
    ).run(relu_net, x)
    assert ((apgd.x_adv - x).abs() <= 0.1 + 1e-6).all() and apgd.x_adv.min() >= 0 and apgd.x_adv.max() <= 1
    topk = {name: 1 - r.score[r.kept].mean() for name, r in (("fixed", fixed), ("apgd", apgd))}
    assert topk["apgd"] <= topk["fixed"] + 0.02, topk
    assert "apgd" in repr(TopKAttack(step_rule="apgd")) and "metric=spearman" in repr(TopKAttack(metric="spearman"))


def test_stochastic_explanations_are_attacked_with_fresh_noise_and_measured_with_an_unseen_draw():
    # SmoothGrad with two noise samples on a smooth CNN: one frozen draw is easy to overfit.
    torch.manual_seed(0)
    net = SmallCNN(width=8, activation=partial(nn.Softplus, beta=10)).eval()
    x = torch.rand(128, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    method = SmoothGrad(samples=2, sigma=0.3)
    assert torch.equal(maps_of(net, x, method), maps_of(net, x, method))  # seeded: the same draw on every call

    def reported_and_remeasured(fresh_noise):
        r = TopKAttack(method, threat=LinfBall(0.1), steps=20, seed=0, fresh_noise=fresh_noise).run(net, x)
        reported = float(topk_intersection(r.maps_clean, r.maps_adv, 8).mean())
        remeasured = []
        for seed in (2, 3, 4):  # draws no step, no judge and no report used
            other = method.reseeded(seed)
            remeasured.append(float(topk_intersection(maps_of(net, x, other), maps_of(net, r.x_adv, other), 8).mean()))
        return reported, float(np.mean(remeasured))

    frozen_reported, frozen_true = reported_and_remeasured(False)
    assert frozen_reported < frozen_true - 0.2  # reusing the attacked draw makes the method look fragile
    eot_reported, eot_true = reported_and_remeasured(True)
    assert abs(eot_reported - eot_true) < 0.04  # EOT's report is what a fresh draw measures
    # the ensemble measures stochastic methods the same way
    result = WorstCaseExplanationAttack(method, threat=LinfBall(0.1), steps=5, restarts=1, seed=0).run(net, x[:32])
    torch.testing.assert_close(result.maps_clean, maps_of(net, x[:32], method))
    torch.testing.assert_close(result.values, topk_intersection(result.maps_clean, result.maps_adv, 8).float())


def _synthetic(trace, members=None, kept=None, diagnostics=None):
    trace = torch.tensor(trace, dtype=torch.float32)
    n = trace.shape[1]
    kept = torch.ones(n, dtype=torch.bool) if kept is None else torch.tensor(kept)
    zeros = torch.zeros(n, 1, 2, 2)
    return WorstCaseResult(
        x_adv=zeros,
        kept=kept,
        score=1 - trace[-1],
        target=torch.zeros(n, dtype=torch.long),
        maps_clean=zeros[:, 0],
        maps_adv=zeros[:, 0],
        diagnostics=diagnostics,
        values=trace[-1],
        members=members or {},
        budget=torch.arange(len(trace)),
        trace=trace,
        runs=[{"member": "topk", "steps": len(trace) - 1, "rows": (0, len(trace) - 1)}],
    )


def test_converged_is_false_when_the_last_quarter_of_the_budget_still_moved_the_mean():
    flat_end = _synthetic([[1.0, 1.0], [0.6, 0.7], [0.55, 0.6], [0.55, 0.6], [0.55, 0.6]])
    assert flat_end.converged(0.01) and flat_end.last_quarter_gains()["budget"] == 0
    still_falling = _synthetic([[1.0, 1.0], [0.9, 0.9], [0.8, 0.8], [0.7, 0.7], [0.6, 0.6]])
    assert not still_falling.converged(0.01) and still_falling.converged(0.2)
    assert still_falling.last_quarter_gains()["budget"] == pytest.approx(0.1)
    checks = sanity_checks(still_falling)
    assert checks["not_converged"].raised and "0.1" in checks["not_converged"].message


def test_sanity_flags_have_known_answers():
    rng = np.random.default_rng(0)
    weak = torch.tensor(rng.uniform(0.5, 0.9, size=64), dtype=torch.float32)
    trace = [[1.0] * 64, weak.tolist(), weak.tolist(), weak.tolist(), weak.tolist()]
    diag = AttackDiagnostics(*[torch.tensor(v) for v in (100, 20, 50, 30)])
    # the gradient member is no better than random signs; 20% zero gradients; the surrogate agreed 60% of the time
    same = _synthetic(trace, {"random_sign": weak, "topk@beta10": weak + 0.001}, diagnostics=diag)
    checks = sanity_checks(same)
    assert set(raised(checks)) == {"random_sign_as_strong", "vanishing_gradients", "surrogate_disagrees"}
    assert checks["vanishing_gradients"].value == pytest.approx(0.2)
    assert checks["surrogate_disagrees"].value == pytest.approx(0.6)
    strong = _synthetic(
        trace,
        {"random_sign": weak + 0.2, "topk@beta10": weak},
        kept=[True] * 16 + [False] * 48,
        diagnostics=AttackDiagnostics.empty(torch.device("cpu")),
    )
    checks = sanity_checks(strong)
    assert not checks["random_sign_as_strong"].raised and checks["few_kept"].raised
    assert checks["few_kept"].value == 0.25 and "surrogate_disagrees" not in checks  # no surrogate was used


def test_real_run_reports_its_checks(relu_net):
    x = torch.rand(16, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    result = WorstCaseExplanationAttack(threat=LinfBall(0.1), steps=8, restarts=1, betas=[10], seed=0).run(relu_net, x)
    checks = sanity_checks(result)
    assert set(checks) == {
        "not_converged",
        "random_sign_as_strong",
        "few_kept",
        "vanishing_gradients",
        "surrogate_disagrees",
    }
    assert checks["few_kept"].value == float(result.kept.float().mean())
    assert 0 <= checks["surrogate_disagrees"].value <= 1 and checks["vanishing_gradients"].value < 0.05
    for check in checks.values():
        assert set(check.as_dict()) == {"raised", "value", "threshold", "message"}


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: WorstCaseExplanationAttack(metric="topk"), "not a registered map metric"),
        (lambda: WorstCaseExplanationAttack(tracked=["nope"]), "not a registered map metric"),
        (lambda: WorstCaseExplanationAttack(betas=[0.0]), "betas must be positive"),
        (lambda: WorstCaseExplanationAttack(members=[]), "non-empty list"),
        (lambda: WorstCaseExplanationAttack(members=[TopKAttack(), TopKAttack()]), "repeat"),
        (lambda: WorstCaseExplanationAttack(threat=ThreatModel(0.5)), "L-infinity or an L2 ball"),
        (lambda: WorstCaseExplanationAttack(steps=0), "steps"),
        (lambda: TopKAttack(step_rule="adam"), "step_rule"),
        (lambda: RandomSignAttack(metric="nope"), "not a registered map metric"),
    ],
)
def test_bad_settings_are_refused_with_a_named_reason(make, match):
    with pytest.raises(ConfigError, match=match):
        make()


def test_members_and_budget_are_arguments_with_a_readable_repr():
    attack = WorstCaseExplanationAttack(members=[RandomSignAttack(), MassCenterAttack()], steps=7, restarts=3)
    assert [m.short_name for m in default_members()] == ["random_sign", "topk", "mass_center", "targeted"]
    assert attack.budget(kinked=False) == 1 + 7 * 3  # random sign: its one step of size eps; one run per round
    assert attack.budget(kinked=True) == 1 + 7 * 3 * 2
    text = repr(attack)
    assert "members=[random_sign, mass_center]" in text and "steps=7" in text and "restarts=3" in text


def test_an_l2_ensemble_stays_in_its_ball_and_its_random_member_steps_onto_the_sphere():
    net, x = Planted(), planted_data()
    radius = 0.3
    result = WorstCaseExplanationAttack(threat=L2Ball(radius), steps=8, restarts=1, seed=0).run(net, x)
    assert ((result.x_adv - x).flatten(1).norm(dim=1) <= radius + 1e-5).all()
    assert (result.values <= result.members["random_sign"] + 1e-6).all()  # never weaker than a member
    mid = 0.4 + 0.2 * torch.rand(x.shape, generator=torch.Generator().manual_seed(0))  # far from the box's faces
    random = RandomSignAttack(threat=L2Ball(radius), seed=0).run(net, mid)
    step = (random.x_adv - mid).flatten(1).norm(dim=1)
    assert random.kept.any() and torch.allclose(step[random.kept], torch.full_like(step[random.kept], radius))
