"""Exact curvature on a ``ContextSet``, for tiny models (dense, float64).

With ``S(r) = diag r - r r^T`` and ``J_c = dz_c / dtheta``:

    H = sum_c w_c [J_c^T S(q_c) J_c + sum_k (q_c - p_c)_k d2 z_ck]                 (Hessian of L)
    C = Cov_(c,y)[g] = sum_c w_c J_c^T [S(p_c) + (q_c - p_c)(q_c - p_c)^T] J_c - grad L grad L^T
    F = sum_c w_c E_(y ~ q_c)[g g^T] = sum_c w_c J_c^T S(q_c) J_c                   (Fisher, model labels)

At any global minimiser ``q = p``: the residual terms vanish, ``grad L = 0`` and **C = H = F**.

Second derivatives: classic double backward (``exact_hessian``, ``hessian_traces``: every row in one
batched backward, many points at once) or forward-over-reverse (``trace_gradient``: ``jvp`` of
``grad``), never ``torch.func.hessian`` / ``jacrev(jacrev)`` (wrong with affine LayerNorm on torch
2.13, docs/lessons.md). The row-by-row reference is ``flatlib.measurement.flatness.dense_hessian``
(tests/test_theory.py checks the two agree).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.func import grad, jvp, vmap

from flatlib.theory.contexts import ContextSet
from flatlib.theory.functional import FlatModel, _example_loss, expected_loss, per_example_gradients


def exact_hessian(flat: FlatModel, theta: Tensor, contexts: ContextSet) -> Tensor:
    """``[P, P]`` the Hessian of L at ``theta`` by classic double backward: the gradient with its graph,
    then every row ``d(grad L)_i / d theta`` in one vectorised backward (``is_grads_batched``; see
    ``hessian_traces``). Exact; equal to the row-by-row ``flatlib.measurement.flatness.dense_hessian`` of
    ``expected_loss_fn`` (tests/test_theory.py). Symmetrised (the asymmetry is rounding)."""
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

