"""Downstream evaluation: linear probes on frozen features, full fine-tuning, and the paper's
"lookup table" features (the exact conditionals).

The probe protocol (fixed, so that numbers from different checkpoints are comparable):

1. features: the model's final-layer representations of the *unmasked* sentence, pooled as
   ``"concat"`` (all positions concatenated, the paper's choice; padding positions are zero),
   ``"mean"`` (mean over the sentence's words) or ``"position"`` (one position's vector: the
   sensitive choice for the HMM state tasks);
2. sentences without a label (-1) are dropped; the rest are split into train / validation / test
   with a seeded permutation (``n_splits`` resplits);
3. features are standardised with the training split's mean and standard deviation;
4. a multinomial logistic regression (L-BFGS, float64, full batch, ``max_iter`` iterations) is fitted
   for every L2 strength of ``l2_grid``; the strength with the best validation accuracy is chosen
   *per split*, and its test accuracy is the split's result;
5. the result is the mean test accuracy over splits with a 95% t-interval, plus the whole sweep (mean
   test accuracy for every L2 strength), reported alongside because the regularisation moves a
   probe by several points (docs/lessons.md).

That is protocol 1 (``linear_probe``), with which the committed figures were made. Its L2 choice sat at
the smallest strength of its grid on every HMM checkpoint checked, and its unpenalised biases of a class
absent from a training split run to -inf. Protocol 2 (``exact_probe``, ``Protocol(probe_version=2)``)
keeps steps 1-3 and 5 and replaces step 4:

4'. the regularised optimum is computed exactly (``fit_logistic_exact``: Newton in float64 to a gradient
    tolerance, classes absent from the training split given probability 0) along a grid that reaches well
    beyond the chosen values on both sides (``PROBE_V2_L2_GRID``, 1e-7 .. 10), walked from the strongest
    penalty down until the pooled validation accuracy has been below its best at ``PROBE_V2_PATIENCE``
    strengths in a row; ONE strength per (task, features) is chosen on the validation splits pooled
    (``choose_l2``), recorded, and flagged (``ProbeResult.l2_edge``) when it sits at an edge of the grid.
    ``accuracy_vs_l2`` is the whole curve.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor

from flatlib.device import module_device, preserved_rng
from flatlib.languages import HMM, Corpus, Language
from flatlib.stats import mean_ci
from flatlib.training.model import Transformer

DEFAULT_L2_GRID = (1e-4, 1e-3, 1e-2, 1e-1)
# Protocol 2's grid: three decades below protocol 1's smallest strength, which was chosen on every HMM
# split checked (the choice on a grid extended to 1e-6 was 1e-6 .. 3e-5), and two above its largest, which
# the 640-d concatenated features chose (protocol 1 and 2 alike: its upper edge), in steps of ~half a decade.
PROBE_V2_L2_GRID = (1e-7, 3e-7, 1e-6, 3e-6, 1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0,
                    3.0, 10.0)
# Protocol 2 walks the grid from the strongest penalty down and stops once the pooled validation accuracy
# has been below its best for this many strengths in a row (the weakest penalties are the costly, nearly
# separable fits, and past the optimum they only overfit). The choice equals the whole grid's argmax
# whenever the pooled validation curve does not rise again after PROBE_V2_PATIENCE worse strengths.
PROBE_V2_PATIENCE = 3
PROBE_VERSIONS = (1, 2)
# Parameters (D + 1) K up to which Newton's system is solved with the dense Hessian: building it costs
# n ((D + 1) K)^2 flops, factorising it ((D + 1) K)^3 / 3. Measured on one core, n = 1000 (a whole fit, L2
# 1e-6 / 1e-3): 64-d x 6 classes (390) dense 0.21 / 0.09 s, CG 0.91 / 0.04 s; 128-d x 12 (1548) dense
# 3.7 / 2.0 s, CG 0.31 / 0.06 s. Beyond the limit: conjugate gradients on Hessian-vector products
# (n (D + 1) K flops each), preconditioned per class (``_Softmax.preconditioner``).
DENSE_LIMIT = 600


def lookup_table_features(language: Language, corpus: Corpus, kind: str = "mlm") -> Tensor:
    """The Bayes-optimal pre-trained model as a feature map: ``[n, L, V]`` float64, the exact
    conditional distribution of the word at every position given the rest (``kind="mlm"``:
    p(x_t | x_-t)) or given the prefix (``kind="causal"``: p(x_t | x_<t)). Padding positions are 0.

    The paper probes these (concatenated over positions) as the "lookup table" baseline: a model
    that *is* the optimum of the pre-training loss, and still transfers worse than a trained
    transformer."""
    if kind == "mlm":
        features = language.mlm_conditionals(corpus)
    elif kind == "causal":
        features = language.causal_conditionals(corpus)
    else:
        raise ValueError(f"kind: expected 'mlm' or 'causal', got {kind!r}")
    return features * corpus.mask[..., None].to(features.dtype)


@torch.no_grad()
def model_features(model: Transformer, corpus: Corpus, batch_size: int = 1024,
                   masked_position: int | None = None) -> Tensor:
    """``[n, L, d]`` final-layer representations of the unmasked sentences (0 at padding), computed on
    the model's device and returned on the CPU. With ``masked_position``, that position's word is
    replaced by the MASK token first: the input whose representation the pre-training loss
    supervises (the head reads it to predict the hidden word)."""
    was_training = model.training
    model.eval()
    out = []
    pad, device = model.config.pad_id, module_device(model)
    if masked_position is not None and not 0 <= masked_position < corpus.tokens.shape[1]:
        raise ValueError(f"masked_position: expected a position in [0, {corpus.tokens.shape[1]}), got "
                         f"{masked_position!r}")
    for chunk in corpus.batches(batch_size):
        tokens = torch.where(chunk.mask, chunk.tokens, pad)
        if masked_position is not None:
            tokens = tokens.clone()
            tokens[:, masked_position] = torch.where(chunk.mask[:, masked_position], model.config.mask_id,
                                                     pad)
        out.append(model.features(tokens.to(device)).cpu() * chunk.mask[..., None])  # probes run on the CPU
    model.train(was_training)
    return torch.cat(out)


def pool(features: Tensor, corpus: Corpus, pooling: str = "concat", position: int | None = None) -> Tensor:
    """``[n, L, d]`` per-position features -> ``[n, D]`` probe inputs (see the module docstring)."""
    mask = corpus.mask[..., None].to(features.device, features.dtype)
    features = features * mask
    if pooling == "concat":
        return features.flatten(1)
    if pooling == "mean":
        return features.sum(1) / mask.sum(1)
    if pooling == "position":
        if position is None or not 0 <= position < features.shape[1]:
            raise ValueError(f"position: expected a position in [0, {features.shape[1]}), got {position!r}")
        return features[:, position]
    raise ValueError(f"pooling: expected 'concat', 'mean' or 'position', got {pooling!r}")


def probe_inputs(language: Language, corpus: Corpus, features: Tensor, task: str) -> Tensor:
    """The probe's input for ``task``: for an HMM state task, the representation at the task's
    position (the sensitive choice, docs/lessons.md); for a PCFG task, all positions concatenated (the
    paper's choice). Differentiable: the adversarial objective (``flatlib.training.adversary``) pools its
    downstream batch with it, exactly as the evaluation probe does."""
    return pool(features, corpus, *probe_pooling(language, task))


def probe_pooling(language: Language, task: str) -> tuple[str, int | None]:
    """``(pooling, position)`` of ``pool`` for ``task``: the task's position for an HMM state task,
    all positions concatenated otherwise (the probe's and fine-tuning's shared choice)."""
    if isinstance(language, HMM):
        return "position", int(task.split("@")[1])
    return "concat", None


def fit_logistic(x: Tensor, y: Tensor, n_classes: int, l2: float, max_iter: int = 200) -> Tensor:
    """Multinomial logistic regression by L-BFGS: weights ``[D + 1, C]`` (last row: bias).
    Loss: mean cross-entropy + l2 * ||W||^2 (bias not penalised)."""
    x = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], dim=1)
    w = torch.zeros(x.shape[1], n_classes, dtype=x.dtype, requires_grad=True)
    optimizer = torch.optim.LBFGS([w], lr=1, max_iter=max_iter, tolerance_grad=1e-9,
                                  tolerance_change=1e-12, history_size=20, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(x @ w, y) + l2 * (w[:-1] ** 2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return w.detach()


def _accuracy(w: Tensor, x: Tensor, y: Tensor) -> float:
    x = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], dim=1)
    return float(((x @ w).argmax(dim=1) == y).double().mean())


def check_probe_version(version: object) -> None:
    """``Protocol.probe_version`` must be one of ``PROBE_VERSIONS`` (an int: 1 is the committed figures'
    protocol, 2 ``exact_probe``'s)."""
    if type(version) is not int or version not in PROBE_VERSIONS:
        raise ValueError("probe_version: expected 1 or 2 (Protocol.probe_version: 1 the capped L-BFGS probe "
                         f"of the committed figures, 2 the exact probe with one pooled L2), got {version!r}")


@dataclass
class LogisticFit:
    """``fit_logistic_exact``'s solution. ``weight`` has ``fit_logistic``'s layout ``[D + 1, C]`` (last row:
    bias); a class absent from the training data has weights 0 and bias -inf (probability 0)."""

    weight: Tensor
    present: Tensor  # [C] bool: the classes with a training example
    objective: float  # the minimum of the objective (see fit_logistic_exact)
    max_gradient: float  # max |gradient| at the solution, over the present classes' parameters
    newton_steps: int
    converged: bool  # max_gradient <= tol


class _Softmax:
    """The objective of ``fit_logistic_exact`` on the present classes: ``xs`` [n, A] the features with a
    column of ones appended, ``target`` [n] in 0..K-1, parameters ``theta`` [A, K] (last row: bias)."""

    def __init__(self, xs: Tensor, target: Tensor, n_present: int, l2: float,
                 spectrum: Tensor | None = None) -> None:
        self.xs, self.l2, self.n = xs, l2, len(xs)
        self.onehot = F.one_hot(target, n_present).to(xs.dtype)
        # Conjugate gradients only (see ``preconditioner``): ``spectrum`` [A] is diag(X^T X / n) when the
        # features are already in the eigenbasis of their Gram matrix (``fit_logistic_exact`` rotates them)
        self.spectrum = spectrum
        self._xs_t: Tensor | None = None  # xs.T, contiguous: the [K, n] x [n, A] layout of hessian_vector

    def value(self, theta: Tensor) -> tuple[float, Tensor]:
        """``(f(theta), softmax probabilities [n, K])``."""
        logits = self.xs @ theta
        log_p = logits - torch.logsumexp(logits, dim=1, keepdim=True)
        loss = -(self.onehot * log_p).sum() / self.n + self.l2 * (theta[:-1] ** 2).sum()
        return float(loss), log_p.exp()

    def gradient(self, theta: Tensor, p: Tensor) -> Tensor:
        grad = self.xs.T @ (p - self.onehot) / self.n
        grad[:-1] += 2 * self.l2 * theta[:-1]
        return grad

    def hessian(self, p: Tensor) -> Tensor:
        """The dense ``[A K, A K]`` Hessian (row-major ``theta`` order) plus ``u u^T``, ``u`` the unit vector
        along the biases' common shift: H u = 0 and u^T g = 0, so the system (H + u u^T) d = -g is positive
        definite and its solution is the minimum-norm Newton step, orthogonal to the shift."""
        n, (a, k) = self.n, (self.xs.shape[1], p.shape[1])
        m = (self.xs[:, :, None] * p[:, None, :]).reshape(n, a * k)
        h = -(m.T @ m).reshape(a, k, a, k)
        for c in range(k):  # the diag(p_i) part: X^T diag(p_c) X on class c's diagonal block
            h[:, c, :, c] += (self.xs * p[:, c : c + 1]).T @ self.xs
        h = h.reshape(a * k, a * k) / n
        h.diagonal()[: (a - 1) * k] += 2 * self.l2
        h[(a - 1) * k :, (a - 1) * k :] += 1 / k
        return h

    def hessian_vector(self, p_t: Tensor, v: Tensor) -> Tensor:
        """``(H + u u^T) v`` without forming H; ``p_t`` the probabilities transposed, [K, n] contiguous.
        Computed as rows ([K, n] x [n, A]): with K a handful of classes that layout runs the two products
        1.7-2.5x faster on one core than [A, n] x [n, K] (measured, n = 1000, A = 513, K = 3..11). (Tried:
        float32 products, no faster each and 40% more of them.)"""
        if self._xs_t is None:
            self._xs_t = self.xs.T.contiguous()
        z_t = v.T.contiguous() @ self._xs_t  # [K, n]
        out = ((p_t * (z_t - (p_t * z_t).sum(0, keepdim=True))) @ self.xs).T / self.n
        out[:-1] += 2 * self.l2 * v[:-1]
        out[-1] += v[-1].sum() / v.shape[1]
        return out

    def preconditioner(self, p: Tensor) -> Callable[[Tensor], Tensor]:
        """r -> M^-1 r, M block-diagonal over classes with blocks ω_c X^T X / n + 2λ I, where
        ω_c = mean_i p_ic (1 - p_ic): H's class-diagonal blocks with each example's curvature replaced by
        its class mean (and the cross-class coupling dropped). It absorbs the features' correlations and
        scales, which make H ill-conditioned at small L2. The features arrive in the eigenbasis of
        X^T X / n (``spectrum`` its eigenvalues, the bias column's last), where M is diagonal (M exactly
        when the features are centred, as the probe's standardised ones are). (Tried and
        worse on the PCFG's features: H's exact diagonal in that basis, 6x the Hessian-vector products.)"""
        if self.spectrum is None:
            raise ValueError("the conjugate-gradient path needs the features' spectrum (fit_logistic_exact "
                             "rotates the features into their Gram matrix's eigenbasis first)")
        omega = (p * (1 - p)).mean(0)
        inverse = 1 / (omega[None, :] * self.spectrum[:, None] + 2 * self.l2)  # [A, K]
        return lambda r: inverse * r

    def direction(self, p: Tensor, grad: Tensor, dense: bool, max_cg: int = 500) -> Tensor:
        """The Newton step: dense Cholesky solve, or preconditioned conjugate gradients to the relative
        residual min(0.5, sqrt(|g|)) (an inexact Newton method: superlinear; the stopping test is on the
        true gradient, so inexact steps cost iterations, never accuracy). (Tried: min(0.5, |g|^(1/4)), 28%
        fewer Hessian-vector products and 1.38x faster on a cpu PCFG checkpoint's standard probe, one core;
        but on one of three PCFG checkpoints the sweep's test accuracy at L2 1e-6, below the chosen 3e-5, then
        moved by one test example of 3000: the weak-L2 optimum is fixed only to the gradient tolerance, so
        another path can classify a boundary example differently. Kept as is so that a rerun reproduces the
        stored measurements.)"""
        if dense:
            factor = torch.linalg.cholesky(self.hessian(p))
            return -torch.cholesky_solve(grad.reshape(-1, 1), factor).reshape(grad.shape)
        precondition, p_t = self.preconditioner(p), p.T.contiguous()
        norm = float(torch.linalg.norm(grad))
        step, residual = torch.zeros_like(grad), -grad
        z = precondition(residual)
        direction, rz = z, float((residual * z).sum())
        for _ in range(max_cg):
            hd = self.hessian_vector(p_t, direction)
            alpha = rz / float((direction * hd).sum())
            step, residual = step + alpha * direction, residual - alpha * hd
            if float(torch.linalg.norm(residual)) <= min(0.5, math.sqrt(norm)) * norm:
                break
            z = precondition(residual)
            rz, rz_old = float((residual * z).sum()), rz
            direction = z + (rz / rz_old) * direction
        return step


def fit_logistic_exact(x: Tensor, y: Tensor, n_classes: int, l2: float, tol: float = 1e-8,
                       max_steps: int = 100, dense_limit: int = DENSE_LIMIT,
                       init: Tensor | None = None, basis: tuple[Tensor, Tensor] | None = None) -> LogisticFit:
    r"""The exact minimiser of protocol 1's objective (``fit_logistic``), by Newton's method in float64.

    With ``x`` [n, D] float64 (the probe standardises it first), ``y`` [n] in 0..C-1 and P the classes
    present in ``y`` (K of them), the parameters are W [D, K] and b [K] and the objective is

    .. math:: f(W, b) = \frac{1}{n}\sum_{i=1}^n \Big[\log\sum_{c\in P} e^{x_i^\top W_c + b_c}
              - x_i^\top W_{y_i} - b_{y_i}\Big] + \lambda \|W\|_F^2,

    the mean cross-entropy plus ``l2`` (λ > 0) times the squared Frobenius norm of the weights; the biases
    are not penalised (as in protocol 1: penalising them would pull the class priors towards uniform and
    make the probe depend on where the features are centred). f is invariant to b -> b + t 1; the solution
    returned has sum(b) = 0 (Newton steps are taken orthogonal to that shift, see ``_Softmax.hessian``).

    Absent classes: protocol 1's objective over all C classes has no minimiser when a class has no training
    example (its bias's gradient is the mean predicted probability of that class, > 0 for any finite bias),
    but its infimum is f's minimum above: send the absent biases to -inf with their weights at 0. f is
    strictly convex (the penalty on W, and on b orthogonal to 1 every present class's cross-entropy grows
    without bound) and coercive, so its minimum is attained and unique. The returned model is that limit:
    absent classes have weights 0, bias -inf and probability 0. With one present class the model predicts
    it and f = 0.

    Newton's method: step d solving (H + u u^T) d = -g (dense Cholesky while (D + 1) K <= ``dense_limit``,
    else preconditioned conjugate gradients), backtracking (halving) until the Armijo condition
    f(θ + t d) <= f(θ) + 1e-4 t g^T d holds (the full step is taken once the predicted decrease -g^T d is
    below the float64 resolution of f, where Armijo's test is only rounding noise), until
    max |g| <= ``tol``. ``init`` ([D + 1, C], e.g. the fit at a neighbouring L2) is a warm start; the
    minimiser does not depend on it.

    On the conjugate-gradient path the problem is solved in the eigenbasis of x^T x / n (``basis``: that
    ``torch.linalg.eigh`` pair, computed here when not given; the probe computes it once per split): with V
    orthogonal, x -> x V and W -> V^T W leave the logits and ||W||_F, hence f and its minimiser, unchanged,
    and the preconditioner is diagonal there. The stopping test is on the gradient in the original
    coordinates, and the solution is returned in them."""
    if x.dtype != torch.float64 or x.ndim != 2:
        raise ValueError(f"x: expected float64 features [n, D], got {x.dtype} of shape {tuple(x.shape)}")
    if y.shape != (len(x),) or len(y) == 0 or int(y.min()) < 0 or int(y.max()) >= n_classes:
        raise ValueError(f"y: expected {len(x)} labels in 0..n_classes - 1 (n_classes = {n_classes}), got "
                         f"{y.shape[0] if y.ndim else y} in {int(y.min()) if len(y) else None}.."
                         f"{int(y.max()) if len(y) else None}")
    if not (isinstance(l2, (int, float)) and math.isfinite(l2) and l2 > 0):
        raise ValueError(f"l2: expected a positive finite strength (with 0 the optimum need not exist), "
                         f"got {l2!r}")
    present = torch.bincount(y, minlength=n_classes) > 0
    classes = present.nonzero().squeeze(1)
    weight = torch.zeros(x.shape[1] + 1, n_classes, dtype=torch.float64)
    weight[-1, ~present] = -math.inf
    if len(classes) == 1:
        return LogisticFit(weight, present, 0.0, 0.0, 0, True)
    dense = (x.shape[1] + 1) * len(classes) <= dense_limit
    theta = (torch.zeros(x.shape[1] + 1, len(classes), dtype=x.dtype) if init is None
             else init[:, classes].clone())
    rotation, spectrum = None, None
    if not dense:
        if basis is None:
            basis = torch.linalg.eigh(x.T @ x / len(x))
        values, rotation = basis
        if rotation.shape != (x.shape[1], x.shape[1]) or values.shape != (x.shape[1],):
            raise ValueError(f"basis: expected the eigendecomposition of x^T x / n ({x.shape[1]} eigenvalues "
                             f"and a [{x.shape[1]}, {x.shape[1]}] orthogonal matrix), got shapes "
                             f"{tuple(values.shape)} and {tuple(rotation.shape)}")
        x, spectrum = x @ rotation, torch.cat([values, values.new_ones(1)])
        theta[:-1] = rotation.T @ theta[:-1]

    def original(t: Tensor) -> Tensor:  # weights (or their gradient) back in the features' coordinates
        return t if rotation is None else torch.cat([rotation @ t[:-1], t[-1:]])

    xs = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], dim=1)
    problem = _Softmax(xs, (torch.cumsum(present, 0) - 1)[y], len(classes), float(l2), spectrum)
    theta[-1] -= theta[-1].mean()
    value, p = problem.value(theta)
    for step in range(max_steps + 1):
        grad = problem.gradient(theta, p)
        max_gradient = float(original(grad).abs().max())
        if max_gradient <= tol or step == max_steps:
            break
        direction = problem.direction(p, grad, dense)
        slope, t = float((grad * direction).sum()), 1.0
        while True:
            new_value, new_p = problem.value(theta + t * direction)
            if new_value <= value + 1e-4 * t * slope or -slope <= 1e-14 * max(1.0, abs(value)) or t < 1e-10:
                break
            t /= 2
        theta, value, p = theta + t * direction, new_value, new_p
    theta[-1] -= theta[-1].mean()  # remove the rounding drift along the shift (f is invariant to it)
    weight[:, classes] = original(theta)
    return LogisticFit(weight, present, value, max_gradient, step, max_gradient <= tol)


