"""flatlib.stats' power functions and flatlib.tools.power: the power of the rules' t-intervals against
published values, against simulation of the test itself (fixed seeds), and its inverses (minimum detectable
effect, lineages needed) against the power function; the variance components of a paired effect on hand-made
tables."""

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from flatlib.stats import paired_mde, paired_n, paired_power, unpaired_mde, unpaired_n, unpaired_power
from flatlib.tools.power import clock_components, pair_components


# ---------------------------------------------------------------------------- the power of a paired effect
def test_paired_power_matches_published_values():
    # G*Power 3.1, "t tests - means: difference from constant (one sample)", two tails, alpha 0.05:
    # d = 0.5 needs 34 (actual power 0.8077775), d = 0.8 needs 15 (actual power 0.8213105)
    assert paired_power(0.5, 1.0, 34) == pytest.approx(0.8077775, abs=5e-7)
    assert paired_power(0.8, 1.0, 15) == pytest.approx(0.8213105, abs=5e-7)
    assert paired_n(0.5, 1.0) == 34 and paired_n(0.8, 1.0) == 15


def _simulated_paired_power(effect: float, sd: float, n: int, draws: int, seed: int) -> float:
    """Share of ``draws`` samples of n lineage effects ~ N(effect, sd^2) whose 95% t-interval excludes 0."""
    x = np.random.default_rng(seed).normal(effect, sd, size=(draws, n))
    t = x.mean(axis=1) / (x.std(axis=1, ddof=1) / math.sqrt(n))
    return float(np.mean(np.abs(t) > stats.t.ppf(0.975, n - 1)))


@pytest.mark.parametrize(("effect", "sd", "n"), [(0.5, 1.0, 10), (0.0047, 0.0047, 3), (-1.5, 1.0, 4)])
def test_paired_power_matches_simulation(effect, sd, n):
    draws = 200_000
    simulated = _simulated_paired_power(effect, sd, n, draws, seed=0)
    exact = paired_power(effect, sd, n)
    mc_se = math.sqrt(exact * (1 - exact) / draws)  # binomial standard error of the simulated share
    assert abs(simulated - exact) < 4 * mc_se


def test_paired_power_at_zero_is_the_level_and_is_symmetric():
    assert paired_power(0.0, 1.0, 5) == pytest.approx(0.05, abs=1e-12)
    assert paired_power(0.3, 1.0, 7) == pytest.approx(paired_power(-0.3, 1.0, 7), abs=1e-12)
    assert paired_power(0.3, 1.0, 7) < paired_power(0.3, 1.0, 8) < paired_power(0.4, 1.0, 8)


def test_paired_mde_inverts_the_power_and_scales_with_the_sd():
    for n in (2, 3, 8, 40):
        mde = paired_mde(0.01, n)
        assert paired_power(mde, 0.01, n) == pytest.approx(0.8, abs=1e-9)
        assert paired_mde(0.02, n) == pytest.approx(2 * mde, rel=1e-9)
    assert paired_mde(1.0, 8, power=0.9) > paired_mde(1.0, 8)
    # many lineages: the normal approximation (z_0.975 + z_0.8) sd / sqrt(n)
    z = stats.norm.ppf(0.975) + stats.norm.ppf(0.8)
    assert paired_mde(1.0, 10_000) == pytest.approx(z / 100, rel=1e-3)


def test_paired_n_is_the_smallest_n_with_the_power():
    for effect, sd in ((0.0092, 0.0037), (0.004, 0.0052), (1.0, 0.3), (3.0, 1.0)):
        n = paired_n(effect, sd)
        assert n >= 2 and paired_power(effect, sd, n) >= 0.8
        assert n == 2 or paired_power(effect, sd, n - 1) < 0.8
    assert paired_n(1e-6, 1.0, n_max=1000) is None  # beyond n_max: None, not a number
    with pytest.raises(ValueError, match="effect"):
        paired_n(0.0, 1.0)


def test_bad_arguments_name_the_parameter():
    with pytest.raises(ValueError, match="sd"):
        paired_power(1.0, 0.0, 5)
    with pytest.raises(ValueError, match="n:"):
        paired_power(1.0, 1.0, 1)
    with pytest.raises(ValueError, match="power"):
        paired_mde(1.0, 5, power=0.02)
    with pytest.raises(ValueError, match="level"):
        paired_mde(1.0, 5, level=1.0)
    with pytest.raises(ValueError, match="sd_b"):
        unpaired_power(1.0, 1.0, math.nan, 3, 3)


# ---------------------------------------------------------------------------- the power of an unpaired effect
def test_unpaired_power_is_the_pooled_t_power_for_equal_groups():
    # equal SDs and sizes: the Welch-Satterthwaite df of the population variances is 2n - 2 and the
    # statistic is the pooled one, so the noncentral t is exact; checked by simulating the pooled t-test
    effect, sd, n, draws = 1.0, 1.0, 6, 100_000
    g = np.random.default_rng(1)
    a, b = g.normal(0.0, sd, (draws, n)), g.normal(effect, sd, (draws, n))
    p = stats.ttest_ind(b, a, axis=1, equal_var=True).pvalue
    simulated, exact = float(np.mean(p < 0.05)), unpaired_power(effect, sd, sd, n, n)
    assert abs(simulated - exact) < 4 * math.sqrt(exact * (1 - exact) / draws)
    nc = effect / math.sqrt(2 * sd**2 / n)
    c = stats.t.ppf(0.975, 2 * n - 2)
    assert exact == pytest.approx(stats.nct.sf(c, 2 * n - 2, nc) + stats.nct.cdf(-c, 2 * n - 2, nc),
                                  abs=1e-12)


