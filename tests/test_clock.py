"""The theory's clock tau = eta^2 k / B and the dose-response runs built on it."""

import math

import pytest

from flatlib.clock import anneal, clock_runs, sgd_clock, steps_for_clock, supervised_tokens
from flatlib.runs import RunStore
from flatlib.train import PretrainConfig, learning_rate, load_model, pretrain

LANGUAGE = {"kind": "hmm", "n_states": 4, "vocab_size": 8, "seq_len": 8, "concentration": 0.5, "seed": 3,
            "task_positions": [3]}


def base_config(**overrides):
    settings = dict(language=LANGUAGE, model={"n_layer": 1, "n_head": 2, "d_model": 16, "d_ff": 32}, steps=40,
                    batch_size=32, eval_every=20, checkpoint_every=40, eval_pairs=256, warmup_steps=5, lr=3e-3)
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
    other = clock_runs(base, [0, 0.01], lr=0.1, batch_size=8, anneal_steps=6, anneal_batch_size=16, noise_seed=1)
    assert other[0.01][0].seed != sgd1.seed
    store = RunStore(tmp_path)
    for config in (control, anneal1, anneal3):
        run = pretrain(config, store, progress=False)
        assert run.metrics()["step"].iloc[-1] == 6
        load_model(run)
    with pytest.raises(ValueError, match="taus"):
        clock_runs(base, [0.03, 0.01], lr=0.1, batch_size=8, anneal_steps=6, anneal_batch_size=16, noise_seed=0)


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
    from flatlib.clock import decide, dose_response, lineage_effects

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
    from flatlib.clock import clock_grid

    phase1 = {("hmm", 0): base_config(), ("hmm", 1): base_config(seed=1)}
    clock = {"taus": [0, 0.01, 0.03], "lr": 0.1, "batch_size": 8, "anneal_steps": 6, "anneal_batch_size": 16,
             "noise_seeds": 3}
    points = clock_grid(phase1, clock)
    assert len(points) == 2 * (1 + 3 * 2)
    controls = [p for p in points if p.tau == 0]
    assert [(p.lineage, p.noise, p.sgd) for p in controls] == [(0, 0, None), (1, 0, None)]
    assert len({p.sgd.key for p in points if p.sgd is not None}) == 2 * 3  # one trajectory per noise seed


def test_the_clock_refuses_a_multi_token_objective():
    from flatlib.clock import clock_continuation

    with pytest.raises(ValueError, match="config: the clock"):
        clock_continuation(base_config(supervise_all=True), 40, 0.01, lr=0.1, batch_size=8, noise_seed=0)
