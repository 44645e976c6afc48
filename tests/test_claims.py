"""The decision rules of flatlib.claims on small hand-made tables, including the cases the old
notebook rules got wrong (issue 14): 3 of 3 seeds falling is not "no"; an interval that merely
contains 0 is not "unrelated"; noise does not widen "equal loss"."""

import math

import numpy as np
import pytest

from flatlib.claims import (
    DESIGN_CHANGES,
    EQUAL_LOSS_NATS,
    EQUIVALENCE_RHO,
    HELD,
    MIN_LINEAGES,
    RULE_CHANGES,
    RULES,
    Claim,
    Interval,
    combine,
    correlation_verdict,
    equal_loss,
    interval_verdict,
    paired_effect,
    t_interval,
    unrelated,
    welch_interval,
)


def test_equal_loss_is_the_paper_tolerance_on_point_estimates():
    assert EQUAL_LOSS_NATS == 0.002
    assert equal_loss(0.0080, 0.0100)  # exactly 0.002 apart
    assert not equal_loss(0.0080, 0.0101)
    assert equal_loss(0.0101, 0.0080 + 0.0019)
    with pytest.raises(ValueError, match="gap_b"):
        equal_loss(0.01, math.nan)


def test_t_interval_matches_a_hand_computation():
    # mean 2, sd 1, n 3: half-width t_{0.975, 2} * 1 / sqrt(3) = 4.302653 / 1.732051 = 2.484138
    i = t_interval([1.0, 2.0, 3.0])
    assert i.n == 3 and i.estimate == 2.0
    assert (math.isclose(i.high - 2.0, 2.484138, rel_tol=1e-6)
            and math.isclose(2.0 - i.low, 2.484138, rel_tol=1e-6))
    assert math.isnan(t_interval([1.0]).low)
    with pytest.raises(ValueError, match="values"):
        t_interval([1.0, math.inf])


def test_paired_effect_verdicts():
    falling = [-4.0, -3.5, -4.5, -3.8, -4.2, -4.1]  # the trace falls in every lineage, tightly
    assert paired_effect(falling, predicted=-1)[0] == "yes"
    assert paired_effect(falling, predicted=+1)[0] == "no"
    # 3 of 3 falling but noisy: the interval contains 0 -> inconclusive, not "no" (the old rule's error)
    verdict, interval = paired_effect([-1.0, -9.0, -2.0], predicted=-1)
    assert interval.low < 0 < interval.high and verdict == "inconclusive"
    # an effect bounded inside the equivalence band is absent: "no"
    assert paired_effect([0.1, -0.1, 0.05, -0.05], predicted=+1, equivalence=0.5)[0] == "no"
    assert paired_effect([0.1, -0.1, 0.05, -0.05], predicted=+1)[0] == "inconclusive"
    assert paired_effect([1.0], predicted=+1)[0] == "not tested"
    with pytest.raises(ValueError, match="predicted"):
        paired_effect([1.0, 2.0], predicted=0)
    with pytest.raises(ValueError, match="equivalence"):
        interval_verdict(Interval(0, -1, 1, 3), 1, -0.1)


def test_correlation_needs_lineages_and_an_interval_off_zero():
    assert MIN_LINEAGES == 5
    assert correlation_verdict(Interval(-0.6, -0.9, -0.2, 5), predicted=-1) == "yes"
    assert correlation_verdict(Interval(-0.6, -0.9, -0.2, 4), predicted=-1) == "not tested"
    assert correlation_verdict(Interval(0.5, 0.2, 0.8, 6), predicted=-1) == "no"
    assert correlation_verdict(Interval(-0.3, -0.7, 0.2, 6), predicted=-1) == "inconclusive"
    assert correlation_verdict(Interval(0.0, -0.2, 0.25, 6), predicted=-1) == "no"  # bounded inside ±0.3


