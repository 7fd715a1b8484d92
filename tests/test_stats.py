"""The report's statistics against values computed independently (scipy, or by hand)."""

import math

import numpy as np
import pytest
from scipy import stats as st

from vitpipe.report import stats


def test_t_interval_matches_scipy():
    xs = [0.61, 0.66, 0.57, 0.70]
    ci = stats.over_seeds(xs)
    mean, sem = sum(xs) / 4, st.sem(xs)
    lo, hi = st.t.interval(0.95, 3, loc=mean, scale=sem)
    assert ci.n == 4 and ci.mean == pytest.approx(mean) and ci.sd == pytest.approx(st.tstd(xs))
    assert (ci.lo, ci.hi) == (pytest.approx(lo), pytest.approx(hi))


def test_wilson_by_hand():
    # 8 of 10: the textbook Wilson 95% interval is 0.4902 to 0.9433
    lo, hi = stats.wilson(8, 10)
    assert (round(lo, 4), round(hi, 4)) == (0.4902, 0.9433)
    lo, hi = stats.wilson(0, 359)  # never below zero, and not a point at zero
    assert lo == pytest.approx(0, abs=1e-12) and 0 < hi < 0.011


def test_paired_difference_matches_scipy_ttest_rel():
    a, b = [0.60, 0.70, 0.66], [0.31, 0.33, 0.35]
    d = stats.paired(a, b)
    ref = st.ttest_rel(a, b).confidence_interval(0.95)
    assert d.mean == pytest.approx(sum(a) / 3 - sum(b) / 3)
    assert (d.lo, d.hi) == (pytest.approx(ref.low), pytest.approx(ref.high))
    with pytest.raises(ValueError):
        stats.paired([1, 2], [1])


def test_verdict_edge_cases():
    one = stats.verdict(stats.paired([0.7], [0.3]))  # n = 1: no spread to judge by
    assert one.word == stats.INCONCLUSIVE and "at least 2 seeds" in one.why
    same = stats.verdict(stats.paired([0.5, 0.6, 0.7], [0.5, 0.6, 0.7]))  # identical runs: zero difference
    assert same.word == stats.DOES_NOT_HOLD
    steady = stats.paired([0.75, 0.5], [0.5, 0.25])  # zero variance, above zero
    assert steady.sd == 0 and stats.verdict(steady).word == stats.HOLDS
    worse = stats.verdict(stats.paired([0.3, 0.32, 0.29], [0.6, 0.62, 0.65]))
    assert worse.word == stats.DOES_NOT_HOLD


def test_inconclusive_says_how_many_seeds_would_resolve_it():
    d = stats.over_seeds([0.10, -0.05, 0.08])
    v = stats.verdict(d)
    assert v.word == stats.INCONCLUSIVE and "straddles zero" in v.why
    n = stats.seeds_to_resolve(d)
    assert f"about {n} seeds" in v.why
    # at n seeds the interval at this mean and spread excludes zero; at n - 1 it does not
    assert stats.t_quantile(n) * d.sd / math.sqrt(n) < d.mean <= stats.t_quantile(n - 1) * d.sd / math.sqrt(n - 1)


def test_within_noise():
    ci = stats.over_seeds([0.60, 0.64, 0.68])
    assert stats.within_noise(0.02, ci) and not stats.within_noise(0.2, ci)
    assert not stats.within_noise(0.0, stats.over_seeds([0.6]))  # one seed: no noise estimate


def _table(both: int, a_only: int, b_only: int, neither: int):
    """Per-image correctness of two models with the given 2x2 table (in a mixed order)."""
    rows = [(1, 1)] * both + [(1, 0)] * a_only + [(0, 1)] * b_only + [(0, 0)] * neither
    rows = rows[1::2] + rows[::2]
    return [a for a, _ in rows], [b for _, b in rows]


@pytest.mark.parametrize("table", [(300, 25, 9, 25), (50, 7, 7, 10), (40, 0, 6, 3), (100, 1, 0, 0), (10, 60, 2, 5)])
def test_mcnemar_matches_scipy_binomtest(table):
    both, a_only, b_only, neither = table
    a, b = _table(*table)
    t = stats.mcnemar(a, b)
    assert (t.n, t.a_only, t.b_only) == (sum(table), a_only, b_only)  # ties (both right, both wrong) left out
    assert t.p == pytest.approx(st.binomtest(a_only, a_only + b_only, 0.5).pvalue, rel=1e-9, abs=0)
    assert t.diff == pytest.approx((a_only - b_only) / sum(table))


