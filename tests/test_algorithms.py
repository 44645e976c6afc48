"""flatlib.analysis.algorithms (notebook 04's analysis) and flatlib.plots.algorithms on small hand-made
tables and stand-in runs: known effects give the known intervals and verdicts, claims quote the
numbers, the summary checks fail with their messages."""

import math

import matplotlib
import numpy as np
import pandas as pd
import pytest

from flatlib.analysis import algorithms
from flatlib.claims import minimum_detectable, welch_interval
from flatlib.plots import algorithms as plots
from flatlib.runner.experiments import training_seeds
from flatlib.stats import detectable_effect

matplotlib.use("Agg")


class FakeRun:
    """What the analysis reads from a ``flatlib.runner.runs.Run``: metrics and summary."""

    def __init__(self, name, metrics, diverged=False):
        self.name, self._metrics, self._diverged = name, pd.DataFrame(metrics), diverged

    def metrics(self):
        return self._metrics.copy()

    def summary(self):
        return {"diverged": self._diverged}

    def __repr__(self):
        return f"Run({self.name}, finished)"


@pytest.fixture(scope="module")
def smoke():
    """The smoke profile with the adversary's weights given (as the notebook's `weights` parameter)."""
    return algorithms.parameters("smoke", 0, weights={"hmm": 0.1, "pcfg": 0.1, "teacher": 0.1})


def small_params(languages=("x",), n_seeds=3, epsilon=0.025):
    """The keys of a resolved profile that the claims and the summary read (no languages built)."""
    return {"profile": "cpu", "seed": 0,
            "pretraining": {"seeds": n_seeds, "epsilon": epsilon, "continue_steps": 100, "adamw_lr": 3e-4,
                            "sgd_lr": 0.1},
            "algorithms": {"languages": list(languages), "tasks": {n: "A" for n in languages},
                           "weights": {n: 0.1 for n in languages}}}


def measurement_frame(tasks=("A", "B"), seeds=(0, 1, 2), adv_drop=(0.10, 0.0), adv_gap=0.0105, name="x"):
    """AdamW at accuracies 0.8 + 0.01 * seed per task, gap 0.010 + 0.0001 * seed; the adversary
    ``adv_drop[k]`` lower on task k (with a per-seed wiggle for a non-zero spread), its gap
    ``adv_gap``, its traces larger by 2 + seed; phase 1 and SGD equal to AdamW."""
    rows = []
    for s in seeds:
        base = {"gap": 0.010 + 0.0001 * s, "trace": 10.0 + s, "invariant_trace": 5.0 + s, "trace_se": 0.1,
                "invariant_trace_se": 0.05, **{f"acc {t}": 0.8 + 0.01 * s for t in tasks}}
        for a in ("phase 1", "adamw", "sgd"):
            rows.append({"language": name, "seed": s, "algorithm": a, **base})
        adv = {**base, "gap": adv_gap, "trace": base["trace"] + 2 + s,
               "invariant_trace": base["invariant_trace"] + 2 + s,
               **{f"acc {t}": base[f"acc {t}"] - d - 0.005 * s * (d != 0) for t, d in zip(tasks, adv_drop)}}
        rows.append({"language": name, "seed": s, "algorithm": "adversarial", **adv})
    return pd.DataFrame(rows)


def lookup_probe(tasks=("A", "B"), splits=(0.70, 0.72, 0.74), bayes=None):
    out = {}
    for t in tasks:
        out[t] = {"accuracy": float(np.mean(splits)), "ci95": 0.05, "splits": list(splits)}
        if bayes is not None:
            out[t].update(bayes=bayes, bayes_se=0.0)
    return out


# ---------------------------------------------------------------------------- parameters
def test_parameters_apply_the_overrides_and_name_a_bad_backend(smoke):
    p = algorithms.parameters("smoke", 3, n_seeds=3, weights={"hmm": 0.2, "pcfg": 0.1, "teacher": 0.1})
    assert p["pretraining"]["seeds"] == 3 and p["algorithms"]["weights"]["hmm"] == 0.2
    assert training_seeds(p) == [3, 4, 5]
    assert training_seeds(smoke) == [0, 1]  # the profile's 2 seeds
    with pytest.raises(ValueError, match="backend"):
        algorithms.parameters("smoke", 0, backend="mpi")
    with pytest.raises(ValueError, match="seed"):
        algorithms.parameters("smoke", -3)


