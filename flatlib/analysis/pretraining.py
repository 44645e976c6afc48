"""Notebook 02's analysis: pre-training to the optimum, then SGD on the theory's clock
(``flatlib.training.clock`` builds the runs: ``clock_grid``). Its ``parameters``; what it trains and
measures (``train_phase1``, ``train_phase2``, ``measure``); its tables (``gauge_tables``,
``reference_table``, ``measured_models``, ``effect_vs_l2``, the dose-response ``dose_response`` /
``lineage_effects``); its verdicts (``decide``, ``verdict_table``, by the rules of ``flatlib.claims``),
its claims (``claims``), its answer in words (``answer``) and its checked summary
(``check_measurements``, ``summary``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from flatlib.claims import (
    Claim,
    combine,
    equal_loss,
    equivalence_bound,
    mde_text,
    minimum_detectable,
    paired_effect,
    t_interval,
)
from flatlib.measurement.measure import Protocol, lookup_table_probe, measure_checkpoints, measurement_frame
from flatlib.profiles import language_spec, resolve
from flatlib.runner.experiments import phase1_config, phase2_config, training_seeds
from flatlib.runner.runs import Run
from flatlib.runner.sweep import run_configs
from flatlib.training.clock import ClockPoint, clock_grid
from flatlib.training.config import PretrainConfig


# ---------------------------------------------------------------------------- parameters
def parameters(profile: str, seed: int, n_seeds: int | None = None,
               phase1_steps: dict[str, int] | None = None,
               languages: list[str] | None = None, taus: list[float] | None = None,
               noise_seeds: int | None = None) -> dict[str, Any]:
    """The notebook's parameters applied to the profile and validated (``flatlib.profiles.resolve``):
    ``n_seeds``, ``phase1_steps`` and ``languages`` replace ``pretraining.seeds`` / ``.steps`` /
    ``.languages``, ``taus`` and ``noise_seeds`` the ``clock`` section's; None keeps the profile's value.
    A bad value is a ValueError naming it."""
    overrides = {"seeds": n_seeds, "steps": phase1_steps, "languages": languages}
    return resolve(profile, seed=seed, pretraining={k: v for k, v in overrides.items() if v is not None},
                   clock={k: v for k, v in {"taus": taus, "noise_seeds": noise_seeds}.items()
                          if v is not None})


# ---------------------------------------------------------------------------- training and measuring
def train_phase1(params: dict[str, Any]
                 ) -> tuple[dict[tuple[str, int], PretrainConfig], dict[tuple[str, int], Run]]:
    """Phase 1 (``flatlib.runner.experiments.phase1_config``: AdamW, warm-up, linear decay to 0) for every
    language and training seed of ``params``, through the run store (finished runs are read back):
    ``(configs, runs)``, both keyed by ``(language, seed)``."""
    t = params["pretraining"]
    configs = {(name, s): phase1_config(params, name, s) for name in t["languages"]
               for s in training_seeds(params)}
    results = run_configs(list(configs.values()), backend="local", workers=t["workers"], progress=False)
    return configs, {key: r.run for key, r in zip(configs, results)}


@dataclass(frozen=True)
class Phase2:
    """Phase 2's runs: the clock's ``points`` (``clock_grid``), their distinct SGD ``trajectories``,
    ``anneals`` (the run of ``points[i].anneal``) and the AdamW continuations by ``(language, seed)``."""

    points: list[ClockPoint]
    trajectories: list[PretrainConfig]
    anneals: list[Run]
    adamw: dict[tuple[str, int], Run]


def train_phase2(params: dict[str, Any], phase1: dict[tuple[str, int], PretrainConfig]) -> Phase2:
    """SGD on the theory's clock from every phase-1 config (each dose and control closed by its anneal;
    trajectories first, they are the anneals' parents) and AdamW continued from every phase-1 end,
    through the run store."""
    t = params["pretraining"]
    points = clock_grid(phase1, params["clock"])
    trajectories = list({p.sgd.key: p.sgd for p in points if p.sgd is not None}.values())
    run_configs(trajectories, backend="local", workers=t["workers"], progress=False)
    anneals = [r.run for r in run_configs([p.anneal for p in points], backend="local", workers=t["workers"],
                                          progress=False)]
    adamw_configs = {key: phase2_config(params, key[0], key[1], "adamw") for key in phase1}
    adamw = run_configs(list(adamw_configs.values()), backend="local", workers=t["workers"], progress=False)
    return Phase2(points, trajectories, anneals, {key: r.run for key, r in zip(adamw_configs, adamw)})


def measure(params: dict[str, Any], phase1: dict[tuple[str, int], Run], phase2: Phase2, protocol: Protocol
            ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], pd.DataFrame, pd.DataFrame]:
    """Every checkpoint of ``measured_models`` measured with ``protocol`` (cached in its run), and the
    lookup-table references: ``(labels, measurements, frame, references)``, the frame one row per
    model (``measurement_frame``), the references ``reference_table``'s."""
    items, labels = measured_models(phase2.points, phase2.anneals, phase1, phase2.adamw)
    measured = measure_checkpoints(items, protocol, workers=params["pretraining"]["workers"])
    references = reference_table({name: lookup_table_probe(language_spec(params, name), protocol)
                                  for name in params["pretraining"]["languages"]})
    return labels, measured, measurement_frame(labels, measured), references


