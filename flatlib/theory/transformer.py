"""The one-layer transformer of notebook 06, section 3, and its two exact optima: the "feature"
solution (flat) and the "random" one (sharp); ``balance_neurons`` rescales each ReLU neuron to the
trace-minimising split between its input and output weights (the function is unchanged)."""

from __future__ import annotations

import copy
import math

import torch
from torch import Tensor, nn

from flatlib.checks import check_int
from flatlib.theory.bag_of_words import BagOfWordsLanguage
from flatlib.theory.contexts import DTYPE, ContextSet
from flatlib.theory.curvature import _pair_squares
from flatlib.theory.functional import FlatModel


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


def feature_solution(language: BagOfWordsLanguage, width: int, d_key: int = 2) -> OneLayerTransformer:
    """The "feature" optimum: four live neurons ``relu(+f_j)``, ``relu(-f_j)`` (j = 1, 2), i.e.
    ``W = T (±u_j, 0)`` on uniform attention, with output ``A[:, (j,+)] = lambda_j u_j = -A[:, (j,-)]``
    and ``c = h``, so that ``logits = h + sum_j lambda_j u_j (relu(f_j) - relu(-f_j))`` is the exact
    conditional. The other ``width - 4`` neurons are dead (zero weights, bias -1, zero output): the
    same architecture as ``random_solution``, and they add nothing to the loss or the trace. ``d_key``:
    the attention's key size (its weights are 0 here, so it changes the parameter count only)."""
    if width < 2 * language.features.shape[0]:
        raise ValueError(f"width: the feature solution needs >= {2 * language.features.shape[0]} neurons, "
                         f"got {width}")
    model = OneLayerTransformer(language.n_words, width, d_key)
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


def random_solution(language: BagOfWordsLanguage, width: int, seed: int, margin: float = 0.5,
                    d_key: int = 2) -> OneLayerTransformer:
    """The "random" optimum: ``width`` neurons with Gaussian input weights ``W_i ~ N(0, I)`` (from
    ``seed``), each bias set so that the neuron is active on every context (``b_i = margin -
    min_c W_i . z_c``: the neurons are random directions, in their linear region), and the
    minimum-norm output weights that reproduce the exact logits on every context:
    ``A^T = Phi^+ (Z - h)``, ``c = h``, ``Phi`` the ``[N, width]`` neurons on the N contexts. The
    logits are affine in the word counts, so ``width >= n_words`` random neurons fit them exactly
    (ValueError otherwise). ``d_key`` as in ``feature_solution``."""
    if width < language.n_words:
        raise ValueError(f"width: an exact random-feature fit needs >= {language.n_words} neurons (n_words), "
                         f"got {width}")
    contexts = language.contexts()
    model = OneLayerTransformer(language.n_words, width, d_key)
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

