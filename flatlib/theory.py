"""The theory of the paper, made computable: small, exact objects for notebook 06.

Everything here lives on a **finite set of contexts** ``c = 1..N`` (a ``ContextSet``): context ``c``
has probability ``w_c`` and an exact conditional ``p_c = p(. | c)`` over ``V`` words. A model maps
the context's input to logits ``z_c(theta)``, ``q_c = softmax(z_c)``, and the pre-training loss is the
expected single-mask cross-entropy

    L(theta) = sum_c w_c sum_y p_c(y) [-log q_c(y)],      L* = min L = sum_c w_c H(p_c)  (q = p).

One *example* is a pair ``(c, y)``: ``c ~ w``, ``y ~ p_c`` (the word is label noise from the true
conditional), with loss ``l(theta; c, y) = -log q_c(y)`` and gradient ``g = J_c^T (q_c - e_y)``,
``J_c = dz_c/dtheta``. Three matrices (``S(r) = diag r - r r^T``):

    H = sum_c w_c [J_c^T S(q_c) J_c + sum_k (q_c - p_c)_k d2 z_ck]                 (Hessian of L)
    C = Cov_(c,y)[g] = sum_c w_c J_c^T [S(p_c) + (q_c - p_c)(q_c - p_c)^T] J_c - grad L grad L^T
    F = sum_c w_c E_(y ~ q_c)[g g^T] = sum_c w_c J_c^T S(q_c) J_c                   (Fisher, model labels)

At any global minimiser ``q = p``: the residual terms vanish, ``grad L = 0`` and **C = H = F**
(noise equals curvature). Away from it the three differ.

The module provides:

* finite languages: ``hmm_contexts`` (every single-mask context of a tiny HMM, exact weights and
  conditionals) and ``BagOfWordsLanguage`` (ours: a pairwise "Potts" language whose single-mask
  conditionals depend on the context only through two word features);
* models: ``FactoredSoftmax`` (``z_c = a_c^T B``, a manifold of exact optima) and
  ``OneLayerTransformer`` (encodings, one attention head read out at [MASK], a ReLU MLP);
* curvature on a ContextSet, for tiny models (dense, exact): ``dense_hessian`` and ``hessian_traces``
  (classic double backward, every row in one batched backward), ``hessian_double_backward`` (row by
  row, the reference), ``exact_gradient_covariance``, ``exact_fisher``, ``fisher_trace_at_optimum``,
  ``trace_gradient`` (per-example ``jvp`` of ``grad``), and the sampled ``gradient_noise`` (trace and
  quadratic forms of C with standard errors);
* dynamics: ``run_sgd`` (mini-batches of sampled (context, word) pairs, many chains at once),
  ``run_gd`` (full batch on the expected loss), and ``slow_flow``, the predicted limit of SGD along
  the optimal set Gamma (Li, Wang & Arora 2022; the paper's Theorem):

      d theta / d tau = -1/4 grad_Gamma Tr H(theta),        tau = eta^2 k / B
      (i.e. d theta / dt = -1/(4B) grad_Gamma Tr H with t = eta^2 k);

* the paper's transfer argument, our construction: ``feature_solution`` and ``random_solution``
  (two exact optima of the one-layer transformer), ``balance_neurons`` (the trace-minimising
  rescaling of each ReLU neuron, which leaves the function unchanged) and ``min_norm_head_errors``
  (the minimum-norm linear head on frozen neurons, exact downstream error).

Derivatives are taken with respect to one flat vector ``theta`` (``FlatModel``: the trainable
parameters in ``named_parameters`` order, as ``flatlib.flatness`` orders them). Second derivatives:
forward-over-reverse (``jvp`` of ``grad``) or classic double backward only, never
``torch.func.hessian`` / ``jacrev(jacrev)`` (wrong with affine LayerNorm on torch 2.13, docs/lessons.md).
All randomness comes from explicit ``torch.Generator`` s; everything is float64.
"""

from __future__ import annotations

import copy
import itertools
import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, jvp, vmap

from flatlib.checks import check_int
from flatlib.flatness import trainable_parameters
from flatlib.languages import HMM, Corpus

DTYPE = torch.float64

# ---------------------------------------------------------------------------- sizes per profile
# The theory demonstrations are small by nature (float64, on the CPU whatever the profile); "paper"
# only adds seeds, draws and samples, and "gpu" (whose machine has 16 cores) takes the paper's.
THEORY_SIZES: dict[str, dict[str, Any]] = {
    "smoke": {
        # 1-2: the single-mask contexts of a tiny HMM (3 words, length 3: 27 contexts)
        "hmm": {"n_states": 2, "vocab_size": 3, "seq_len": 3, "concentration": 0.5},
        "language_seed": 0,
        "rank": 4,  # inner dimension r of the factored model (>= vocab_size: exact fits exist)
        "noise": {"n_samples": 2000, "n_forms": 3, "offset": 0.5},
        "implicit_bias": {"init_scale": 2.0, "configs": ((0.1, 1), (0.1, 4)), "time": 2.0, "n_chains": 4,
                          "n_records": 4, "flow_dt": 0.2},
        # 3: the bag-of-words language and the one-layer transformer
        "transformer": {"n_words": 8, "seq_len": 4, "strengths": (0.5, 0.3), "width": 16, "d_key": 2},
        "downstream": {"n_train": (1, 2, 4, 8, 16, 32), "draws": 40},
    },
    "cpu": {
        "hmm": {"n_states": 2, "vocab_size": 3, "seq_len": 3, "concentration": 0.5},
        "language_seed": 0,
        "rank": 5,
        "noise": {"n_samples": 20000, "n_forms": 4, "offset": 0.5},
        "implicit_bias": {"init_scale": 2.0, "configs": ((0.1, 1), (0.05, 1), (0.1, 2), (0.1, 4)),
                          "time": 12.0, "n_chains": 16, "n_records": 12, "flow_dt": 0.2},
        "transformer": {"n_words": 16, "seq_len": 4, "strengths": (0.5, 0.3), "width": 64, "d_key": 2},
        "downstream": {"n_train": (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64), "draws": 400},
    },
    "paper": {
        "hmm": {"n_states": 3, "vocab_size": 3, "seq_len": 4, "concentration": 0.5},
        "language_seed": 0,
        "rank": 5,
        "noise": {"n_samples": 100000, "n_forms": 8, "offset": 0.5},
        "implicit_bias": {"init_scale": 2.0, "configs": ((0.1, 1), (0.05, 1), (0.025, 1), (0.1, 2), (0.1, 4)),
                          "time": 12.0, "n_chains": 64, "n_records": 12, "flow_dt": 0.1},
        "transformer": {"n_words": 24, "seq_len": 4, "strengths": (0.5, 0.3), "width": 96, "d_key": 2},
        "downstream": {"n_train": (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128), "draws": 2000},
    },
}
THEORY_SIZES["gpu"] = copy.deepcopy(THEORY_SIZES["paper"])


