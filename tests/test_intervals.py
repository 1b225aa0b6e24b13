"""95% intervals and paired comparisons: nominal coverage on synthetic populations (seeded simulations), Wilson
against its closed form, and a checkpoint compared with itself never resolved."""

import math

import numpy as np
import pytest
from scipy import stats

from robustattr.audit.sections.uncertainty import compare, comparison_table, describe, error_bars, estimate
from robustattr.metrics.intervals import (
    Estimate,
    mean_interval,
    paired_difference,
    proportion_interval,
    statistic_interval,
)


def test_bootstrap_interval_covers_the_population_mean_at_about_its_nominal_rate():
    # A skewed population of per-sample top-k intersections (Beta(6, 4), mean 0.6), 64 samples per audit, as in
    # the audit: the percentile bootstrap of 400 simulated audits covers the true mean at about 95%.
    rng = np.random.default_rng(0)
    true_mean = 6 / 10
    covered = []
    for i in range(400):
        e = mean_interval(rng.beta(6, 4, size=64), seed=i, resamples=500)
        covered.append(e.ci_low <= true_mean <= e.ci_high)
    rate = float(np.mean(covered))
    # 400 Bernoulli(0.95) draws: sd 0.011; the percentile bootstrap is a little narrow at n = 64.
    assert 0.91 <= rate <= 0.98, rate


def test_mean_interval_ignores_nan_and_handles_small_and_constant_samples():
    e = mean_interval([0.2, float("nan"), 0.4, 0.6], seed=0)
    assert e.n == 3 and e.mean == pytest.approx(0.4) and e.ci_low < 0.4 < e.ci_high
    assert e.ci_low >= 0.2 and e.ci_high <= 0.6
    one = mean_interval([0.5])
    assert one.n == 1 and one.mean == 0.5 and math.isnan(one.ci_low)
    assert str(one) == "0.500 (n=1)"
    assert mean_interval([]).n == 0 and str(mean_interval([])) == "n/a"
    flat = mean_interval([0.3] * 10)
    assert flat.ci_low == flat.mean == flat.ci_high == pytest.approx(0.3)
    # seeded: the same seed gives the same interval, another seed a slightly different one
    v = np.random.default_rng(1).normal(size=50)
    assert mean_interval(v, seed=3) == mean_interval(v, seed=3)
    assert mean_interval(v, seed=3) != mean_interval(v, seed=4)


def test_estimate_round_trips_through_its_dict_and_formats_with_its_interval():
    e = Estimate(0.64, 0.614, 0.666, 128)
    assert Estimate.of(e.as_dict()) == e
    assert Estimate.of({"mean": 0.5, "ci_low": None, "ci_high": None, "n": 1}).ci_low != 0.0
    assert str(e) == "0.640 [0.614, 0.666]" and e.half_width == pytest.approx(0.026)


def test_wilson_interval_matches_its_closed_form_and_stays_inside_zero_one():
    def wilson(s, n):
        z = stats.norm.ppf(0.975)
        p = s / n
        centre = (p + z * z / (2 * n)) / (1 + z * z / n)
        half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
        return centre - half, centre + half

    for s, n in [(127, 128), (64, 128), (0, 16), (16, 16), (3, 10)]:
        e = proportion_interval(s, n)
        low, high = wilson(s, n)
        assert e.mean == s / n
        assert e.ci_low == pytest.approx(low, abs=1e-12) and e.ci_high == pytest.approx(high, abs=1e-12)
        assert 0 <= e.ci_low <= e.mean <= e.ci_high <= 1
    assert proportion_interval(16, 16).ci_low < 1  # not degenerate at a perfect score
    per_sample = proportion_interval([1, 0, 1, 1, float("nan")])
    assert (per_sample.mean, per_sample.n) == (0.75, 4)


def test_wilson_interval_covers_a_true_accuracy_at_about_its_nominal_rate():
    rng = np.random.default_rng(0)
    p = 0.9
    covered = [proportion_interval(int(rng.binomial(128, p)), 128) for _ in range(2000)]
    rate = np.mean([e.ci_low <= p <= e.ci_high for e in covered])
    assert 0.93 <= rate <= 0.97, rate


def test_statistic_interval_resamples_columns_together():
    rng = np.random.default_rng(0)
    a = rng.normal(size=80)
    b = a + rng.normal(scale=0.1, size=80)  # strongly paired
    ratio = statistic_interval(lambda x, y, axis: np.mean(x - y, axis=axis), [a, b], seed=0)
    assert ratio.mean == pytest.approx(float(np.mean(a - b)))
    assert ratio.ci_high - ratio.ci_low < 0.1  # pairing removes the between-sample spread


