"""Threat models, and the contract every attack keeps: batched, seeded, inside the ball and the box, working
under no_grad / inference_mode, leaving modes, parameter gradients and BatchNorm statistics untouched."""

import math

import pytest
import torch
from torch import nn

from robustattr.attacks import (
    BIM,
    FGSM,
    LBFGS,
    PGD,
    L2Ball,
    LinfBall,
    MassCenterAttack,
    RandomSignAttack,
    SecondOrderZeroError,
    TargetedAttack,
    TargetMapAttack,
    TopKAttack,
    choose_target,
    shared_weight_copy,
    softplus_surrogate,
)
from robustattr.attacks.base import with_seed
from robustattr.attacks.explanation import (
    AdamDirection,
    AttackState,
    CleanExplanation,
    ExplanationAttack,
    Judge,
    LastEligible,
)
from robustattr.attributions import IntegratedGradients
from robustattr.errors import ConfigError
from robustattr.models import SmallCNN, count_activations


def test_linf_projection_and_random_start_stay_in_ball_and_box():
    x = torch.tensor([[0.0, 0.5, 1.0]])
    ball = LinfBall(0.1)
    torch.testing.assert_close(ball.project(torch.tensor([[-1.0, 0.9, 0.95]]), x), torch.tensor([[0.0, 0.6, 0.95]]))
    g = torch.Generator().manual_seed(0)
    x = torch.rand(64, 3, 8, 8, generator=g)
    start = ball.random_start(x, g)
    assert (start - x).abs().max() <= 0.1 + 1e-7 and start.min() >= 0 and start.max() <= 1
    assert ball.direction(torch.tensor([-2.0, 0.0, 3.0])).tolist() == [-1.0, 0.0, 1.0]


def test_l2_projection_random_start_and_unit_direction():
    ball = L2Ball(0.5)
    x = torch.full((4, 1, 4, 4), 0.5)
    far = x + torch.randn(x.shape)
    projected = ball.project(far, x)
    assert (ball.norm(projected - x) <= 0.5 + 1e-6).all()
    near = x + 0.01
    torch.testing.assert_close(ball.project(near, x), near)
    start = ball.random_start(x, torch.Generator().manual_seed(0))
    assert (ball.norm(start - x) <= 0.5 + 1e-6).all()
    torch.testing.assert_close(ball.norm(ball.direction(torch.randn(4, 1, 4, 4))), torch.ones(4))


@pytest.mark.parametrize("make", [lambda: LinfBall(-0.1), lambda: LinfBall(1.5), lambda: L2Ball(float("nan"))])
def test_impossible_epsilons_are_refused(make):
    with pytest.raises(ConfigError, match="eps"):
        make()


def test_with_eps_copies_and_scales_the_default_step():
    attack = PGD(LinfBall(8 / 255), steps=10)
    other = attack.with_eps(4 / 255)
    assert attack.threat.eps == 8 / 255 and other.threat.eps == 4 / 255
    assert other.step_size == pytest.approx(2.5 * (4 / 255) / 10)


def test_choose_target_modes():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0], [0.0, 5.0, 6.0, -1.0]])
    y = torch.tensor([0, 2])
    assert choose_target("least_likely", logits, y).tolist() == [3, 3]
    assert choose_target("runner_up", logits, y).tolist() == [1, 1]
    random = choose_target("random", logits.repeat(50, 1), y.repeat(50), torch.Generator().manual_seed(0))
    assert (random != y.repeat(50)).all() and len(set(random.tolist())) == 4
    assert choose_target("none", logits, y) is None


@pytest.fixture
def bn_net():
    torch.manual_seed(0)
    net = SmallCNN(width=8)
    net.train()  # the attacks must restore this, and must not touch BatchNorm statistics
    net.classifier.weight.grad = torch.ones_like(net.classifier.weight)  # must stay as it is
    return net


def _data(n=6):
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, 1, 8, 8, generator=g), torch.arange(n) % 10


ATTACKS = [
    FGSM(LinfBall(0.1)),
    BIM(LinfBall(0.1), steps=3, target="runner_up"),
    PGD(LinfBall(0.1), steps=3, restarts=2, early_stop=True),
    PGD(L2Ball(0.5), steps=3, target="random"),
    LBFGS(search_steps=2, max_iter=5),
    TopKAttack(threat=LinfBall(0.1), steps=2),
    MassCenterAttack(threat=LinfBall(0.1), steps=2, random_start=True, restarts=2),
    TargetedAttack(threat=LinfBall(0.1), steps=2),
    TargetMapAttack(threat=LinfBall(0.1), steps=2),
    TopKAttack(IntegratedGradients(steps=4), threat=LinfBall(0.1), steps=2),
    RandomSignAttack(threat=LinfBall(0.1)),
]


