import numpy as np
import pytest
import torch
from scipy import stats

from robustattr.metrics import (
    MAP_METRICS,
    AttackSuccessRate,
    CenterShift,
    KendallTau,
    LabelKeptRate,
    RobustAccuracy,
    SpearmanCorrelation,
    TopKIntersection,
    attack_success,
    center_of_mass,
    center_shift,
    cosine_distance,
    kendall_tau,
    map_collection,
    pixel_map,
    spearman,
    topk_intersection,
)


def test_pixel_map_sums_abs_over_channels_and_rescales_to_hw():
    a = torch.zeros(1, 3, 2, 2)
    a[0, 0, 0, 0], a[0, 1, 0, 0], a[0, 2, 1, 1] = 1.0, -1.0, 2.0
    torch.testing.assert_close(pixel_map(a)[0], torch.tensor([[2.0, 0.0], [0.0, 2.0]]))
    maps = pixel_map(torch.randn(5, 3, 8, 8))
    torch.testing.assert_close(maps.sum(dim=(1, 2)), torch.full((5,), 64.0))
    assert (maps >= 0).all()
    assert pixel_map(torch.zeros(1, 1, 3, 3)).abs().sum() == 0  # no NaN from an all-zero attribution


def test_topk_intersection_known_answers():
    a = torch.arange(16.0).reshape(1, 4, 4)
    assert topk_intersection(a, a, 4).item() == 1.0
    assert topk_intersection(a, -a, 4).item() == 0.0
    b = a.clone()
    b[0, 3, 3] = -1  # drop the top pixel out of the top 4
    assert topk_intersection(a, b, 4).item() == 0.75
    with pytest.raises(ValueError):
        topk_intersection(a, a, 17)


@pytest.mark.parametrize("ties", [False, True])
def test_rank_correlations_equal_scipy(ties):
    g = torch.Generator().manual_seed(0)
    if ties:
        a, b = torch.randint(0, 4, (6, 8, 8), generator=g).float(), torch.randint(0, 4, (6, 8, 8), generator=g).float()
    else:
        a = torch.rand(6, 8, 8, generator=g)
        b = a + 0.3 * torch.rand(6, 8, 8, generator=g)
    rho, tau = spearman(a, b), kendall_tau(a, b)
    for i in range(6):
        x, y = a[i].flatten().numpy(), b[i].flatten().numpy()
        assert rho[i].item() == pytest.approx(stats.spearmanr(x, y).statistic, abs=1e-5)
        assert tau[i].item() == pytest.approx(stats.kendalltau(x, y).statistic, abs=1e-5)


def test_center_of_mass_and_shift_known_answers():
    m = torch.zeros(2, 5, 7)
    m[0, 1, 2] = 1.0
    m[1, 4, 6] = 3.0
    m[1, 0, 0] = 1.0
    torch.testing.assert_close(center_of_mass(m), torch.tensor([[1.0, 2.0], [3.0, 4.5]]))
    shifted = torch.roll(m, shifts=(1, 2), dims=(1, 2))
    assert center_shift(m[:1], shifted[:1]).item() == pytest.approx(np.hypot(1, 2))


def test_cosine_distance_known_answers():
    a = torch.rand(3, 4, 4)
    torch.testing.assert_close(cosine_distance(a, 2 * a), torch.zeros(3), atol=1e-6, rtol=0)
    e1, e2 = torch.zeros(1, 2, 2), torch.zeros(1, 2, 2)
    e1[0, 0, 0], e2[0, 1, 1] = 1, 1
    assert cosine_distance(e1, e2).item() == pytest.approx(1.0)


def test_attack_success_untargeted_excludes_clean_errors_targeted_counts_hits():
    y = torch.tensor([0, 1, 2, 3])
    clean = torch.tensor([0, 1, 2, 0])  # the last sample is already wrong
    adv = torch.tensor([5, 1, 7, 9])
    s = attack_success(clean, adv, y)
    assert s[:3].tolist() == [1.0, 0.0, 1.0] and s[3].isnan()
    assert attack_success(clean, adv, y, target=torch.tensor([5, 5, 5, 9])).tolist() == [1.0, 0.0, 0.0, 1.0]