@dataclass
class ProbeResult:
    accuracy: float  # mean test accuracy over splits at the per-split chosen L2
    ci95: float  # half-width of the 95% t-interval over splits
    split_accuracies: list[float]
    chosen_l2: list[float]
    sweep: pd.DataFrame = field(repr=False)  # per L2: mean test / validation accuracy over splits
    l2_edge: str | None = None  # protocol 2: "lower" / "upper" when the chosen L2 is at an edge of the grid
    max_gradient: float | None = None  # protocol 2: the fits' worst max |gradient| (optimality residual)

    def __str__(self) -> str:
        return f"{self.accuracy:.4f} ± {self.ci95:.4f} (95% CI over {len(self.split_accuracies)} splits)"


def linear_probe(features: Tensor, labels: Tensor, n_classes: int, n_train: int, n_test: int,
                 n_val: int | None = None, l2_grid=DEFAULT_L2_GRID, n_splits: int = 3,
                 seed: int = 0, max_iter: int = 200, standardize: bool = True) -> ProbeResult:
    """The probe protocol of the module docstring on ``features`` [n, D] and ``labels`` [n]
    (-1 = no label). ``n_val`` defaults to ``n_test // 2``. ``standardize=False`` skips step 3:
    the probe then sees the features' scales (which a LayerNorm-gain rescaling of the model
    changes), as the theory's minimum-norm head does."""
    keep = labels >= 0
    x_all, y_all = features[keep].to(torch.float64), labels[keep]
    n_val = n_test // 2 if n_val is None else n_val
    if n_train < 2 or n_test < 1 or n_val < 1:
        raise ValueError(f"n_train, n_val, n_test: expected >= 2, 1, 1; got {n_train}, {n_val}, {n_test}")
    if n_train + n_val + n_test > len(y_all):
        raise ValueError(f"n_train + n_val + n_test = {n_train + n_val + n_test} > {len(y_all)} labelled "
                         "examples")
    if not l2_grid or any(l2 < 0 for l2 in l2_grid):
        raise ValueError(f"l2_grid: expected non-negative strengths, got {l2_grid!r}")
    rows, split_acc, chosen = [], [], []
    for split in range(n_splits):
        order = torch.randperm(len(y_all), generator=torch.Generator().manual_seed(seed * 1000 + split))
        train, val = order[:n_train], order[n_train : n_train + n_val]
        test = order[n_train + n_val : n_train + n_val + n_test]
        if standardize:
            mean, std = x_all[train].mean(0), x_all[train].std(0).clamp(min=1e-8)
            x = (x_all - mean) / std
        else:
            x = x_all
        best = (-1.0, None, None)
        for l2 in l2_grid:
            w = fit_logistic(x[train], y_all[train], n_classes, l2, max_iter)
            val_acc, test_acc = _accuracy(w, x[val], y_all[val]), _accuracy(w, x[test], y_all[test])
            rows.append({"split": split, "l2": l2, "val_accuracy": val_acc, "test_accuracy": test_acc})
            if val_acc > best[0]:
                best = (val_acc, l2, test_acc)
        chosen.append(best[1])
        split_acc.append(best[2])
    sweep = pd.DataFrame(rows).groupby("l2")[["val_accuracy", "test_accuracy"]].mean()
    accuracy, ci = mean_ci(split_acc)
    return ProbeResult(accuracy, ci, split_acc, chosen, sweep)