# ---------------------------------------------------------------------------- the dose-response
def lineage_effects(frame: pd.DataFrame, column: str) -> pd.DataFrame:
    """Per ``(language, tau > 0, lineage)``: the mean of ``column`` over the noise seeds minus the
    lineage's control (``tau = 0``); ``frame`` has the columns language, lineage, noise, tau and
    ``column``. The lineages are the independent units (their noise seeds share a checkpoint and a
    control), so ``flatlib.claims.paired_effect`` takes one difference per lineage."""
    control = frame[frame.tau == 0].groupby(["language", "lineage"])[column].mean()
    doses = frame[frame.tau > 0].groupby(["language", "tau", "lineage"])[column].mean()
    out = doses - control.reindex(doses.index.droplevel("tau")).to_numpy()
    return out.rename("effect").reset_index()


def dose_response(frame: pd.DataFrame, column: str) -> pd.DataFrame:
    """Per ``(language, tau)``: the mean of ``column`` (lineage means, then their mean) with its 95%
    t-interval over lineages (``level_low``, ``level_high``), and for ``tau > 0`` the paired effect
    against the control with its interval (``effect``, ``effect_low``, ``effect_high``, ``lineages``)."""
    rows = []
    # languages it applies to
    frame = frame[frame.groupby("language")[column].transform(lambda v: v.notna().any())]
    means = frame.groupby(["language", "tau", "lineage"])[column].mean()
    effects = lineage_effects(frame, column)
    for (language, tau), values in means.groupby(level=["language", "tau"]):
        level = t_interval(values.to_numpy())
        row = {"language": language, "tau": tau, "level": level.estimate, "level_low": level.low,
               "level_high": level.high, "lineages": level.n}
        if tau > 0:
            d = effects[(effects.language == language) & (effects.tau == tau)]["effect"].to_numpy()
            effect = t_interval(d)
            row.update({"effect": effect.estimate, "effect_low": effect.low, "effect_high": effect.high})
        rows.append(row)
    return pd.DataFrame(rows)


def decide(frame: pd.DataFrame, language: str, column: str, predicted: int,
           converged: bool) -> dict[str, Any]:
    """The verdict on ``column`` at the largest dose for ``language`` (flatlib.claims rules "equal
    loss" and "paired effect"): "not tested" if phase 1 did not converge or the largest dose is not
    at equal loss with the control (mean gaps over lineages); else ``paired_effect`` of the
    per-lineage effects with the ``predicted`` sign."""
    frame = frame[frame.language == language]
    tau = float(frame.tau.max())
    gaps = frame.groupby(["tau", "lineage"])["gap"].mean().groupby(level="tau").mean()
    same_loss = equal_loss(float(gaps.loc[0]), float(gaps.loc[tau]))
    effects = lineage_effects(frame, column)
    verdict, interval = paired_effect(effects[effects.tau == tau]["effect"].to_numpy(), predicted,
                                      equivalence_bound(column,
                                                        float(frame.loc[frame.tau == 0, column].mean())))
    if not (converged and same_loss):
        verdict = "not tested"
    return {"tau": tau, "verdict": verdict, "effect": interval, "gap_control": float(gaps.loc[0]),
            "gap_dose": float(gaps.loc[tau]), "equal_loss": same_loss, "converged": converged}


