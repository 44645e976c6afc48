"""Section 1 of notebook 06: at an exact optimum the gradient noise *is* the curvature.

One example is a pair ``(c, y)``: ``c ~ w``, ``y ~ p_c`` (the word is label noise from the true
conditional), with gradient ``g = J_c^T (q_c - e_y)``. At a global minimiser (``q = p``) its covariance
``C`` equals the Hessian ``H`` and the Fisher ``F`` exactly (``flatlib.theory.curvature``); away from it
the three differ. ``gradient_noise`` measures ``C`` as SGD sees it (sampled examples, with standard
errors); ``noise_vs_curvature`` runs the section (a factored model at an exact optimum of a tiny HMM,
and the same model moved off it) and ``NoiseVsCurvature.verdict`` judges the prediction.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from flatlib.checks import check_int, check_number, check_seed
from flatlib.claims import Claim
from flatlib.languages import HMM
from flatlib.measurement.flatness import hvp
from flatlib.theory.contexts import DTYPE, ContextSet, hmm_contexts, with_ids
from flatlib.theory.curvature import exact_fisher, exact_gradient_covariance, exact_hessian
from flatlib.theory.factored import FactoredSoftmax
from flatlib.theory.functional import FlatModel, expected_loss, expected_loss_fn, per_example_gradients
from flatlib.theory.text import held_text, tiny

POINTS = ("at the optimum", "away from it")


# ---------------------------------------------------------------------------- sampled noise
@dataclass(frozen=True)
class NoiseEstimate:
    """The covariance ``C`` of per-example gradients, estimated from ``n_samples`` i.i.d. examples.

    ``trace`` = ``sum_i |g_i - gbar|^2 / (m-1)``; ``forms[k]`` = ``sum_i (v_k . (g_i - gbar))^2 / (m-1)``.
    Standard errors: ``std(d_i) / sqrt(m)`` of the per-example terms ``d_i`` (delta method; the
    centring's own noise is O(1/m)). ``mean_gradient_norm`` = ``|gbar|``.
    """

    trace: float
    trace_se: float
    forms: Tensor
    forms_se: Tensor
    mean_gradient_norm: float
    n_samples: int
    description: str

    def __str__(self) -> str:
        return f"Tr C = {self.trace:.4g} ± {self.trace_se:.2g}  ({self.description})"


def gradient_noise(flat: FlatModel, theta: Tensor, contexts: ContextSet, vectors: Tensor, n_samples: int,
                   seed: int) -> NoiseEstimate:
    """Measure the gradient noise as SGD sees it: ``n_samples`` examples ``(c ~ w, y ~ p_c)`` drawn
    with a generator seeded by ``seed``, their gradients, and the trace and the quadratic forms
    ``v_k^T C v_k`` (``vectors``: ``[k, P]``, may be empty) of their sample covariance, with SEs."""
    check_int("n_samples", n_samples, low=2)
    if vectors.dim() != 2 or vectors.shape[1] != flat.n_params:
        raise ValueError(f"vectors: expected [k, {flat.n_params}], got {tuple(vectors.shape)}")
    g = torch.Generator().manual_seed(seed)
    index, word = contexts.sample_pairs(n_samples, g)
    G = per_example_gradients(flat, theta, contexts.inputs[index], word)
    mean = G.mean(0)
    centred = G - mean
    m = n_samples
    d = (centred ** 2).sum(1)
    s = (centred @ vectors.T.to(G.dtype)) ** 2  # [m, k]
    return NoiseEstimate(
        trace=float(d.sum() / (m - 1)), trace_se=float(d.std() / math.sqrt(m)),
        forms=s.sum(0) / (m - 1), forms_se=(s.std(0) if s.shape[1] else s.sum(0)) / math.sqrt(m),
        mean_gradient_norm=float(mean.norm()), n_samples=m,
        description=f"{m} examples (context ~ w, word ~ p(.|context)), seed {seed}; ± is one standard error")



# ---------------------------------------------------------------------------- the section
@dataclass(frozen=True)
class PointCurvature:
    """At one point: the exact ``hessian`` H, ``covariance`` C and ``fisher`` F (``[P, P]``), the
    excess loss ``gap`` = L - L* (nats), ``hvp_forms`` ``[k]`` the forms ``v_k^T H v_k`` computed once
    more through ``flatlib.measurement.flatness.hvp``, and the sampled ``noise``."""

    hessian: Tensor
    covariance: Tensor
    fisher: Tensor
    gap: float
    hvp_forms: Tensor
    noise: NoiseEstimate


@dataclass(frozen=True)
class NoiseVsCurvature:
    """What section 1 measured: the ``points`` (``POINTS``: the exact optimum and the model moved
    off it), the unit ``vectors`` ``[k, P]`` of the quadratic forms, and ``table`` (the CSV
    06_noise_vs_curvature: one row per point and quantity, "Tr" or "v1".."vk", with the sampled C and
    its SE, the exact C, H and F, and ``z`` = (C sampled - H exact) / se)."""

    hmm: HMM
    contexts: ContextSet
    rank: int
    n_params: int
    n_samples: int
    vectors: Tensor
    points: dict[str, PointCurvature]
    table: pd.DataFrame
    seconds: float

    def describe(self) -> str:
        return (f"{self.hmm!r}: {self.contexts.n_contexts} contexts, optimal loss L* = "
                f"{self.contexts.optimal_loss():.4f} nats; factored model with r = {self.rank}: "
                f"{self.n_params} parameters\n'Tr' is the trace, 'vk' the quadratic form v_k^T (.) v_k; z = "
                f"(C sampled - H exact) / se; {self.n_samples} sampled examples; {self.seconds:.1f} s")

    def verdict(self) -> NoiseVerdict:
        """The prediction judged: ``C = H = F`` at the optimum (exactly, and the sampled C within its
        standard error: every ``|z| < 3``), and not away from it (C, F differ from H by more than 1%
        and the sampled trace of C is more than 3 SE from Tr H)."""
        at, away = (self.points[p] for p in POINTS)
        opt_rows = self.table[self.table.point == POINTS[0]]
        off_rows = self.table[self.table.point == POINTS[1]]
        equal = max(_max_rel(at.covariance, at.hessian), _max_rel(at.fisher, at.hessian))
        differ = {"C vs H": _max_rel(away.covariance, away.hessian),
                  "F vs H": _max_rel(away.fisher, away.hessian)}
        z_opt = float(opt_rows["z"].abs().max())
        z_off_trace = float(off_rows.loc[off_rows.quantity == "Tr", "z"].abs().iloc[0])
        hvp_agree = max(float((e.hvp_forms
                               - torch.einsum("ki,ij,kj->k", self.vectors, e.hessian, self.vectors))
                              .abs().max()) for e in self.points.values())
        held = equal < 1e-9 and z_opt < 3 and min(differ.values()) > 1e-2 and z_off_trace > 3
        return NoiseVerdict(
            result=self, equal_at_optimum=equal, differ_away=differ, z_optimum=z_opt,
            z_away_trace=z_off_trace,
            z_away_sampled_vs_exact=float(((off_rows["C sampled"] - off_rows["C exact"]) / off_rows["C se"])
                                          .abs().max()),
            hvp_agreement=hvp_agree, optimum_trace=opt_rows.iloc[0], away_trace=off_rows.iloc[0],
            held="yes" if held else "no")


def _max_rel(a: Tensor, b: Tensor) -> float:
    """``max |a - b| / max |b|``: how far ``a`` is from ``b``, relative to ``b``'s largest entry."""
    return float((a - b).abs().max() / b.abs().max())


def noise_vs_curvature(hmm: HMM, rank: int, n_samples: int, n_forms: int, offset: float,
                       seed: int) -> NoiseVsCurvature:
    """Section 1: a ``FactoredSoftmax`` of inner dimension ``rank`` put exactly at an optimum of every
    single-mask context of ``hmm`` (``B`` from ``seed``), and the same model with every parameter moved
    by ``N(0, offset^2)``; at both, H, C and F exactly, ``n_forms`` random unit directions ``v_k``
    (one generator seeded by ``seed`` draws the move, then the directions), the forms ``v_k^T H v_k``
    through ``flatlib.measurement.flatness.hvp``, and C sampled from ``n_samples`` examples (seed
    ``seed + 1``)."""
    check_int("n_forms", n_forms)
    check_number("offset", offset)
    check_seed("seed", seed)
    start = time.perf_counter()
    contexts = with_ids(hmm_contexts(hmm))  # the factored model looks a context up by its id
    optimal = contexts.optimal_loss()
    g = torch.Generator().manual_seed(seed)
    models = {POINTS[0]: FactoredSoftmax.at_optimum(contexts, rank, scale=1.0, seed=seed)}
    flat = FlatModel(models[POINTS[0]])
    models[POINTS[1]] = FactoredSoftmax(contexts.n_contexts, rank, contexts.vocab_size)
    FlatModel(models[POINTS[1]]).load_(flat.vector() + offset * torch.randn(flat.n_params, generator=g,
                                                                            dtype=DTYPE))
    vectors = torch.randn(n_forms, flat.n_params, generator=g, dtype=DTYPE)
    vectors = vectors / vectors.norm(dim=1, keepdim=True)  # random unit directions v_k
    rows, points = [], {}
    for point, model in models.items():
        fm = FlatModel(model)
        theta = fm.vector()
        H = exact_hessian(fm, theta, contexts)
        C = exact_gradient_covariance(fm, theta, contexts)
        F = exact_fisher(fm, theta, contexts)
        Hv = torch.stack([hvp(model, expected_loss_fn, [contexts.batch()], v) for v in vectors])
        noise = gradient_noise(fm, theta, contexts, vectors, n_samples=n_samples, seed=seed + 1)
        gap = float(expected_loss(fm, theta, contexts)) - optimal
        points[point] = PointCurvature(H, C, F, gap, (vectors * Hv).sum(1), noise)
        quantities = [("Tr", noise.trace, noise.trace_se, C.trace(), H.trace(), F.trace())]
        quantities += [(f"v{k + 1}", float(noise.forms[k]), float(noise.forms_se[k]), v @ C @ v, v @ H @ v,
                        v @ F @ v) for k, v in enumerate(vectors)]
        for name, c_hat, se, c, h, f in quantities:
            rows.append({"point": point, "gap (nats)": gap, "quantity": name, "C sampled": c_hat, "C se": se,
                         "C exact": float(c), "H exact": float(h), "F exact": float(f),
                         "z": (c_hat - float(h)) / se})
    return NoiseVsCurvature(hmm, contexts, rank, flat.n_params, n_samples, vectors, points,
                            pd.DataFrame(rows), time.perf_counter() - start)


@dataclass(frozen=True)
class NoiseVerdict:
    """Section 1's numbers and verdict. ``equal_at_optimum``: ``max(|C - H|, |F - H|) / max |H|`` at the
    optimum; ``differ_away``: the same for C and F away from it; ``z_optimum``: the largest ``|z|``
    of the sampled C against H at the optimum (trace and forms); ``z_away_trace``: ``|z|`` of the trace
    away from it; ``z_away_sampled_vs_exact``: the largest ``|z|`` of the sampled C against the exact C
    away from it (the measurement is right there too); ``hvp_agreement``: largest difference of the
    forms through ``flatness.hvp`` and the dense H; ``optimum_trace`` / ``away_trace``: the table's "Tr"
    rows; ``held``: "yes" or "no"."""

    result: NoiseVsCurvature
    equal_at_optimum: float
    differ_away: dict[str, float]
    z_optimum: float
    z_away_trace: float
    z_away_sampled_vs_exact: float
    hvp_agreement: float
    optimum_trace: pd.Series
    away_trace: pd.Series
    held: str

    def report(self) -> str:
        t0, t1, r = self.optimum_trace, self.away_trace, self.result
        gap0, gap1 = (r.points[p].gap for p in POINTS)
        return "\n".join([
            f"At the optimum (gap {tiny(gap0)} nats): the exact C and F equal H to "
            f"{self.equal_at_optimum:.1e} (largest entry of the difference / largest entry of H); the "
            f"sampled Tr C = {t0['C sampled']:.4f} ± {t0['C se']:.4f} vs Tr H = {t0['H exact']:.4f} (z = "
            f"{t0['z']:+.2f}); the largest |z| over the trace and the {len(r.vectors)} quadratic forms is "
            f"{self.z_optimum:.2f}.",
            f"Away from it (gap {gap1:.3f} nats): the sampled Tr C = {t1['C sampled']:.4f} ± "
            f"{t1['C se']:.4f} vs Tr H = {t1['H exact']:.4f} (z = {t1['z']:+.1f}) and Tr F = "
            f"{t1['F exact']:.4f}; exact differences {self.differ_away['C vs H']:.2f} (C vs H) and "
            f"{self.differ_away['F vs H']:.2f} (F vs H) relative to H; the sampled C agrees with the exact C "
            f"(largest |z| {self.z_away_sampled_vs_exact:.2f}).",
            f"Prediction (C = H = F at the optimum, not away from it): {held_text(self.held)}. "
            f"(flatness.hvp and the dense H agree to {self.hvp_agreement:.1e}.)"])

    def claim(self) -> Claim:
        t0, t1, r = self.optimum_trace, self.away_trace, self.result
        return Claim(
            claim="At a global minimum the covariance of per-example gradients equals the Hessian (and the "
                  "Fisher)",
            paper="C = H = F at any global minimizer (Theory)",
            ours=(f"at the optimum: exact max|C-H|/max|H| = {self.equal_at_optimum:.0e}; sampled Tr C "
                  f"{t0['C sampled']:.4f} ± {t0['C se']:.4f} vs Tr H {t0['H exact']:.4f} (largest |z| "
                  f"{self.z_optimum:.2f} over trace and {len(r.vectors)} quadratic forms); away (gap "
                  f"{r.points[POINTS[1]].gap:.3f} nats): Tr C {t1['C sampled']:.3f} ± {t1['C se']:.3f} vs Tr "
                  f"H {t1['H exact']:.3f}"),
            held=self.held, notebook="06_theory", figure="06_noise_vs_curvature.png",
            detail=(f"factored lookup model at an exact optimum of {r.hmm!r}, all {r.contexts.n_contexts} "
                    f"single-mask contexts; {r.n_samples} sampled examples, ± is one SE"))

    def summary(self) -> str:
        """One line, rounded so that the last bits of floating point cannot change it."""
        t0, t1 = self.optimum_trace, self.away_trace
        return (f"1 noise = curvature: optimum |C-H|,|F-H| < 1e-9: {self.equal_at_optimum < 1e-9} · Tr C "
                f"{t0['C sampled']:.2g} vs Tr H {t0['H exact']:.2g} (max|z| < 3: {self.z_optimum < 3}) · "
                f"away: Tr C {t1['C sampled']:.2g} vs Tr H {t1['H exact']:.2g} (|z| > 3: "
                f"{self.z_away_trace > 3}) · held: {self.held}")

    def failed_checks(self) -> list[str]:
        """What must hold whatever the outcome, as messages of the checks that failed (none: ``[]``): the
        optimum is exact and the moved model is off it, C = H = F there to rounding (an identity),
        ``flatness.hvp`` agrees with the dense H, and every estimate is finite."""
        r = self.result
        table = r.table
        gap0, gap1 = (r.points[p].gap for p in POINTS)
        checks = [
            (abs(gap0) < 1e-10 and gap1 > 0,
             "section 1: the optimum is not exact, or the perturbed model is not off it"),
            (self.equal_at_optimum < 1e-9,
             "section 1: C = H = F must hold exactly at an exact optimum (an identity)"),
            (self.hvp_agreement < 1e-8, "section 1: flatness.hvp and the dense Hessian disagree"),
            (bool(np.isfinite(table[["C sampled", "C se", "z"]].to_numpy()).all()
                  and (table["C se"] > 0).all()),
             "section 1: a sampled estimate or its standard error is not finite and positive"),
        ]
        return [message for ok, message in checks if not ok]
