"""Ours: a bag-of-words "Potts" language whose masked word depends on the context only through two
word features (notebook 06, section 3)."""

from __future__ import annotations

import itertools
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from flatlib.checks import check_int
from flatlib.theory.contexts import DTYPE, ContextSet


class BagOfWordsLanguage:
    """Ours: a pairwise ("Potts") language whose masked word depends on the context through a few
    word features.

    Sentences of ``T = seq_len`` words from ``V = n_words``, with probability

        p(x_1..x_T)  ∝  exp( sum_{s<t} J[x_s, x_t] + sum_t h[x_t] ),     J = sum_j lambda_j u_j u_j^T,

    ``u_j in {-1, +1}^V`` the word features (rows of ``features``), ``lambda_j`` their ``strengths``,
    ``h`` the ``field``. The single-mask conditional is then exactly

        p(x_t = w | x_-t) = softmax_w( h_w + sum_j lambda_j u_j[w] f_j ),    f_j = u_j . n,

    ``n in N^V`` the word counts of the context: it depends on the context only through the
    features ``f_j``, and the distribution is exchangeable (the order of the words carries nothing).
    ``two_features`` builds the instance of notebook 06: ``u_1 = (+,+,-,-,...)`` ("sentiment": the
    first half of the words is positive) and ``u_2 = (+,-,+,-,...)``; with ``T - 1`` odd, ``f_j`` is odd,
    never 0, so no ReLU neuron below sits on its kink.
    """

    def __init__(self, features: Tensor, strengths: Tensor, field: Tensor, seq_len: int) -> None:
        features, strengths, field = (torch.as_tensor(x, dtype=DTYPE) for x in (features, strengths, field))
        if features.dim() != 2 or features.shape[1] < 2:
            raise ValueError(f"n_words: expected features [K, V] with V >= 2, got {tuple(features.shape)}")
        if strengths.shape != (features.shape[0],):
            raise ValueError(f"strengths: expected {features.shape[0]} values (one per feature), "
                             f"got {tuple(strengths.shape)}")
        if field.shape != (features.shape[1],):
            raise ValueError(f"field: expected {features.shape[1]} values (one per word), "
                             f"got {tuple(field.shape)}")
        check_int("seq_len", seq_len, low=2)
        self.features, self.strengths, self.field, self.seq_len = features, strengths, field, seq_len
        self.n_words = features.shape[1]
        self.mask_id = self.n_words  # the [MASK] token, after the words
        # all count vectors of the T-1 context words (compositions of T-1 into V parts)
        bags = torch.tensor(list(itertools.combinations_with_replacement(range(self.n_words), seq_len - 1)))
        self.context_counts = F.one_hot(bags, self.n_words).sum(1)  # [N, V]: C(T - 2 + V, V - 1) contexts

    @classmethod
    def two_features(cls, n_words: int = 4, seq_len: int = 6, strengths: Sequence[float] = (0.5, 0.3),
                     field: Sequence[float] | None = None) -> "BagOfWordsLanguage":
        """``u_1 = (+1,...,+1,-1,...,-1)`` (half and half), ``u_2 = (+1,-1,+1,-1,...)``; ``n_words``
        must be a multiple of 4 (so that the two features are balanced and orthogonal) and
        ``seq_len - 1`` odd (so that ``f_j != 0``). ``field`` defaults to 0 (then the sign of
        ``f_1`` is + or - with probability 1/2 each, by the symmetry that swaps the two halves)."""
        check_int("n_words", n_words, low=4)
        if n_words % 4:
            raise ValueError(f"n_words: expected a multiple of 4, got {n_words}")
        check_int("seq_len", seq_len, low=2)
        if (seq_len - 1) % 2 == 0:
            raise ValueError("seq_len: seq_len - 1 (the context words) must be odd so that no feature is 0, "
                             f"got {seq_len}")
        strengths = tuple(strengths)
        numbers = all(not isinstance(s, bool) and isinstance(s, (int, float)) for s in strengths)
        if len(strengths) != 2 or not numbers:
            raise ValueError(f"strengths: expected two numbers, got {strengths!r}")
        half = n_words // 2
        u1 = torch.tensor([1.0] * half + [-1.0] * half, dtype=DTYPE)
        u2 = torch.tensor([1.0, -1.0] * half, dtype=DTYPE)
        field = torch.zeros(n_words, dtype=DTYPE) if field is None else torch.as_tensor(field, dtype=DTYPE)
        return cls(torch.stack([u1, u2]), torch.tensor(strengths, dtype=DTYPE), field, seq_len)

    def __repr__(self) -> str:
        return (f"BagOfWordsLanguage(n_words={self.n_words}, seq_len={self.seq_len}, "
                f"strengths={tuple(self.strengths.tolist())})")

    def feature_values(self, counts: Tensor | None = None) -> Tensor:
        """``[N, K]`` the features ``f_j = u_j . n`` of the contexts (default: every context)."""
        counts = self.context_counts if counts is None else counts
        return counts.to(DTYPE) @ self.features.T

    def conditional_logits(self, counts: Tensor | None = None) -> Tensor:
        """``[N, V]`` exact logits of ``p(x_t | context)``: ``h + sum_j lambda_j u_j f_j``."""
        return self.field + (self.feature_values(counts) * self.strengths) @ self.features

    def _energy(self, counts: Tensor) -> Tensor:
        """log of the unnormalised probability of one sentence with word counts ``counts`` [..., V]."""
        c = counts.to(DTYPE)
        f = c @ self.features.T  # [..., K]
        diagonal = (c @ (self.features ** 2).T)  # sum_w u_j[w]^2 N_w
        return c @ self.field + 0.5 * ((f ** 2 - diagonal) * self.strengths).sum(-1)

    def contexts(self) -> ContextSet:
        """Every context (the multiset of the ``T - 1`` unmasked words), exactly:
        ``P(n) ∝ multinomial(n) sum_w exp(E(n + e_w))`` and ``p(w | n) ∝ exp(E(n + e_w))``. The model
        input of a context is its words in sorted order followed by [MASK] (``[N, T]``; the
        transformer below has no positions, so the order does not matter)."""
        n = self.context_counts
        eye = torch.eye(self.n_words, dtype=n.dtype)
        energy = self._energy(n[:, None, :] + eye)  # [N, V]: E(n + e_w)
        log_multinomial = (torch.lgamma(torch.tensor(float(self.seq_len)))
                           - torch.lgamma(n.to(DTYPE) + 1).sum(1))
        log_weight = log_multinomial + torch.logsumexp(energy, 1)
        weights = torch.softmax(log_weight, 0)
        targets = torch.softmax(energy, 1)
        rows = [torch.repeat_interleave(torch.arange(self.n_words), counts) for counts in n]
        inputs = torch.stack([torch.cat([r, torch.tensor([self.mask_id])]) for r in rows])
        return ContextSet(inputs, weights, targets, torch.full((len(n),), self.seq_len - 1), name=repr(self))

    def scores(self) -> Tensor:
        """``[N]`` the downstream target of notebook 06: the "sentiment score" ``f_1 = u_1 . n`` of
        every context (its sign is the label)."""
        return self.feature_values()[:, 0]

