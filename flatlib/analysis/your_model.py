"""Notebook 07 (flatlib on your model): its parameters, the measurement as a table, the checks that
must hold whatever the outcome, and the checked summary. Training and measuring are
``flatlib.measurement.hf.train_mlm`` and ``.measure`` (a user's own model calls them the same way)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import pandas as pd

from flatlib.profiles import resolve

if TYPE_CHECKING:
    from flatlib.measurement.hf import TrainHistory

TRACES = ("raw", "norm", "full")  # hf.measure's traces: raw, LayerNorm-only, full gauge


def parameters(profile: str, seed: int = 0, kind: str | None = None) -> dict[str, Any]:
    """Notebook 07's parameters: the profile resolved (``flatlib.profiles.resolve``) with its
    ``your_model`` section, ``kind`` ("bert" | "roberta"; None: the profile's) replacing the model kind.
    Invalid values raise ``ValueError`` naming the parameter."""
    return resolve(profile, seed=seed, your_model=None if kind is None else {"kind": kind})


def measurement_table(measured: dict[str, Any]) -> pd.DataFrame:
    """``measure``'s numbers as a table: quantity, value, its uncertainty and what that is."""
    m = measured
    rows = [
        ("exact gap, words' softmax (nats)", m["gap"], m["gap_se"], "SE over rows"),
        ("loss on the sampled words (nats)", m["val_loss"], math.nan, ""),
        ("optimum on the sampled words (nats)", m["val_optimum"], math.nan, ""),
        ("special-token mass, mean over rows", m["special_mass"], math.nan, ""),
        ("special-token mass, max over rows", m["special_mass_max"], math.nan, ""),
        ("gap of the full softmax (nats)", m["gap_full"], math.nan, ""),
        ("raw Tr H, Hutchinson", m["hutchinson"], m["hutchinson_se"], "SE over probes"),
        ("raw Tr H, body + exact gauged diagonal", m["trace_raw"], m["trace_se"], "SE over probes (body)"),
        ("LayerNorm-only invariant trace", m["trace_norm"], m["trace_se"], "SE over probes (body)"),
        ("full-gauge invariant trace", m["trace_full"], m["trace_se"], "SE over probes (body)"),
        ("rescaled: raw Tr H", m["rescaled_raw"], m["rescaled_se"], "SE over probes (body)"),
        ("rescaled: LayerNorm-only", m["rescaled_norm"], m["rescaled_se"], "SE over probes (body)"),
        ("rescaled: full gauge", m["rescaled_full"], m["rescaled_se"], "SE over probes (body)"),
        (f"linear probe, {m['task']}", m["probe"], m["probe_ci95"], "95% CI half-width over splits"),
        (f"Bayes accuracy, {m['task']}", m["bayes"], m["bayes_se"], "SE over sentences"),
        (f"majority class, {m['task']}", m["chance"], math.nan, ""),
    ]
    return pd.DataFrame(rows, columns=["quantity", "value", "±", "uncertainty"]).set_index("quantity")


INVARIANCE_RTOL = 1e-3  # the full-gauge trace of one function in two coordinates (float32 rounding)


def failed_checks(measured: dict[str, Any], history: TrainHistory | None = None) -> list[str]:
    """What must hold whatever the outcome, each broken one as a message (empty: all hold): every
    number finite (the Bayes accuracy may be NaN: no latent), gap >= -3 SE, special mass in [0, 1],
    ``full <= LayerNorm-only <= raw`` (a minimum over more groups; 1e-9 relative), the full-gauge
    trace the same on the rescaled function within ``INVARIANCE_RTOL`` relative, the probe accuracy
    in [0, 1] and not above the Bayes accuracy beyond their uncertainties (3 SE), and with a
    ``history``: a finite gap at every evaluation, lower at the end than at step 0."""
    m, problems = measured, []
    numbers = [k for k, v in m.items() if isinstance(v, float) and k not in ("bayes", "bayes_se")]
    problems += [f"{k} = {m[k]} is not finite" for k in numbers if not math.isfinite(m[k])]
    if m["gap"] < -3 * m["gap_se"]:
        problems.append(f"gap = {m['gap']:.4g} < -3 SE ({m['gap_se']:.2g}): a KL divergence is >= 0")
    if not 0 <= m["special_mass"] <= 1:
        problems.append(f"special_mass = {m['special_mass']} outside [0, 1]")
    tol = 1e-9 * abs(m["trace_raw"])
    for prefix in ("trace", "rescaled"):
        full, norm, raw = (m[f"{prefix}_{k}"] for k in ("full", "norm", "raw"))
        if not full <= norm + tol <= raw + 2 * tol:
            problems.append(f"{prefix}: expected full <= LayerNorm-only <= raw, got {full:.6g}, {norm:.6g}, "
                            f"{raw:.6g}")
    change = abs(m["rescaled_full"] - m["trace_full"]) / abs(m["trace_full"])
    if not change <= INVARIANCE_RTOL:
        problems.append(f"the full-gauge trace moved by {change:.2g} relative under a rescaling of its "
                        f"groups ({m['trace_full']:.6g} -> {m['rescaled_full']:.6g}; allowed "
                        f"{INVARIANCE_RTOL})")
    if not 0 <= m["probe"] <= 1:
        problems.append(f"probe = {m['probe']} outside [0, 1]")
    if math.isfinite(m["bayes"]):
        margin = 3 * math.hypot(m["probe_ci95"] / 1.96 if math.isfinite(m["probe_ci95"]) else 0.0,
                                m["bayes_se"])
        if m["probe"] > m["bayes"] + margin:
            problems.append(f"probe {m['probe']:.4f} beats the Bayes accuracy {m['bayes']:.4f} by more than "
                            "3 SE")
    if history is not None:
        gaps = history.table["gap"]
        if not gaps.map(math.isfinite).all():
            problems.append("training: a non-finite gap in the history")
        elif not gaps.iloc[-1] < gaps.iloc[0]:
            problems.append(f"training: the gap did not fall ({gaps.iloc[0]:.4g} -> {gaps.iloc[-1]:.4g})")
    return problems


def summary(measured: dict[str, Any], history: TrainHistory, epsilon: float) -> str:
    """Notebook 07's rounded summary lines: the gap against ``epsilon`` (within or not), the traces
    before and after the rescaling, the probe against the Bayes accuracy."""
    m, final = measured, history.final
    within = "within" if m["gap"] <= epsilon else "NOT within"
    how = "loaded from the run store" if history.cached else f"trained in {history.seconds:.0f} s"
    return "\n".join([
        f"{int(final['step'])} steps ({how}): exact gap {m['gap']:.4f} ± {m['gap_se']:.4f} nats, {within} "
        f"ε = {epsilon} of the optimum; special-token mass {m['special_mass']:.3f}, full-softmax gap "
        f"{m['gap_full']:.3f}",
        f"traces (± {m['trace_se']:.2f}): raw {m['trace_raw']:.2f} -> {m['rescaled_raw']:.2f}, "
        f"LayerNorm-only {m['trace_norm']:.2f} -> {m['rescaled_norm']:.2f}, full gauge {m['trace_full']:.2f} "
        f"-> {m['rescaled_full']:.2f} (the same function rescaled)",
        f"probe {m['task']}: {m['probe']:.3f} ± {m['probe_ci95']:.3f} against Bayes {m['bayes']:.3f} ± "
        f"{1.96 * m['bayes_se']:.3f} (majority class {m['chance']:.3f})",
    ])