# ---------------------------------------------------------------------------- tables and verdicts
# What the paper reports for the gain of training on (docs/paper.md), per language, for the report
PAPER_GAIN = {"hmm": "+4 points (HMM task-10, SGD)", "pcfg": "+1.6 points (PCFG task C, SGD)",
              "teacher": "(not reported for this language)"}


def measured_models(points: list[ClockPoint], anneals: list[Run], phase1: dict[tuple[str, int], Run],
                    adamw: dict[tuple[str, int], Run]) -> tuple[list[tuple[Run, int]], list[dict[str, Any]]]:
    """The checkpoints notebook 02 measures, as ``(run, step)`` items with one label each
    (language, lineage, noise, tau, continuation): every anneal's end (``anneals[i]`` is the run of
    ``points[i].anneal``), every phase-1 end and every AdamW continuation's end (labelled tau 0,
    noise 0). ``phase1`` and ``adamw`` map ``(language, seed)`` to the run."""
    items = [(run, p.anneal.steps) for p, run in zip(points, anneals, strict=True)]
    labels = [{"language": p.language, "lineage": p.lineage, "noise": p.noise, "tau": p.tau,
               "continuation": "sgd clock"} for p in points]
    for continuation, runs in (("phase 1", phase1), ("adamw", adamw)):
        for (language, lineage), run in runs.items():
            items.append((run, int(run.config["steps"])))
            labels.append({"language": language, "lineage": lineage, "noise": 0, "tau": 0,
                           "continuation": continuation})
    return items, labels


def effect_vs_l2(labels: list[dict[str, Any]], measured: list[dict[str, Any]]) -> pd.DataFrame:
    """How notebook 02's transfer effect depends on the probe's regularisation: for the clock's largest
    dose against the anneal-only control, per language, task and L2 strength at which *every* compared
    model's standard probe was solved (protocol 2 records the test accuracy along the strengths it walked,
    ``sweep``), the paired effect at that fixed L2 (per lineage: the mean over noise seeds minus the mean of
    the controls, ``lineage_effects``) with its 95% t-interval over lineages, and ``chosen``: how many of
    those models' probes chose that strength. ``labels`` and ``measured`` are ``measured_models``' labels
    and their ``measure_checkpoints`` results."""
    if len(labels) != len(measured):
        raise ValueError(f"labels, measured: expected one label per measurement, got {len(labels)} and "
                         f"{len(measured)}")
    rows = [{"language": label["language"], "lineage": label["lineage"], "noise": label["noise"],
             "tau": label["tau"], "task": task, "l2": float(l2), "accuracy": accuracy,
             "chosen": float(probe["chosen_l2"][0]) == float(l2)}
            for label, m in zip(labels, measured) if label["continuation"] == "sgd clock"
            for task, probe in m["probes"].items() for l2, accuracy in probe["sweep"].items()]
    out = []
    for (language, task), frame in pd.DataFrame(rows).groupby(["language", "task"], sort=False):
        tau = float(frame.tau.max())
        frame = frame[frame.tau.isin([0.0, tau])]
        models = len(frame[["lineage", "noise", "tau"]].drop_duplicates())
        for l2, at in frame.groupby("l2"):
            if len(at) < models:  # some model's walk stopped before this strength
                continue
            effects = lineage_effects(at, "accuracy")
            interval = t_interval(effects[effects.tau == tau]["effect"].to_numpy())
            out.append({"language": language, "task": task, "l2": l2, "effect": interval.estimate,
                        "low": interval.low,
                        "high": interval.high, "lineages": interval.n, "chosen": int(at["chosen"].sum()),
                        "models": models})
    return pd.DataFrame(out)


