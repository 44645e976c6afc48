"""Notebook 05's analysis: does flatness explain transfer among models at the optimal loss?

Every model of notebooks 02-04 (``experiment_models``) is measured (gap to the optimum, probe
accuracy per task, raw and invariant Hessian trace; from the run store where cached) into one table,
one row per model (``model_table``). Among the models within ε of the optimum, ``correlation_table``
computes, per language, family and task, rank correlations of accuracy with the traces and the gap
(and the partial correlation with the invariant trace given the gap), each with a bootstrap interval
over training lineages; ``claims`` decides them by rule "flatness explains" of
``flatlib.claims`` (per task, combined by rule "parts"). ``check_tables`` and ``summary`` are the
notebook's checked summary. Nothing here changes a rule or a tolerance: they live in ``flatlib.claims``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from flatlib import claims as rules
from flatlib.claims import Claim
from flatlib.measurement.measure import Protocol, measure_checkpoints, measure_many
from flatlib.profiles import resolve
from flatlib.runner.experiments import ModelRef, choose_adversary_weights, experiment_models
from flatlib.runner.sweep import BACKENDS, run_configs
from flatlib.stats import rank_correlation

NOTEBOOK = "05_flatness_and_downstream"
MIN_BOOT = 100  # bootstrap resamples below which a percentile interval is too coarse to report
MIN_MODELS = 4  # models within ε of one family a correlation needs (and 2 lineages); fewer: no row
# (label, column, method, partial given the gap) of every correlation of accuracy in the table: Spearman with
# the invariant trace, with it given the gap (partial), with the raw trace and with the gap; Kendall with the
# invariant trace and with the gap
CORRELATIONS = (("invariant trace", "invariant trace", "spearman", False),
                ("invariant trace|gap", "invariant trace", "spearman", True),
                ("raw trace", "raw trace", "spearman", False), ("gap", "gap", "spearman", False),
                ("invariant trace", "invariant trace", "kendall", False), ("gap", "gap", "kendall", False))


def parameters(profile: str, seed: int, languages: Sequence[str] | None = None, n_boot: int = 2000,
               backend: str = "local") -> dict[str, Any]:
    """The notebook's parameters: the profile resolved with ``languages`` replacing
    ``pretraining.languages`` (None keeps the profile's; ``flatlib.profiles.resolve``), then the
    notebook's own ``n_boot`` and ``backend`` checked (``check_parameters``). A ValueError names the bad
    one."""
    params = resolve(profile, seed=seed,
                     pretraining={"languages": languages} if languages is not None else None)
    check_parameters(n_boot, backend)
    return params


def check_parameters(n_boot: Any, backend: Any) -> None:
    """The notebook's own parameters: ``n_boot`` an integer >= ``MIN_BOOT`` (not a bool), ``backend``
    one of ``flatlib.runner.sweep.BACKENDS``. A ValueError names the bad one."""
    if isinstance(n_boot, bool) or not isinstance(n_boot, int) or n_boot < MIN_BOOT:
        raise ValueError(f"n_boot: expected an integer >= {MIN_BOOT}, got {n_boot!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")


# ---------------------------------------------------------------------------- the model table
def model_table(models: Sequence[ModelRef], measured: Sequence[Mapping[str, Any]],
                widened: Mapping[int, Mapping[str, Any]], epsilon: float) -> pd.DataFrame:
    """One row per model: its language, family, origin, lineage and step, the gap (and SE) of
    ``measured[i]`` (``measure_checkpoint``'s dict), the invariant and raw traces (and SEs) in the
    family's parameterization (``widened[i]`` where the model was widened, else ``measured[i]``), one
    ``acc <task>`` column per probed task, and ``within ε`` (gap <= ``epsilon``)."""
    if len(models) != len(measured):
        raise ValueError(f"measured: expected one measurement per model ({len(models)}), got {len(measured)}")
    rows = []
    for i, (m, r) in enumerate(zip(models, measured)):
        t = widened.get(i, r)  # the traces in the family's parameterization
        row = {"language": m.language, "family": m.family, "origin": m.origin, "lineage": m.lineage,
               "step": m.step,
               "gap": r["gap"], "gap_se": r["gap_se"], "invariant trace": t["invariant_trace"],
               "invariant trace_se": t["invariant_trace_se"], "raw trace": t["trace"],
               "raw trace_se": t["trace_se"]}
        for task, probe in r["probes"].items():
            row[f"acc {task}"] = probe["accuracy"]
        rows.append(row)
    table = pd.DataFrame(rows)
    table["within ε"] = table["gap"] <= epsilon
    return table


@dataclass(frozen=True)
class Collection:
    """``collect_models``' result: the model table (every model, ``within ε`` marked), the number of
    distinct runs, the runs left out as diverged, and the seconds spent training and measuring."""

    table: pd.DataFrame
    runs: int
    diverged: tuple[str, ...]
    training_s: float
    measurement_s: float

    def describe(self, epsilon: float) -> str:
        """What was collected, in a line (two if runs diverged)."""
        lines = []
        if self.diverged:
            lines.append(f"left out the checkpoints of {len(self.diverged)} diverged run(s): "
                         f"{sorted(self.diverged)}")
        lines.append(f"{len(self.table)} models ({self.runs} runs; trained in {self.training_s:.0f} s, "
                     f"measured in {self.measurement_s:.0f} s; 0 s = all from the store), "
                     f"{int(self.table['within ε'].sum())} within ε = {epsilon}")
        return "\n".join(lines)


def collect_models(params: dict[str, Any], names: list[str], protocol: Protocol, backend: str) -> Collection:
    """Every model of notebooks 02-04 at the resolved profile ``params`` (``experiment_models``):
    train the missing runs (``backend``), leave out the checkpoints of diverged runs (they stopped
    early, not at the optimum), measure every checkpoint with ``protocol`` (the widened models' traces
    after widening), and build ``model_table``. Cached runs and measurements come from the store.
    The adversary's weights are notebook 04's held-out choice (``choose_adversary_weights``)."""
    t = params["pretraining"]
    params, _ = choose_adversary_weights(params, backend)
    models = experiment_models(params, names)
    configs = list({m.config.key: m.config for m in models}.values())
    start = time.perf_counter()
    runs = {r.config.key: r.run
            for r in run_configs(configs, backend=backend, workers=t["workers"], progress=False)}
    training = time.perf_counter() - start
    diverged = {key for key, run in runs.items() if run.summary().get("diverged", False)}
    models = [m for m in models if m.config.key not in diverged]
    start = time.perf_counter()
    measured = measure_checkpoints([(runs[m.config.key], m.step) for m in models], protocol,
                                   workers=t["workers"])
    wide = [(i, m) for i, m in enumerate(models) if m.widen_to is not None]
    traces = measure_many("widened_trace",
                          [(runs[m.config.key], m.step, {"width": m.widen_to}) for _, m in wide],
                          protocol, workers=t["workers"])
    widened = {i: w for (i, _), w in zip(wide, traces)}
    measuring = time.perf_counter() - start
    return Collection(model_table(models, measured, widened, t["epsilon"]), len(configs),
                      tuple(sorted(diverged)), training, measuring)


def model_summary(table: pd.DataFrame) -> pd.DataFrame:
    """Per language, family and origin: the number of models, how many are within ε, and the mean
    gap, invariant trace and raw trace (rounded to 4 decimals)."""
    return table.groupby(["language", "family", "origin"]).agg(
        models=("gap", "size"), within_eps=("within ε", "sum"), gap=("gap", "mean"),
        invariant_trace=("invariant trace", "mean"), raw_trace=("raw trace", "mean")).round(4)


# ---------------------------------------------------------------------------- correlations
def correlation_table(models: pd.DataFrame, tasks: Mapping[str, Sequence[str]], n_boot: int,
                      seed: int) -> pd.DataFrame:
    """Per language, family and task of ``models`` (the models within ε; ``tasks`` per language):
    the models and lineages, and every correlation of ``CORRELATIONS`` as ``<method> acc~<label>``
    with ``... low`` and ``... high``, its 95% bootstrap interval over whole lineages (``n_boot``
    resamples, ``seed``). A family with fewer than ``MIN_MODELS`` models or 2 lineages gets no row."""
    rows = []
    for (name, family), frame in models.groupby(["language", "family"]):
        for task in tasks[name]:
            if len(frame) < MIN_MODELS or frame["lineage"].nunique() < 2:
                continue
            row = {"language": name, "family": family, "task": task, "models": len(frame),
                   "lineages": frame["lineage"].nunique()}
            y = frame[f"acc {task}"]
            for label, x, method, partial in CORRELATIONS:
                c = rank_correlation(frame[x], y, method, n_boot=n_boot, seed=seed, groups=frame["lineage"],
                                     given=frame["gap"] if partial else None)
                key = f"{method} acc~{label}"
                row[key], row[f"{key} low"], row[f"{key} high"] = c.value, c.low, c.high
            rows.append(row)
    return pd.DataFrame(rows)


def spearman_interval(row: Mapping[str, Any], label: str) -> rules.Interval:
    """The Spearman correlation ``acc~<label>`` of one row of ``correlation_table`` as a
    ``flatlib.claims.Interval`` over its lineages."""
    key = f"spearman acc~{label}"
    return rules.Interval(row[key], row[f"{key} low"], row[f"{key} high"], int(row["lineages"]))


# ---------------------------------------------------------------------------- verdicts and claims
def claims(correlations: pd.DataFrame, models: pd.DataFrame, names: Sequence[str],
                    epsilon: float) -> list[Claim]:
    """One claim per language and family of ``correlations``: rule "flatness explains"
    (``flatlib.claims.flatness_verdict``) per task, combined by rule "parts"; ``ours`` quotes the
    partial correlation, ρ(gap) and ρ(raw trace) of every task. A language of ``names`` without a
    row gets a "not tested" claim naming how many ``models`` (those within ε) it had."""
    out = []
    groups = correlations.groupby(["language", "family"], sort=False) if len(correlations) else []
    for (name, family), group in groups:
        verdicts = [rules.flatness_verdict(spearman_interval(r, "invariant trace|gap"),
                                           spearman_interval(r, "gap"))
                    for _, r in group.iterrows()]
        ours = "; ".join(f"{r['task']}: partial ρ(inv. trace | gap) "
                         f"{spearman_interval(r, 'invariant trace|gap')}, ρ(gap) "
                         f"{r['spearman acc~gap']:+.2f} [{r['spearman acc~gap low']:+.2f}, "
                         f"{r['spearman acc~gap high']:+.2f}], ρ(raw trace) "
                         f"{r['spearman acc~raw trace']:+.2f}" for _, r in group.iterrows())
        lineages = int(group["lineages"].iloc[0])
        out.append(Claim(claim=f"{name} ({family}): among models at the optimal loss, accuracy falls with "
                               "the invariant Hessian trace and is unrelated to the loss gap",
                         paper="trace correlates with accuracy, loss does not (Fig. 4)", ours=ours,
                         held=rules.combine(verdicts), notebook=NOTEBOOK, figure="05_correlations.png",
                         rule="flatness explains, correlation, unrelated, parts, trace, probe",
                         detail=f"{int(group['models'].iloc[0])} models within ε = {epsilon} from {lineages} "
                                "training lineages; 95% bootstrap CIs over lineages; per task: "
                                + ", ".join(verdicts)))
    tested = set(correlations["language"]) if len(correlations) else set()
    for name in names:
        if name not in tested:
            out.append(Claim(claim=f"{name}: among models at the optimal loss, accuracy falls with the "
                                   "invariant Hessian trace",
                             paper="trace correlates with accuracy (Fig. 4)",
                             ours=f"{int((models.language == name).sum())} models within ε = {epsilon}: too "
                                  "few to correlate",
                             held="not tested", notebook=NOTEBOOK, figure="", rule="correlation"))
    return out


CLAIM_COLUMNS = ("claim", "held", "detail")  # the columns of the notebook's ``claims.claims_table``


# ---------------------------------------------------------------------------- the checked summary
def check_tables(models: pd.DataFrame, correlations: pd.DataFrame,
                 tasks: Mapping[str, Sequence[str]]) -> None:
    """What must hold whatever the outcome (AssertionError otherwise): every model's gap, traces
    finite and the gap > 0; every accuracy of a language's ``tasks`` in (0, 1]; every correlation in
    [-1, 1] and inside its interval (NaN values and bounds allowed)."""
    assert (np.isfinite(models[["gap", "invariant trace", "raw trace"]].to_numpy()).all()
            and (models["gap"] > 0).all())
    for name in tasks:
        accs = models.loc[models.language == name, [f"acc {t}" for t in tasks[name]]]
        assert ((accs > 0) & (accs <= 1)).all().all(), name
    for _, r in correlations.iterrows():
        for key in [c[:-4] for c in correlations.columns if c.endswith(" low")]:
            v, lo, hi = r[key], r[f"{key} low"], r[f"{key} high"]
            assert np.isnan(v) or (-1 <= v <= 1 and (np.isnan(lo) or lo - 1e-9 <= v <= hi + 1e-9)), \
                (r["language"], r["task"], key)


def summary(params: dict[str, Any], models: pd.DataFrame, correlations: pd.DataFrame,
            claims: Sequence[Claim]) -> str:
    """The notebook's checked summary (rounded so that it is stable): the models within ε per
    language and family, the correlations per task to one decimal, each claim's verdict."""
    epsilon = params["pretraining"]["epsilon"]
    lines = [f"{NOTEBOOK} · profile={params['profile']} · seed={params['seed']} · ε={epsilon} · "
             f"{len(models)} models, {int(models['within ε'].sum())} within ε"]
    for (name, family), g in models.groupby(["language", "family"]):
        lines.append(f"{name:>4} {family}: {int(g['within ε'].sum())}/{len(g)} within ε")
    for _, r in correlations.iterrows():
        lines.append(f"{r['language']:>4} {r['family']} {r['task']}: partial ρ(acc,inv. trace|gap) "
                     f"{r['spearman acc~invariant trace|gap']:+.1f} · "
                     f"ρ(acc,raw trace) {r['spearman acc~raw trace']:+.1f} · ρ(acc,gap) "
                     f"{r['spearman acc~gap']:+.1f}")
    lines += [f"claim: {c.claim.split(':')[0]} -> {c.held}" for c in claims]
    if params["profile"] == "smoke":
        lines.append("profile smoke: tiny models, a few dozen steps: these numbers mean nothing")
    lines.append("checks passed: gaps, traces and accuracies finite · correlations inside their intervals")
    return "\n".join(lines)
