"""Drawings of the synthetic languages: single sentences (a PCFG parse tree, an HMM hidden path, a
sentence's conditionals) and notebook 01's whole figures.

The ``draw_*`` functions draw on a given matplotlib ``Axes`` (so callers choose the figure layout) and
return what a caller may want to decorate (e.g. the image for a colour bar). The ``plot_*`` functions
build a whole figure and return it, for the caller to save (``flatlib.plots.style.saver``).
"""

from __future__ import annotations

from typing import Mapping

import matplotlib.pyplot as plt
import pandas as pd
import torch
from matplotlib.image import AxesImage
from matplotlib.ticker import MaxNLocator
from torch import Tensor

from flatlib.languages import HMM, PAD, PCFG, Corpus, Language, TeacherLM
from flatlib.measurement.downstream import lookup_table_features

_NODE_BOX = {"boxstyle": "round,pad=0.25", "fc": "#dbe9f6", "ec": "#3b6ea5", "lw": 0.8}
_WORD_BOX = {"boxstyle": "round,pad=0.25", "fc": "#fff2c7", "ec": "#b08d1a", "lw": 0.8}


def draw_parse_tree(ax: plt.Axes, grammar: PCFG, corpus: Corpus, index: int, fontsize: int = 9) -> None:
    """Draw the sampled derivation tree of sentence ``index`` of ``corpus`` (sampled from ``grammar``).

    Every node is a box labelled with its non-terminal at ``(centre of its span, -depth)``, joined to
    its parent; the words sit in a row below the deepest node, each joined (dashed) to the deepest
    node whose span is that single word (the rule that emitted it).
    """
    latents = corpus.latents
    if "node_symbol" not in latents:
        raise ValueError("corpus: has no parse-tree latents (was it sampled from a PCFG?)")
    symbol, parent = latents["node_symbol"][index], latents["node_parent"][index]
    start, end, depth = latents["node_start"][index], latents["node_end"][index], latents["node_depth"][index]
    nodes = (symbol != PAD).nonzero().squeeze(1).tolist()
    length = int(corpus.lengths[index])
    x = {k: (int(start[k]) + int(end[k]) - 1) / 2 for k in nodes}
    y = {k: -int(depth[k]) for k in nodes}
    word_y = min(y.values()) - 1
    for k in nodes:
        if int(parent[k]) >= 0:
            ax.plot([x[k], x[int(parent[k])]], [y[k], y[int(parent[k])]], color="0.45", lw=1, zorder=1)
        ax.text(x[k], y[k], grammar.nonterminals[int(symbol[k])], ha="center", va="center",
                fontsize=fontsize, bbox=_NODE_BOX, zorder=3)
    for t in range(length):
        emitters = [k for k in nodes if int(start[k]) == t and int(end[k]) == t + 1]
        k = max(emitters, key=lambda k: int(depth[k]))
        ax.plot([t, x[k]], [word_y, y[k]], color="0.6", lw=0.8, ls="--", zorder=1)
        ax.text(t, word_y, grammar.vocab[int(corpus.tokens[index, t])], ha="center", va="center",
                fontsize=fontsize, bbox=_WORD_BOX, zorder=3)
    ax.set_xlim(-0.7, length - 0.3)
    ax.set_ylim(word_y - 0.6, 0.6)
    ax.axis("off")


def draw_hidden_path(ax: plt.Axes, hmm: HMM, corpus: Corpus, index: int) -> AxesImage:
    """Draw the hidden path of sentence ``index`` (a line through the sampled states, position by
    position) over the exact posterior ``p(h_t = h | x)`` (shading), with the emitted words as x tick
    labels and the downstream task positions as dotted lines. Returns the posterior image."""
    sentence = corpus[index : index + 1]
    length = int(sentence.lengths[0])
    states = sentence.latents["states"][0, :length]
    posterior = hmm.posterior(sentence)[0, :length]  # [L, H]
    image = ax.imshow(posterior.T.numpy(), origin="lower", aspect="auto", cmap="Blues", vmin=0, vmax=1,
                      extent=(-0.5, length - 0.5, -0.5, hmm.n_states - 0.5), interpolation="nearest")
    for position in hmm.task_positions:
        ax.axvline(position, color="0.3", ls=":", lw=1)
    ax.plot(range(length), states.tolist(), color="C3", marker="o", lw=1.5, label="sampled hidden state")
    words = sentence.tokens[0, :length].tolist()
    ax.set_xticks(range(length), [f"{t}\nw{w}" for t, w in enumerate(words)], fontsize=8)
    ax.set_xlabel("position / emitted word")
    ax.set_ylabel("hidden state")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(False)
    return image


