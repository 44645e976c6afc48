import os
import signal
import threading
import time
from pathlib import Path

import pytest

from flatlib.measurement.measure import Protocol, lookup_table_probe, measure_checkpoint
from flatlib.runner.runs import RunStore
from flatlib.runner.sweep import SweepError, run_configs
from flatlib.training.train import PretrainConfig, continuation

LANGUAGE = {"kind": "hmm", "n_states": 4, "vocab_size": 8, "seq_len": 8, "concentration": 0.5, "seed": 3,
            "task_positions": [3]}
SMALL = Protocol(probe_sentences=600, probe_train=300, probe_test=200, probe_splits=2,
                 probe_l2_grid=(1e-3, 1e-1), trace_pairs=128, trace_probes=4, trace_batch=64)


def base_config(**overrides):
    settings = dict(language=LANGUAGE, model={"n_layer": 1, "n_head": 2, "d_model": 16, "d_ff": 32}, steps=40,
                    batch_size=32, eval_every=20, checkpoint_every=20, eval_pairs=256, warmup_steps=5,
                    lr=3e-3)
    return PretrainConfig(**{**settings, **overrides})


def test_sweep_backends_give_identical_runs(tmp_path):
    """serial, a local process pool and a submitit job array (cluster="local": the Slurm path
    without Slurm) produce the same runs in the same layout."""
    configs = [base_config(seed=s) for s in range(2)]
    serial = run_configs(configs, RunStore(tmp_path / "serial"), backend="serial", progress=False)
    local = run_configs(configs, RunStore(tmp_path / "local"), backend="local", workers=2, progress=False)
    array = run_configs(configs, RunStore(tmp_path / "array"), backend="submitit", cluster="local",
                        slurm={"timeout_min": 5}, progress=False)
    for a, b, c in zip(serial, local, array):
        assert a.run.key == b.run.key == c.run.key
        assert a.run.metrics().equals(b.run.metrics()) and a.run.metrics().equals(c.run.metrics())
        assert sorted(p.name for p in a.run.dir.iterdir()) == sorted(p.name for p in c.run.dir.iterdir())


def test_failing_config_is_reported_and_finished_ones_are_kept(tmp_path):
    good = base_config()
    bad = continuation(base_config(seed=5), from_step=999, steps=10)  # no checkpoint at step 999
    with pytest.raises(SweepError) as info:
        run_configs([good, bad], RunStore(tmp_path), progress=False)
    results = info.value.results
    assert results[0].ok and results[0].run.finished
    assert not results[1].ok and "999" in results[1].error
    assert bad.key in str(info.value)


def test_continuation_and_cached_measurements(tmp_path):
    store = RunStore(tmp_path)
    base = base_config()
    child = continuation(base, from_step=40, steps=20, optimizer="sgd", lr=0.05)
    [result] = run_configs([child], store, progress=False)
    first = measure_checkpoint(result.run, 20, SMALL)
    assert set(first["probes"]) == {"state@3"}
    assert 0 <= first["probes"]["state@3"]["accuracy"] <= 1 and first["trace_se"] > 0
    assert measure_checkpoint(result.run, 20, SMALL) == first  # read back from the cache
    entries = list((result.run.dir / "evals").glob("*.json"))  # beside it: its .sha256 and its writers' lock
    assert len(entries) == 1 and entries[0].with_suffix(".sha256").exists()
    table = lookup_table_probe(LANGUAGE, SMALL)
    assert table["state@3"]["majority"] < table["state@3"]["bayes"] + 1e-9


def test_bad_sweep_arguments():
    with pytest.raises(ValueError, match="backend"):
        run_configs([], backend="slurm")
    with pytest.raises(ValueError, match="workers"):
        run_configs([], workers=0)


def test_measure_checkpoints_in_workers_matches_serial(tmp_path):
    from flatlib.measurement.measure import measure_checkpoints

    configs = [base_config(seed=s) for s in range(2)]
    runs = [r.run for r in run_configs(configs, RunStore(tmp_path / "a"), progress=False)]
    copies = [r.run for r in run_configs(configs, RunStore(tmp_path / "b"), progress=False)]
    items = [(run, step) for run in runs for step in (20, 40)]
    parallel = measure_checkpoints(items, SMALL, workers=2)
    serial = measure_checkpoints([(run, step) for run in copies for step in (20, 40)], SMALL, workers=1)
    for a, b in zip(parallel, serial):
        assert a["step"] == b["step"] and a["gap"] == b["gap"] and a["trace"] == b["trace"]
        assert a["probes"] == b["probes"]
    assert measure_checkpoints(items, SMALL, workers=2) == parallel  # read back from the caches
    with pytest.raises(ValueError, match="workers"):
        measure_checkpoints(items, SMALL, workers=0)


