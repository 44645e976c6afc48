"""Exact symmetries of a model: per-coordinate positive rescalings that leave its function unchanged,
declared once, verified on the model before every use, and the Hessian trace minimised over all of them.

A *group* ``g`` of ``size`` coordinates acts on the parameters by ``c = exp(u_g)`` (``u_g`` a vector of
log-scales, one per coordinate): every *member* ``(parameter, axis, start, power)`` multiplies the
slice ``start + i`` along ``axis`` of that parameter by ``c_i ** power``. Examples, for a pre-LN block
with a fused ``qkv`` ``nn.Linear`` (weight ``[3d, d]``) and an output projection ``proj``:

* LayerNorm/reader: ``ln.weight`` and ``ln.bias`` (axis 0, power +1), ``qkv.weight`` (axis 1, power -1).
* Q/K per head coordinate: ``qkv.weight`` rows ``0..d-1`` and ``qkv.bias[0:d]`` (power +1), rows
  ``d..2d-1`` and ``qkv.bias[d:2d]`` (power -1).
* V/O per head coordinate: ``qkv.weight`` rows ``2d..3d-1`` and ``qkv.bias[2d:3d]`` (power +1),
  ``proj.weight`` columns (axis 1, power -1).

Groups may overlap on a parameter along *different* axes (a ``qkv`` weight entry is scaled by its
column's LayerNorm scale and its row's head scale); the map stays diagonal and linear in the parameters,
``theta' = D(u) theta`` with ``log D_p = sum_g power * u_g[i]`` over the groups touching entry ``p``
(``log D = M u``, ``M`` a sparse matrix of the powers).

One description, three uses:

* ``transformer_groups(model)``: flatlib's Transformer, built in; ``norm_reader_group``,
  ``query_key_group`` and ``value_output_group`` build the same groups for other models, with
  ``nn.Linear`` (weight ``[out, in]``) or HuggingFace ``Conv1D`` (weight ``[in, out]``) layouts.
* ``check_groups`` and ``verify_groups``: before any estimate, the description is checked against the
  model (parameters exist, are trainable, are not tied or shared, slices fit, no two groups scale the
  same entries along the same axis) and then against its function: random positive scales, logits
  compared on a batch. A failure is a ``SymmetryError`` naming the group, the logit change and what to do.
* ``full_gauge_trace``: the smallest Hessian trace over every declared rescaling at once.
  ``rescale(model, groups, log_scales)`` moves a model along them.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from flatlib.checks import check_int, check_seed
from flatlib.measurement.flatness import (
    LogitsFn,
    LossFn,
    TraceEstimate,
    _unwrap,
    fisher_diagonal,
    hessian_mode,
    hessian_trace,
    trainable_parameters,
)
from flatlib.training.model import Transformer

KINDS = ("norm/reader", "query/key", "value/output", "custom")


class SymmetryError(ValueError):
    """A declared symmetry group that is not one of this model (or cannot be used as declared)."""


@dataclass(frozen=True)
class Member:
    """One parameter tensor's part in a group: coordinate ``i`` of the group multiplies index
    ``start + i`` along ``axis`` of ``parameter`` (a name of ``model.named_parameters()``) by
    ``c_i ** power``."""

    parameter: str
    axis: int
    start: int = 0
    power: int = 1

    def __post_init__(self) -> None:
        check_int("axis", self.axis, 0)
        check_int("start", self.start, 0)
        if isinstance(self.power, bool) or not isinstance(self.power, int) or self.power == 0:
            raise ValueError(f"power: expected a non-zero integer for {self.parameter}, got {self.power!r}")


@dataclass(frozen=True)
class Group:
    """A symmetry group of ``size`` coordinates acting on ``members``; ``name`` says what it is
    (e.g. ``"blocks.0.ln_1 -> blocks.0.attn.qkv"``, ``"blocks.0.attn Q/K"``) in every message.
    ``kind``: one of ``KINDS`` (``full_gauge_trace`` also reports the minimum over the
    ``"norm/reader"`` groups alone)."""

    name: str
    size: int
    members: tuple[Member, ...]
    kind: str = "custom"

    def __post_init__(self) -> None:
        check_int(f"group {self.name}: size", self.size)
        if not self.members or not all(isinstance(m, Member) for m in self.members):
            raise ValueError(f"group {self.name}: members must be a non-empty tuple of Member")
        if self.kind not in KINDS:
            raise ValueError(f"group {self.name}: kind must be one of {KINDS}, got {self.kind!r}")


# ---------------------------------------------------------------------------- declaring groups
def _module(model: nn.Module, name: str, group: str) -> nn.Module:
    modules = dict(model.named_modules())
    if name not in modules:
        raise SymmetryError(f"group {group}: {name!r} is not a module of the model")
    return modules[name]


def _layout(model: nn.Module, name: str, group: str) -> tuple[int, int]:
    """``(out_axis, in_axis)`` of the weight of linear module ``name``: ``(0, 1)`` for ``nn.Linear``,
    ``(1, 0)`` for HuggingFace's ``Conv1D`` (``y = x @ W + b``, weight ``[in, out]``)."""
    module = _module(model, name, group)
    if type(module) is nn.Linear:
        return 0, 1
    weight = getattr(module, "weight", None)
    if (type(module).__name__ == "Conv1D" and isinstance(weight, Tensor) and weight.dim() == 2
            and weight.shape[1] == getattr(module, "nf", None)):
        return 1, 0
    raise SymmetryError(
        f"group {group}: {name} is a {type(module).__name__}, an unsupported layout; supported are nn.Linear "
        "(weight [out, in]) and transformers' Conv1D (weight [in, out]). For another module declare the "
        "Members by hand, with the axis its inputs (or outputs) run along")


