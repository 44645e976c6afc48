"""SGD and GD on the expected loss, and the slow flow that SGD follows along the optimal set
(notebook 06, section 2).

``run_sgd`` (mini-batches of sampled (context, word) pairs, many chains at once), ``run_gd`` (full
batch on the expected loss), and ``slow_flow``, the predicted limit of SGD along the optimal set
Gamma (Li, Wang & Arora 2022; the paper's Theorem):

    d theta / d tau = -1/4 grad_Gamma Tr H(theta),        tau = eta^2 k / B
    (i.e. d theta / dt = -1/(4B) grad_Gamma Tr H with t = eta^2 k).

All randomness comes from explicit ``torch.Generator`` s.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor
from torch.func import grad, vmap

from flatlib.checks import check_int, check_number
from flatlib.theory.contexts import DTYPE, ContextSet
from flatlib.theory.curvature import exact_hessian, hessian_traces, trace_gradient
from flatlib.theory.functional import FlatModel, _minibatch_loss, expected_loss


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
    check_number("lr", lr)
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
    check_number("lr", lr)
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
            values, vectors, zero = _null_space(exact_hessian(flat, theta, contexts), rtol)
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
    check_number("t_max", t_max)
    check_number("dt", dt)
    n_steps = max(1, round(t_max / dt))
    dt = t_max / n_steps

    def velocity(theta: Tensor) -> tuple[Tensor, Tensor, int]:
        H = exact_hessian(flat, theta, contexts)
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