def choose_l2(table: pd.DataFrame) -> float:
    """Protocol 2's one L2 for a (task, features): the strength of ``table`` (rows ``split``, ``l2``,
    ``val_accuracy``) with the best validation accuracy pooled over the splits (their mean: every split
    has the same number of validation examples). Ties (equal to 1e-12: the accuracies are fractions of
    the same count) go to the strongest penalty, the simplest model among the equals. Pooling makes the
    choice one per (task, features), not a per-split argmax that follows each split's noise."""
    pooled = table.groupby("l2")["val_accuracy"].mean()
    return float(pooled[pooled >= pooled.max() - 1e-12].index.max())


def grid_edge(grid, chosen: float) -> str | None:
    """``"lower"`` / ``"upper"`` when ``chosen`` is the smallest / largest strength of ``grid`` (the optimum
    may lie beyond it: extend the grid), None when it is interior or the grid has a single strength (a
    fixed L2, not a choice)."""
    if len(set(grid)) < 2:
        return None
    return "lower" if chosen == min(grid) else "upper" if chosen == max(grid) else None


def _check_probe_sizes(n_labelled: int, n_train: int, n_val: int, n_test: int, l2_grid) -> None:
    if n_train < 2 or n_test < 1 or n_val < 1:
        raise ValueError(f"n_train, n_val, n_test: expected >= 2, 1, 1; got {n_train}, {n_val}, {n_test}")
    if n_train + n_val + n_test > n_labelled:
        raise ValueError(f"n_train + n_val + n_test = {n_train + n_val + n_test} > {n_labelled} "
                         f"labelled examples")
    if not l2_grid or any(l2 < 0 for l2 in l2_grid):
        raise ValueError(f"l2_grid: expected non-negative strengths, got {l2_grid!r}")