def _rows(model: nn.Module, name: str, start: int, power: int, group: str) -> list[Member]:
    """The output coordinates ``start..`` of linear module ``name``: its weight's output axis and its bias."""
    out_axis, _ = _layout(model, name, group)
    members = [Member(f"{name}.weight", out_axis, start, power)]
    if getattr(_module(model, name, group), "bias", None) is not None:
        members.append(Member(f"{name}.bias", 0, start, power))
    return members


def norm_reader_group(model: nn.Module, norm: str, readers: str | Sequence[str],
                      name: str | None = None) -> Group:
    """LayerNorm ``norm`` against the linear maps that read its output (``readers``):
    ``(gamma_i, beta_i) -> c_i (gamma_i, beta_i)``, every reader's input column ``i`` divided by ``c_i``.

    A symmetry only where ``norm``'s output feeds nothing but ``readers`` (pre-LN blocks; not a post-LN
    block, where it is also the residual stream: ``verify_groups`` refuses that)."""
    readers = [readers] if isinstance(readers, str) else list(readers)
    name = name or f"{norm} -> {', '.join(readers)}"
    module = _module(model, norm, name)
    weight = getattr(module, "weight", None)
    if not isinstance(weight, Tensor) or weight.dim() != 1:
        raise SymmetryError(f"group {name}: {norm} has no 1-D affine gain (weight); a LayerNorm with "
                            "elementwise_affine=True over the last dimension is needed")
    members = [Member(f"{norm}.weight", 0, 0, 1)]
    if getattr(module, "bias", None) is not None:
        members.append(Member(f"{norm}.bias", 0, 0, 1))
    members += [Member(f"{reader}.weight", _layout(model, reader, name)[1], 0, -1) for reader in readers]
    return Group(name, weight.numel(), tuple(members), "norm/reader")


def query_key_group(model: nn.Module, query: tuple[str, int], key: tuple[str, int], size: int,
                    name: str) -> Group:
    """Attention's query against its key, per coordinate: query output ``i`` (weight and bias) times
    ``c_i``, key output ``i`` divided by it; every score ``q . k`` is unchanged. ``query``, ``key``:
    ``(linear module, first output coordinate)`` (a fused ``qkv`` is one module with offsets 0 and d)."""
    return Group(name, size, tuple(_rows(model, *query, 1, name) + _rows(model, *key, -1, name)), "query/key")


