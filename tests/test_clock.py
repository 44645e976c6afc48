"""The theory's clock tau = eta^2 k / B and the dose-response runs built on it."""

import math

import pandas as pd
import pytest

from flatlib.runner.runs import RunStore
from flatlib.training.clock import anneal, clock_runs, sgd_clock, steps_for_clock, supervised_tokens
from flatlib.training.train import PretrainConfig, learning_rate, load_model, pretrain

LANGUAGE = {"kind": "hmm", "n_states": 4, "vocab_size": 8, "seq_len": 8, "concentration": 0.5, "seed": 3,
            "task_positions": [3]}


def base_config(**overrides):
    settings = dict(language=LANGUAGE, model={"n_layer": 1, "n_head": 2, "d_model": 16, "d_ff": 32}, steps=40,
                    batch_size=32, eval_every=20, checkpoint_every=40, eval_pairs=256, warmup_steps=5,
                    lr=3e-3)
    return PretrainConfig(**{**settings, **overrides})


def test_clock_arithmetic():
    # the original notebook 02: lr 0.1, 1200 steps, 256 single-mask sentences a step
    assert math.isclose(sgd_clock(0.1, 1200, 256), 0.046875)
    # the run: tau = 10 at lr 0.1 and 16 tokens a step is 16,000 steps
    assert steps_for_clock(10, 0.1, 16) == 16_000
    assert steps_for_clock(0, 0.1, 16) == 0
    assert math.isclose(sgd_clock(0.1, steps_for_clock(3, 0.1, 16), 16), 3)
    assert supervised_tokens(base_config()) == 32
    with pytest.raises(ValueError, match="config: the clock"):
        supervised_tokens(base_config(supervise_all=True))
    with pytest.raises(ValueError, match="tau"):
        steps_for_clock(-1, 0.1, 16)
    with pytest.raises(ValueError, match="lr"):
        sgd_clock(0.0, 10, 16)


def test_clock_runs_share_one_trajectory_and_end_with_an_anneal(tmp_path):
    base = base_config()
    runs = clock_runs(base, [0, 0.01, 0.03], lr=0.1, batch_size=8, anneal_steps=6, anneal_batch_size=16,
                      noise_seed=0)
    (none, control), (sgd1, anneal1), (sgd3, anneal3) = runs[0], runs[0.01], runs[0.03]
    assert none is None and sgd1 is sgd3
    assert sgd1.steps == steps_for_clock(0.03, 0.1, 8) == 24 and sgd1.checkpoint_every == 8
    assert sgd1.weight_decay == 0.0 and sgd1.optimizer == "sgd" and sgd1.schedule == "constant"
    assert sgd1.seed != base.seed  # its own noise, not phase 1's batches again
    assert control.init_from == {"config": base.to_dict(), "step": base.steps}
    assert anneal1.init_from == {"config": sgd1.to_dict(), "step": 8}
    assert anneal3.init_from == {"config": sgd1.to_dict(), "step": 24}
    assert learning_rate(anneal1, 0) == pytest.approx(0.1) and learning_rate(anneal1, 6) == 0.0
    other = clock_runs(base, [0, 0.01], lr=0.1, batch_size=8, anneal_steps=6, anneal_batch_size=16,
                       noise_seed=1)
    assert other[0.01][0].seed != sgd1.seed
    store = RunStore(tmp_path)
    for config in (control, anneal1, anneal3):
        run = pretrain(config, store, progress=False)
        assert run.metrics()["step"].iloc[-1] == 6
        load_model(run)
    with pytest.raises(ValueError, match="taus"):
        clock_runs(base, [0.03, 0.01], lr=0.1, batch_size=8, anneal_steps=6, anneal_batch_size=16,
                   noise_seed=0)


def test_anneal_validates_like_any_config():
    with pytest.raises(ValueError, match="lr"):
        anneal(base_config(), 40, lr=-1.0, steps=6, batch_size=16, seed=0)


