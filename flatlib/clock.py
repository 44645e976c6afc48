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
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import pandas as pd

from flatlib.claims import equal_loss, paired_effect, t_interval
from flatlib.train import PretrainConfig, derived_seed


def supervised_tokens(config: PretrainConfig) -> int:
    """``B`` of the clock: tokens whose loss one step averages. Single-mask MLM only (one token a
    sentence); the other objectives supervise correlated tokens of one sentence."""
    if config.supervise_all or config.mask_rate is not None:
        raise ValueError("config: the clock is defined for the single-mask objective (supervise_all=False, "
                         "mask_rate=None)")
    return config.batch_size


def sgd_clock(lr: float, steps: int, batch_tokens: int) -> float:
    """``tau = lr^2 * steps / batch_tokens``."""
    if not (lr > 0 and math.isfinite(lr)):
        raise ValueError(f"lr: expected a positive number, got {lr!r}")
    if steps < 0 or batch_tokens < 1:
        raise ValueError(f"steps, batch_tokens: expected steps >= 0 and batch_tokens >= 1, got {steps}, {batch_tokens}")
    return lr * lr * steps / batch_tokens


def steps_for_clock(tau: float, lr: float, batch_tokens: int) -> int:
    """The number of steps (rounded to the nearest) that runs ``tau`` units of the clock."""
    if not (tau >= 0 and math.isfinite(tau)):
        raise ValueError(f"tau: expected a number >= 0, got {tau!r}")
    sgd_clock(lr, 0, batch_tokens)  # checks lr and batch_tokens
    return round(tau * batch_tokens / (lr * lr))


def clock_continuation(base: PretrainConfig, from_step: int, tau: float, lr: float, batch_size: int,
                       noise_seed: int, **overrides: Any) -> PretrainConfig:
    """SGD from ``base``'s checkpoint at ``from_step`` for ``tau`` units of the clock (constant
    ``lr``, ``batch_size`` sentences a step, no weight decay), with its own stream of batches:
    ``noise_seed`` picks the SGD noise (a different seed from the parent's, so that its batches are
    not phase 1's again). ``overrides`` go to the config (e.g. ``checkpoint_every``)."""
    from flatlib.experiments import continuation  # noqa: PLC0415 - experiments imports this module's users

    supervised_tokens(base)  # the continuation inherits base's objective: tau counts sentences only if single-mask
    steps = steps_for_clock(tau, lr, batch_size)
    if steps < 1:
        raise ValueError(f"tau: {tau} is less than one step at lr {lr} and batch size {batch_size}")
    settings = {"checkpoint_every": steps, "eval_every": steps, **overrides}
    return continuation(base, from_step=from_step, steps=steps, optimizer="sgd", lr=lr, batch_size=batch_size,
                        weight_decay=0.0, momentum=0.0, seed=derived_seed("clock noise", base.seed, noise_seed),
                        **settings)


def anneal(parent: PretrainConfig, from_step: int, lr: float, steps: int, batch_size: int, seed: int,
           **overrides: Any) -> PretrainConfig:
    """The closing anneal: SGD from ``parent``'s checkpoint at ``from_step``, the learning rate
    falling linearly from ``lr`` to 0 over ``steps`` steps at ``batch_size`` sentences, no weight
    decay, batches from ``seed``."""
    from flatlib.experiments import continuation  # noqa: PLC0415

    settings = {"checkpoint_every": steps, "eval_every": steps, **overrides}
    return continuation(parent, from_step=from_step, steps=steps, optimizer="sgd", lr=lr, batch_size=batch_size,
                        weight_decay=0.0, momentum=0.0, schedule="linear", min_lr=0.0, seed=seed, **settings)


def clock_runs(base: PretrainConfig, taus: list[float], lr: float, batch_size: int, anneal_steps: int,
               anneal_batch_size: int, noise_seed: int) -> dict[float, tuple[PretrainConfig | None, PretrainConfig]]:
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
            raise ValueError(f"taus: {positive} do not map to distinct step counts >= 1 at lr {lr}, batch {batch_size}")
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


