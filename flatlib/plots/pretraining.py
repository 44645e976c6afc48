"""Notebook 02's figures: phase-1 training curves, the LayerNorm gauge, and the dose-response on the
theory's clock."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from flatlib.analysis.pretraining import dose_response
from flatlib.plots.panels import gap_panel
from flatlib.runner.runs import Run


def training_curves(runs: dict[tuple[str, int], Run], optima: dict[str, float], epsilon: float) -> plt.Figure:
    """Per language (columns): validation loss (solid) and training loss (faint) of every seed
    against the exact optimum (top), and the gap to the optimum with ±1 SE bands against ``epsilon``
    (bottom, log scale). ``runs`` is ``{(language, seed): run}``, ``optima`` the exact optimal
    validation loss per language."""
    names = list(dict.fromkeys(name for name, _ in runs))
    fig, axes = plt.subplots(2, len(names), figsize=(6.5 * len(names), 7.5), sharex="col", squeeze=False)
    for c, name in enumerate(names):
        top, bottom = axes[0, c], axes[1, c]
        finals, gaps = [], []
        for i, seed in enumerate(s for n, s in runs if n == name):
            m = runs[name, seed].metrics()
            top.plot(m["step"], m["val_loss"], color=f"C{i}", lw=1.5, label=f"seed {seed}")
            top.plot(m["step"], m["train_loss"], color=f"C{i}", lw=1, alpha=0.35)
            gaps.append((f"seed {seed}", m["step"], m["gap"], m["gap"] - m["gap_se"], m["gap"] + m["gap_se"]))
            finals.append(m["gap"].iloc[-1])
        optimum = optima[name]
        top.axhline(optimum, color="k", ls="--", lw=1.2, label=f"exact optimum {optimum:.3f}")
        top.set_ylim(optimum - 0.02, optimum + max(0.3, 4 * max(finals)))
        top.set(title=f"{name}: single-mask MLM loss (nats/token)", ylabel="loss (nats)")
        top.legend(fontsize=8)
        gap_panel(bottom, gaps, epsilon, f"{name}: gap to the optimum (KL), ±1 SE")
    fig.tight_layout()
    return fig


def gauge(points: pd.DataFrame, seed: int) -> plt.Figure:
    """Raw against invariant trace (95% CI bars, log scale) of one function in the parameterizations
    of ``points`` (``flatlib.analysis.pretraining.gauge_tables``), one panel per language; with the full gauge
    (``invariant_trace_layernorm`` present) the LayerNorm-only minimum between them (no bar: it shares the
    full trace's body and noise)."""
    names = list(dict.fromkeys(points.language))
    full = "invariant_trace_layernorm" in points and points["invariant_trace_layernorm"].notna().any()
    fig, axes = plt.subplots(1, len(names), figsize=((8.5 if full else 6.5) * len(names), 4), squeeze=False)
    width = 0.27 if full else 0.4
    for ax, name in zip(axes[0], names):
        d = points[points.language == name]
        x = np.arange(len(d))
        ax.bar(x - (width if full else 0.2), d["trace"], width, yerr=1.96 * d["trace_se"], capsize=3,
               color="0.6", label="raw trace (Hutchinson)")
        if full:
            ax.bar(x, d["invariant_trace_layernorm"], width, color="C1", label="LayerNorm gauge fixed only")
        ax.bar(x + (width if full else 0.2), d["invariant_trace"], width, yerr=1.96 * d["invariant_trace_se"],
               capsize=3,
               color="C0", label="invariant trace (" + ("full gauge: LayerNorm, Q/K, V/O" if full else
                                                         "LayerNorm gauge fixed") + ")")
        ax.set_yscale("log")
        labels = [p.replace(" into the head", "\ninto the head").replace(", head", ",\nhead")
                  .replace(" per head", "\nper head") for p in d["parameterization"]]
        ax.set_xticks(x, labels, fontsize=8)
        ax.set(title=f"{name}: one function, {len(d)} parameterizations (seed {seed})", ylabel="trace (log)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def effect_vs_l2(effects: pd.DataFrame) -> plt.Figure:
    """The clock's transfer effect (largest dose - control, points of accuracy) against the probe's L2
    strength, one panel per language, one line per task, with 95% t-intervals over lineages
    (``flatlib.analysis.pretraining.effect_vs_l2``); a ring marks each task's most often chosen strength."""
    names = list(dict.fromkeys(effects.language))
    fig, axes = plt.subplots(1, len(names), figsize=(5.2 * len(names), 3.6), squeeze=False)
    for ax, name in zip(axes[0], names):
        mine = effects[effects.language == name]
        for i, (task, d) in enumerate(mine.groupby("task", sort=False)):
            d = d.sort_values("l2")
            ax.plot(d.l2, 100 * d.effect, marker=".", color=f"C{i}", label=task)
            ax.fill_between(d.l2, 100 * d.low, 100 * d.high, color=f"C{i}", alpha=0.15)
            top = d.loc[d.chosen.idxmax()]
            ax.plot(top.l2, 100 * top.effect, "o", mfc="none", ms=10, color=f"C{i}")
        ax.axhline(0, color="k", lw=0.8)
        ax.set_xscale("log")
        ax.set(title=f"{name}: transfer effect at a fixed L2", xlabel="probe L2 strength",
               ylabel="dose - control (points)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def clock_dose_response(measurements: pd.DataFrame, taus: list[float],
                        tasks: dict[str, list[str]]) -> plt.Figure:
    """Per language (rows): gap, raw trace, invariant trace and the standard probe's accuracy per
    task against the dose τ (equally spaced). Large dots with 95% CI bars over lineages
    (``flatlib.analysis.pretraining.dose_response``), small dots the lineage means, dashed the phase-1 end's
    mean. ``measurements`` is notebook 02's table (``flatlib.measurement.measure.measurement_frame``)."""
    clock = measurements[measurements.continuation == "sgd clock"]
    names = list(tasks)
    panels = ["gap", "trace", "invariant_trace"]
    n_cols = len(panels) + max(len(t) for t in tasks.values())
    fig, axes = plt.subplots(len(names), n_cols, figsize=(3.6 * n_cols, 3.4 * len(names)), squeeze=False)
    for r, name in enumerate(names):
        columns = panels + [f"acc {task}" for task in tasks[name]]
        mine = clock[clock.language == name]
        for c, ax in enumerate(axes[r]):
            if c >= len(columns):
                ax.axis("off")
                continue
            column = columns[c]
            table = dose_response(mine, column)
            x = np.array([taus.index(t) for t in table.tau])
            ax.errorbar(x, table.level, yerr=[table.level - table.level_low, table.level_high - table.level],
                        color="C0", marker="o", capsize=3, lw=1.8)
            lineage_means = mine.groupby(["tau", "lineage"])[column].mean().reset_index()
            ax.plot([taus.index(t) for t in lineage_means.tau], lineage_means[column], ".", color="C0",
                    alpha=0.35)
            phase1 = measurements[(measurements.language == name) & (measurements.continuation == "phase 1")]
            ax.axhline(phase1[column].mean(), color="k", ls="--", lw=1)
            ax.set_xticks(range(len(taus)), [str(t) for t in taus])
            ax.set(title=f"{name}: {column.replace('_', ' ')}", xlabel="τ = η²k/B (0: anneal only)")
    fig.tight_layout()
    return fig
