"""Issue 13: bad input is named, nothing stale is reused, nothing silently wrong."""

import pytest

from flatlib.languages import HMM, PCFG, TeacherLM, build_language
from flatlib.profiles import resolve

TINY = {"hmm": {"kind": "hmm", "n_states": 3, "vocab_size": 4, "seq_len": 4},
        "pcfg": {"kind": "pcfg", "depth": 2, "n_types": 2, "n_per_level": 3, "n_binary_rules": 2,
                 "vocab_size": 6, "words_per_preterminal": 2},
        "teacher": {"kind": "teacher", "vocab_size": 5, "seq_len": 4, "n_topics": 2, "d_model": 16}}


@pytest.mark.parametrize("kind", sorted(TINY))
@pytest.mark.parametrize("seed", [None, -1, 2**64, 1.5, True])
def test_a_language_needs_an_integer_seed(kind, seed):
    """Regression: seed None kept one run key but drew a new language on every build."""
    with pytest.raises(ValueError, match="^language.seed: "):
        build_language({**TINY[kind], "seed": seed})
    constructor = {"hmm": HMM, "pcfg": PCFG, "teacher": TeacherLM}[kind]
    kwargs = {k: v for k, v in TINY[kind].items() if k != "kind"}
    with pytest.raises(ValueError, match="^seed: "):
        constructor.random(**kwargs, seed=seed)


def test_a_seed_is_the_same_language_every_time():
    spec = {**TINY["hmm"], "seed": 2**63 - 1}
    assert (build_language(spec).transition == build_language(spec).transition).all()


@pytest.mark.parametrize("name", ["seed", "language_seed"])
def test_profile_seeds_must_fit(name):
    with pytest.raises(ValueError, match=f"^{name}: "):
        resolve("smoke", **{name: 2**64})


GRAMMAR = "S A B 1.0\nA a 0.5\nA b 0.5\nB c 0.7\nB d 0.3\n"
TINY_RUN = dict(model={"n_layer": 1, "n_head": 1, "d_model": 8, "d_ff": 16}, steps=4, batch_size=8,
                eval_every=2, checkpoint_every=2, eval_pairs=16, warmup_steps=0)


def test_a_rules_file_language_is_keyed_by_its_contents(tmp_path):
    """Regression: keyed by the path, an edited file returned the old run, and load_model paired
    the edited grammar with the old model."""
    from flatlib.runner.runs import RunStore
    from flatlib.training.train import PretrainConfig, load_model, pretrain

    path = tmp_path / "grammar.txt"
    path.write_text(GRAMMAR)
    config = PretrainConfig(language={"kind": "pcfg_rules", "path": str(path)}, **TINY_RUN)
    assert config.language["path"] == str(path)  # recorded for humans
    run = pretrain(config, RunStore(tmp_path / "runs"), progress=False)
    path.write_text(GRAMMAR.replace("c 0.7", "c 0.6").replace("d 0.3", "d 0.4"))
    edited = PretrainConfig(language={"kind": "pcfg_rules", "path": str(path)}, **TINY_RUN)
    assert edited.key != config.key
    with pytest.raises(ValueError, match="^language.path: .*grammar.txt.* changed"):
        load_model(run)  # the old run's grammar is gone: an error, not the edited grammar
    path.write_text(GRAMMAR)
    assert PretrainConfig(language={"kind": "pcfg_rules", "path": str(path)}, **TINY_RUN).key == config.key


@pytest.mark.parametrize("rules, match", [
    ([("S", ("a",), float("nan")), ("S", ("b",), 1.0)], r"S -> a"),
    ([("S", ("a",), -0.5), ("S", ("b",), 1.5)], r"S -> a"),
    ([("S", ("a",), float("inf"))], r"S -> a"),
])
def test_pcfg_rejects_nan_and_negative_probabilities(rules, match):
    """Regression: NaN passed, and negatives that sum to 1 with the others passed."""
    with pytest.raises(ValueError, match=rf"^rules: .*{match}"):
        PCFG(rules)


