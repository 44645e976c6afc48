"""Notebook 05's analysis (flatlib.analysis.correlations) and figures (flatlib.plots.correlations) on small
hand-made tables: the model table, the correlations over lineages, the verdicts and claims by the
rules of flatlib.claims, and the checked summary."""

import math
from types import SimpleNamespace

import matplotlib.pyplot as plt  # headless: matplotlib falls back to Agg
import numpy as np
import pandas as pd
import pytest
from scipy import stats

from flatlib.analysis import correlations as corr
from flatlib.claims import Interval, claims_table
from flatlib.plots import correlations as plots
from flatlib.runner.experiments import ModelRef
from flatlib.stats import rank_correlation


# ---------------------------------------------------------------------------- fixtures
def ref(language="hmm", origin="02 sgd", family="2x64", lineage="hmm seed 0", key="a", step=10,
        widen_to=None):
    return ModelRef(language, origin, family, lineage, SimpleNamespace(key=key), step, widen_to)


def measurement(gap, trace, invariant, accuracies, se=0.01):
    return {"gap": gap, "gap_se": se, "trace": trace, "trace_se": 2 * se, "invariant_trace": invariant,
            "invariant_trace_se": 3 * se, "probes": {t: {"accuracy": a} for t, a in accuracies.items()}}


def models_frame(n=6, lineages=None, language="hmm", family="2x64"):
    """``n`` models within ε, one lineage each unless given: accuracy falls strictly with the
    invariant trace, the gap in an order unrelated to either."""
    trace = np.arange(1.0, n + 1)
    return pd.DataFrame({"language": language, "family": family, "origin": "02 sgd",
                         "lineage": lineages or [f"{language} seed {i}" for i in range(n)], "step": 10,
                         "gap": [0.004, 0.001, 0.005, 0.002, 0.006, 0.003][:n], "gap_se": 0.001,
                         "invariant trace": trace, "invariant trace_se": 0.1, "raw trace": trace[::-1] * 10,
                         "raw trace_se": 1.0, "acc 6": 0.9 - 0.05 * trace, "acc 10": 0.5 + 0.01 * trace,
                         "within ε": True})


def correlation_row(task, partial, gap, lineages=6, language="hmm", family="2x64", models=8):
    """One row of a correlation table with the given (value, low, high) of the partial Spearman
    correlation with the invariant trace and of the Spearman correlation with the gap."""
    row = {"language": language, "family": family, "task": task, "models": models, "lineages": lineages}
    for label, (v, lo, hi) in [("invariant trace|gap", partial), ("gap", gap),
                               ("raw trace", (0.4, 0.1, 0.7))]:
        key = f"spearman acc~{label}"
        row[key], row[f"{key} low"], row[f"{key} high"] = v, lo, hi
    return row


# ---------------------------------------------------------------------------- parameters
def test_check_parameters_names_the_bad_parameter():
    corr.check_parameters(100, "local")
    corr.check_parameters(2000, "serial")
    for bad in (99, True, 2000.0, "2000", None):
        with pytest.raises(ValueError, match=r"^n_boot: expected an integer >= 100"):
            corr.check_parameters(bad, "local")
    with pytest.raises(ValueError,
                       match=r"^backend: expected one of \('serial', 'local', 'submitit'\), got 'slurm'"):
        corr.check_parameters(2000, "slurm")


