"""Notebook 03's figures (model size), from the tables of ``flatlib.analysis.size``: the gap during training
per width, accuracy against size, and the gap and traces against size. Hollow markers are widths whose
seeds did not all reach ε (``flatlib.analysis.size.converged``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from flatlib.analysis.size import converged, parameter_counts, per_width
from flatlib.plots.panels import gap_panel, mark_epsilon


def gap(curves: pd.DataFrame, sizes: pd.DataFrame, languages: Sequence[str], epsilon: float) -> plt.Figure:
    """Per language, the gap to the optimum during training (``flatlib.analysis.size.gap_curves``) of every
    width: mean over seeds, band from min to max over seeds, ε dotted; log scale."""
    params = parameter_counts(sizes)
    widths = [int(w) for w in sorted(curves["width"].unique())]
    fig, axes = plt.subplots(1, len(languages), figsize=(6.5 * len(languages), 4.3), squeeze=False)
    for ax, name in zip(axes[0], languages):
        bands = []
        for w in widths:
            runs = curves[(curves.language == name) & (curves.width == w)]
            per_seed = pd.concat([g.set_index("step")["gap"] for _, g in runs.groupby("seed")], axis=1)
            bands.append((f"width {w} ({int(params[name, w]) / 1e3:.0f}k params)", per_seed.index,
                          per_seed.mean(axis=1), per_seed.min(axis=1), per_seed.max(axis=1)))
        gap_panel(ax, bands, epsilon, f"{name}: gap to the optimum by width", lw=1.8)
    fig.tight_layout()
    return fig


def accuracy(measured: pd.DataFrame, sizes: pd.DataFrame, lookup: Mapping[str, Mapping[str, Any]],
             tasks: Mapping[str, Sequence[str]], finetune_epochs: int) -> plt.Figure:
    """One panel per (language, task): probe (solid) and fine-tuning (dashed) accuracy against the
    parameter count (log), mean ± 95% CI over seeds, and the lookup-table probe (grey)."""
    ok, params = converged(sizes), parameter_counts(sizes)
    n_tasks = max(len(t) for t in tasks.values())
    fig, axes = plt.subplots(len(tasks), n_tasks, figsize=(5.5 * n_tasks, 4.2 * len(tasks)), squeeze=False)
    for r, (name, language_tasks) in enumerate(tasks.items()):
        frame = measured[measured.language == name]
        for c in range(n_tasks):
            ax = axes[r, c]
            if c >= len(language_tasks):
                ax.axis("off")
                continue
            task = language_tasks[c]
            finetune_label = f"fine-tune (LP-FT, {finetune_epochs} epochs)"
            for kind, style, color, label in [("probe", "-", "C0", "linear probe"),
                                              ("finetune", "--", "C2", finetune_label)]:
                st = per_width(frame, f"{kind} {task}")
                x = np.array([params[name, w] for w in st.index])
                ax.errorbar(x, st["mean"], yerr=st["ci"], color=color, ls=style, capsize=3, lw=1.6,
                            label=label)
                for xi, w, mean in zip(x, st.index, st["mean"]):
                    ax.plot(xi, mean, "o", color=color, mfc=color if ok[name, w] else "white", ms=7)
            ax.axhline(lookup[name][task]["accuracy"], color="0.4", ls="-.", lw=1.2,
                       label=f"lookup-table probe {lookup[name][task]['accuracy']:.3f}")
            ax.set_xscale("log")
            ax.set(title=f"{name} · task {task}", xlabel="parameters (log)", ylabel="accuracy")
            ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def traces(measured: pd.DataFrame, sizes: pd.DataFrame, languages: Sequence[str],
           epsilon: float) -> plt.Figure:
    """Per language, against the parameter count (log): the final gap (ε dotted), the raw trace, the
    raw trace after widening and the invariant trace after widening into the widest width; mean ±
    95% CI over seeds, the seeds as dots."""
    ok, params = converged(sizes), parameter_counts(sizes)
    widths = [int(w) for w in sorted(sizes["width"].unique())]
    widest = widths[-1]
    fig, axes = plt.subplots(len(languages), 4, figsize=(21, 4.2 * len(languages)), squeeze=False)
    for r, name in enumerate(languages):
        frame = measured[measured.language == name]
        x_of = {w: params[name, w] for w in widths}
        panels = [("gap", "final gap (nats)"), ("raw trace", "raw trace"),
                  ("widened trace", f"raw trace after widening to {widest}"),
                  ("widened invariant trace", f"invariant trace after widening to {widest}")]
        for ax, (column, title) in zip(axes[r], panels):
            st = per_width(frame, column)
            x = np.array([x_of[w] for w in st.index])
            ax.errorbar(x, st["mean"], yerr=st["ci"], color="C0", capsize=3, lw=1.6,
                        label="mean ± 95% CI over seeds")
            for w in widths:
                d = frame[frame.width == w]
                ax.plot(np.full(len(d), x_of[w]) * np.linspace(0.95, 1.05, len(d)), d[column], ".",
                        color="C1", alpha=0.8, mfc="C1" if ok[name, w] else "white")
            if column == "gap":
                mark_epsilon(ax, epsilon)
            else:
                values = frame[column]
                span = values.max() - values.min()
                ax.set_ylim(max(0.0, values.min() - 0.3 * span), values.max() + 0.3 * span)
            ax.set_xscale("log")
            ax.set(title=f"{name}: {title}", xlabel="parameters (log)", ylabel=title)
            ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
