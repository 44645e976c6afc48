"""flatlib.runner.census counts what a profile's story trains and measures, before it runs."""

from flatlib.profiles import resolve
from flatlib.runner.census import census, main


def test_the_smoke_story_counted_by_hand():
    training, measurements = census(resolve("smoke"))
    t = training.set_index("origin")
    # phase 1: 2 languages x 2 seeds x 60 steps; continuations 40 steps each
    assert (t.loc["02 phase 1", "runs"], t.loc["02 phase 1", "steps"]) == (4, 240)
    assert (t.loc["02 sgd", "runs"], t.loc["02 adamw", "steps"]) == (4, 160)
    # the clock: 2 noise seeds per lineage, one trajectory each to tau = 0.03 at lr 0.1, batch 8:
    # 0.03 * 8 / 0.01 = 24 steps; anneals: 2 controls per lineage + 2 noise x 2 doses, 10 steps each
    assert (t.loc["02 sgd clock trajectory", "runs"],
            t.loc["02 sgd clock trajectory", "steps"]) == (8, 8 * 24)
    assert (t.loc["02 sgd clock", "runs"], t.loc["02 sgd clock", "steps"]) == (4 * 6, 4 * 6 * 10)
    assert t.loc["02 sgd clock trajectory", "sentences"] == 8 * 24 * 8
    # the adversary's weight: the held-out seed's phase 1 (60), AdamW (40) and one run per lambda (2 x 40)
    assert (t.loc["04 adversary weight (held-out seed)", "runs"],
            t.loc["04 adversary weight (held-out seed)", "steps"]) == (4, 180)
    assert (t.loc["04 adversarial", "runs"], t.loc["03 sizes", "runs"]) == (2, 4)
    assert (training["TFLOP"] > 0).all()
    m = measurements.set_index("kind")["measurements"]
    assert m["fine-tuning (03)"] == 4 and m["widened trace (03, 05)"] == 2  # the widest width is not widened


def test_the_command_prints_the_totals(capsys):
    assert main(["--profile", "smoke"]) == 0
    assert capsys.readouterr().out.startswith("profile smoke: 54 training runs, 1,492 steps")


def _unit_costs(params, step_s=0.01, eval_s=0.5, measure_s=2.0):
    """Costs for every class of the smoke story, all steps alike (so the prediction is countable by hand)."""
    from flatlib.runner.census import eval_class, measure_class, plan, step_class

    runs, measured = plan(params)
    return {"step_s": {step_class(c): step_s for _, c in runs.values()},
            "eval_s": {eval_class(c): eval_s for _, c in runs.values()},
            "measure_s": {measure_class(m.kind, m.config, m.width): measure_s for m in measured}}


