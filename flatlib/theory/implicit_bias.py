"""Section 2 of notebook 06: the implicit bias. From a sharp point of the optimal set of the factored
model, full-batch GD stays put while SGD drifts toward a lower Hessian trace, along the slow flow
``d theta / d tau = -1/4 grad_Gamma Tr H`` in the clock ``tau = eta^2 k / B``
(``flatlib.theory.dynamics``).

``sgd_vs_flow`` runs the section (the flow, SGD at several ``(eta, B)``, GD) and tabulates it;
``SgdVsFlow.verdict`` judges the three predictions: GD does not move; SGD's excess loss is of the
order of the noise level ``eta Tr H / (4B)``; the trace falls as the flow predicts, with a deviation
ordered by ``eta / B``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from time import perf_counter
from typing import Sequence

import numpy as np
import pandas as pd
import torch

from flatlib.checks import check_seed
from flatlib.claims import Claim
from flatlib.measurement.downstream import mean_ci
from flatlib.theory.contexts import ContextSet
from flatlib.theory.dynamics import Flow, Trajectory, run_gd, run_sgd, slow_flow
from flatlib.theory.factored import FactoredSoftmax
from flatlib.theory.functional import FlatModel
from flatlib.theory.text import held_text, tiny


@dataclass(frozen=True)
class SgdVsFlow:
    """What section 2 ran: the predicted ``flow``, the SGD ``runs`` by ``(lr, batch_size)``, and ``gd``
    (at the first configuration's learning rate), all from one sharp exact optimum, recorded at the
    clock times ``taus`` (``0 .. time``); ``table`` is the CSV 06_sgd_vs_flow: per configuration and
    record, the mean trace and gap over chains with 95% CIs, the flow's trace, the relative error of
    the predicted drop (and its CI) and the noise level ``eta Tr H / (4B)``."""

    contexts: ContextSet
    rank: int
    n_params: int
    time: float
    n_chains: int
    flow_dt: float
    taus: np.ndarray
    flow: Flow
    runs: dict[tuple[float, int], Trajectory]
    gd: Trajectory
    table: pd.DataFrame
    seconds: float

    @property
    def trace0(self) -> float:
        """Tr H at the start (an exact optimum)."""
        return float(self.flow.trace[0])

    def flow_trace(self, t: float | np.ndarray) -> float | np.ndarray:
        """The flow's Tr H at clock time(s) ``t`` (linear interpolation between its steps)."""
        return np.interp(t, self.flow.time.numpy(), self.flow.trace.numpy())

    def describe(self) -> str:
        flow, gd = self.flow, self.gd
        steps_total = sum(int(r.steps[-1]) for r in self.runs.values())
        return (f"start: Tr H = {self.trace0:.3f} at an exact optimum (gap {tiny(float(flow.gap[0]))}); the "
                f"optimal set has dimension {int(flow.nullity[0])} of {self.n_params}; flow: "
                f"{len(flow.time) - 1} Heun steps of dtau = {self.flow_dt}, largest |gap| along it "
                f"{tiny(float(flow.gap.abs().max()))} nats\nSGD: {len(self.runs)} configurations x "
                f"{self.n_chains} chains, {steps_total} steps in all; GD: {int(gd.steps[-1])} steps at lr "
                f"{gd.lr}; {self.seconds:.1f} s")

    def excerpt(self) -> pd.DataFrame:
        """About five records of every configuration from ``table`` (for display)."""
        taus = self.taus[::max(1, len(self.taus) // 4)]
        return self.table[self.table.tau.isin(taus)].set_index(["lr", "batch", "tau"]).round(4)

    def verdict(self) -> SgdVerdict:
        """The three predictions judged. Over the last three quarters of the clock (``tau >= T/4``)
        and at its end ``T``: GD static (trace within 1e-8 relative, gap within 1e-10 nats); SGD's
        mean excess loss between 0.5 and 2 times ``eta Tr H / (4B)``; the trace fell under every
        configuration (the drop beyond its CI); the flow predicts the drop within 10% at the smallest
        ``eta/B``; and no configuration with a larger ``eta/B`` deviates significantly less than one
        with a smaller ``eta/B`` (ordered). "yes" when all hold, "partly" when GD is static and the
        trace fell, "no" otherwise."""
        table, gd, T, trace0 = self.table, self.gd, self.time, self.trace0
        late = table[table.tau >= T / 4]
        final = table[np.isclose(table.tau, T)].set_index(["lr", "batch"])
        gd_change = float((gd.trace - gd.trace[0]).abs().max()) / float(gd.trace[0, 0])
        gd_static = gd_change < 1e-8 and float(gd.gap.abs().max()) < 1e-10
        summary = []
        for (lr, batch), run in self.runs.items():
            drop, drop_ci = mean_ci((run.trace[0] - run.trace[-1]).numpy())
            mine = late[(late.lr == lr) & (late.batch == batch)]
            summary.append({"lr": lr, "batch": batch, "eta/B": lr / batch, "trace start": trace0,
                            "trace end": final.loc[(lr, batch), "trace"], "drop": drop, "drop ci95": drop_ci,
                            "flow drop": trace0 - self.flow_trace(T),
                            "rel. error end": final.loc[(lr, batch), "rel. error of the drop"],
                            "rel. error end ci95": final.loc[(lr, batch), "rel. error ci95"],
                            "max |rel. error|, tau >= T/4": float(mine["rel. error of the drop"].abs().max()),
                            "gap / level (tau >= T/4)": float((mine["gap"] / mine["level eta Tr/(4B)"])
                                                              .mean()),
                            "max gap (nats)": float(run.gap.max())})
        verdict = pd.DataFrame(summary).sort_values("eta/B")
        fell = bool((verdict["drop"] > verdict["drop ci95"]).all())
        close_at_smallest = verdict.iloc[0]["max |rel. error|, tau >= T/4"] <= 0.10
        # ordered: no configuration with a larger eta/B deviates significantly less
        # than one with a smaller eta/B
        ordered = all(abs(a["rel. error end"]) + a["rel. error end ci95"]
                      >= abs(b["rel. error end"]) - b["rel. error end ci95"]
                      for _, a in verdict.iterrows() for _, b in verdict.iterrows()
                      if a["eta/B"] > b["eta/B"])
        loss_optimal = bool(gd_static and (verdict["gap / level (tau >= T/4)"].between(0.5, 2.0)).all())
        held = ("yes" if gd_static and loss_optimal and fell and close_at_smallest and ordered
                else "partly" if gd_static and fell else "no")
        return SgdVerdict(self, verdict, gd_change, gd_static, loss_optimal, fell, close_at_smallest, ordered,
                          held)


def sgd_vs_flow(contexts: ContextSet, rank: int, init_scale: float, configs: Sequence[tuple[float, int]],
                time: float, n_chains: int, n_records: int, flow_dt: float, seed: int) -> SgdVsFlow:
    """Section 2: a ``FactoredSoftmax`` (inner dimension ``rank``) at a sharp exact optimum of
    ``contexts`` (its output factor scaled by ``init_scale``, from ``seed + 2``); the slow flow from
    it up to ``tau = time`` in steps ``flow_dt``; SGD with ``n_chains`` chains for every
    ``(lr, batch_size)`` of ``configs`` (the i-th from ``seed + 10 + i``) and GD at the first ``lr``,
    each recorded at ``n_records + 1`` equally spaced clock times (the step nearest to each)."""
    check_seed("seed", seed)
    start = perf_counter()
    sharp = FactoredSoftmax.at_optimum(contexts, rank, scale=init_scale, seed=seed + 2)
    flat = FlatModel(sharp)
    theta0 = flat.vector()
    flow = slow_flow(flat, contexts, theta0, t_max=time, dt=flow_dt)
    taus = np.linspace(0.0, time, n_records + 1)
    runs = {}
    for i, (lr, batch) in enumerate(configs):
        records = [round(t * batch / lr ** 2) for t in taus]
        runs[lr, batch] = run_sgd(flat, contexts, theta0, lr=lr, batch_size=batch, steps=records[-1],
                                  n_chains=n_chains, seed=seed + 10 + i, record_steps=records)
    gd_lr = configs[0][0]
    gd_records = [round(t / gd_lr ** 2) for t in taus]
    gd = run_gd(flat, contexts, theta0, lr=gd_lr, steps=gd_records[-1], record_steps=gd_records)
    seconds = perf_counter() - start
    result = SgdVsFlow(contexts, rank, flat.n_params, time, n_chains, flow_dt, taus, flow, runs, gd,
                       pd.DataFrame(), seconds)
    return replace(result, table=_sgd_table(result))


def _sgd_table(result: SgdVsFlow) -> pd.DataFrame:
    """The CSV 06_sgd_vs_flow (see ``SgdVsFlow``); "rel. error of the drop" is
    ``(observed drop - flow drop) / flow drop`` (nan where the flow has not dropped yet)."""
    trace0, flow_trace = result.trace0, result.flow_trace
    rows = []
    for (lr, batch), run in result.runs.items():
        for j, t in enumerate(run.time.numpy()):
            trace, trace_ci = mean_ci(run.trace[j].numpy())
            gap, gap_ci = mean_ci(run.gap[j].numpy())
            drop_flow = trace0 - flow_trace(t)
            rows.append({"lr": lr, "batch": batch, "eta/B": lr / batch, "step": int(run.steps[j]),
                         "tau": float(t), "trace": trace, "trace ci95": trace_ci, "flow trace": flow_trace(t),
                         "rel. error of the drop": ((trace0 - trace - drop_flow) / drop_flow if drop_flow > 0
                                                    else math.nan),
                         "rel. error ci95": trace_ci / drop_flow if drop_flow > 0 else math.nan,
                         "gap": gap, "gap ci95": gap_ci, "level eta Tr/(4B)": lr * trace / (4 * batch)})
    return pd.DataFrame(rows)


@dataclass(frozen=True)
class SgdVerdict:
    """Section 2's verdict: ``table`` (the CSV 06_implicit_bias_verdict, one row per configuration,
    by increasing ``eta/B``), GD's largest relative trace change ``gd_change`` and the flags of
    ``SgdVsFlow.verdict``; ``held`` is "yes", "partly" or "no"."""

    result: SgdVsFlow
    table: pd.DataFrame
    gd_change: float
    gd_static: bool
    loss_optimal: bool
    fell: bool
    close_at_smallest: bool
    ordered: bool
    held: str

    def report(self) -> str:
        r, v = self.result, self.table
        gap_ratio = v["gap / level (tau >= T/4)"]
        smallest = v.iloc[0]
        lines = [
            f"1. GD: the trace changed by at most {self.gd_change:.1e} (relative) and the gap by at most "
            f"{tiny(float(r.gd.gap.abs().max()))} nats over {int(r.gd.steps[-1])} steps: "
            f"{'it does not move (held)' if self.gd_static else 'IT MOVED'}.",
            f"2. SGD: the excess loss, averaged over tau >= T/4, is {gap_ratio.min():.2f} to "
            f"{gap_ratio.max():.2f} times the predicted level eta Tr H/(4B) (at most "
            f"{v['max gap (nats)'].max():.3f} nats, vs L* = {r.contexts.optimal_loss():.3f}): "
            f"{'of the predicted size (held)' if self.loss_optimal else 'NOT of the predicted size'}."]
        for _, row in v.iterrows():
            lines.append(
                f"3. SGD eta={row['lr']}, B={int(row['batch'])} (eta/B={row['eta/B']:g}): Tr H "
                f"{row['trace start']:.3f} -> {row['trace end']:.3f} (drop {row['drop']:.3f} ± "
                f"{row['drop ci95']:.3f}, 95% CI over chains; the flow predicts {row['flow drop']:.3f}); "
                f"relative error of the predicted drop at the end {row['rel. error end']:+.3f} ± "
                f"{row['rel. error end ci95']:.3f}, largest for tau >= T/4: "
                f"{row['max |rel. error|, tau >= T/4']:.3f}")
        lines += [
            f"   The trace fell under every SGD configuration: {self.fell}; the flow predicts the drop "
            f"within 10% at the smallest eta/B ({smallest['eta/B']:g}): {self.close_at_smallest}; the "
            f"deviations are ordered by eta/B: {self.ordered}.",
            "Prediction (GD static; SGD lowers the trace along the optimal set as the slow flow says, the "
            f"curves collapsing in tau = eta^2 k / B): {held_text(self.held)}."]
        return "\n".join(lines)

    def claim(self) -> Claim:
        r, v = self.result, self.table
        v_small = v.iloc[0]
        gap_ratio = v["gap / level (tau >= T/4)"]
        return Claim(
            claim=("SGD drifts along the optimal set toward lower Hessian trace (slow flow -1/(4B) grad Tr "
                   "H, time eta^2 k); GD does not"),
            paper="d theta/dt = -(1/(4B)) grad_Gamma Tr H on times ~ 1/eta^2; no drift for full-batch GD",
            ours=(f"GD: Tr H unchanged (max rel. change {self.gd_change:.0e}); SGD: Tr H {r.trace0:.2f} -> "
                  + ", ".join(f"{row['trace end']:.2f} (eta={row['lr']}, B={int(row['batch'])})"
                              for _, row in v.iterrows())
                  + f" at tau = eta^2 k/B = {r.time:g}, flow {r.flow_trace(r.time):.2f}; error of the "
                  f"predicted drop {v_small['rel. error end']:+.3f} ± {v_small['rel. error end ci95']:.3f} "
                  f"at eta/B = {v_small['eta/B']:g}, ordered by eta/B: {self.ordered}; excess loss "
                  f"{gap_ratio.min():.2f}-{gap_ratio.max():.2f} x eta Tr H/(4B)"),
            held=self.held, notebook="06_theory", figure="06_implicit_bias.png",
            detail=(f"factored model (r = {r.rank}) from a sharp exact optimum; {r.n_chains} chains per "
                    "configuration, 95% CI over chains; flow integrated on the optimal set (Heun, Newton "
                    "retraction)"))

    def summary(self) -> str:
        """Lines rounded so that the last bits of floating point cannot change them."""
        r = self.result
        lines = [f"2 implicit bias: GD static: {self.gd_static} · Tr H {r.trace0:.2g} -> flow "
                 f"{r.flow_trace(r.time):.2g} at tau={r.time:g}"]
        for _, v in self.table.iterrows():
            lines.append(f"   SGD eta={v['lr']} B={int(v['batch'])}: Tr H -> {v['trace end']:.2g} · drop "
                         f"error {v['rel. error end']:+.2f} · gap/level {v['gap / level (tau >= T/4)']:.1f}")
        lines.append(f"   fell: {self.fell} · within 10% at smallest eta/B: {self.close_at_smallest} · "
                     f"ordered by eta/B: {self.ordered} · held: {self.held}")
        return "\n".join(lines)

    def failed_checks(self) -> list[str]:
        """What must hold whatever the outcome (messages of the failed checks; ``[]`` when none): the
        flow stays on the optimal set with a non-increasing trace, GD's gap stays zero, no SGD run
        diverged, every estimate is finite."""
        r = self.result
        columns = ["trace", "trace ci95", "gap", "gap ci95"]
        checks = [
            (float(r.flow.gap.abs().max()) < 1e-9 and bool((np.diff(r.flow.trace.numpy()) <= 1e-12).all()),
             "section 2: the flow left the optimal set"),
            (float(r.gd.gap.abs().max()) < 1e-10, "section 2: GD left the optimal set"),
            (all(bool(torch.isfinite(run.trace).all() and torch.isfinite(run.gap).all())
                 for run in r.runs.values()),
             "section 2: an SGD run diverged"),
            (bool(np.isfinite(r.table[columns].to_numpy()).all()),
             "section 2: an SGD estimate is not finite"),
        ]
        return [message for ok, message in checks if not ok]