def test_describe_tasks_protocol_labels(smoke):
    text = algorithms.describe(smoke)
    assert "algorithms.languages: ['hmm']" in text and "pretraining.epsilon: 0.5" in text
    assert len(text.splitlines()) == len(smoke["algorithms"]) + 8
    assert algorithms.tasks(smoke) == {"hmm": ["state@3", "state@6"]}
    assert algorithms.protocol(smoke).probe_splits == smoke["pretraining"]["protocol"]["probe_splits"]
    label = algorithms.labels(smoke)
    assert (label["adamw"] == "AdamW lr 0.001" and label["sgd"] == "SGD lr 0.1"
            and label["phase 1"] == "phase-1 end")


def test_continuation_configs_start_from_the_same_checkpoint(smoke):
    adam, sgd, adv = (algorithms.continuation_config(smoke, "hmm", 1, a) for a in algorithms.ALGORITHMS)
    assert adam.init_from == sgd.init_from == adv.init_from
    assert adam.steps == sgd.steps == adv.steps == smoke["pretraining"]["continue_steps"]
    assert sgd.optimizer == "sgd" and sgd.weight_decay == 0.0 and adam.optimizer == adv.optimizer == "adamw"
    assert adv.adversarial["task"] == "state@6" and adv.adversarial["weight"] == 0.1 and not adam.adversarial
    with pytest.raises(ValueError, match="algorithm"):
        algorithms.continuation_config(smoke, "hmm", 0, "lion")
    with pytest.raises(ValueError, match="pcfg"):  # not in the smoke profile's algorithms.languages
        algorithms.continuation_config(smoke, "pcfg", 0, "adversarial")


# ---------------------------------------------------------------------------- training
def test_check_not_diverged_names_the_runs():
    runs = {("x", 0, "adamw"): FakeRun("a", {}), ("x", 1, "sgd"): FakeRun("b", {}, diverged=True)}
    with pytest.raises(RuntimeError, match=r"\('x', 1, 'sgd'\)"):
        algorithms.check_not_diverged(runs)
    algorithms.check_not_diverged({("x", 0, "adamw"): FakeRun("a", {})})


def test_train_runs_the_parents_first_and_keys_every_run(smoke, monkeypatch):
    calls, diverging = [], []

    class Result:
        def __init__(self, config):
            self.run = FakeRun(f"{config.optimizer} {config.seed} {bool(config.adversarial)}", {},
                               diverged=config.optimizer in diverging)

    def fake_run_configs(configs, backend, workers, progress):
        calls.append([c.init_from is None for c in configs])
        return [Result(c) for c in configs]

    monkeypatch.setattr(algorithms, "run_configs", fake_run_configs)
    trained = algorithms.train(smoke, "serial")
    assert calls == [[True, True], [False] * 6]  # 2 phase-1 runs, then 3 algorithms x 2 seeds
    assert set(trained.phase1) == {("hmm", 0), ("hmm", 1)} and trained.phase1_configs["hmm", 1].seed == 1
    assert trained.runs["hmm", 1, "sgd"].name == "sgd 1 False"
    assert trained.runs["hmm", 0, "adversarial"].name == "adamw 0 True"
    assert trained.seconds >= 0
    diverging.append("sgd")
    with pytest.raises(RuntimeError, match=r"\('hmm', 0, 'sgd'\), \('hmm', 1, 'sgd'\)\]"):
        algorithms.train(smoke, "serial")


def test_curves_table_stacks_every_run():
    runs = {("x", 0, "adamw"): FakeRun("a", {"step": [0, 10], "gap": [0.02, 0.01]}),
            ("x", 0, "adversarial"): FakeRun("b", {"step": [0, 10], "gap": [0.02, 0.03],
                                                   "adv_loss": [np.nan, 1.5]})}
    curves = algorithms.curves_table(runs)
    assert list(curves.columns[:5]) == ["language", "seed", "algorithm", "step", "gap"]
    assert curves["gap"].tolist() == [0.02, 0.01, 0.02, 0.03]
    assert curves["algorithm"].tolist() == ["adamw", "adamw", "adversarial", "adversarial"]
    assert math.isnan(curves["adv_loss"].iloc[0]) and curves["adv_loss"].iloc[3] == 1.5


