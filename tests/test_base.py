import math

import pytest
import torch

from flatlib.languages import HMM, Corpus, Estimate, loss_estimate
from flatlib.measurement.downstream import lookup_table_features


def test_corpus_slicing_and_mask():
    tokens = torch.tensor([[1, 2, -1], [0, 1, 2]])
    corpus = Corpus(tokens, torch.tensor([2, 3]), {"states": torch.tensor([[0, 0, 0], [1, 1, 1]])})
    assert corpus.mask.tolist() == [[True, True, False], [True, True, True]]
    assert corpus.n_tokens == 5
    sub = corpus[1:]
    assert len(sub) == 1 and sub.latents["states"].tolist() == [[1, 1, 1]]
    assert [len(b) for b in corpus.batches(1)] == [1, 1]
    with pytest.raises(ValueError, match="latent 'states'"):
        Corpus(tokens, torch.tensor([2, 3]), {"states": torch.zeros(3, 3)})
    with pytest.raises(ValueError, match="tokens must be"):
        Corpus(tokens[0], torch.tensor([2]))


def test_loss_estimate_token_and_sentence_reductions():
    nll = torch.tensor([[1.0, 3.0, 0.0], [2.0, 2.0, 2.0]])
    mask = torch.tensor([[True, True, False], [True, True, True]])
    token = loss_estimate(nll, mask, "token")
    assert token.mean == pytest.approx(10 / 5) and token.n_tokens == 5 and token.n_sentences == 2
    # ratio estimator: residuals s_i - mean * n_i = (4 - 4, 6 - 6) = 0 -> zero standard error
    assert token.stderr == pytest.approx(0.0)
    sentence = loss_estimate(nll, mask, "sentence")
    assert sentence.mean == pytest.approx(2.0)
    with pytest.raises(ValueError, match="reduction"):
        loss_estimate(nll, mask, "mean")


def test_loss_estimate_stderr_matches_independent_tokens():
    """With one token per sentence the ratio estimator is the ordinary mean and its standard error."""
    values = torch.arange(10, dtype=torch.float64)[:, None]
    est = loss_estimate(values, torch.ones(10, 1, dtype=torch.bool))
    assert est.mean == pytest.approx(4.5)
    assert est.stderr == pytest.approx(float(values.std()) / math.sqrt(10))
    assert Estimate.of(values).stderr == pytest.approx(est.stderr)


def test_lookup_table_features_are_the_conditionals():
    hmm = HMM.random(n_states=3, vocab_size=5, seq_len=6, seed=0)
    corpus = hmm.sample(50, seed=0)
    features = lookup_table_features(hmm, corpus)
    assert features.shape == (50, 6, 5)
    p_true = features.gather(-1, corpus.tokens[..., None]).squeeze(-1)
    assert float(-torch.log(p_true).mean()) == pytest.approx(hmm.optimal_mlm_loss(corpus).mean, abs=1e-12)
    causal = lookup_table_features(hmm, corpus, kind="causal")
    torch.testing.assert_close(causal.sum(-1), torch.ones(50, 6, dtype=torch.float64))
    with pytest.raises(ValueError, match="kind"):
        lookup_table_features(hmm, corpus, kind="bert")