def test_predicted_time_is_steps_evaluations_and_measurements():
    import pytest

    from flatlib.runner.census import plan, predict

    params = resolve("smoke")
    costs = _unit_costs(params)
    times = predict(params, costs).set_index("origin")
    runs, measured = plan(params)
    # phase 1: 4 runs of 60 steps, evaluated every 10 steps and at 0: 7 evaluations each; 4 end checkpoints
    assert times.loc["02 phase 1", "training s"] == pytest.approx(4 * (60 * 0.01 + 7 * 0.5))
    assert times.loc["02 phase 1", "measuring s"] == pytest.approx(4 * 2.0)
    training, _ = census(params)
    # smoke: every run divides evenly
    evaluations = sum(c.steps // c.eval_every + 1 for _, c in runs.values())
    assert times["training s"].sum() == pytest.approx(training["steps"].sum() * 0.01 + evaluations * 0.5)
    assert times["measuring s"].sum() == pytest.approx(len(measured) * 2.0)
    del costs["step_s"][next(iter(costs["step_s"]))]
    with pytest.raises(ValueError, match="costs: no measured cost for .*B"):
        predict(params, costs)


def test_the_command_predicts_from_a_costs_file(tmp_path, capsys):
    import json

    path = tmp_path / "costs.json"
    path.write_text(json.dumps(_unit_costs(resolve("smoke"))))
    assert main(["--profile", "smoke", "--costs", str(path)]) == 0
    assert "compute minutes" in capsys.readouterr().out


def test_unit_costs_measured_by_the_bench_cover_the_whole_story(tmp_path):
    """bench.costs measures every step, evaluation and measurement class the census plans (smoke: ~15 s)."""
    import json

    from bench.costs import main as measure_costs
    from flatlib.runner.census import predict

    out = tmp_path / "costs_smoke.json"
    measure_costs(["--profile", "smoke", "--target", "0.05", "--out", str(out)])
    costs = json.loads(out.read_text())
    assert all(v > 0 for table in ("step_s", "eval_s", "measure_s") for v in costs[table].values())
    times = predict(resolve("smoke"), costs)
    assert (times["total s"] > 0).all()


def test_evaluations_of_a_run_as_pretrain_does_them():
    from dataclasses import replace

    from flatlib.runner.census import evaluations
    from flatlib.runner.experiments import phase1_config

    config = phase1_config(resolve("smoke"), "hmm", 0)  # 60 steps, every 10
    assert evaluations(config) == 7  # 0, 10, ..., 60
    assert evaluations(replace(config, steps=65)) == 8  # ... 60, and the end
    assert evaluations(replace(config, steps=5)) == 2  # 0 and the end


def test_step_flops_are_six_rows_in_out_of_every_linear():
    """The counter sees exactly the weight matmuls: 6 x rows x in x out for each nn.Linear, the blocks'
    on every (padded) position but the last block's attention output and MLP (the live last block) and the
    head on the masked ones (smoke's HMM and PCFG, one mask a sentence)."""
    import torch

    from flatlib.languages import build_language
    from flatlib.runner.census import plan, step_flops
    from flatlib.training.train import new_model

    runs, _ = plan(resolve("smoke"))
    configs = {c.language["kind"]: c for _, c in runs.values()
               if c.adversarial is None and c.mask_rate is None}
    for kind, config in configs.items():
        language = build_language(config.language)
        model = new_model(config, language)
        expected = 0
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear):
                last = f"blocks.{len(model.blocks) - 1}."
                live = name == "head" or name.startswith((last + "attn.proj", last + "mlp."))
                rows = config.batch_size * (1 if live else language.max_len)
                expected += 6 * rows * module.in_features * module.out_features
        assert step_flops(config) == expected, kind


def test_the_training_floor_is_counted_flops_at_the_peak():
    import pytest

    from flatlib.runner.census import plan, step_class, step_flops, training_floor

    params = resolve("smoke")
    floor = training_floor(params, peak_flops=1e9).set_index("origin")
    runs, _ = plan(params)
    phase1 = [c for origin, c in runs.values() if origin == "02 phase 1"]
    flops = sum(c.steps * step_flops(c) for c in phase1)
    assert floor.loc["02 phase 1", "matmul TFLOP"] == pytest.approx(flops / 1e12)
    assert floor.loc["02 phase 1", "floor s"] == pytest.approx(flops / 1e9)
    assert len({step_class(c) for c in phase1}) == 2  # one count per kind of step, HMM and PCFG
    assert ((training_floor(params, peak_flops=2e9)["floor s"] * 2).to_list()
            == pytest.approx(floor["floor s"].to_list()))
    with pytest.raises(ValueError, match="peak_flops"):
        training_floor(params, peak_flops=0.0)


def test_the_command_prints_the_floor_from_a_bench_file(tmp_path, capsys):
    import json

    path = tmp_path / "train.json"
    path.write_text(json.dumps({"date": "today", "machine": {"cpu": "a CPU"},
                                "matmul_peak_flops": {"1": 1e9, "2": 1.9e9}}))
    assert main(["--profile", "smoke", "--peak", str(path)]) == 0
    out = capsys.readouterr().out
    assert "1.9 GFLOP/s on 2 threads, a CPU" in out and "cannot train faster on this machine" in out