# ---------------------------------------------------------------------------- the model table
def test_model_table_takes_the_widened_traces_and_marks_epsilon():
    models = [ref(origin="02 phase 1", key="a", step=100),
              ref(origin="03 sizes", family="2x128", key="b", step=50, widen_to=128)]
    measured = [measurement(0.004, 12.0, 3.0, {"6": 0.8, "10": 0.7}),
                measurement(0.02, 20.0, 5.0, {"6": 0.6, "10": 0.65}, se=0.02)]
    widened = {1: {"trace": 30.0, "trace_se": 0.5, "invariant_trace": 7.0, "invariant_trace_se": 0.25}}
    table = corr.model_table(models, measured, widened, epsilon=0.01)
    assert list(table.columns) == ["language", "family", "origin", "lineage", "step", "gap", "gap_se",
                                   "invariant trace", "invariant trace_se", "raw trace", "raw trace_se",
                                   "acc 6", "acc 10", "within ε"]
    assert table["invariant trace"].tolist() == [3.0, 7.0]  # the second model's traces after widening
    assert table["raw trace"].tolist() == [12.0, 30.0] and table["raw trace_se"].tolist() == [0.02, 0.5]
    # never widened
    assert table["gap"].tolist() == [0.004, 0.02] and table["gap_se"].tolist() == [0.01, 0.02]
    assert table["acc 10"].tolist() == [0.7, 0.65] and table["step"].tolist() == [100, 50]
    assert table["within ε"].tolist() == [True, False]
    with pytest.raises(ValueError, match="measured"):
        corr.model_table(models, measured[:1], {}, epsilon=0.01)


def test_collect_models_leaves_out_diverged_runs_and_widens(monkeypatch):
    models = [ref(key="a", step=10), ref(key="a", step=20), ref(key="d", step=10, lineage="hmm seed 1"),
              ref(origin="03 sizes", family="2x128", key="w", step=5, widen_to=128)]

    def run_configs(configs, backend, workers, progress):
        assert backend == "serial" and workers == 3 and [c.key for c in configs] == ["a", "d", "w"]
        return [SimpleNamespace(config=c, run=SimpleNamespace(key=c.key,
                                                              summary=lambda k=c.key: {"diverged": k == "d"}))
                for c in configs]

    def measure_checkpoints(checkpoints, protocol, workers):
        assert [(run.key, step) for run, step in checkpoints] == [("a", 10), ("a", 20), ("w", 5)]
        return [measurement(0.001 * step, step, step / 10, {"6": 0.5}) for _, step in checkpoints]

    def measure_many(kind, items, protocol, workers):
        assert (kind == "widened_trace"
                and [(run.key, step, kw) for run, step, kw in items] == [("w", 5, {"width": 128})])
        return [{"trace": 99.0, "trace_se": 1.0, "invariant_trace": 9.0, "invariant_trace_se": 0.5}]

    monkeypatch.setattr(corr, "experiment_models", lambda params, names: models)
    chosen = []
    monkeypatch.setattr(corr, "choose_adversary_weights",
                        lambda params, backend: chosen.append(backend) or (params, {}))
    monkeypatch.setattr(corr, "run_configs", run_configs)
    monkeypatch.setattr(corr, "measure_checkpoints", measure_checkpoints)
    monkeypatch.setattr(corr, "measure_many", measure_many)
    params = {"seed": 0, "pretraining": {"workers": 3, "epsilon": 0.015}}
    got = corr.collect_models(params, ["hmm"], protocol=None, backend="serial")
    assert got.runs == 3 and got.diverged == ("d",)
    assert chosen == ["serial"]  # the adversary's weights are notebook 04's held-out choice
    assert got.table["step"].tolist() == [10, 20, 5]
    assert (got.table["invariant trace"].tolist() == [1.0, 2.0, 9.0]
            and got.table["raw trace"].tolist() == [10, 20, 99.0])
    assert got.table["within ε"].tolist() == [True, False, True]
    text = got.describe(0.015)
    assert text.startswith("left out the checkpoints of 1 diverged run(s): ['d']\n3 models (3 runs; trained "
                           "in 0 s")
    assert text.endswith("2 within ε = 0.015")


def test_model_summary_counts_and_averages_per_origin():
    table = pd.concat([models_frame(4), models_frame(2, family="2x128").assign(origin="03 sizes")],
                      ignore_index=True)
    table.loc[0, "within ε"] = False
    summary = corr.model_summary(table)
    assert summary.index.tolist() == [("hmm", "2x128", "03 sizes"), ("hmm", "2x64", "02 sgd")]
    row = summary.loc[("hmm", "2x64", "02 sgd")]
    assert row["models"] == 4 and row["within_eps"] == 3
    assert row["gap"] == 0.003 and row["invariant_trace"] == 2.5 and row["raw_trace"] == 25.0
    assert summary.loc[("hmm", "2x128", "03 sizes"), "gap"] == 0.0025  # rounded to 4 decimals