def value_output_group(model: nn.Module, value: tuple[str, int], output: str, size: int, name: str) -> Group:
    """Attention's value against its output projection, per coordinate: value output ``i`` (weight and
    bias) times ``c_i`` (so the attention output ``i`` too: attention averages values), the output
    projection's input column ``i`` divided by it (its bias is untouched)."""
    reader = Member(f"{output}.weight", _layout(model, output, name)[1], 0, -1)
    members = _rows(model, *value, 1, name) + [reader]
    return Group(name, size, tuple(members), "value/output")


def transformer_groups(model: nn.Module) -> tuple[Group, ...]:
    """Every exact per-coordinate rescaling symmetry of a flatlib ``Transformer`` this module knows: per
    block ``ln_1 -> attn.qkv``, ``attn Q/K``, ``attn V/O``, ``ln_2 -> mlp.fc``, then ``ln_f -> head``.

    Not among them: the MLP's hidden units (GELU is not positively homogeneous) and the residual
    stream's common scale (embeddings and every residual writer times ``c``: LayerNorm's ``eps`` breaks
    it, see ``full_gauge_trace``)."""
    model = _unwrap(model)
    if not isinstance(model, Transformer):
        raise SymmetryError(f"model: the built-in groups are for flatlib's Transformer, got a "
                            f"{type(model).__name__}; pass groups= built with norm_reader_group, "
                            "query_key_group and value_output_group")
    d = model.config.d_model
    groups: list[Group] = []
    for i in range(len(model.blocks)):
        block = f"blocks.{i}"
        qkv = f"{block}.attn.qkv"
        groups += [norm_reader_group(model, f"{block}.ln_1", qkv),
                   query_key_group(model, (qkv, 0), (qkv, d), d, f"{block}.attn Q/K"),
                   value_output_group(model, (qkv, 2 * d), f"{block}.attn.proj", d, f"{block}.attn V/O"),
                   norm_reader_group(model, f"{block}.ln_2", f"{block}.mlp.fc")]
    return tuple(groups + [norm_reader_group(model, "ln_f", "head")])


# ---------------------------------------------------------------------------- the linear map log D = M u
def _along(v: Tensor, axis: int, ndim: int) -> Tensor:
    """``v`` shaped to broadcast along ``axis`` of an ``ndim``-dimensional tensor."""
    shape = [1] * ndim
    shape[axis] = -1
    return v.reshape(shape)