# ---------------------------------------------------------------------------- measurements
def measured_dict(gap, acc):
    return {"gap": gap, "gap_se": 0.001, "trace": 10.0, "trace_se": 1.0, "invariant_trace": 5.0,
            "invariant_trace_se": 0.1, "probes": {"A": {"accuracy": acc, "ci95": 0.02}},
            "extra_probes": {"limited": {"A": {"accuracy": acc - 0.1}}}}


def test_measurement_table_one_row_per_checkpoint():
    table = algorithms.measurement_table([("x", 0, "phase 1"), ("x", 0, "adamw")],
                                         [measured_dict(0.01, 0.8), measured_dict(0.02, 0.7)])
    assert table[["language", "seed", "algorithm"]].values.tolist() == [["x", 0, "phase 1"],
                                                                        ["x", 0, "adamw"]]
    assert table["gap"].tolist() == [0.01, 0.02] and table["acc A"].tolist() == [0.8, 0.7]
    assert table["acc A [limited]"].tolist() == pytest.approx([0.7, 0.6])
    with pytest.raises(ValueError, match="labels, measured"):
        algorithms.measurement_table([("x", 0, "adamw")], [])


def test_measure_measures_phase1_and_the_final_checkpoints(smoke, monkeypatch):
    phase1 = {("hmm", s): FakeRun(f"p{s}", {}) for s in (0, 1)}
    configs = {key: algorithms.phase1_config(smoke, *key) for key in phase1}
    runs = {("hmm", s, a): FakeRun(f"{a}{s}", {}) for s in (0, 1) for a in algorithms.ALGORITHMS}
    seen = []

    def fake_measure(items, protocol, workers):
        seen.extend((run.name, step) for run, step in items)
        return [measured_dict(0.01 * (k + 1), 0.5) for k in range(len(items))]

    monkeypatch.setattr(algorithms, "measure_checkpoints", fake_measure)
    monkeypatch.setattr(algorithms, "lookup_table_probe",
                        lambda spec, protocol: {"A": {"kind": spec["kind"]}})
    m = algorithms.measure(smoke, algorithms.Continuations(phase1, configs, runs, 0.0))
    last, first = smoke["pretraining"]["continue_steps"], smoke["pretraining"]["steps"]["hmm"]
    assert seen[:4] == [("p0", first), ("adamw0", last), ("sgd0", last), ("adversarial0", last)]
    assert m.checkpoints == 8 and m.lookup == {"hmm": {"A": {"kind": "hmm"}}}
    assert m.table["algorithm"].tolist()[:4] == ["phase 1", "adamw", "sgd", "adversarial"]
    assert m.table["gap"].tolist() == pytest.approx([0.01 * k for k in range(1, 9)])


# ---------------------------------------------------------------------------- the paper's table
def test_result_table_cells_are_mean_and_t_interval():
    table = measurement_frame()
    label = algorithms.labels(small_params())
    out = algorithms.result_table(table, lookup_probe(), "x", ["A", "B"], label)
    assert out.index.tolist() == ["phase-1 end", "AdamW lr 0.0003", "SGD lr 0.1",
                                  "adversarial (AdamW, L - λ·L_down)", "lookup table"]
    # AdamW's task A: 0.80, 0.81, 0.82 -> mean 0.81, half-width t(0.975, 2) * 0.01 / sqrt(3) = 0.0248
    assert out.loc["AdamW lr 0.0003", "task A"] == "0.810 ± 0.025"
    # trace 10, 11, 12: mean 11.0 ± 2.484 (one decimal); invariant 5, 6, 7: 6.00 ± 2.48
    assert out.loc["AdamW lr 0.0003", "trace"] == "11.0 ± 2.5"
    assert out.loc["AdamW lr 0.0003", "invariant trace"] == "6.00 ± 2.48"
    assert out.loc["lookup table", "task A"] == "0.720 ± 0.050"
    assert out.loc["lookup table", "gap (nats)"] == "0 (exact)"
    one_seed = algorithms.result_table(table[table.seed == 0], lookup_probe(), "x", ["A"], label)
    assert one_seed.loc["AdamW lr 0.0003", "task A"] == "0.800"  # no interval from one seed


