"""Flatness: Hessian-vector products; the Hessian, Fisher and gauge-invariant traces.

Everything here is about one objective, the *evaluation loss*

    L(theta) = sum_b (n_b / N) * loss_fn(model_theta, batch_b),      N = sum_b n_b,

where ``batches`` is a list of batches, ``n_b`` the leading dimension of batch ``b`` (its number of
examples: the first tensor of the batch) and ``loss_fn(model, batch) -> scalar`` the *mean* loss over
the batch's examples. With that convention L is the mean per-example loss over the whole evaluation
set, whatever the batch sizes (a last, shorter batch counts for what it holds). The derivatives are
taken with respect to every parameter with ``requires_grad`` (``trainable_parameters``), in the
order of ``model.named_parameters()``; buffers are held fixed.

Measurement conditions (``hessian_mode``): eval mode (no dropout), the explicit, twice-
differentiable attention path of a flatlib ``Transformer`` (fused SDPA is not twice differentiable),
the model's own dtype (float32 or float64; half precision is refused), uncompiled (a
``torch.compile`` or DDP wrapper is unwrapped). The model is never modified: derivatives are taken
through ``torch.func.functional_call`` with detached copies of the parameters, so no ``.grad`` is
touched and the global RNG is never used (probes and sampled labels come from private seeded
``torch.Generator`` s).

* ``hvp``: ``H v``, by double backward (``mode="reverse"``) or forward-over-reverse
  (``mode="forward"``, ``torch.func.jvp`` of ``torch.func.grad``). Note: on torch 2.13 CPU,
  ``torch.func.hessian`` / ``jacrev(jacrev(f))`` give a wrong, asymmetric Hessian for models with an
  affine LayerNorm, and so does ``jvp(jacrev(f))`` (what curvlinops 3.0.1 uses) for every second
  derivative involving the LayerNorm gain; both modes here agree with classic double backward and
  finite differences (tests/test_flatness.py).
* ``dense_hessian``: the whole Hessian, row by row (small models: the reference of the others).
* ``hessian_trace``: Hutchinson, ``Tr H = E_v[v^T H v]`` with Rademacher ``v``, a fixed number of
  probes, returning a ``TraceEstimate`` (mean, standard error over probes, per-probe samples).
* ``fisher_trace``: the paper's estimator ``E_x E_{y ~ q_theta(.|x)} ||grad_theta log q_theta(y|x)||^2``
  with labels sampled from the model; at a global minimum (``q_theta = p``) it equals ``Tr H`` of
  the expected loss ``E_x E_{y ~ p}[-log q_theta(y|x)]``.
* ``fisher_diagonal`` and ``invariant_trace``: the exact Fisher diagonal, and the trace with the
  LayerNorm gauge fixed.
* MLM helpers for flatlib's single-mask objective: ``mlm_batches``, ``mlm_loss_fn``, ``mlm_logits_fn``
  (defined in ``flatlib.measurement.mlm``, re-exported here).

Vectors: a vector of parameter space (``hvp``'s ``v`` and its result, the probes of
``rademacher_probes``) is one flat 1-D tensor of length ``P``, the trainable parameters flattened and
concatenated in ``trainable_parameters`` order: the coordinates of ``dense_hessian``'s ``[P, P]`` and of
``flatlib.theory.FlatModel``. Inside, the kernels work on lists of per-parameter tensors (autograd's
form); ``_unflatten`` / ``_flatten`` convert at the public boundary and nowhere else. (``fisher_diagonal``
returns its diagonal as per-parameter tensors keyed by name: it is computed for a chosen subset of
the parameters and read by name, not a vector the Hessian acts on.)

Every estimate carries a ``description`` of its scale conventions (which loss, reduction, data,
how many probes) and prints it with the number.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, jvp, vmap
from torch.utils._pytree import tree_flatten, tree_map

from flatlib.checks import check_int
from flatlib.measurement.mlm import mlm_batches, mlm_logits_fn, mlm_loss_fn  # noqa: F401 - re-exported (README, docs)
from flatlib.training.model import explicit_attention, gauge_pairs

LossFn = Callable[[nn.Module, Any], Tensor]  # (model, batch) -> scalar, mean over the batch
LogitsFn = Callable[[nn.Module, Any], Tensor]  # (model, batch) -> [m, C] logits, one row per example

MODES = ("reverse", "forward")


# ---------------------------------------------------------------------------- results
@dataclass(frozen=True)
class TraceEstimate:
    """A trace estimate: ``mean`` +- ``stderr`` (standard error of the mean of ``samples``).

    ``samples``: float64, ``[n_probes]`` for Hutchinson (one ``v^T H v`` per probe, the evaluation
    set fixed), ``[N]`` for the Fisher trace (one value per example). ``n_probes``: Rademacher
    probes (Hutchinson) or labels per example (Fisher: sampled ones, or all C classes when exact).
    ``description``: the scale conventions, printed with the number.
    """

    mean: float
    stderr: float
    samples: Tensor
    n_probes: int
    description: str

    def __str__(self) -> str:
        return f"{self.mean:.4g} ± {self.stderr:.2g}  ({self.description})"


# ---------------------------------------------------------------------------- set-up
@contextlib.contextmanager
def hessian_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode for every submodule of ``model``, restored module by module on exit (also on an
    exception), and inside the block the explicit (twice-differentiable) attention path
    (``flatlib.training.model.explicit_attention``: every flatlib attention layer, whichever model holds
    it)."""
    modules = list(model.modules())
    training = [m.training for m in modules]
    try:
        model.eval()
        with explicit_attention():
            yield model
    finally:
        for m, flag in zip(modules, training):
            m.training = flag  # not m.train(flag), which would recurse into children