def log_factors(groups: Sequence[Group], shapes: Mapping[str, torch.Size],
                log_scales: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``log D`` per parameter a group touches (float64, shaped like it): entry ``p`` gets
    ``sum power * u_g[i]`` over the members covering it (``M u``). ``log_scales``: ``{group name: [size]}``;
    a group not named there is at 0."""
    out: dict[str, Tensor] = {}
    for group in groups:
        u = log_scales.get(group.name)
        for m in group.members:
            t = out.setdefault(m.parameter, torch.zeros(shapes[m.parameter], dtype=torch.float64))
            if u is not None:
                along = _along(u.double().cpu(), m.axis, t.dim())
                t.narrow(m.axis, m.start, group.size).add_(m.power * along)
    return out


def _adjoint(groups: Sequence[Group], w: Mapping[str, Tensor], squared: bool = False) -> Tensor:
    """``M^T w`` (``(M o M)^T w`` if ``squared``) for per-parameter ``w``: one flat ``[sum of sizes]``
    vector, the groups in order; coordinate ``i`` of a group sums ``power * w`` over its members' slices."""
    parts = []
    for group in groups:
        total = torch.zeros(group.size, dtype=torch.float64)
        for m in group.members:
            s = w[m.parameter].narrow(m.axis, m.start, group.size)
            others = [d for d in range(s.dim()) if d != m.axis]
            total += (m.power ** 2 if squared else m.power) * (s.sum(others) if others else s)
        parts.append(total)
    return torch.cat(parts)


def _split(u: Tensor, groups: Sequence[Group]) -> dict[str, Tensor]:
    return dict(zip((g.name for g in groups), u.split([g.size for g in groups])))


# ---------------------------------------------------------------------------- checks
def check_groups(model: nn.Module, groups: Sequence[Group]) -> None:
    """The description against the model's parameters, without running it: unique group names; every
    member a trainable parameter held under one name only (a tied or shared tensor is also used
    elsewhere, so scaling it is not a symmetry); its slice inside the parameter; no two members scaling
    the same entries along the same axis (the groups would be redundant, or one declared twice)."""
    model = _unwrap(model)
    names = [g.name for g in groups]
    if len(set(names)) != len(names):
        repeated = sorted(n for n in set(names) if names.count(n) > 1)
        raise SymmetryError(f"groups: names must be unique, got {repeated} more than once")
    aliases: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(p), []).append(name)
    by_name = dict(model.named_parameters(remove_duplicate=False))
    trainable = trainable_parameters(model)
    covered: dict[tuple[str, int], list[tuple[int, int, str]]] = {}
    for group in groups:
        for m in group.members:
            if m.parameter not in by_name:
                raise SymmetryError(f"group {group.name}: {m.parameter!r} is not a parameter of the model")
            others = [n for n in aliases[id(by_name[m.parameter])] if n != m.parameter]
            if others:
                raise SymmetryError(
                    f"group {group.name}: {m.parameter} is tied to {others} (one tensor, used in several "
                    "places), so scaling it changes the function; untie it (e.g. tie_word_embeddings=False "
                    "for a HuggingFace model) or leave the group out")
            if m.parameter not in trainable:
                raise SymmetryError(f"group {group.name}: {m.parameter} is not trainable "
                                    "(requires_grad=False); leave the group out")
            shape = by_name[m.parameter].shape
            if m.axis >= len(shape) or m.start + group.size > shape[m.axis]:
                raise SymmetryError(f"group {group.name}: {m.parameter} has shape {tuple(shape)}; indices "
                                    f"{m.start}..{m.start + group.size - 1} along axis {m.axis} do not fit "
                                    "(check the layout: nn.Linear is [out, in], Conv1D [in, out])")
            for lo, hi, other in covered.get((m.parameter, m.axis), []):
                if m.start < hi and lo < m.start + group.size:
                    overlap = f"{max(lo, m.start)}..{min(hi, m.start + group.size) - 1}"
                    raise SymmetryError(f"groups {other} and {group.name} both scale {m.parameter} along "
                                        f"axis {m.axis} at indices {overlap}; declare each rescaling once")
            covered.setdefault((m.parameter, m.axis), []).append((m.start, m.start + group.size, group.name))


def _random_log_scales(groups: Sequence[Group], generator: torch.Generator) -> dict[str, Tensor]:
    """Per coordinate ``c = 2^k``, ``k`` uniform in {-2, -1, 1, 2}: multiplying by a power of two is exact
    in floating point, so a true symmetry gives the same logits up to reassociation only, and any
    change larger than that is the function's."""
    out = {}
    for group in groups:
        magnitude = torch.randint(1, 3, (group.size,), generator=generator)
        sign = 2 * torch.randint(0, 2, (group.size,), generator=generator) - 1
        k = magnitude * sign
        out[group.name] = k.double() * math.log(2.0)
    return out


@torch.no_grad()
def rescale(model: nn.Module, groups: Sequence[Group], log_scales: Mapping[str, Tensor]) -> nn.Module:
    """A copy of ``model`` moved along the groups: every parameter a group touches multiplied by
    ``D = exp(M u)`` (``u = log_scales``, ``{group name: [size]}``; groups not named stay). The same
    function, if the groups are symmetries (``verify_groups``)."""
    model = _unwrap(model)
    unknown = sorted(set(log_scales) - {g.name for g in groups})
    if unknown:
        raise ValueError(f"log_scales: {unknown} are not groups (expected some of "
                         f"{[g.name for g in groups]})")
    for group in groups:
        if group.name in log_scales and tuple(log_scales[group.name].shape) != (group.size,):
            raise ValueError(f"log_scales: {group.name} needs shape ({group.size},), got "
                             f"{tuple(log_scales[group.name].shape)}")
    out = copy.deepcopy(model)
    params = dict(out.named_parameters())
    for name, log_d in log_factors(groups, {n: p.shape for n, p in params.items()}, log_scales).items():
        p = params[name]
        p.mul_(torch.exp(log_d).to(device=p.device, dtype=p.dtype))
    return out


