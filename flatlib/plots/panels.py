"""Panels more than one notebook's figures draw: the gap to the optimum during training, on a log
scale, against the tolerance ε (notebooks 02 and 03)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import matplotlib.pyplot as plt


def mark_epsilon(ax: plt.Axes, epsilon: float) -> None:
    """The tolerance ``epsilon`` (nats) as a dotted line on a log-scaled gap axis."""
    ax.axhline(epsilon, color="0.3", ls=":", lw=1.2, label=f"ε = {epsilon}")
    ax.set_yscale("log")


def gap_panel(ax: plt.Axes, curves: Iterable[tuple[str, Sequence, Sequence, Sequence, Sequence]],
              epsilon: float, title: str, lw: float = 1.5) -> None:
    """The gap during training: one line and band per curve ``(label, step, gap, low, high)``, in
    colours C0, C1, ... in order, then ε (``mark_epsilon``), the axis labels and the legend."""
    for i, (label, step, gap, low, high) in enumerate(curves):
        ax.plot(step, gap, color=f"C{i}", lw=lw, label=label)
        ax.fill_between(step, low, high, color=f"C{i}", alpha=0.2)
    mark_epsilon(ax, epsilon)
    ax.set(title=title, xlabel="step", ylabel="gap (nats, log)")
    ax.legend(fontsize=8)