def test_result_tables_for_every_language(smoke):
    tasks = algorithms.tasks(smoke)["hmm"]
    frame = measurement_frame(tasks=tasks, seeds=(0, 1), name="hmm")
    m = algorithms.MeasuredTable(frame, {"hmm": lookup_probe(tasks)}, 8, 0)
    out = algorithms.result_tables(smoke, m)
    assert list(out) == ["hmm"] and list(out["hmm"].columns) == ["gap (nats)", "task state@3", "task state@6",
                                                                 "trace",
                                                                  "invariant trace"]


# ---------------------------------------------------------------------------- the verdicts
def test_verdict_table_known_effects():
    table, lookup = measurement_frame(), {"x": lookup_probe()}
    v = algorithms.verdict_table(table, lookup, {"x": ["A", "B"]}, [0, 1, 2], epsilon=0.025)
    assert v.columns.tolist() == ["language", "quantity", "comparison", "effect", "low", "high", "mde",
                                  "verdict", "gap adamw", "gap adversarial", "equal loss"]
    row = v.set_index(["comparison", "quantity"])
    # task A: paired differences -0.100, -0.105, -0.110: mean -0.105, half-width
    # 4.303 * 0.005 / sqrt(3) = 0.0124
    a = row.loc[("adversarial - adamw", "acc A")]
    assert a["effect"] == pytest.approx(-0.105) and a["high"] == pytest.approx(-0.105 + 0.012421, abs=1e-5)
    assert a["verdict"] == "yes"
    # its minimum detectable effect at 80% power: the noncentral t on 2 df at se = 0.005 / sqrt(3)
    assert a["mde"] == pytest.approx(detectable_effect(0.005 / 3 ** 0.5, 2, 0.8, 0.95), rel=1e-6)
    # task B: no difference at all -> a zero-width interval at 0, inside the smallest effect that counts
    # (claims.SMALLEST_EFFECT: 1 point of accuracy): "no"
    assert row.loc[("adversarial - adamw", "acc B"), "effect"] == 0.0
    assert row.loc[("adversarial - adamw", "acc B"), "verdict"] == "no"
    # invariant trace: +2, +3, +4 -> mean 3, predicted rise, interval 3 ± 2.484: "yes"
    assert row.loc[("adversarial - adamw", "invariant_trace"), "effect"] == pytest.approx(3.0)
    assert row.loc[("adversarial - adamw", "invariant_trace"), "verdict"] == "yes"
    # AdamW (0.80, 0.81, 0.82) against the lookup's resplits (0.70, 0.72, 0.74): Welch
    expected = welch_interval([0.70, 0.72, 0.74], [0.80, 0.81, 0.82])
    b = row.loc[("adamw - lookup table", "acc A")]
    assert (b["effect"] == pytest.approx(0.09) and b["low"] == pytest.approx(expected.low)
            and b["verdict"] == "yes")
    assert b["mde"] == pytest.approx(minimum_detectable(expected))
    # the mean gaps: AdamW 0.0101, adversary 0.0105 -> within 0.002: equal loss
    assert v["gap adamw"].iloc[0] == pytest.approx(0.0101) and v["equal loss"].all()


def test_verdict_table_not_tested_without_equal_loss_or_convergence():
    table = measurement_frame(adv_gap=0.0131)  # 0.003 nats above AdamW's mean gap
    v = algorithms.verdict_table(table, {"x": lookup_probe()}, {"x": ["A", "B"]}, [0, 1, 2], epsilon=0.025)
    adversary = v[v.comparison == "adversarial - adamw"]
    assert (adversary["verdict"] == "not tested").all() and not v["equal loss"].any()
    assert adversary["effect"].iloc[0] == pytest.approx(-0.105)  # the effect is still shown
    assert (v[v.comparison == "adamw - lookup table"]["verdict"] == "yes").all()
    strict = algorithms.verdict_table(table, {"x": lookup_probe()}, {"x": ["A", "B"]}, [0, 1, 2],
                                      epsilon=0.0101)
    # seed 2: 0.0102 > ε
    assert (strict[strict.comparison == "adamw - lookup table"]["verdict"] == "not tested").all()