def _logits(model: nn.Module, logits_fn: LogitsFn, batch: Any) -> Tensor:
    with hessian_mode(model), torch.no_grad():
        return logits_fn(model, batch).detach()


def verify_groups(model: nn.Module, groups: Sequence[Group], logits_fn: LogitsFn, batch: Any,
                  seed: int = 0) -> dict[str, float]:
    """Each group checked on the model's function: ``check_groups``, then the logits of ``batch``
    (``logits_fn``, under ``hessian_mode``) after a random rescaling of that group alone, and of every
    group at once, compared with the model's. Returns ``{group name | "all groups": max |change|}``;
    raises ``SymmetryError`` if a change exceeds ``64 eps max(1, max |logits|)`` (``eps`` of the model's
    dtype: the scales are powers of two, exact in floating point; only a reassociated sum may round
    differently).

    ``seed``: a private generator draws the scales."""
    check_seed("seed", seed)
    model = _unwrap(model)
    groups = list(groups)
    check_groups(model, groups)
    reference = _logits(model, logits_fn, batch)
    tolerance = 64 * torch.finfo(reference.dtype).eps * max(1.0, float(reference.abs().max()))
    generator = torch.Generator().manual_seed(seed)
    scales = _random_log_scales(groups, generator)
    deviations = {}
    for label, chosen in [(g.name, [g]) for g in groups] + [("all groups", groups)]:
        moved = rescale(model, chosen, {g.name: scales[g.name] for g in chosen})
        deviations[label] = float((_logits(moved, logits_fn, batch) - reference).abs().max())
        if not deviations[label] <= tolerance:  # also NaN
            what = (f"group {label}" if len(chosen) == 1 else "the groups together (each one alone passed)")
            raise SymmetryError(
                f"{what} is not a symmetry of this model: a random rescaling (powers of two per coordinate) "
                f"changed the logits by {deviations[label]:.3g} (max |logit| "
                f"{float(reference.abs().max()):.3g}, tolerance {tolerance:.2g}). Check that the norm's "
                "output feeds only its readers (a post-LN block adds it to the residual stream), that each "
                "weight's layout (axis) is right and that no parameter is used outside the group; then fix "
                "the declaration or leave the group out")
    return deviations


# ---------------------------------------------------------------------------- the minimum over the gauge
@dataclass(frozen=True)
class GaugeMinimum:
    """``value = min_u sum_p h_p exp(-2 (M u)_p)`` over the log-scales ``u`` of the groups (``h`` a
    diagonal, ``M`` the groups' powers), attained at ``log_scales`` (``{group: [size]}``; where the
    infimum is not attained, as when a coordinate only touches zero diagonals, they grow with the
    iterations and ``value`` is the infimum to tolerance). ``raw``: the sum at ``u = 0``.
    ``iterations``: Newton steps taken; ``decrement``: the last Newton decrement ``lambda^2 / 2``, an
    estimate of ``value - infimum``. ``parameters``: where the curvature is, ``{parameter: {"raw": sum h,
    "min": its part of value}}`` (a split by parameter: by group it is not defined, groups sharing entries).
    """

    value: float
    raw: float
    log_scales: dict[str, Tensor]
    iterations: int
    decrement: float
    parameters: dict[str, dict[str, float]]


def _conjugate_gradient(apply: Callable[[Tensor], Tensor], b: Tensor, preconditioner: Tensor,
                        rtol: float = 1e-10, max_iter: int = 500) -> Tensor:
    """``x`` with ``A x = b`` for a symmetric positive semi-definite ``A`` given by ``apply``, Jacobi-
    preconditioned; stops at ``|r| <= rtol |b|`` or ``max_iter`` steps (an inexact Newton step is still
    a descent direction)."""
    x = torch.zeros_like(b)
    r = b.clone()
    z = r / preconditioner
    p = z.clone()
    rz = float(r @ z)
    target = rtol * float(b.norm())
    for _ in range(max_iter):
        if float(r.norm()) <= target:
            break
        ap = apply(p)
        curvature = float(p @ ap)
        if curvature <= 0:  # a flat direction of a semi-definite A: stop with what is solved
            break
        alpha = rz / curvature
        x += alpha * p
        r -= alpha * ap
        z = r / preconditioner
        rz, previous = float(r @ z), rz
        p = z + (rz / previous) * p
    return x


