"""Drawings of single sentences: a PCFG parse tree, an HMM hidden path, a sentence's conditionals.

Each function draws on a given matplotlib ``Axes`` (so notebooks choose the figure layout and save it
with ``flatlib.plotting.savefig``) and returns what a caller may want to decorate (e.g. the image for a
colour bar).
"""

from __future__ import annotations

import matplotlib.pyplot as plt
from matplotlib.image import AxesImage
from matplotlib.ticker import MaxNLocator
from torch import Tensor

from flatlib.languages import HMM, PCFG, PAD, Corpus

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


__all__ = ["draw_parse_tree", "draw_hidden_path", "draw_conditionals"]
