"""flatlib.analysis.size (notebook 03's analysis) and flatlib.plots.size on small hand-made tables: known
gaps, accuracies and traces give the known equal-loss pair, effects, verdicts and claim texts."""

import math

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest

from flatlib.analysis import size
from flatlib.claims import claims_table
from flatlib.measurement.measure import Protocol
from flatlib.plots import size as size_plots

T_975_2 = 4.302653  # t quantile for 3 values
T_975_4 = 2.776445  # Welch dof for two groups of 3 with equal variances


class FakeRun:
    """What the analysis reads of a run: its summary and its metrics."""

    def __init__(self, summary, metrics=None):
        self._summary, self._metrics = summary, metrics

    def summary(self):
        return self._summary

    def metrics(self):
        return self._metrics


def summary_of(gap, n_params, diverged=False):
    out = {"final_gap": gap, "final_gap_se": gap / 100, "n_params": n_params, "steps": 100}
    if diverged:
        out["diverged"] = True
    return out


PARAMS = {16: 1000, 32: 4000, 64: 16000}


def sizes_frame(gaps):
    """``sizes`` from {(language, width): [gap per seed]} (NaN: diverged)."""
    runs = {(name, w, s): FakeRun(summary_of(g, PARAMS[w], diverged=math.isnan(g)))
            for (name, w), values in gaps.items() for s, g in enumerate(values)}
    return size.size_table(runs, epsilon=0.025)


# hmm: width 16 above ε; 32 and 64 converged, mean gaps 0.0120 and 0.0110 (equal loss)
GAPS = {("hmm", 16): [0.05, 0.06, 0.04], ("hmm", 32): [0.011, 0.012, 0.013],
        ("hmm", 64): [0.010, 0.011, 0.012]}
# rises by 0.10 from 32 to 64
PROBE = {16: [0.50, 0.51, 0.52], 32: [0.60, 0.61, 0.62], 64: [0.70, 0.71, 0.72]}
TRACE = {16: [90.0, 100.0, 110.0], 32: [28.0, 30.0, 32.0], 64: [18.0, 20.0, 22.0]}  # falls by 10


def measured_frame(sizes, language="hmm"):
    rows = []
    for w in (16, 32, 64):
        for s in range(3):
            rows.append({"language": language, "width": w, "seed": s, "probe A": PROBE[w][s],
                         "finetune A": PROBE[w][s] - 0.01, "raw trace": 3 * TRACE[w][s],
                         "raw trace se": 1.0, "invariant trace": 2 * TRACE[w][s], "invariant trace se": 1.0,
                         "widened trace": 4 * TRACE[w][s], "widened trace se": 1.0,
                         "widened invariant trace": TRACE[w][s], "widened invariant trace se": 0.5})
    return sizes.merge(pd.DataFrame(rows), on=["language", "width", "seed"])


# ---------------------------------------------------------------------------- parameters
def test_parameters_applies_the_overrides_and_names_a_bad_parameter():
    p = size.parameters("smoke", 3, n_seeds=2, widths=[4, 16], backend="serial")
    assert p["pretraining"]["seeds"] == 2 and p["model_size"]["widths"] == [4, 16] and p["seed"] == 3
    assert p["model_size"]["languages"] == ["hmm"]  # None keeps the profile's value
    with pytest.raises(ValueError, match="backend"):
        size.parameters("smoke", 0, backend="cloud")
    with pytest.raises(ValueError, match="model_size.widths"):
        size.parameters("smoke", 0, widths=[8, 12])  # 8 does not divide 12
    with pytest.raises(ValueError, match="profile"):
        size.parameters("nope", 0)
    text = size.describe(p)
    assert "model_size.widths: [4, 16]" in text and "pretraining.seeds: 2" in text
    assert len(text.splitlines()) == len(p["model_size"]) + 8