def l2_dependence(effects: pd.DataFrame, bound: float) -> list[str]:
    """``effect_vs_l2``'s table in words, one line per (language, task): the effect at the strength chosen
    most often, then its range over the fixed strengths and at which of them the 95% CI lies entirely
    above 0 and entirely above the equivalence bound ``bound`` (the smallest effect that counts). The
    verdict uses the chosen strength; this says how much a fixed one would have moved it."""
    lines = []
    for (language, task), frame in effects.groupby(["language", "task"], sort=False):
        frame = frame.sort_values("l2")
        at = frame.loc[frame["chosen"].idxmax()]
        top = frame.loc[frame["effect"].idxmax()]
        above_zero = frame[frame["low"] > 0]["l2"].tolist()
        above_bound = frame[frame["low"] > bound]["l2"].tolist()
        lines.append(
            f"{language} {task}: at the L2 chosen most often ({at['l2']:g}) {at['effect']:+.3f} "
            f"[{at['low']:+.3f}, {at['high']:+.3f}]; at a fixed L2 from {frame['effect'].min():+.3f} to "
            f"{top['effect']:+.3f} [{top['low']:+.3f}, {top['high']:+.3f}] (at {top['l2']:g}); CI above 0 at "
            f"{_strengths(above_zero)}, above the bound +{bound:g} at {_strengths(above_bound)}")
    return lines


def _strengths(l2s: list[float]) -> str:
    return "none of the strengths" if not l2s else ", ".join(f"{v:g}" for v in l2s)


def probe_columns(frame: pd.DataFrame, tasks: list[str]) -> list[str]:
    """The accuracy columns of ``tasks`` in a measurement frame: the standard probe's ``acc <task>``
    first, then the extra probes' ``acc <task> [<probe>]`` (no CI columns)."""
    return [c for c in frame.columns if c.startswith("acc ") and "ci95" not in c and c.split(" ")[1] in tasks]


def verdict_table(measurements: pd.DataFrame, tasks: dict[str, list[str]],
                  converged: dict[str, bool]) -> pd.DataFrame:
    """Notebook 02's verdicts: for each continuation ("sgd clock": the largest dose against the
    anneal-only control; "adamw": the continuation's end against the phase-1 end, as tau 1 against
    tau 0), language and quantity (gap, raw and invariant trace, every probe's accuracy), ``decide``
    with the predicted sign (traces and the gap fall, accuracies rise). ``decides`` marks the
    quantities the claims use: the invariant trace and the standard probe."""
    clock = measurements[measurements.continuation == "sgd clock"]
    adamw = measurements[measurements.continuation.isin(["phase 1", "adamw"])]
    adamw = adamw.assign(tau=(adamw.continuation == "adamw").astype(int))
    rows = []
    for kind, frame in (("sgd clock", clock), ("adamw", adamw)):
        for name in tasks:
            for column in ["gap", "trace", "invariant_trace"] + probe_columns(measurements, tasks[name]):
                d = decide(frame, name, column, +1 if column.startswith("acc") else -1, converged[name])
                rows.append({"continuation": kind, "language": name, "quantity": column,
                             "effect": d["effect"].estimate,
                             "low": d["effect"].low, "high": d["effect"].high, "lineages": d["effect"].n,
                             "mde": minimum_detectable(d["effect"]),
                             "verdict": d["verdict"], "gap control": d["gap_control"],
                             "gap dose": d["gap_dose"], "equal loss": d["equal_loss"],
                             "decides": column == "invariant_trace" or (column.startswith("acc")
                                                                        and "[" not in column)})
    return pd.DataFrame(rows)


def _standard(v: pd.DataFrame) -> list[str]:
    return [q for q in v.index if q.startswith("acc ") and "[" not in q]


def _interval(v: pd.DataFrame, q: str, digits: int) -> str:
    """An effect, its 95% CI and (where the table has it) the design's minimum detectable effect."""
    text = f"{v.loc[q, 'effect']:+.{digits}f} [{v.loc[q, 'low']:+.{digits}f}, {v.loc[q, 'high']:+.{digits}f}]"
    return text + mde_text(v.loc[q].get("mde", math.nan), digits)


