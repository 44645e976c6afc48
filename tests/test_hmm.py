import itertools

import numpy as np
import pytest
import torch
from brute_force import causal_conditional, hmm_strings, mlm_conditional, sample_fit_pvalue

from flatlib.languages import HMM, Corpus


def tiny_hmm(seq_len: int = 4) -> HMM:
    return HMM.random(n_states=3, vocab_size=3, seq_len=seq_len, concentration=0.5, floor=0.01, seed=1,
                      task_positions=(1, 2))


def all_sentences(hmm: HMM) -> Corpus:
    tokens = torch.tensor(list(itertools.product(range(hmm.vocab_size), repeat=hmm.seq_len)))
    return Corpus(tokens, torch.full((len(tokens),), hmm.seq_len))


def test_conditionals_and_losses_match_enumeration():
    hmm = tiny_hmm()
    strings = hmm_strings(hmm)
    assert sum(strings.values()) == pytest.approx(1.0, abs=1e-12)
    corpus = all_sentences(hmm)
    mlm = hmm.mlm_conditionals(corpus).numpy()
    causal = hmm.causal_conditionals(corpus).numpy()
    mlm_nll = causal_nll = 0.0
    for i, s in enumerate(map(tuple, corpus.tokens.tolist())):
        for t in range(hmm.seq_len):
            expected = mlm_conditional(strings, s, t, hmm.vocab_size)
            np.testing.assert_allclose(mlm[i, t], expected, atol=1e-6)
            mlm_nll -= np.log(expected[s[t]])
            expected = causal_conditional(strings, s[:t], hmm.vocab_size)[:-1]
            np.testing.assert_allclose(causal[i, t], expected, atol=1e-6)
            causal_nll -= np.log(expected[s[t]])
        assert float(hmm.log_prob(corpus[i : i + 1])) == pytest.approx(np.log(strings[s]), abs=1e-10)
    n_tokens = corpus.n_tokens
    assert hmm.optimal_mlm_loss(corpus).mean == pytest.approx(mlm_nll / n_tokens, abs=1e-6)
    assert hmm.optimal_causal_loss(corpus).mean == pytest.approx(causal_nll / n_tokens, abs=1e-6)


def test_shorter_sentences_are_treated_as_ending():
    """A corpus of length-3 sentences under a length-4 HMM: same conditionals as a length-3 HMM."""
    long, short = tiny_hmm(4), tiny_hmm(3)
    corpus3 = all_sentences(short)
    padded = Corpus(torch.cat([corpus3.tokens, torch.full((len(corpus3), 1), -1)], dim=1), corpus3.lengths)
    np.testing.assert_allclose(long.mlm_conditionals(padded)[:, :3], short.mlm_conditionals(corpus3),
                               atol=1e-12)


def test_posterior_and_bayes_accuracy_match_enumeration():
    hmm = tiny_hmm()
    init, trans, emit = (m.numpy() for m in (hmm.initial, hmm.transition, hmm.emission))
    corpus = all_sentences(hmm)
    post = hmm.posterior(corpus).numpy()
    for i, s in enumerate(corpus.tokens.tolist()[:20]):
        joint = np.zeros((hmm.seq_len, hmm.n_states))
        for path in itertools.product(range(hmm.n_states), repeat=hmm.seq_len):
            p = init[path[0]] * np.prod([trans[a, b] for a, b in zip(path, path[1:])])
            p *= np.prod([emit[h, w] for h, w in zip(path, s)])
            joint[np.arange(hmm.seq_len), path] += p
        np.testing.assert_allclose(post[i], joint / joint.sum(axis=1, keepdims=True), atol=1e-10)
    # Bayes accuracy over the whole support, weighted by sentence probability
    weights = torch.exp(hmm.log_prob(corpus))
    exact = float((post[:, 1].max(axis=1) * weights.numpy()).sum())
    estimate = hmm.bayes_accuracy(hmm.sample(20_000, seed=0), "state@1")
    assert abs(estimate.mean - exact) < 4 * estimate.stderr