def trainable_parameters(model: nn.Module) -> dict[str, Tensor]:
    """``{name: parameter}`` for the parameters with ``requires_grad``, in ``named_parameters``
    order (shared parameters once): the coordinates of every Hessian here."""
    return {name: p for name, p in _unwrap(model).named_parameters() if p.requires_grad}


def _unwrap(model: nn.Module) -> nn.Module:
    model = getattr(model, "_orig_mod", model)  # torch.compile's OptimizedModule
    if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        model = model.module
    return model


def _parameters(model: nn.Module, only: Sequence[str] | None = None) -> tuple[list[str], list[Tensor]]:
    """Names and detached copies (sharing storage) of the trainable parameters (those named in
    ``only``, if given, in the model's order), dtype-checked."""
    params = trainable_parameters(model)
    if only is not None:
        unknown = sorted(set(only) - set(params))
        if unknown:
            raise ValueError(f"parameters: {unknown} are not trainable parameters of the model")
        params = {name: p for name, p in params.items() if name in set(only)}
    if not params:
        raise ValueError("model: has no parameter with requires_grad" if only is None
                         else "parameters: expected at least one parameter name")
    for name, p in params.items():
        if p.dtype not in (torch.float32, torch.float64):
            raise ValueError(f"model: parameter {name} has dtype {p.dtype}; curvature is measured in "
                             "float32 or float64 (convert with model.float())")
    return list(params), [p.detach() for p in params.values()]


def _check_batches(batches: Sequence[Any]) -> list[Any]:
    batches = list(batches)
    if not batches:
        raise ValueError("batches: expected a non-empty list of batches")
    return batches


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"mode: expected 'reverse' or 'forward', got {mode!r}")


def _batch_size(batch: Any) -> int:
    """Number of examples of a batch: the leading dimension of its first tensor."""
    leaves = [t for t in tree_flatten(batch)[0] if isinstance(t, Tensor)]
    if not leaves or leaves[0].dim() == 0:
        raise ValueError("batches: each batch must be a tensor or a tuple/list/dict of tensors "
                         "whose leading dimension is the example")
    return leaves[0].shape[0]


def _weights(batches: list[Any]) -> tuple[list[float], int]:
    sizes = [_batch_size(b) for b in batches]
    total = sum(sizes)
    if total == 0:
        raise ValueError("batches: all batches are empty")
    return [n / total for n in sizes], total


class _Bound(nn.Module):
    """``fn(model, batch)`` as a module, so that ``functional_call`` can swap the model's parameters
    while ``fn`` sees an ordinary module (it may call any method of it, not only ``forward``)."""

    def __init__(self, model: nn.Module, fn: Callable[[nn.Module, Any], Tensor]) -> None:
        super().__init__()
        self.model = model
        self.fn = fn

    def forward(self, batch: Any) -> Tensor:
        return self.fn(self.model, batch)


def _functional(model: nn.Module, fn: Callable, names: list[str]) -> Callable[[Sequence[Tensor], Any], Any]:
    """``call(params, batch) = fn(model with its trainable parameters replaced by params, batch)``."""
    bound = _Bound(model, fn)
    keys = [f"model.{name}" for name in names]

    def call(params: Sequence[Tensor], batch: Any) -> Tensor:
        return functional_call(bound, dict(zip(keys, params)), (batch,))

    return call


class _Setup(NamedTuple):
    batches: list[Any]  # checked, non-empty
    model: nn.Module  # unwrapped
    names: list[str]  # the trainable parameters differentiated (in model order)
    params: list[Tensor]  # their detached copies
    weights: list[float]  # n_b / N per batch
    total: int  # N
    call: Callable  # fn(model with params swapped in, batch) = call(params, batch)


def _setup(model: nn.Module, fn: Callable, batches: Sequence[Any],
           parameters: Sequence[str] | None = None) -> _Setup:
    """What every estimator starts from (see ``_Setup``); ``parameters``: only those (default: all)."""
    batches = _check_batches(batches)
    model = _unwrap(model)
    names, params = _parameters(model, parameters)
    weights, total = _weights(batches)
    return _Setup(batches, model, names, params, weights, total, _functional(model, fn, names))


def _scalar_loss(call: Callable, params: Sequence[Tensor], batch: Any) -> Tensor:
    loss = call(params, batch)
    if not isinstance(loss, Tensor) or loss.dim() != 0:
        raise ValueError("loss_fn: must return a scalar tensor (the mean loss over the batch)")
    return loss


def _unflatten(v: Tensor, params: list[Tensor]) -> list[Tensor]:
    """A flat parameter-space vector ``[P]`` (see the module doc) -> per-parameter tensors shaped
    like ``params`` (views), in their device and dtype."""
    n = sum(p.numel() for p in params)
    if not isinstance(v, Tensor) or v.shape != (n,):
        shape = tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__
        raise ValueError(f"v: expected a flat tensor of shape ({n},) (the trainable parameters flattened "
                         f"in trainable_parameters order), got {shape}")
    return [t.view(p.shape).to(device=p.device, dtype=p.dtype)
            for t, p in zip(v.split([p.numel() for p in params]), params)]


def _flatten(tensors: Sequence[Tensor]) -> Tensor:
    """Per-parameter tensors -> the flat ``[P]`` vector (the inverse of ``_unflatten``)."""
    return torch.cat([t.reshape(-1) for t in tensors])


def _dot(a: Sequence[Tensor], b: Sequence[Tensor]) -> float:
    """sum_i <a_i, b_i>, accumulated in float64."""
    return float(sum(torch.sum(x * y, dtype=torch.float64) for x, y in zip(a, b)))


