"""Exact distributions of tiny languages by enumerating every string (and every derivation / path).

Slow and obviously correct: the reference the fast batched algorithms are tested against.
"""

from __future__ import annotations

import itertools
from collections import defaultdict

import numpy as np

from flatlib.languages import HMM, PCFG


def pcfg_strings(grammar: PCFG) -> dict[tuple[int, ...], float]:
    """Every sentence of an acyclic grammar with its probability (sum over derivations)."""
    rules: dict[str, list[tuple[tuple[str, ...], float]]] = defaultdict(list)
    for lhs, rhs, prob in grammar.rules:
        rules[lhs].append((rhs, prob))
    word_id = {w: i for i, w in enumerate(grammar.vocab)}

    def expand(symbol: str) -> dict[tuple[int, ...], float]:
        if symbol not in rules:
            return {(word_id[symbol],): 1.0}
        out: dict[tuple[int, ...], float] = defaultdict(float)
        for rhs, prob in rules[symbol]:
            partial = {(): prob}
            for child in rhs:
                combined: dict[tuple[int, ...], float] = defaultdict(float)
                for a, pa in partial.items():  # different splits can give the same string: add them
                    for b, pb in expand(child).items():
                        combined[a + b] += pa * pb
                partial = combined
            for s, p in partial.items():
                out[s] += p
        return out

    return dict(expand(grammar.start))


def hmm_strings(hmm: HMM) -> dict[tuple[int, ...], float]:
    """Every sentence of length ``seq_len`` with its probability (sum over hidden paths)."""
    init, trans, emit = (m.numpy() for m in (hmm.initial, hmm.transition, hmm.emission))
    out: dict[tuple[int, ...], float] = defaultdict(float)
    for path in itertools.product(range(hmm.n_states), repeat=hmm.seq_len):
        p_path = init[path[0]] * np.prod([trans[a, b] for a, b in zip(path, path[1:])])
        for words in itertools.product(range(hmm.vocab_size), repeat=hmm.seq_len):
            out[words] += p_path * np.prod([emit[h, w] for h, w in zip(path, words)])
    return dict(out)


def mlm_conditional(strings: dict, sentence: tuple[int, ...], t: int, vocab_size: int) -> np.ndarray:
    """p(x_t = w | x_-t) for a sentence of fixed length."""
    scores = np.array([strings.get(sentence[:t] + (w,) + sentence[t + 1:], 0.0) for w in range(vocab_size)])
    return scores / scores.sum()


def causal_conditional(strings: dict, prefix: tuple[int, ...], vocab_size: int) -> np.ndarray:
    """[p(next = w | prefix) for w] + [p(end | prefix)], summing over every continuation."""
    k = len(prefix)
    scores = np.zeros(vocab_size + 1)
    for s, p in strings.items():
        if s[:k] == prefix:
            scores[s[k] if len(s) > k else vocab_size] += p
    return scores / scores.sum()


def sample_fit_pvalue(corpus, strings: dict[tuple[int, ...], float]) -> float:
    """Chi-square goodness of fit of the sampled sentences to the exact distribution; strings with
    fewer than 5 expected occurrences are pooled into one cell (the chi-square approximation)."""
    from scipy import stats

    n = len(corpus)
    counts: dict[tuple[int, ...], int] = defaultdict(int)
    for row, length in zip(corpus.tokens.tolist(), corpus.lengths.tolist()):
        counts[tuple(row[:length])] += 1
    if not set(counts) <= set(strings):
        raise AssertionError(f"sampled strings outside the support: {set(counts) - set(strings)}")
    big = [s for s, p in strings.items() if p * n >= 5]
    observed = [counts[s] for s in big] + [n - sum(counts[s] for s in big)]
    expected = [strings[s] * n for s in big] + [n * (1 - sum(strings[s] for s in big))]
    return float(stats.chisquare(observed, expected).pvalue)