# ---------------------------------------------------------------------------- correlations
def test_correlation_table_on_a_known_ranking():
    frame = pd.concat([models_frame(6), models_frame(3, family="2x128"),  # 3 models: too few, no row
                       # one lineage: no row
                       models_frame(5, family="4x64", lineages=["one"] * 5)], ignore_index=True)
    table = corr.correlation_table(frame, {"hmm": ("6", "10")}, n_boot=200, seed=0)
    assert table[["language", "family", "task", "models", "lineages"]].values.tolist() == [
        ["hmm", "2x64", "6", 6, 6], ["hmm", "2x64", "10", 6, 6]]
    a, b = table.iloc[0], table.iloc[1]
    # accuracy on task 6 falls strictly with the invariant trace: -1 however resampled
    for key in ("spearman acc~invariant trace", "kendall acc~invariant trace"):
        assert (a[key], a[f"{key} low"], a[f"{key} high"]) == pytest.approx((-1.0, -1.0, -1.0))
    # and given the gap (the partial's resamples whose gap and trace ranks nearly coincide are less exact)
    partial = rank_correlation(frame["invariant trace"][:6], frame["acc 6"][:6], "spearman", n_boot=200,
                               seed=0, groups=frame["lineage"][:6], given=frame["gap"][:6])
    key = "spearman acc~invariant trace|gap"
    assert (a[key] == pytest.approx(-1.0)
            and (a[f"{key} low"], a[f"{key} high"]) == (partial.low, partial.high))
    assert (b["spearman acc~invariant trace"] == pytest.approx(1.0)
            and a["spearman acc~raw trace"] == pytest.approx(1.0))
    gap, acc = frame["gap"][:6], frame["acc 6"][:6]
    assert a["spearman acc~gap"] == pytest.approx(stats.spearmanr(gap, acc).statistic)
    assert a["kendall acc~gap"] == pytest.approx(stats.kendalltau(gap, acc).statistic)
    expected = rank_correlation(gap, acc, "spearman", n_boot=200, seed=0, groups=frame["lineage"][:6])
    assert (a["spearman acc~gap low"], a["spearman acc~gap high"]) == (expected.low, expected.high)
    assert corr.correlation_table(models_frame(3), {"hmm": ("6",)}, n_boot=200, seed=0).empty


def test_spearman_interval_reads_one_row():
    row = correlation_row("6", (-0.5, -0.8, -0.1), (0.1, -0.2, 0.25), lineages=7)
    assert corr.spearman_interval(row, "invariant trace|gap") == Interval(-0.5, -0.8, -0.1, 7)
    assert corr.spearman_interval(row, "gap") == Interval(0.1, -0.2, 0.25, 7)


# ---------------------------------------------------------------------------- verdicts and claims
def test_flatness_claims_decide_per_task_and_combine():
    table = pd.DataFrame([
        correlation_row("6", (-0.8, -0.95, -0.5), (0.05, -0.2, 0.25)),  # yes: below 0, gap unrelated
        correlation_row("10", (-0.6, -0.9, 0.1), (0.05, -0.2, 0.25)),  # inconclusive: the interval reaches 0
        # 3 lineages
        correlation_row("A", (-0.8, -0.95, -0.5), (0.1, -0.2, 0.5), language="pcfg", lineages=3),
    ])
    models = pd.concat([models_frame(6), models_frame(2, language="teacher")])
    claims = corr.claims(table, models, ["hmm", "pcfg", "teacher"], epsilon=0.01)
    assert [c.held for c in claims] == ["partly", "not tested", "not tested"]
    hmm, pcfg, teacher = claims
    assert hmm.claim.startswith("hmm (2x64): among models at the optimal loss")
    assert hmm.detail == ("8 models within ε = 0.01 from 6 training lineages; 95% bootstrap CIs over "
                          "lineages; per task: yes, inconclusive")
    assert hmm.ours.startswith("6: partial ρ(inv. trace | gap) -0.8 [-0.95, -0.5] (n = 6), ρ(gap) +0.05 "
                               "[-0.20, +0.25], ρ(raw trace) +0.40; 10: partial ρ(inv. trace | gap) -0.6 "
                               "[-0.9, +0.1] (n = 6)")
    assert hmm.notebook == corr.NOTEBOOK and hmm.figure == "05_correlations.png"
    assert "from 3 training lineages" in pcfg.detail and "per task: not tested" in pcfg.detail
    assert teacher.ours == "2 models within ε = 0.01: too few to correlate" and teacher.figure == ""
    assert teacher.rule == "correlation"


