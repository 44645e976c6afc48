"""Finite single-mask tasks: a set of contexts with exact probabilities and exact conditionals.

A ``ContextSet`` holds ``N`` contexts ``c``: context ``c`` has probability ``w_c`` and an exact conditional
``p_c = p(. | c)`` over ``V`` words. ``hmm_contexts`` enumerates every single-mask context of a tiny HMM
(notebook 06, sections 1 and 2); ``flatlib.theory.bag_of_words`` builds the contexts of section 3.
All probabilities are float64.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from flatlib.checks import check_int
from flatlib.languages import HMM, Corpus

DTYPE = torch.float64  # every tensor of the theory


@dataclass(frozen=True)
class ContextSet:
    """A finite single-mask task: ``N`` contexts with probabilities and exact conditionals.

    Attributes:
        inputs: ``[N, ...]`` what the model reads for context ``c`` (a context id, a token row...).
        weights: ``[N]`` float64, ``w_c`` = P(context c), summing to 1.
        targets: ``[N, V]`` float64, ``p_c = p(. | c)``, rows summing to 1.
        positions: ``[N]`` the masked position of each context (-1 when not meaningful).
        name: what the contexts are, for descriptions.
    """

    inputs: Tensor
    weights: Tensor
    targets: Tensor
    positions: Tensor | None = None
    name: str = "contexts"

    def __post_init__(self) -> None:
        w, p = self.weights, self.targets
        if w.dim() != 1 or p.dim() != 2 or p.shape[0] != w.shape[0] or w.numel() == 0:
            raise ValueError(f"targets: expected [N, V] with N = len(weights) = {w.shape[0]}, "
                             f"got {tuple(p.shape)}")
        if self.inputs.shape[0] != w.shape[0]:
            raise ValueError(f"inputs: expected {w.shape[0]} rows (one per context), "
                             f"got {self.inputs.shape[0]}")
        if (w < 0).any() or abs(float(w.sum()) - 1) > 1e-9:
            raise ValueError("weights: expected non-negative context probabilities summing to 1")
        if (p < 0).any() or float((p.sum(1) - 1).abs().max()) > 1e-9:
            raise ValueError("targets: expected rows of probabilities summing to 1")

    @property
    def n_contexts(self) -> int:
        return self.weights.shape[0]

    @property
    def vocab_size(self) -> int:
        return self.targets.shape[1]

    def optimal_loss(self) -> float:
        """``L* = sum_c w_c H(p_c)`` in nats: the expected loss of the exact conditionals."""
        p = self.targets
        entropy = -(p * torch.where(p > 0, p.log(), torch.zeros_like(p))).sum(1)
        return float((self.weights * entropy).sum())

    def batch(self) -> tuple[Tensor, Tensor, Tensor]:
        """``(inputs, targets, weights)``: the whole expected loss as one batch for
        ``expected_loss_fn`` (and so for ``flatlib.measurement.flatness.hvp`` / ``hessian_trace``)."""
        return self.inputs, self.targets, self.weights

    def pairs(self) -> tuple[Tensor, Tensor, Tensor]:
        """Every example ``(c, y)`` with ``w_c p_c(y) > 0``: ``(context index [M], word [M],
        probability [M])`` (the probabilities sum to 1)."""
        prob = self.weights[:, None] * self.targets
        index, word = (prob > 0).nonzero(as_tuple=True)
        return index, word, prob[index, word]

    def sample_pairs(self, n_samples: int, generator: torch.Generator,
                     shape: tuple[int, ...] = ()) -> tuple[Tensor, Tensor]:
        """``shape + (n_samples,)`` i.i.d. examples: context indices ``c ~ w`` and words ``y ~ p_c``."""
        check_int("n_samples", n_samples)
        total = math.prod(shape) * n_samples
        index = torch.multinomial(self.weights, total, replacement=True, generator=generator)
        word = torch.multinomial(self.targets[index], 1, generator=generator).squeeze(1)
        return index.view(*shape, n_samples), word.view(*shape, n_samples)


def hmm_contexts(hmm: HMM) -> ContextSet:
    """Every single-mask context of a tiny HMM, by enumeration of its ``V^L`` sentences.

    Context ``(t, x_-t)`` (position ``t`` masked, the other words given) has probability
    ``p(x_-t) / L`` (a sentence, then a uniform position) and target ``p(x_t | x_-t)`` (exact, from
    ``HMM.mlm_conditionals``). ``inputs[c]`` is the sentence with ``x_t = -1`` at the masked position
    (``[N, L]``) and ``positions[c] = t``; there are ``L V^(L-1)`` contexts. A model that reads a
    context id (``FactoredSoftmax``) uses ``torch.arange(N)`` instead (see ``with_ids``).
    """
    V, L = hmm.vocab_size, hmm.seq_len
    if V ** L > 200_000:
        raise ValueError(f"hmm: V^L = {V ** L} sentences is too many to enumerate")
    sentences = torch.tensor(list(itertools.product(range(V), repeat=L)))
    corpus = Corpus(sentences, torch.full((len(sentences),), L))
    joint = hmm.log_prob(corpus).exp().view(*([V] * L))
    conditionals = hmm.mlm_conditionals(corpus)  # [V^L, L, V]
    inputs, weights, targets, positions = [], [], [], []
    for t in range(L):
        marginal = joint.sum(dim=t)  # p(x_-t), indexed by the other L-1 words
        for i in (sentences[:, t] == 0).nonzero().squeeze(1).tolist():  # one representative per context
            rest = torch.cat([sentences[i, :t], sentences[i, t + 1:]])
            masked = sentences[i].clone()
            masked[t] = -1
            inputs.append(masked)
            weights.append(marginal[tuple(rest.tolist())] / L)
            targets.append(conditionals[i, t])
            positions.append(t)
    weights_t = torch.stack(weights).to(DTYPE)
    return ContextSet(torch.stack(inputs), weights_t / weights_t.sum(), torch.stack(targets).to(DTYPE),
                      torch.tensor(positions), name=f"single-mask contexts of {hmm!r}")


def with_ids(contexts: ContextSet) -> ContextSet:
    """The same contexts with ``inputs = arange(N)``: for a model that looks a context up by id."""
    return ContextSet(torch.arange(contexts.n_contexts), contexts.weights, contexts.targets,
                      contexts.positions, contexts.name)