def test_metric_classes_accumulate_per_sample_values_over_kept_samples():
    a = torch.rand(4, 6, 6)
    b = a.clone()
    b[2:] = torch.rand(2, 6, 6)
    kept = torch.tensor([True, True, False, True])
    topk = TopKIntersection(k=5, per_sample=True)
    topk.update(a, b, kept)
    expected = topk_intersection(a, b, 5)[kept]
    torch.testing.assert_close(topk.per_sample(), expected)
    torch.testing.assert_close(topk.compute(), expected.mean())

    rho, tau, shift = SpearmanCorrelation(), KendallTau(), CenterShift()
    for m in (rho, tau, shift):
        m.update(a[:2], b[:2])
        m.update(a[2:], b[2:])
    torch.testing.assert_close(rho.compute(), spearman(a, b).mean())
    torch.testing.assert_close(tau.compute(), kendall_tau(a, b).mean())
    torch.testing.assert_close(shift.compute(), center_shift(a, b).mean())

    rate = LabelKeptRate()
    rate.update(kept)
    assert rate.compute().item() == 0.75
    acc = RobustAccuracy()
    acc.update(torch.eye(3)[[0, 1, 1]], torch.tensor([0, 1, 2]))
    assert acc.compute().item() == pytest.approx(2 / 3)
    asr = AttackSuccessRate()
    asr.update(torch.tensor([0, 1, 0]), torch.tensor([1, 1, 0]), torch.tensor([0, 1, 2]))
    assert asr.compute().item() == 0.5  # the clean-misclassified sample is not counted
    assert TopKIntersection(k=3).compute().isnan()  # nothing seen yet


def test_means_keep_sums_and_counts_and_per_sample_values_only_when_asked():
    """A scalar mean needs no per-sample state: sum and count (all-reduced under DDP), whatever the samples."""
    assert set(TopKIntersection()._defaults) == {"sums", "counts"}
    assert set(RobustAccuracy()._defaults) == {"mean_value", "weight"}
    assert set(TopKIntersection(per_sample=True)._defaults) == {"sums", "counts", "values"}
    assert set(LabelKeptRate(per_sample=True)._defaults) == {"mean_value", "weight", "values"}
    rate = LabelKeptRate()
    rate.update(torch.tensor([True, False]))
    with pytest.raises(ValueError, match="per_sample=True"):
        rate.per_sample()
    spread = LabelKeptRate(per_sample=True)
    spread.update(torch.tensor([True, False]))
    assert spread.per_sample().tolist() == [1.0, 0.0] and spread.compute() == rate.compute() == 0.5


def test_the_map_collection_scores_a_batch_once_for_all_its_members(monkeypatch):
    """The map metrics of one setting share one state (a torchmetrics compute group): each batch is scored once
    per registered metric, and every member reports what it reports on its own."""
    calls = {name: 0 for name in MAP_METRICS}
    for name, cls in MAP_METRICS.items():

        def counted(a, b, k, _fn=cls.fn, _name=name):
            calls[_name] += 1
            return _fn(a, b, k)

        monkeypatch.setattr(cls, "fn", staticmethod(counted))
    g = torch.Generator().manual_seed(0)
    a = torch.rand(12, 6, 6, generator=g)
    b = a + 0.3 * torch.rand(12, 6, 6, generator=g)
    b[5] = 1.0  # a constant map: Spearman and Kendall NaN for that sample only, dropped by those two alone
    kept = torch.ones(12, dtype=torch.bool)
    kept[[1, 7]] = False
    collection = map_collection(k=4, prefix="frag/x/")
    assert list(collection.compute_groups.values()) == [list(MAP_METRICS)]
    for part in (slice(0, 5), slice(5, 12)):
        collection.update(a[part], b[part], kept[part])
    assert calls == {name: 2 for name in MAP_METRICS}  # two batches, each scored once for the whole collection
    values = collection.compute()
    assert set(values) == {f"frag/x/{name}" for name in MAP_METRICS}
    for name, cls in MAP_METRICS.items():
        alone = cls(k=4)
        alone.update(a, b, kept)
        torch.testing.assert_close(values[f"frag/x/{name}"], alone.compute())
    expected = {
        "topk_intersection": topk_intersection(a, b, 4),
        "spearman": spearman(a, b),
        "kendall": kendall_tau(a, b),
        "center_shift": center_shift(a, b),
        "cosine_distance": cosine_distance(a, b),
    }
    for name, per_sample in expected.items():
        chosen = per_sample[kept]
        torch.testing.assert_close(values[f"frag/x/{name}"], chosen[~chosen.isnan()].mean())
    assert spearman(a, b)[5].isnan() and not topk_intersection(a, b, 4)[5].isnan()