def gauge_minimum(groups: Sequence[Group], diagonal: Mapping[str, Tensor], rtol: float = 1e-12,
                  max_iter: int = 200) -> GaugeMinimum:
    """The smallest value of the diagonal's sum over the groups' rescalings (see the module doc).

    Under ``theta' = D theta`` the Hessian becomes ``H' = D^-1 H D^-1``, so its diagonal entry ``p``
    becomes ``h_p / D_p^2`` and, with ``log D = M u``,

        f(u) = sum_p h_p exp(-2 (M u)_p),   grad f = -2 M^T w,   Hess f = 4 M^T diag(w) M,
        w = h exp(-2 M u),

    a sum of exponentials of linear functions: convex (``h >= 0``). Newton's method, the step solved by
    conjugate gradients with ``Hess f`` applied matrix-free (``M`` is never formed), a backtracking
    (Armijo) line search, stopping when the Newton decrement ``lambda^2 / 2 = -grad . step / 2`` (about
    ``f - min f`` near the minimum) is at most ``rtol * f(0)`` (else a RuntimeError after ``max_iter``
    steps, or when the line search finds no decrease). ``f`` and every step in float64.

    Args:
        diagonal: ``{parameter: h}`` non-negative, for every parameter a group touches; parameters
            no group touches add a constant.
    """
    groups = list(groups)
    h = {name: d.detach().double().cpu() for name, d in diagonal.items()}
    touched = {m.parameter for g in groups for m in g.members}
    missing = sorted(touched - set(h))
    if missing:
        raise ValueError(f"diagonal: no entries for {missing}, which the groups scale")
    for name, d in h.items():
        if not bool(torch.all(d >= 0)):  # also NaN
            raise ValueError(f"diagonal: {name} has negative or NaN entries; the minimum over the gauge "
                             "needs a non-negative diagonal (the Gauss-Newton / Fisher diagonal is one)")
    shapes = {name: d.shape for name, d in h.items()}
    constant = sum(float(d.sum()) for name, d in h.items() if name not in touched)

    def weights(u: Tensor) -> dict[str, Tensor]:
        log_d = log_factors(groups, shapes, _split(u, groups))
        return {name: h[name] * torch.exp(-2 * t) for name, t in log_d.items()}

    def value(w: Mapping[str, Tensor]) -> float:
        return constant + sum(float(t.sum()) for t in w.values())

    u = torch.zeros(sum(g.size for g in groups), dtype=torch.float64)
    if not groups:
        sums = {name: {"raw": float(d.sum()), "min": float(d.sum())} for name, d in h.items()}
        return GaugeMinimum(constant, constant, {}, 0, 0.0, sums)
    w = weights(u)
    f = raw = value(w)
    decrement, iterations = math.inf, 0
    while iterations < max_iter:
        gradient = -2 * _adjoint(groups, w)
        hess_diag = 4 * _adjoint(groups, w, squared=True)
        floor = 1e-30 + 1e-14 * float(hess_diag.max())  # where a coordinate touches only zeros

        def hess_vec(v: Tensor, w: Mapping[str, Tensor] = w) -> Tensor:
            mv = log_factors(groups, shapes, _split(v, groups))
            return 4 * _adjoint(groups, {name: w[name] * mv[name] for name in mv})

        step = _conjugate_gradient(hess_vec, -gradient, hess_diag + floor)
        slope = float(gradient @ step)
        decrement = -slope / 2
        if decrement <= rtol * raw:
            break
        t = 1.0
        while t > 1e-12:
            w_new = weights(u + t * step)
            f_new = value(w_new)
            if f_new <= f + 1e-4 * t * slope:
                break
            t /= 2
        else:  # no decrease along a descent direction: f is at its minimum to rounding
            break
        u, w, f = u + t * step, w_new, f_new
        iterations += 1
    if not decrement <= rtol * raw:
        raise RuntimeError(f"gauge_minimum: Newton stopped after {iterations} steps with decrement "
                           f"{decrement:.3g} > rtol * f(0) = {rtol * raw:.3g}; raise max_iter, or check the "
                           "diagonal for entries many orders of magnitude apart")
    sums = {name: {"raw": float(d.sum()), "min": float(w[name].sum()) if name in w else float(d.sum())}
            for name, d in h.items()}
    return GaugeMinimum(f, raw, _split(u, groups), iterations, decrement, sums)