def draw_conditionals(ax: plt.Axes, probs: Tensor, tokens: Tensor, vocab: list[str]) -> AxesImage:
    """Heatmap of one sentence's conditionals ``probs`` [L, V] (positions x words) with the true
    word of every position (``tokens`` [L]) circled. Word labels are shown when ``V <= 40``."""
    length, v = probs.shape
    image = ax.imshow(probs.numpy(), aspect="auto", cmap="viridis", vmin=0, interpolation="nearest")
    ax.scatter(tokens.tolist(), range(length), s=60, facecolors="none", edgecolors="red", lw=1.5,
               label="true word")
    ax.set_yticks(range(length))
    ax.set_ylabel("position t")
    if v <= 40:
        ax.set_xticks(range(v), vocab, rotation=90, fontsize=7)
    ax.set_xlabel("word w")
    ax.grid(False)
    return image


def vocabulary(language: Language) -> list[str]:
    """The words of ``language`` as labels: a grammar's own words, ``w0, w1, ...`` otherwise."""
    if isinstance(language, PCFG):
        return list(language.vocab)
    return [f"w{w}" for w in range(language.vocab_size)]


def plot_hmm_parameters(hmm: HMM, corpus: Corpus) -> plt.Figure:
    """The transition and emission matrices (each row a distribution) and the word frequencies of
    ``corpus``."""
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2), gridspec_kw={"width_ratios": [1, 1.6, 1.6]})
    for ax, matrix, title, xlabel in [
        (axes[0], hmm.transition, "transition p(h' | h)", "next state h'"),
        (axes[1], hmm.emission, "emission p(w | h)", "word w"),
    ]:
        image = ax.imshow(matrix.numpy(), cmap="viridis", vmin=0, vmax=1, aspect="auto",
                          interpolation="nearest")
        ax.set(title=title, xlabel=xlabel, ylabel="state h")
        ax.grid(False)
        fig.colorbar(image, ax=ax, fraction=0.05)
    counts = torch.bincount(corpus.tokens.flatten(), minlength=hmm.vocab_size)
    axes[2].bar(range(hmm.vocab_size), (counts / counts.sum()).numpy(), color="C0")
    axes[2].set(title=f"word frequencies ({corpus.n_tokens} tokens)", xlabel="word w", ylabel="frequency")
    if hmm.vocab_size <= 40:
        axes[2].set_xticks(range(hmm.vocab_size))
    fig.tight_layout()
    return fig


def plot_hidden_path(hmm: HMM, corpus: Corpus, index: int) -> plt.Figure:
    """``draw_hidden_path`` of sentence ``index`` as a figure with a colour bar and a title."""
    fig, ax = plt.subplots(figsize=(max(7, 0.6 * hmm.seq_len), 4))
    image = draw_hidden_path(ax, hmm, corpus, index)
    fig.colorbar(image, ax=ax, label="posterior p(h_t = h | x)")
    ax.set_title(f"HMM sentence {index}: the sampled hidden path (red)\n"
                 "over the exact posterior p(h_t = h | x) (shading)")
    fig.tight_layout()
    return fig


def plot_lengths_and_words(grammar: PCFG, corpus: Corpus) -> plt.Figure:
    """The sentence-length distribution of ``corpus`` and its word frequencies, most frequent first."""
    fig, axes = plt.subplots(1, 2, figsize=(13, 3.8), gridspec_kw={"width_ratios": [1, 2]})
    lengths, longest = corpus.lengths, grammar.max_len
    fractions = torch.bincount(lengths, minlength=longest + 1)[1:] / len(corpus)
    axes[0].bar(range(1, longest + 1), fractions.numpy())
    axes[0].set_xticks(range(1, longest + 1, 1 if longest <= 16 else 4))
    axes[0].set(title=f"sentence lengths (mean {lengths.double().mean():.2f})", xlabel="words",
                ylabel="fraction of sentences")
    counts = torch.bincount(corpus.tokens[corpus.mask], minlength=grammar.vocab_size)
    order = counts.argsort(descending=True)
    axes[1].bar(range(grammar.vocab_size), (counts[order] / counts.sum()).numpy(), color="C1")
    axes[1].set(title=f"word frequencies, most frequent first ({corpus.n_tokens} tokens)", ylabel="frequency")
    if grammar.vocab_size <= 40:
        axes[1].set_xticks(range(grammar.vocab_size), [grammar.vocab[w] for w in order.tolist()], rotation=90,
                           fontsize=8)
    else:
        axes[1].set_xlabel("word rank")
    fig.tight_layout()
    return fig


def plot_parse_tree(grammar: PCFG, corpus: Corpus, index: int) -> plt.Figure:
    """``draw_parse_tree`` of sentence ``index`` as a figure sized to the sentence and the tree."""
    depth = int(corpus.latents["node_depth"][index].max())
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * int(corpus.lengths[index])), 0.9 * (depth + 2)))
    draw_parse_tree(ax, grammar, corpus, index)
    ax.set_title(f"PCFG sentence {index}: its sampled derivation")
    fig.tight_layout()
    return fig