def toy_frame():
    """Two languages, 3 lineages, 2 noise seeds, taus 0 (control, noise 0 only), 1, 10: the trace
    falls by 1 per unit of log10(tau) in every lineage of 'a' and not at all in 'b'; the gap of
    b's largest dose is 0.003 nats above its control."""
    rows = []
    for language in ("a", "b"):
        for lineage in range(3):
            for tau, noises in ((0, [0]), (1, [0, 1]), (10, [0, 1])):
                for noise in noises:
                    drop = (1.0 + (tau == 10)) * (tau > 0) if language == "a" else 0.0
                    rows.append({"language": language, "lineage": lineage, "noise": noise, "tau": tau,
                                 "trace": 10 + lineage - drop + 0.01 * noise,
                                 "gap": 0.008 + (0.003 if language == "b" and tau == 10 else 0.0)})
    return __import__("pandas").DataFrame(rows)


def test_lineage_effects_and_dose_response_on_a_toy_table():
    from flatlib.analysis.pretraining import decide, dose_response, lineage_effects

    frame = toy_frame()
    effects = lineage_effects(frame, "trace")
    a = effects[(effects.language == "a")].set_index(["tau", "lineage"])["effect"]
    assert a.loc[(1, 0)] == pytest.approx(-1 + 0.005) and a.loc[(10, 2)] == pytest.approx(-2 + 0.005)
    table = dose_response(frame, "trace").set_index(["language", "tau"])
    assert table.loc[("a", 0), "level"] == pytest.approx(11) and math.isnan(table.loc[("a", 0), "effect"])
    assert table.loc[("a", 10), "effect"] == pytest.approx(-1.995) and table.loc[("a", 10), "lineages"] == 3
    assert table.loc[("a", 10), "effect_high"] == pytest.approx(-1.995)  # no spread across lineages
    verdict = decide(frame, "a", "trace", predicted=-1, converged=True)
    assert verdict["verdict"] == "yes" and verdict["equal_loss"] and verdict["tau"] == 10
    assert decide(frame, "a", "trace", predicted=-1, converged=False)["verdict"] == "not tested"
    b = decide(frame, "b", "trace", predicted=-1, converged=True)
    assert not b["equal_loss"] and b["verdict"] == "not tested"  # 0.003 nats apart: not the same loss


def test_clock_grid_has_one_control_per_lineage():
    from flatlib.training.clock import clock_grid

    phase1 = {("hmm", 0): base_config(), ("hmm", 1): base_config(seed=1)}
    clock = {"taus": [0, 0.01, 0.03], "lr": 0.1, "batch_size": 8, "anneal_steps": {"hmm": 6},
             "anneal_batch_size": 16, "noise_seeds": 3}
    points = clock_grid(phase1, clock)
    assert len(points) == 2 * (1 + 3 * 2)
    controls = [p for p in points if p.tau == 0]
    assert [(p.lineage, p.noise, p.sgd) for p in controls] == [(0, 0, None), (1, 0, None)]
    assert len({p.sgd.key for p in points if p.sgd is not None}) == 2 * 3  # one trajectory per noise seed


def test_replicated_controls_anneal_on_their_noise_seeds_batches_and_are_averaged():
    import pandas as pd

    from flatlib.analysis.pretraining import lineage_effects
    from flatlib.training.clock import clock_grid

    phase1 = {("hmm", 0): base_config(), ("hmm", 1): base_config(seed=1)}
    clock = {"taus": [0, 0.01, 0.03], "lr": 0.1, "batch_size": 8, "anneal_steps": {"hmm": 6},
             "anneal_batch_size": 16, "noise_seeds": 3, "control_seeds": 2}
    points = clock_grid(phase1, clock)
    assert len(points) == 2 * (2 + 3 * 2)
    controls = [p for p in points if p.tau == 0]
    assert [(p.lineage, p.noise) for p in controls] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert len({p.anneal.key for p in controls}) == 4  # distinct runs
    # control n anneals on the batches of noise seed n's doses: the same seed as that noise seed's anneals
    for c in controls:
        dose = next(p for p in points if p.tau > 0 and p.lineage == c.lineage and p.noise == c.noise)
        assert c.anneal.seed == dose.anneal.seed and c.anneal.seed != next(
            p for p in controls if p.lineage == c.lineage and p.noise != c.noise).anneal.seed
    # a lineage's effect: the mean of its doses minus the mean of its controls
    frame = pd.DataFrame([{"language": "hmm", "lineage": p.lineage, "noise": p.noise, "tau": p.tau,
                           "x": {0: 1.0, 1: 3.0}[p.noise] if p.tau == 0 else 10.0 * p.tau + p.lineage}
                          for p in points])
    effects = lineage_effects(frame, "x").set_index(["tau", "lineage"])["effect"]
    assert effects.loc[(0.03, 1)] == pytest.approx(0.3 + 1 - 2.0)
    with pytest.raises(ValueError, match="clock.control_seeds"):
        clock_grid(phase1, {**clock, "control_seeds": 4})