def test_what_is_left_leaves_out_finished_runs_and_cached_measurements(tmp_path):
    """predict(store=...) on an empty store is the whole story; after one phase-1 run is trained and
    measured there, that run's steps and its measurement drop out, and nothing else does."""
    import pytest

    from flatlib.analysis.algorithms import protocol
    from flatlib.measurement.measure import is_cached, measure_checkpoint
    from flatlib.runner.census import plan, predict
    from flatlib.runner.runs import RunStore
    from flatlib.training.train import pretrain

    params = resolve("smoke")
    costs = _unit_costs(params)
    store = RunStore(tmp_path)
    whole = predict(params, costs).set_index("origin")
    pd_testing = pytest.importorskip("pandas").testing
    pd_testing.assert_frame_equal(predict(params, costs, store).set_index("origin"), whole)
    runs, measured = plan(params)
    config = next(c for origin, c in runs.values() if origin == "02 phase 1")
    run = pretrain(config, store, progress=False)
    assert not is_cached("checkpoint", run, config.steps, protocol(params))
    measure_checkpoint(run, config.steps, protocol(params))
    assert is_cached("checkpoint", run, config.steps, protocol(params))
    left = predict(params, costs, store).set_index("origin")
    assert (left.loc["02 phase 1", "training s"]
            == pytest.approx(whole.loc["02 phase 1", "training s"] * 3 / 4))
    assert (left.loc["02 phase 1", "measuring s"]
            == pytest.approx(whole.loc["02 phase 1", "measuring s"] - 2.0))
    others = [o for o in whole.index if o != "02 phase 1"]
    pd_testing.assert_frame_equal(left.loc[others], whole.loc[others])


def test_the_evaluated_adversary_is_done_at_whichever_weight_was_chosen():
    from flatlib.runner.census import _alternatives, plan
    from flatlib.runner.experiments import adversarial_config

    params = resolve("smoke")
    runs, _ = plan(params)
    origin, config = next((o, c) for o, c in runs.values()
                          if o == "04 adversarial" and c.language["kind"] == "hmm")
    grid = params["algorithms"]["weight_grid"]["hmm"]
    assert config.adversarial["weight"] == grid[0]
    keys = {c.key for c in _alternatives(params, origin, config)}
    assert keys == {adversarial_config(params, "hmm", config.seed, w).key for w in grid}
    phase1 = next(c for o, c in runs.values() if o == "02 phase 1")
    assert _alternatives(params, "02 phase 1", phase1) == [phase1]


def test_the_forecast_line_says_what_is_left_and_when_nothing_is(tmp_path):
    import json

    from flatlib.runner.census import forecast
    from flatlib.runner.runs import RunStore

    assert forecast("smoke", RunStore(tmp_path), costs_path=tmp_path / "none.json") is None
    path = tmp_path / "costs_smoke.json"
    path.write_text(json.dumps({**_unit_costs(resolve("smoke")), "machine": "a CPU"}))
    line = forecast("smoke", RunStore(tmp_path / "empty"), costs_path=path)
    assert "54 training runs and" in line and "a CPU" in line
    path.write_text(json.dumps({"step_s": {}, "eval_s": {}, "measure_s": {}}))
    assert "no time estimate: costs: no measured cost" in forecast("smoke", RunStore(tmp_path),
                                                                   costs_path=path)


def test_the_forecast_of_a_complete_store(tmp_path, monkeypatch):
    import json

    from flatlib.runner import census
    from flatlib.runner.runs import RunStore

    path = tmp_path / "costs_smoke.json"
    path.write_text(json.dumps(_unit_costs(resolve("smoke"))))
    monkeypatch.setattr(census, "predict", lambda params, costs, store: census.pd.DataFrame(
        columns=["origin", "runs", "measurements", "training s", "measuring s", "total s"]))
    assert "holds every run and measurement" in census.forecast("smoke", RunStore(tmp_path), costs_path=path)
