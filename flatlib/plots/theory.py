"""The three figures of notebook 06, each from its section's result: ``(figure, note)``, the note
saying what the error bars are (for ``flatlib.plots.style.savefig``'s footer)."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np

from flatlib.theory.implicit_bias import SgdVsFlow
from flatlib.theory.noise import NoiseVsCurvature
from flatlib.theory.text import tiny
from flatlib.theory.transfer import HUTCHINSON_PROBES, FlatVsSharp


def noise_vs_curvature_figure(result: NoiseVsCurvature) -> tuple[plt.Figure, str]:
    """Section 1: every quantity of C (sampled, with 95% error bars, and exact) and F divided by the same
    quantity of H, at the optimum (left) and away from it (right)."""
    fig, axes = plt.subplots(1, 2, figsize=(12.5, 4.3))
    for ax, (point, frame) in zip(axes, result.table.groupby("point", sort=False)):
        x = np.arange(len(frame))
        h = frame["H exact"].to_numpy()
        ax.errorbar(x, frame["C sampled"] / h, yerr=1.96 * frame["C se"] / h, fmt="o", color="C0", capsize=4,
                    label=f"C sampled ({result.n_samples} examples), 95% CI")
        ax.plot(x + 0.18, frame["C exact"] / h, "s", mfc="none", mew=1.5, color="C0", label="C exact")
        ax.plot(x - 0.18, frame["F exact"] / h, "x", ms=8, mew=2, color="C2",
                label="F exact (labels from the model)")
        ax.axhline(1.0, color="k", ls="--", lw=1.2, label="H exact (= 1)")
        ax.set_xticks(x, [q if q == "Tr" else f"{q}ᵀ(·){q}" for q in frame["quantity"]])
        gap_text = tiny(result.points[point].gap)
        gap_text = gap_text if gap_text.startswith("<") else f"= {gap_text}"
        ax.set(title=f"{point}: gap L - L* {gap_text} nats", ylabel="ratio to the same quantity of H")
        ax.legend(fontsize=8, loc="best")
    fig.suptitle("Gradient-noise covariance C vs Hessian H (and Fisher F) of the expected single-mask loss",
                 y=1.02)
    fig.tight_layout()
    note = (f"{result.hmm!r}, all {result.contexts.n_contexts} contexts; factored model r = {result.rank}; "
            f"error bars: 95% CI (±1.96 SE, delta method) over {result.n_samples} sampled examples; v_k "
            "random unit vectors")
    return fig, note


def implicit_bias_figure(result: SgdVsFlow) -> tuple[plt.Figure, str]:
    """Section 2: the Hessian trace against the SGD step (left) and against tau with the predicted flow
    (middle); the excess loss of the SGD iterates with the noise level eta Tr H / (4B) (right)."""
    table, gd, flow = result.table, result.gd, result.flow
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.6))
    for i, (lr, batch) in enumerate(result.runs):
        frame = table[(table.lr == lr) & (table.batch == batch)]
        label = f"SGD η={lr}, B={batch} (η/B={lr / batch:g})"
        steps = frame["step"].to_numpy()
        for ax, x in [(axes[0], np.maximum(steps, 1)), (axes[1], frame["tau"].to_numpy())]:
            ax.plot(x, frame["trace"], color=f"C{i}", marker="o", ms=3, label=label)
            ax.fill_between(x, frame["trace"] - frame["trace ci95"], frame["trace"] + frame["trace ci95"],
                            color=f"C{i}", alpha=0.25)
        t = frame["tau"].to_numpy()[1:]
        gap, ci = frame["gap"].to_numpy()[1:], frame["gap ci95"].to_numpy()[1:]
        axes[2].plot(t, gap, color=f"C{i}", marker="o", ms=3, label=label)
        axes[2].fill_between(t, np.maximum(gap - ci, 1e-6), gap + ci, color=f"C{i}", alpha=0.25)
        axes[2].plot(t, frame["level eta Tr/(4B)"].to_numpy()[1:], color=f"C{i}", ls="--", lw=1.2)
    axes[0].plot(np.maximum(gd.steps.numpy(), 1), gd.trace[:, 0].numpy(), color="0.5", lw=2.5,
                 label=f"GD η={gd.lr} (full batch)")
    axes[1].plot(gd.time.numpy(), gd.trace[:, 0].numpy(), color="0.5", lw=2.5,
                 label=f"GD η={gd.lr} (τ = η²k)")
    axes[1].plot(flow.time.numpy(), flow.trace.numpy(), color="k", ls="--", lw=2, label="predicted slow flow")
    axes[0].set_xscale("log")
    axes[0].set(title="Hessian trace vs SGD step", xlabel="step k (log; step 0 drawn at 1)",
                ylabel="Tr H (expected loss, nats)")
    axes[1].set(title="Hessian trace vs τ = η²k / B", xlabel="τ = η² k / B",
                ylabel="Tr H (expected loss, nats)")
    axes[2].set_yscale("log")
    axes[2].set(title="excess loss of the SGD iterates", xlabel="τ = η² k / B", ylabel="L - L* (nats, log)")
    for ax in axes:
        ax.legend(fontsize=8)
    fig.tight_layout()
    note = (f"factored model on {result.contexts.n_contexts} HMM contexts, start at an exact optimum; "
            f"{result.n_chains} SGD chains per configuration, bands 95% CI over chains; dashed right: η Tr "
            "H/(4B)")
    return fig, note


def transfer_figure(result: FlatVsSharp) -> tuple[plt.Figure, str]:
    """Section 3: the exact Hessian traces of the two solutions with the Hutchinson cross-check (left),
    the min-norm head's error (middle) and its probability of being exactly right (right) against the
    number of labelled examples."""
    st_all, head_table, n_words = result.solution_table, result.head_table, result.language.n_words
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.6))
    names = list(result.solutions)
    colors = {"feature": "C0", "random": "C3"}
    x = np.arange(len(names))
    st = st_all.loc[names]
    axes[0].bar(x, st["Tr H (exact)"], width=0.55, color=[colors[n] for n in names],
                label="exact (balanced neurons)")
    axes[0].errorbar(x + 0.36, st["Tr H Hutchinson"], yerr=1.96 * st["Hutchinson se"], fmt="kD", ms=4,
                     capsize=4, label="Hutchinson, ±1.96 SE")
    for xi, name in zip(x, names):
        top = max(st.loc[name, "Tr H (exact)"],
                  st.loc[name, "Tr H Hutchinson"] + 1.96 * st.loc[name, "Hutchinson se"])
        axes[0].text(xi, top * 1.03, f"{st.loc[name, 'Tr H (exact)']:.1f}\n(before balancing "
                     f"{st.loc[name, 'Tr H before balancing']:.1f})", ha="center", va="bottom", fontsize=9)
    axes[0].set_xlim(-0.6, len(names) - 0.2)
    axes[0].set_ylim(0, 1.3 * max(st["Tr H (exact)"].max(),
                                  (st["Tr H Hutchinson"] + 1.96 * st["Hutchinson se"]).max()))
    axes[0].set_xticks(x, [f"{n} solution\n({int(st.loc[n, 'live neurons'])} live neurons)" for n in names])
    axes[0].set(title=f"MLM loss: {st.loc['feature', 'MLM loss']:.6f} vs {st.loc['random', 'MLM loss']:.6f} "
                      f"nats (L* = {result.contexts.optimal_loss():.6f})",
                ylabel="Tr H (expected MLM loss, nats)")
    axes[0].legend(fontsize=8, loc="upper left")
    for name in names:
        frame = head_table[head_table.solution == name]
        axes[1].plot(frame["n"], frame["error"], color=colors[name], marker="o", ms=4,
                     label=f"{name} solution")
        axes[1].fill_between(frame["n"], np.maximum(frame["error"] - frame["error ci95"], 0),
                             frame["error"] + frame["error ci95"], color=colors[name], alpha=0.25)
        axes[2].plot(frame["n"], frame["P(error = 0)"], color=colors[name], marker="o", ms=4,
                     label=f"{name} solution")
        axes[2].fill_between(frame["n"], np.maximum(frame["P(error = 0)"] - frame["P ci95"], 0),
                             np.minimum(frame["P(error = 0)"] + frame["P ci95"], 1), color=colors[name],
                             alpha=0.25)
    frame = head_table[head_table.solution == names[0]]
    axes[2].plot(frame["n"], frame["paper bound 1 - 2^-n"], color="k", ls=":", lw=1.5, label="paper: 1 - 2⁻ⁿ")
    axes[2].plot(frame["n"], frame["both signs 1 - p+^n - p-^n"], color="k", ls="--", lw=1.2,
                 label="both signs present")
    axes[2].axvline(n_words, color="0.5", lw=1, ls="-.", label=f"n = V = {n_words}")
    axes[1].axvline(n_words, color="0.5", lw=1, ls="-.", label=f"n = V = {n_words}")
    for ax in axes[1:]:
        ax.set_xscale("log", base=2)
        ticks = [n for n in result.n_train if n & (n - 1) == 0]  # the powers of two among the sizes
        ax.set_xticks(ticks, [str(n) for n in ticks])
        ax.set(xlabel="labelled downstream examples n (log)")
        ax.legend(fontsize=8)
    axes[1].set(title="downstream error of the min-norm linear head", ylabel="error (exact over contexts)")
    axes[2].set(title="probability that the head is exactly right", ylabel="P(error = 0)")
    fig.tight_layout()
    note = (f"{result.language!r}, width {result.width}; head: min-norm least squares on frozen neurons, "
            f"{result.draws} draws per n, bands 95% CI over draws; traces exact (Hutchinson: "
            f"{HUTCHINSON_PROBES} probes)")
    return fig, note
