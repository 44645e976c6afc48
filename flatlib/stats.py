"""Small statistics the notebooks share: differences of means with Welch confidence intervals, rank
correlations with bootstrap confidence intervals, and the power of the t-intervals that
``flatlib.claims`` decides with (docs/power.md).

Every function returns plain floats; a confidence interval is ``(low, high)``. Seeds are explicit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import optimize, stats


def mean_ci(values, level: float = 0.95) -> tuple[float, float]:
    """Mean and the half-width of its two-sided t confidence interval (nan for one value)."""
    values = np.asarray(values, dtype=float)
    if len(values) < 2:
        return float(values.mean()), math.nan
    half = stats.t.ppf(0.5 + level / 2, len(values) - 1) * values.std(ddof=1) / math.sqrt(len(values))
    return float(values.mean()), float(half)


@dataclass(frozen=True)
class Difference:
    """``mean(b) - mean(a)`` with the half-width of its Welch 95% confidence interval."""

    delta: float
    ci95: float
    n_a: int
    n_b: int
    dof: float = math.nan  # the Welch-Satterthwaite degrees of freedom of the interval (nan without one)

    @property
    def significant(self) -> bool:
        """The interval excludes 0."""
        return math.isfinite(self.ci95) and abs(self.delta) > self.ci95


def mean_difference(a, b, level: float = 0.95) -> Difference:
    """``mean(b) - mean(a)`` and its Welch t interval (unequal variances; nan with fewer than two
    values on either side)."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if len(a) == 0 or len(b) == 0:
        raise ValueError("a, b: expected at least one value each")
    delta = float(b.mean() - a.mean())
    if len(a) < 2 or len(b) < 2:
        return Difference(delta, math.nan, len(a), len(b))
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    se = math.sqrt(va + vb)
    if se == 0:
        return Difference(delta, 0.0, len(a), len(b))
    dof = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    return Difference(delta, float(stats.t.ppf(0.5 + level / 2, dof) * se), len(a), len(b), float(dof))


@dataclass(frozen=True)
class Correlation:
    """A rank correlation, its bootstrap percentile interval and the number of points."""

    method: str
    value: float
    low: float
    high: float
    n: int

    def __str__(self) -> str:
        return f"{self.method} {self.value:+.2f} [{self.low:+.2f}, {self.high:+.2f}] (n={self.n})"


def _coefficient(method: str, x: np.ndarray, y: np.ndarray, z: np.ndarray | None = None) -> float:
    # partial Spearman: rho_xy.z = (r_xy - r_xz r_yz) / sqrt((1 - r_xz^2)(1 - r_yz^2)) on ranks
    if z is not None:
        r = stats.spearmanr(np.column_stack([x, y, z])).statistic
        rxy, rxz, ryz = r[0, 1], r[0, 2], r[1, 2]
        denominator = math.sqrt(max(0.0, (1 - rxz**2) * (1 - ryz**2)))
        return float((rxy - rxz * ryz) / denominator) if denominator > 0 else math.nan
    if method == "spearman":
        return float(stats.spearmanr(x, y).statistic)
    return float(stats.kendalltau(x, y).statistic)


def rank_correlation(x, y, method: str = "spearman", n_boot: int = 2000, seed: int = 0,
                     groups=None, level: float = 0.95, given=None) -> Correlation:
    """Spearman's rho or Kendall's tau of ``x`` and ``y`` with a bootstrap percentile interval.

    With ``groups`` (one label per point, e.g. the training seed), whole groups are resampled
    together (a cluster bootstrap): points that share a training run are not independent.
    Resamples in which either variable is constant are dropped (their coefficient is undefined).
    With ``given`` (a third variable z, Spearman only): the partial rank correlation of x and y
    given z, ``(r_xy - r_xz r_yz) / sqrt((1 - r_xz^2)(1 - r_yz^2))`` of the Spearman coefficients
    (the correlation of the ranks' residuals after a linear fit on z's ranks).
    """
    if method not in ("spearman", "kendall"):
        raise ValueError(f"method: expected 'spearman' or 'kendall', got {method!r}")
    if given is not None and method != "spearman":
        raise ValueError("given: a partial rank correlation is computed for method='spearman' only")
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    z = None if given is None else np.asarray(given, dtype=float)
    if z is not None and z.shape != x.shape:
        raise ValueError(f"given: expected the shape of x {x.shape}, got {z.shape}")
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"x, y: expected two 1-d arrays of the same length, got {x.shape} and {y.shape}")
    if len(x) < 3:
        raise ValueError(f"x, y: need at least 3 points for a rank correlation, got {len(x)}")
    value = _coefficient(method, x, y, z)
    rng = np.random.default_rng(seed)
    if groups is None:
        clusters = [np.array([i]) for i in range(len(x))]
    else:
        labels = np.asarray(groups)
        clusters = [np.flatnonzero(labels == g) for g in dict.fromkeys(labels.tolist())]
    samples = []
    for _ in range(n_boot):
        pick = rng.integers(0, len(clusters), len(clusters))
        index = np.concatenate([clusters[i] for i in pick])
        xs, ys, zs = x[index], y[index], None if z is None else z[index]
        if np.ptp(xs) == 0 or np.ptp(ys) == 0 or (zs is not None and np.ptp(zs) == 0):
            continue
        sample = _coefficient(method, xs, ys, zs)
        if math.isfinite(sample):
            samples.append(sample)
    if not samples:
        return Correlation(method, value, math.nan, math.nan, len(x))
    low, high = np.quantile(samples, [0.5 - level / 2, 0.5 + level / 2])
    return Correlation(method, value, float(low), float(high), len(x))