def test_sampler_frequencies_match_exact_distribution():
    """Chi-square goodness of fit (20k samples, fixed seed): a correct sampler fails with probability
    1e-3 over random seeds."""
    hmm = tiny_hmm()
    corpus = hmm.sample(20_000, seed=0)
    assert sample_fit_pvalue(corpus, hmm_strings(hmm)) > 1e-3
    # the hidden states are the ones the words were emitted from: labels follow the path
    assert torch.equal(hmm.task_labels(corpus, "state@2"), corpus.latents["states"][:, 2])


def test_sample_is_reproducible():
    hmm = HMM.random(n_states=5, vocab_size=7, seq_len=6, seed=0)
    a, b = hmm.sample(100, seed=3), hmm.sample(100, seed=3)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.latents["states"], b.latents["states"])
    assert not torch.equal(a.tokens, hmm.sample(100, seed=4).tokens)


def test_paper_size_hmm_is_numerically_stable():
    hmm = HMM.random(n_states=100, vocab_size=200, seq_len=16, seed=0)
    corpus = hmm.sample(64, seed=0)
    probs = hmm.mlm_conditionals(corpus)
    assert torch.isfinite(probs).all()
    torch.testing.assert_close(probs.sum(-1), torch.ones(64, 16, dtype=torch.float64))
    loss = hmm.optimal_mlm_loss(corpus)
    assert 0 < loss.mean < np.log(200)


@pytest.mark.parametrize(
    "initial, transition, emission, match",
    [
        ([0.5, 0.6], [[1, 0], [0, 1]], [[1.0], [1.0]], "initial: row 0 sums to 1.1"),
        ([0.5, 0.5], [[1, 0], [0.3, 0.6]], [[1.0], [1.0]], "transition: row 1 sums to 0.9"),
        ([0.5, 0.5], [[1, 0], [0, 1]], [[0.5, 0.5], [1.2, -0.2]], "emission: row 1 has negative"),
        ([0.5, 0.5], [[1, 0, 0], [0, 1, 0]], [[1.0], [1.0]], "transition: expected shape"),
        ([0.5, 0.5], [[1, 0], [0, 1]], [[1.0]], "emission: expected shape"),
        ([[0.5, 0.5]], [[1, 0], [0, 1]], [[1.0], [1.0]], "initial: expected a non-empty vector"),
        ([1.0, float("nan")], [[1, 0], [0, 1]], [[1.0], [1.0]], "initial: contains NaN"),
    ],
)
def test_bad_matrices_raise(initial, transition, emission, match):
    with pytest.raises(ValueError, match=match):
        HMM(initial, transition, emission, seq_len=3, task_positions=(1,))


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="task_positions"):
        HMM.random(n_states=3, vocab_size=3, seq_len=4, task_positions=(6,))
    with pytest.raises(ValueError, match="concentration"):
        HMM.random(concentration=0)
    with pytest.raises(ValueError, match="n_states"):
        HMM.random(n_states=0)
    hmm = tiny_hmm()
    with pytest.raises(ValueError, match="task"):
        hmm.task_labels(hmm.sample(3), "state@9")
    with pytest.raises(ValueError, match="token ids"):
        hmm.mlm_conditionals(Corpus(torch.tensor([[0, 1, 7, 0]]), torch.tensor([4])))
    with pytest.raises(ValueError, match="n:"):
        hmm.sample(-1)


@pytest.mark.parametrize("bad", [True, 2.0])
@pytest.mark.parametrize("name", ["n_states", "vocab_size", "seq_len"])
def test_integer_arguments_reject_bools_and_floats(name, bad):
    """A bool is an int to Python: HMM.random(seq_len=True) must not build a one-word language."""
    with pytest.raises(ValueError, match=f"{name}: expected an integer >= 1, got {bad!r}"):
        HMM.random(**{"n_states": 3, "vocab_size": 3, "seq_len": 4, name: bad})


@pytest.mark.parametrize("bad", [True, 2.0])
def test_sample_size_and_task_positions_reject_bools_and_floats(bad):
    hmm = tiny_hmm()
    with pytest.raises(ValueError, match=f"n: expected an integer >= 0, got {bad!r}"):
        hmm.sample(bad)
    with pytest.raises(ValueError, match=f"task_positions: expected an integer >= 0, got {bad!r}"):
        HMM(hmm.initial, hmm.transition, hmm.emission, seq_len=4, task_positions=(bad,))
