"""flatlib.analysis.languages: notebook 01's tables, checked against exact values computed another way
(enumeration of every sentence and hidden path of tiny languages, tests/brute_force.py)."""

import itertools
import math

import numpy as np
import pytest
import torch
from brute_force import causal_conditional, hmm_strings, mlm_conditional, pcfg_strings
from test_pcfg import TINY_RULES  # the same toy grammar as the PCFG tests

from flatlib.analysis.languages import (
    RELEASED_RULES,
    causal_sample_size,
    check_languages,
    lookup_table_loss,
    majority_rate,
    optimal_loss_table,
    optimal_losses,
    released_grammar,
    sampled_type_agreement,
    sampling_reproducible,
    shortcut_sentence,
    summary,
    task_table,
    teacher_sample_size,
    teacher_summary,
)
from flatlib.languages import HMM, PCFG, Corpus, TeacherLM


def tiny_hmm() -> HMM:
    return HMM.random(n_states=3, vocab_size=3, seq_len=4, concentration=0.5, floor=0.01, seed=1,
                      task_positions=(1, 2))


def every_hmm_sentence(hmm: HMM) -> Corpus:
    tokens = torch.tensor(list(itertools.product(range(hmm.vocab_size), repeat=hmm.seq_len)))
    return Corpus(tokens, torch.full((len(tokens),), hmm.seq_len))


def every_pcfg_sentence(grammar: PCFG) -> tuple[dict, Corpus]:
    strings = pcfg_strings(grammar)
    return strings, grammar.encode([" ".join(grammar.vocab[w] for w in s) for s in strings])


# ------------------------------------------------------------------------------------ optimal losses
def test_hmm_optimal_losses_equal_enumeration_and_obey_the_chain_rule():
    hmm = tiny_hmm()
    strings = hmm_strings(hmm)
    corpus = every_hmm_sentence(hmm)
    mlm_nll = causal_nll = 0.0
    for s in map(tuple, corpus.tokens.tolist()):
        for t in range(hmm.seq_len):
            mlm_nll -= math.log(mlm_conditional(strings, s, t, hmm.vocab_size)[s[t]])
            causal_nll -= math.log(causal_conditional(strings, s[:t], hmm.vocab_size)[s[t]])
    # batches of 7 sentences: the accumulation over batches is exercised (81 sentences)
    result = optimal_losses(hmm, corpus, batch_size=7)
    assert result.mlm.mean == pytest.approx(mlm_nll / corpus.n_tokens, abs=1e-9)
    assert result.causal.mean == pytest.approx(causal_nll / corpus.n_tokens, abs=1e-9)
    assert result.causal_eos is None  # fixed length: no end event
    assert result.row_error < 1e-12 and result.chain_rule_error < 1e-12
    # the chain rule against the enumerated sentence probabilities (not the forward algorithm)
    total = -sum(math.log(strings[s]) for s in map(tuple, corpus.tokens.tolist()))
    assert result.causal.mean * result.causal.n_tokens == pytest.approx(total, rel=1e-10)


def test_pcfg_causal_losses_with_and_without_end_events_equal_enumeration():
    grammar = PCFG.from_rules(TINY_RULES)
    strings, corpus = every_pcfg_sentence(grammar)
    v = grammar.vocab_size
    words_nll = eos_nll = 0.0
    for s in strings:
        for t in range(len(s) + 1):
            expected = causal_conditional(strings, s[:t], v)  # words + end column
            if t < len(s):
                eos_nll -= math.log(expected[s[t]])
                words_nll -= math.log(expected[s[t]] / expected[:v].sum())
            else:
                eos_nll -= math.log(expected[v])
    result = optimal_losses(grammar, corpus, batch_size=4)
    n_tokens = corpus.n_tokens
    assert result.causal.mean == pytest.approx(words_nll / n_tokens, abs=1e-9)
    assert result.causal_eos.n_tokens == n_tokens + len(corpus)  # one end event per sentence
    assert result.causal_eos.mean == pytest.approx(eos_nll / (n_tokens + len(corpus)), abs=1e-9)
    # + EOS, summed over a sentence, is -log p(x): the total is the enumerated total
    total = -sum(math.log(p) for p in strings.values())
    assert result.causal_eos.mean * result.causal_eos.n_tokens == pytest.approx(total, rel=1e-10)
    assert result.chain_rule_error < 1e-12 and result.row_error < 1e-12
    # words only = + EOS without the end events, and each word's term drops log p(the sentence goes on)
    assert result.causal.mean * n_tokens < total
    assert result.mlm.mean < result.causal.mean