def test_the_clock_refuses_a_multi_token_objective():
    from flatlib.training.clock import clock_continuation

    with pytest.raises(ValueError, match="config: the clock"):
        clock_continuation(base_config(supervise_all=True), 40, 0.01, lr=0.1, batch_size=8, noise_seed=0)


def notebook_frame():
    """Notebook 02's measurement table in miniature: language 'a', 3 lineages, 2 noise seeds, taus
    0 / 1 / 10 on the clock, plus phase-1 and AdamW ends. On the clock the invariant trace falls by 2
    per lineage at tau 10, the standard probe on task t rises by 0.01 (+ 0.001 * lineage), the
    extra probe is flat, and the gap stays 0.008; AdamW moves nothing. The noise seeds add 0.1 * noise
    to the invariant trace, so its effect is -1.95."""
    rows = []
    for lineage in range(3):
        for tau, noises in ((0, [0]), (1, [0, 1]), (10, [0, 1])):
            for noise in noises:
                dose = tau == 10
                rows.append({"language": "a", "lineage": lineage, "noise": noise, "tau": tau,
                             "continuation": "sgd clock", "gap": 0.008, "gap_se": 0.0005,
                             "trace": 20.0 - 5 * dose + lineage, "trace_se": 0.5,
                             "invariant_trace": 10.0 - 2 * dose + lineage + 0.1 * noise,
                             "invariant_trace_se": 0.1, "acc t": 0.6 + (0.01 + 0.001 * lineage) * dose,
                             "acc t ci95": 0.01, "acc t [limited]": 0.5})
        for continuation in ("phase 1", "adamw"):
            rows.append({"language": "a", "lineage": lineage, "noise": 0, "tau": 0,
                         "continuation": continuation, "gap": 0.008, "gap_se": 0.0005, "trace": 20.0,
                         "trace_se": 0.5, "invariant_trace": 10.0 + lineage, "invariant_trace_se": 0.1,
                         "acc t": 0.6 + 0.001 * lineage, "acc t ci95": 0.01, "acc t [limited]": 0.5})
    return __import__("pandas").DataFrame(rows)


def test_notebook_02_verdicts_claims_and_answer_on_a_toy_table():
    from flatlib.analysis import pretraining
    from flatlib.analysis.pretraining import answer, probe_columns, verdict_table

    frame = notebook_frame()
    assert probe_columns(frame, ["t"]) == ["acc t", "acc t [limited]"]
    verdict = verdict_table(frame, {"a": ["t"]}, {"a": True}).set_index(["continuation", "quantity"])
    trace = verdict.loc[("sgd clock", "invariant_trace")]
    assert trace["effect"] == pytest.approx(-1.95) and trace["verdict"] == "yes" and trace["equal loss"]
    assert trace["lineages"] == 3 and trace["decides"]
    probe = verdict.loc[("sgd clock", "acc t")]
    assert probe["effect"] == pytest.approx(0.011) and probe["verdict"] == "yes" and probe["decides"]
    assert not verdict.loc[("sgd clock", "acc t [limited]"), "decides"]
    assert verdict.loc[("sgd clock", "trace"), "effect"] == pytest.approx(-5.0)
    assert verdict.loc[("adamw", "invariant_trace"), "effect"] == pytest.approx(0.0)
    claims = pretraining.claims(verdict.reset_index(), tau=10, adamw_lr=3e-4)
    assert [c.held for c in claims] == ["yes", "yes", verdict.loc[("adamw", "acc t"), "verdict"],
                                        verdict.loc[("adamw", "invariant_trace"), "verdict"]]
    # 0.011 ± t(2) 4.303 x 0.001 / sqrt 3 and "3 lineages" in claims[0].ours
    assert "t +0.011 [+0.009, +0.013]" in claims[0].ours
    assert "invariant -1.95 [-1.95, -1.95]" in claims[1].ours and "raw -5.00" in claims[1].ours
    # beside each interval, the design's minimum detectable effect at 80% power (noncentral t, 2 df)
    from flatlib.stats import detectable_effect
    assert (f"t +0.011 [+0.009, +0.013], MDE ±{detectable_effect(0.001 / 3 ** 0.5, 2, 0.8, 0.95):.3f}"
            in claims[0].ours)
    # no spread at all: any effect is detected
    assert "invariant -1.95 [-1.95, -1.95], MDE ±0.00;" in claims[1].ours
    assert "AdamW at constant lr 0.0003" in claims[2].claim
    not_converged = verdict_table(frame, {"a": ["t"]}, {"a": False})
    assert set(not_converged.verdict) == {"not tested"}
    (line,) = answer(verdict.reset_index(), "cpu", 10, 2)
    assert "at equal loss (gap 0.0080 -> 0.0080 nats)" in line and "invariant trace by -1.95" in line
    assert "t +0.011" in line and "3 lineages x 2 noise seeds" in line