def test_flatness_claims_gap_related_is_not_yes_and_no_rows_is_not_tested():
    both = pd.DataFrame([correlation_row("6", (-0.8, -0.95, -0.5), (0.05, -0.2, 0.25)),
                         correlation_row("10", (-0.7, -0.9, -0.4), (0.05, -0.2, 0.25))])
    assert [c.held for c in corr.claims(both, models_frame(6), ["hmm"], 0.01)] == ["yes"]
    # accuracy tracks the gap
    related = pd.DataFrame([correlation_row("6", (-0.8, -0.95, -0.5), (-0.5, -0.8, -0.2))])
    assert [c.held for c in corr.claims(related, models_frame(6), ["hmm"], 0.01)] == ["inconclusive"]
    rising = pd.DataFrame([correlation_row("6", (0.8, 0.5, 0.95), (0.05, -0.2, 0.25))])  # flatter is worse
    assert [c.held for c in corr.claims(rising, models_frame(6), ["hmm"], 0.01)] == ["no"]
    none = corr.claims(pd.DataFrame(), models_frame(3), ["hmm"], 0.01)
    assert [(c.held, c.ours) for c in none] == [("not tested",
                                                 "3 models within ε = 0.01: too few to correlate")]


def test_claims_table_shows_claim_verdict_and_detail():
    claims = corr.claims(pd.DataFrame([correlation_row("6", (-0.8, -0.95, -0.5),
                                                                (0.05, -0.2, 0.25))]),
                                  models_frame(6), ["hmm"], 0.01)
    table = claims_table(claims, corr.CLAIM_COLUMNS)
    assert list(table.columns) == ["claim", "held", "detail"] and table["held"].tolist() == ["yes"]
    assert table["detail"][0].endswith("per task: yes")


# ---------------------------------------------------------------------------- the checked summary
def test_check_tables_passes_good_tables_and_names_the_bad_value():
    models = models_frame(6)
    table = corr.correlation_table(models, {"hmm": ("6", "10")}, n_boot=100, seed=0)
    corr.check_tables(models, table, {"hmm": ("6", "10")})
    with pytest.raises(AssertionError):
        corr.check_tables(models.assign(gap=0.0), table, {"hmm": ("6",)})
    with pytest.raises(AssertionError):
        corr.check_tables(models.assign(**{"raw trace": math.inf}), table, {"hmm": ("6",)})
    with pytest.raises(AssertionError, match="hmm"):
        corr.check_tables(models.assign(**{"acc 10": 0.0}), table, {"hmm": ("6", "10")})
    outside = table.copy()
    outside.loc[1, "kendall acc~gap"] = outside.loc[1, "kendall acc~gap high"] + 0.1
    with pytest.raises(AssertionError, match=r"\('hmm', '10', 'kendall acc~gap'\)"):
        corr.check_tables(models, outside, {"hmm": ("6", "10")})
    undefined = table.copy()
    undefined.loc[0, ["spearman acc~gap", "spearman acc~gap low", "spearman acc~gap high"]] = math.nan
    corr.check_tables(models, undefined, {"hmm": ("6", "10")})  # an undefined correlation is allowed