def test_design_and_configs():
    p = size.parameters("smoke", 3, n_seeds=2)
    d = size.design(p)
    assert d.seeds == [3, 4] and d.widths == [8, 16] and d.widest == 16
    assert d.tasks == {"hmm": ("state@3", "state@6")} and d.protocol.seed == 3
    assert d.epsilon == p["pretraining"]["epsilon"]
    configs = size.configs(p, d)
    assert list(configs) == [("hmm", 16, 3), ("hmm", 16, 4), ("hmm", 8, 3), ("hmm", 8, 4)]  # widest first
    assert {c.lr for c in configs.values()} == {p["pretraining"]["lr"]}  # one lr for every width
    assert configs["hmm", 8, 4].model["d_model"] == 8 and configs["hmm", 8, 4].seed == 4
    assert configs["hmm", 8, 4].steps == p["model_size"]["steps"]["hmm"]


# ---------------------------------------------------------------------------- training tables
def test_size_table_converged_and_mean_gaps():
    sizes = sizes_frame({("hmm", 16): [0.05, math.nan], ("hmm", 32): [0.02, 0.01]})
    assert list(sizes["width"]) == [16, 16, 32, 32] and list(sizes["seed"]) == [0, 1, 0, 1]
    diverged = sizes[sizes.diverged]
    assert len(diverged) == 1 and math.isnan(diverged["gap"].iloc[0]) and not diverged["within ε"].iloc[0]
    assert list(sizes["within ε"]) == [False, False, True, True]
    assert size.converged(sizes) == {("hmm", 16): False, ("hmm", 32): True}
    gaps = size.mean_gaps(sizes)
    assert gaps["hmm", 16] == 0.05 and gaps["hmm", 32]  # a diverged seed has no gap == pytest.approx(0.015)
    summary = size.width_summary(sizes)
    assert summary.loc[("hmm", 32)].to_dict() == {"parameters": 4000, "gap_mean": 0.015, "gap_max": 0.02,
                                                 "within_eps": 2}
    assert size.parameter_counts(sizes).to_dict() == {("hmm", 16): 1000, ("hmm", 32): 4000}


def test_gap_curves_and_per_width():
    runs = {("hmm", 16, s): FakeRun({},
                                    pd.DataFrame({"step": [10, 20], "gap": [1.0 + s, 0.5 + s], "loss": 0.0}))
            for s in range(2)}
    curves = size.gap_curves(runs)
    assert list(curves.columns) == ["language", "width", "seed", "step", "gap"]
    assert curves[curves.seed == 1]["gap"].tolist() == [2.0, 1.5]
    frame = pd.DataFrame({"width": [8, 8, 8, 16], "x": [1.0, 2.0, 3.0, 5.0]})
    st = size.per_width(frame, "x")
    assert st.loc[8, "mean"] == 2.0 and st.loc[8, "ci"] == pytest.approx(T_975_2 / math.sqrt(3), rel=1e-6)
    assert st.loc[16, "mean"] == 5.0 and math.isnan(st.loc[16, "ci"])  # one seed: no interval


# ---------------------------------------------------------------------------- measurements
def checkpoint_result(trace, probe):
    return {"trace": trace, "trace_se": 1.0, "invariant_trace": trace / 2, "invariant_trace_se": 0.5,
            "probes": {"A": {"accuracy": probe}}, "trace_description": "Hutchinson"}


def test_measure_leaves_out_diverged_runs_and_widens_only_the_narrower(monkeypatch):
    calls = {}

    def fake_checkpoints(finals, protocol, workers):
        calls["checkpoint"] = [(run, step) for run, step in finals]
        return [checkpoint_result(10.0 * i, 0.5) for i in range(len(finals))]

    def fake_many(kind, items, protocol, workers):
        calls[kind] = items
        if kind == "widened_trace":
            return [{"trace": 1.0, "max_logit_change": 1e-6} for _ in items]
        return [{"accuracy": {"A": 0.6}} for _ in items]

    monkeypatch.setattr(size, "measure_checkpoints", fake_checkpoints)
    monkeypatch.setattr(size, "measure_many", fake_many)
    monkeypatch.setattr(size, "lookup_table_probe", lambda spec, protocol: {"A": {"accuracy": spec["n"]}})
    runs = {("hmm", 64, 0): FakeRun(summary_of(0.01, 1)), ("hmm", 32, 0): FakeRun(summary_of(0.01, 1)),
            ("hmm", 32, 1): FakeRun(summary_of(math.nan, 1, diverged=True))}
    configs = {key: type("Config", (), {"steps": 100 + key[1]})() for key in runs}
    d = size.Design(seeds=[0, 1], languages=["hmm"], widths=[32, 64], epsilon=0.025, protocol=Protocol(),
                    tasks={"hmm": ("A",)}, specs={"hmm": {"n": 0.9}})
    m = size.measure(runs, configs, d, finetune_epochs=7, workers=2)
    assert m.left_out == [("hmm", 32, 1)]
    assert list(m.checkpoint) == [("hmm", 64, 0), ("hmm", 32, 0)]
    assert [step for _, step in calls["checkpoint"]] == [164, 132]
    assert list(m.widened) == [("hmm", 32, 0)]  # the widest model is not widened
    assert calls["widened_trace"] == [(runs["hmm", 32, 0], 132, {"width": 64})]
    assert [args for _, _, args in calls["finetune"]] == [{"epochs": 7}, {"epochs": 7}]
    assert m.lookup == {"hmm": {"A": {"accuracy": 0.9}}} and m.trace_description == "Hutchinson"


