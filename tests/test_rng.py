"""Per-sample random numbers (robustattr.rng): with one seed per row, a sample's result depends on its seed
only, not on the batch it is attacked in, its position there or its batch-mates: what lets the audit deal its
samples to any number of processes and batch them as each device likes with the same numbers."""

import copy
from functools import partial

import pytest
import torch
from torch import nn

from robustattr import attacks as A
from robustattr.attacks import WorstCaseExplanationAttack
from robustattr.attacks.base import choose_target, with_seed
from robustattr.attributions import GradientShap, Saliency, SmoothGrad, UniformGradient
from robustattr.audit.distributed import Shard
from robustattr.audit.sections import AuditData
from robustattr.certify import NoiseSmoothed
from robustattr.metrics import top_hessian_eigenvalue
from robustattr.models import SmallCNN
from robustattr.rng import SampleGenerator, derive, generator_for, integers, mix, normal, offset, select, uniform

SEEDS = tuple(mix(0, 0, i, 0) for i in range(6))
ROWS = [4, 1, 3]  # a sub-batch, out of order


@pytest.fixture(scope="module")
def relu_net():
    torch.manual_seed(0)
    return SmallCNN(width=8).eval()


@pytest.fixture(scope="module")
def smooth_net():
    torch.manual_seed(1)
    return SmallCNN(width=8, activation=partial(nn.Softplus, beta=10)).eval()


@pytest.fixture(scope="module")
def x():
    return torch.rand(6, 1, 8, 8, generator=torch.Generator().manual_seed(3))


def test_each_row_draws_from_its_own_generator():
    g = SampleGenerator(SEEDS[:3])
    drawn = g.randn((3, 2, 5))
    for i, s in enumerate(SEEDS[:3]):
        assert torch.equal(drawn[i], torch.randn((2, 5), generator=torch.Generator().manual_seed(s)))
    along = SampleGenerator(SEEDS[:3]).rand((4, 3, 2), dim=1)  # the sample axis second: (points, samples, ...)
    for i, s in enumerate(SEEDS[:3]):
        assert torch.equal(along[:, i], torch.rand((4, 2), generator=torch.Generator().manual_seed(s)))
    ints = integers(0, 10, (3, 7), SampleGenerator(SEEDS[:3]), "cpu")
    assert ints.shape == (3, 7) and int(ints.min()) >= 0 and int(ints.max()) < 10
    with pytest.raises(ValueError, match="needs 4 generators"):
        g.rand((4, 2))


def test_rows_share_the_generators_state():
    g = SampleGenerator(SEEDS[:4])
    first = g.rows([2]).rand((1, 3))
    second = g.rows([2]).rand((1, 3))  # the same generator object, advanced
    fresh = torch.Generator().manual_seed(SEEDS[2])
    assert torch.equal(first[0], torch.rand(3, generator=fresh)) and torch.equal(
        second[0], torch.rand(3, generator=fresh)
    )


def test_int_and_none_seeds_keep_their_meaning():
    assert isinstance(generator_for("cpu", 5), torch.Generator) and generator_for("cpu", None) is None
    assert torch.equal(
        uniform((2, 3), generator_for("cpu", 5), "cpu"), torch.rand(2, 3, generator=torch.Generator().manual_seed(5))
    )
    assert torch.equal(
        normal((2,), generator_for("cpu", 5), "cpu"), torch.randn(2, generator=torch.Generator().manual_seed(5))
    )
    assert derive(None, 1) is None and offset(7, 1) == 8 and select(7, [0]) == 7
    per_row = derive((1, 2, 3), 9)
    assert per_row == tuple(mix(s, 9) for s in (1, 2, 3)) and len(set(per_row)) == 3
    assert select(per_row, torch.tensor([2, 0])) == (per_row[2], per_row[0]) and offset((1, 2), 1) == (2, 3)
    assert mix(0, 1) != mix(1, 0) and 0 <= mix(2**70, -1) < 2**63