def test_mcnemar_verdicts_and_zero_discordance():
    assert stats.image_verdict(stats.mcnemar(*_table(300, 25, 9, 25))).word == stats.HOLDS  # p = 0.009
    assert stats.image_verdict(stats.mcnemar(*_table(300, 9, 25, 25))).word == stats.DOES_NOT_HOLD
    tied = stats.image_verdict(stats.mcnemar(*_table(50, 7, 7, 10)))  # even split: p = 1
    assert tied.word == stats.INCONCLUSIVE and "p = 1" in tied.why
    same = stats.mcnemar(*_table(80, 0, 0, 20))  # the models agree on every image: no evidence
    assert (same.p, same.diff, same.lo, same.hi) == (1.0, 0.0, 0.0, 0.0)
    assert stats.image_verdict(same).word == stats.INCONCLUSIVE
    assert "McNemar" in stats.image_verdict(same).why
    with pytest.raises(ValueError):
        stats.mcnemar([1, 0], [1])


def test_spread_counts_seeds_that_never_got_there():
    assert stats.spread([30.0, 10.0, 20.0]) == (20.0, 10.0, 30.0)
    assert stats.spread([10.0, math.inf, math.inf]) == (math.inf, 10.0, math.inf)
    assert stats.spread([4.0, 2.0]) == (3.0, 2.0, 4.0)


def test_paired_bootstrap_of_a_signed_sum():
    a, b = _table(300, 25, 9, 25)
    mean, lo, hi = stats.bootstrap_sum([a, b], [1, -1])
    assert mean == pytest.approx((25 - 9) / 359)
    assert lo < mean < hi and lo > 0  # the same evidence McNemar finds (p = 0.009)
    assert stats.bootstrap_sum([a, a], [1, -1]) == (0.0, 0.0, 0.0)  # a model against itself: exactly zero


# ---------------------------------------------------------------------------------------
# The hierarchical bootstrap against a brute-force one, and Holm's correction


def _brute_force(a, b, resamples, seed):
    """The same resampling written as plain loops: images once per resample for both arms,
    then per arm pretraining runs with replacement and, within each, seeds with replacement."""
    rng = np.random.default_rng(seed)
    n = len(a[0][0])
    diffs = []
    for _ in range(resamples):
        images = rng.integers(0, n, n)
        means = []
        for arm in (a, b):
            runs = []
            for _ in range(len(arm)):
                group = arm[rng.integers(0, len(arm))]
                seeds = [group[rng.integers(0, len(group))] for _ in range(len(group))]
                runs.append(np.mean([np.mean([s[i] for i in images]) for s in seeds]))
            means.append(np.mean(runs))
        diffs.append(means[0] - means[1])
    return np.quantile(diffs, 0.025), np.quantile(diffs, 0.975)


def _constructed(rng, pretrain_means, seed_sd, n_images, seeds):
    """0/1 correctness: per pretraining run a mean accuracy, per seed a shift, per image a draw."""
    return [
        [(rng.random(n_images) < np.clip(m + rng.normal(0, seed_sd), 0, 1)).astype(int).tolist() for _ in range(seeds)]
        for m in pretrain_means
    ]


def test_hierarchical_bootstrap_matches_brute_force():
    rng = np.random.default_rng(1)
    a = _constructed(rng, [0.55, 0.75, 0.65], 0.05, 120, 3)
    b = _constructed(rng, [0.5], 0.02, 120, 3)
    diff, lo, hi, p = stats.hierarchical_bootstrap(a, b, resamples=3000, seed=0)
    blo, bhi = _brute_force(a, b, 3000, seed=7)
    observed = np.mean([np.mean(g) for g in a]) - np.mean(b)
    assert diff == pytest.approx(observed)
    assert lo == pytest.approx(blo, abs=0.015) and hi == pytest.approx(bhi, abs=0.015)
    assert lo < diff < hi


def test_hierarchical_bootstrap_widens_with_pretraining_noise():
    """The same seeds and images, once from one pretraining run and once spread over three
    runs of different quality: only the second interval holds the pretraining spread."""
    rng = np.random.default_rng(2)
    b = _constructed(rng, [0.5], 0.0, 300, 3)
    one = _constructed(rng, [0.65], 0.0, 300, 3)
    three = _constructed(rng, [0.5, 0.65, 0.8], 0.0, 300, 3)
    _, lo1, hi1, _ = stats.hierarchical_bootstrap([one[0]], b, resamples=2000)
    _, lo3, hi3, p3 = stats.hierarchical_bootstrap(three, b, resamples=2000)
    assert hi3 - lo3 > 1.5 * (hi1 - lo1)
    assert lo3 < 0.1 < hi3


def test_holm_adjusts_in_steps_and_stays_monotone():
    adjusted = stats.holm({"a": 0.01, "b": 0.04, "c": 0.03, "d": math.nan})
    assert adjusted["a"] == pytest.approx(0.03)  # 3 x 0.01
    assert adjusted["c"] == pytest.approx(0.06)  # 2 x 0.03
    assert adjusted["b"] == pytest.approx(0.06)  # 1 x 0.04, raised to stay monotone
    assert math.isnan(adjusted["d"])


def test_t_p_value_matches_scipy():
    xs = [0.1, 0.3, 0.25]
    assert stats.t_p_value(stats.over_seeds(xs)) == pytest.approx(st.ttest_1samp(xs, 0).pvalue)