def test_widened_trace_and_finetune_are_cached_and_consistent(tmp_path):
    from flatlib.measurement.measure import measure_many, measure_widened_trace

    [result] = run_configs([base_config()], RunStore(tmp_path), progress=False)
    raw = measure_checkpoint(result.run, 40, SMALL)
    # widening by 1 is the identity: the same trace as measure_checkpoint's, to float precision
    same = measure_widened_trace(result.run, 40, 16, SMALL)
    assert same["factor"] == 1 and same["max_logit_change"] == 0.0
    assert same["trace"] == pytest.approx(raw["trace"], rel=1e-5)
    wide = measure_widened_trace(result.run, 40, 48, SMALL)
    assert wide["factor"] == 3 and wide["max_logit_change"] < 1e-4 and wide["trace_se"] > 0
    assert wide["n_params"] > 3 * result.run.summary()["n_params"]  # matrices grow 9x, vectors 3x
    with pytest.raises(ValueError, match="width"):
        measure_widened_trace(result.run, 40, 40, SMALL)
    # in two worker processes: the same numbers (read from the cache or recomputed)
    items = [(result.run, 40, {"width": 32}), (result.run, 40, {"width": 48})]
    parallel = measure_many("widened_trace", items, SMALL, workers=2)
    assert parallel[1] == wide and parallel[0]["factor"] == 2
    assert measure_many("widened_trace", items[:1], SMALL) == parallel[:1]
    tuned = measure_many("finetune", [(result.run, 40, {"epochs": 1})], SMALL)[0]
    assert 0 <= tuned["accuracy"]["state@3"] <= 1
    with pytest.raises(ValueError, match="kind"):
        measure_many("nope", items, SMALL)


def test_notebook_grids_share_runs():
    """Notebook 05 finds every model of 02-04 (the same configs, so the same runs in the store), and
    every width of notebook 03 widens into exactly the widest model's architecture."""
    from flatlib.profiles import resolve
    from flatlib.runner.experiments import experiment_models, model_of, phase1_config, phase2_config
    from flatlib.training.model import Transformer, TransformerConfig, widen

    params = resolve("smoke", algorithms={"weights": {"hmm": 0.1, "pcfg": 0.1, "teacher": 0.1}})
    models = experiment_models(params, ["hmm"])
    keys = {m.config.key for m in models}
    assert (phase2_config(params, "hmm", 1, "sgd").key in keys
            and phase1_config(params, "hmm", 1, width=8).key in keys)
    widened = [m for m in models if m.widen_to is not None]
    assert widened and all(m.config.model["d_model"] < m.widen_to for m in widened)
    widths = params["model_size"]["widths"]
    widest = TransformerConfig(vocab_size=8, max_len=8, **model_of(params, widths[-1]))
    for w in widths:
        small = Transformer(TransformerConfig(vocab_size=8, max_len=8, **model_of(params, w)))
        assert widen(small, widths[-1] // w).config == widest


def _spawned_workers() -> list[int]:
    """This process's children that are multiprocessing spawn workers (not the resource tracker)."""
    children = []
    for task in Path(f"/proc/{os.getpid()}/task").iterdir():
        children += [int(pid) for pid in (task / "children").read_text().split()]
    return [pid for pid in children
            if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()]


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="finds the workers through /proc")
def test_killed_workers_do_not_hang_the_sweep(tmp_path):
    """Regression: with Pool.imap a SIGKILLed worker's config was lost and run_configs waited for it
    forever. Now the runs it was training are rerun (resuming from their checkpoints) and the sweep
    returns the same runs as a serial one."""
    configs = [base_config(seed=s, steps=600, eval_every=50, checkpoint_every=50) for s in range(2)]
    reference = run_configs(configs, RunStore(tmp_path / "serial"), progress=False)
    store = RunStore(tmp_path / "local")
    out: list = []
    thread = threading.Thread(daemon=True, target=lambda: out.append(
        run_configs(configs, store, backend="local", workers=2, progress=False)))
    thread.start()
    first = store.path(configs[0].to_dict())
    deadline = time.time() + 60
    while time.time() < deadline and len(list(first.glob("ckpt_*.sha256"))) < 3:
        time.sleep(0.02)
    killed = _spawned_workers()
    for pid in killed:
        os.kill(pid, signal.SIGKILL)
    thread.join(timeout=60)
    assert killed and not thread.is_alive(), "run_configs hangs after its workers were killed"
    [results] = out
    for ours, theirs in zip(results, reference):
        assert ours.ok and ours.run.finished
        assert ours.run.metrics().equals(theirs.run.metrics())


def test_measure_many_reports_a_failed_item_and_keeps_the_others(tmp_path):
    """In workers, a failing item is reported with its run and step (flatlib.runner.pool.PoolError) after
    the other items have finished and been cached."""
    from flatlib.measurement.measure import _checkpoint_path, measure_many
    from flatlib.runner.pool import PoolError

    [result] = run_configs([base_config()], RunStore(tmp_path), progress=False)
    with pytest.raises(PoolError, match=rf"run {result.run.key} at step 999"):
        measure_many("checkpoint", [(result.run, 999, {}), (result.run, 40, {})], SMALL, workers=2)
    assert _checkpoint_path(result.run, 40, SMALL).exists()