def test_notebook_02_checks_catch_what_they_name():
    import pandas as pd

    from flatlib.analysis.pretraining import check_measurements

    frame = notebook_frame()
    gauge = pd.DataFrame({"language": ["a"] * 3, "max logit change": [0.0, 1e-6, 2e-6],
                          "invariant_trace": [10.0, 10.0, 10.0]})
    refs = (pd.DataFrame({"language": ["a"], "task": ["t"], "lookup probe": [0.62], "lookup ci95": [0.01],
                          "majority": [0.3], "Bayes": [0.7], "Bayes se": [0.01]})
            .set_index(["language", "task"]))
    check_measurements(frame, gauge, refs)
    with pytest.raises(AssertionError, match="gap"):
        check_measurements(frame.assign(gap=-frame["gap"]), gauge, refs)
    with pytest.raises(AssertionError, match="changed the function"):
        check_measurements(frame, gauge.assign(**{"max logit change": [0.0, 0.1, 0.0]}), refs)
    with pytest.raises(AssertionError):
        # accuracies of 0.6 above Bayes 0.5 + tolerance
        check_measurements(frame, gauge, refs.assign(Bayes=0.5))


def test_measured_models_label_every_checkpoint(tmp_path):
    from flatlib.analysis.pretraining import measured_models
    from flatlib.runner.runs import Run
    from flatlib.training.clock import clock_grid

    base = base_config()
    points = clock_grid({("hmm", 0): base},
                        {"taus": [0, 0.01], "lr": 0.1, "batch_size": 8, "anneal_steps": {"hmm": 6},
                         "anneal_batch_size": 16, "noise_seeds": 2})
    runs = [Run(tmp_path / str(i), p.anneal.to_dict()) for i, p in enumerate(points)]
    phase1 = {("hmm", 0): Run(tmp_path / "p", base.to_dict())}
    adamw = {("hmm", 0): Run(tmp_path / "a", base_config(steps=7).to_dict())}
    items, labels = measured_models(points, runs, phase1, adamw)
    assert len(items) == len(labels) == len(points) + 2
    assert [step for _, step in items] == [6] * len(points) + [40, 7]
    assert [label["continuation"] for label in labels] == ["sgd clock"] * len(points) + ["phase 1", "adamw"]
    assert ([(label["tau"], label["noise"]) for label in labels[: len(points)]]
            == [(p.tau, p.noise) for p in points])


def test_each_language_gets_its_own_anneal_length():
    from flatlib.training.clock import clock_grid

    base = base_config()
    clock = {"taus": [0, 0.01], "lr": 0.1, "batch_size": 8, "anneal_steps": {"hmm": 6, "pcfg": 9},
             "anneal_batch_size": 16, "noise_seeds": 2}
    # one base, two labels: only the length differs
    points = clock_grid({("hmm", 0): base, ("pcfg", 0): base}, clock)
    assert {p.anneal.steps for p in points if p.language == "hmm"} == {6}
    assert {p.anneal.steps for p in points if p.language == "pcfg"} == {9}
    # the trajectories are shared: only the anneals differ
    assert ({p.sgd.key for p in points if p.sgd and p.language == "hmm"}
            == {p.sgd.key for p in points if p.sgd and p.language == "pcfg"})


