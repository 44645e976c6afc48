"""Welch differences and bootstrap rank correlations against scipy and simple cases."""

import math

import numpy as np
import pytest
from scipy import stats

from flatlib.stats import mean_difference, rank_correlation


def test_mean_difference_matches_welch():
    a, b = [0.60, 0.62, 0.61], [0.66, 0.70, 0.69, 0.67]
    d = mean_difference(a, b)
    assert d.delta == pytest.approx(np.mean(b) - np.mean(a))
    # Welch's t test p < 0.05 exactly when the 95% interval excludes 0
    p = stats.ttest_ind(b, a, equal_var=False).pvalue
    assert (p < 0.05) == d.significant
    # the interval's half-width over the standard error is the Welch t quantile
    se = math.sqrt(np.var(a, ddof=1) / 3 + np.var(b, ddof=1) / 4)
    assert 2.0 < d.ci95 / se < 4.4
    assert math.isnan(mean_difference([1.0], [2.0, 3.0]).ci95)
    with pytest.raises(ValueError, match="a, b"):
        mean_difference([], [1.0])


def test_rank_correlation_value_and_interval():
    rng = np.random.default_rng(0)
    x = rng.normal(size=40)
    y = x + 0.5 * rng.normal(size=40)
    c = rank_correlation(x, y, "spearman", n_boot=500, seed=1)
    assert c.value == pytest.approx(stats.spearmanr(x, y).statistic)
    assert c.low < c.value < c.high and c.low > 0  # a real correlation: the interval excludes 0
    k = rank_correlation(x, y, "kendall", n_boot=500, seed=1)
    assert k.value == pytest.approx(stats.kendalltau(x, y).statistic)
    # no relation: the interval covers 0
    z = rank_correlation(x, rng.normal(size=40), n_boot=500, seed=1)
    assert z.low < 0 < z.high
    # deterministic given the seed
    assert rank_correlation(x, y, n_boot=200, seed=3) == rank_correlation(x, y, n_boot=200, seed=3)


def test_cluster_bootstrap_is_wider_for_duplicated_points():
    rng = np.random.default_rng(1)
    x = rng.normal(size=10)
    y = x + rng.normal(size=10)
    xs, ys, groups = np.repeat(x, 4), np.repeat(y, 4), np.repeat(np.arange(10), 4)
    naive = rank_correlation(xs, ys, n_boot=400, seed=0)
    cluster = rank_correlation(xs, ys, n_boot=400, seed=0, groups=groups)
    assert (cluster.high - cluster.low) > (naive.high - naive.low)


def test_bad_input():
    with pytest.raises(ValueError, match="method"):
        rank_correlation([1, 2, 3], [1, 2, 3], method="pearson")
    with pytest.raises(ValueError, match="at least 3"):
        rank_correlation([1, 2], [1, 2])


def test_partial_rank_correlation_removes_a_shared_cause():
    """y and x both follow z; given z they are unrelated (partial ~ 0) though their plain rho is high.
    Checked against the residual definition: Pearson of the ranks' residuals after regressing on z's ranks."""
    import numpy as np
    from scipy import stats

    g = np.random.default_rng(0)
    z = g.normal(size=200)
    x, y = z + 0.3 * g.normal(size=200), z + 0.3 * g.normal(size=200)
    plain = rank_correlation(x, y, n_boot=200, seed=0)
    partial = rank_correlation(x, y, n_boot=200, seed=0, given=z)
    rx, ry, rz = (stats.rankdata(v) for v in (x, y, z))
    residual = lambda r: r - np.polyval(np.polyfit(rz, r, 1), rz)
    assert partial.value == pytest.approx(float(np.corrcoef(residual(rx), residual(ry))[0, 1]), abs=1e-12)
    assert plain.value > 0.8 and abs(partial.value) < 0.2 and partial.low < partial.value < partial.high
    with pytest.raises(ValueError, match="given"):
        rank_correlation(x, y, "kendall", given=z)


def test_mean_difference_records_the_welch_degrees_of_freedom():
    a, b = [1.0, 2.0, 3.0], [2.0, 5.0, 7.0, 9.0]
    assert mean_difference(a, b).dof == pytest.approx(stats.ttest_ind(b, a, equal_var=False).df)
    assert math.isnan(mean_difference([1.0], b).dof)


def test_detectable_effect_is_the_noncentrality_at_the_power_times_the_se():
    from flatlib.stats import detectable_effect, paired_mde

    se, df = 0.004, 5.0
    mde = detectable_effect(se, df)
    c = stats.t.ppf(0.975, df)
    nc = mde / se
    assert stats.nct.sf(c, df, nc) + stats.nct.cdf(-c, df, nc) == pytest.approx(0.8, abs=1e-9)
    assert paired_mde(0.01, 6) == pytest.approx(detectable_effect(0.01 / math.sqrt(6), 5.0), rel=1e-12)
    with pytest.raises(ValueError, match="se"):
        detectable_effect(-1.0, 3.0)
    with pytest.raises(ValueError, match="df"):
        detectable_effect(1.0, 0.0)
