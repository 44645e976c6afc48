import math

import pytest
import torch

from flatlib.languages import HMM
from flatlib.measurement.downstream import (
    finetune,
    fit_logistic,
    linear_probe,
    lookup_table_features,
    mean_ci,
    model_features,
    pool,
)
from flatlib.training.model import Transformer, TransformerConfig


def hmm_task():
    hmm = HMM.random(n_states=4, vocab_size=8, seq_len=6, concentration=0.5, seed=3, task_positions=(3,))
    corpus = hmm.sample(3000, seed=0)
    return hmm, corpus, hmm.task_labels(corpus, "state@3")


def test_mean_ci_matches_the_t_interval():
    mean, half = mean_ci([1.0, 2.0, 3.0])
    assert mean == 2.0 and half == pytest.approx(4.302653 * 1.0 / math.sqrt(3), rel=1e-6)
    assert math.isnan(mean_ci([5.0])[1])


def test_logistic_regression_separates_separable_data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 3, generator=g, dtype=torch.float64)
    y = (x[:, 0] + x[:, 1] > 0).long()
    w = fit_logistic(x, y, 2, l2=1e-4)
    logits = torch.cat([x, torch.ones(400, 1, dtype=x.dtype)], 1) @ w
    assert float((logits.argmax(1) == y).double().mean()) > 0.97


def test_lookup_table_probe_lies_between_majority_and_bayes():
    hmm, corpus, labels = hmm_task()
    features = pool(lookup_table_features(hmm, corpus), corpus, "concat")
    result = linear_probe(features, labels, hmm.n_states, n_train=1500, n_test=1000, n_splits=2, seed=0)
    majority = float(torch.bincount(labels).max()) / len(labels)
    bayes = hmm.bayes_accuracy(corpus, "state@3")
    assert majority + 0.05 < result.accuracy <= bayes.mean + 4 * bayes.stderr + 0.03
    assert set(result.sweep.index) == {1e-4, 1e-3, 1e-2, 1e-1}
    again = linear_probe(features, labels, hmm.n_states, n_train=1500, n_test=1000, n_splits=2, seed=0)
    assert again.split_accuracies == result.split_accuracies  # deterministic given the seed


def test_model_features_and_pooling():
    hmm, corpus, labels = hmm_task()
    torch.manual_seed(0)
    model = Transformer(TransformerConfig(vocab_size=8, max_len=6, d_model=16, d_ff=32))
    feats = model_features(model, corpus[:10])
    assert feats.shape == (10, 6, 16)
    assert pool(feats, corpus[:10], "concat").shape == (10, 96)
    assert pool(feats, corpus[:10], "mean").shape == (10, 16)
    torch.testing.assert_close(pool(feats, corpus[:10], "position", 2), feats[:, 2])
    with pytest.raises(ValueError, match="pooling"):
        pool(feats, corpus[:10], "max")
    with pytest.raises(ValueError, match="position"):
        pool(feats, corpus[:10], "position", 9)
    accuracy = finetune(model, corpus, labels, hmm.n_states, n_train=500, n_test=500, epochs=2, lr=1e-3,
                        pooling="position", position=3)
    assert 0 <= accuracy <= 1


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"n_train": 1, "n_test": 10}, "n_train"),
        ({"n_train": 5000, "n_test": 10}, "labelled examples"),
        ({"n_train": 100, "n_test": 10, "l2_grid": ()}, "l2_grid"),
        ({"n_train": 100, "n_test": 10, "l2_grid": (-1.0,)}, "l2_grid"),
    ],
)
def test_bad_probe_arguments(kwargs, match):
    hmm, corpus, labels = hmm_task()
    with pytest.raises(ValueError, match=match):
        linear_probe(torch.zeros(len(labels), 2), labels, 4, **kwargs)


def test_finetune_from_the_probe_starts_exactly_at_the_probe():
    """LP-FT: with zero fine-tuning epochs the head folded from the standardised probe predicts
    exactly what the probe does on the test examples."""
    hmm, corpus, labels = hmm_task()
    config = TransformerConfig(vocab_size=hmm.vocab_size, max_len=hmm.max_len, n_layer=1, n_head=2,
                               d_model=16, d_ff=32)
    torch.manual_seed(0)
    model = Transformer(config).eval()
    n_train, n_test, seed = 400, 500, 3
    accuracy = finetune(model, corpus, labels, hmm.n_states, n_train, n_test, epochs=0, seed=seed,
                        pooling="position", position=3, init_head="probe")
    # the same split and the same probe, by hand
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    train, test = order[:n_train], order[n_train : n_train + n_test]
    x = pool(model_features(model, corpus), corpus, "position", 3).double()
    mean, std = x[train].mean(0), x[train].std(0).clamp(min=1e-8)
    w = fit_logistic((x[train] - mean) / std, labels[train], hmm.n_states, 1e-3)
    xs = torch.cat([(x[test] - mean) / std, torch.ones(n_test, 1, dtype=x.dtype)], 1)
    assert accuracy == pytest.approx(float(((xs @ w).argmax(1) == labels[test]).double().mean()),
                                     abs=1 / n_test)
    with pytest.raises(ValueError, match="init_head"):
        finetune(model, corpus, labels, hmm.n_states, 10, 10, init_head="zeros")


def test_protocol_1_probe_is_bit_identical_to_its_pinned_results():
    """linear_probe (protocol 1: capped L-BFGS, L2 chosen per split) gives exactly what it gave before probe
    protocol 2 existed: the committed figures were made with it."""
    hmm = HMM.random(n_states=4, vocab_size=8, seq_len=6, concentration=0.5, seed=3, task_positions=(3,))
    corpus = hmm.sample(1200, seed=0)
    labels = hmm.task_labels(corpus, "state@3")
    x = pool(lookup_table_features(hmm, corpus), corpus, "concat").float()
    r = linear_probe(x, labels, 4, n_train=400, n_test=300, n_splits=2, seed=5)
    assert r.split_accuracies == [0.76, 0.6733333333333333] and r.chosen_l2 == [0.01, 0.0001]
    assert r.sweep["test_accuracy"].to_dict() == {0.0001: 0.7166666666666667, 0.001: 0.72,
                                                  0.01: 0.7216666666666667, 0.1: 0.7266666666666667}
    assert r.sweep["val_accuracy"].to_dict() == {0.0001: 0.72, 0.001: 0.7166666666666667, 0.01: 0.72,
                                                 0.1: 0.72}
    r = linear_probe(x, labels, 4, n_train=150, n_test=300, n_splits=2, seed=5, standardize=False,
                     l2_grid=(1e-4,))
    assert r.split_accuracies == [0.6666666666666666, 0.64] and r.chosen_l2 == [0.0001, 0.0001]
    assert r.sweep["test_accuracy"].to_dict() == {0.0001: 0.6533333333333333}