def _l2_table(features: Tensor, labels: Tensor, n_classes: int, n_train: int, n_test: int, n_val: int | None,
              l2_grid, n_splits: int, seed: int, standardize: bool, tol: float,
              patience: int | None = None) -> pd.DataFrame:
    """One row per (split, L2): validation and test accuracy of the exact optimum (protocol 1's splits and
    standardisation), its max |gradient| and Newton steps. The strengths are solved from the largest down,
    every split at one strength before the next, each fit warm-started at the split's previous optimum
    (fewer Newton steps, same minimiser). With ``patience``, the walk stops once the pooled (mean over
    splits) validation accuracy has been below its best so far (by more than 1e-12) at ``patience``
    strengths in a row; None walks the whole grid."""
    keep = labels >= 0
    x_all, y_all = features[keep].to(torch.float64), labels[keep]
    n_val = n_test // 2 if n_val is None else n_val
    _check_probe_sizes(len(y_all), n_train, n_val, n_test, l2_grid)
    if any(l2 <= 0 for l2 in l2_grid):
        raise ValueError(f"l2_grid: protocol 2 needs positive strengths (with 0 the optimum need not exist), "
                         f"got {l2_grid!r}")
    if patience is not None and (isinstance(patience, bool) or not isinstance(patience, int) or patience < 1):
        raise ValueError(f"patience: expected a positive integer or None, got {patience!r}")
    splits = []
    for split in range(n_splits):
        order = torch.randperm(len(y_all), generator=torch.Generator().manual_seed(seed * 1000 + split))
        train, val = order[:n_train], order[n_train : n_train + n_val]
        test = order[n_train + n_val : n_train + n_val + n_test]
        x = x_all
        if standardize:
            x = (x_all - x_all[train].mean(0)) / x_all[train].std(0).clamp(min=1e-8)
        # the eigenbasis of the split's training Gram matrix, for the conjugate-gradient fits (computed once
        # a split, not once a fit; the dense fits ignore it)
        basis = torch.linalg.eigh(x[train].T @ x[train] / len(train))
        splits.append((x, train, val, test, basis))
    rows, fits = [], [None] * n_splits
    best, worse = -math.inf, 0
    for l2 in sorted(set(l2_grid), reverse=True):
        for split, (x, train, val, test, basis) in enumerate(splits):
            fit = fit_logistic_exact(x[train], y_all[train], n_classes, l2, tol=tol,
                                     init=None if fits[split] is None else fits[split].weight, basis=basis)
            fits[split] = fit
            if not fit.converged:
                warnings.warn(f"exact probe: split {split}, l2 {l2:g}: max |gradient| {fit.max_gradient:.2e} "
                              f"> tol {tol:g} after {fit.newton_steps} Newton steps (recorded as "
                              "max_gradient)")
            rows.append({"split": split, "l2": l2, "val_accuracy": _accuracy(fit.weight, x[val], y_all[val]),
                         "test_accuracy": _accuracy(fit.weight, x[test], y_all[test]),
                         "max_gradient": fit.max_gradient, "newton_steps": fit.newton_steps})
        pooled = float(np.mean([r["val_accuracy"] for r in rows[-n_splits:]]))
        best, worse = (pooled, 0) if pooled > best + 1e-12 else (best, worse + (pooled < best - 1e-12))
        if patience is not None and worse >= patience:
            break
    return pd.DataFrame(rows).sort_values(["split", "l2"], ascending=[True, False], ignore_index=True)


