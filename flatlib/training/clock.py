"""The theory's clock for SGD at a minimum: how long a continuation ran, in the units in which the
implicit bias acts.

Near the manifold of minimizers, SGD with learning rate ``eta`` and ``B`` supervised tokens per step
(the loss is a mean over them, so the gradient noise covariance is ``Sigma / B``) drifts along the
manifold as the flow ``d theta / d tau = -(1/4) grad_Gamma Tr(Sigma)`` (Li, Wang, Arora 2022; the
paper's Theorem), where the clock is

    tau = eta^2 * k / B        after k steps.

So halving ``B`` or multiplying ``eta`` by sqrt(2) halves the steps a given drift needs; the number
of steps alone says nothing. In flatlib's single-mask MLM every sentence supervises one token, so
``B`` is the batch size in sentences. Notebook 06 sees the drift at ``tau ~ 10`` on its exact
problem; the original notebook 02 ran ``tau = 0.1^2 * 1200 / 256 = 0.047``.

A clock continuation runs SGD (no weight decay: L2 moves the minimizers) from a checkpoint for
``tau`` units, then anneals the learning rate linearly to 0 over a short, fixed number of steps at a
larger batch, which brings the loss back to the minimum (the noise-driven excess loss of SGD at a
constant lr is ~ eta / B); ``tau = 0`` is the anneal alone, the control every ``tau > 0`` is paired
with.

The clock's arithmetic (``sgd_clock``, ``steps_for_clock``) is ``flatlib.training.clock_units``, re-exported
here. Notebook 02's analysis of the runs built here (tables, verdicts, claims, summary) is
``flatlib.analysis.pretraining``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from flatlib.seeds import derived_seed
from flatlib.training.clock_units import sgd_clock, steps_for_clock  # noqa: F401 (sgd_clock: re-exported)
from flatlib.training.train import PretrainConfig, continuation


def supervised_tokens(config: PretrainConfig) -> int:
    """``B`` of the clock: tokens whose loss one step averages. Single-mask MLM only (one token a
    sentence); the other objectives supervise correlated tokens of one sentence."""
    if config.supervise_all or config.mask_rate is not None:
        raise ValueError("config: the clock is defined for the single-mask objective (supervise_all=False, "
                         "mask_rate=None)")
    return config.batch_size


def clock_continuation(base: PretrainConfig, from_step: int, tau: float, lr: float, batch_size: int,
                       noise_seed: int, **overrides: Any) -> PretrainConfig:
    """SGD from ``base``'s checkpoint at ``from_step`` for ``tau`` units of the clock (constant
    ``lr``, ``batch_size`` sentences a step, no weight decay), with its own stream of batches:
    ``noise_seed`` picks the SGD noise (a different seed from the parent's, so that its batches are
    not phase 1's again). ``overrides`` go to the config (e.g. ``checkpoint_every``)."""
    # the continuation inherits base's objective: tau counts sentences only if single-mask
    supervised_tokens(base)
    steps = steps_for_clock(tau, lr, batch_size)
    if steps < 1:
        raise ValueError(f"tau: {tau} is less than one step at lr {lr} and batch size {batch_size}")
    settings = {"checkpoint_every": steps, "eval_every": steps, **overrides}
    return continuation(base, from_step=from_step, steps=steps, optimizer="sgd", lr=lr, batch_size=batch_size,
                        weight_decay=0.0, momentum=0.0,
                        seed=derived_seed("clock noise", base.seed, noise_seed), **settings)


def anneal(parent: PretrainConfig, from_step: int, lr: float, steps: int, batch_size: int, seed: int,
           **overrides: Any) -> PretrainConfig:
    """The closing anneal: SGD from ``parent``'s checkpoint at ``from_step``, the learning rate
    falling linearly from ``lr`` to 0 over ``steps`` steps at ``batch_size`` sentences, no weight
    decay, batches from ``seed``."""
    settings = {"checkpoint_every": steps, "eval_every": steps, **overrides}
    return continuation(parent, from_step=from_step, steps=steps, optimizer="sgd", lr=lr,
                        batch_size=batch_size,
                        weight_decay=0.0, momentum=0.0, schedule="linear", min_lr=0.0, seed=seed, **settings)


def clock_runs(base: PretrainConfig, taus: list[float], lr: float, batch_size: int, anneal_steps: int,
               anneal_batch_size: int,
               noise_seed: int) -> dict[float, tuple[PretrainConfig | None, PretrainConfig]]:
    """One noise seed's dose-response from the end of phase 1 (``base``): for each ``tau``, the
    SGD run (None for ``tau = 0``) and the anneal that ends it. All ``tau > 0`` share one SGD run,
    checkpointed at each ``tau`` (the longest one's steps), so the doses are points of one
    trajectory, as in the theory."""
    if sorted(taus) != list(taus) or len(set(taus)) != len(taus) or not taus or taus[0] < 0:
        raise ValueError(f"taus: expected increasing values >= 0, got {taus!r}")
    positive = [t for t in taus if t > 0]
    # every anneal of one noise seed, the control's included, draws the same batches: the doses differ
    # only by where the anneal starts (a paired design)
    seed = derived_seed("clock noise", base.seed, noise_seed)
    out: dict[float, tuple[PretrainConfig | None, PretrainConfig]] = {}
    sgd = None
    if positive:
        steps = [steps_for_clock(t, lr, batch_size) for t in positive]
        if steps[0] < 1 or len(set(steps)) != len(steps):
            raise ValueError(f"taus: {positive} do not map to distinct step counts >= 1 at lr {lr}, batch "
                             f"{batch_size}")
        # checkpoints at every dose: checkpoint_every must divide each; use their gcd
        every = math.gcd(*steps)
        sgd = clock_continuation(base, base.steps, positive[-1], lr, batch_size, noise_seed,
                                 checkpoint_every=every, eval_every=every)
    for tau in taus:
        if tau == 0:
            out[tau] = (None, anneal(base, base.steps, lr, anneal_steps, anneal_batch_size, seed))
        else:
            k = steps_for_clock(tau, lr, batch_size)
            out[tau] = (sgd, anneal(sgd, k, lr, anneal_steps, anneal_batch_size, seed))
    return out


# ---------------------------------------------------------------------------- notebook 02's grid of doses
@dataclass(frozen=True)
class ClockPoint:
    """One measured model of the dose-response: ``language``, the phase-1 ``lineage`` (its seed),
    the SGD ``noise`` seed, the dose ``tau``, the SGD run (None for the control, ``tau = 0``) and the
    ``anneal`` whose final checkpoint is measured."""

    language: str
    lineage: int
    noise: int
    tau: float
    sgd: PretrainConfig | None
    anneal: PretrainConfig


def clock_grid(phase1: dict[tuple[str, int], PretrainConfig], clock: dict[str, Any]) -> list[ClockPoint]:
    """Every point of the dose-response from the phase-1 configs ``{(language, seed): config}`` and
    a profile's ``clock`` section: for each lineage, ``noise_seeds`` SGD trajectories checkpointed at
    every ``tau > 0``, each dose closed by an anneal of ``anneal_steps[language]`` steps; the ``tau = 0``
    control ``control_seeds`` times per lineage (default 1; the anneal alone from phase 1, on noise seeds
    ``0 .. control_seeds - 1``'s anneal batches, each the batches of that noise seed's doses). A lineage's
    effect subtracts the mean of its controls (``lineage_effects``): the control's own anneal noise is
    then averaged like the doses'."""
    controls = clock.get("control_seeds", 1)
    if not 1 <= controls <= clock["noise_seeds"]:
        raise ValueError(f"clock.control_seeds: expected 1 .. noise_seeds ({clock['noise_seeds']}), got "
                         f"{controls!r}")
    points = []
    for (language, lineage), base in phase1.items():
        for noise in range(clock["noise_seeds"]):
            runs = clock_runs(base, list(clock["taus"]), clock["lr"], clock["batch_size"],
                              clock["anneal_steps"][language], clock["anneal_batch_size"], noise)
            points += [ClockPoint(language, lineage, noise, tau, sgd, anneal)
                       for tau, (sgd, anneal) in runs.items() if tau > 0 or noise < controls]
    return points