def test_measurement_table_merges_probes_finetune_and_widened_traces():
    sizes = sizes_frame({("hmm", 32): [0.012], ("hmm", 64): [0.011]})
    m = size.RunMeasurements(
        checkpoint={("hmm", 32, 0): checkpoint_result(40.0, 0.6),
                    ("hmm", 64, 0): checkpoint_result(30.0, 0.7)},
        widened={("hmm", 32, 0): {"trace": 50.0, "trace_se": 2.0, "invariant_trace": 20.0,
                                  "invariant_trace_se": 1.5, "max_logit_change": 3e-5}},
        finetune={("hmm", 32, 0): {"accuracy": {"A": 0.65}}, ("hmm", 64, 0): {"accuracy": {"A": 0.75}}},
        lookup={}, left_out=[])
    table, max_change = size.measurement_table(sizes, m, widest=64)
    assert max_change == 3e-5
    narrow, wide = table.set_index("width").loc[32], table.set_index("width").loc[64]
    assert narrow["raw trace"] == 40.0 and narrow["invariant trace"] == 20.0
    assert narrow["widened trace"] == 50.0 and narrow["widened invariant trace"] == 20.0
    assert narrow["widened invariant trace se"] == 1.5
    # its own parameterization
    assert wide["widened trace"] == 30.0 and wide["widened invariant trace"] == 15.0
    assert narrow["probe A"] == 0.6 and narrow["finetune A"] == 0.65 and wide["finetune A"] == 0.75
    assert narrow["gap"] == 0.012 and narrow["parameters"] == 4000  # from the run's own summary
    assert "l2 A" not in table  # probe protocol 1 records no single chosen L2
    m.checkpoint["hmm", 32, 0]["probes"]["A"]["l2"] = 3e-5  # protocol 2's one choice
    assert size.measurement_table(sizes, m, widest=64)[0].set_index("width").loc[32, "l2 A"] == 3e-5
    with pytest.raises(KeyError):  # a narrower model without its widened traces
        size.measurement_table(sizes, size.RunMeasurements(m.checkpoint, {}, m.finetune, {}, []), widest=64)


# ---------------------------------------------------------------------------- verdicts and claims
@pytest.fixture(scope="module")
def equal_loss():
    """``sizes`` and the verdict table of GAPS / PROBE / TRACE (the bootstrap takes a moment)."""
    sizes = sizes_frame(GAPS)
    return sizes, size.verdict_table(measured_frame(sizes), sizes, {"hmm": ("A",)}, seed=0)