def test_effect_vs_l2_is_the_paired_effect_at_each_strength_every_model_reached():
    from flatlib.analysis.pretraining import effect_vs_l2

    labels, measured = [], []
    for lineage in range(3):
        for noise in range(2):
            for tau in (0, 1.0):
                # accuracy at L2 1e-2: 0.60 (+0.02 with the dose, + lineage/100); at 1e-3: +0.05 with the dose
                sweep = {"0.01": 0.60 + 0.02 * tau + lineage / 100, "0.001": 0.62 + 0.05 * tau + noise / 100}
                if lineage == 2 and noise == 1 and tau == 1.0:
                    sweep["0.0001"] = 0.9  # only one model's walk reached 1e-4: not comparable
                chosen = 0.001 if tau else 0.01
                labels.append({"language": "a", "lineage": lineage, "noise": noise, "tau": tau,
                               "continuation": "sgd clock"})
                measured.append({"probes": {"t": {"sweep": sweep, "chosen_l2": [chosen, chosen]}}})
    # not the clock's
    labels.append({"language": "a", "lineage": 0, "noise": 0, "tau": 0, "continuation": "phase 1"})
    measured.append({"probes": {"t": {"sweep": {"0.01": 0.0}, "chosen_l2": [0.01, 0.01]}}})
    table = effect_vs_l2(labels, measured).set_index("l2")
    assert list(table.index) == [0.001, 0.01]
    assert (table.loc[0.01, "effect"] == pytest.approx(0.02)
            and table.loc[0.001, "effect"] == pytest.approx(0.05))
    assert table.loc[0.01, "low"] == pytest.approx(0.02)  # no spread between lineages
    assert table.loc[0.001, "lineages"] == 3 and table.loc[0.001, "models"] == 12
    # the doses chose 1e-3, the controls 1e-2
    assert table.loc[0.001, "chosen"] == 6 and table.loc[0.01, "chosen"] == 6
    with pytest.raises(ValueError, match="labels, measured"):
        effect_vs_l2(labels[:-1], measured)


def test_the_l2_panel_and_the_gauge_panel_draw_what_they_are_given():
    import matplotlib

    matplotlib.use("Agg")
    import pandas as pd

    from flatlib.plots import pretraining as plots

    effects = pd.DataFrame([{"language": lang, "task": task, "l2": l2, "effect": 0.01, "low": 0.0,
                             "high": 0.02, "lineages": 8, "chosen": int(l2 == 1e-3), "models": 32}
                            for lang in ("hmm", "pcfg") for task in ("x", "y") for l2 in (1e-4, 1e-3, 1e-2)])
    fig = plots.effect_vs_l2(effects)
    assert len(fig.axes) == 2 and all(len(ax.get_legend().get_texts()) == 2 for ax in fig.axes)
    points = pd.DataFrame([{"language": "hmm", "parameterization": p, "trace": 20.0, "trace_se": 1.0,
                            "invariant_trace_layernorm": 12.0, "invariant_trace": 10.0,
                            "invariant_trace_se": 0.1}
                           for p in ("as trained", "attention V/O x3 per head coordinate")])
    fig = plots.gauge(points, 0)
    (ax,) = fig.axes
    assert len(ax.patches) == 3 * 2 and "full gauge" in ax.get_legend().get_texts()[-1].get_text()
    fig = plots.gauge(points.drop(columns="invariant_trace_layernorm"), 0)
    assert len(fig.axes[0].patches) == 2 * 2


def test_l2_dependence_says_where_the_effect_clears_zero_and_the_bound():
    from flatlib.analysis.pretraining import l2_dependence

    rows = [(1e-5, 0.002, -0.001, 0.005, 9), (1e-3, 0.016, 0.012, 0.020, 1), (1e-4, 0.006, 0.001, 0.011, 2)]
    effects = pd.DataFrame([{"language": "a", "task": "t", "l2": l2, "effect": e, "low": lo, "high": hi,
                             "chosen": n} for l2, e, lo, hi, n in rows])
    (line,) = l2_dependence(effects, 0.01)
    assert line.startswith("a t: at the L2 chosen most often (1e-05) +0.002 [-0.001, +0.005]")
    assert "from +0.002 to +0.016 [+0.012, +0.020] (at 0.001)" in line
    assert line.endswith("CI above 0 at 0.0001, 0.001, above the bound +0.01 at 0.001")
    nothing = effects.assign(low=-1.0)
    assert l2_dependence(nothing, 0.01)[0].endswith("above the bound +0.01 at none of the strengths")