# ---------------------------------------------------------------------------- HVP kernels
def _gradient_graph(call: Callable, leaves: list[Tensor], batch: Any) -> tuple[Tensor, ...]:
    """grad of the batch loss w.r.t. ``leaves``, with its graph (create_graph), to be reused by
    every probe of this batch. Parameters the loss does not depend on get zeros."""
    loss = _scalar_loss(call, leaves, batch)
    return torch.autograd.grad(loss, leaves, create_graph=True, allow_unused=True, materialize_grads=True)


def _hvp_from_graph(grads: Sequence[Tensor], leaves: list[Tensor], v: Sequence[Tensor],
                    retain: bool) -> list[Tensor]:
    """H v = grad_theta <grad L, v>: one backward pass through the kept gradient graph."""
    terms = [(g * u).sum() for g, u in zip(grads, v) if g.requires_grad]
    if not terms:  # the loss is linear in the parameters
        return [torch.zeros_like(p) for p in leaves]
    return list(torch.autograd.grad(torch.stack(terms).sum(), leaves, retain_graph=retain,
                                    allow_unused=True, materialize_grads=True))


def _hvp_forward(call: Callable, params: list[Tensor], batch: Any, v: Sequence[Tensor]) -> list[Tensor]:
    """H v = d/dt grad L(theta + t v) at t = 0: forward-mode AD through the reverse-mode gradient.
    ``grad``, not ``jacrev``: on torch 2.13 ``jvp(jacrev(f))`` is wrong for an affine LayerNorm."""
    def gradient(ps: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        return grad(lambda q: _scalar_loss(call, q, batch))(ps)

    _, tangent = jvp(gradient, (tuple(params),), (tuple(v),))
    return list(tangent)


def _batch_hvp(call: Callable, params: list[Tensor], batch: Any, v: Sequence[Tensor],
               mode: str) -> list[Tensor]:
    if mode == "forward":
        return _hvp_forward(call, params, batch, v)
    leaves = [p.detach().requires_grad_() for p in params]
    return _hvp_from_graph(_gradient_graph(call, leaves, batch), leaves, v, retain=False)


def hvp(model: nn.Module, loss_fn: LossFn, batches: Sequence[Any], v: Tensor,
        mode: str = "reverse") -> Tensor:
    """The Hessian-vector product ``H v`` of ``L(theta) = sum_b (n_b / N) loss_fn(model, batch_b)``.

    Args:
        model: evaluated under ``hessian_mode`` (eval, explicit attention), in its own dtype.
        loss_fn: ``(model, batch) -> scalar``, the mean loss over the batch's examples.
        batches: non-empty list of batches; ``n_b`` is the leading dimension of a batch's first tensor.
        v: ``[P]``, a flat parameter-space vector (see the module doc); the result is one too.
        mode: ``"reverse"`` (double backward: one forward, one backward with ``create_graph``, one
            backward of ``<grad, v>``) or ``"forward"`` (``jvp`` of ``grad``).

    Batches are processed one at a time; only one batch's graph is alive at any moment.
    """
    _check_mode(mode)
    batches, model, _, params, weights, _, call = _setup(model, loss_fn, batches)
    vectors = _unflatten(v, params)
    total = [torch.zeros_like(p) for p in params]
    with hessian_mode(model), torch.enable_grad():
        for batch, weight in zip(batches, weights):
            for t, h in zip(total, _batch_hvp(call, params, batch, vectors, mode)):
                t.add_(h, alpha=weight)
    return _flatten(total)


def dense_hessian(model: nn.Module, loss_fn: LossFn, batches: Sequence[Any]) -> Tensor:
    """``[P, P]`` the whole Hessian of ``L(theta) = sum_b (n_b / N) loss_fn(model, batch_b)``, by classic
    double backward, one row at a time: the gradient with its graph, then ``d(grad L)_i / d theta`` for
    every ``i`` (``P`` backward passes, so for small models only: references and exact checks).

    Coordinates: the trainable parameters flattened and concatenated in ``trainable_parameters``
    order; under ``hessian_mode``; the model is not modified (``functional_call`` on detached copies).
    Not symmetrised: its asymmetry is the rounding, which a caller can check. The reference of
    every Hessian in flatlib (tests compare ``hvp``, ``hessian_trace``, the invariant trace and
    ``flatlib.theory.exact_hessian`` with it). Never ``torch.func.hessian``: on torch 2.13 CPU it is
    wrong for an affine LayerNorm (see above).
    """
    batches, model, _, params, weights, _, call = _setup(model, loss_fn, batches)
    with hessian_mode(model), torch.enable_grad():
        leaves = [p.detach().requires_grad_() for p in params]
        loss = sum(weight * _scalar_loss(call, leaves, batch) for batch, weight in zip(batches, weights))
        grads = torch.autograd.grad(loss, leaves, create_graph=True, allow_unused=True,
                                    materialize_grads=True)
        flat = _flatten(grads)
        if not flat.requires_grad:  # the loss is linear in the parameters
            return torch.zeros(flat.numel(), flat.numel(), dtype=flat.dtype, device=flat.device)
        rows = [_flatten(torch.autograd.grad(flat[i], leaves, retain_graph=True, allow_unused=True,
                                             materialize_grads=True))
                for i in range(flat.numel())]
    return torch.stack(rows)


# ---------------------------------------------------------------------------- Hutchinson
def _generator(seed: int) -> torch.Generator:
    # always a CPU generator: the same probes on every device (a CUDA generator draws other numbers,
    # and cached traces do not record the device they were measured on)
    return torch.Generator().manual_seed(int(seed))


def _rademacher(like: Sequence[Tensor], generator: torch.Generator) -> list[Tensor]:
    # integers first, then the dtype: the same signs for a float32 and a float64 model
    return [torch.randint(0, 2, p.shape, generator=generator).to(device=p.device, dtype=p.dtype)
            .mul_(2).sub_(1) for p in like]


def rademacher_probes(model: nn.Module, n_probes: int, seed: int) -> Iterator[Tensor]:
    """The probes ``hessian_trace(..., n_probes, seed)`` uses, in order: flat ``[P]`` +-1 vectors
    (see the module doc), from ``torch.Generator().manual_seed(seed)`` (on the CPU, then moved to
    the parameters' device: the same probes on any device)."""
    _, params = _parameters(_unwrap(model))
    generator = _generator(seed)
    for _ in range(n_probes):
        yield _flatten(_rademacher(params, generator))


def _batch_quadratic_forms(call: Callable, params: list[Tensor], batch: Any, n_probes: int,
                           seed: int, mode: str) -> Tensor:
    """``[v_k^T H_b v_k for k < n_probes]`` for one batch, float64.

    Reverse mode builds the batch's gradient graph once and backpropagates ``<grad, v_k>`` through
    it for every probe (retain_graph), releasing it with the last probe. It is a local of this
    function, so it is freed before the next batch's graph is built: peak memory is one batch's
    double-backward graph, whatever the number of batches and probes. The probes are regenerated
    from ``seed`` for every batch (cheap) rather than stored (``n_probes`` parameter-sized vectors).
    """
    generator = _generator(seed)
    out = torch.empty(n_probes, dtype=torch.float64)
    if mode == "reverse":
        leaves = [p.detach().requires_grad_() for p in params]
        grads = _gradient_graph(call, leaves, batch)
    for k in range(n_probes):
        v = _rademacher(params, generator)
        if mode == "reverse":
            hv = _hvp_from_graph(grads, leaves, v, retain=k < n_probes - 1)
        else:
            hv = _hvp_forward(call, params, batch, v)
        out[k] = _dot(v, hv)
    return out


def _describe(fn: Callable, batch: Any, fallback: str) -> str:
    """A loss's scale convention: ``fn.describe(batch)`` or ``fn.description`` if the function has
    one (the MLM helpers do), else ``fallback``."""
    describe = getattr(fn, "describe", None)
    if callable(describe):
        return describe(batch)
    return getattr(fn, "description", None) or fallback


def hessian_trace(model: nn.Module, loss_fn: LossFn, batches: Sequence[Any], n_probes: int, seed: int,
                  mode: str = "reverse", data: str = "examples",
                  parameters: Sequence[str] | None = None) -> TraceEstimate:
    """Hutchinson's estimate of ``Tr H``, ``H`` the Hessian of
    ``L(theta) = sum_b (n_b / N) loss_fn(model, batch_b)`` (see the module docstring).

    ``samples[k] = v_k^T H v_k = sum_b (n_b / N) v_k^T H_b v_k`` with ``v_k`` the k-th Rademacher
    vector of ``rademacher_probes(model, n_probes, seed)`` (the same probe for every batch);
    ``mean`` is their average, ``stderr`` their standard deviation / sqrt(n_probes): the noise of
    the probes on this fixed evaluation set (the data's own sampling noise is not in it; use one
    fixed, large evaluation set for every model compared).

    Cost per batch: ``mode="reverse"`` one gradient with graph, then one backward per probe (about
    2x a gradient each); ``mode="forward"`` one ``jvp(grad)`` per probe (about 3x a gradient).
    Memory: one batch's graph at a time (see ``_batch_quadratic_forms``). Probes run one after
    the other: ``vmap`` over probes gave no speed-up on CPU and multiplies memory (docs/lessons.md).

    Args:
        n_probes: number of Rademacher probes, fixed (>= 2, for a standard error).
        seed: seeds a private ``torch.Generator``; the global RNG is not touched.
        data: what the examples are, for the description (e.g. ``"validation pairs"``).
        parameters: names of the trainable parameters whose diagonal block ``H_PP`` is traced
            (``Tr H_PP``, the others held fixed); default every trainable parameter.
    """
    check_int("n_probes", n_probes, 2)
    _check_mode(mode)
    batches, model, names, params, weights, total, call = _setup(model, loss_fn, batches, parameters)
    samples = torch.zeros(n_probes, dtype=torch.float64)
    with hessian_mode(model), torch.enable_grad():
        for batch, weight in zip(batches, weights):
            samples += weight * _batch_quadratic_forms(call, params, batch, n_probes, seed, mode)
    loss = _describe(loss_fn, batches[0], f"{getattr(loss_fn, '__name__', 'loss_fn')} (mean over examples)")
    block = "" if parameters is None else f" (the block of {len(names)} of the parameter tensors)"
    description = (f"Tr H{block} of {loss} on {total} {data} in {len(batches)} batches, {n_probes} "
                   f"Rademacher probes (seed {seed}, {mode}-mode HVP); ± is the standard error over probes")
    return TraceEstimate(float(samples.mean()), float(samples.std() / math.sqrt(n_probes)), samples,
                         n_probes, description)


# ---------------------------------------------------------------------------- Fisher
def _log_prob(call: Callable) -> Callable[[tuple[Tensor, ...], Any, Tensor], Tensor]:
    """``log q_theta(y | x)`` of one example, the label ``y`` given as a one-hot row (no data-
    dependent indexing, so that it runs under ``vmap``)."""
    def log_prob(ps: tuple[Tensor, ...], example: Any, onehot: Tensor) -> Tensor:
        logits = call(ps, tree_map(lambda t: t.unsqueeze(0), example))  # a batch of one
        return (torch.log_softmax(logits, dim=-1)[0] * onehot).sum()
    return log_prob


def fisher_trace(model: nn.Module, logits_fn: LogitsFn, batches: Sequence[Any], seed: int,
                 n_samples: int | None = 1, chunk_size: int | None = 64,
                 data: str = "examples") -> TraceEstimate:
    """The paper's flatness estimator: the trace of the Fisher information of the model's own
    predictive distribution,

        Tr F = (1/N) sum_i E_{y ~ q_theta(.|x_i)} || grad_theta log q_theta(y | x_i) ||^2,
        q_theta(.|x_i) = softmax(logits_fn(model, batch)[i]),

    estimated with ``n_samples`` labels per example sampled from ``q_theta`` (or, with
    ``n_samples=None``, the exact expectation: sum over all C classes weighted by ``q``, C times
    the cost). Per-example gradients by ``vmap`` over the examples of ``grad`` of
    ``functional_call``: ``logits_fn`` is called on single examples (a batch of one, every tensor of
    the batch sliced alike), so it must treat examples independently (eval mode guarantees that for
    flatlib's Transformer).

    At a global minimum of the expected loss ``L(theta) = (1/N) sum_i E_{y ~ p(.|x_i)}[-log
    q_theta(y|x_i)]``, i.e. ``q_theta = p``, ``Tr F = Tr H(L)`` exactly (``H = F - sum_y p_y
    grad^2 q_y / q_y`` and ``sum_y grad^2 q_y = 0``); elsewhere the two differ.

    ``samples`` are the per-example values (averaged over their labels), ``stderr`` is over examples:
    it treats the examples as a sample of contexts and includes the label-sampling noise.

    Args:
        logits_fn: ``(model, batch) -> [m, C]`` logits, one row per example (``mlm_logits_fn`` for
            flatlib MLM batches).
        batches: non-empty list of batches (tensor or tuple/list/dict of tensors, leading dim m).
        seed: seeds the private generator the labels are drawn from (batches in order).
        n_samples: labels per example (>= 1), or None for the exact expectation over classes.
        chunk_size: examples per ``vmap`` chunk (None: the whole batch at once); bounds the memory of
            the per-example gradients (chunk_size x n_params). 64 was the fastest on a 2x64
            Transformer on CPU (None: 1.8x slower at 512 examples).
    """
    if n_samples is not None:
        check_int("n_samples", n_samples, 1)
    batches, model, _, params, _, total, call = _setup(model, logits_fn, batches)
    generator = _generator(seed)

    def squared_norm(ps: tuple[Tensor, ...], example: Any, onehot: Tensor) -> Tensor:
        g = grad(_log_prob(call))(ps, example, onehot)
        return sum(torch.sum(t * t, dtype=torch.float64) for t in g)

    per_example = vmap(squared_norm, in_dims=(None, 0, 0), chunk_size=chunk_size)
    values = []
    with hessian_mode(model):
        for batch in batches:
            with torch.no_grad():
                logits = call(params, batch)
            m = _batch_size(batch)
            if logits.dim() != 2 or logits.shape[0] != m:
                raise ValueError(f"logits_fn: expected [m, C] logits with m = {m}, got {tuple(logits.shape)}")
            q = torch.softmax(logits.double(), dim=-1)
            n_classes = q.shape[1]
            eye = torch.eye(n_classes, dtype=logits.dtype, device=logits.device)
            value = torch.zeros(m, dtype=torch.float64, device=logits.device)
            if n_samples is None:
                for c in range(n_classes):
                    value += q[:, c] * per_example(tuple(params), batch, eye[c].expand(m, -1))
            else:
                labels = torch.multinomial(q.cpu(), n_samples, replacement=True,
                                           generator=generator).to(q.device)  # [m, S]
                for s in range(n_samples):
                    value += per_example(tuple(params), batch, eye[labels[:, s]]) / n_samples
            values.append(value.cpu())
    samples = torch.cat(values)
    what = _describe(logits_fn, batches[0], f"{getattr(logits_fn, '__name__', 'logits_fn')} "
                                             "(mean over examples)")
    draws = (f"exact expectation over the {n_classes} classes" if n_samples is None
              else f"{n_samples} label{'s' if n_samples > 1 else ''} sampled from the model per example "
                  f"(seed {seed})")
    description = (f"Fisher trace E||grad log q(y|x)||^2, y ~ model, of {what} on {total} {data}, {draws}"
                   "; ± is the standard error over examples")
    return TraceEstimate(float(samples.mean()), float(samples.std() / math.sqrt(total)), samples,
                         n_classes if n_samples is None else n_samples, description)


# ---------------------------------------------------------------------------- the gauge-invariant trace
def fisher_diagonal(model: nn.Module, logits_fn: LogitsFn, batches: Sequence[Any],
                    parameters: Sequence[str] | None = None, chunk_size: int | None = 64,
                    method: str = "auto") -> dict[str, Tensor]:
    """The exact diagonal of the Fisher information of the model's predictive distribution,

        diag F = (1/N) sum_i sum_y q_theta(y|x_i) (grad_theta log q_theta(y|x_i))^2   (elementwise),

    summed over all C classes (no sampling), for the parameters named in ``parameters`` (default:
    every trainable one); float64 tensors keyed by name. For a softmax cross-entropy ``F`` is the
    generalized Gauss-Newton matrix ``(1/N) sum_i J_i^T (diag q_i - q_i q_i^T) J_i`` (``J_i`` the
    Jacobian of the logits), so ``diag F = diag H`` exactly wherever the logits are *linear* in a
    parameter (the head, and the final LayerNorm's gain and bias, given everything before them), and
    for every parameter at a global minimum of the expected loss (``q_theta = p``: the residual term
    ``sum_y (q_y - p_y) grad^2 z_y`` of ``H`` vanishes).

    Two ways to get the per-example gradients ``g_iy = grad_theta log q_theta(y|x_i) = J_i^T (e_y - q_i)``,
    the same numbers up to float rounding (tests/test_invariant_trace.py):

    * ``method="vmap"``: ``vmap`` over the examples (in chunks of ``chunk_size``) of ``grad`` of the
      log-probability of one example, once per class: any parameter, any model that treats examples
      independently (like ``fisher_trace(n_samples=None)``).
    * ``method="layers"``: only for weights and biases of ``nn.Linear``, HuggingFace ``Conv1D`` (GPT-2's
      layout, weight ``[in, out]``: the per-example gradient is ``sum_t u_t delta_t^T``) and ``nn.LayerNorm``
      modules (each called once per forward, the example as the leading dimension of its input), which
      covers ``invariant_trace``'s gauge pairs. One forward pass records each module's input ``u``
      (``[n, T, d_in]``: T positions); for each class y one ordinary batched backward gives
      ``delta = d log q(y|x_i) / d(module output)`` for every example at once (examples are
      independent), and the per-example gradients are closed forms: a linear map's weight
      ``sum_t delta_t u_t^T``, its bias ``sum_t delta_t``; a LayerNorm's gain ``sum_t delta_t *
      n_t`` (``n`` the normalised input) and bias ``sum_t delta_t``. C backward passes of the batch
      instead of C per-example ones: 3-5x faster on the cpu models (docs/lessons.md, "Sizing a profile").
    * ``"auto"`` (default): ``"layers"`` where it applies, else ``"vmap"``. It applies to exactly those
      classes (not subclasses), each parameter held by one module; a module called twice or never, an
      output changed in place, or per-example gradients of a batch that do not sum to autograd's
      gradient of the batch (a parameter used outside its module) send it to ``"vmap"`` (and make
      ``"layers"`` a ValueError).
    """
    if method not in ("auto", "layers", "vmap"):
        raise ValueError(f"method: expected 'auto', 'layers' or 'vmap', got {method!r}")
    setup = _setup(model, logits_fn, batches, parameters)
    layers = _layer_parameters(setup.model, setup.names)
    if method == "layers" and layers is None:
        raise ValueError("method: 'layers' needs every parameter to be the weight or bias of an nn.Linear, "
                         "a HuggingFace Conv1D or a 1-D nn.LayerNorm (exactly those classes) held by no "
                         "other module; use 'vmap' (or 'auto')")
    if method != "vmap" and layers is not None:
        diagonal = _fisher_diagonal_layers(setup, layers)
        if diagonal is not None:
            return diagonal
        if method == "layers":
            raise ValueError("method: 'layers' needs each module called once per forward (a positional input "
                             "leading with the example, its output not changed in place) and its parameters "
                             "used nowhere else; use 'vmap'")
    return _fisher_diagonal_vmap(setup, chunk_size)


def _fisher_diagonal_vmap(setup: _Setup, chunk_size: int | None) -> dict[str, Tensor]:
    batches, model, names, params, _, total, call = setup

    def squared_gradient(ps: tuple[Tensor, ...], example: Any, onehot: Tensor) -> tuple[Tensor, ...]:
        g = grad(_log_prob(call))(ps, example, onehot)
        return tuple(t * t for t in g)

    per_example = vmap(squared_gradient, in_dims=(None, 0, 0), chunk_size=chunk_size)
    diagonal = [torch.zeros(p.shape, dtype=torch.float64, device=p.device) for p in params]
    with hessian_mode(model):
        for batch in batches:
            with torch.no_grad():
                logits = call(params, batch)
            q = torch.softmax(logits.double(), dim=-1)  # [m, C]
            eye = torch.eye(q.shape[1], dtype=logits.dtype, device=logits.device)
            for c in range(q.shape[1]):
                squares = per_example(tuple(params), batch, eye[c].expand(len(q), -1))
                for d, s in zip(diagonal, squares):
                    d += torch.tensordot(q[:, c], s.detach().double(), dims=1)
    return {name: d / total for name, d in zip(names, diagonal)}


def _is_conv1d(module: Any) -> bool:
    """Whether ``module`` is HuggingFace's ``Conv1D`` (GPT-2's linear maps: ``x @ weight + bias``, weight
    ``[in, out]``), recognised by its class without importing ``transformers``."""
    kind = type(module)
    return kind.__name__ == "Conv1D" and kind.__module__.startswith("transformers.")


def _layer_parameters(model: nn.Module, names: Sequence[str]) -> dict[str, list[tuple[int, str]]] | None:
    """``{module name: [(index in names, "weight" | "bias")]}`` when every name is the weight or bias
    of an ``nn.Linear``, a HuggingFace ``Conv1D`` or a LayerNorm over the last dimension (those classes
    exactly: a subclass may compute something else) and no other module holds the same tensor, else
    None."""
    modules = dict(model.named_modules())
    owners: dict[int, int] = {}
    for module in modules.values():
        for p in module.parameters(recurse=False):
            owners[id(p)] = owners.get(id(p), 0) + 1
    out: dict[str, list[tuple[int, str]]] = {}
    for index, name in enumerate(names):
        module_name, _, attr = name.rpartition(".")
        module = modules.get(module_name)
        is_layer = (type(module) is nn.Linear or _is_conv1d(module)
                    or (type(module) is nn.LayerNorm and len(module.normalized_shape) == 1))
        if not is_layer or attr not in ("weight", "bias") or owners.get(id(getattr(module, attr)), 0) != 1:
            return None
        out.setdefault(module_name, []).append((index, attr))
    return out


def _fisher_diagonal_layers(setup: _Setup,
                            layers: dict[str, list[tuple[int, str]]]) -> dict[str, Tensor] | None:
    """``fisher_diagonal(method="layers")`` (see there), or None where its closed forms may not hold:
    a module called twice or never, called without a positional input, with an input that does not
    lead with the example, or whose recorded output was modified in place; and, as a catch-all (a
    parameter also used outside its module, a subclass with its own ``forward``), whenever the
    per-example gradients of a batch's first class do not sum to autograd's gradient of the batch."""
    batches, model, names, params, _, total, call = setup
    modules = dict(model.named_modules())
    seen: dict[str, tuple[Tensor, Tensor, int]] = {}
    invalid: list[str] = []

    def recorder(name: str) -> Callable:
        def hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
            if name in seen or not inputs:
                invalid.append(name)
                return
            seen[name] = (inputs[0].detach(), output, output._version)
        return hook

    diagonal = [torch.zeros(p.shape, dtype=torch.float64, device=p.device) for p in params]
    handles = []
    try:
        handles = [modules[name].register_forward_hook(recorder(name)) for name in layers]
        with hessian_mode(model), torch.enable_grad():
            # leaves that share the parameters' storage: module outputs get a graph, no .grad is touched
            leaves = [p.detach().requires_grad_() for p in params]
            for batch in batches:
                seen.clear()
                logits = call(leaves, batch)  # [m, C]
                m = logits.shape[0]
                if (invalid or set(seen) != set(layers)
                        or any(u.dim() < 2 or u.shape[0] != m for u, _, _ in seen.values())
                        or any(out._version != version for _, out, version in seen.values())):
                    return None
                q = torch.softmax(logits.detach().double(), dim=-1)
                q32 = torch.softmax(logits.detach(), dim=-1)
                outputs = [seen[name][1] for name in layers]
                normed = {name: F.layer_norm(seen[name][0], modules[name].normalized_shape, None, None,
                                             modules[name].eps).reshape(m, -1, seen[name][0].shape[-1])
                          for name in layers if isinstance(modules[name], nn.LayerNorm)}
                for c in range(q.shape[1]):
                    # sqrt(q_c) (e_c - q): the square of its gradient is q_c (grad log q(c|x))^2
                    direction = -q32
                    direction[:, c] += 1
                    direction *= q[:, c].sqrt().to(direction.dtype)[:, None]
                    deltas = torch.autograd.grad(logits, outputs, grad_outputs=direction, retain_graph=True,
                                                 allow_unused=True)
                    summed: list[Tensor | None] = [None] * len(params)
                    for (name, which), delta in zip(layers.items(), deltas):
                        if delta is None:  # the module does not reach the logits
                            continue
                        u = seen[name][0].reshape(m, -1, seen[name][0].shape[-1])  # [m, T, d_in]
                        delta = delta.reshape(m, -1, delta.shape[-1])  # [m, T, d_out]
                        for index, attr in which:
                            if attr == "bias":
                                g = delta.sum(1)
                            elif isinstance(modules[name], nn.Linear):
                                g = torch.einsum("mto,mti->moi", delta, u)
                            elif _is_conv1d(modules[name]):  # weight [in, out]
                                g = torch.einsum("mti,mto->mio", u, delta)
                            else:
                                g = (delta * normed[name]).sum(1)
                            # summed in the model's dtype (torch's cascade sum: ~1e-7 relative in float32;
                            # dtype=float64 here costs 2.7x), then accumulated in float64
                            diagonal[index] += (g * g).sum(0).double()
                            if c == 0:
                                summed[index] = g.sum(0)
                    if c == 0 and not _sums_to_autograd(summed, logits, leaves, direction):
                        return None
    finally:
        for handle in handles:
            handle.remove()
    return {name: d / total for name, d in zip(names, diagonal)}


def _sums_to_autograd(summed: list[Tensor | None], logits: Tensor, leaves: list[Tensor],
                      direction: Tensor) -> bool:
    """Whether per-example gradients summed over the batch (None: the parameter got none) equal
    autograd's gradient of ``(logits * direction).sum()`` (float rounding allowed)."""
    full = torch.autograd.grad(logits, leaves, grad_outputs=direction, retain_graph=True, allow_unused=True)
    for leaf, mine, theirs in zip(leaves, summed, full):
        theirs = torch.zeros_like(leaf) if theirs is None else theirs
        mine = torch.zeros_like(leaf) if mine is None else mine
        scale = float(theirs.abs().max()) if theirs.numel() else 0.0
        if mine.shape != theirs.shape or not torch.allclose(mine, theirs, rtol=1e-3,
                                                            atol=1e-5 * scale + 1e-30):
            return False
    return True


@dataclass(frozen=True)
class InvariantTrace(TraceEstimate):
    """``invariant_trace``'s result: ``mean`` ± ``stderr`` is the smallest Hessian trace over the
    LayerNorm gauge (``samples`` are the body's Hutchinson samples plus the exact gauge minimum).

    ``body``: Hutchinson's ``Tr H`` of every parameter outside the gauge pairs (the gauge cannot
    change it). ``gauge``: per LayerNorm, ``{"norm": sum_i B_i, "reader": sum_i A_i, "min":
    sum_i 2 sqrt(A_i B_i)}``: the norm's and the reader's diagonal blocks as parameterized now, and
    their smallest value over the rescalings. ``raw_mean = body.mean + sum (norm + reader)``
    estimates ``Tr H`` itself in these coordinates. ``scales``: per LayerNorm, the ``c_i`` that
    attain the minimum (``rescale_norms(model, scales)`` is the model in its flattest gauge; NaN
    where ``A_i`` or ``B_i`` is 0, the infimum then being 0 and not attained).
    """

    body: TraceEstimate
    gauge: dict[str, dict[str, float]]
    raw_mean: float
    scales: dict[str, Tensor]


def invariant_trace(model: nn.Module, loss_fn: LossFn, logits_fn: LogitsFn, batches: Sequence[Any],
                    n_probes: int, seed: int, pairs: Sequence[tuple[str, str]] | None = None,
                    mode: str = "reverse", data: str = "examples") -> InvariantTrace:
    """The Hessian trace with the LayerNorm gauge fixed: the smallest ``Tr H`` over the model's
    function-preserving per-coordinate rescalings of each LayerNorm against its reader.

    The gauge (``flatlib.training.model.gauge_pairs``): for a LayerNorm with gain ``gamma``, bias ``beta``
    and reader ``W``, the map ``(gamma_i, beta_i, W[:, i]) -> (c_i gamma_i, c_i beta_i, W[:, i]/c_i)``
    (``c_i > 0``) changes neither the function nor a standardising probe. It is linear in the
    parameters, ``theta' = D theta``, so ``H' = D^-1 H D^-1`` and only the diagonal entries of the
    pair's parameters change:

        Tr H(c) = Tr H_body + sum_pairs sum_i (A_i c_i^2 + B_i / c_i^2),
        A_i = sum_o H[W_oi, W_oi],   B_i = H[gamma_i, gamma_i] + H[beta_i, beta_i],

    where the body is every other parameter (the readers' biases included). The pairs act on
    disjoint parameters, so each ``c_i`` is minimised on its own: ``c_i^2 = sqrt(B_i / A_i)`` and

        Tr_inv H = Tr H_body + sum_pairs sum_i 2 sqrt(A_i B_i).

    ``A_i B_i`` is invariant under the rescaling, and ``H_body`` does not move, so ``Tr_inv`` is
    the same number for every point of a gauge orbit (the raw trace can be made arbitrarily large
    along it: ``A_i c^2`` or ``B_i / c^2``). It is never above the raw trace (``2 sqrt(AB) <= A + B``).

    How each part is computed: ``Tr H_body`` by Hutchinson (``hessian_trace`` restricted to the
    body, ``n_probes`` probes from ``seed``: the only noise, and the ``stderr``); ``A_i``, ``B_i``
    exactly, from ``fisher_diagonal`` (C classes' per-example gradients). That diagonal *is*
    the Hessian's for the final pair (``ln_f -> head``: the logits are linear in the head and in
    ``ln_f``'s affine) at any point; for the inner pairs (``ln_1 -> qkv``, ``ln_2 -> fc``) it is
    the Gauss-Newton part, equal to the Hessian's at a global minimum of the expected loss, which
    is where the compared models are (within 0.01 nats; a model far from the optimum gets the
    Gauss-Newton diagonal for its inner pairs, and the docstring of ``fisher_diagonal`` says why).

    What it does not fix: attention's per-head scalings ``W_q -> c W_q, W_k -> W_k / c`` and
    ``W_v -> c W_v, W_o -> W_o / c`` (per coordinate of a head), the per-coordinate scaling of
    the MLP's hidden units is not a symmetry (GELU is not homogeneous), nor are the embeddings'
    (the residual stream feeds LayerNorms, which are invariant only to a common scale of all
    coordinates, and to the residual sum's other terms). The trace stays gauge-dependent along
    those; the LayerNorm gauge is the one that held ~85% of the raw trace of the cpu models
    (docs and issue 14).

    Not invariant under ``widen`` by a factor ``f`` (a change of architecture, not of gauge):
    the final pair's minimum is unchanged (each head column's ``A_i`` is tiled as it is, each
    ``B_i`` becomes ``B_i / f^2`` on f copies: ``sum 2 sqrt(AB)`` is the same); an inner pair's
    minimum is divided by ``sqrt(f)`` (a perturbation of one copy of ``gamma_i`` reaches the reader
    through ``W / f``, so ``B_i -> B_i / f^2``, while a column of the copied reader has f times the
    entries with ``1 / f^2`` of the curvature each, ``A_i -> A_i / f``); and the body's trace also
    counts curvature along directions in which the copies differ, which the narrow model does
    not have. Compare widened models with each other, as the paper does with the raw trace.

    Args:
        loss_fn: the mean loss over a batch (``mlm_loss_fn``; with soft targets for the expected
            loss), whose Hessian is traced.
        logits_fn: the logits of the same loss (``mlm_logits_fn``), for the exact diagonals.
        pairs: ``(norm, reader)`` module names; default ``gauge_pairs(model)`` for a flatlib
            Transformer.
    """
    check_int("n_probes", n_probes, 2)
    batches = _check_batches(batches)
    model = _unwrap(model)
    if pairs is None:
        pairs = gauge_pairs(model)
    groups = {norm: (f"{norm}.weight", f"{norm}.bias", f"{reader}.weight") for norm, reader in pairs}
    gauged = [name for names in groups.values() for name in names]
    if len(groups) != len(pairs) or len(set(gauged)) != len(gauged):
        raise ValueError("pairs: the pairs must act on disjoint parameters")
    body_names = [name for name in trainable_parameters(model) if name not in set(gauged)]
    diagonal = fisher_diagonal(model, logits_fn, batches, parameters=gauged)
    body = hessian_trace(model, loss_fn, batches, n_probes, seed, mode=mode, data=data, parameters=body_names)
    gauge, scales, minimum, raw = {}, {}, 0.0, body.mean
    for norm, (gain, bias, reader) in groups.items():
        b = diagonal[gain] + diagonal[bias]  # [d]
        a = diagonal[reader].sum(0)  # [d]: the reader's columns
        both = (a > 0) & (b > 0)
        scales[norm] = torch.where(both, (b / a.clamp_min(1e-300)) ** 0.25, torch.nan)
        gauge[norm] = {"norm": float(b.sum()), "reader": float(a.sum()),
                       "min": float((2 * (a * b).sqrt()).sum())}
        minimum += gauge[norm]["min"]
        raw += gauge[norm]["norm"] + gauge[norm]["reader"]
    description = (f"Tr H minimised over the LayerNorm gauge ({len(groups)} LayerNorm/reader pairs, exact "
                   f"diagonals) + {body.description.replace('Tr H', 'the body', 1)}")
    return InvariantTrace(body.mean + minimum, body.stderr, body.samples + minimum, n_probes, description,
                          body=body, gauge=gauge, raw_mean=raw, scales=scales)