def test_noise_based_attributions_give_each_sample_its_own_noise(smooth_net, x):
    target = smooth_net(x).argmax(1)
    for method in (
        SmoothGrad(samples=4, chunk=3),
        UniformGradient(samples=4, chunk=3),
        NoiseSmoothed(Saliency(), 0.25, 3),
    ):
        whole = method.for_samples(SEEDS)(smooth_net, x, target)
        part = method.for_samples(select(SEEDS, ROWS))(smooth_net, x[ROWS], target[ROWS])
        torch.testing.assert_close(part, whole[ROWS], rtol=1e-5, atol=1e-7)
        shared = method(smooth_net, x, target)  # one int seed: the noise belongs to the batch
        assert not torch.allclose(method(smooth_net, x[ROWS], target[ROWS]), shared[ROWS])
    saliency = Saliency()
    assert saliency.for_samples(SEEDS) is saliency  # deterministic: itself
    with pytest.raises(ValueError, match="already seeded per sample"):
        SmoothGrad().for_samples(SEEDS).for_samples(SEEDS)


def test_gradient_shap_per_row_seeds_match_single_row_calls(relu_net, x):
    method = GradientShap(samples=3).for_samples(SEEDS[:3])
    target = relu_net(x[:3]).argmax(1)
    whole = method(relu_net, x[:3], target)
    one = GradientShap(samples=3).for_samples(SEEDS[1:2])(relu_net, x[1:2], target[1:2])
    torch.testing.assert_close(whole[1:2], one, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    "attack",
    [
        A.PGD(A.LinfBall(8 / 255), steps=3),
        A.PGD(A.L2Ball(0.5), steps=3),
        A.PGD(A.LinfBall(8 / 255), steps=2, target="random"),
    ],
    ids=["pgd_linf", "pgd_l2", "pgd_random_target"],
)
def test_prediction_attacks_do_not_depend_on_the_batch(relu_net, x, attack):
    y = relu_net(x).argmax(1)
    whole = with_seed(attack, SEEDS)(relu_net, x, y)
    part = with_seed(attack, select(SEEDS, ROWS))(relu_net, x[ROWS], y[ROWS])
    torch.testing.assert_close(part, whole[ROWS], rtol=0, atol=1e-6)
    assert not torch.equal(whole, x)
    batch_seeded = with_seed(attack, 0)  # an int seed: the random start belongs to the batch
    assert not torch.allclose(batch_seeded(relu_net, x[ROWS], y[ROWS]), batch_seeded(relu_net, x, y)[ROWS])


def test_random_targets_follow_the_sample():
    logits, y = torch.randn(6, 10), torch.arange(6)
    whole = choose_target("random", logits, y, generator_for("cpu", SEEDS))
    part = choose_target("random", logits[ROWS], y[ROWS], generator_for("cpu", select(SEEDS, ROWS)))
    assert torch.equal(part, whole[ROWS]) and bool((whole != y).all())


@pytest.mark.parametrize(
    "make",
    [
        lambda: A.TopKAttack(Saliency(), A.LinfBall(8 / 255), steps=3, random_start=True, beta=30.0),
        lambda: A.RandomSignAttack(Saliency(), A.L2Ball(0.5), steps=2),
        lambda: A.MassCenterAttack(SmoothGrad(samples=3), A.LinfBall(8 / 255), steps=2, beta=30.0),
    ],
    ids=["topk_random_start", "random_sign_l2", "mass_center_smoothgrad_fresh_noise"],
)
def test_explanation_attacks_do_not_depend_on_the_batch(relu_net, x, make):
    attack = make()
    whole = with_seed(attack, SEEDS).run(relu_net, x)
    part = with_seed(attack, select(SEEDS, ROWS)).run(relu_net, x[ROWS])
    torch.testing.assert_close(part.x_adv, whole.x_adv[ROWS], rtol=0, atol=1e-6)
    torch.testing.assert_close(part.maps_adv, whole.maps_adv[ROWS], rtol=1e-5, atol=1e-6)
    assert torch.equal(part.kept, whole.kept[ROWS])