def _curve(table: pd.DataFrame) -> pd.DataFrame:
    rows = {}
    for l2, group in table.groupby("l2"):
        test, ci = mean_ci(group.sort_values("split")["test_accuracy"].tolist())
        rows[l2] = {"test_accuracy": test, "test_ci95": ci, "val_accuracy": group["val_accuracy"].mean(),
                    "max_gradient": group["max_gradient"].max()}
    return pd.DataFrame.from_dict(rows, orient="index").rename_axis("l2").sort_index()


def accuracy_vs_l2(features: Tensor, labels: Tensor, n_classes: int, n_train: int, n_test: int,
                   n_val: int | None = None, l2_grid=PROBE_V2_L2_GRID, n_splits: int = 3, seed: int = 0,
                   standardize: bool = True, tol: float = 1e-8) -> pd.DataFrame:
    """The probe's accuracy as a function of its L2 strength (protocol 2's splits and exact solver, with
    the arguments of ``exact_probe``): indexed by ``l2`` ascending, the mean test accuracy over splits
    ``test_accuracy`` with its 95% t-interval half-width ``test_ci95``, the pooled ``val_accuracy`` that
    ``choose_l2`` reads, and ``max_gradient`` (the worst optimality residual over splits). For one
    model's features and a task: how much the transfer number owes to the regularisation."""
    return _curve(_l2_table(features, labels, n_classes, n_train, n_test, n_val, l2_grid, n_splits, seed,
                            standardize, tol))