def test_causal_sample_size_caps_long_sentences_only():
    short = PCFG.random(seed=0, depth=4, n_types=2, n_per_level=3, n_binary_rules=3, vocab_size=4,
                        words_per_preterminal=2)
    long = PCFG.random(seed=0, depth=5, n_types=2, n_per_level=3, n_binary_rules=3, vocab_size=4,
                       words_per_preterminal=2)
    assert (short.max_len, long.max_len) == (16, 32)
    assert causal_sample_size(short, 4096) == 4096
    assert causal_sample_size(long, 4096) == 1000 and causal_sample_size(long, 500) == 500
    corpus = short.sample(30, seed=0)
    assert optimal_losses(short, corpus, n_causal=10).causal.n_sentences == 10


def test_optimal_loss_table_rows_order_and_nan_for_languages_without_ends():
    languages = {"hmm": tiny_hmm(), "pcfg": PCFG.from_rules(TINY_RULES)}
    corpora = {name: lang.sample(50, seed=2) for name, lang in languages.items()}
    table, exact = optimal_loss_table(languages, corpora)
    assert list(table.index) == ["hmm", "pcfg"]
    assert list(table.columns) == ["V", "max length", "sentences", "tokens", "MLM optimum", "MLM ± se",
                                   "causal sentences", "causal optimum (words)", "causal ± se",
                                   "causal + EOS", "causal + EOS ± se", "uniform log V"]
    assert math.isnan(table.loc["hmm", "causal + EOS"]) and not math.isnan(table.loc["pcfg", "causal + EOS"])
    for name in languages:
        assert table.loc[name, "MLM optimum"] == exact[name].mlm.mean
        assert table.loc[name, "uniform log V"] == pytest.approx(math.log(languages[name].vocab_size))
        assert table.loc[name, "tokens"] == corpora[name].n_tokens


# ------------------------------------------------------------------------------------ the lookup table
@pytest.mark.parametrize("kind", ["hmm", "pcfg"])
def test_lookup_table_loss_is_the_enumerated_optimum(kind):
    if kind == "hmm":
        language = tiny_hmm()
        strings, corpus = hmm_strings(language), every_hmm_sentence(language)
    else:
        language = PCFG.from_rules(TINY_RULES)
        strings, corpus = every_pcfg_sentence(language)
    nll = sum(-math.log(mlm_conditional(strings, s, t, language.vocab_size)[s[t]])
              for s in (tuple(r[:n]) for r, n in zip(corpus.tokens.tolist(), corpus.lengths.tolist()))
              for t in range(len(s)))
    loss = lookup_table_loss(language, corpus, batch_size=5)
    assert loss == pytest.approx(nll / corpus.n_tokens, abs=1e-9)
    assert loss == pytest.approx(language.optimal_mlm_loss(corpus).mean, abs=1e-12)


def test_lookup_table_loss_does_not_depend_on_the_batching():
    grammar = PCFG.random(seed=1, depth=3, n_types=2, n_per_level=3, n_binary_rules=3, vocab_size=5,
                          words_per_preterminal=2)
    corpus = grammar.sample(40, seed=0)
    assert lookup_table_loss(grammar, corpus, batch_size=3) == pytest.approx(
        lookup_table_loss(grammar, corpus, batch_size=1024), abs=1e-12)


# ------------------------------------------------------------------------------------ tasks
def test_majority_rate_ignores_unlabelled_sentences():
    assert majority_rate(torch.tensor([0, 0, 1, -1, -1]), 3) == pytest.approx(2 / 3)
    assert majority_rate(torch.tensor([2, 2, 2, 2]), 3) == 1.0