@pytest.mark.parametrize("attack", ATTACKS, ids=lambda a: repr(a)[:60])
@pytest.mark.parametrize("context", ["grad", "no_grad", "inference_mode"])
def test_attack_contract(bn_net, attack, context):
    x, y = _data()
    state = {k: v.clone() for k, v in bn_net.state_dict().items()}
    modes = [m.training for m in bn_net.modules()]
    grad_before = bn_net.classifier.weight.grad.clone()
    guard = {"grad": torch.enable_grad, "no_grad": torch.no_grad, "inference_mode": torch.inference_mode}[context]
    attack = with_seed(attack, 0)
    with guard():
        x_adv = attack(bn_net, x.clone(), y.clone())
    assert x_adv.shape == x.shape and not x_adv.requires_grad
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    if hasattr(attack, "threat"):
        assert (attack.threat.norm(x_adv - x) <= attack.threat.eps + 1e-5).all()
    assert [m.training for m in bn_net.modules()] == modes
    for key, value in bn_net.state_dict().items():
        assert torch.equal(value, state[key]), key  # BatchNorm running stats included
    assert torch.equal(bn_net.classifier.weight.grad, grad_before)
    assert all(p.grad is None for name, p in bn_net.named_parameters() if name != "classifier.weight")
    with guard():
        again = attack(bn_net, x.clone(), y.clone())
    assert torch.equal(again, x_adv)  # seeded


def test_surrogate_shares_weights_and_leaves_the_original_relu():
    net = SmallCNN(width=8)
    surrogate = softplus_surrogate(net, beta=10.0)
    assert count_activations(net) == 4 and count_activations(surrogate) == 0
    for (name, p), (_, q) in zip(net.named_parameters(), surrogate.named_parameters(), strict=True):
        assert p is q, name
    copy = shared_weight_copy(net)
    copy.classifier = nn.Identity()
    assert isinstance(net.classifier, nn.Linear)


def test_explanation_attack_without_surrogate_on_relu_raises_instead_of_doing_nothing():
    x, y = _data()
    with pytest.raises(SecondOrderZeroError, match="identically zero"):
        TopKAttack(threat=LinfBall(0.1), steps=2, beta=None)(SmallCNN(width=8).eval(), x, y)


def test_explanation_attack_on_smooth_net_needs_no_surrogate():
    x, y = _data()
    net = SmallCNN(width=8, activation=nn.Softplus).eval()
    result = TopKAttack(threat=LinfBall(0.1), steps=3, beta=None).run(net, x, y)
    assert result.kept.any() and not torch.equal(result.x_adv, x)


def test_lbfgs_refuses_untargeted_and_reports_rms_distortion(bn_net):
    with pytest.raises(ConfigError, match="targeted"):
        LBFGS(target="none")
    x, y = _data()
    result = LBFGS(search_steps=3, max_iter=20).run(bn_net.eval(), x, y)
    found = result.success
    rms = (result.x_adv - x).reshape(6, -1).pow(2).mean(1).sqrt()
    torch.testing.assert_close(result.distortion[found], rms[found])
    assert all(math.isnan(d) for d in result.distortion[~found].tolist())


def test_gradient_context_restores_requires_grad_flags():
    net = SmallCNN(width=8)
    net.classifier.bias.requires_grad_(False)
    before = [p.requires_grad for p in net.parameters()]
    BIM(LinfBall(0.1), steps=1)(net, *_data())
    assert [p.requires_grad for p in net.parameters()] == before


def test_mass_center_attack_moves_on_a_smooth_network():
    """At x itself the mass-center distance is at its minimum (zero gradient): the attack starts at random."""
    x, y = _data()
    net = SmallCNN(width=8, activation=nn.Softplus).eval()
    result = MassCenterAttack(threat=LinfBall(0.1), steps=3, beta=None).run(net, x, y)
    assert result.kept.any() and (result.score[result.kept] > 0).all()
    with pytest.raises(SecondOrderZeroError, match="random_start"):
        MassCenterAttack(threat=LinfBall(0.1), steps=3, beta=None, random_start=False)(net, x, y)