def test_summary_rounds_and_names_every_verdict():
    models = pd.concat([models_frame(6), models_frame(2, family="2x128").assign(**{"within ε": False})],
                       ignore_index=True)
    table = pd.DataFrame([correlation_row("6", (-0.84, -0.95, -0.5), (0.05, -0.2, 0.25))])
    claims = corr.claims(table, models, ["hmm"], 0.01)
    params = {"profile": "smoke", "seed": 3, "pretraining": {"epsilon": 0.01}}
    assert corr.summary(params, models, table, claims).splitlines() == [
        "05_flatness_and_downstream · profile=smoke · seed=3 · ε=0.01 · 8 models, 6 within ε",
        " hmm 2x128: 0/2 within ε",
        " hmm 2x64: 6/6 within ε",
        " hmm 2x64 6: partial ρ(acc,inv. trace|gap) -0.8 · ρ(acc,raw trace) +0.4 · ρ(acc,gap) +0.1",
        "claim: hmm (2x64) -> yes",
        "profile smoke: tiny models, a few dozen steps: these numbers mean nothing",
        "checks passed: gaps, traces and accuracies finite · correlations inside their intervals"]
    assert len(corr.summary({**params, "profile": "cpu"}, models, table, claims).splitlines()) == 6


# ---------------------------------------------------------------------------- figures
def test_accuracy_vs_trace_and_gap_draws_one_panel_per_task_and_axis():
    models = pd.concat([models_frame(4), models_frame(2, family="2x128").assign(origin="03 sizes")],
                       ignore_index=True)
    fig = plots.accuracy_vs_trace_and_gap(models, "hmm", ("6", "10"), families=["4x64", "2x64", "2x128"])
    axes = np.array(fig.axes).reshape(3, 2)
    assert [ax.get_xlabel() for ax in axes[:, 0]] == ["invariant trace (full gauge fixed)",
                                                      "raw Hessian trace (mean loss, nats)",
                                                      "gap to the optimum (nats)"]
    assert axes[0, 1].get_title() == "hmm · task 10"
    lines = axes[0, 0].get_lines()
    # markers by the sorted families (2x128: o, 2x64: s), colours by origin
    assert [(line.get_marker(), line.get_color()) for line in lines] == [("s", "C0"), ("o", "C2")]
    assert lines[0].get_xdata().tolist() == [1.0, 2.0, 3.0, 4.0]
    assert lines[0].get_ydata().tolist() == pytest.approx([0.85, 0.8, 0.75, 0.7])
    assert axes[0, 1].get_legend() is not None and axes[0, 0].get_legend() is None
    plt.close(fig)
    with pytest.raises(ValueError, match="pcfg"):
        plots.accuracy_vs_trace_and_gap(models, "pcfg", ("A",), families=["2x64"])


def test_correlation_forest_plots_three_intervals_per_row():
    table = pd.DataFrame([correlation_row("6", (-0.8, -0.95, -0.5), (0.05, -0.2, 0.25)),
                          correlation_row("10", (-0.6, -0.9, 0.1), (0.1, -0.3, 0.4))])
    fig = plots.correlation_forest(table)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["hmm · 2x64 · 6 (n=8)", "hmm · 2x64 · 10 (n=8)"]
    points = [line for line in ax.get_lines() if line.get_marker() == "o"]
    assert [line.get_color() for line in points] == ["C0", "0.5", "C1"]
    assert points[0].get_xdata().tolist() == [-0.8, -0.6] and points[0].get_ydata().tolist() == [-0.25, 0.75]
    assert points[2].get_xdata().tolist() == [0.05, 0.1]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [
        "accuracy ~ invariant trace|gap (partial)", "accuracy ~ raw trace", "accuracy ~ gap"]
    plt.close(fig)
    with pytest.raises(ValueError, match="correlations"):
        plots.correlation_forest(pd.DataFrame())


def test_lineage_seeds_cover_notebook_05s_lineages():
    params = {"seed": 10, "pretraining": {"seeds": 3, "correlation_seeds": 5}}
    from flatlib.runner.experiments import lineage_seeds, training_seeds

    assert lineage_seeds(params) == [10, 11, 12, 13, 14] and training_seeds(params) == [10, 11, 12]
    assert lineage_seeds({"seed": 0, "pretraining": {"seeds": 3, "correlation_seeds": 2}}) == [0, 1, 2]
