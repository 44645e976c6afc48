"""flatlib.plots.languages's figures draw the numbers they are given (saving them is
tests/test_plotting.py)."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from flatlib.analysis.languages import task_table  # noqa: E402
from flatlib.languages import HMM, PCFG  # noqa: E402
from flatlib.plots import languages as viz  # noqa: E402

RULES = "S S1 0.4\nS S2 0.6\nS1 a b 0.5\nS1 a 0.5\nS2 A c 0.7\nS2 c 0.3\nA a 0.5\nA b 0.5"


def tiny():
    hmm = HMM.random(n_states=3, vocab_size=4, seq_len=5, concentration=0.5, floor=0.01, seed=1,
                     task_positions=(1, 3))
    pcfg = PCFG.from_rules(RULES, task_spans={"A": None, "B": 1})
    return {"hmm": hmm, "pcfg": pcfg}


def test_hmm_parameter_figure_shows_the_matrices_and_the_word_frequencies():
    hmm = tiny()["hmm"]
    corpus = hmm.sample(200, seed=0)
    fig = viz.plot_hmm_parameters(hmm, corpus)
    axes = fig.axes
    np.testing.assert_allclose(axes[0].images[0].get_array(), hmm.transition.numpy())
    np.testing.assert_allclose(axes[1].images[0].get_array(), hmm.emission.numpy())
    heights = [bar.get_height() for bar in axes[2].patches]
    counts = np.bincount(corpus.tokens.flatten().numpy(), minlength=hmm.vocab_size)
    np.testing.assert_allclose(heights, counts / counts.sum(), rtol=1e-6)
    plt.close(fig)


def test_task_label_figure_bars_are_the_label_fractions():
    languages = tiny()
    corpora = {name: lang.sample(300, seed=1) for name, lang in languages.items()}
    tasks, labels = task_table(languages, corpora)
    fig = viz.plot_task_labels(languages, labels, tasks)
    panels = fig.axes
    assert len(panels) == 4  # 2 languages x 2 tasks
    for ax, key in zip(panels, [("hmm", "state@1"), ("hmm", "state@3"), ("pcfg", "A"), ("pcfg", "B")]):
        y = labels[key]
        counts = np.bincount(y[y >= 0].numpy(), minlength=languages[key[0]].n_classes(key[1]))
        heights = [bar.get_height() for bar in ax.patches]
        np.testing.assert_allclose(heights, counts / counts.sum(), rtol=1e-6)
        assert f"majority {tasks.loc[key, 'majority class']:.2f}" in ax.get_title()
    plt.close(fig)


def test_lookup_feature_figure_shows_conditionals_that_sum_to_one():
    languages = tiny()
    corpora = {name: lang.sample(20, seed=2) for name, lang in languages.items()}
    index = int(torch.argmax(corpora["pcfg"].lengths))
    fig = viz.plot_lookup_features(languages, corpora, {"hmm": 0, "pcfg": index})
    for ax, (name, i) in zip(fig.axes, [("hmm", 0), ("pcfg", index)]):
        image = np.asarray(ax.images[0].get_array())
        assert image.shape == (int(corpora[name].lengths[i]), languages[name].vocab_size)
        np.testing.assert_allclose(image.sum(axis=1), 1.0, atol=1e-12)
        assert ax.get_title().startswith(f"{name} sentence {i}:")
    plt.close(fig)


def test_vocabulary_labels():
    languages = tiny()
    assert viz.vocabulary(languages["hmm"]) == ["w0", "w1", "w2", "w3"]
    assert viz.vocabulary(languages["pcfg"]) == list(languages["pcfg"].vocab)