def test_verdicts_uses_the_profile(smoke):
    tasks = algorithms.tasks(smoke)["hmm"]
    frame = measurement_frame(tasks=tasks, seeds=(0, 1), name="hmm")
    m = algorithms.MeasuredTable(frame, {"hmm": lookup_probe(tasks)}, 8, 0)
    v = algorithms.verdicts(smoke, m)
    assert v["quantity"].tolist() == ["acc state@3", "acc state@6", "invariant_trace", "trace", "acc state@3",
                                      "acc state@6"]
    # (-0.100 - 0.105) / 2 over the smoke profile's 2 seeds
    assert v["effect"].iloc[0] == pytest.approx(-0.1025)


def test_claims_quote_the_numbers_and_combine_the_tasks():
    params = small_params()
    table = measurement_frame()
    v = algorithms.verdict_table(table, {"x": lookup_probe()}, {"x": ["A", "B"]}, [0, 1, 2], epsilon=0.025)
    worse, sharper, lookup = algorithms.claims(params, table, v, {})
    assert worse.held == "partly"  # task A yes, task B inconclusive
    assert "A -0.105 [-0.117, -0.093]" in worse.ours and "B +0.000 [+0.000, +0.000]" in worse.ours
    assert "95% CI over 3 seeds; gaps AdamW 0.0101, adversarial 0.0105 nats" in worse.ours
    assert ("89.9 -> 83.1" in worse.paper
            and "λ = 0.1 given as a parameter (not chosen on a held-out seed), on task A" in worse.detail)
    assert worse.notebook == algorithms.NOTEBOOK
    assert sharper.held == "yes" and sharper.ours.startswith("invariant 6.00 -> 9.00 (+3.000 [")
    assert "raw 11.0 -> 14.0" in sharper.ours and sharper.detail == "the raw trace's own verdict: yes"
    assert lookup.held == "yes" and "A +0.090 [" in lookup.ours and lookup.detail == "AdamW's gap 0.0101 nats"
    strict = algorithms.verdict_table(table, {"x": lookup_probe()}, {"x": ["A", "B"]}, [0, 1, 2],
                                      epsilon=0.0101)
    last = algorithms.claims(small_params(epsilon=0.0101), table, strict, {})[2]
    assert last.held == "not tested" and last.detail.endswith("not within ε = 0.0101")


# ---------------------------------------------------------------------------- the checked summary
def summary_runs(gap=0.01, adv_loss=1.2):
    return {("x", s, a): FakeRun(f"{a}{s}", {"step": [0, 10], "gap": [0.02, gap],
                                               **({"adv_loss": [np.nan, adv_loss]}
                                                  if a == "adversarial" else {})})
            for s in (0, 1, 2) for a in algorithms.ALGORITHMS}


def test_check_summary_passes_and_fails_with_its_messages():
    table, lookup = measurement_frame(), {"x": lookup_probe(bayes=0.9)}
    algorithms.check_summary(summary_runs(), table, lookup)
    with pytest.raises(AssertionError, match=r"Run\(adamw0, finished\): the gap became non-finite"):
        algorithms.check_summary(summary_runs(gap=np.nan), table, lookup)
    with pytest.raises(AssertionError, match="^x$"):
        algorithms.check_summary(summary_runs(adv_loss=np.inf), table, lookup)
    # Bayes 0.6: 0.6 + 3 * 0.05 + 0.03 = 0.78 < AdamW's 0.80 on task A
    with pytest.raises(AssertionError, match=r"\('x', 'A'\)"):
        algorithms.check_summary(summary_runs(), table, {"x": lookup_probe(bayes=0.6)})
    bad = table.copy()
    bad.loc[0, "trace_se"] = 0.0
    with pytest.raises(AssertionError):
        algorithms.check_summary(summary_runs(), bad, lookup)