def test_verdict_table_compares_the_equal_loss_pair(equal_loss):
    verdict = equal_loss[1]
    assert list(verdict["quantity"]) == ["probe A", "finetune A", "widened invariant trace", "widened trace",
                                         "invariant trace", "raw trace"]
    v = verdict.set_index("quantity")
    assert v["tested"].all() and list(v["decides"]) == [True, False, True, False, False, False]
    probe = v.loc["probe A"]
    assert (probe["from width"], probe["to width"]) == (32, 64)  # 16 is above ε
    assert probe["before"] == pytest.approx(0.61) and probe["after"] == pytest.approx(0.71)
    half = T_975_4 * math.sqrt(2 * 1e-4 / 3)  # Welch, two groups of 3 with sd 0.01
    assert probe["delta"] == pytest.approx(0.10)
    assert probe["high"] - probe["delta"] == pytest.approx(half, rel=1e-5)
    assert probe["verdict"] == "yes"
    assert probe["gap before"] == pytest.approx(0.012) and probe["gap after"] == pytest.approx(0.011)
    # Spearman over the 6 converged models: parameter ranks (2,2,2,5,5,5) against 1..6
    assert probe["spearman"] == pytest.approx(math.sqrt(13.5 / 17.5))
    trace = v.loc["widened invariant trace"]
    assert trace["delta"] == pytest.approx(-10.0) and trace["verdict"] == "yes"  # predicted to fall
    assert v.loc["raw trace", "delta"] == pytest.approx(-30.0)


def test_verdict_table_without_an_equal_loss_pair_is_not_tested():
    gaps = {**GAPS, ("hmm", 32): [0.016, 0.017, 0.018]}  # mean 0.017: 0.006 above the widest
    sizes = sizes_frame(gaps)
    verdict = size.verdict_table(measured_frame(sizes), sizes, {"hmm": ("A",)}, seed=0)
    assert not verdict["tested"].any() and "verdict" not in verdict.columns


def test_a_falling_accuracy_is_no_and_a_noisy_one_inconclusive():
    sizes = sizes_frame(GAPS)
    measured = measured_frame(sizes)
    measured.loc[measured.width == 64, "probe A"] = [0.50, 0.51, 0.52]  # falls by 0.10
    measured.loc[measured.width == 64, "finetune A"] = [0.30, 0.90, 0.70]  # mean up, but noisy
    v = size.verdict_table(measured, sizes, {"hmm": ("A",)}, seed=0).set_index("quantity")
    assert v.loc["probe A", "verdict"] == "no" and v.loc["finetune A", "verdict"] == "inconclusive"


def test_size_claims_carry_the_numbers_and_the_paper(equal_loss):
    sizes, verdict = equal_loss
    transfer, flatter = size.claims(verdict, sizes, {"hmm": ("A",)}, n_seeds=3)
    assert transfer.held == "yes" and transfer.paper == size.PAPER["hmm"][0]
    assert (transfer.ours.startswith("width 32 -> 64: A +0.100 [")
            and "Welch 95% CI over 3 seeds" in transfer.ours)
    assert transfer.detail == "gap 0.0120 -> 0.0110 nats; one lr for every width"
    assert transfer.notebook == "03_model_size" and transfer.figure == "03_size_accuracy.png"
    assert flatter.held == "yes" and flatter.paper == "falls (Fig. 5)"
    assert flatter.ours.startswith("width 32 -> 64: invariant 30.00 -> 20.00 (-10.00 [")
    assert "raw 120.0 -> 80.0 (-40.0 [" in flatter.ours and "Spearman with size -0.88 [" in flatter.ours
    assert flatter.detail.endswith("the raw widened trace's own verdict: yes")
    table = claims_table([transfer, flatter])
    assert list(table.columns) == ["claim", "ours", "held"] and list(table["held"]) == ["yes", "yes"]


def test_size_claims_not_tested_list_every_width_gap():
    gaps = {**GAPS, ("hmm", 32): [0.016, 0.017, 0.018]}
    sizes = sizes_frame(gaps)
    verdict = size.verdict_table(measured_frame(sizes), sizes, {"hmm": ("A",)}, seed=0)
    claims = size.claims(verdict, sizes, {"hmm": ("A",)}, n_seeds=3)
    assert [c.held for c in claims] == ["not tested", "not tested"]
    assert claims[0].ours == ("no two converged widths at equal loss (mean gaps: w16 0.0500 (>ε), w32 "
                              "0.0170, w64 0.0110)")
    assert claims[1].paper == "falls (Fig. 5)" and claims[1].rule == "equal-loss pair"


