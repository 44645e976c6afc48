import itertools
from collections import defaultdict

import numpy as np
import pytest
import torch
from brute_force import causal_conditional, mlm_conditional, sample_fit_pvalue

from flatlib.languages import Corpus, TeacherLM, build_language


def tiny_teacher(**overrides) -> TeacherLM:
    kwargs = dict(vocab_size=3, seq_len=4, n_topics=2, temperature=0.7, seed=1, n_layer=2, d_model=16)
    return TeacherLM.random(**{**kwargs, **overrides})


def joint_strings(lm: TeacherLM) -> dict[tuple[int, ...], np.ndarray]:
    """Every sentence with p(topic = k, x) for every k, from the teacher's softmax, one prefix at a
    time (an independent slow loop)."""
    teacher, v = lm.teacher, lm.vocab_size
    out = {}
    with torch.no_grad():
        for words in itertools.product(range(v), repeat=lm.seq_len):
            joint = np.zeros(lm.n_topics)
            for k in range(lm.n_topics):
                p = 1.0 / lm.n_topics
                for t in range(lm.seq_len):
                    inputs = torch.tensor([[v + 4 + k, *words[:t]]])
                    logits = teacher(inputs)[0, -1] / lm.temperature
                    p *= float(torch.softmax(logits, dim=-1)[words[t]])
                joint[k] = p
            out[words] = joint
    return out


@pytest.fixture(scope="module")
def tiny():
    lm = tiny_teacher()
    joint = joint_strings(lm)
    strings = {s: float(j.sum()) for s, j in joint.items()}
    return lm, joint, strings


def all_sentences(lm: TeacherLM, length: int | None = None) -> Corpus:
    length = length or lm.seq_len
    tokens = torch.tensor(list(itertools.product(range(lm.vocab_size), repeat=length)))
    return Corpus(tokens, torch.full((len(tokens),), length))


def test_conditionals_and_losses_match_enumeration(tiny):
    lm, _, strings = tiny
    assert sum(strings.values()) == pytest.approx(1.0, abs=1e-12)
    corpus = all_sentences(lm)
    mlm = lm.mlm_conditionals(corpus).numpy()
    causal = lm.causal_conditionals(corpus).numpy()
    log_prob = lm.log_prob(corpus).numpy()
    mlm_nll = causal_nll = 0.0
    for i, s in enumerate(map(tuple, corpus.tokens.tolist())):
        assert log_prob[i] == pytest.approx(np.log(strings[s]), abs=1e-10)
        for t in range(lm.seq_len):
            expected = mlm_conditional(strings, s, t, lm.vocab_size)
            np.testing.assert_allclose(mlm[i, t], expected, atol=1e-6)
            mlm_nll -= np.log(expected[s[t]])
            expected = causal_conditional(strings, s[:t], lm.vocab_size)
            assert expected[-1] == 0.0  # fixed length: no end event
            expected = expected[:-1] / expected[:-1].sum()
            np.testing.assert_allclose(causal[i, t], expected, atol=1e-6)
            causal_nll -= np.log(expected[s[t]])
    n_tokens = corpus.n_tokens
    assert lm.optimal_mlm_loss(corpus).mean == pytest.approx(mlm_nll / n_tokens, abs=1e-6)
    assert lm.optimal_causal_loss(corpus).mean == pytest.approx(causal_nll / n_tokens, abs=1e-6)


def test_shorter_sentences_are_prefixes(tiny):
    """A corpus of length-3 sentences: the conditionals of the length-3 marginal distribution."""
    lm, _, strings = tiny
    prefixes: dict[tuple[int, ...], float] = defaultdict(float)
    for s, p in strings.items():
        prefixes[s[:3]] += p
    corpus3 = all_sentences(lm, 3)
    padded = Corpus(torch.cat([corpus3.tokens, torch.full((len(corpus3), 1), -1)], dim=1), corpus3.lengths)
    mlm = lm.mlm_conditionals(padded).numpy()
    causal = lm.causal_conditionals(padded).numpy()
    for i, s in enumerate(map(tuple, corpus3.tokens.tolist())):
        for t in range(3):
            np.testing.assert_allclose(mlm[i, t], mlm_conditional(prefixes, s, t, lm.vocab_size), atol=1e-6)
            np.testing.assert_allclose(causal[i, t], causal_conditional(prefixes, s[:t], lm.vocab_size)[:-1],
                                       atol=1e-6)


def test_topic_posterior_and_bayes_accuracy_match_enumeration(tiny):
    lm, joint, strings = tiny
    corpus = all_sentences(lm)
    post = lm.topic_posterior(corpus).numpy()
    expected = np.stack([joint[s] / joint[s].sum() for s in map(tuple, corpus.tokens.tolist())])
    np.testing.assert_allclose(post, expected, atol=1e-10)
    assert lm.bayes_accuracy(corpus, "topic").mean == pytest.approx(expected.max(axis=1).mean(), abs=1e-10)
    exact = sum(j.max() for j in joint.values())  # E_x[max_k p(k | x)] = sum_x max_k p(k, x)
    estimate = lm.bayes_accuracy(lm.sample(20_000, seed=0), "topic")
    assert abs(estimate.mean - exact) < 4 * estimate.stderr
    assert lm.tasks == ("topic",) and lm.n_classes("topic") == 2