# ---------------------------------------------------------------------------- the trace
@dataclass(frozen=True)
class GaugeTrace(TraceEstimate):
    """``full_gauge_trace``'s result: ``mean`` ± ``stderr`` is the smallest Hessian trace over every
    declared symmetry (``samples``: the body's Hutchinson samples plus the exact gauge minimum).

    ``body``: Hutchinson's ``Tr H`` of the parameters no group touches. ``raw_mean``: ``Tr H`` in the
    model's own coordinates (body + the gauged diagonal as it is). ``norm_mean``: the minimum over the
    LayerNorm/reader groups alone (the other groups held where they are; ``flatness.invariant_trace``'s
    gauge, with qkv's bias exact instead of in the body). ``minimum``: the full minimisation (its
    ``log_scales``: ``rescale(model, groups, minimum.log_scales)`` is the model in its flattest
    coordinates). ``groups``: what was minimised over. ``deviations``: ``verify_groups``'s logit changes.
    """

    body: TraceEstimate
    raw_mean: float
    norm_mean: float
    minimum: GaugeMinimum
    groups: tuple[Group, ...]
    deviations: dict[str, float]


def full_gauge_trace(model: nn.Module, loss_fn: LossFn, logits_fn: LogitsFn, batches: Sequence[Any],
                     n_probes: int, seed: int, groups: Sequence[Group] | None = None, mode: str = "reverse",
                     data: str = "examples") -> GaugeTrace:
    """The Hessian trace with the whole exact gauge fixed: the smallest ``Tr H`` over every per-coordinate
    positive rescaling in ``groups`` (default ``transformer_groups(model)``: LayerNorm/reader, attention
    Q/K and V/O per head coordinate), jointly.

    Along ``theta' = D(u) theta`` (the module doc) ``H' = D^-1 H D^-1``: the body (parameters no group
    touches) keeps its block ``H_body``, and the gauged parameters' diagonal entries become
    ``h_p exp(-2 (M u)_p)``, so

        Tr H(u) = Tr H_body + sum_p h_p exp(-2 (M u)_p),     Tr_inv H = Tr H_body + min_u sum_p (...),

    convex in ``u`` and solved by Newton's method to ``1e-12`` relative (``gauge_minimum``). A point
    ``D(c) theta`` of the same orbit has diagonal ``h exp(-2 M c)`` and the same body, and its minimum is
    the same number (the minimiser moves by ``-c``): the result is a property of the function, up to the
    groups. Groups overlap (a ``qkv`` weight entry is scaled by its LayerNorm column and its head-
    coordinate row), which is why the minimum is joint and not a sum of per-group minima.

    How each part is computed: ``Tr H_body`` by Hutchinson (``hessian_trace`` restricted to the body,
    ``n_probes`` probes from ``seed``: the only noise, and the ``stderr``); ``h`` exactly, as the Fisher
    (Gauss-Newton) diagonal (``flatness.fisher_diagonal``), which transforms as ``D^-1 F D^-1`` too (the
    minimum is invariant whichever of the two it is taken over), and equals the Hessian's diagonal at a
    global minimum of the expected loss, and everywhere for ``ln_f`` and the head (the logits are
    linear in them). Before anything is computed, ``verify_groups`` checks every group on
    ``batches[0]`` (a group that is not a symmetry is a ``SymmetryError``, never a number).

    Measured on a cpu-profile HMM phase-1 model (2x64, 8000 steps, gap 0.0075 nats; the first 1024
    validation pairs, expected loss, 32 probes): raw 23.5, LayerNorm-only 10.07 ± 0.09
    (``flatness.invariant_trace``), full gauge 9.972 ± 0.055 (the body is smaller, so is its noise). After
    a rescaling by c = 3 of every V/O coordinate (logits 1.2e-6 apart, float32) the LayerNorm-only trace
    reads 13.48 and this one 9.972 again; likewise after Q/K or LayerNorm/reader rescalings. Cost: 13-19 s
    against 12-18 s for the LayerNorm-only trace (the same probes; the exact diagonals 4 s, Newton 0.07 s
    in 5-7 steps; 2 shared cores).

    What stays unfixed:

    * The residual stream's common scale (token and position embeddings and every residual writer,
      ``attn.proj`` and ``mlp.proj`` with their biases, times ``c``): every LayerNorm divides it out but
      for its ``eps``, so it is a symmetry only as ``eps -> 0`` (on the model above the logits moved by
      2e-4 at c = 3 and 1.8e-3 at c = 1/3). It moves this trace a lot, mostly through the body (the
      embeddings' curvature goes as ``1 / c^2``): 9.97 -> 8.38 at c = 3 and 22.6 at c = 1/3. The trace is a
      property of the function up to this scale: compare models trained alike, which set it alike.
    * Non-diagonal symmetries: any invertible map per head between Q and K (or V and O). Its orthogonal
      part changes no trace (``H -> R^T H R``), and neither do permutations or sign flips of coordinates;
      scalings along axes other than the coordinates are not minimised over.
    * The MLP's hidden units (GELU is not positively homogeneous: not a symmetry), and a change of width
      (``flatness.invariant_trace`` on ``widen``).

    Args:
        loss_fn: the mean loss over a batch (``mlm_loss_fn``), whose Hessian is traced.
        logits_fn: the logits of the same loss (``mlm_logits_fn``): the exact diagonals and the checks.
        groups: the model's symmetry groups (default: ``transformer_groups``, for flatlib's Transformer).
    """
    check_int("n_probes", n_probes, 2)
    batches = list(batches)
    if not batches:
        raise ValueError("batches: expected a non-empty list of batches")
    model = _unwrap(model)
    groups = transformer_groups(model) if groups is None else tuple(groups)
    if not groups:
        raise ValueError("groups: expected at least one group (hessian_trace is the trace without a gauge)")
    deviations = verify_groups(model, groups, logits_fn, batches[0], seed=seed)
    touched = {m.parameter for g in groups for m in g.members}
    names = list(trainable_parameters(model))
    gauged = [n for n in names if n in touched]
    body_names = [n for n in names if n not in touched]
    diagonal = fisher_diagonal(model, logits_fn, batches, parameters=gauged)
    if body_names:
        body = hessian_trace(model, loss_fn, batches, n_probes, seed, mode=mode, data=data,
                             parameters=body_names)
    else:  # every parameter gauged: the whole trace is exact
        body = TraceEstimate(0.0, 0.0, torch.zeros(n_probes, dtype=torch.float64), n_probes,
                             "Tr H (no body) = 0")
    full = gauge_minimum(groups, diagonal)
    norms = gauge_minimum([g for g in groups if g.kind == "norm/reader"], diagonal)
    counts = {k: sum(g.kind == k for g in groups) for k in KINDS}
    kinds = ", ".join(f"{n} {k}" for k, n in counts.items() if n)
    description = (f"Tr H minimised over the whole declared gauge ({len(groups)} groups: {kinds}; exact "
                   f"diagonals) + {body.description.replace('Tr H', 'the body', 1)}")
    return GaugeTrace(body.mean + full.value, body.stderr, body.samples + full.value, n_probes, description,
                      body=body, raw_mean=body.mean + full.raw, norm_mean=body.mean + norms.value,
                      minimum=full, groups=groups, deviations=deviations)