def exact_probe(features: Tensor, labels: Tensor, n_classes: int, n_train: int, n_test: int,
                n_val: int | None = None, l2_grid=PROBE_V2_L2_GRID, n_splits: int = 3, seed: int = 0,
                standardize: bool = True, tol: float = 1e-8,
                patience: int | None = PROBE_V2_PATIENCE) -> ProbeResult:
    """Probe protocol 2 (module docstring): ``linear_probe``'s splits and standardisation, the exact
    regularised optimum (``fit_logistic_exact``) at the strengths of ``l2_grid`` from the strongest down
    until the pooled validation accuracy has been below its best at ``patience`` strengths in a row (None:
    every strength), ONE strength chosen on the pooled validation splits (``choose_l2``), and the test
    accuracy over splits at that strength. ``chosen_l2`` repeats it once a split (protocol 1's layout),
    ``l2_edge`` flags a choice at an edge of the grid, ``max_gradient`` is the worst optimality residual of
    any fit, and ``sweep`` is ``accuracy_vs_l2``'s table over the strengths walked."""
    table = _l2_table(features, labels, n_classes, n_train, n_test, n_val, l2_grid, n_splits, seed,
                      standardize, tol, patience)
    l2 = choose_l2(table)
    chosen = table[table["l2"] == l2].sort_values("split")
    accuracy, ci = mean_ci(chosen["test_accuracy"].tolist())
    return ProbeResult(accuracy, ci, chosen["test_accuracy"].tolist(), [l2] * n_splits, _curve(table),
                       l2_edge=grid_edge(l2_grid, l2), max_gradient=float(table["max_gradient"].max()))


