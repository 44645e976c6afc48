"""Notebook 05's figures: accuracy against the traces and the gap, and the correlations' forest plot
(tables of ``flatlib.analysis.correlations``)."""

from __future__ import annotations

from typing import Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from flatlib.claims import EQUIVALENCE_RHO

# how a model was made: the same colours as notebooks 02 and 04 (sizes in green)
ORIGIN_COLORS = {"02 phase 1": "0.25", "02 sgd clock": "C4", "02 sgd": "C0", "02 adamw": "C1",
                 "03 sizes": "C2", "04 adversarial": "C3"}
# (column, its SE's column, axis label) of the three rows of accuracy_vs_trace_and_gap
_ROWS = (("invariant trace", "invariant trace_se", "invariant trace (full gauge fixed)"),
         ("raw trace", "raw trace_se", "raw Hessian trace (mean loss, nats)"),
         ("gap", "gap_se", "gap to the optimum (nats)"))
# (correlation, colour) of the forest plot's three lines per row
_FOREST = (("invariant trace|gap", "C0"), ("raw trace", "0.5"), ("gap", "C1"))


def accuracy_vs_trace_and_gap(models: pd.DataFrame, name: str, tasks: Sequence[str],
                              families: Sequence[str]) -> plt.Figure:
    """Language ``name``'s rows of ``models`` (the model table, within ε): one column per task,
    probe accuracy against the invariant trace, the raw trace and the gap (rows), with ±1 SE error
    bars; colour: the origin (``ORIGIN_COLORS``); marker: the family, by its place among the sorted
    ``families`` (all the families of the notebook, so that a family has one marker in every figure)."""
    frame = models[models.language == name]
    if frame.empty:
        raise ValueError(f"models: no model of language {name!r} to plot")
    markers = dict(zip(sorted(families), "osD^v"))
    fig, axes = plt.subplots(3, len(tasks), figsize=(5.4 * len(tasks), 12), squeeze=False)
    for c, task in enumerate(tasks):
        for r, (column, se, label) in enumerate(_ROWS):
            ax = axes[r, c]
            for (origin, family), d in frame.groupby(["origin", "family"]):
                ax.errorbar(d[column], d[f"acc {task}"], xerr=d[se], fmt=markers[family],
                            color=ORIGIN_COLORS[origin],
                            ms=5, alpha=0.8, elinewidth=0.7, label=f"{origin} ({family})")
            ax.set(title=f"{name} · task {task}", xlabel=label, ylabel="probe accuracy")
            if c == len(tasks) - 1:
                ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    return fig


def correlation_forest(correlations: pd.DataFrame) -> plt.Figure:
    """Spearman's ρ with its interval per row of ``correlations`` (``flatlib.analysis.correlations.
    correlation_table``): the partial correlation with the invariant trace given the gap (blue), with
    the raw trace (grey) and with the gap (orange); the band is ±``EQUIVALENCE_RHO``."""
    if not len(correlations):
        raise ValueError("correlations: no row to plot")
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(correlations) + 1.5))
    labels = [f"{r.language} · {r.family} · {r.task} (n={r.models})" for r in correlations.itertuples()]
    y = np.arange(len(correlations))
    for k, (x, color) in enumerate(_FOREST):
        value = correlations[f"spearman acc~{x}"].to_numpy()
        low, high = (correlations[f"spearman acc~{x} low"].to_numpy(),
                     correlations[f"spearman acc~{x} high"].to_numpy())
        ax.errorbar(value, y + (k - 1) * 0.25, xerr=[value - low, high - value], fmt="o", color=color,
                    capsize=3, label=f"accuracy ~ {x}" + (" (partial)" if "|" in x else ""))
    ax.axvline(0, color="0.3", lw=1)
    ax.axvspan(-EQUIVALENCE_RHO, EQUIVALENCE_RHO, color="0.9", zorder=0)
    ax.set_yticks(y, labels, fontsize=8)
    ax.set(xlim=(-1.05, 1.05), xlabel="Spearman ρ (95% bootstrap CI over lineages)")
    # above: no data hidden
    ax.legend(fontsize=8, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=3, frameon=False)
    fig.tight_layout()
    return fig
