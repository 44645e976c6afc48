"""Small statistics the notebooks share: differences of means with Welch confidence intervals, and
rank correlations with bootstrap confidence intervals.

Every function returns plain floats; a confidence interval is ``(low, high)``. Seeds are explicit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats


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
    return Difference(delta, float(stats.t.ppf(0.5 + level / 2, dof) * se), len(a), len(b))


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
    if z is not None:  # partial Spearman: rho_xy.z = (r_xy - r_xz r_yz) / sqrt((1 - r_xz^2)(1 - r_yz^2)) on ranks
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