def finetune(model: Transformer, corpus: Corpus, labels: Tensor, n_classes: int, n_train: int,
             n_test: int, epochs: int = 10, lr: float = 1e-4, batch_size: int = 64, seed: int = 0,
             pooling: str = "mean", position: int | None = None, init_head: str = "random",
             head_l2: float = 1e-3) -> float:
    """Full fine-tuning (the paper: AdamW, lr 1e-4, 10 epochs) of a copy of ``model`` with a new
    linear head on pooled final-layer features; returns the test accuracy.

    ``init_head="random"`` starts the head from PyTorch's default initialisation (the paper's
    setting, with 0.1M examples); ``"probe"`` first fits the linear probe on the training examples
    (standardised features, L2 ``head_l2``, folded back into the head's weights) and fine-tunes from
    there (LP-FT, Kumar et al. 2022): with a few hundred steps, a random head is still far from
    trained and fine-tuning then measures the optimiser, not the features."""
    if init_head not in ("random", "probe"):
        raise ValueError(f"init_head: expected 'random' or 'probe', got {init_head!r}")
    keep = (labels >= 0).nonzero().squeeze(1)
    if n_train + n_test > len(keep):
        raise ValueError(f"n_train + n_test = {n_train + n_test} > {len(keep)} labelled examples")
    generator = torch.Generator().manual_seed(seed)
    order = keep[torch.randperm(len(keep), generator=generator)]
    train, test = order[:n_train], order[n_train : n_train + n_test]
    net = copy.deepcopy(model).train()
    device = module_device(net)
    with preserved_rng():
        torch.manual_seed(seed)  # the head is initialised on the CPU: the same head on any device
        head = torch.nn.Linear(net.config.d_model * (net.config.max_len if pooling == "concat" else 1),
                               n_classes)
    pad = net.config.pad_id
    if init_head == "probe":
        with torch.no_grad():
            chunk = corpus[train]
            # in one forward pass
            x = pool(model_features(net, chunk, batch_size=len(chunk)), chunk, pooling, position).double()
            mean, std = x.mean(0), x.std(0).clamp(min=1e-8)
            w = fit_logistic((x - mean) / std, labels[train], n_classes, head_l2)
            head.weight.copy_((w[:-1] / std[:, None]).T)
            head.bias.copy_(w[-1] - (mean / std) @ w[:-1])
    head = head.to(device)
    labels = labels.to(device)
    params = list(net.parameters()) + list(head.parameters())
    optimizer = torch.optim.AdamW(params, lr=lr)

    def logits(index: Tensor) -> Tensor:
        chunk = corpus[index.cpu()]
        tokens = torch.where(chunk.mask, chunk.tokens, pad).to(device)
        return head(pool(net.features(tokens), chunk, pooling, position))

    for epoch in range(epochs):
        perm = train[torch.randperm(len(train), generator=generator)]
        for start in range(0, len(perm), batch_size):
            index = perm[start : start + batch_size]
            loss = F.cross_entropy(logits(index), labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    net.eval()
    with torch.no_grad():
        correct = sum(int((logits(test[s : s + 512]).argmax(1) == labels[test[s : s + 512]]).sum())
                      for s in range(0, len(test), 512))
    return correct / len(test)