def test_hmm_task_table_bayes_accuracy_equals_enumerated_posterior():
    hmm = tiny_hmm()
    corpus = hmm.sample(40, seed=3)
    table, labels = task_table({"hmm": hmm}, {"hmm": corpus})
    init, trans, emit = (m.numpy() for m in (hmm.initial, hmm.transition, hmm.emission))
    for task, position in zip(hmm.tasks, hmm.task_positions):
        best = []
        for words in corpus.tokens.tolist():  # p(h_position | x) by summing over all 81 hidden paths
            post = np.zeros(hmm.n_states)
            for path in itertools.product(range(hmm.n_states), repeat=hmm.seq_len):
                p = init[path[0]] * np.prod([trans[a, b] for a, b in zip(path, path[1:])])
                post[path[position]] += p * np.prod([emit[h, w] for h, w in zip(path, words)])
            best.append(post.max() / post.sum())
        row = table.loc[("hmm", task)]
        assert row["Bayes accuracy"] == pytest.approx(np.mean(best), abs=1e-10)
        assert row["Bayes ± se"] == pytest.approx(np.std(best, ddof=1) / np.sqrt(len(best)), abs=1e-10)
        states = corpus.latents["states"][:, position]
        assert torch.equal(labels["hmm", task], states)
        assert row["majority class"] == pytest.approx(np.bincount(states.numpy()).max() / len(states))
        assert row["without label"] == 0.0 and row["classes"] == hmm.n_states
        assert row["label"] == f"hidden state at position {position}"


def test_pcfg_task_table_labels_are_words_only_and_short_sentences_unlabelled():
    grammar = PCFG.random(seed=3, depth=3, n_types=3, n_per_level=3, n_binary_rules=3, vocab_size=6,
                          words_per_preterminal=2, task_spans={"A": None, "B": 4})
    corpus = grammar.sample(200, seed=0)
    table, labels = task_table({"pcfg": grammar}, {"pcfg": corpus})
    assert table.loc[("pcfg", "A"), "Bayes accuracy"] == 1.0 and table.loc[("pcfg", "A"), "Bayes ± se"] == 0.0
    short = float((corpus.lengths < 4).double().mean())
    assert short > 0
    assert table.loc[("pcfg", "B"), "without label"] >= short  # shorter than the span: no label
    assert bool((labels["pcfg", "B"][corpus.lengths < 4] == -1).all())
    assert table.loc[("pcfg", "A"), "label"] == "sentence type of the whole sentence"
    assert table.loc[("pcfg", "B"), "label"] == "non-terminal of the first 4 words"


def test_sampled_type_agreement_is_one_when_each_type_has_its_own_words():
    rules = "S S1 0.4\nS S2 0.6\nS1 a b 0.5\nS1 a 0.5\nS2 c d 0.7\nS2 c 0.3"
    grammar = PCFG.from_rules(rules, task_spans={"A": None})
    task, agreement = sampled_type_agreement(grammar, grammar.sample(100, seed=0))
    assert (task, agreement) == ("A", 1.0)
    # a shared word makes "a" ambiguous: the most likely type is not always the sampled one
    rules = "S S1 0.4\nS S2 0.6\nS1 a 1.0\nS2 a 0.5\nS2 c 0.5"
    grammar = PCFG.from_rules(rules, task_spans={"A": None})
    corpus = grammar.sample(400, seed=0)
    _, agreement = sampled_type_agreement(grammar, corpus)
    # "a" is labelled S1 (inside probability 1 against 0.5), but S2 generates it 3 times in 7
    is_a = (corpus.tokens[:, 0] == grammar.vocab.index("a"))
    from_s2 = torch.tensor([grammar.nonterminals[s] == "S2"
                            for s in corpus.latents["node_symbol"][:, 1].tolist()])
    assert agreement == pytest.approx(1 - float((is_a & from_s2).double().mean()))
    assert sampled_type_agreement(PCFG.from_rules(TINY_RULES, task_spans={"B": 2}), corpus) is None


def test_shortcut_sentence_is_the_longest_short_one():
    grammar = PCFG.from_rules(TINY_RULES)
    assert grammar.max_len == 3

    def corpus(lengths):
        lengths = torch.tensor(lengths)
        return Corpus(torch.zeros(len(lengths), 3, dtype=torch.long), lengths)

    assert shortcut_sentence(grammar, corpus([3, 1, 2, 3, 1])) == 2
    assert shortcut_sentence(grammar, corpus([3, 3, 3])) == 0  # none shorter: the longest
    assert shortcut_sentence(grammar, corpus([3, 3, 2, 1]), first=2) == 0


# ------------------------------------------------------------------------------------ the teacher
def tiny_teacher(**overrides) -> TeacherLM:
    kwargs = dict(vocab_size=3, seq_len=4, n_topics=2, temperature=0.7, seed=1, n_layer=1, d_model=8,
                  n_head=1)
    return TeacherLM.random(**{**kwargs, **overrides})