def test_unrelated_needs_the_whole_interval_inside_the_bound():
    assert EQUIVALENCE_RHO == 0.3
    assert unrelated(Interval(0.05, -0.2, 0.25, 8))
    assert not unrelated(Interval(0.05, -0.6, 0.7, 8))  # contains 0 but wide: noise must not pass
    assert not unrelated(Interval(0.05, -0.2, 0.25, 3))  # too few lineages


def test_combine_parts():
    assert combine(["yes", "yes"]) == "yes"
    assert combine(["yes", "no"]) == "partly"
    assert combine(["yes", "not tested"]) == "partly"
    assert combine(["no", "no"]) == "no"
    assert combine(["no", "inconclusive"]) == "inconclusive"
    assert combine(["not tested", "not tested"]) == "not tested"
    with pytest.raises(ValueError, match="parts: unknown"):
        combine(["maybe"])
    with pytest.raises(ValueError, match="parts"):
        combine([])


def test_rules_are_printable_and_claims_name_them():
    assert "inconclusive" in HELD and set(RULES) >= {"equal loss", "paired effect", "correlation", "trace",
                                                     "probe"}
    assert all(len(change) == 4 for change in RULE_CHANGES + DESIGN_CHANGES)
    Claim("c", "p", "o", "inconclusive", "02_x", rule="equal loss, paired effect")
    with pytest.raises(ValueError, match="rule: .*equal-ish"):
        Claim("c", "p", "o", "yes", "02_x", rule="equal-ish")


def test_welch_interval_matches_scipy():
    from scipy import stats

    from flatlib.claims import welch_interval

    a, b = [1.0, 2.0, 3.0, 2.5], [3.0, 4.5, 5.0]
    i = welch_interval(a, b)
    t = stats.ttest_ind(b, a, equal_var=False)
    ci = t.confidence_interval(0.95)
    assert i.estimate == pytest.approx(sum(b) / 3 - sum(a) / 4)
    assert i.low == pytest.approx(ci.low) and i.high == pytest.approx(ci.high) and i.n == 3
    assert math.isnan(welch_interval([1.0], b).low)


def test_equal_loss_pair_takes_the_widest_and_the_narrowest_within_tolerance():
    from flatlib.claims import equal_loss_pair

    gaps = {16: 0.030, 32: 0.0125, 64: 0.0110, 128: 0.0100}
    converged = {16: False, 32: True, 64: True, 128: True}
    assert equal_loss_pair(gaps, converged) == (64, 128)  # 32 is 0.0025 nats above 128
    assert equal_loss_pair(gaps, {**converged, 64: False}) is None
    assert equal_loss_pair({32: 0.011, 128: 0.0095}, {32: True, 128: True}) == (32, 128)


def test_flatness_verdict_needs_the_trace_and_an_unrelated_gap():
    from flatlib.claims import flatness_verdict

    trace_yes, gap_flat = Interval(-0.7, -0.9, -0.4, 8), Interval(0.0, -0.2, 0.2, 8)
    assert flatness_verdict(trace_yes, gap_flat) == "yes"
    # the gap might explain it
    assert flatness_verdict(trace_yes, Interval(0.0, -0.6, 0.6, 8)) == "inconclusive"
    assert flatness_verdict(Interval(0.6, 0.3, 0.8, 8), gap_flat) == "no"
    assert flatness_verdict(Interval(-0.7, -0.9, -0.4, 3), gap_flat) == "not tested"


def test_adversary_weight_is_the_strongest_at_equal_loss():
    from flatlib.claims import adversary_weight

    # gaps rise with λ; the AdamW continuation of the same held-out seed ends at 0.0080
    gaps = {0.01: 0.0081, 0.03: 0.0095, 0.1: 0.0102, 0.3: 0.05}
    assert adversary_weight(gaps, 0.0080) == (0.03, True)  # 0.0095 is 0.0015 away; 0.1's 0.0022 is not
    assert adversary_weight({0.1: 0.02, 0.03: 0.015}, 0.0080) == (0.03, False)  # none: the smallest, flagged
    # a diverged run is no choice
    assert adversary_weight({0.1: float("nan"), 0.03: 0.0081}, 0.0080) == (0.03, True)
    with pytest.raises(ValueError, match="gaps"):
        adversary_weight({}, 0.008)
    with pytest.raises(ValueError, match="gaps"):
        adversary_weight({0.0: 0.008}, 0.008)