def claims(verdict: pd.DataFrame, tau: float, adamw_lr: float) -> list[Claim]:
    """Two claims per continuation and language from ``verdict_table``: "training on raises probe
    accuracy at equal loss" (the standard probe's tasks, combined by ``claims.combine``; the other
    probes in the detail) and "the trace falls" (decided by the invariant trace; the raw one's
    verdict in the detail)."""
    out = []
    for (kind, name), v in verdict.groupby(["continuation", "language"], sort=False):
        v = v.set_index("quantity")
        what = (f"SGD on the clock to τ = {tau} then annealed" if kind == "sgd clock"
                else f"AdamW at constant lr {adamw_lr}")
        against = "the anneal-only control" if kind == "sgd clock" else "the phase-1 end"
        figure = "02_clock_dose_response.png" if kind == "sgd clock" else ""
        tasks = _standard(v)
        others = "; ".join(f"{q[4:]} {v.loc[q, 'effect']:+.3f}" for q in v.index
                           if q.startswith("acc ") and "[" in q)
        out.append(Claim(
            claim=f"{name}: training on after convergence ({what}) raises probe accuracy at equal loss",
            paper=PAPER_GAIN.get(name, "") if kind == "sgd clock" else "(the paper's runs used SGD)",
            ours="; ".join(f"{q[4:]} {_interval(v, q, 3)}" for q in tasks)
                 + f" (95% CI over {int(v.loc[tasks[0], 'lineages'])} lineages, vs {against}; gap "
                   f"{v.loc['gap', 'gap control']:.4f} -> {v.loc['gap', 'gap dose']:.4f} nats)",
            held=combine(v.loc[tasks, "verdict"].tolist()), notebook="02_pretraining_to_optimality",
            figure=figure, detail=f"standard probe decides; others: {others}",
            rule="equal loss, paired effect, parts, probe"))
        out.append(Claim(
            claim=f"{name}: the Hessian trace falls as training continues ({what})",
            paper="falls (Fig. 3)" if kind == "sgd clock" else "(the paper's runs used SGD)",
            ours=f"invariant {_interval(v, 'invariant_trace', 2)}; raw {_interval(v, 'trace', 2)} "
                 f"(95% CI over lineages, vs {against})",
            held=v.loc["invariant_trace", "verdict"], notebook="02_pretraining_to_optimality", figure=figure,
            detail=f"raw trace's own verdict: {v.loc['trace', 'verdict']}",
            rule="equal loss, paired effect, trace"))
    return out


def answer(verdict: pd.DataFrame, profile: str, tau: float, noise_seeds: int) -> list[str]:
    """The dose-response's answer in words, one line per language, from ``verdict_table``: at equal
    loss or not, the change of the invariant trace and of the standard probe with their CIs and
    verdicts."""
    lines = []
    for name, v in verdict[verdict.continuation == "sgd clock"].groupby("language", sort=False):
        v = v.set_index("quantity")
        trace, tasks = v.loc["invariant_trace"], _standard(v)
        gaps = f"gap {trace['gap control']:.4f} -> {trace['gap dose']:.4f} nats"
        loss = f"at equal loss ({gaps})" if trace["equal loss"] else f"NOT at equal loss ({gaps})"
        lines.append(f"{name} ({profile}): SGD to τ = {tau}, {loss}, changed the invariant trace by "
                     f"{_interval(v, 'invariant_trace', 2)} ({trace['verdict']}; raw "
                     f"{v.loc['trace', 'effect']:+.1f}) and the standard probe by "
                     + ", ".join(f"{q[4:]} {_interval(v, q, 3)}" for q in tasks) + " "
                     f"({combine(v.loc[tasks, 'verdict'].tolist())}); 95% CIs over {int(trace['lineages'])} "
                     f"lineages x {noise_seeds} noise seeds.")
    return lines


def check_measurements(measurements: pd.DataFrame, gauge_points: pd.DataFrame,
                       references: pd.DataFrame) -> None:
    """What must hold whatever the experiment's outcome (raises AssertionError): every gap positive
    with an SE below a quarter of it; both traces finite with positive SEs; the invariant trace not
    above the raw one beyond 4 SE; the gauge's parameterizations preserve the function (logits to
    1e-3) and the invariant trace; the majority rate and the lookup-table probe within the Bayes
    accuracy, and every model's probe accuracy in (0, Bayes + tolerance]."""
    M = measurements
    assert np.isfinite(M["gap"]).all() and (M["gap"] > 0).all(), "a gap is not positive"
    assert (M["gap_se"] < 0.25 * M["gap"]).all(), "a gap's standard error is not small"
    for column in ("trace", "invariant_trace"):
        assert np.isfinite(M[column]).all() and (M[f"{column}_se"] > 0).all(), column
    assert (M["invariant_trace"] <= M["trace"] + 4 * np.hypot(M["trace_se"], M["invariant_trace_se"])).all()
    assert (gauge_points["max logit change"] < 1e-3).all(), "a gauge point changed the function"
    spread = gauge_points.groupby("language")["invariant_trace"].agg(np.ptp)
    assert np.allclose(spread, 0, atol=1e-3 * gauge_points["invariant_trace"].max())
    for (name, task), ref in references.iterrows():
        tolerance = 3 * ref["lookup ci95"] + 3 * ref["Bayes se"] + 0.02
        assert (ref["majority"] <= ref["Bayes"] + 1e-9
                and ref["lookup probe"] <= ref["Bayes"] + tolerance), (name, task)
        accs = M.loc[M.language == name, f"acc {task}"]
        assert ((accs > 0) & (accs <= ref["Bayes"] + tolerance)).all(), (name, task)