# ---------------------------------------------------------------------------- notebook 02's dose-response
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
    every ``tau > 0``, each dose closed by an anneal; the ``tau = 0`` control once per lineage (the
    anneal alone from phase 1, on noise seed 0's anneal batches)."""
    points = []
    for (language, lineage), base in phase1.items():
        for noise in range(clock["noise_seeds"]):
            runs = clock_runs(base, list(clock["taus"]), clock["lr"], clock["batch_size"], clock["anneal_steps"],
                              clock["anneal_batch_size"], noise)
            points += [ClockPoint(language, lineage, noise, tau, sgd, anneal) for tau, (sgd, anneal) in runs.items()
                       if tau > 0 or noise == 0]
    return points


def lineage_effects(frame: pd.DataFrame, column: str) -> pd.DataFrame:
    """Per ``(language, tau > 0, lineage)``: the mean of ``column`` over the noise seeds minus the
    lineage's control (``tau = 0``); ``frame`` has the columns language, lineage, noise, tau and
    ``column``. The lineages are the independent units (their noise seeds share a checkpoint and a
    control), so ``flatlib.claims.paired_effect`` takes one difference per lineage."""
    control = frame[frame.tau == 0].groupby(["language", "lineage"])[column].mean()
    doses = frame[frame.tau > 0].groupby(["language", "tau", "lineage"])[column].mean()
    out = doses - control.reindex(doses.index.droplevel("tau")).to_numpy()
    return out.rename("effect").reset_index()


def dose_response(frame: pd.DataFrame, column: str) -> pd.DataFrame:
    """Per ``(language, tau)``: the mean of ``column`` (lineage means, then their mean) with its 95%
    t-interval over lineages (``level_low``, ``level_high``), and for ``tau > 0`` the paired effect
    against the control with its interval (``effect``, ``effect_low``, ``effect_high``, ``lineages``)."""
    rows = []
    frame = frame[frame.groupby("language")[column].transform(lambda v: v.notna().any())]  # languages it applies to
    means = frame.groupby(["language", "tau", "lineage"])[column].mean()
    effects = lineage_effects(frame, column)
    for (language, tau), values in means.groupby(level=["language", "tau"]):
        level = t_interval(values.to_numpy())
        row = {"language": language, "tau": tau, "level": level.estimate, "level_low": level.low,
               "level_high": level.high, "lineages": level.n}
        if tau > 0:
            d = effects[(effects.language == language) & (effects.tau == tau)]["effect"].to_numpy()
            effect = t_interval(d)
            row.update({"effect": effect.estimate, "effect_low": effect.low, "effect_high": effect.high})
        rows.append(row)
    return pd.DataFrame(rows)


def decide(frame: pd.DataFrame, language: str, column: str, predicted: int, converged: bool) -> dict[str, Any]:
    """The verdict on ``column`` at the largest dose for ``language`` (flatlib.claims rules "equal
    loss" and "paired effect"): "not tested" if phase 1 did not converge or the largest dose is not
    at equal loss with the control (mean gaps over lineages); else ``paired_effect`` of the
    per-lineage effects with the ``predicted`` sign."""
    frame = frame[frame.language == language]
    tau = float(frame.tau.max())
    gaps = frame.groupby(["tau", "lineage"])["gap"].mean().groupby(level="tau").mean()
    same_loss = equal_loss(float(gaps.loc[0]), float(gaps.loc[tau]))
    effects = lineage_effects(frame, column)
    verdict, interval = paired_effect(effects[effects.tau == tau]["effect"].to_numpy(), predicted)
    if not (converged and same_loss):
        verdict = "not tested"
    return {"tau": tau, "verdict": verdict, "effect": interval, "gap_control": float(gaps.loc[0]),
            "gap_dose": float(gaps.loc[tau]), "equal_loss": same_loss, "converged": converged}
