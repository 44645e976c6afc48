import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from run_helpers import interrupt

from flatlib.languages import build_language
from flatlib.runner.runs import CorruptCheckpointError, RunStore
from flatlib.training.objective import single_mask_batch
from flatlib.training.train import PretrainConfig, learning_rate, load_model, pretrain

TINY_HMM = {"kind": "hmm", "n_states": 4, "vocab_size": 8, "seq_len": 8, "concentration": 0.3, "seed": 0}
TINY_MODEL = {"n_layer": 2, "n_head": 2, "d_model": 32, "d_ff": 64}


def tiny_config(**overrides) -> PretrainConfig:
    base = dict(language=TINY_HMM, model=TINY_MODEL, steps=60, batch_size=64, eval_every=20,
                checkpoint_every=20, eval_pairs=512, warmup_steps=10, lr=3e-3)
    return PretrainConfig(**{**base, **overrides})


def test_tiny_model_reaches_the_optimum(tmp_path):
    """The smoke profile's epsilon: a 2x32 model gets within 0.02 nats of the exact optimum, and its
    loss never beats it (the two gap estimates agree within their standard errors)."""
    config = tiny_config(steps=1500, batch_size=128, eval_every=250, checkpoint_every=500,
                         warmup_steps=100, schedule="linear", eval_pairs=4096)
    run = pretrain(config, RunStore(tmp_path), progress=False)
    metrics = run.metrics()
    last = metrics.iloc[-1]
    assert last["gap"] <= 0.02, metrics
    assert metrics["gap"].iloc[0] > 0.2  # it started far away
    assert abs(last["gap"] - last["gap_paired"]) < 4 * (last["gap_paired_se"] + last["gap_se"])
    assert (metrics["gap"] > 0).all()


def test_masks_are_independent_of_the_sentences():
    """Regression: drawing the masked positions from the sentences' own random stream made the
    position predictive of the hidden states, and a model beat the 'optimum'."""
    config = tiny_config()
    from flatlib.training.objective import mask_generator, training_corpus

    language = build_language(config.language)
    corpus = training_corpus(config, language, 0, None)
    _, positions, _ = single_mask_batch(corpus, 9, 8, mask_generator(config, 0))
    first_states = corpus.latents["states"][:, 0]
    # under independence, the mean position is the same whatever the first hidden state
    means = torch.stack([positions[first_states == h].double().mean() for h in first_states.unique()])
    assert means.max() - means.min() < 2.0


def test_finished_run_is_returned_without_training(tmp_path):
    """Not retrained: no file of the run is rewritten (no wall-clock bound: a loaded machine is slow)."""
    store = RunStore(tmp_path)
    run = pretrain(tiny_config(), store, progress=False)
    stamps = {path.name: path.stat().st_mtime_ns for path in run.dir.iterdir()}
    again = pretrain(tiny_config(), store, progress=False)
    assert again.dir == run.dir
    assert {path.name: path.stat().st_mtime_ns for path in run.dir.iterdir()} == stamps


def test_deterministic_and_resume_is_bit_identical(tmp_path):
    config = tiny_config()
    a = pretrain(config, RunStore(tmp_path / "a"), progress=False)
    b_store = RunStore(tmp_path / "b")
    b = pretrain(config, b_store, progress=False)
    assert a.metrics().equals(b.metrics())
    # interrupt b by hand (drop its last checkpoints and the finished marker), then resume
    interrupt(b, drop_steps=(40, 60))
    resumed = pretrain(config, b_store, progress=False)
    assert resumed.metrics().equals(a.metrics())
    wa, wb = load_model(a).state_dict(), load_model(resumed).state_dict()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_sigkill_then_rerun_gives_identical_results(tmp_path):
    config = tiny_config(steps=400, eval_every=50, checkpoint_every=50)
    reference = pretrain(config, RunStore(tmp_path / "ref"), progress=False)
    store_dir = tmp_path / "killed"
    script = (
        "import sys, torch; torch.set_num_threads(1)\n"
        "from flatlib.runner.runs import RunStore\n"
        "from flatlib.training.train import PretrainConfig, pretrain\n"
        f"pretrain(PretrainConfig.from_dict({config.to_dict()!r}), RunStore({str(store_dir)!r}), "
        "progress=False)\n"
    )
    process = subprocess.Popen([sys.executable, "-c", script])
    run_dir = RunStore(store_dir).path(config.to_dict())
    deadline = time.time() + 120
    while time.time() < deadline and len(list(run_dir.glob("ckpt_*.sha256"))) < 3:
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    killed = RunStore(store_dir).open(config.to_dict())
    assert not killed.finished, "the run finished before it could be killed; make it longer"
    resumed = pretrain(config, RunStore(store_dir), progress=False)
    assert resumed.metrics().equals(reference.metrics())
    wa, wb = load_model(reference).state_dict(), load_model(resumed).state_dict()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_truncated_checkpoint_is_a_clear_error(tmp_path):
    store = RunStore(tmp_path)
    run = pretrain(tiny_config(), store, progress=False)
    (run.dir / "FINISHED").unlink()
    path = run.checkpoint_path(60)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CorruptCheckpointError, match="ckpt_00000060"):
        pretrain(tiny_config(), store, progress=False)