# ---------------------------------------------------------------------------- the checked summary
def test_check_measurements():
    sizes = sizes_frame(GAPS)
    measured = measured_frame(sizes)
    lookup = {"hmm": {"A": {"accuracy": 0.8, "bayes": 0.70, "bayes_se": 0.001, "ci95": 0.003}}}
    size.check_measurements(measured, 1e-6, lookup)  # 0.72 <= 0.70 + 0.003 + 0.009 + 0.03
    with pytest.raises(AssertionError, match="widening changed a logit by 0.01"):
        size.check_measurements(measured, 0.01, lookup)
    with pytest.raises(AssertionError, match="hmm"):
        size.check_measurements(measured, 1e-6, {"hmm": {"A": {**lookup["hmm"]["A"], "bayes": 0.6}}})
    bad = measured.copy()
    bad.loc[0, "widened trace se"] = 0.0
    with pytest.raises(AssertionError):
        size.check_measurements(bad, 1e-6, lookup)
    bad = measured.copy()
    bad.loc[0, "finetune A"] = 1.2
    with pytest.raises(AssertionError):
        size.check_measurements(bad, 1e-6, lookup)


def test_summary(equal_loss):
    sizes, verdict = equal_loss
    measured = measured_frame(sizes)
    claims = size.claims(verdict, sizes, {"hmm": ("A",)}, n_seeds=3)
    # model_size.steps, not pretraining.steps
    params = {"profile": "smoke", "model_size": {"n_layer": 1, "steps": 60}}
    d = size.Design(seeds=[0, 1, 2], languages=["hmm"], widths=[16, 32, 64], epsilon=0.025,
                    protocol=Protocol(), tasks={"hmm": ("A",)}, specs={})
    lines = size.summary(params, d, measured, claims).splitlines()
    assert lines[0] == ("03_model_size · profile=smoke · seeds=[0, 1, 2] · widths=[16, 32, 64] (1 layers) · "
                        "60 steps · ε=0.025")
    assert lines[2] == (" hmm w32  : gap 0.012 (3/3 within ε) · A 0.61 · trace raw 90 widened 120 · "
                        "invariant widened 30.0")
    assert lines[4] == f"claim: {claims[0].claim} -> yes"
    assert "these numbers mean nothing" in lines[-2] and lines[-1].startswith("checks passed")


# ---------------------------------------------------------------------------- figures
def test_figures_draw_the_tables():
    sizes = sizes_frame(GAPS)
    measured = measured_frame(sizes)
    runs = {(name, w, s): FakeRun({}, pd.DataFrame({"step": [10, 20], "gap": [0.1 * (s + 1), w / 1000]}))
            for (name, w) in GAPS for s in range(3)}
    fig = size_plots.gap(size.gap_curves(runs), sizes, ["hmm"], 0.025)
    first = fig.axes[0].lines[0]  # width 16: mean over seeds
    assert np.allclose(first.get_ydata(), [0.2, 0.016]) and "width 16 (1k params)" == first.get_label()
    plt.close(fig)

    lookup = {"hmm": {"A": {"accuracy": 0.8}}}
    fig = size_plots.accuracy(measured, sizes, lookup, {"hmm": ("A",)}, finetune_epochs=5)
    ax = fig.axes[0]
    probe_line = ax.containers[0].lines[0]  # the probe's error bar line: means over seeds against parameters
    assert np.allclose(probe_line.get_ydata(), [0.51, 0.61, 0.71])
    assert np.allclose(probe_line.get_xdata(), [1000, 4000, 16000])
    hollow = [line.get_markerfacecolor() for line in ax.lines if line.get_marker() == "o"]
    assert hollow[0] == "white" and hollow[1] != "white"  # width 16 did not converge
    assert any(line.get_label() == "lookup-table probe 0.800" for line in ax.lines)
    plt.close(fig)

    fig = size_plots.traces(measured, sizes, ["hmm"], 0.025)
    assert len(fig.axes) == 4 and fig.axes[3].get_title() == "hmm: invariant trace after widening to 64"
    assert np.allclose(fig.axes[3].containers[0].lines[0].get_ydata(), [100.0, 30.0, 20.0])
    assert fig.axes[3].get_ylim() == pytest.approx((0.0, 110.0 + 0.3 * 92.0))
    plt.close(fig)
