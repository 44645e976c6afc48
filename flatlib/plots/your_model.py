"""Notebook 07's figure, from ``flatlib.measurement.hf``'s training history and measurement."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import matplotlib.pyplot as plt

from flatlib.analysis.your_model import TRACES

if TYPE_CHECKING:
    from flatlib.measurement.hf import TrainHistory


def your_model_figure(history: TrainHistory, measured: dict[str, Any],
                      epsilon: float | None = None) -> tuple[Any, str]:
    """Notebook 07's figure: the exact gap during training (words' softmax and full softmax, 95% band;
    ``epsilon``, if given, as a dashed line),
    the three traces of the trained model and of the same function rescaled (95% error bars: the
    body's Hutchinson SE), and the probe against the Bayes accuracy (95% intervals). Returns the figure
    and the note that says what the error bars are."""
    m, t = measured, history.table
    fig, (left, middle, right) = plt.subplots(1, 3, figsize=(15, 4.2), width_ratios=(1.2, 1.2, 0.8))
    for column, label in (("gap", "gap, words' softmax"), ("gap_full", "gap, full softmax")):
        left.plot(t["step"], t[column], marker="o", ms=3, label=label)
    band = 1.96 * t["gap_se"]
    left.fill_between(t["step"], (t["gap"] - band).clip(lower=1e-6), t["gap"] + band, alpha=0.3)
    if epsilon is not None:
        left.axhline(epsilon, color="0.3", ls="--", label=f"ε = {epsilon}")
    left.set(yscale="log", xlabel="training step", ylabel="exact gap to the optimum (nats)",
             title=f"training: final gap {m['gap']:.4f} ± {m['gap_se']:.4f}")
    left.legend()
    labels, width = ("raw", "LayerNorm-only", "full gauge"), 0.38
    for k, (prefix, name) in enumerate((("trace", "trained model"), ("rescaled", "same function, rescaled"))):
        values = [m[f"{prefix}_{key}"] for key in TRACES]
        bars = middle.bar([i + (k - 0.5) * width for i in range(3)], values, width,
                          yerr=1.96 * m[f"{prefix}_se"], capsize=3, label=name)
        middle.bar_label(bars, fmt="%.2f", fontsize=8, padding=2)
    middle.set_xticks(range(3), labels)
    middle.set(yscale="log", ylabel="Hessian trace of the expected loss (log axis)",
               title="traces: the model and the same function rescaled")
    middle.margins(y=0.15)
    middle.legend(loc="upper right")
    values = [m["probe"], m["bayes"]]
    errors = [m["probe_ci95"], 1.96 * m["bayes_se"]]
    right.bar(["linear probe", "Bayes"], values, yerr=errors, capsize=4, color=["C0", "0.6"])
    right.axhline(m["chance"], color="0.3", ls=":", label="majority class")
    right.set(ylim=(0, 1), ylabel="accuracy", title=f"task {m['task']}")
    right.legend(loc="lower right")
    fig.tight_layout()
    note = ("95% intervals: gap ±1.96 SE over validation pairs; traces ±1.96 SE over Hutchinson probes (the "
            "body; the gauged part is exact); probe t-interval over splits; Bayes ±1.96 SE over sentences")
    return fig, note