def test_truncated_metrics_are_rewritten_from_the_checkpoint(tmp_path):
    """Regression: with FINISHED deleted and metrics.csv cut in half, the rerun was marked finished
    with the summary of an earlier step. The checkpoint now holds the metrics up to its step."""
    store = RunStore(tmp_path)
    run = pretrain(tiny_config(), store, progress=False)
    reference, summary = run.metrics(), run.summary()
    (run.dir / "FINISHED").unlink()
    lines = run.metrics_path.read_text().splitlines(keepends=True)
    run.metrics_path.write_text("".join(lines[: len(lines) // 2]))
    again = pretrain(tiny_config(), store, progress=False)
    assert again.metrics().equals(reference) and again.summary() == summary


def test_a_checkpoint_without_metrics_resumes_from_the_csv_only_if_it_reaches_it(tmp_path):
    """Checkpoints written before they held the metrics (existing stores): metrics.csv is used, and
    must reach the checkpoint's step."""
    from flatlib.runner.runs import CorruptRunError

    store = RunStore(tmp_path)
    run = pretrain(tiny_config(), store, progress=False)
    reference = run.metrics()
    old = run.load_checkpoint(40)
    del old.state["metrics"]
    run.save_checkpoint(40, old.tensors, old.state)
    interrupt(run, drop_steps=(60,))
    assert pretrain(tiny_config(), store, progress=False).metrics().equals(reference)
    interrupt(run, drop_steps=(60,))
    run.write_metrics(reference.iloc[:2].to_dict("records"))  # rows end at step 20, before 40
    with pytest.raises(CorruptRunError, match="metrics.csv"):
        pretrain(tiny_config(), store, progress=False)


def test_finished_run_vouches_for_its_metrics_and_final_checkpoint(tmp_path):
    """FINISHED records a checksum of metrics.csv and the final checkpoint's digest: a damaged
    metrics file, or a missing final checkpoint (which silently loaded the previous one), is an
    error naming the file."""
    from flatlib.runner.runs import CorruptRunError

    run = pretrain(tiny_config(), RunStore(tmp_path), progress=False)
    good = run.metrics_path.read_bytes()
    run.metrics_path.write_bytes(good[: len(good) // 2])
    with pytest.raises(CorruptRunError, match="metrics.csv"):
        run.metrics()
    run.metrics_path.write_bytes(good)
    assert len(run.metrics()) == 4
    run.checkpoint_path(60).with_suffix(".sha256").unlink()
    with pytest.raises(CorruptRunError, match="ckpt_00000060"):
        load_model(run)


def test_stop_rule_and_continuation(tmp_path):
    store = RunStore(tmp_path)
    config = tiny_config(steps=2000, eval_every=20, stop_gap=0.2, extra_steps=40)
    run = pretrain(config, store, progress=False)
    summary = run.summary()
    assert summary["reached_at"] is not None and summary["steps"] == summary["reached_at"] + 40
    child = tiny_config(optimizer="sgd", lr=0.05, warmup_steps=0, steps=40,
                        init_from={"config": config.to_dict(), "step": summary["steps"]})
    child_run = pretrain(child, store, progress=False)
    first = child_run.metrics().iloc[0]
    parent_last = run.metrics().iloc[-1]
    assert first["gap"] == pytest.approx(parent_last["gap"], abs=1e-12)  # it starts where the parent ended


def test_learning_rate_schedules():
    config = tiny_config(lr=1.0, warmup_steps=10, steps=110, schedule="linear", min_lr=0.0)
    assert learning_rate(config, 0) == pytest.approx(0.1)
    assert learning_rate(config, 9) == pytest.approx(1.0)
    assert learning_rate(config, 60) == pytest.approx(0.5)
    cosine = tiny_config(lr=1.0, warmup_steps=0, steps=100, schedule="cosine", min_lr=0.1)
    assert learning_rate(cosine, 50) == pytest.approx(0.55)
    assert learning_rate(tiny_config(lr=0.5, warmup_steps=0), 1000) == 0.5


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"steps": -5}, "steps"),
        ({"optimizer": "adam"}, "optimizer"),
        ({"stop_gap": 0.0}, "stop_gap"),
        ({"stop_gap": -1e-3}, "stop_gap"),
        ({"lr": 0}, "lr"),
        ({"schedule": "step"}, "schedule"),
        ({"mask_rate": 1.5}, "mask_rate"),
        ({"batch_size": 0}, "batch_size"),
        ({"language": {"kind": "lstm"}}, "language.kind"),
        ({"language": {**TINY_HMM, "n_states": 0}}, "language.n_states"),
        ({"model": {"d_model": 30, "n_head": 4}}, "d_model"),
        ({"model": {"vocab_size": 3}}, "model"),
        ({"init_from": {"step": 3}}, "init_from"),
        ({"seed": None}, "^seed"),
        ({"init_from": {"config": {}, "step": 3}}, "^init_from.config"),
        ({"init_from": {"config": {"language": TINY_HMM, "lr": -1}, "step": 3}}, "^init_from.config.lr"),
        ({"init_from": {"config": {"language": TINY_HMM}, "step": -1}}, "^init_from.step"),
        ({"language": {"kind": "pcfg_rules"}}, "^language.path"),
        ({"seed": 2**64}, "^seed"),
        ({"language": {**TINY_HMM, "seed": None}}, "^language.seed"),
    ],
)
def test_invalid_configs_name_the_field(overrides, match):
    with pytest.raises(ValueError, match=match):
        config = tiny_config(**overrides)
        from flatlib.training.train import model_config

        model_config(config, build_language(config.language))


@pytest.mark.parametrize("model, match", [({"n_head": 3, "d_model": 64}, "^model.d_model"),
                                          ({"n_layer": 0}, "^model.n_layer"), ({"d_ff": -1}, "^model.d_ff"),
                                          ({"causal": True}, "^model.causal")])
def test_model_fields_are_checked_when_the_config_is_built(tmp_path, model, match):
    """Regression: checked only inside pretrain(), after the run directory was created."""
    with pytest.raises(ValueError, match=match):
        tiny_config(model=model)
    assert not any(tmp_path.iterdir())


def test_the_model_config_is_completed_into_the_key():
    """Regression: model={"n_layer": 1} took the other fields from TransformerConfig's defaults,
    which were not part of the run key."""
    config = tiny_config(model={"n_layer": 1})
    assert config.model == {"n_layer": 1, "n_head": 2, "d_model": 64, "d_ff": 256}
    assert config.key == tiny_config(model={"n_layer": 1, "n_head": 2, "d_model": 64, "d_ff": 256}).key
    assert PretrainConfig.from_dict(config.to_dict()) == config
    # layer_norm_eps enters a key only when given: its default is part of the store's format
    from dataclasses import fields

    from flatlib.training.model import TransformerConfig
    assert {f.name: f.default for f in fields(TransformerConfig)}["layer_norm_eps"] == 1e-5


def test_supervise_all_and_multi_mask_train(tmp_path):
    store = RunStore(tmp_path)
    for overrides in ({"supervise_all": True}, {"mask_rate": 0.15}):
        run = pretrain(tiny_config(steps=20, eval_every=10, checkpoint_every=10, **overrides), store,
                       progress=False)
        metrics = run.metrics()
        assert metrics["gap"].iloc[-1] < metrics["gap"].iloc[0]


def test_train_sentences_cycles_through_one_fixed_corpus():
    """A fixed corpus of train_sentences: each epoch's batches are a reshuffle of it, sentence by sentence."""
    from flatlib.training.objective import fixed_corpus, training_corpus

    config = tiny_config(train_sentences=96, batch_size=32)
    language = build_language(config.language)
    fixed = fixed_corpus(config, language)
    assert len(fixed) == 96 and fixed_corpus(tiny_config(), language) is None

    def rows(corpus):
        return sorted(map(tuple, corpus.tokens.tolist()))

    for epoch in range(2):
        batches = [training_corpus(config, language, 3 * epoch + i, fixed) for i in range(3)]
        assert rows(fixed) == sorted(sum((rows(b) for b in batches), []))
    assert not torch.equal(training_corpus(config, language, 0, fixed).tokens,
                           training_corpus(config, language, 3, fixed).tokens)  # reshuffled
    with pytest.raises(ValueError, match="train_sentences"):
        fixed_corpus(tiny_config(train_sentences=16, batch_size=32), language)


def test_ddp_with_two_processes_matches_one_process(tmp_path):
    """torchrun, 2 CPU processes (gloo), each half of every global batch: the same training as one
    process on the whole batch, up to float rounding."""
    import json

    config = tiny_config(steps=30, eval_every=10, checkpoint_every=10)
    single = pretrain(config, RunStore(tmp_path / "single"), progress=False)
    worker = Path(__file__).with_name("ddp_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                    str(worker), str(tmp_path / "ddp"), json.dumps(config.to_dict())],
                   check=True, env=env, timeout=300, capture_output=True)
    ddp = RunStore(tmp_path / "ddp").open(config.to_dict())
    assert ddp.finished
    model_a, model_b = load_model(single), load_model(ddp)
    wa, wb = model_a.state_dict(), model_b.state_dict()
    d = model_a.config.d_model
    for name in wa:
        if name.endswith("attn.qkv.bias"):
            # the key bias adds the same score to every key of a query: softmax ignores it, its true
            # gradient is 0, and AdamW amplifies the rounding noise there. Compare q and v only.
            wa[name], wb[name] = (torch.cat([wa[name][:d], wa[name][2 * d:]]),
                                  torch.cat([wb[name][:d], wb[name][2 * d:]]))
        torch.testing.assert_close(wb[name], wa[name], atol=2e-6, rtol=1e-4, msg=name)
    tokens = torch.randint(0, 8, (16, 8), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(model_b(tokens), model_a(tokens), atol=1e-5, rtol=1e-4)
    a, b = single.metrics(), ddp.metrics()
    assert list(a["step"]) == list(b["step"])
    assert (a["gap"] - b["gap"]).abs().max() < 1e-4


def test_a_diverging_run_stops_and_is_finished_as_diverged(tmp_path):
    store = RunStore(tmp_path)
    config = tiny_config(optimizer="sgd", lr=1e4, warmup_steps=0, steps=60)
    run = pretrain(config, store, progress=False)
    summary = run.summary()
    assert run.finished and summary["diverged"] and summary["final_gap"] is None
    assert summary["steps"] < 60  # it stopped where the loss became non-finite
    assert pretrain(config, store, progress=False).summary() == summary  # and is not retrained


def test_a_language_is_built_once_per_spec():
    """PretrainConfig validates by building its language: equal specs share one (immutable)
    instance, and a build leaves the global random state alone, cached or not (a TeacherLM
    initialises a Transformer before drawing its weights from its seed)."""
    assert build_language(TINY_HMM) is build_language(dict(TINY_HMM))
    assert build_language({**TINY_HMM, "seed": 1}) is not build_language(TINY_HMM)
    teacher = {"kind": "teacher", "vocab_size": 6, "seq_len": 4, "n_topics": 2, "n_layer": 1, "d_model": 8,
               "n_head": 2, "seed": 12345}
    before = torch.random.get_rng_state()
    first = build_language(teacher)
    assert torch.equal(torch.random.get_rng_state(), before)
    assert build_language(teacher) is first