@pytest.mark.parametrize("name", ["rule_concentration", "word_concentration"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -1.0])
def test_pcfg_random_rejects_bad_concentrations(name, value):
    kwargs = {k: v for k, v in TINY["pcfg"].items() if k != "kind"}
    with pytest.raises(ValueError, match=f"^{name}: "):
        PCFG.random(**kwargs, **{name: value})


def test_user_symbols_cannot_spell_internal_names():
    """Regression: the user's <a> merged with the internal pre-terminal of the word a, and the
    sampler produced sentences the grammar cannot ("x b", "y b")."""
    with pytest.raises(ValueError, match=r"^rules: symbol '<a>'"):
        PCFG.from_rules("S a b 1.0\n<a> x 0.5\n<a> y 0.5\n")
    with pytest.raises(ValueError, match=r"^rules: symbol 'a b'"):
        PCFG([("S", ("a b", "c"), 1.0)])
    grammar = PCFG.from_rules("S a b 1.0\nA x 0.5\nA y 0.5\n")  # a valid grammar of one sentence
    assert set(grammar.decode(grammar.sample(50, seed=0))) == {"a b"}


def test_a_missing_rules_file_is_reported_as_missing(tmp_path):
    """Regression: PCFG.from_rules("grammar.txt") said 'rules line 1: expected ...'."""
    missing = str(tmp_path / "grammar.txt")
    with pytest.raises(FileNotFoundError, match="grammar.txt"):
        PCFG.from_rules(missing)
    with pytest.raises(FileNotFoundError, match="my grammar.txt"):
        PCFG.from_rules("my grammar.txt")
    assert PCFG.from_rules("S a 1.0").vocab == ["a"]  # one rule on one line is still rule text


def test_a_grammar_too_big_to_allocate_is_refused_with_the_estimate():
    """Regression: a rules file with 1000 non-terminals tried to allocate 8 GB."""
    rules = "\n".join(f"N{i} N{i + 1} x 1.0" for i in range(999)) + "\nN999 y 1.0\n"
    with pytest.raises(ValueError, match=r"^rules: .*1001 non-terminals.*8\.0 GB"):
        PCFG.from_rules(rules)


@pytest.mark.parametrize("profile", ["../x", "a/b", "", ".", "..", "x y"])
def test_figure_and_claims_folders_need_a_plain_profile_name(profile):
    from flatlib.plots.style import figures_dir
    from flatlib.tools.report import claims_dir

    for folder in (figures_dir, claims_dir):
        with pytest.raises(ValueError, match="^profile: "):
            folder(profile)


def test_run_store_files_follow_the_umask(tmp_path):
    """Regression: every file was created 0600 (mkstemp), so a shared store was unreadable."""
    import os

    from flatlib.runner.runs import atomic_write

    old = os.umask(0o022)
    try:
        atomic_write(tmp_path / "shared.json", "{}")
        os.umask(0o077)
        atomic_write(tmp_path / "private.json", "{}")
    finally:
        os.umask(old)
    assert (tmp_path / "shared.json").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "private.json").stat().st_mode & 0o777 == 0o600


def test_the_summary_records_the_thread_count_and_serial_sweeps_restore_it(tmp_path):
    """The thread count changes results at 1e-9: each run records it; run_configs trains with
    threads_per_worker in every backend, and the serial backend leaves the caller's count alone."""
    import torch

    from flatlib.runner.runs import RunStore
    from flatlib.runner.sweep import run_configs
    from flatlib.training.train import PretrainConfig

    config = PretrainConfig(language={**TINY["hmm"], "seed": 0}, **TINY_RUN)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        [result] = run_configs([config], RunStore(tmp_path), threads_per_worker=1, progress=False)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert result.run.summary()["threads"] == 1
