"""Section 3 of notebook 06: of two exact optima of a one-layer transformer with the same MLM loss,
the flat one transfers.

``min_norm_head_errors`` is the downstream measurement (the minimum-norm linear head on frozen neurons,
exact error); ``flat_vs_sharp`` runs the section on the bag-of-words language (the feature and the
random solution, both neuron-balanced: their losses, exact and Hutchinson traces, and head errors
against the number of labelled examples); ``FlatVsSharp.verdict`` judges it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from flatlib.checks import check_int, check_seed
from flatlib.claims import Claim
from flatlib.measurement.downstream import mean_ci
from flatlib.measurement.flatness import hessian_trace
from flatlib.theory.bag_of_words import BagOfWordsLanguage
from flatlib.theory.contexts import DTYPE, ContextSet
from flatlib.theory.curvature import fisher_trace_at_optimum
from flatlib.theory.functional import FlatModel, expected_loss, expected_loss_fn
from flatlib.theory.text import held_text
from flatlib.theory.transformer import (
    OneLayerTransformer,
    balance_neurons,
    feature_solution,
    neuron_trace_parts,
    random_solution,
)

HUTCHINSON_PROBES = 32  # the Hutchinson cross-check of the exact traces
SOLUTIONS = ("feature", "random")


# ---------------------------------------------------------------------------- the downstream head
@dataclass(frozen=True)
class HeadErrors:
    """Downstream error of the minimum-norm linear head: ``errors[i, d]`` for ``n_train[i]``
    examples in draw ``d`` (exact over the context distribution: the weight of the contexts whose
    sign is wrong, a zero prediction counting as wrong)."""

    n_train: tuple[int, ...]
    errors: Tensor

    def mean(self) -> Tensor:
        return self.errors.mean(1)

    def zero_error_rate(self) -> Tensor:
        return (self.errors == 0).to(DTYPE).mean(1)


def min_norm_head_errors(features: Tensor, weights: Tensor, scores: Tensor, n_train: Sequence[int],
                         draws: int, seed: int, rtol: float = 1e-10) -> HeadErrors:
    """Fit ``w = Phi_n^+ s_n`` (the minimum-norm least-squares head, no bias) on ``n`` contexts drawn
    i.i.d. from ``weights`` with their scores, and measure the exact error
    ``sum_c w_c [sign(phi_c . w) != sign(s_c)]``; for every ``n`` in ``n_train``, ``draws`` times
    (one generator seeded by ``seed``). ``features`` ``[N, m]``: the frozen neurons of every context."""
    for n in n_train:
        check_int("n_train", n)
    check_int("draws", draws, low=2)
    if features.shape[0] != weights.shape[0] or scores.shape != weights.shape:
        raise ValueError(f"features: expected {weights.shape[0]} rows like weights and scores, "
                         f"got {tuple(features.shape)}")
    g = torch.Generator().manual_seed(seed)
    label = torch.sign(scores)
    errors = torch.empty(len(n_train), draws, dtype=DTYPE)
    for i, n in enumerate(n_train):
        for d in range(draws):
            index = torch.multinomial(weights, n, replacement=True, generator=g)
            w = torch.linalg.pinv(features[index], rtol=rtol) @ scores[index]
            wrong = torch.sign(features @ w) != label
            errors[i, d] = (weights * wrong).sum()
    return HeadErrors(tuple(int(n) for n in n_train), errors)




# ---------------------------------------------------------------------------- the section
@dataclass(frozen=True)
class FlatVsSharp:
    """What section 3 measured. ``raw`` / ``solutions``: the two exact optima before / after balancing
    their neurons; ``solution_table`` (the CSV 06_transformer_solutions, indexed by solution): live
    neurons, parameters, MLM loss and its excess over L*, the exact Tr H before and after balancing,
    and Hutchinson's estimate with its SE; ``head`` and ``head_table`` (the CSV 06_min_norm_head): per
    solution and ``n``, the head's mean error and P(error = 0) with 95% CIs over draws, the paper's
    bound ``1 - 2^-n`` and the probability that both signs appear among n contexts."""

    language: BagOfWordsLanguage
    contexts: ContextSet
    width: int
    draws: int
    raw: dict[str, OneLayerTransformer]
    solutions: dict[str, OneLayerTransformer]
    solution_table: pd.DataFrame
    head: dict[str, HeadErrors]
    head_table: pd.DataFrame
    p_positive: float
    seconds: float

    @property
    def n_train(self) -> tuple[int, ...]:
        return self.head[SOLUTIONS[0]].n_train

    def describe(self) -> str:
        return (f"{self.language!r}: {self.contexts.n_contexts} contexts, L* = "
                f"{self.contexts.optimal_loss():.6f} nats; width {self.width}; Tr H exact = sum_(c,y) w_c "
                "p_c(y) |grad log q|^2 (equal to Tr H at an exact optimum, section 1), Hutchinson: "
                f"{HUTCHINSON_PROBES} Rademacher probes on the expected loss "
                f"(flatlib.measurement.flatness.hessian_trace)\n{self.draws} draws of n training contexts "
                f"per n; P(sentiment > 0) = {self.p_positive:.3f}; {self.seconds:.1f} s")

    def first_n(self, name: str, level: float = 0.9) -> int | None:
        """The smallest ``n`` at which the head on solution ``name`` is exactly right with probability
        ``>= level`` (None if at no ``n``)."""
        table = self.head_table
        frame = table[(table.solution == name) & (table["P(error = 0)"] >= level)]
        return int(frame["n"].min()) if len(frame) else None

    def verdict(self) -> TransferVerdict:
        """(a) equal loss: the two MLM losses within 1e-6 of each other and of L*; (b) the feature
        solution flatter (smaller exact Tr H, balanced); (c) it transfers: its head is exactly right with
        probability >= 0.9 at a smaller n than the random one's (or the random one's never is); and the
        paper's bound, ``P(error = 0) >= 1 - 2^-n`` for the feature solution within its 95% CI at every
        n. "yes" when all hold, "partly" when (a)-(c) hold, "no" otherwise."""
        st, ht = self.solution_table, self.head_table
        feat, rand = st.loc["feature"], st.loc["random"]
        loss_equal = (abs(feat["MLM loss"] - rand["MLM loss"]) < 1e-6
                      and max(abs(feat["loss - L*"]), abs(rand["loss - L*"])) < 1e-6)
        flatter = feat["Tr H (exact)"] < rand["Tr H (exact)"]
        hutch_ok = all(abs(r["Tr H Hutchinson"] - r["Tr H (exact)"]) < 4 * r["Hutchinson se"]
                       for _, r in st.iterrows())
        n90 = {name: self.first_n(name) for name in self.solutions}
        transfers = n90["feature"] is not None and (n90["random"] is None or n90["feature"] < n90["random"])
        feature_rows = ht[ht.solution == "feature"]
        meets = (feature_rows["P(error = 0)"] + feature_rows["P ci95"].fillna(0)
                 >= feature_rows["paper bound 1 - 2^-n"])
        bound_ok = bool(meets.all())
        below = tuple(int(n) for n in feature_rows.loc[~meets, "n"])
        meets_from = next((int(n) for i, n in enumerate(feature_rows["n"]) if meets.iloc[i:].all()), None)
        held = ("yes" if loss_equal and flatter and transfers and bound_ok else
                "partly" if loss_equal and flatter and transfers else "no")
        return TransferVerdict(self, loss_equal, flatter, hutch_ok, n90, transfers, bound_ok, below,
                               meets_from, held)


def flat_vs_sharp(n_words: int, seq_len: int, strengths: Sequence[float], width: int, d_key: int,
                  n_train: Sequence[int], draws: int, seed: int) -> FlatVsSharp:
    """Section 3: the bag-of-words language ``BagOfWordsLanguage.two_features(n_words, seq_len,
    strengths)``, its feature and random solutions (``width`` neurons, attention key size ``d_key``;
    the random one from ``seed``), both neuron-balanced; their losses, exact traces (and Hutchinson's,
    ``HUTCHINSON_PROBES`` probes from ``seed``), and the min-norm head on their neurons for the
    sentiment score, ``draws`` times per size in ``n_train`` (the i-th solution from ``seed + 20 + i``)."""
    check_seed("seed", seed)
    check_int("draws", draws, low=2)
    start = time.perf_counter()
    language = BagOfWordsLanguage.two_features(n_words=n_words, seq_len=seq_len, strengths=strengths)
    bag = language.contexts()
    optimal = bag.optimal_loss()
    raw = {"feature": feature_solution(language, width, d_key=d_key),
           "random": random_solution(language, width, seed=seed, d_key=d_key)}
    solutions = {name: balance_neurons(model, bag) for name, model in raw.items()}
    rows = []
    for name, model in solutions.items():
        fm = FlatModel(model)
        theta = fm.vector()
        P_i, Q_i, _ = neuron_trace_parts(model, bag)
        hutchinson = hessian_trace(model, expected_loss_fn, [bag.batch()], n_probes=HUTCHINSON_PROBES,
                                   seed=seed)
        rows.append({"solution": name, "live neurons": int(((P_i > 0) & (Q_i > 0)).sum()),
                     "parameters": fm.n_params, "MLM loss": float(expected_loss(fm, theta, bag)),
                     "loss - L*": float(expected_loss(fm, theta, bag)) - optimal,
                     "Tr H before balancing": fisher_trace_at_optimum(FlatModel(raw[name]),
                                                                      FlatModel(raw[name]).vector(), bag),
                     "Tr H (exact)": fisher_trace_at_optimum(fm, theta, bag),
                     "Tr H Hutchinson": hutchinson.mean, "Hutchinson se": hutchinson.stderr})
    solution_table = pd.DataFrame(rows).set_index("solution")
    scores = language.scores()
    head = {}
    with torch.no_grad():
        for i, (name, model) in enumerate(solutions.items()):
            head[name] = min_norm_head_errors(model.neurons(bag.inputs), bag.weights, scores, n_train=n_train,
                                              draws=draws, seed=seed + 20 + i)
    p_pos = float(bag.weights[scores > 0].sum())
    return FlatVsSharp(language, bag, width, draws, raw, solutions, solution_table, head,
                       _head_table(head, p_pos), p_pos, time.perf_counter() - start)


def _head_table(head: dict[str, HeadErrors], p_pos: float) -> pd.DataFrame:
    """The CSV 06_min_norm_head (see ``FlatVsSharp``); ``p_pos`` = P(score > 0)."""
    rows = []
    for name, out in head.items():
        for i, n in enumerate(out.n_train):
            err, err_ci = mean_ci(out.errors[i].numpy())
            ok, ok_ci = mean_ci((out.errors[i] == 0).double().numpy())
            rows.append({"solution": name, "n": n, "error": err, "error ci95": err_ci, "P(error = 0)": ok,
                         "P ci95": ok_ci, "paper bound 1 - 2^-n": 1 - 2.0 ** -n,
                         "both signs 1 - p+^n - p-^n": 1 - p_pos ** n - (1 - p_pos) ** n})
    return pd.DataFrame(rows)


@dataclass(frozen=True)
class TransferVerdict:
    """Section 3's verdict (see ``FlatVsSharp.verdict``): the flags, ``n90`` (by solution, the first n
    with P(error = 0) >= 0.9, or None), ``below`` (the n at which the feature solution misses the
    paper's bound) and ``meets_from`` (the n from which it meets it at every larger n, or None)."""

    result: FlatVsSharp
    loss_equal: bool
    flatter: bool
    hutchinson_agrees: bool
    n90: dict[str, int | None]
    transfers: bool
    bound_ok: bool
    below: tuple[int, ...]
    meets_from: int | None
    held: str

    def report(self) -> str:
        r = self.result
        feat, rand = r.solution_table.loc["feature"], r.solution_table.loc["random"]
        n_train, n90 = r.n_train, self.n90
        at = n_train[min(range(len(n_train)), key=lambda i: abs(n_train[i] - r.language.n_words // 2))]
        err_at = r.head_table[r.head_table.n == at].set_index("solution")
        optimal = r.contexts.optimal_loss()
        bound = ("holds at every n (within the 95% CI)." if self.bound_ok else
                 f"fails at n = {', '.join(str(n) for n in self.below)} (one example shows one sentiment "
                 f"only, and our head needs both signs and enough examples to span the four feature neurons)"
                 + (f"; it holds from n = {self.meets_from} on." if self.meets_from is not None
                    else "; it never holds."))
        return "\n".join([
            f"(a) MLM loss: feature {feat['MLM loss']:.8f}, random {rand['MLM loss']:.8f}, L* = "
            f"{optimal:.8f}: {'equal to 1e-6 (held)' if self.loss_equal else 'NOT equal'}.",
            f"(b) Tr H (balanced, exact): feature {feat['Tr H (exact)']:.3f} vs random "
            f"{rand['Tr H (exact)']:.3f} (ratio {rand['Tr H (exact)'] / feat['Tr H (exact)']:.2f}; before "
            f"balancing {feat['Tr H before balancing']:.2f} vs {rand['Tr H before balancing']:.2f}); "
            f"Hutchinson agrees within 4 SE: {self.hutchinson_agrees}. "
            f"""{'The feature solution is flatter (held).' if self.flatter
                 else 'The feature solution is NOT flatter.'}""",
            f"(c) the head is exactly right with probability >= 0.9 from n = {n90['feature']} (feature) vs n "
            f"= {n90['random']} (random); at n = {at}: error {err_at.loc['feature', 'error']:.3f} ± "
            f"{err_at.loc['feature', 'error ci95']:.3f} (feature) vs {err_at.loc['random', 'error']:.3f} ± "
            f"{err_at.loc['random', 'error ci95']:.3f} (random).",
            f"    The paper's P >= 1 - 2^-n for the feature solution: {bound}",
            f"Prediction (equal loss, the feature solution flatter, and it transfers from fewer examples): "
            f"{held_text(self.held)}"
            + ("" if self.held != "partly" else
               " (qualitatively yes; the paper's exact bound is not reproduced by our construction).")])

    def claim(self) -> Claim:
        r = self.result
        feat, rand = r.solution_table.loc["feature"], r.solution_table.loc["random"]
        return Claim(
            claim=("Of two optima of a one-layer transformer with the same MLM loss, the flatter one "
                   "transfers (min-norm linear head)"),
            paper="equal (zero) loss; much smaller trace for the feature solution; its min-norm head "
                  "succeeds w.p. >= 1 - 2^-n",
            ours=(f"loss {feat['MLM loss']:.6f} vs {rand['MLM loss']:.6f}; Tr H {feat['Tr H (exact)']:.2f} "
                  f"vs {rand['Tr H (exact)']:.2f} (balanced); P(head exact) >= 0.9 from n = "
                  f"{self.n90['feature']} vs {self.n90['random']}; 1 - 2^-n "
                  f"""{'met at every n' if self.bound_ok
                       else 'not met at n = ' + ', '.join(str(n) for n in self.below)}"""),
            held=self.held, notebook="06_theory", figure="06_flat_solution_transfers.png",
            detail=(f"our construction: {r.language!r}, width {r.width}, both solutions neuron-balanced; "
                    f"sign of the sentiment feature; {r.draws} draws per n"))

    def summary(self) -> str:
        """One line, rounded so that the last bits of floating point cannot change it."""
        st = self.result.solution_table
        return (f"3 transformer: losses equal to 1e-6: {self.loss_equal} · Tr H feature "
                f"{st.loc['feature', 'Tr H (exact)']:.3g} vs random {st.loc['random', 'Tr H (exact)']:.3g} · "
                f"P(exact) >= 0.9 from n={self.n90['feature']} vs n={self.n90['random']} · held: {self.held}")

    def failed_checks(self) -> list[str]:
        """What must hold whatever the outcome (messages of the failed checks; ``[]`` when none): the two
        constructions have equal loss, every number is finite, every error is in [0, 1]."""
        r = self.result
        errors = r.head_table["error"]
        checks = [
            (self.loss_equal, "section 3: the two constructions must have equal loss (to 1e-6)"),
            (bool(np.isfinite(r.solution_table.to_numpy(dtype=float)).all()),
             "section 3: a trace or loss is not finite"),
            (bool(np.isfinite(r.head_table[["error", "P(error = 0)"]].to_numpy()).all()),
             "section 3: a head error is not finite"),
            (bool(((errors >= 0) & (errors <= 1)).all()), "section 3: a head error is outside [0, 1]"),
        ]
        return [message for ok, message in checks if not ok]