# ---------------------------------------------------------------------------- the smallest effect of interest
def test_equivalence_bound_per_quantity():
    from flatlib.claims import SMALLEST_EFFECT, equivalence_bound

    assert SMALLEST_EFFECT == {"accuracy": 0.01, "trace": 0.05, "gap": EQUAL_LOSS_NATS}
    for quantity in ("acc state@3", "acc A [limited]", "probe state@6", "finetune B"):
        assert equivalence_bound(quantity) == 0.01  # one point of accuracy (accuracies are fractions)
    for quantity in ("invariant_trace", "trace", "widened invariant trace", "raw trace", "invariant trace"):
        assert equivalence_bound(quantity, reference=9.0) == pytest.approx(0.45)  # 5% of the level before
    assert equivalence_bound("gap") == EQUAL_LOSS_NATS
    with pytest.raises(ValueError, match="quantity: 'loss'"):
        equivalence_bound("loss")
    with pytest.raises(ValueError, match="reference"):
        equivalence_bound("invariant_trace")  # a relative bound needs the level it is relative to
    with pytest.raises(ValueError, match="reference"):
        equivalence_bound("trace", reference=math.inf)
    # a level at or below 0 is no minimum's: no bound, and the comparison is "not tested"
    for level in (-1.0, 0.0, math.nan):
        assert math.isnan(equivalence_bound("trace", reference=level))
    assert (interval_verdict(Interval(-2.0, -3.0, -1.0, 8), -1, equivalence_bound("trace", -1.0))
            == "not tested")


def test_an_interval_inside_the_bound_is_no_even_off_zero():
    # +0.3 [+0.1, +0.5] points: detectably positive, but smaller than one point: the effect does not count
    assert interval_verdict(Interval(0.003, 0.001, 0.005, 8), +1, 0.01) == "no"
    assert interval_verdict(Interval(0.012, 0.004, 0.020, 8), +1, 0.01) == "yes"  # reaches past the bound
    assert interval_verdict(Interval(0.0, -0.011, 0.009, 8), +1, 0.01) == "inconclusive"
    assert interval_verdict(Interval(0.003, 0.001, 0.005, 8), +1, 0.0) == "yes"  # bound 0: the old rule


def test_minimum_detectable_effect_of_an_interval():
    from flatlib.claims import detectable_text, minimum_detectable
    from flatlib.stats import paired_mde, unpaired_mde

    differences = [0.012, 0.004, 0.009, 0.015]
    _, interval = paired_effect(differences, predicted=+1)
    sd = float(np.std(differences, ddof=1))
    assert minimum_detectable(interval) == pytest.approx(paired_mde(sd, 4), rel=1e-9)  # df = n - 1 by default
    a, b = [1.0, 2.0, 3.0, 2.5], [3.0, 4.5, 5.0]
    welch = welch_interval(a, b)
    assert welch.df is not None and 2 < welch.df < 5
    assert minimum_detectable(welch) == pytest.approx(
        unpaired_mde(float(np.std(a, ddof=1)), float(np.std(b, ddof=1)), 4, 3), rel=1e-9)
    assert detectable_text(interval, digits=3) == f"MDE ±{paired_mde(sd, 4):.3f} (80% power, n = 4)"
    assert detectable_text(Interval(1.0, math.nan, math.nan, 1)) == "MDE: none (n = 1, no interval)"


def test_the_bounds_are_declared_in_the_change_table():
    dated = [c for c in RULE_CHANGES if c[2] == "46154b0, 2026-12-07"]  # when: the commit and its date
    assert {c[0] for c in dated} == {"paired effect", "unpaired effect", "smallest effect"}
    assert all("before the regeneration" in c[3] and "issue" not in " ".join(c).lower() for c in dated)
    assert "smallest effect" in RULES and "±" in RULES["paired effect"]
