"""What every synthetic language shares: the `Corpus` it samples, the `Language` protocol, and
the exact optimal losses computed from a language's exact conditionals.

Conventions (see docs/design.md):

* token ids in a `Corpus` are the language's words, ``0..V-1``; positions at and beyond
  ``lengths[i]`` hold ``PAD`` (-1), which is not a word, so forgetting the mask fails loudly;
* conditionals are returned in float64: they are the ground truth every model is compared with;
* losses are in nats per token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterator, Protocol, runtime_checkable

import torch
from torch import Tensor

PAD = -1  # the padding value of Corpus.tokens (never a word id)


@dataclass(frozen=True)
class Corpus:
    """A batch of sentences sampled from a language.

    Attributes:
        tokens: ``[n, L]`` int64 word ids, ``PAD`` at and beyond each sentence's length.
        lengths: ``[n]`` int64 sentence lengths (``1 <= lengths <= L``).
        latents: the latent structure the sentences were generated with, each a tensor with a
            leading dimension ``n`` (e.g. ``"states"`` for an HMM, the parse tree for a PCFG).
    """

    tokens: Tensor
    lengths: Tensor
    latents: dict[str, Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.tokens.dim() != 2 or self.lengths.shape != (self.tokens.shape[0],):
            raise ValueError(
                f"tokens must be [n, L] and lengths [n]; got {tuple(self.tokens.shape)} and "
                f"{tuple(self.lengths.shape)}"
            )
        for name, value in self.latents.items():
            if value.shape[0] != self.tokens.shape[0]:
                raise ValueError(f"latent {name!r} has {value.shape[0]} rows, expected {len(self)}")

    def __len__(self) -> int:
        return self.tokens.shape[0]

    @property
    def max_len(self) -> int:
        return self.tokens.shape[1]

    @property
    def mask(self) -> Tensor:
        """``[n, L]`` bool, True at real (non-padding) positions."""
        positions = torch.arange(self.max_len, device=self.tokens.device)
        return positions[None, :] < self.lengths[:, None]

    @property
    def n_tokens(self) -> int:
        return int(self.lengths.sum())

    def __getitem__(self, index: slice | Tensor | list[int]) -> "Corpus":
        """Select sentences (a slice, index list or boolean mask) with their latents."""
        return Corpus(
            self.tokens[index],
            self.lengths[index],
            {name: value[index] for name, value in self.latents.items()},
        )

    def batches(self, batch_size: int) -> Iterator["Corpus"]:
        """Consecutive sub-corpora of at most ``batch_size`` sentences."""
        for start in range(0, len(self), batch_size):
            yield self[start : start + batch_size]


@dataclass(frozen=True)
class Estimate:
    """A mean over ``n`` independent units with its standard error (e.g. a Bayes accuracy)."""

    mean: float
    stderr: float
    n: int

    @classmethod
    def of(cls, values: Tensor) -> "Estimate":
        values = values.to(torch.float64).flatten()
        n = values.numel()
        if n == 0:
            raise ValueError("values: cannot estimate a mean from zero values")
        stderr = float(values.std(unbiased=True)) / math.sqrt(n) if n > 1 else math.nan
        return cls(float(values.mean()), stderr, n)

    def __str__(self) -> str:
        return f"{self.mean:.4f} ± {self.stderr:.4f} (n={self.n})"


@dataclass(frozen=True)
class LossEstimate:
    """A mean loss in nats per token with its standard error.

    Sentences are the independent units (tokens of one sentence are correlated), so the standard
    error is that of a ratio estimator, sum(loss) / sum(tokens), over sentences (delta method).
    """

    mean: float
    stderr: float
    n_sentences: int
    n_tokens: int

    def __str__(self) -> str:
        return f"{self.mean:.4f} ± {self.stderr:.4f} nats/token ({self.n_sentences} sentences)"


def loss_estimate(nll: Tensor, mask: Tensor, reduction: str = "token") -> LossEstimate:
    """Mean of per-token losses ``nll`` [n, L] over the positions where ``mask`` is True.

    ``reduction="token"`` weighs every token equally (the single-mask loss with the masked token drawn
    uniformly among all tokens of the corpus); ``"sentence"`` averages within each sentence first
    (the masked position drawn uniformly within a uniformly drawn sentence).
    """
    mask = mask.to(torch.float64)
    sums = (nll.to(torch.float64) * mask).sum(dim=1)
    counts = mask.sum(dim=1)
    n = sums.shape[0]
    if n == 0:
        raise ValueError("corpus: cannot estimate a loss from zero sentences")
    if reduction == "token":
        mean = float(sums.sum() / counts.sum())
        residual = sums - mean * counts  # linearisation of the ratio estimator
        var = float(residual.var(unbiased=True)) / counts.mean().item() ** 2 if n > 1 else math.nan
    elif reduction == "sentence":
        per_sentence = sums / counts
        mean = float(per_sentence.mean())
        var = float(per_sentence.var(unbiased=True)) if n > 1 else math.nan
    else:
        raise ValueError(f"reduction: expected 'token' or 'sentence', got {reduction!r}")
    return LossEstimate(mean, math.sqrt(var / n), n, int(counts.sum()))


class RowSampler:
    """Draws from many categorical distributions (the rows of ``probs`` [R, K]) at once, by Walker's
    alias method: one uniform per draw and O(1) work, however many columns, so sampling a large
    batch is a handful of dense tensor operations.

    The uniform ``u`` picks column ``j = floor(u K)``; its fractional part ``u K - j`` (uniform and
    independent of ``j``) decides between ``j`` and ``j``'s alias.
    """

    def __init__(self, probs: Tensor) -> None:
        probs = probs.to(torch.float64)
        probs = probs / probs.sum(dim=1, keepdim=True)
        n_rows, self.n_cols = probs.shape
        keep = torch.ones(n_rows, self.n_cols, dtype=torch.float64)
        alias = torch.arange(self.n_cols).repeat(n_rows, 1)
        for r in range(n_rows):  # Vose's construction, once per row (tables are small)
            scaled = (probs[r] * self.n_cols).tolist()
            small = [j for j, p in enumerate(scaled) if p < 1.0]
            large = [j for j, p in enumerate(scaled) if p >= 1.0]
            while small and large:
                s, big = small.pop(), large.pop()
                keep[r, s], alias[r, s] = scaled[s], big
                scaled[big] -= 1.0 - scaled[s]
                (small if scaled[big] < 1.0 else large).append(big)
        self.keep, self.alias = keep.flatten(), alias.flatten()

    def sample_dense(self, rows: Tensor, generator: torch.Generator) -> Tensor:
        """For every entry of ``rows`` (any shape), one draw from that row, returned as the flat
        index ``row * K + column`` (handy for looking up per-outcome tables)."""
        u = torch.rand(rows.shape, dtype=torch.float64, generator=generator).mul_(self.n_cols)
        column = u.long()
        first = rows * self.n_cols
        flat = first + column
        use_alias = u.sub_(column) >= self.keep[flat]
        return torch.where(use_alias, first.add_(self.alias[flat]), flat)

    def sample(self, rows: Tensor, generator: torch.Generator) -> Tensor:
        """One draw (a column index) from each row named in ``rows``."""
        return self.sample_dense(rows, generator) - rows * self.n_cols


@runtime_checkable
class Language(Protocol):
    """What notebooks and training code may rely on, whatever generated the sentences."""

    vocab_size: int
    max_len: int

    def sample(self, n: int, seed: int = 0) -> Corpus: ...

    def mlm_conditionals(self, corpus: Corpus) -> Tensor: ...

    def causal_conditionals(self, corpus: Corpus) -> Tensor: ...

    def optimal_mlm_loss(self, corpus: Corpus, reduction: str = "token") -> LossEstimate: ...

    def optimal_causal_loss(self, corpus: Corpus, reduction: str = "token") -> LossEstimate: ...

    @property
    def tasks(self) -> tuple[str, ...]: ...

    def task_labels(self, corpus: Corpus, task: str) -> Tensor: ...

    def n_classes(self, task: str) -> int: ...


class LanguageBase:
    """Shared implementation: optimal losses from the exact conditionals, in memory-bounded chunks.

    Subclasses provide ``sample``, ``mlm_conditionals`` and ``causal_conditionals``.
    """

    vocab_size: int
    max_len: int
    chunk_size: int = 512  # sentences per exact-inference call inside the loss computations

    def mlm_conditionals(self, corpus: Corpus) -> Tensor:  # pragma: no cover - protocol
        raise TypeError(f"{type(self).__name__} does not define mlm_conditionals")

    def causal_conditionals(self, corpus: Corpus) -> Tensor:  # pragma: no cover - protocol
        raise TypeError(f"{type(self).__name__} does not define causal_conditionals")

    def _true_token_nll(self, corpus: Corpus, conditionals_fn) -> Tensor:
        rows = []
        for chunk in corpus.batches(self.chunk_size):
            probs = conditionals_fn(chunk)[:, : chunk.max_len, : self.vocab_size]
            index = chunk.tokens.clamp(min=0).unsqueeze(-1)
            p_true = probs.gather(-1, index).squeeze(-1)
            rows.append(-torch.log(p_true).masked_fill(~chunk.mask, 0.0))
        return torch.cat(rows)

    def optimal_mlm_loss(self, corpus: Corpus, reduction: str = "token") -> LossEstimate:
        """The exact minimal single-mask MLM loss on ``corpus``: the mean over its tokens of
        ``-log p(x_t | x_-t)`` under the true distribution (nats per token, with standard error)."""
        return loss_estimate(self._true_token_nll(corpus, self.mlm_conditionals), corpus.mask, reduction)

    def optimal_causal_loss(self, corpus: Corpus, reduction: str = "token") -> LossEstimate:
        """The exact minimal next-word loss on ``corpus``: mean over its words of
        ``-log p(x_t | x_<t)`` (see ``causal_conditionals`` for how sentence ends are treated)."""
        return loss_estimate(
            self._true_token_nll(corpus, self.causal_conditionals), corpus.mask, reduction
        )

    def check_corpus(self, corpus: Corpus) -> None:
        """Raise ValueError if ``corpus`` cannot have come from this language."""
        if corpus.max_len > self.max_len:
            raise ValueError(f"corpus: sentences of length {corpus.max_len} > max_len {self.max_len}")
        words = corpus.tokens[corpus.mask]
        if words.numel() and (int(words.min()) < 0 or int(words.max()) >= self.vocab_size):
            raise ValueError(f"corpus: token ids must lie in [0, {self.vocab_size})")
        if len(corpus) and int(corpus.lengths.min()) < 1:
            raise ValueError("corpus: every sentence needs at least one word")


def unknown_task(task: object, language: str, tasks: tuple[str, ...]) -> ValueError:
    """The error for a task name the language does not have. Where it came from is named, since a
    ``flatlib.measurement.measure.Protocol`` cannot check its ``tasks`` before it meets the language."""
    return ValueError(f"task: unknown task {task!r}; this {language} has {tasks}: the tasks asked for "
                      "(Protocol.tasks, algorithms.tasks, adversarial.task) must be among them")


def check_probability_rows(name: str, matrix: Tensor, tol: float = 1e-6) -> None:
    """Rows of ``matrix`` (or the vector itself) must be non-negative and sum to 1 within ``tol``."""
    if not torch.isfinite(matrix).all():
        raise ValueError(f"{name}: contains NaN or infinite entries")
    rows = matrix.reshape(-1, matrix.shape[-1])
    negative = (rows < 0).any(dim=1).nonzero()
    if negative.numel():
        raise ValueError(f"{name}: row {int(negative[0])} has negative entries")
    sums = rows.sum(dim=1)
    bad = ((sums - 1).abs() > tol).nonzero()
    if bad.numel():
        row = int(bad[0])
        raise ValueError(f"{name}: row {row} sums to {float(sums[row]):.8g}, not 1 (tolerance {tol})")