def summary(profile: str, lineages: list[int], clock: dict[str, Any], steps: dict[str, int], epsilon: float,
            phase1_table: pd.DataFrame, gauge_points: pd.DataFrame, verdict: pd.DataFrame,
            claims: list[Claim]) -> str:
    """Notebook 02's checked summary: the phase-1 gaps, the gauge, every deciding verdict (and the
    raw trace's) and every claim."""
    lines = [f"02_pretraining_to_optimality · profile={profile} · lineages={lineages} · phase 1 {steps} "
             f"steps · clock taus {list(clock['taus'])} (lr {clock['lr']}, batch {clock['batch_size']}) x "
             f"{clock['noise_seeds']} noise seeds · ε={epsilon}"]
    for name, t in phase1_table.groupby(level="language", sort=False):
        lines.append(f"{name:>4}: phase-1 gap "
                     + ", ".join(f"{g:.3f}±{e:.3f}" for g, e in zip(t["gap"], t["gap ± se"]))
                     + f" · {int(t[f'within ε={epsilon}'].sum())}/{len(t)} within ε")
        g = gauge_points[gauge_points.language == name]
        lines.append("      gauge: raw " + " / ".join(f"{x:.1f}" for x in g["trace"])
                     + f" · invariant {g['invariant_trace'].iloc[0]:.2f}")
    for _, v in verdict[verdict.decides | (verdict.quantity == "trace")].iterrows():
        lines.append(f"{v['continuation']:>9} {v['language']:>4} {v['quantity']:>15}: {v['effect']:+.3f} "
                     f"[{v['low']:+.3f}, {v['high']:+.3f}] · equal loss {v['equal loss']} · {v['verdict']}")
    lines += [f"claim: {c.claim} -> {c.held}" for c in claims]
    if profile == "smoke":
        lines.append("profile smoke: tiny models, a few dozen steps: these numbers mean nothing")
    lines.append("checks passed: gaps > 0 with SE < gap/4 · traces finite · invariant <= raw · gauge "
                 "preserves the function and the invariant trace · probes <= Bayes + tolerance")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- the gauge and the references
def gauge_tables(gauge: dict[str, dict[str, Any]]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``measure_gauge`` results per language as two tables: the parameterizations (one row each:
    language, parameterization, max logit change, norms, both traces ± SE) and where the raw trace
    sits (language, block, trace, trace_se)."""
    points = pd.DataFrame([{"language": name, **p} for name, g in gauge.items() for p in g["points"]])
    blocks = pd.DataFrame([{"language": name, "block": block, **v} for name, g in gauge.items()
                           for block, v in g["blocks"].items()])
    return points, blocks


def reference_table(lookup: dict[str, dict[str, Any]]) -> pd.DataFrame:
    """``lookup_table_probe`` results per language as one table indexed by (language, task): the
    lookup-table probe's accuracy and CI, the majority rate, and the Bayes accuracy ± SE (1 and 0
    where a task's label is a function of the sentence, as for the PCFG)."""
    rows = [{"language": name, "task": task, "lookup probe": r["accuracy"], "lookup ci95": r["ci95"],
             "majority": r["majority"], "Bayes": r.get("bayes", 1.0), "Bayes se": r.get("bayes_se", 0.0)}
            for name, tasks in lookup.items() for task, r in tasks.items()]
    return pd.DataFrame(rows).set_index(["language", "task"])