def test_unpaired_power_uses_the_satterthwaite_df_for_unequal_groups():
    sd_a, sd_b, n_a, n_b, effect = 0.5, 2.0, 3, 6, 2.0
    va, vb = sd_a**2 / n_a, sd_b**2 / n_b
    df = (va + vb) ** 2 / (va**2 / (n_a - 1) + vb**2 / (n_b - 1))
    c, nc = stats.t.ppf(0.975, df), effect / math.sqrt(va + vb)
    assert unpaired_power(effect, sd_a, sd_b, n_a, n_b) == pytest.approx(
        stats.nct.sf(c, df, nc) + stats.nct.cdf(-c, df, nc), abs=1e-12)


def test_unpaired_mde_and_n_invert_the_power():
    mde = unpaired_mde(0.01, 0.02, 3, 3)
    assert unpaired_power(mde, 0.01, 0.02, 3, 3) == pytest.approx(0.8, abs=1e-9)
    n = unpaired_n(0.02, 0.01, 0.015)
    assert unpaired_power(0.02, 0.01, 0.015, n, n) >= 0.8 > unpaired_power(0.02, 0.01, 0.015, n - 1, n - 1)


# ---------------------------------------------------------------------------- variance components
def _clock_frame(doses: dict[int, list[float]], controls: dict[int, float]) -> pd.DataFrame:
    rows = [{"language": "x", "lineage": l, "noise": k, "tau": 10.0, "q": v}
            for l, values in doses.items() for k, v in enumerate(values)]
    rows += [{"language": "x", "lineage": l, "noise": 0, "tau": 0.0, "q": v} for l, v in controls.items()]
    return pd.DataFrame(rows)


def test_clock_components_by_hand():
    # lineage effects (dose mean - control): 1.0 - 0 = 1.0, 3.0 - 0 = 3.0, 2.0 - 0 = 2.0 -> mean 2, variance
    # 1; within-lineage variances of the doses: 2, 2, 2 (values mean +- 1 with 2
    # seeds: (1 + 1) / 1) -> pooled 2
    frame = _clock_frame({0: [0.0, 2.0], 1: [2.0, 4.0], 2: [1.0, 3.0]}, {0: 0.0, 1: 0.0, 2: 0.0})
    c = clock_components(frame, "x", "q", tau=10.0)
    assert (c.lineages, c.noise_seeds) == (3, 2)
    assert c.effect == pytest.approx(2.0) and c.effect_sd == pytest.approx(1.0)
    assert c.within == pytest.approx(2.0)
    assert c.between == pytest.approx(1.0 - 2.0 / 2)  # var(effects) - within / noise seeds = 0
    assert c.between_share == pytest.approx(0.0)
    assert c.lineage_sd(1) == pytest.approx(math.sqrt(0.0 + 2.0))
    assert c.reference == pytest.approx(0.0)


def test_clock_components_between_dominates():
    frame = _clock_frame({0: [1.0, 1.2], 1: [5.0, 5.2], 2: [3.0, 3.2]}, {0: 0.0, 1: 0.0, 2: 0.0})
    c = clock_components(frame, "x", "q", tau=10.0)
    # effects 1.1, 5.1, 3.1: variance 4; within 0.02; between 4 - 0.01 = 3.99
    assert c.within == pytest.approx(0.02) and c.between == pytest.approx(3.99)
    assert c.between_share == pytest.approx(3.99 / 4.0)
    assert c.lineage_sd(math.inf) == pytest.approx(math.sqrt(3.99))
    assert c.lineage_sd(2) == pytest.approx(2.0)  # the design measured reproduces the observed SD
    with pytest.raises(ValueError, match="tau"):
        clock_components(frame, "x", "q", tau=3.0)
    with pytest.raises(ValueError, match="language"):
        clock_components(frame, "y", "q", tau=10.0)


def test_pair_components_without_a_split():
    # one run a side: the effects' mean and SD, nothing split off (the sides share their measurement noise)
    c = pair_components(pd.Series([0.60, 0.61, 0.62]), pd.Series([0.61, 0.63, 0.65]))
    assert (c.lineages, c.noise_seeds) == (3, 1)
    assert c.effect == pytest.approx(0.02) and c.reference == pytest.approx(0.61)
    assert math.isnan(c.within) and math.isnan(c.between_share) and c.lineage_sd(1) == pytest.approx(0.01)
    with pytest.raises(ValueError, match="after"):
        pair_components(pd.Series([1.0, 2.0, 3.0]), pd.Series([1.0, 2.0]))


def test_the_committed_clock_reproduces_the_measured_components():
    # the HMM clock's state@3 effect at τ = 10, as measured by hand from the CSVs committed before the
    # 8-lineage design (docs/power.md; its HMM clock rows are kept in tests/data, copied from commit
    # 6511562's figures/02_measurements.csv): the SD of a lineage's effect 0.0047 with one noise seed and
    # 0.0034 with infinitely many, 87% between lineages
    from pathlib import Path

    frame = pd.read_csv(Path(__file__).parent / "data" / "02_measurements_hmm_clock_3_lineages.csv")
    c = clock_components(frame[frame.continuation == "sgd clock"], "hmm", "acc state@3", tau=10.0)
    assert (c.lineages, c.noise_seeds) == (3, 6)
    assert (c.lineage_sd(1) == pytest.approx(0.0047, abs=5e-5)
            and c.lineage_sd(math.inf) == pytest.approx(0.0034, abs=5e-5))
    assert c.between_share == pytest.approx(0.87, abs=0.005)