def test_the_adversary_weight_is_chosen_on_a_held_out_seed(monkeypatch):
    """Rule "adversary weight" applied to the held-out seed's runs: the largest λ at equal loss with
    that seed's AdamW continuation; the evaluated seeds' runs are not involved."""
    import flatlib.runner.experiments as experiments
    from flatlib.profiles import resolve

    params = resolve("smoke")
    with pytest.raises(ValueError, match="algorithms.weights: not chosen yet"):
        experiments.experiment_models(params, ["hmm"])
    configs = experiments.held_out_configs(params, "hmm")
    assert list(configs) == ["phase 1", "adamw", 0.03, 0.1]
    assert {c.seed for c in configs.values()} == {params["seed"] + params["algorithms"]["held_out_seed"]}
    assert configs[0.1].adversarial["weight"] == 0.1 and configs["adamw"].adversarial is None
    final_gaps = {"adamw": 0.0100, 0.03: 0.0115, 0.1: 0.0125}
    trained = []

    class Finished:
        def __init__(self, config):
            key = next(k for k, c in configs.items() if c.key == config.key)
            self.run = type("R", (), {"summary": lambda _: {"final_gap": final_gaps.get(key, 0.02)}})()
            trained.append(key)

    monkeypatch.setattr(experiments, "run_configs", lambda configs_, **kw: [Finished(c) for c in configs_])
    chosen, choices = experiments.choose_adversary_weights(params)
    assert trained == ["phase 1", "adamw", 0.03, 0.1]  # the parent first
    assert chosen["algorithms"]["weights"] == {"hmm": 0.03} and "weights" not in params["algorithms"]
    assert choices["hmm"].weight == 0.03 and choices["hmm"].at_equal_loss  # 0.1 is 0.0025 nats off
    assert choices["hmm"].gaps == {0.03: 0.0115, 0.1: 0.0125} and choices["hmm"].reference_gap == 0.0100
    given = resolve("smoke", algorithms={"weights": {"hmm": 0.2, "pcfg": 0.1, "teacher": 0.1}})
    assert experiments.choose_adversary_weights(given) == (given, {})


def test_notebook_05_gets_extra_lineages_without_the_clock():
    """pretraining.correlation_seeds > seeds: the extra lineages of the 2x64 family have phase 1, the
    constant-rate continuations and the adversary, but no clock doses, and notebook 03 keeps its seeds."""
    from flatlib.profiles import resolve
    from flatlib.runner.experiments import experiment_models

    weights = {"weights": {"hmm": 0.1, "pcfg": 0.1, "teacher": 0.1}}
    base = experiment_models(resolve("smoke", algorithms=weights), ["hmm"])
    more = experiment_models(resolve("smoke", algorithms=weights, pretraining={"correlation_seeds": 3}),
                             ["hmm"])
    extra = [m for m in more if m.lineage == "hmm seed 2"]
    assert {m.origin for m in extra} == {"02 phase 1", "02 sgd", "02 adamw", "04 adversarial"}
    assert [m for m in more if m.lineage != "hmm seed 2"] == base  # nothing else changes
    with pytest.raises(ValueError, match="pretraining.correlation_seeds"):
        resolve("smoke", pretraining={"correlation_seeds": 1})


def test_parents_train_first_and_once(tmp_path, monkeypatch):
    """Two children of one unlisted, untrained parent: the parent trains alone in a first wave (two
    workers would otherwise each train it inside their child's pretrain), then the children."""
    from flatlib.runner import sweep

    store = RunStore(tmp_path)
    base = base_config(steps=20, checkpoint_every=20)
    middle = continuation(base, from_step=20, steps=10, optimizer="sgd", lr=0.05, checkpoint_every=10)
    children = [continuation(middle, from_step=10, steps=5, optimizer="sgd", lr=lr, checkpoint_every=5)
                for lr in (0.01, 0.02)]
    waves = sweep.training_waves(children + [base], store)
    assert [[c.key for c in wave] for wave in waves] == [[base.key], [middle.key], [c.key for c in children]]
    started = []
    original = sweep._run_one
    monkeypatch.setattr(sweep, "_run_one", lambda job: started.append(job[0]) or original(job))
    results = run_configs(children, store, progress=False)
    assert all(r.ok and r.run.finished for r in results)
    keys = [PretrainConfig.from_dict(job).key for job in started]
    assert keys == [base.key, middle.key] + [c.key for c in children]  # each once, parents first
    assert sweep.training_waves(children + [base], store) == []  # all finished now


def test_the_costliest_runs_of_a_wave_come_first(tmp_path):
    """Workers take jobs in order: a long run started last would leave the others idle."""
    from dataclasses import replace

    from flatlib.runner import sweep

    short, long = base_config(steps=10), base_config(steps=40)
    wide = replace(short, model={**short.model, "d_model": 2 * short.model["d_model"]})
    assert sweep.training_cost(long) == 4 * sweep.training_cost(short)
    assert sweep.training_cost(wide) > sweep.training_cost(short)
    waves = sweep.training_waves([short, wide, long], RunStore(tmp_path))
    assert [c.key for c in waves[0]] == [c.key for c in sorted([short, wide, long], key=sweep.training_cost,
                                                               reverse=True)]
    assert waves[0][-1].key == short.key