# ---------------------------------------------------------------------------- power of a t-interval
# A "yes" of flatlib.claims needs the two-sided ``level`` t-interval of an effect to exclude 0. With
# the estimate ~ N(delta, se^2) and se estimated on ``df`` degrees of freedom, the statistic
# T = estimate / se_hat is noncentral t with ``df`` and noncentrality delta / se, so the power is
#
#     power(delta) = P(T > c) + P(T < -c),    c = t_{(1 + level) / 2, df}
#
# exactly for a paired effect (df = n - 1, se = sd / sqrt(n)) and for two groups of equal size and SD
# (df = 2n - 2); for a Welch interval it is the usual approximation with the Welch-Satterthwaite df of
# the population variances. The wrong-sign tail P(T < -c) is included (the convention of G*Power and
# of most tables); at 80% power it is below 1e-4. The standard approximation
# delta = (t_{(1 + level) / 2, df} + t_{power, df}) se is close but not used: it is
# 5% low at df = 2 (3 lineages).
POWER = 0.8


def _check(name: str, value: float, low: float = 0.0, high: float = math.inf, open_low: bool = True) -> None:
    ok = math.isfinite(value) and (value > low if open_low else value >= low) and value < high
    if not ok:
        raise ValueError(f"{name}: expected a finite number in {'(' if open_low else '['}{low}, {high}), got "
                         f"{value!r}")


def _t_power(noncentrality: float, df: float, level: float) -> float:
    c = stats.t.ppf(0.5 + level / 2, df)
    # P(T < -c) as P(T' > c) with T' = -T (noncentrality negated): scipy's nct.cdf returns NaN for some
    # large noncentralities far in the lower tail (df 1, nc 8), its sf does not
    power = float(stats.nct.sf(c, df, noncentrality) + stats.nct.sf(c, df, -noncentrality))
    if not math.isfinite(power):
        raise ArithmeticError(f"the noncentral t power is not finite at df {df}, noncentrality "
                              f"{noncentrality}")
    return power


def _noncentrality(df: float, power: float, level: float) -> float:
    """The noncentrality at which the two-sided t-test on ``df`` degrees of freedom has ``power``."""
    high = 1.0
    while _t_power(high, df, level) < power:  # the power rises with the noncentrality: bracket, then solve
        high *= 2
    return float(optimize.brentq(lambda nc: _t_power(nc, df, level) - power, 0.0, high, xtol=1e-12,
                                 rtol=1e-12))


def _check_design(power: float, level: float) -> None:
    _check("level", level, 0.0, 1.0)
    _check("power", power, 1 - level, 1.0)  # at or below the level the test has it at zero effect


def detectable_effect(se: float, df: float, power: float = POWER, level: float = 0.95) -> float:
    """The minimum detectable effect: the smallest |delta| whose ``level`` t-interval (standard error
    ``se`` on ``df`` degrees of freedom) excludes 0 with probability ``power``, ``nc(df) * se``."""
    _check("se", se)
    _check("df", df)
    _check_design(power, level)
    return _noncentrality(df, power, level) * se