def test_sampler_frequencies_match_exact_distribution(tiny):
    """Chi-square goodness of fit of the sentences and of (topic, sentence) pairs (20k samples)."""
    lm, joint, strings = tiny
    corpus = lm.sample(20_000, seed=0)
    assert sample_fit_pvalue(corpus, strings) > 1e-3
    labels = lm.task_labels(corpus, "topic")
    assert torch.equal(labels, corpus.latents["topic"])
    # the topic and the words jointly: encode the topic as an extra leading token
    paired = Corpus(torch.cat([labels[:, None], corpus.tokens], dim=1), corpus.lengths + 1)
    pairs = {(k, *s): float(j[k]) for s, j in joint.items() for k in range(lm.n_topics)}
    assert sample_fit_pvalue(paired, pairs) > 1e-3


def test_sample_is_reproducible():
    lm = TeacherLM.random(vocab_size=7, seq_len=6, n_topics=3, seed=0, d_model=16)
    a, b = lm.sample(100, seed=3), lm.sample(100, seed=3)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.latents["topic"], b.latents["topic"])
    assert not torch.equal(a.tokens, lm.sample(100, seed=4).tokens)
    # the same seed builds the same teacher; chunking does not change the sample
    again = TeacherLM.random(vocab_size=7, seq_len=6, n_topics=3, seed=0, d_model=16)
    again.max_rows = 7
    assert torch.equal(again.sample(100, seed=3).tokens, a.tokens)
    assert len(lm.sample(0)) == 0


def test_temperature_lowers_entropy():
    corpus_losses = []
    for temperature in (2.0, 1.0, 0.5):
        lm = TeacherLM.random(vocab_size=8, seq_len=5, n_topics=2, temperature=temperature, seed=0,
                              d_model=16)
        corpus_losses.append(lm.optimal_causal_loss(lm.sample(500, seed=0)).mean)
    assert corpus_losses[0] > corpus_losses[1] > corpus_losses[2] > 0
    assert corpus_losses[0] < np.log(8)


def test_build_language():
    lm = build_language({"kind": "teacher", "vocab_size": 5, "seq_len": 4, "n_topics": 2, "d_model": 16})
    assert isinstance(lm, TeacherLM) and lm.vocab_size == 5 and lm.max_len == 4
    with pytest.raises(ValueError, match="language.temperature"):
        build_language({"kind": "teacher", "temperature": 0})


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"vocab_size": 0}, "vocab_size"),
        ({"seq_len": 0}, "seq_len"),
        ({"n_topics": 0}, "n_topics"),
        ({"n_topics": 1.5}, "n_topics"),
        ({"temperature": 0.0}, "temperature"),
        ({"temperature": -1.0}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"n_layer": 0}, "n_layer"),
        ({"d_model": True}, "d_model"),
        ({"d_model": 15, "n_head": 2}, "d_model"),
    ],
)
def test_bad_configurations_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        tiny_teacher(**kwargs)


def test_bad_arguments_raise(tiny):
    lm = tiny[0]
    with pytest.raises(ValueError, match="token ids"):
        lm.mlm_conditionals(Corpus(torch.tensor([[0, 1, 7, 0]]), torch.tensor([4])))
    with pytest.raises(ValueError, match="token ids"):
        lm.causal_conditionals(Corpus(torch.tensor([[0, -1, 0, 0]]), torch.tensor([4])))
    with pytest.raises(ValueError, match="max_len"):
        lm.causal_conditionals(Corpus(torch.zeros(1, 5, dtype=torch.long), torch.tensor([5])))
    with pytest.raises(ValueError, match="task"):
        lm.task_labels(lm.sample(3), "state@1")
    with pytest.raises(ValueError, match="topic"):
        lm.task_labels(Corpus(torch.zeros(1, 4, dtype=torch.long), torch.tensor([4])), "topic")
    with pytest.raises(ValueError, match="n:"):
        lm.sample(-1)


@pytest.mark.parametrize("bad", [True, 2.0])
@pytest.mark.parametrize("name",
                         ["vocab_size", "seq_len", "n_topics", "n_layer", "d_model", "n_head", "d_ff"])
def test_integer_arguments_reject_bools_and_floats(name, bad):
    with pytest.raises(ValueError, match=f"{name}: expected an integer >= 1, got {bad!r}"):
        tiny_teacher(**{name: bad})


@pytest.mark.parametrize("bad", [True, 2.0])
def test_sample_size_and_max_rows_reject_bools_and_floats(bad):
    lm = tiny_teacher()
    with pytest.raises(ValueError, match=f"n: expected an integer >= 0, got {bad!r}"):
        lm.sample(bad)
    with pytest.raises(ValueError, match=f"max_rows: expected an integer >= 1, got {bad!r}"):
        TeacherLM(lm.teacher, lm.seq_len, lm.n_topics, max_rows=bad)
