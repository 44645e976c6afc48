"""Text from a teacher language model: a small random causal transformer with a latent topic.

The paper's third dataset is text sampled from a small pretrained LM restricted to its frequent
tokens. We cannot download weights, so the teacher here is one we control, whose conditionals are
exact (it *is* the distribution).

The generative story of one sentence of (fixed) length ``L`` over ``V`` words:

* ``topic ~ Uniform(n_topics)``;
* ``x_t ~ softmax(teacher([topic, x_0, ..., x_{t-1}])_t / temperature)`` for ``t = 0..L-1``.

Choices (documented here once):

* **Fixed length, no end-of-sentence event**, like the HMM: every sampled sentence has exactly
  ``L`` words, so a causal model loses nothing at the end. A corpus of shorter sentences is read as
  prefixes (later words marginalised out, which for a causal teacher is just ignoring them).
* **The topic is the teacher's first input token**, in place of the start (CLS) token. The teacher
  is a ``flatlib.training.model.Transformer(TransformerConfig(vocab_size=V, max_len=L + 1, causal=True))``
  whose input embedding is extended by ``n_topics`` rows: topic ``k`` has input id
  ``V + N_SPECIAL + k`` (after the model's words and its ``N_SPECIAL`` special ids, none of which the
  teacher ever reads). Its outputs are the ``V`` words; the output at position ``t`` predicts ``x_t``
  from ``[topic, x_<t]``. (``max_len = L + 1`` leaves room for the start token before ``L`` words;
  the teacher only ever reads ``L`` inputs.)
* **Random weights, scaled to be informative**: PyTorch's / nanoGPT's 0.02 init gives almost uniform
  outputs, so the teacher is re-initialised from ``seed`` with unit-variance embeddings, linear
  weights ``N(0, 1/fan_in)`` (activations of order one through every layer), zero biases except the
  output bias ``N(0, 1)`` (a skewed unigram distribution: some words are frequent, as in text),
  LayerNorm gains 1. The logits then have a spread of order one; ``temperature`` divides them (lower
  = peakier, lower entropy).
* **float64 teacher**: the conditionals are the ground truth every model is compared with, so the
  teacher runs in float64 (slower than float32, but the exact losses are exact to ~1e-12).
* Not implemented: a teacher *trained* briefly on one of the other languages (only random teachers).

Downstream task ``"topic"``: predict the topic from the sentence. Its Bayes-optimal accuracy is
``E_x[max_k p(topic = k | x)]`` with ``p(k | x) ∝ p(k) prod_t p(x_t | x_<t, k)``, exact per sentence.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flatlib.checks import check_int, check_seed
from flatlib.languages.base import Corpus, Estimate, LanguageBase, unknown_task
from flatlib.training.model import N_SPECIAL, KVCache, Transformer, TransformerConfig

TOPIC_TASK = "topic"


class TeacherLM(LanguageBase):
    """Sentences sampled from a causal transformer conditioned on a latent topic (see module doc).

    Args:
        teacher: a causal ``Transformer`` over ``V`` words with ``max_len >= seq_len`` whose input
            embedding has at least ``V + N_SPECIAL + n_topics`` rows (topic ``k`` is input id
            ``V + N_SPECIAL + k``). It is converted to float64 and put in eval mode.
        seq_len: sentence length ``L``.
        n_topics: number of topics (uniform prior).
        temperature: the teacher's logits are divided by it (> 0).
        max_rows: sequences per teacher forward inside the exact computations (memory bound).
    """

    def __init__(self, teacher: Transformer, seq_len: int, n_topics: int, temperature: float = 1.0,
                 max_rows: int = 8192) -> None:
        if not isinstance(teacher, Transformer) or not teacher.config.causal:
            raise ValueError("teacher: expected a causal flatlib.training.model.Transformer")
        check_int("seq_len", seq_len)
        check_int("n_topics", n_topics)
        check_int("max_rows", max_rows)
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not (
            math.isfinite(temperature) and temperature > 0
        ):
            raise ValueError(f"temperature: expected a finite number > 0, got {temperature!r}")
        config = teacher.config
        if config.max_len < seq_len:
            raise ValueError(f"seq_len: {seq_len} > the teacher's max_len {config.max_len}")
        if teacher.tok_emb.num_embeddings < config.n_tokens + n_topics:
            raise ValueError(
                f"n_topics: the teacher's input embedding has {teacher.tok_emb.num_embeddings} rows, "
                f"fewer than V + {N_SPECIAL} + n_topics = {config.n_tokens + n_topics}"
            )
        self.teacher = teacher.to(torch.float64).eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.vocab_size = config.vocab_size
        self.seq_len = self.max_len = seq_len
        self.n_topics = n_topics
        self.temperature = float(temperature)
        self.max_rows = max_rows
        self.topic_ids = torch.arange(n_topics) + config.n_tokens  # input id of each topic
        self.log_prior = torch.full((n_topics,), -math.log(n_topics), dtype=torch.float64)

    @classmethod
    def random(cls, vocab_size: int = 200, seq_len: int = 16, n_topics: int = 4,
               temperature: float = 1.0, seed: int = 0, n_layer: int = 2, d_model: int = 64,
               n_head: int = 2, d_ff: int | None = None) -> "TeacherLM":
        """A teacher with random weights drawn from ``seed`` (scaled as in the module doc)."""
        for name, value in (("vocab_size", vocab_size), ("seq_len", seq_len), ("n_topics", n_topics),
                            ("n_layer", n_layer), ("d_model", d_model), ("n_head", n_head)):
            check_int(name, value)
        if d_ff is None:
            d_ff = 4 * d_model
        check_int("d_ff", d_ff)
        check_seed("seed", seed)
        config = TransformerConfig(vocab_size=vocab_size, max_len=seq_len + 1, n_layer=n_layer,
                                   n_head=n_head, d_model=d_model, d_ff=d_ff, causal=True)
        teacher = Transformer(config)
        teacher.tok_emb = nn.Embedding(config.n_tokens + n_topics, d_model)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for module in teacher.modules():
                if isinstance(module, nn.Embedding):
                    module.weight.copy_(torch.randn(module.weight.shape, generator=generator))
                elif isinstance(module, nn.Linear):
                    std = 1.0 / math.sqrt(module.in_features)
                    module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * std)
                    module.bias.zero_()
            teacher.head.bias.copy_(torch.randn(vocab_size, generator=generator))
        return cls(teacher, seq_len, n_topics, temperature)

    def __repr__(self) -> str:
        c = self.teacher.config
        return (f"TeacherLM(vocab_size={self.vocab_size}, seq_len={self.seq_len}, n_topics={self.n_topics}, "
                f"temperature={self.temperature}, n_layer={c.n_layer}, d_model={c.d_model})")

    # ---------------------------------------------------------------- the teacher
    @torch.no_grad()
    def _log_probs(self, inputs: Tensor) -> Tensor:
        """``[B, l]`` teacher input ids -> ``[B, l, V]`` float64 log p(next word | inputs so far)."""
        out = [F.log_softmax(self.teacher(chunk) / self.temperature, dim=-1)
               for chunk in inputs.split(self.max_rows)]
        return torch.cat(out) if out else torch.empty(0, inputs.shape[1], self.vocab_size,
                                                      dtype=torch.float64)

    def _inputs(self, words: Tensor, topics: Tensor) -> Tensor:
        """``[..., L]`` words and ``[...]`` topics -> ``[..., L]`` teacher inputs [topic, x_<L-1]."""
        return torch.cat([self.topic_ids[topics].unsqueeze(-1), words[..., :-1]], dim=-1)

    # ---------------------------------------------------------------- sampling
    def sample(self, n: int, seed: int = 0) -> Corpus:
        """``n`` sentences of length ``seq_len``; latents: ``"topic"`` [n]. Ancestral sampling, one
        teacher forward per position for the whole batch (chunked by ``max_rows``); the random draws
        (the topics, then one uniform per word, inverse-CDF) do not depend on the chunking."""
        check_int("n", n, low=0)
        if n == 0:
            return Corpus(torch.empty(0, self.seq_len, dtype=torch.long), torch.empty(0, dtype=torch.long),
                          {"topic": torch.empty(0, dtype=torch.long)})
        generator = torch.Generator().manual_seed(seed)
        topics = torch.randint(self.n_topics, (n,), generator=generator)
        uniforms = torch.rand(n, self.seq_len, dtype=torch.float64, generator=generator)
        inputs = torch.empty(n, self.seq_len + 1, dtype=torch.long)
        inputs[:, 0] = self.topic_ids[topics]
        for t in range(self.seq_len):
            with torch.no_grad():
                logits = torch.cat([self.teacher(chunk, positions=torch.full((len(chunk),), t))
                                    for chunk in inputs[:, : t + 1].split(self.max_rows)])
            cdf = torch.softmax(logits / self.temperature, dim=-1).cumsum(dim=-1)
            word = torch.searchsorted(cdf, uniforms[:, t : t + 1] * cdf[:, -1:]).squeeze(1)
            inputs[:, t + 1] = word.clamp(max=self.vocab_size - 1)
        tokens = inputs[:, 1:].clone()
        lengths = torch.full((n,), self.seq_len, dtype=torch.long)
        return Corpus(tokens, lengths, {"topic": topics})

    # ---------------------------------------------------------------- exact inference
    def _topic_log_probs(self, corpus: Corpus) -> tuple[Tensor, Tensor]:
        """``lp`` [n, K, L, V] = log p(x_t = w | x_<t, topic k) and ``true`` [n, K, L] = the log
        probability of the observed word (0 at padding positions)."""
        self.check_corpus(corpus)
        n, length = corpus.tokens.shape
        words = corpus.tokens.clamp(min=0)  # padding is never read by an earlier position (causal)
        k = self.n_topics
        inputs = self._inputs(words[:, None, :].expand(n, k, length),
                              torch.arange(k).expand(n, k))
        lp = self._log_probs(inputs.reshape(n * k, length)).view(n, k, length, self.vocab_size)
        true = lp.gather(-1, words[:, None, :, None].expand(n, k, length, 1)).squeeze(-1)
        return lp, true.masked_fill(~corpus.mask[:, None, :], 0.0)

    def topic_posterior(self, corpus: Corpus) -> Tensor:
        """``[n, K]`` p(topic = k | x), exact."""
        _, true = self._topic_log_probs(corpus)
        return torch.softmax(self.log_prior + true.sum(dim=-1), dim=-1)

    def log_prob(self, corpus: Corpus) -> Tensor:
        """``[n]`` log p(x) = log sum_k p(k) prod_t p(x_t | x_<t, k)."""
        _, true = self._topic_log_probs(corpus)
        return torch.logsumexp(self.log_prior + true.sum(dim=-1), dim=-1)

    def causal_conditionals(self, corpus: Corpus) -> Tensor:
        """``[n, L, V]`` float64: p(x_t = w | x_<t) = sum_k p(k | x_<t) p(x_t = w | x_<t, k).

        The topic is latent (not part of the text), so this is the marginal over it, with the
        topic posterior given the prefix. Sentences have a fixed length: there is no end event.
        """
        lp, true = self._topic_log_probs(corpus)
        before = true.cumsum(dim=-1) - true  # sum_{s<t} log p(x_s | x_<s, k)
        log_post = torch.log_softmax(self.log_prior[:, None] + before, dim=1)  # [n, K, L]
        return torch.exp(torch.logsumexp(log_post.unsqueeze(-1) + lp, dim=1))

    @torch.no_grad()
    def _key_values(self, inputs: Tensor) -> list[KVCache]:
        """Each layer's attention keys and values ``[B, H, l, d/H]`` of a teacher run on ``inputs``
        ``[B, l]`` (a key/value cache: causal, so a prefix's entries do not depend on what follows)."""
        cache = [KVCache() for _ in self.teacher.blocks]
        self.teacher.features(inputs, cache)
        return cache

    @torch.no_grad()
    def _suffix_log_probs(self, cache: list[KVCache], inputs: Tensor) -> Tensor:
        """``[B, s, V]`` log p(next word) at the ``s`` positions after those held in ``cache`` (which
        grows by them), for sequences whose inputs there are ``inputs`` [B, s]."""
        return F.log_softmax(self.teacher(inputs, cache=cache) / self.temperature, dim=-1)

    def mlm_conditionals(self, corpus: Corpus) -> Tensor:
        """``[n, L, V]`` float64: p(x_t = w | x_-t), every position, by enumeration.

        ``p(x_t = w | x_-t) ∝ sum_k p(k) prod_s p(x_s | x_<s, k)`` with ``x_t = w``. For each position
        ``t`` the ``V`` variants of every sentence are run through the teacher under every topic: the
        words up to ``x_t`` are scored by the original run, and only the positions after ``t`` are
        recomputed for the variants, attending to the original run's cached keys and values of the
        shared prefix (``flatlib.training.model.KVCache``). In log space. Cost per sentence: ``V * K`` teacher
        runs over ``L - 1 - t`` positions for each ``t``. Words beyond a sentence's length are ignored
        (a prefix).
        """
        lp, true = self._topic_log_probs(corpus)
        n, k, length, v = lp.shape
        words = corpus.tokens.clamp(min=0)
        mask = corpus.mask
        before = true.cumsum(dim=-1) - true  # [n, K, L]
        scores = self.log_prior[:, None, None] + before.unsqueeze(-1) + lp  # [n, K, L, V]
        inputs = self._inputs(words[:, None, :].expand(n, k, length), torch.arange(k).expand(n, k))
        caches = [self._key_values(chunk) for chunk in inputs.reshape(n * k, length).split(self.max_rows)]
        cache = [tuple(torch.cat([getattr(c[layer], name) for c in caches]).unflatten(0, (n, k))
                       for name in ("keys", "values"))
                 for layer in range(len(self.teacher.blocks))]  # [n, K, H, L, d/H]
        chunk = max(1, self.max_rows // (k * v))
        for t in range(length - 1):
            after = mask[:, t + 1 :]  # [n, L-t-1]
            todo = after.any(dim=1).nonzero().squeeze(1)
            for idx in todo.split(chunk) if len(todo) else ():
                m, rows = len(idx), len(idx) * k * v
                suffix_inputs = inputs[idx, :, None, t + 1 :].repeat(1, 1, v, 1)  # [m, K, V, L-t-1]
                suffix_inputs[..., 0] = torch.arange(v)  # input t+1 is x_t = w
                prefix = [KVCache(*(z[idx, :, None, :, : t + 1].expand(-1, -1, v, -1, -1, -1)
                                    .reshape(rows, *z.shape[2:3], t + 1, z.shape[-1]) for z in kv))
                          for kv in cache]
                var_lp = self._suffix_log_probs(prefix, suffix_inputs.reshape(rows, -1))
                following = words[idx, None, None, t + 1 :].expand(m, k, v, -1).reshape(rows, -1, 1)
                suffix = var_lp.gather(-1, following).squeeze(-1).view(m, k, v, -1)
                suffix = suffix.masked_fill(~after[idx, None, None, :], 0.0).sum(dim=-1)
                scores[idx, :, t] += suffix
        return torch.softmax(torch.logsumexp(scores, dim=1), dim=-1)

    # ---------------------------------------------------------------- downstream tasks
    @property
    def tasks(self) -> tuple[str, ...]:
        return (TOPIC_TASK,)

    def _check_task(self, task: str) -> None:
        if task not in self.tasks:
            raise unknown_task(task, "teacher", self.tasks)

    def n_classes(self, task: str) -> int:
        self._check_task(task)
        return self.n_topics

    def task_labels(self, corpus: Corpus, task: str) -> Tensor:
        """``[n]`` the sampled topic of each sentence (from the latents)."""
        self._check_task(task)
        if "topic" not in corpus.latents:
            raise ValueError("corpus: has no 'topic' latent (was it sampled from this teacher?)")
        return corpus.latents["topic"]

    def bayes_accuracy(self, corpus: Corpus, task: str = TOPIC_TASK) -> Estimate:
        """The Bayes-optimal accuracy of ``task``, E_x[max_k p(topic = k | x)], estimated over the
        sentences of ``corpus`` (exact given each sentence), with its standard error."""
        self._check_task(task)
        return Estimate.of(self.topic_posterior(corpus).max(dim=-1).values)


__all__ = ["TeacherLM"]