def test_the_worst_case_ensemble_does_not_depend_on_the_batch(relu_net, x):
    attack = WorstCaseExplanationAttack(SmoothGrad(samples=2), A.LinfBall(8 / 255), steps=2, restarts=1, betas=[30.0])
    whole = with_seed(attack, SEEDS).run(relu_net, x)
    part = with_seed(attack, select(SEEDS, ROWS)).run(relu_net, x[ROWS])
    torch.testing.assert_close(part.values, whole.values[ROWS], rtol=1e-5, atol=1e-6, equal_nan=True)
    for name, v in whole.members.items():
        torch.testing.assert_close(part.members[name], v[ROWS], rtol=1e-5, atol=1e-6, equal_nan=True)


def test_power_iteration_starts_per_sample(smooth_net, x):
    y = smooth_net(x).argmax(1)
    _, whole = top_hessian_eigenvalue(smooth_net, x, y, 2, generator_for("cpu", SEEDS))
    _, part = top_hessian_eigenvalue(smooth_net, x[ROWS], y[ROWS], 2, generator_for("cpu", select(SEEDS, ROWS)))
    torch.testing.assert_close(part, whole[ROWS], rtol=1e-4, atol=1e-6)


def test_audit_data_deals_contiguous_shares_and_seeds_by_index():
    x, y = torch.rand(10, 1, 8, 8), torch.arange(10)
    one = AuditData(x, y, batch_size=4, seed=3)
    shares = [AuditData(x, y, batch_size=4, seed=3, shard=Shard(rank=r, world=3)) for r in range(3)]
    indices = [torch.cat([i for i, _, _ in d.batches()]).tolist() for d in shares]
    assert indices == [[0, 1, 2], [3, 4, 5], [6, 7, 8, 9]]  # in rank order: the samples in order
    assert torch.cat([i for i, _, _ in one.batches()]).tolist() == list(range(10))
    assert [len(i) for i, _, _ in one.batches(copies=2)] == [2, 2, 2, 2, 2]  # CPU: batch_size // copies
    gpu = AuditData(x, y, batch_size=4, seed=3, stack_copies=True)
    assert [len(i) for i, _, _ in gpu.batches(copies=2)] == [4, 4, 2]  # GPU: batch_size samples, stacked
    assert shares[0].count() == 3 and [d.local_count() for d in shares] == [1, 1, 1]  # the whole job's chunks
    index = torch.tensor([7, 2])
    assert one.seeds(index, copies=2) == shares[1].seeds(index, copies=2)  # not a function of the process
    assert one.seeds(index, copies=2) == (mix(3, 0, 7, 0), mix(3, 0, 2, 0), mix(3, 0, 7, 1), mix(3, 0, 2, 1))
    assert one.seeds(index, salt=1) != one.seeds(index)
    assert one.local().shard.world == 1 and one.gather([1, 2]) == [1, 2]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU on this machine")
def test_per_sample_generators_on_a_gpu_keep_results_with_the_sample(relu_net, x):
    net, xc = copy.deepcopy(relu_net).cuda(), x.cuda()
    y = net(xc).argmax(1)
    attack = A.PGD(A.LinfBall(8 / 255), steps=3)
    whole = with_seed(attack, SEEDS)(net, xc, y)
    part = with_seed(attack, select(SEEDS, ROWS))(net, xc[ROWS], y[ROWS])
    assert whole.device.type == "cuda"
    torch.testing.assert_close(part, whole[ROWS], rtol=0, atol=1e-5)
    g = SampleGenerator(SEEDS[:2], "cuda")
    assert g.randn((2, 3)).device.type == "cuda"