def test_summary():
    params, table = small_params(), measurement_frame()
    v = algorithms.verdict_table(table, {"x": lookup_probe()}, {"x": ["A", "B"]}, [0, 1, 2], epsilon=0.025)
    lines = algorithms.summary(params, v, algorithms.claims(params, table, v, {})).splitlines()
    assert (lines[0]
            == "04_training_algorithms · profile=cpu · seeds=[0, 1, 2] · 100 continuation steps · ε=0.025")
    assert (lines[1]
            == "   x  adversarial - adamw           acc A: -0.105 [-0.117, -0.093] · gaps 0.010/0.011 · yes")
    first_claim = lines[len(v) + 1]
    assert first_claim.startswith("claim: x: the adversarial algorithm reaches the same l")
    assert first_claim.endswith("-> partly")
    assert lines[-1].startswith("checks passed") and len(lines) == 1 + len(v) + 3 + 1
    assert ("these numbers mean nothing" in algorithms.summary({**params, "profile": "smoke"}, v, [])
            .splitlines()[-2])


# ---------------------------------------------------------------------------- the figures
def test_continuations_figure_draws_the_seed_mean(smoke):
    runs = {("hmm", s, a): FakeRun("r",
                                   {"step": [0, 10, 20], "gap": [0.02 + s * 0.01, 0.01, 0.01 + s * 0.002],
                                   "adv_loss": [np.nan, 1.0 + s, 2.0 + s]})
            for s in (0, 1) for a in algorithms.ALGORITHMS}
    fig = plots.continuations(algorithms.curves_table(runs), smoke)
    ax_gap, ax_adv = fig.axes
    mean_line = ax_gap.get_lines()[0]
    assert list(mean_line.get_ydata()) == pytest.approx([0.025, 0.01, 0.011])
    assert ax_gap.get_title() == "hmm: gap during the continuation" and ax_gap.get_yscale() == "log"
    assert list(ax_adv.get_lines()[1].get_ydata())[1:] == [2.0, 3.0]  # seed 1's L_down
    assert "task state@6, λ = 0.1" in ax_adv.get_title()
    matplotlib.pyplot.close(fig)


def test_accuracy_and_trace_figure(smoke):
    tasks = algorithms.tasks(smoke)["hmm"]
    table = measurement_frame(tasks=tasks, seeds=(0, 1), name="hmm")
    fig = plots.accuracy_and_trace(table, {"hmm": lookup_probe(tasks)}, smoke)
    ax_acc, ax_trace = fig.axes
    assert [t.get_text() for t in ax_acc.get_xticklabels()] == ["task state@3", "task state@6"]
    # lowest: the adversary's 0.70 on state@3; highest 0.81
    assert ax_acc.get_ylim() == pytest.approx((0.62, 0.89))
    labels = [t.get_text() for t in ax_trace.get_xticklabels()]
    assert labels == ["phase-1 end", "AdamW lr 0.001", "SGD lr 0.1", "adversarial"]
    matplotlib.pyplot.close(fig)


def test_weight_table_and_claims_say_how_lambda_was_chosen():
    from flatlib.runner.experiments import WeightChoice

    choice = WeightChoice("x", 1000, {0.01: 0.0101, 0.03: 0.0112, 0.1: 0.0150}, 0.0100, 0.03, True)
    table = algorithms.weight_table({"x": choice})
    assert table["λ"].tolist() == [0.01, 0.03, 0.1] and table["chosen"].tolist() == [False, True, False]
    # 0.0012 nats apart is equal loss, 0.0050 is not
    assert table["equal loss"].tolist() == [True, True, False]
    assert table["difference"].tolist() == pytest.approx([0.0001, 0.0012, 0.0050])
    params, frame = small_params(), measurement_frame()
    v = algorithms.verdict_table(frame, {"x": lookup_probe()}, {"x": ["A", "B"]}, [0, 1, 2], epsilon=0.025)
    worse, sharper, _ = algorithms.claims(params, frame, v, {"x": choice})
    assert worse.detail.startswith("λ = 0.03 chosen on held-out seed 1000 (rule 'adversary weight': gaps λ "
                                   "0.01: 0.0101, λ 0.03: 0.0112, λ 0.1: 0.0150 against AdamW's 0.0100)")
    assert "adversary weight" in worse.rule and "adversary weight" in sharper.rule
