"""Hidden Markov models: sentences of a fixed length, exact conditionals by forward-backward.

The generative story: ``h_0 ~ initial``, ``h_t ~ transition[h_{t-1}]``, ``x_t ~ emission[h_t]``.
Downstream tasks are the paper's: predict the hidden state at a position (6 and 10 by default,
0-indexed) from the sentence; the Bayes-optimal accuracy is ``E_x[max_h p(h_t = h | x)]``.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from flatlib.checks import check_int, check_number, check_seed, is_real
from flatlib.languages.base import (
    Corpus,
    Estimate,
    LanguageBase,
    RowSampler,
    check_probability_rows,
    unknown_task,
)

PAPER_TASK_POSITIONS = (6, 10)


def dirichlet_rows(rng: np.random.Generator, n_rows: int, n_cols: int, concentration: float,
                   floor: float) -> np.ndarray:
    """Rows drawn from a symmetric Dirichlet, floored at ``floor`` and renormalised."""
    rows = rng.dirichlet(np.full(n_cols, concentration), size=n_rows)
    rows = np.maximum(rows, floor)
    return rows / rows.sum(axis=1, keepdims=True)


class HMM(LanguageBase):
    """A hidden Markov model over ``vocab_size`` words with ``n_states`` hidden states.

    Args:
        initial: ``[H]`` start distribution.
        transition: ``[H, H]``; row ``i`` is ``p(h_{t+1} | h_t = i)``.
        emission: ``[H, V]``; row ``i`` is ``p(x_t | h_t = i)``.
        seq_len: sentence length ``L`` (every sentence has exactly this length).
        task_positions: positions whose hidden state defines the downstream tasks. Default: the
            paper's 6 and 10 (0-indexed) where they fit, else the middle position.

    Each probability row must be non-negative and sum to 1 within 1e-6 (ValueError otherwise,
    naming the matrix and the row). Probabilities are stored in float64.
    """

    def __init__(self, initial, transition, emission, seq_len: int = 16,
                 task_positions: tuple[int, ...] | None = None) -> None:
        initial = torch.as_tensor(initial, dtype=torch.float64)
        transition = torch.as_tensor(transition, dtype=torch.float64)
        emission = torch.as_tensor(emission, dtype=torch.float64)
        if initial.dim() != 1 or initial.numel() == 0:
            raise ValueError(f"initial: expected a non-empty vector, got shape {tuple(initial.shape)}")
        n_states = initial.numel()
        if transition.shape != (n_states, n_states):
            raise ValueError(
                f"transition: expected shape ({n_states}, {n_states}), got {tuple(transition.shape)}"
            )
        if emission.dim() != 2 or emission.shape[0] != n_states or emission.shape[1] == 0:
            raise ValueError(f"emission: expected shape ({n_states}, V), got {tuple(emission.shape)}")
        for name, matrix in (("initial", initial), ("transition", transition), ("emission", emission)):
            check_probability_rows(name, matrix)
        check_int("seq_len", seq_len)
        if task_positions is None:
            task_positions = tuple(p for p in PAPER_TASK_POSITIONS if p < seq_len) or (seq_len // 2,)
        for position in task_positions:
            check_int("task_positions", position, low=0)
            if not position < seq_len:
                raise ValueError(f"task_positions: position {position} outside [0, {seq_len})")
        self.initial, self.transition, self.emission = initial, transition, emission
        self.n_states, self.vocab_size = emission.shape
        self.seq_len = self.max_len = seq_len
        self.task_positions = tuple(task_positions)
        self._initial_sampler = RowSampler(initial[None, :])
        self._transition_sampler = RowSampler(transition)
        self._emission_sampler = RowSampler(emission)

    @classmethod
    def random(cls, n_states: int = 100, vocab_size: int = 200, seq_len: int = 16,
               concentration: float = 0.2, floor: float = 1e-4, seed: int = 0,
               task_positions: tuple[int, ...] | None = None) -> "HMM":
        """A random HMM: uniform start; transition and emission rows ~ Dirichlet(concentration),
        floored at ``floor`` and renormalised. Smaller ``concentration`` = sparser, more
        predictable rows (lower entropy); larger = closer to uniform. The paper's sizes are the
        defaults (100 states, 200 words, length 16)."""
        for name, value in (("n_states", n_states), ("vocab_size", vocab_size), ("seq_len", seq_len)):
            check_int(name, value)
        check_number("concentration", concentration)
        if not (is_real(floor) and 0 <= floor < 1 / max(n_states, vocab_size)):
            raise ValueError(f"floor: expected in [0, 1/max(n_states, vocab_size)), got {floor!r}")
        check_seed("seed", seed)
        rng = np.random.default_rng(seed)
        initial = np.full(n_states, 1.0 / n_states)
        transition = dirichlet_rows(rng, n_states, n_states, concentration, floor)
        emission = dirichlet_rows(rng, n_states, vocab_size, concentration, floor)
        return cls(initial, transition, emission, seq_len, task_positions)

    def __repr__(self) -> str:
        return f"HMM(n_states={self.n_states}, vocab_size={self.vocab_size}, seq_len={self.seq_len})"

    # ---------------------------------------------------------------- sampling
    def sample(self, n: int, seed: int = 0) -> Corpus:
        """``n`` sentences of length ``seq_len``; latents: ``"states"`` [n, L] (hidden path)."""
        check_int("n", n, low=0)
        generator = torch.Generator().manual_seed(seed)
        states = torch.empty(n, self.seq_len, dtype=torch.long)
        tokens = torch.empty(n, self.seq_len, dtype=torch.long)
        h = self._initial_sampler.sample(torch.zeros(n, dtype=torch.long), generator)
        for t in range(self.seq_len):
            if t > 0:
                h = self._transition_sampler.sample(h, generator)
            states[:, t] = h
            tokens[:, t] = self._emission_sampler.sample(h, generator)
        lengths = torch.full((n,), self.seq_len, dtype=torch.long)
        return Corpus(tokens, lengths, {"states": states})

    # ---------------------------------------------------------------- exact inference
    def _forward_backward(self, corpus: Corpus) -> tuple[Tensor, Tensor, Tensor]:
        """Scaled forward-backward over a batch (float64, no underflow at any length).

        Returns ``predictive`` [n, L, H] = p(h_t | x_<t), ``beta`` [n, L, H] proportional to
        p(x_>t | h_t) within the sentence (each row scaled to sum to 1: scaling per position does
        not change any conditional), and ``log_norm`` [n, L] = log p(x_t | x_<t) of the true words.
        Padding positions are ignored (a shorter sentence simply ends).
        """
        self.check_corpus(corpus)
        n, length = corpus.tokens.shape
        words = corpus.tokens.clamp(min=0)
        mask = corpus.mask
        emit = self.emission.T[words]  # [n, L, H]: p(x_t | h) for the observed words
        predictive = torch.empty(n, length, self.n_states, dtype=torch.float64)
        log_norm = torch.zeros(n, length, dtype=torch.float64)
        prior = self.initial.expand(n, -1)
        for t in range(length):
            predictive[:, t] = prior
            joint = prior * emit[:, t]
            norm = joint.sum(dim=1, keepdim=True)
            log_norm[:, t] = torch.log(norm.squeeze(1)).where(mask[:, t], 0.0)
            prior = (joint / norm) @ self.transition
        beta = torch.empty_like(predictive)
        beta[:, -1] = 1.0 / self.n_states
        for t in range(length - 2, -1, -1):
            message = (self.emission.T[words[:, t + 1]] * beta[:, t + 1]) @ self.transition.T
            message = message / message.sum(dim=1, keepdim=True)
            # past the end of a sentence nothing is observed: beta stays flat
            beta[:, t] = torch.where(mask[:, t + 1, None], message, 1.0 / self.n_states)
        return predictive, beta, log_norm

    def mlm_conditionals(self, corpus: Corpus) -> Tensor:
        """``[n, L, V]`` float64: p(x_t = w | all other words of the sentence), every position.

        ``p(x_t = w | x_-t)`` is proportional to ``sum_h p(h_t = h | x_<t) p(w | h) p(x_>t | h_t = h)``.
        Padding positions hold the marginal p(x_t) of an unconstrained continuation (unused).
        """
        predictive, beta, _ = self._forward_backward(corpus)
        unnormalised = (predictive * beta) @ self.emission
        return unnormalised / unnormalised.sum(dim=-1, keepdim=True)

    def causal_conditionals(self, corpus: Corpus) -> Tensor:
        """``[n, L, V]`` float64: p(x_t = w | x_<t) = sum_h p(h_t = h | x_<t) p(w | h) (forward
        algorithm). Sentences have a fixed length, so there is no end-of-sentence event to predict:
        a causal model that knows the length loses nothing at the end."""
        predictive, _, _ = self._forward_backward(corpus)
        return predictive @ self.emission

    def log_prob(self, corpus: Corpus) -> Tensor:
        """``[n]`` log p(x) of each sentence."""
        return self._forward_backward(corpus)[2].sum(dim=1)

    def posterior(self, corpus: Corpus) -> Tensor:
        """``[n, L, H]`` p(h_t = h | x): the exact posterior of the hidden states."""
        predictive, beta, _ = self._forward_backward(corpus)
        words = corpus.tokens.clamp(min=0)
        post = predictive * beta * self.emission.T[words]
        return post / post.sum(dim=-1, keepdim=True)

    # ---------------------------------------------------------------- downstream tasks
    @property
    def tasks(self) -> tuple[str, ...]:
        return tuple(f"state@{position}" for position in self.task_positions)

    def _task_position(self, task: str) -> int:
        if task not in self.tasks:
            raise unknown_task(task, "HMM", self.tasks)
        return int(task.split("@")[1])

    def n_classes(self, task: str) -> int:
        self._task_position(task)
        return self.n_states

    def task_labels(self, corpus: Corpus, task: str) -> Tensor:
        """``[n]`` the true hidden state at the task's position (from the sampled latents)."""
        position = self._task_position(task)
        if "states" not in corpus.latents:
            raise ValueError("corpus: has no 'states' latent (was it sampled from this HMM?)")
        return corpus.latents["states"][:, position]

    def bayes_accuracy(self, corpus: Corpus, task: str) -> Estimate:
        """The Bayes-optimal accuracy of ``task``, E_x[max_h p(h_t = h | x)], estimated over the
        sentences of ``corpus`` (exact given each sentence), with its standard error."""
        position = self._task_position(task)
        return Estimate.of(self.posterior(corpus)[:, position].max(dim=-1).values)


__all__ = ["HMM"]
