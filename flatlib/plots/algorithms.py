"""Notebook 04's figures: the continuations of AdamW, SGD and the adversary (``continuations``) and
the paper's table as a figure (``accuracy_and_trace``), from the tables of ``flatlib.analysis.algorithms``."""

from __future__ import annotations

from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from flatlib.analysis.algorithms import ALGORITHMS, PHASE1, labels, tasks
from flatlib.runner.experiments import training_seeds
from flatlib.stats import mean_ci

COLORS = {"adamw": "C1", "sgd": "C0", "adversarial": "C3", "lookup": "0.5", PHASE1: "0.2"}


def continuations(curves: pd.DataFrame, params: dict[str, Any]) -> plt.Figure:
    """One row per language of ``algorithms.languages``. Left: each algorithm's gap to the optimum
    during the continuation (``curves``, ``flatlib.analysis.algorithms.curves_table``; mean over seeds, band
    min-max), with ε. Right: the adversary's downstream loss ``adv_loss`` per seed."""
    names, seed_list, label = params["algorithms"]["languages"], training_seeds(params), labels(params)
    eps, adversary = params["pretraining"]["epsilon"], params["algorithms"]
    fig, axes = plt.subplots(len(names), 2, figsize=(13, 4.2 * len(names)), squeeze=False)
    for r, name in enumerate(names):
        ax_gap, ax_adv = axes[r]
        for a in ALGORITHMS:
            mine = curves[(curves.language == name) & (curves.algorithm == a)]
            gaps = mine.pivot(index="step", columns="seed", values="gap")[seed_list]
            ax_gap.plot(gaps.index, gaps.mean(axis=1), color=COLORS[a], lw=1.8, label=label[a])
            ax_gap.fill_between(gaps.index, gaps.min(axis=1), gaps.max(axis=1), color=COLORS[a], alpha=0.2)
        ax_gap.axhline(eps, color="0.3", ls=":", lw=1.2, label=f"ε = {eps}")
        ax_gap.set_yscale("log")
        ax_gap.set(title=f"{name}: gap during the continuation", xlabel="continuation step",
                   ylabel="gap (nats, log)")
        ax_gap.legend(fontsize=8)
        for i, s in enumerate(seed_list):
            m = curves[(curves.language == name) & (curves.algorithm == "adversarial") & (curves.seed == s)]
            ax_adv.plot(m["step"], m["adv_loss"], color=COLORS["adversarial"],
                        alpha=0.4 + 0.6 * i / max(1, len(seed_list) - 1), lw=1.2, label=f"seed {s}")
        task, weight = adversary["tasks"][name], adversary["weights"][name]
        ax_adv.set(title=f"{name}: adversary's L_down (task {task}, λ = {weight})",
                   xlabel="continuation step", ylabel="cross-entropy of the refit head (nats)")
        ax_adv.legend(fontsize=8)
    fig.tight_layout()
    return fig


def accuracy_and_trace(table: pd.DataFrame, lookup: dict[str, dict[str, dict[str, Any]]],
                       params: dict[str, Any]) -> plt.Figure:
    """One row per language. Left: probe accuracy per task of the phase-1 checkpoint, each algorithm
    (mean ± 95% CI over seeds, from ``table``, ``flatlib.analysis.algorithms.measurement_table``) and the
    lookup table (± its CI over resplits, from ``lookup``). Right: the invariant trace of each
    model (mean ± 95% CI over seeds, small dots the seeds; the view is set by the seeds' values)."""
    names, label, task_names = params["algorithms"]["languages"], labels(params), tasks(params)
    fig, axes = plt.subplots(len(names), 2, figsize=(14, 4.3 * len(names)), squeeze=False,
                             gridspec_kw={"width_ratios": [1.6, 1]})
    order = [PHASE1, *ALGORITHMS]
    for r, name in enumerate(names):
        names_tasks = task_names[name]
        frame = table[table.language == name]
        ax_acc, ax_trace = axes[r]
        width = 0.8 / (len(order) + 1)
        for k, a in enumerate(order + ["lookup"]):
            means, cis = [], []
            for t in names_tasks:
                if a == "lookup":
                    means.append(lookup[name][t]["accuracy"])
                    cis.append(lookup[name][t]["ci95"])
                else:
                    mean, ci = mean_ci(frame.loc[frame.algorithm == a, f"acc {t}"].to_numpy())
                    means.append(mean)
                    cis.append(ci)
            ax_acc.errorbar(np.arange(len(names_tasks)) + (k - len(order) / 2) * width, means, yerr=cis,
                            fmt="o", ms=8, capsize=4, color=COLORS[a], label=label[a])
        values = frame[[f"acc {t}" for t in names_tasks]].to_numpy()
        low = min(values.min(), min(lookup[name][t]["accuracy"] for t in names_tasks))
        ax_acc.set_ylim(max(0.0, low - 0.08), min(1.0, values.max() + 0.08))
        ax_acc.set_xticks(np.arange(len(names_tasks)), [f"task {t}" for t in names_tasks])
        ax_acc.set(title=f"{name}: linear-probe accuracy (mean ± 95% CI)", ylabel="accuracy")
        ax_acc.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5))
        for k, a in enumerate(order):
            d = frame[frame.algorithm == a]["invariant_trace"].to_numpy()
            mean, ci = mean_ci(d)
            ax_trace.errorbar(k, mean, yerr=ci, fmt="o", ms=8, capsize=4, color=COLORS[a])
            ax_trace.plot(np.full(len(d), k + 0.15), d, ".", color=COLORS[a], ms=5, alpha=0.7)
        lowest, highest = frame["invariant_trace"].min(), frame["invariant_trace"].max()
        span = highest - lowest
        ax_trace.set_ylim(max(0.0, lowest - 0.4 * span), highest + 0.4 * span)
        ax_trace.set_xticks(range(len(order)), [label[a].split(" (")[0] for a in order], rotation=20,
                            fontsize=8)
        ax_trace.set(title=f"{name}: invariant trace (small dots: seeds)",
                     ylabel="invariant trace (mean loss, nats)")
    fig.tight_layout()
    return fig