def _check_positive(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise ValueError(f"{name}: expected a positive number, got {value!r}")


def theory_params(profile: str, seed: int = 0, **overrides: Any) -> dict[str, Any]:
    """The theory sizes of ``profile`` with ``overrides`` applied (a dict merges into a section,
    ``None`` keeps the profile's value), validated; a ValueError names the bad parameter
    (``profile``, ``seed``, ``implicit_bias.n_chains``...). The languages are built here so that a bad
    language parameter fails now."""
    if profile not in THEORY_SIZES:
        raise ValueError(f"profile: unknown profile {profile!r}; choose one of {sorted(THEORY_SIZES)}")
    check_int("seed", seed, low=0)
    params = copy.deepcopy(THEORY_SIZES[profile])
    for key, value in overrides.items():
        if value is None:
            continue
        if key not in params:
            raise ValueError(f"{key}: unknown parameter (known: {sorted(params)})")
        if isinstance(params[key], dict):
            if not isinstance(value, dict) or not set(value) <= set(params[key]):
                raise ValueError(f"{key}: expected a dict with keys among {sorted(params[key])}, "
                                 f"got {value!r}")
            params[key] = {**params[key], **{k: v for k, v in value.items() if v is not None}}
        else:
            params[key] = value
    params["profile"], params["seed"] = profile, seed
    check_int("language_seed", params["language_seed"], low=0)
    try:
        HMM.random(seed=params["language_seed"], **params["hmm"])
    except (TypeError, ValueError) as error:
        raise ValueError(f"hmm.{error}") from None
    check_int("rank", params["rank"])
    if params["rank"] < params["hmm"]["vocab_size"]:
        raise ValueError(f"rank: must be >= hmm.vocab_size ({params['hmm']['vocab_size']}) for exact optima")
    noise = params["noise"]
    check_int("noise.n_samples", noise["n_samples"], low=2)
    check_int("noise.n_forms", noise["n_forms"])
    _check_positive("noise.offset", noise["offset"])
    bias = params["implicit_bias"]
    _check_positive("implicit_bias.init_scale", bias["init_scale"])
    _check_positive("implicit_bias.time", bias["time"])
    _check_positive("implicit_bias.flow_dt", bias["flow_dt"])
    check_int("implicit_bias.n_chains", bias["n_chains"], low=2)
    check_int("implicit_bias.n_records", bias["n_records"])
    configs = bias["configs"]
    if not isinstance(configs, (tuple, list)) or not configs:
        raise ValueError("implicit_bias.configs: expected a non-empty list of (lr, batch_size), "
                         f"got {configs!r}")
    for config in configs:
        if not isinstance(config, (tuple, list)) or len(config) != 2:
            raise ValueError(f"implicit_bias.configs: expected (lr, batch_size) pairs, got {config!r}")
        try:
            _check_positive("lr", config[0])
            check_int("batch_size", config[1])
        except ValueError as error:
            raise ValueError(f"implicit_bias.configs: {error}") from None
    t = params["transformer"]
    try:
        BagOfWordsLanguage.two_features(n_words=t["n_words"], seq_len=t["seq_len"], strengths=t["strengths"])
    except ValueError as error:
        raise ValueError(f"transformer.{error}") from None
    check_int("transformer.width", t["width"])
    check_int("transformer.d_key", t["d_key"])
    if t["width"] < t["n_words"]:
        raise ValueError(f"transformer.width: the random solution needs >= n_words = {t['n_words']} neurons")
    d = params["downstream"]
    n_train = d["n_train"]
    if not isinstance(n_train, (tuple, list)) or not n_train:
        raise ValueError(f"downstream.n_train: expected a non-empty list of sizes, got {n_train!r}")
    for n in n_train:
        check_int("downstream.n_train", n)
    check_int("downstream.draws", d["draws"], low=2)
    return params


# ---------------------------------------------------------------------------- finite languages
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
        ``expected_loss_fn`` (and so for ``flatlib.flatness.hvp`` / ``hessian_trace``)."""
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


# ---------------------------------------------------------------------------- models
class FactoredSoftmax(nn.Module):
    """A lookup model with a factored table: ``z_c = a_c^T B``, ``A in R^{N x r}``, ``B in R^{r x V}``.

    With ``r >= V`` and ``B`` of rank ``V`` it fits any conditionals exactly, in many ways: the
    optimal set ``Gamma = {(A, B): A B = log P + row constants}`` is a manifold of dimension
    ``P - N (V - 1)`` (the symmetry ``(A G, G^-1 B)`` and the null space of ``B``). At the optimum

        Tr H = sum_c w_c [ tr(B S_c B^T) + |a_c|^2 tr S_c ],      S_c = diag p_c - p_c p_c^T,

    which varies along Gamma: the flat points balance ``A`` against ``B``.
    """

    def __init__(self, n_contexts: int, rank: int, vocab_size: int) -> None:
        super().__init__()
        for name, value in (("n_contexts", n_contexts), ("rank", rank), ("vocab_size", vocab_size)):
            check_int(name, value)
        self.A = nn.Parameter(torch.zeros(n_contexts, rank, dtype=DTYPE))
        self.B = nn.Parameter(torch.zeros(rank, vocab_size, dtype=DTYPE))

    def forward(self, ids: Tensor) -> Tensor:
        rows = self.A.index_select(0, ids.reshape(-1)).view(*ids.shape, self.A.shape[1])
        return rows @ self.B

    @classmethod
    def at_optimum(cls, contexts: ContextSet, rank: int, scale: float = 1.0,
                   seed: int = 0) -> "FactoredSoftmax":
        """An exact optimum: ``B`` Gaussian (entries ``N(0, scale^2)``, from ``seed``), ``A = Z B^+``
        with ``Z`` the centred log-conditionals. Large ``scale`` puts it at a sharp point of Gamma
        (large ``B``, small ``A``)."""
        V = contexts.vocab_size
        if rank < V:
            raise ValueError(f"rank: must be >= vocab_size ({V}) to fit the conditionals exactly")
        if (contexts.targets <= 0).any():
            raise ValueError("contexts: a conditional with a zero probability has no finite exact fit")
        model = cls(contexts.n_contexts, rank, V)
        g = torch.Generator().manual_seed(seed)
        B = scale * torch.randn(rank, V, generator=g, dtype=DTYPE)
        Z = contexts.targets.log()
        Z = Z - Z.mean(1, keepdim=True)
        with torch.no_grad():
            model.B.copy_(B)
            model.A.copy_(Z @ torch.linalg.pinv(B))
        return model


class OneLayerTransformer(nn.Module):
    """The one-layer transformer of notebook 06: minimal, ours in detail, after the paper's synthetic
    language theorem (docs/paper.md, "Flatness and theory").

    Tokens ``0..V-1`` are words and ``V`` is [MASK]; a row holds the context's words and one
    [MASK] (read out at the last position). With fixed one-hot encodings ``e_x in R^{V+1}``:

        s_j = (W_Q e_mask) . (W_K e_{x_j}) / sqrt(d_key),   a = softmax(s),   z = sum_j a_j W_V e_{x_j}
        phi = relu(W z + b)  (the ``width`` neurons),        logits = A phi + c.

    No positional encoding: the output depends on the multiset of words. At ``W_Q = W_K = 0`` the
    attention is uniform and, with ``W_V = I``, ``z = (word counts, 1) / T`` is the mean encoding.
    """

    def __init__(self, n_words: int, width: int, d_key: int = 2) -> None:
        super().__init__()
        check_int("n_words", n_words, low=2)
        check_int("width", width)
        check_int("d_key", d_key)
        d = n_words + 1
        self.n_words, self.width, self.d_key = n_words, width, d_key
        self.W_Q = nn.Parameter(torch.zeros(d_key, d, dtype=DTYPE))
        self.W_K = nn.Parameter(torch.zeros(d_key, d, dtype=DTYPE))
        self.W_V = nn.Parameter(torch.eye(d, dtype=DTYPE))
        self.W = nn.Parameter(torch.zeros(width, d, dtype=DTYPE))
        self.b = nn.Parameter(torch.full((width,), -1.0, dtype=DTYPE))
        self.A = nn.Parameter(torch.zeros(n_words, width, dtype=DTYPE))
        self.c = nn.Parameter(torch.zeros(n_words, dtype=DTYPE))

    def attend(self, tokens: Tensor) -> Tensor:
        """``[m, V+1]``: the attention output ``z`` at the [MASK] (last) position."""
        vocab = torch.arange(self.n_words + 1, device=tokens.device)
        e = (tokens[..., None] == vocab).to(self.W_V.dtype)  # [m, T, V+1] one-hot (vmap-safe)
        query = e[:, -1] @ self.W_Q.T  # [m, d_key]
        keys = e @ self.W_K.T  # [m, T, d_key]
        scores = (keys @ query.unsqueeze(-1)).squeeze(-1) / math.sqrt(self.d_key)
        a = torch.softmax(scores, dim=-1)
        return (a.unsqueeze(-1) * (e @ self.W_V.T)).sum(1)

    def neurons(self, tokens: Tensor) -> Tensor:
        """``[m, width]`` the MLP's neurons ``phi`` (the frozen features a downstream head reads)."""
        return torch.relu(self.attend(tokens) @ self.W.T + self.b)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.neurons(tokens) @ self.A.T + self.c


def feature_solution(language: BagOfWordsLanguage, width: int) -> OneLayerTransformer:
    """The "feature" optimum: four live neurons ``relu(+f_j)``, ``relu(-f_j)`` (j = 1, 2), i.e.
    ``W = T (±u_j, 0)`` on uniform attention, with output ``A[:, (j,+)] = lambda_j u_j = -A[:, (j,-)]``
    and ``c = h``, so that ``logits = h + sum_j lambda_j u_j (relu(f_j) - relu(-f_j))`` is the exact
    conditional. The other ``width - 4`` neurons are dead (zero weights, bias -1, zero output): the
    same architecture as ``random_solution``, and they add nothing to the loss or the trace."""
    if width < 2 * language.features.shape[0]:
        raise ValueError(f"width: the feature solution needs >= {2 * language.features.shape[0]} neurons, "
                         f"got {width}")
    model = OneLayerTransformer(language.n_words, width)
    T = language.seq_len
    with torch.no_grad():
        for j, (u, lam) in enumerate(zip(language.features, language.strengths)):
            for k, sign in enumerate((1.0, -1.0)):
                i = 2 * j + k
                model.W[i, :language.n_words] = sign * T * u
                model.b[i] = 0.0
                model.A[:, i] = sign * lam * u
        model.c.copy_(language.field)
    return model


def random_solution(language: BagOfWordsLanguage, width: int, seed: int,
                    margin: float = 0.5) -> OneLayerTransformer:
    """The "random" optimum: ``width`` neurons with Gaussian input weights ``W_i ~ N(0, I)`` (from
    ``seed``), each bias set so that the neuron is active on every context (``b_i = margin -
    min_c W_i . z_c``: the neurons are random directions, in their linear region), and the
    minimum-norm output weights that reproduce the exact logits on every context:
    ``A^T = Phi^+ (Z - h)``, ``c = h``, ``Phi`` the ``[N, width]`` neurons on the N contexts. The
    logits are affine in the word counts, so ``width >= n_words`` random neurons fit them exactly
    (ValueError otherwise)."""
    if width < language.n_words:
        raise ValueError(f"width: an exact random-feature fit needs >= {language.n_words} neurons (n_words), "
                         f"got {width}")
    contexts = language.contexts()
    model = OneLayerTransformer(language.n_words, width)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model.W.copy_(torch.randn(width, language.n_words + 1, generator=g, dtype=DTYPE))
        pre = model.attend(contexts.inputs) @ model.W.T  # [N, width]
        model.b.copy_(margin - pre.min(0).values)
        phi = model.neurons(contexts.inputs)
        target = language.conditional_logits() - language.field
        model.A.copy_((torch.linalg.pinv(phi) @ target).T)
        model.c.copy_(language.field)
        residual = float((model(contexts.inputs) - language.conditional_logits()).abs().max())
    if residual > 1e-8:
        raise ValueError(f"width: {width} random neurons do not fit the logits exactly "
                         f"(residual {residual:.1e}); "
                         "use more neurons or another seed")
    return model


# ---------------------------------------------------------------------------- flat parameters
class FlatModel:
    """``model`` as a function of one vector ``theta in R^P``: its trainable parameters in
    ``named_parameters`` order (the order of ``flatlib.flatness``), flattened and concatenated.
    ``logits(theta, inputs)`` calls the model with ``theta`` swapped in (``functional_call``; works
    under ``vmap``, so ``theta`` may carry chain dimensions through ``vmap``)."""

    def __init__(self, model: nn.Module) -> None:
        params = trainable_parameters(model)
        if not params:
            raise ValueError("model: has no trainable parameter")
        self.model = model
        self.names = list(params)
        self.shapes = [p.shape for p in params.values()]
        self.sizes = [p.numel() for p in params.values()]
        self.n_params = sum(self.sizes)

    def vector(self) -> Tensor:
        """The model's current ``theta`` (a detached copy)."""
        return torch.cat([p.detach().reshape(-1) for p in trainable_parameters(self.model).values()]).clone()

    def unflatten(self, theta: Tensor) -> dict[str, Tensor]:
        if theta.shape != (self.n_params,):
            raise ValueError(f"theta: expected shape ({self.n_params},), got {tuple(theta.shape)}")
        parts = theta.split(self.sizes)
        return {name: t.view(shape) for name, t, shape in zip(self.names, parts, self.shapes)}

    def unflatten_list(self, theta: Tensor) -> list[Tensor]:
        """``theta`` as a list of tensors shaped like the parameters (for ``flatlib.flatness.hvp``)."""
        return list(self.unflatten(theta).values())

    def load_(self, theta: Tensor) -> nn.Module:
        """Write ``theta`` into the model's parameters (in place); returns the model."""
        with torch.no_grad():
            for p, value in zip(trainable_parameters(self.model).values(), self.unflatten(theta).values()):
                p.copy_(value)
        return self.model

    def logits(self, theta: Tensor, inputs: Tensor) -> Tensor:
        return functional_call(self.model, self.unflatten(theta), (inputs,))


# ---------------------------------------------------------------------------- losses
def expected_loss_fn(model: nn.Module, batch: tuple[Tensor, Tensor, Tensor]) -> Tensor:
    """``sum_i weights_i CE(targets_i, softmax(model(inputs)_i))``, for ``batch = ContextSet.batch()``:
    the expected loss L (a ``flatlib.flatness`` loss_fn; use the whole ContextSet as one batch)."""
    inputs, targets, weights = batch
    return (weights * -(targets * torch.log_softmax(model(inputs), -1)).sum(-1)).sum()


expected_loss_fn.description = (  # type: ignore[attr-defined]
    "the expected single-mask loss sum_c w_c CE(p_c, q_c) over the exact contexts (nats)")


def expected_loss(flat: FlatModel, theta: Tensor, contexts: ContextSet) -> Tensor:
    """``L(theta)``, a scalar (differentiable in ``theta``)."""
    logq = torch.log_softmax(flat.logits(theta, contexts.inputs), -1)
    return (contexts.weights * -(contexts.targets * logq).sum(-1)).sum()


def _example_loss(flat: FlatModel, theta: Tensor, x: Tensor, y: Tensor) -> Tensor:
    """``-log q_theta(y | x)`` for one example (``x`` one context's input, ``y`` a word)."""
    logq = torch.log_softmax(flat.logits(theta, x.unsqueeze(0))[0], -1)
    onehot = (torch.arange(logq.shape[-1], device=logq.device) == y).to(logq.dtype)  # no indexing by y: vmap
    return -(logq * onehot).sum()


def _minibatch_loss(flat: FlatModel, theta: Tensor, x: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(flat.logits(theta, x), y)


def per_example_gradients(flat: FlatModel, theta: Tensor, inputs: Tensor, words: Tensor,
                          chunk_size: int | None = 1024) -> Tensor:
    """``[m, P]``: ``grad_theta [-log q_theta(words_i | inputs_i)]`` for each example (``vmap`` of
    ``grad``; the model must treat the rows of a batch independently)."""
    fn = vmap(grad(lambda t, x, y: _example_loss(flat, t, x, y)), in_dims=(None, 0, 0), chunk_size=chunk_size)
    return fn(theta, inputs, words)


# ---------------------------------------------------------------------------- exact matrices
def dense_hessian(flat: FlatModel, theta: Tensor, contexts: ContextSet) -> Tensor:
    """``[P, P]`` the Hessian of L at ``theta`` by classic double backward: the gradient with its graph,
    then every row ``d(grad L)_i / d theta`` in one vectorised backward (``is_grads_batched``). Exact;
    equal to the row-by-row ``hessian_double_backward`` (tests/test_theory.py). Symmetrised (the
    asymmetry is rounding)."""
    return hessian_traces(flat, theta[None], contexts, full=True)[0]


def hessian_traces(flat: FlatModel, thetas: Tensor, contexts: ContextSet, full: bool = False) -> Tensor:
    """``[S]`` the exact ``Tr H`` at each row of ``thetas`` ``[S, P]`` (or with ``full`` the ``[S, P, P]``
    Hessians), by double backward through the losses of all S points at once: the gradient of
    ``sum_s L(theta_s)`` is the per-point gradients (the points do not interact), and one backward,
    batched over the basis vectors ``e_i`` (``is_grads_batched``), gives every row of every Hessian."""
    S, P = thetas.shape
    leaf = thetas.detach().clone().requires_grad_()
    losses = vmap(lambda t: expected_loss(flat, t, contexts))(leaf)
    (g,) = torch.autograd.grad(losses.sum(), leaf, create_graph=True)
    basis = torch.zeros(P, S, P, dtype=thetas.dtype)
    basis[torch.arange(P), :, torch.arange(P)] = 1.0
    (rows,) = torch.autograd.grad(g, leaf, grad_outputs=basis, is_grads_batched=True)  # [P(row), S, P]
    H = rows.permute(1, 0, 2)
    if full:
        return 0.5 * (H + H.transpose(1, 2))
    return H.diagonal(dim1=1, dim2=2).sum(-1)


def hessian_double_backward(flat: FlatModel, theta: Tensor, contexts: ContextSet) -> Tensor:
    """``[P, P]`` the Hessian of L by classic double backward, row by row (the reference; slow).
    Not symmetrised: a caller can check its symmetry."""
    leaf = theta.detach().clone().requires_grad_()
    (g,) = torch.autograd.grad(expected_loss(flat, leaf, contexts), leaf, create_graph=True)
    rows = [torch.autograd.grad(g[i], leaf, retain_graph=i < flat.n_params - 1)[0]
            for i in range(flat.n_params)]
    return torch.stack(rows)


def exact_gradient_covariance(flat: FlatModel, theta: Tensor, contexts: ContextSet) -> Tensor:
    """``[P, P]`` ``C = Cov[g]`` over examples ``(c ~ w, y ~ p_c)``, exactly (every pair, weighted)."""
    index, word, prob = contexts.pairs()
    G = per_example_gradients(flat, theta, contexts.inputs[index], word)
    mean = prob @ G
    return (G * prob[:, None]).T @ G - torch.outer(mean, mean)


def exact_fisher(flat: FlatModel, theta: Tensor, contexts: ContextSet) -> Tensor:
    """``[P, P]`` ``F = sum_c w_c E_(y ~ q_c)[g g^T]``: the Fisher with labels from the *model*."""
    n, V = contexts.n_contexts, contexts.vocab_size
    with torch.no_grad():
        q = torch.softmax(flat.logits(theta, contexts.inputs), -1)
    index = torch.arange(n).repeat_interleave(V)
    word = torch.arange(V).repeat(n)
    G = per_example_gradients(flat, theta, contexts.inputs[index], word)
    prob = (contexts.weights[:, None] * q).reshape(-1)
    return (G * prob[:, None]).T @ G


def fisher_trace_at_optimum(flat: FlatModel, theta: Tensor, contexts: ContextSet) -> float:
    """``Tr F_p = sum_(c,y) w_c p_c(y) |g(c, y)|^2``: the trace of the second moment of the gradient
    with words from the *true* conditionals. Equal to ``Tr H`` (and ``Tr C``, ``Tr F``) at an exact
    optimum; the cheap way to get an exact trace there (one gradient per pair)."""
    return float(_pair_squares(flat, theta, contexts).sum())


def _pair_squares(flat: FlatModel, theta: Tensor, contexts: ContextSet, chunk: int = 2048) -> Tensor:
    """``[P]`` the diagonal of ``F_p = sum_(c,y) w_c p_c(y) g g^T``, accumulated over chunks of pairs."""
    index, word, prob = contexts.pairs()
    total = torch.zeros(flat.n_params, dtype=theta.dtype)
    for start in range(0, len(index), chunk):
        part = slice(start, start + chunk)
        G = per_example_gradients(flat, theta, contexts.inputs[index[part]], word[part], chunk_size=256)
        total += prob[part] @ G ** 2
    return total


def trace_gradient(flat: FlatModel, theta: Tensor, contexts: ContextSet) -> Tensor:
    """``[P]`` the gradient of ``T(theta) = sum_(c,y) w_c p_c(y) |g(c,y)|^2`` (p fixed):
    ``2 sum w_c p_c(y) H_(c,y) g(c,y)``, per-example Hessian-vector products by ``jvp(grad)``. On the
    optimal set ``T = Tr H``, so ``P_T grad T`` is the Riemannian gradient ``grad_Gamma Tr H``."""
    index, word, prob = contexts.pairs()

    def one(x: Tensor, y: Tensor) -> Tensor:
        g_fn = grad(lambda t: _example_loss(flat, t, x, y))
        g = g_fn(theta)
        return jvp(g_fn, (theta,), (g,))[1]

    hg = vmap(one, chunk_size=512)(contexts.inputs[index], word)
    return 2 * prob @ hg


# ---------------------------------------------------------------------------- sampled noise
@dataclass(frozen=True)
class NoiseEstimate:
    """The covariance ``C`` of per-example gradients, estimated from ``n_samples`` i.i.d. examples.

    ``trace`` = ``sum_i |g_i - gbar|^2 / (m-1)``; ``forms[k]`` = ``sum_i (v_k . (g_i - gbar))^2 / (m-1)``.
    Standard errors: ``std(d_i) / sqrt(m)`` of the per-example terms ``d_i`` (delta method; the
    centring's own noise is O(1/m)). ``mean_gradient_norm`` = ``|gbar|``.
    """

    trace: float
    trace_se: float
    forms: Tensor
    forms_se: Tensor
    mean_gradient_norm: float
    n_samples: int
    description: str

    def __str__(self) -> str:
        return f"Tr C = {self.trace:.4g} ± {self.trace_se:.2g}  ({self.description})"


def gradient_noise(flat: FlatModel, theta: Tensor, contexts: ContextSet, vectors: Tensor, n_samples: int,
                   seed: int) -> NoiseEstimate:
    """Measure the gradient noise as SGD sees it: ``n_samples`` examples ``(c ~ w, y ~ p_c)`` drawn
    with a generator seeded by ``seed``, their gradients, and the trace and the quadratic forms
    ``v_k^T C v_k`` (``vectors``: ``[k, P]``, may be empty) of their sample covariance, with SEs."""
    check_int("n_samples", n_samples, low=2)
    if vectors.dim() != 2 or vectors.shape[1] != flat.n_params:
        raise ValueError(f"vectors: expected [k, {flat.n_params}], got {tuple(vectors.shape)}")
    g = torch.Generator().manual_seed(seed)
    index, word = contexts.sample_pairs(n_samples, g)
    G = per_example_gradients(flat, theta, contexts.inputs[index], word)
    mean = G.mean(0)
    centred = G - mean
    m = n_samples
    d = (centred ** 2).sum(1)
    s = (centred @ vectors.T.to(G.dtype)) ** 2  # [m, k]
    return NoiseEstimate(
        trace=float(d.sum() / (m - 1)), trace_se=float(d.std() / math.sqrt(m)),
        forms=s.sum(0) / (m - 1), forms_se=(s.std(0) if s.shape[1] else s.sum(0)) / math.sqrt(m),
        mean_gradient_norm=float(mean.norm()), n_samples=m,
        description=f"{m} examples (context ~ w, word ~ p(.|context)), seed {seed}; ± is one standard error")


# ---------------------------------------------------------------------------- dynamics
@dataclass(frozen=True)
class Trajectory:
    """Records of a run: at ``steps`` (``[K]``), per chain (``[K, S]``), the excess loss ``gap`` =
    L(theta) - L* (nats) and the exact ``trace`` of the Hessian of L; ``time`` = eta^2 k / B (the
    slow flow's clock; for GD B is taken as 1); ``final`` ``[S, P]`` the last parameters."""

    algorithm: str
    lr: float
    batch_size: int | None
    steps: Tensor
    time: Tensor
    gap: Tensor
    trace: Tensor
    final: Tensor


def _check_records(record_steps: Sequence[int], steps: int) -> list[int]:
    records = sorted(set(int(k) for k in record_steps))
    if not records or records[0] < 0 or records[-1] > steps:
        raise ValueError(f"record_steps: expected steps within [0, {steps}], got {list(record_steps)}")
    return records


def _measure(flat: FlatModel, thetas: Tensor, contexts: ContextSet) -> tuple[Tensor, Tensor]:
    """Gap and exact Hessian trace of every chain (``thetas`` ``[S, P]``)."""
    with torch.no_grad():
        gaps = vmap(lambda t: expected_loss(flat, t, contexts))(thetas) - contexts.optimal_loss()
    return gaps, hessian_traces(flat, thetas, contexts)


def run_sgd(flat: FlatModel, contexts: ContextSet, theta0: Tensor, lr: float, batch_size: int, steps: int,
            n_chains: int, seed: int, record_steps: Sequence[int]) -> Trajectory:
    """``n_chains`` independent SGD runs from ``theta0``:

        theta_(k+1) = theta_k - lr * (1/B) sum_(i<B) grad l(theta_k; c_i, y_i),   c_i ~ w,  y_i ~ p_(c_i),

    fresh examples every step (label noise from the true conditional). Chains run together
    (``vmap`` over chains of ``grad``) and draw from one generator seeded by ``seed``: the same
    seed, the same runs. The exact gap and trace are recorded at ``record_steps``."""
    _check_positive("lr", lr)
    check_int("batch_size", batch_size)
    check_int("steps", steps, low=0)
    check_int("n_chains", n_chains)
    records = set(_check_records(record_steps, steps))
    g = torch.Generator().manual_seed(seed)
    theta = theta0.detach().to(DTYPE).expand(n_chains, -1).clone()
    step_grad = vmap(grad(lambda t, x, y: _minibatch_loss(flat, t, x, y)))
    gaps, traces = [], []
    for k in range(steps + 1):
        if k in records:
            gap, trace = _measure(flat, theta, contexts)
            gaps.append(gap)
            traces.append(trace)
        if k == steps:
            break
        index, word = contexts.sample_pairs(batch_size, g, shape=(n_chains,))
        theta -= lr * step_grad(theta, contexts.inputs[index], word)
    steps_t = torch.tensor(sorted(records))
    return Trajectory("sgd", lr, batch_size, steps_t, lr ** 2 * steps_t / batch_size, torch.stack(gaps),
                      torch.stack(traces), theta)


def run_gd(flat: FlatModel, contexts: ContextSet, theta0: Tensor, lr: float, steps: int,
           record_steps: Sequence[int]) -> Trajectory:
    """Full-batch gradient descent on the expected loss (exact targets, no noise), one chain."""
    _check_positive("lr", lr)
    check_int("steps", steps, low=0)
    records = _check_records(record_steps, steps)
    theta = theta0.detach().to(DTYPE).clone()
    gradient = grad(lambda t: expected_loss(flat, t, contexts))
    gaps, traces = [], []
    for k in range(steps + 1):
        if k in records:
            gap, trace = _measure(flat, theta[None], contexts)
            gaps.append(gap)
            traces.append(trace)
        if k == steps:
            break
        theta -= lr * gradient(theta)
    steps_t = torch.tensor(records)
    return Trajectory("gd", lr, None, steps_t, lr ** 2 * steps_t, torch.stack(gaps), torch.stack(traces),
                      theta[None])


def _null_space(H: Tensor, rtol: float) -> tuple[Tensor, Tensor, Tensor]:
    """Eigen-decomposition of a symmetric ``H``: (eigenvalues, eigenvectors, mask of the 'zero' ones,
    ``|lambda| <= rtol * max |lambda|``)."""
    values, vectors = torch.linalg.eigh(H)
    zero = values.abs() <= rtol * values.abs().max()
    return values, vectors, zero


def retract(flat: FlatModel, theta: Tensor, contexts: ContextSet, tol: float = 1e-13, max_iter: int = 30,
            rtol: float = 1e-9, hessian: Tensor | None = None) -> Tensor:
    """Back onto the optimal set from a nearby ``theta``: Newton steps ``theta -= H^+ grad L`` (``H^+``
    the pseudo-inverse on the eigenvalues above ``rtol * max``) until ``|grad L| < tol``. With
    ``hessian`` given (the Hessian at a nearby optimum), that one matrix is used throughout (the
    chord method: cheaper steps, linear convergence)."""
    gradient = grad(lambda t: expected_loss(flat, t, contexts))
    theta = theta.detach().clone()
    fixed = None
    if hessian is not None:
        values, vectors, zero = _null_space(hessian, rtol)
        fixed = (torch.where(zero, torch.zeros_like(values), 1 / values), vectors)
    for _ in range(max_iter):
        g = gradient(theta)
        if float(g.norm()) < tol:
            return theta
        if fixed is None:
            values, vectors, zero = _null_space(dense_hessian(flat, theta, contexts), rtol)
            inverse = torch.where(zero, torch.zeros_like(values), 1 / values)
        else:
            inverse, vectors = fixed
        theta = theta - vectors @ (inverse * (vectors.T @ g))
    if float(gradient(theta).norm()) > 1e3 * tol:
        raise RuntimeError("retract: Newton did not converge "
                           f"(|grad L| = {float(gradient(theta).norm()):.1e})")
    return theta


@dataclass(frozen=True)
class Flow:
    """The predicted slow flow, recorded at ``time`` (tau = eta^2 k / B): ``trace`` = Tr H, ``gap`` =
    L - L* (0 up to rounding: the flow stays on the optimal set), ``nullity`` = dimension of the null
    space of H (the tangent space of Gamma), ``theta`` ``[K, P]``."""

    time: Tensor
    trace: Tensor
    gap: Tensor
    nullity: Tensor
    theta: Tensor


def slow_flow(flat: FlatModel, contexts: ContextSet, theta0: Tensor, t_max: float, dt: float,
              rtol: float = 1e-9) -> Flow:
    """Integrate ``d theta / d tau = -1/4 P_T(theta) grad Tr H(theta)`` on the optimal set from
    ``theta0`` (retracted onto it first) up to ``tau = t_max``, with Heun's method (2nd order) and a
    Newton retraction after each stage. ``P_T`` projects onto the null space of H (the tangent space
    of Gamma at an exact optimum, where H = Gauss-Newton); ``grad Tr H`` is ``trace_gradient``.
    Records every step. The SGD clock: ``tau = eta^2 k / B``."""
    _check_positive("t_max", t_max)
    _check_positive("dt", dt)
    n_steps = max(1, round(t_max / dt))
    dt = t_max / n_steps

    def velocity(theta: Tensor) -> tuple[Tensor, Tensor, int]:
        H = dense_hessian(flat, theta, contexts)
        values, vectors, zero = _null_space(H, rtol)
        tangent = vectors[:, zero]
        v = -0.25 * tangent @ (tangent.T @ trace_gradient(flat, theta, contexts))
        return v, H, int(zero.sum())

    theta = retract(flat, theta0, contexts)
    optimum = contexts.optimal_loss()
    times, traces, gaps, nullities, thetas = [], [], [], [], []
    for k in range(n_steps + 1):
        v1, H, nullity = velocity(theta)
        times.append(k * dt)
        traces.append(float(H.trace()))
        gaps.append(float(expected_loss(flat, theta, contexts)) - optimum)
        nullities.append(nullity)
        thetas.append(theta)
        if k == n_steps:
            break
        half = retract(flat, theta + dt * v1, contexts, hessian=H)
        v2, _, _ = velocity(half)
        theta = retract(flat, theta + 0.5 * dt * (v1 + v2), contexts, hessian=H)
    return Flow(torch.tensor(times, dtype=DTYPE), torch.tensor(traces, dtype=DTYPE),
                torch.tensor(gaps, dtype=DTYPE), torch.tensor(nullities), torch.stack(thetas))


# ---------------------------------------------------------------------------- flat vs sharp, transfer
def neuron_trace_parts(model: OneLayerTransformer, contexts: ContextSet) -> tuple[Tensor, Tensor, float]:
    """At an exact optimum, the exact trace ``Tr H = Tr F_p`` split by neuron ``i``: ``P_i`` (its output
    weights ``A[:, i]``), ``Q_i`` (its input weights ``W[i]`` and bias ``b[i]``), and the rest
    (attention, ``W_V``, ``c``). Rescaling neuron i by ``alpha`` (``W_i, b_i *= alpha``,
    ``A_i /= alpha``, the same function for a ReLU) turns ``P_i + Q_i`` into
    ``alpha^2 P_i + Q_i / alpha^2``."""
    flat = FlatModel(model)
    diag = flat.unflatten(_pair_squares(flat, flat.vector(), contexts))  # the diagonal of F_p
    P = diag["A"].sum(0)
    Q = diag["W"].sum(1) + diag["b"]
    rest = float(sum(v.sum() for k, v in diag.items() if k not in ("A", "W", "b")))
    return P, Q, rest


def balance_neurons(model: OneLayerTransformer, contexts: ContextSet) -> OneLayerTransformer:
    """A copy of ``model`` with every live neuron rescaled to minimise the Hessian trace at the
    optimum: ``alpha_i^4 = Q_i / P_i`` (see ``neuron_trace_parts``), giving ``2 sqrt(P_i Q_i)``. The
    function, and so the loss, is unchanged (positive homogeneity of ReLU). Compare traces only after
    this: otherwise an unbalanced rescaling alone makes a solution look sharp."""
    P, Q, _ = neuron_trace_parts(model, contexts)
    live = (P > 0) & (Q > 0)
    alpha = torch.where(live, (Q / torch.where(live, P, torch.ones_like(P))) ** 0.25, torch.ones_like(P))
    balanced = copy.deepcopy(model)
    with torch.no_grad():
        balanced.W.mul_(alpha[:, None])
        balanced.b.mul_(alpha)
        balanced.A.div_(alpha[None, :])
    return balanced


@dataclass(frozen=True)
class HeadErrors:
    """Downstream error of the minimum-norm linear head: ``errors[i, d]`` for ``n_train[i]``
    examples in draw ``d`` (exact over the context distribution: the weight of the contexts whose
    sign is wrong, a zero prediction counting as wrong)."""

    n_train: tuple[int, ...]
    errors: Tensor

    def mean(self) -> Tensor:
        return self.errors.mean(1)

    def zero_error_rate(self) -> Tensor:
        return (self.errors == 0).to(DTYPE).mean(1)


def min_norm_head_errors(features: Tensor, weights: Tensor, scores: Tensor, n_train: Sequence[int],
                         draws: int, seed: int, rtol: float = 1e-10) -> HeadErrors:
    """Fit ``w = Phi_n^+ s_n`` (the minimum-norm least-squares head, no bias) on ``n`` contexts drawn
    i.i.d. from ``weights`` with their scores, and measure the exact error
    ``sum_c w_c [sign(phi_c . w) != sign(s_c)]``; for every ``n`` in ``n_train``, ``draws`` times
    (one generator seeded by ``seed``). ``features`` ``[N, m]``: the frozen neurons of every context."""
    for n in n_train:
        check_int("n_train", n)
    check_int("draws", draws, low=2)
    if features.shape[0] != weights.shape[0] or scores.shape != weights.shape:
        raise ValueError(f"features: expected {weights.shape[0]} rows like weights and scores, "
                         f"got {tuple(features.shape)}")
    g = torch.Generator().manual_seed(seed)
    label = torch.sign(scores)
    errors = torch.empty(len(n_train), draws, dtype=DTYPE)
    for i, n in enumerate(n_train):
        for d in range(draws):
            index = torch.multinomial(weights, n, replacement=True, generator=g)
            w = torch.linalg.pinv(features[index], rtol=rtol) @ scores[index]
            wrong = torch.sign(features @ w) != label
            errors[i, d] = (weights * wrong).sum()
    return HeadErrors(tuple(int(n) for n in n_train), errors)


__all__ = [
    "THEORY_SIZES", "theory_params", "ContextSet", "hmm_contexts", "with_ids", "BagOfWordsLanguage",
    "FactoredSoftmax", "OneLayerTransformer", "feature_solution", "random_solution", "FlatModel",
    "expected_loss_fn", "expected_loss", "per_example_gradients", "dense_hessian", "hessian_traces",
    "hessian_double_backward",
    "exact_gradient_covariance", "exact_fisher", "fisher_trace_at_optimum", "trace_gradient", "NoiseEstimate",
    "gradient_noise", "Trajectory", "run_sgd", "run_gd", "retract", "Flow", "slow_flow", "neuron_trace_parts",
    "balance_neurons", "HeadErrors", "min_norm_head_errors",
]