def plot_task_labels(languages: Mapping[str, Language], labels: Mapping[tuple[str, str], Tensor],
                     tasks: pd.DataFrame) -> plt.Figure:
    """One bar chart per (language, task): the label distribution over the labelled sentences, titled
    with the task table's (``flatlib.analysis.languages.task_table``) majority rate, Bayes accuracy and
    unlabelled fraction. One row of panels per language."""
    n_cols = max(len(lang.tasks) for lang in languages.values())
    fig, axes = plt.subplots(len(languages), n_cols, figsize=(5.2 * n_cols, 7.5), squeeze=False)
    for r, (name, lang) in enumerate(languages.items()):
        for c in range(n_cols):
            ax = axes[r, c]
            if c >= len(lang.tasks):
                ax.axis("off")
                continue
            task = lang.tasks[c]
            task_labels = labels[name, task]
            counts = torch.bincount(task_labels[task_labels >= 0], minlength=lang.n_classes(task))
            ax.bar(range(len(counts)), (counts / counts.sum()).numpy(), color=f"C{r}")
            row = tasks.loc[(name, task)]
            ax.set_title(f"{name} · {task}: {row['label']}\nmajority {row['majority class']:.2f} · Bayes "
                         f"{row['Bayes accuracy']:.2f} · no label {row['without label']:.0%}", fontsize=9)
            if isinstance(lang, PCFG) and len(counts) <= 40:
                ax.set_xticks(range(len(counts)), lang.task_classes(task), rotation=90, fontsize=7)
            else:
                ax.set_xlabel("hidden state" if isinstance(lang, HMM) else "class")
                if len(counts) <= 40:
                    ax.set_xticks(range(len(counts)))
            ax.set_ylabel("fraction of labelled sentences")
    fig.tight_layout()
    return fig


def plot_lookup_features(languages: Mapping[str, Language], corpora: Mapping[str, Corpus],
                         indices: Mapping[str, int]) -> plt.Figure:
    """Side by side, one sentence per language (``indices[name]``): its lookup-table features
    (``flatlib.measurement.downstream.lookup_table_features``, the exact p(x_t = w | x_-t)), true words
    circled."""
    widths = [lang.vocab_size + 8 for lang in languages.values()]
    fig, axes = plt.subplots(1, len(languages), figsize=(14, 4.8), squeeze=False,
                             gridspec_kw={"width_ratios": widths})
    for ax, (name, lang) in zip(axes[0], languages.items()):
        index = indices[name]
        sentence = corpora[name][index : index + 1]
        length = int(sentence.lengths[0])
        features = lookup_table_features(lang, sentence)[0, :length]
        image = draw_conditionals(ax, features, sentence.tokens[0, :length], vocabulary(lang))
        ax.set_title(f"{name} sentence {index}: p(x_t = w | rest of the sentence)\n"
                     "(red circles: the true words)")
        fig.colorbar(image, ax=ax, fraction=0.05)
    fig.tight_layout()
    return fig


def plot_teacher(teacher: TeacherLM, corpus: Corpus, n_show: int = 10) -> plt.Figure:
    """Left: the exact topic posterior p(topic | x) of the first ``n_show`` sentences (the sampled
    topic boxed); right: the lookup-table features of sentence 0."""
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.2), gridspec_kw={"width_ratios": [1, 1.4]})
    posterior = teacher.topic_posterior(corpus[:n_show])
    image = axes[0].imshow(posterior.numpy(), aspect="auto", cmap="Blues", vmin=0, vmax=1,
                           interpolation="nearest")
    topics = corpus.latents["topic"][:n_show]
    axes[0].scatter(topics.tolist(), range(len(topics)), marker="s", s=140, facecolors="none",
                    edgecolors="red", lw=1.5)
    axes[0].set(title="exact topic posterior p(topic | x)\n(red square: the sampled topic)", xlabel="topic",
                ylabel="sentence", xticks=range(teacher.n_topics), yticks=range(len(topics)))
    axes[0].grid(False)
    fig.colorbar(image, ax=axes[0], fraction=0.05)
    features = lookup_table_features(teacher, corpus[:1])[0]
    image = draw_conditionals(axes[1], features, corpus.tokens[0], vocabulary(teacher))
    axes[1].set_title("teacher sentence 0: p(x_t = w | rest of the sentence)\n(red circles: the true words)")
    fig.colorbar(image, ax=axes[1], fraction=0.05)
    fig.tight_layout()
    return fig


__all__ = ["draw_parse_tree", "draw_hidden_path", "draw_conditionals", "vocabulary", "plot_hmm_parameters",
           "plot_hidden_path", "plot_lengths_and_words", "plot_parse_tree", "plot_task_labels",
           "plot_lookup_features", "plot_teacher"]