def test_teacher_sample_size_and_summary():
    assert teacher_sample_size(tiny_teacher(), 5000) == 2000
    assert teacher_sample_size(tiny_teacher(vocab_size=60), 5000) == 200
    assert teacher_sample_size(tiny_teacher(vocab_size=60), 50) == 50
    lm = tiny_teacher()
    summary = teacher_summary(lm, 60, seed=4)
    assert len(summary.corpus) == 60
    assert torch.equal(summary.corpus.tokens, lm.sample(60, seed=4).tokens)
    topics = summary.corpus.latents["topic"]
    assert summary.majority == np.bincount(topics.numpy(), minlength=2).max() / 60
    posterior = lm.topic_posterior(summary.corpus)
    assert summary.bayes.mean == pytest.approx(float(posterior.max(dim=-1).values.mean()), abs=1e-12)
    assert summary.mlm.mean < summary.causal.mean < math.log(3)
    table = summary.table()
    assert list(table.index) == ["teacher"]
    assert table.loc["teacher", "MLM optimum"] == summary.mlm.mean
    assert table.loc["teacher", "topic majority"] == summary.majority
    assert (table.loc["teacher", "sentences"], table.loc["teacher", "topics"]) == (60, 2)


# ------------------------------------------------------------------------------------ released grammar
def test_released_grammar_is_skipped_when_absent(tmp_path):
    assert released_grammar(100, 0, "cpu", path=tmp_path / "missing.txt") is None


@pytest.mark.skipif(not RELEASED_RULES.exists(), reason="../shared/anchors/rule_deep_mlm.txt not present")
def test_released_grammar_optimum_lies_between_the_paper_and_log_v():
    released = released_grammar(10_000, 0, "smoke")
    assert released.mlm.n_sentences == 200  # the smoke profile's cap
    assert 3.196 < released.mlm.mean < math.log(released.grammar.vocab_size)


# ------------------------------------------------------------------------------------ checked summary
def test_sampling_reproducible():
    assert sampling_reproducible(tiny_hmm(), seed=0)
    assert sampling_reproducible(PCFG.from_rules(TINY_RULES), seed=5)

    class Frozen:  # a "language" that ignores its seed
        def sample(self, n, seed=0):
            return Corpus(torch.zeros(n, 2, dtype=torch.long), torch.full((n,), 2))

    assert not sampling_reproducible(Frozen(), seed=0)


@pytest.fixture(scope="module")
def summary_inputs():
    languages = {"hmm": tiny_hmm(), "pcfg": PCFG.from_rules(TINY_RULES, task_spans={"A": None, "B": 2})}
    corpora = {name: lang.sample(80, seed=0) for name, lang in languages.items()}
    losses, exact = optimal_loss_table(languages, corpora)
    tasks, _ = task_table(languages, corpora)
    lookup = {name: lookup_table_loss(lang, corpora[name]) for name, lang in languages.items()}
    teacher = teacher_summary(tiny_teacher(), 40, seed=0)
    return languages, losses, exact, lookup, tasks, teacher


def test_check_languages_passes_on_exact_numbers_and_names_what_fails(summary_inputs):
    languages, losses, exact, lookup, tasks, teacher = summary_inputs
    check_languages(languages, losses, exact, lookup, tasks, teacher, None, seed=0)
    with pytest.raises(AssertionError, match="pcfg: lookup-table loss != optimum"):
        check_languages(languages, losses, exact, {**lookup, "pcfg": lookup["pcfg"] + 1e-6}, tasks, teacher,
                        None, seed=0)
    worse = tasks.copy()
    worse.loc[("hmm", "state@1"), "majority class"] = 1.0
    with pytest.raises(AssertionError, match="state@1"):
        check_languages(languages, losses, exact, lookup, worse, teacher, None, seed=0)


def test_summary_rounds_the_table(summary_inputs):
    languages, losses, exact, lookup, tasks, teacher = summary_inputs
    text = summary({"profile": "smoke", "seed": 0, "n_eval_sentences": 80}, languages, losses, tasks,
                   teacher, None)
    lines = text.splitlines()
    assert lines[0] == "01_synthetic_languages · profile=smoke · seed=0 · 80 sentences per language"
    assert (f"MLM optimum {losses.loc['hmm', 'MLM optimum']:.3f} ± {losses.loc['hmm', 'MLM ± se']:.3f}"
            in lines[1])
    assert "causal+EOS" in text and "released grammar: not found (skipped)" in text
    assert f"vs majority {teacher.majority:.3f} (40 sentences)" in text
    assert lines[-1].startswith("checks passed")