def test_adam_direction_is_torch_adam_at_unit_rate_and_matches_the_closed_form():
    """TargetMapAttack's optimiser: torch.optim.Adam's bias-corrected step, read off a zeroed parameter so the
    attack keeps its per-sample step size; checked against Adam's closed form over a few steps."""
    torch.manual_seed(0)
    grads = [torch.randn(3, 1, 4, 4) for _ in range(4)]
    adam = AdamDirection(grads[0])
    m, v = torch.zeros_like(grads[0]), torch.zeros_like(grads[0])
    for t, g in enumerate(grads, start=1):
        m, v = 0.9 * m + 0.1 * g, 0.999 * v + 0.001 * g * g
        expected = (m / (1 - 0.9**t)) / ((v / (1 - 0.999**t)).sqrt() + 1e-8)
        torch.testing.assert_close(adam(g), expected)
    assert isinstance(adam.optimizer, torch.optim.Adam)


def test_target_map_restarts_begin_with_fresh_adam_moments():
    x, y = _data()
    net = SmallCNN(width=8, activation=nn.Softplus).eval()
    attack = TargetMapAttack(threat=LinfBall(0.1), steps=2, beta=None, restarts=2, random_start=True, seed=0)
    states = []
    init_state = attack.init_state
    attack.init_state = lambda clean: states.append(init_state(clean)) or states[-1]
    attack.run(net, x, y)
    assert len(states) == 2 and states[0].adam is not states[1].adam
    assert [state.adam.optimizer.state[state.adam.param]["step"].item() for state in states] == [2, 2]


def test_the_judge_keeps_the_best_eligible_iterate_and_the_random_walk_the_last():
    clean = CleanExplanation(torch.zeros(3, 1, 2, 2), torch.tensor([0, 1, 2]), torch.eye(3), torch.zeros(3, 2, 2), 1)
    best, last = Judge(clean), LastEligible(clean)
    wrong_label = torch.eye(3)[[1, 1, 1]]  # only sample 1 keeps its label
    for x_value, logits, score in [(1.0, torch.eye(3), [0.5, 0.5, 0.5]), (2.0, torch.eye(3), [0.1, 0.9, 0.2]),
                                   (3.0, wrong_label, [9.0, 9.0, 9.0])]:  # fmt: skip
        for judge in (best, last):
            judge.observe(
                torch.full((3, 1, 2, 2), x_value), torch.full((3, 2, 2), x_value), logits, torch.tensor(score)
            )
    kept_best, kept_last = (
        best.result(torch.device("cpu"), torch.float32),
        last.result(torch.device("cpu"), torch.float32),
    )
    assert kept_best.x_adv[:, 0, 0, 0].tolist() == [1.0, 3.0, 1.0]
    assert kept_best.score.tolist() == [0.5, 9.0, 0.5]
    assert kept_last.x_adv[:, 0, 0, 0].tolist() == [2.0, 3.0, 2.0]
    assert kept_best.kept.all() and kept_last.kept.all()


def test_a_new_explanation_attack_is_a_state_an_objective_and_a_score():
    """The loop, the surrogate, the projection and the judge are shared: an attack that pushes attribution mass
    into the image's centre pixels needs only its typed state, objective and score."""

    class CentreState(AttackState):
        def __init__(self, clean):
            super().__init__(clean)
            self.mask = torch.zeros(clean.maps.shape[1:])
            self.mask[3:5, 3:5] = 1

    class CentreAttack(ExplanationAttack[CentreState]):
        def init_state(self, clean):
            return CentreState(clean)

        def objective(self, maps, logits, state):
            return (maps * state.mask).sum(dim=(1, 2))

        def score(self, maps, state):
            return (maps * state.mask).sum(dim=(1, 2)) / maps.sum(dim=(1, 2))

    x, y = _data()
    net = SmallCNN(width=8).eval()  # ReLU: the shared loop attacks through the softplus surrogate
    result = CentreAttack(threat=LinfBall(0.1), steps=5).run(net, x, y)
    before = CentreAttack(threat=LinfBall(0.1), steps=5).score(result.maps_clean, CentreState(
        CleanExplanation(x, result.target, None, result.maps_clean, 1)))  # fmt: skip
    assert result.kept.any()
    assert (result.score[result.kept] > before[result.kept]).all()
    assert (result.x_adv - x).abs().max() <= 0.1 + 1e-6