def test_a_checkpoint_compared_with_itself_is_never_resolved():
    rng = np.random.default_rng(0)
    for i in range(20):
        v = rng.uniform(size=64)
        d = paired_difference(v, v.copy(), seed=i)
        assert not d["resolved"] and d["better"] is None and d["difference"] == 0
        assert d["samples_to_resolve"] is None


def test_paired_difference_resolves_a_real_difference_and_sizes_an_unresolved_one():
    rng = np.random.default_rng(0)
    base = rng.uniform(0.3, 0.9, size=128)
    better = base + 0.05 + rng.normal(scale=0.02, size=128)
    d = paired_difference(better, base, seed=0)
    assert d["resolved"] and d["better"] == "a" and d["ci_low"] > 0 and d["samples"] == 128
    assert paired_difference(better, base, seed=0, higher_is_better=False)["better"] == "b"
    # the pairing is what resolves it: the two means' own intervals overlap
    ea, eb = mean_interval(better), mean_interval(base)
    assert ea.ci_low < eb.ci_high
    # a small difference under a large spread is not resolved; the sample count it names does resolve a
    # population with that mean and spread
    small = base + 0.005 + rng.normal(scale=0.05, size=128)
    d = paired_difference(small, base, seed=0)
    assert not d["resolved"] and d["samples_to_resolve"] > 128
    diff = small - base
    needed = d["samples_to_resolve"]
    wider = rng.normal(diff.mean(), diff.std(ddof=1), size=4 * needed)
    assert paired_difference(wider, np.zeros_like(wider), seed=0)["resolved"]
    # NaN (label not kept) on either side drops the pair
    a, b = better.copy(), base.copy()
    a[0], b[1] = np.nan, np.nan
    assert paired_difference(a, b)["samples"] == 126
    with pytest.raises(ValueError, match="same samples"):
        paired_difference([1.0, 2.0], [1.0])


def test_compare_and_its_text_say_more_robust_only_where_resolved():
    rng = np.random.default_rng(0)
    v = rng.uniform(0.4, 0.8, size=64)
    results = {
        "q": {"v": v, "same": v},
        "r": {"v": v + 0.1, "same": v.copy()},
    }

    def paired(result):
        return {(("quantity", "v"),): (result["v"], True), (("quantity", "same"),): (result["same"], True)}

    comparisons = compare(results, paired, seed=0)
    by = {c["quantity"]: c for c in comparisons}
    assert by["v"]["resolved"] and by["v"]["more_robust"] == "r" and by["v"]["a"] == "q"
    assert not by["same"]["resolved"] and by["same"]["more_robust"] is None
    assert describe(by["v"], "top-k").startswith("r is more robust than q in top-k")
    assert "do not differ" in describe(by["same"], "top-k")
    unresolved = {**by["v"], "resolved": False, "more_robust": None, "samples_to_resolve": 300}
    assert "not resolved at 64 samples" in describe(unresolved, "top-k") and "300" in describe(unresolved, "top-k")
    table = comparison_table(comparisons, ["quantity"], "comparisons")
    assert table.rows[0][-1] == "r more robust" and table.rows[1][-1].startswith("not resolved at 64 samples")


def test_error_bars_and_stored_estimates():
    row = {"topk": 0.6, "ci": {"topk": [0.55, 0.62]}, "n": {"topk": 64}}
    e = estimate(row, "topk")
    assert isinstance(e, Estimate) and e.n == 64
    np.testing.assert_allclose(error_bars([e, 0.3]), [[0.05, 0.0], [0.02, 0.0]])
    assert estimate({"topk": 0.6}, "topk") == 0.6


def test_auroc_interval_equals_sklearn_and_covers_the_population_auroc():
    from sklearn.metrics import roc_auc_score

    from robustattr.metrics.intervals import auroc_interval

    rng = np.random.default_rng(3)
    neg, pos = rng.normal(size=60), rng.normal(0.8, size=40)
    pos[:4] = neg[:4]  # ties count half
    e = auroc_interval(neg, pos, seed=0)
    assert e.mean == pytest.approx(roc_auc_score(np.r_[np.zeros(60), np.ones(40)], np.r_[neg, pos]), abs=1e-12)
    assert e.ci_low < e.mean < e.ci_high and e.n == 100
    truth = stats.norm.cdf(0.8 / np.sqrt(2))  # P(pos > neg) for unit normals 0.8 apart
    covered = 0
    for trial in range(100):
        r = np.random.default_rng(100 + trial)
        est = auroc_interval(r.normal(size=60), r.normal(0.8, size=40), seed=trial, resamples=500)
        covered += est.ci_low <= truth <= est.ci_high
    assert 0.88 <= covered / 100 <= 0.995