def paired_power(effect: float, sd: float, n: int, level: float = 0.95) -> float:
    """The power of a paired effect's t-interval over ``n`` lineages whose effects have mean
    ``effect`` and standard deviation ``sd``: noncentral t with n - 1 df and noncentrality
    effect sqrt(n) / sd (exact for normal lineage effects)."""
    _check("sd", sd)
    _check("effect", effect, -math.inf)
    if not (isinstance(n, int) and n >= 2):
        raise ValueError(f"n: a t-interval needs at least 2 lineages, got {n!r}")
    _check("level", level, 0.0, 1.0)
    return _t_power(effect * math.sqrt(n) / sd, n - 1, level)


def paired_mde(sd: float, n: int, power: float = POWER, level: float = 0.95) -> float:
    """The minimum detectable paired effect over ``n`` lineages with lineage-effect SD ``sd``."""
    if not (isinstance(n, int) and n >= 2):
        raise ValueError(f"n: a t-interval needs at least 2 lineages, got {n!r}")
    _check("sd", sd)
    return detectable_effect(sd / math.sqrt(n), n - 1, power, level)


def _smallest_n(reaches, start: int, n_max: int) -> int | None:
    """The smallest n >= 2 with ``reaches(n)`` (monotone in n), searched from ``start``; None above n_max."""
    n = max(2, min(start, n_max))
    while n > 2 and reaches(n - 1):
        n -= 1
    while not reaches(n):
        n += 1
        if n > n_max:
            return None
    return n


def _normal_n(effect: float, sd: float, power: float, level: float) -> int:
    """The normal approximation ((z_{(1 + level) / 2} + z_power) sd / effect)^2: where the search starts."""
    z = stats.norm.ppf(0.5 + level / 2) + stats.norm.ppf(power)
    return int(min(1e9, (z * sd / abs(effect)) ** 2))


def paired_n(effect: float, sd: float, power: float = POWER, level: float = 0.95,
             n_max: int = 10_000) -> int | None:
    """The number of lineages a paired effect of size ``effect`` (lineage-effect SD ``sd``) needs for
    ``power``: the smallest n with ``paired_power(effect, sd, n) >= power``; None if above ``n_max``."""
    _check("effect", abs(effect))
    _check("sd", sd)
    _check_design(power, level)
    return _smallest_n(lambda n: paired_power(effect, sd, n, level) >= power,
                       _normal_n(effect, sd, power, level), n_max)


def _welch(sd_a: float, sd_b: float, n_a: int, n_b: int) -> tuple[float, float]:
    """The standard error of ``mean(b) - mean(a)`` and its Welch-Satterthwaite df, from population SDs."""
    _check("sd_a", sd_a)
    _check("sd_b", sd_b)
    for name, n in (("n_a", n_a), ("n_b", n_b)):
        if not (isinstance(n, int) and n >= 2):
            raise ValueError(f"{name}: a Welch interval needs at least 2 runs a group, got {n!r}")
    va, vb = sd_a**2 / n_a, sd_b**2 / n_b
    return math.sqrt(va + vb), (va + vb) ** 2 / (va**2 / (n_a - 1) + vb**2 / (n_b - 1))


def unpaired_power(effect: float, sd_a: float, sd_b: float, n_a: int, n_b: int, level: float = 0.95) -> float:
    """The power of the Welch interval of ``mean(b) - mean(a) = effect`` for groups of ``n_a`` and
    ``n_b`` runs with SDs ``sd_a``, ``sd_b`` (noncentral t on the Welch-Satterthwaite df)."""
    _check("effect", effect, -math.inf)
    _check("level", level, 0.0, 1.0)
    se, df = _welch(sd_a, sd_b, n_a, n_b)
    return _t_power(effect / se, df, level)


def unpaired_mde(sd_a: float, sd_b: float, n_a: int, n_b: int, power: float = POWER,
                 level: float = 0.95) -> float:
    """The minimum detectable difference of two groups' means (``unpaired_power``'s model)."""
    se, df = _welch(sd_a, sd_b, n_a, n_b)
    return detectable_effect(se, df, power, level)


def unpaired_n(effect: float, sd_a: float, sd_b: float, power: float = POWER, level: float = 0.95,
               n_max: int = 10_000) -> int | None:
    """Runs a group (both groups the same size) that a difference ``effect`` needs for ``power``;
    None if above ``n_max``."""
    _check("effect", abs(effect))
    _check_design(power, level)
    start = _normal_n(effect, math.sqrt(sd_a**2 + sd_b**2), power, level)
    return _smallest_n(lambda n: unpaired_power(effect, sd_a, sd_b, n, n, level) >= power, start, n_max)
