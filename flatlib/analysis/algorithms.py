"""Notebook 04's analysis: AdamW, SGD and the paper's adversarial algorithm continuing the same
phase-1 checkpoint, and the lookup table (the exact conditionals as features), at the same loss.

The pieces, in the notebook's order: ``parameters`` (the notebook's parameters, validated), ``train``
(phase 1 and the three continuations, read from the run store when they exist), ``curves_table``
(the continuations' logged metrics), ``measure`` (every final checkpoint under the fixed protocol of
``flatlib.runner.experiments``, and the lookup table's probe), ``result_tables`` (the paper's table at this
profile, beside ``PAPER_TABLE``), ``verdict_table`` (the rules of ``flatlib.claims`` applied to the
adversary against AdamW and AdamW against the lookup table), ``claims`` (what REPORT.md
records), and ``check_summary`` / ``summary`` (the notebook's checked summary).

The decisions, fixed before the runs they judge: the adversary and AdamW continued the same phase-1
checkpoint, so their difference is paired per seed (rule "paired effect", tasks combined by rule
"parts"), and decided only when the two are at equal loss (rule "equal loss"); the lookup table has
no training seeds, so AdamW against it is an unpaired (Welch) difference over the lookup table's
probe resplits, decided only when every AdamW seed is within ε of the optimum.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from flatlib import claims as rules
from flatlib.claims import Claim
from flatlib.languages import build_language
from flatlib.measurement.measure import Protocol, lookup_table_probe, measure_checkpoints, measurement_frame
from flatlib.profiles import language_spec, resolve
from flatlib.runner.experiments import (
    WeightChoice,
    adversarial_config,
    phase1_config,
    phase2_config,
    training_seeds,
)
from flatlib.runner.runs import Run
from flatlib.runner.sweep import BACKENDS, run_configs
from flatlib.stats import mean_ci
from flatlib.training.train import PretrainConfig

NOTEBOOK = "04_training_algorithms"
ALGORITHMS = ("adamw", "sgd", "adversarial")  # every one continues the same phase-1 checkpoint
PHASE1 = "phase 1"  # the measurement table's name for the checkpoint they continue

# the paper's Table (PCFG, 235M model; second-hand, docs/paper.md)
PAPER_TABLE = pd.DataFrame(
    [["AdamW", 3.204, 89.9, 49.2, 55.7, 8.0], ["adversarial", 3.206, 83.1, 42.3, 50.2, 19.3],
     ["lookup table", 3.196, 71.2, 39.7, np.nan, np.nan]],
    columns=["paper: model", "paper: loss", "paper: task A", "paper: task B", "paper: task C",
             "paper: trace"])

Key = tuple[str, int, str]  # (language, seed, algorithm)


# ---------------------------------------------------------------------------- parameters
def parameters(profile: str, seed: int, n_seeds: int | None = None, languages: list[str] | None = None,
               weights: dict[str, float] | None = None, backend: str = "local") -> dict[str, Any]:
    """The resolved profile (``flatlib.profiles.resolve``) with the notebook's overrides: ``n_seeds``
    replaces ``pretraining.seeds``, ``languages`` and ``weights`` (the adversary's λ per language)
    replace ``algorithms.languages`` / ``algorithms.weights``; None keeps the profile's. ``backend``
    must be one of ``flatlib.runner.sweep.BACKENDS``. A bad value raises ``ValueError`` naming it."""
    overrides = {key: value for key, value in {"languages": languages, "weights": weights}.items()
                 if value is not None}
    params = resolve(profile, seed=seed, pretraining={"seeds": n_seeds} if n_seeds is not None else None,
                     algorithms=overrides)
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    return params


def describe(params: dict[str, Any]) -> str:
    """The settings the notebook runs with, one ``section.key: value`` a line: the whole
    ``algorithms`` section and the ``pretraining`` keys the continuations use."""
    t, a = params["pretraining"], params["algorithms"]
    lines = [f"{'algorithms.' + key:>26}: {value}" for key, value in a.items()]
    keys = ("model", "steps", "continue_steps", "checkpoint_every", "adamw_lr", "sgd_lr", "seeds", "epsilon")
    lines += [f"{'pretraining.' + key:>26}: {t[key]}" for key in keys]
    return "\n".join(lines)


def tasks(params: dict[str, Any]) -> dict[str, list[str]]:
    """The downstream tasks of each language of ``algorithms.languages``, in the language's order."""
    return {name: list(build_language(language_spec(params, name)).tasks)
            for name in params["algorithms"]["languages"]}


def protocol(params: dict[str, Any]) -> Protocol:
    """The measurement protocol of the profile (``pretraining.protocol``), seeded with ``seed``."""
    return Protocol(**params["pretraining"]["protocol"], seed=params["seed"])


def labels(params: dict[str, Any]) -> dict[str, str]:
    """The name each model is shown under in the tables and figures (the learning rates are the
    profile's)."""
    t = params["pretraining"]
    return {"adamw": f"AdamW lr {t['adamw_lr']}", "sgd": f"SGD lr {t['sgd_lr']}",
            "adversarial": "adversarial (AdamW, L - λ·L_down)", "lookup": "lookup table",
            PHASE1: "phase-1 end"}


# ---------------------------------------------------------------------------- training
def continuation_config(params: dict[str, Any], name: str, seed: int, algorithm: str) -> PretrainConfig:
    """The continuation of ``algorithm`` from the phase-1 checkpoint of ``(name, seed)``: notebook
    02's AdamW or SGD continuation, or ``flatlib.runner.experiments.adversarial_config``; all three run for
    ``pretraining.continue_steps`` steps."""
    if algorithm == "adversarial":
        config = adversarial_config(params, name, seed)
        if config is None:
            raise ValueError(f"name: {name!r} is not among algorithms.languages "
                             f"{params['algorithms']['languages']}")
        return config
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm: expected one of {ALGORITHMS}, got {algorithm!r}")
    return phase2_config(params, name, seed, algorithm)


@dataclass(frozen=True)
class Continuations:
    """The trained runs: ``phase1`` keyed by ``(language, seed)`` with their ``phase1_configs``, and
    ``runs`` (the continuations) keyed by ``(language, seed, algorithm)``; ``seconds`` of wall time
    (0 when everything was read from the run store)."""

    phase1: dict[tuple[str, int], Run]
    phase1_configs: dict[tuple[str, int], PretrainConfig]
    runs: dict[Key, Run]
    seconds: float


def check_not_diverged(runs: dict[Key, Run]) -> None:
    """Raise ``RuntimeError`` naming every run whose summary says it diverged: the tables compare
    every algorithm on every seed, so a diverged run would leave a hole."""
    diverged = [key for key, run in runs.items() if run.summary().get("diverged", False)]
    if diverged:
        raise RuntimeError(f"these continuations diverged (their loss became non-finite): {diverged}; lower "
                           "pretraining.adamw_lr / sgd_lr or the adversary's weight (algorithms.weights)")


def train(params: dict[str, Any], backend: str = "local") -> Continuations:
    """Phase 1 (first, so that no two workers train one parent) and every continuation of every
    seed and language with ``flatlib.runner.sweep.run_configs``; existing runs are read from the store.
    Raises ``RuntimeError`` if a continuation diverged (``check_not_diverged``)."""
    names, workers = params["algorithms"]["languages"], params["pretraining"]["workers"]
    configs = {(name, s, a): continuation_config(params, name, s, a)
               for name in names for s in training_seeds(params) for a in ALGORITHMS}
    phase1 = {(name, s): phase1_config(params, name, s) for name in names for s in training_seeds(params)}
    start = time.perf_counter()
    first = run_configs(list(phase1.values()), backend=backend, workers=workers, progress=False)
    results = run_configs(list(configs.values()), backend=backend, workers=workers, progress=False)
    out = Continuations({key: r.run for key, r in zip(phase1, first)}, phase1,
                        {key: r.run for key, r in zip(configs, results)}, time.perf_counter() - start)
    check_not_diverged(out.runs)
    return out


def curves_table(runs: dict[Key, Run]) -> pd.DataFrame:
    """Every continuation's logged metrics in one long table: ``language``, ``seed``, ``algorithm``,
    then the run's metric columns (``step``, ``gap``, ... and, for the adversary, ``adv_loss``; NaN
    where a run did not log a column)."""
    frames = [run.metrics().assign(language=name, seed=s, algorithm=a) for (name, s, a), run in runs.items()]
    table = pd.concat(frames, ignore_index=True)
    first = ["language", "seed", "algorithm"]
    return table[first + [c for c in table.columns if c not in first]]


# ---------------------------------------------------------------------------- measurements
def measurement_table(keys: list[Key], measured: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per measured checkpoint: ``language``, ``seed``, ``algorithm`` (``PHASE1`` for the
    checkpoint the continuations start from), then ``flatlib.measurement.measure.measurement_row``."""
    return measurement_frame([{"language": name, "seed": s, "algorithm": a} for name, s, a in keys], measured)


@dataclass(frozen=True)
class MeasuredTable:
    """The measurements already tabulated (notebook 03's ``size.RunMeasurements`` holds the raw dicts per
    run): ``table`` (``measurement_table``), ``lookup`` (``lookup_table_probe`` per language: per task
    the accuracy, its ``ci95`` and the resplits' accuracies ``splits``, and the Bayes accuracy where
    known), the number of ``checkpoints`` and the ``seconds`` they took."""

    table: pd.DataFrame
    lookup: dict[str, dict[str, dict[str, Any]]]
    checkpoints: int
    seconds: float


def measure(params: dict[str, Any], trained: Continuations) -> MeasuredTable:
    """Measure every phase-1 checkpoint and every continuation's final checkpoint (``measure_checkpoints``,
    cached in the runs) and the lookup table's probe, for every language and seed."""
    last = params["pretraining"]["continue_steps"]
    items, keys = [], []
    for name in params["algorithms"]["languages"]:
        for s in training_seeds(params):
            items.append((trained.phase1[name, s], trained.phase1_configs[name, s].steps))
            keys.append((name, s, PHASE1))
            for a in ALGORITHMS:
                items.append((trained.runs[name, s, a], last))
                keys.append((name, s, a))
    start = time.perf_counter()
    measured = measure_checkpoints(items, protocol(params), workers=params["pretraining"]["workers"])
    lookup = {name: lookup_table_probe(language_spec(params, name), protocol(params))
              for name in params["algorithms"]["languages"]}
    return MeasuredTable(measurement_table(keys, measured), lookup, len(items), time.perf_counter() - start)


# ---------------------------------------------------------------------------- the paper's table
def _cell(values: Any) -> str:
    mean, ci = mean_ci(np.asarray(values, dtype=float))
    return f"{mean:.3f} ± {ci:.3f}" if np.isfinite(ci) else f"{mean:.3f}"


def _mean_pm(values: pd.Series, digits: int) -> str:
    return f"{values.mean():.{digits}f} ± {mean_ci(values.to_numpy())[1]:.{digits}f}"


def result_table(table: pd.DataFrame, lookup: dict[str, dict[str, Any]], name: str, task_names: list[str],
                 label: dict[str, str]) -> pd.DataFrame:
    """The paper's table for language ``name``: one row per model (``PHASE1``, then ``ALGORITHMS``,
    then the lookup table), indexed by its ``label``; cells "mean ± 95% CI over seeds" for the gap,
    each task's accuracy, the raw and the invariant trace. The lookup table's accuracies are ± its
    CI over probe resplits; it has no gap (0 by construction) and no parameters (no trace)."""
    frame = table[table.language == name]
    rows = []
    for a in (PHASE1, *ALGORITHMS):
        d = frame[frame.algorithm == a]
        rows.append({"model": label[a], "gap (nats)": _cell(d["gap"]),
                     **{f"task {t}": _cell(d[f"acc {t}"]) for t in task_names},
                     "trace": _mean_pm(d["trace"], 1), "invariant trace": _mean_pm(d["invariant_trace"], 2)})
    rows.append({"model": label["lookup"], "gap (nats)": "0 (exact)",
                 **{f"task {t}": f"{lookup[t]['accuracy']:.3f} ± {lookup[t]['ci95']:.3f}"
                    for t in task_names},
                 "trace": "(no parameters)", "invariant trace": "(no parameters)"})
    return pd.DataFrame(rows).set_index("model")


def result_tables(params: dict[str, Any], measurements: MeasuredTable) -> dict[str, pd.DataFrame]:
    """``result_table`` of every language of ``algorithms.languages``."""
    task_names, label = tasks(params), labels(params)
    return {name: result_table(measurements.table, measurements.lookup[name], name, task_names[name], label)
            for name in params["algorithms"]["languages"]}


# ---------------------------------------------------------------------------- the verdicts
def _paired(table: pd.DataFrame, name: str, seed_list: list[int]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """AdamW's and the adversary's rows of language ``name``, indexed by seed, in ``seed_list`` order."""
    frame = table[table.language == name].set_index(["algorithm", "seed"])
    return frame.loc["adamw"].loc[seed_list], frame.loc["adversarial"].loc[seed_list]


def verdict_table(table: pd.DataFrame, lookup: dict[str, dict[str, dict[str, Any]]],
                  task_names: dict[str, list[str]], seed_list: list[int], epsilon: float) -> pd.DataFrame:
    """The rules of ``flatlib.claims`` on the measurement table, per language of ``task_names``:

    - "adversarial - adamw" for each task's accuracy (predicted -1), the invariant and the raw trace
      (predicted +1): rule "paired effect" over ``seed_list``, "not tested" unless the two mean gaps
      are at "equal loss";
    - "adamw - lookup table" for each task's accuracy (predicted +1): Welch interval of AdamW's seeds
      against the lookup table's probe resplits (``lookup[name][task]["splits"]``), "not tested"
      unless every AdamW seed is within ``epsilon`` of the optimum.

    Columns: language, quantity, comparison, effect, low, high, verdict, gap adamw, gap adversarial
    (mean gaps), equal loss."""
    out = []
    for name, names_tasks in task_names.items():
        adam, adv = _paired(table, name, seed_list)
        same_loss = rules.equal_loss(adam["gap"].mean(), adv["gap"].mean())
        adam_converged = bool((adam["gap"] <= epsilon).all())
        rows = []
        for column, predicted in ([(f"acc {t}", -1) for t in names_tasks]
                                  + [("invariant_trace", +1), ("trace", +1)]):
            verdict, effect = rules.paired_effect((adv[column] - adam[column]).to_numpy(), predicted,
                                                  rules.equivalence_bound(column, float(adam[column].mean())))
            rows.append({"language": name, "quantity": column, "comparison": "adversarial - adamw",
                         "effect": effect.estimate, "low": effect.low, "high": effect.high,
                         "mde": rules.minimum_detectable(effect),
                         "verdict": verdict if same_loss else "not tested"})
        for t in names_tasks:
            effect = rules.welch_interval(lookup[name][t]["splits"], adam[f"acc {t}"])
            rows.append({"language": name, "quantity": f"acc {t}", "comparison": "adamw - lookup table",
                         "effect": effect.estimate, "low": effect.low, "high": effect.high,
                         "mde": rules.minimum_detectable(effect),
                         "verdict": rules.interval_verdict(effect, +1, rules.equivalence_bound(f"acc {t}"))
                         if adam_converged else "not tested"})
        out += [{**row, "gap adamw": adam["gap"].mean(), "gap adversarial": adv["gap"].mean(),
                 "equal loss": same_loss}
                for row in rows]
    return pd.DataFrame(out)


def verdicts(params: dict[str, Any], measurements: MeasuredTable) -> pd.DataFrame:
    """``verdict_table`` at the profile's languages, seeds and ε."""
    return verdict_table(measurements.table, measurements.lookup, tasks(params), training_seeds(params),
                         params["pretraining"]["epsilon"])


def _interval(row: pd.Series) -> str:
    """An effect, its 95% CI and (where the table has it) the design's minimum detectable effect."""
    return (f"{row['effect']:+.3f} [{row['low']:+.3f}, {row['high']:+.3f}]"
            + rules.mde_text(row.get("mde", math.nan), 3))


def weight_table(choices: dict[str, WeightChoice]) -> pd.DataFrame:
    """The held-out choice of the adversary's weight (``flatlib.runner.experiments.choose_adversary_weights``)
    as a table: per language and λ of the grid, the held-out seed's final gap, its difference from
    the AdamW continuation's, whether that is equal loss (rule "equal loss") and which λ was chosen."""
    rows = [{"language": c.language, "held-out seed": c.seed, "λ": weight, "gap": gap,
             "AdamW gap": c.reference_gap,
             "difference": gap - c.reference_gap, "equal loss": bool(rules.equal_loss(gap, c.reference_gap)),
             "chosen": weight == c.weight} for c in choices.values() for weight, gap in c.gaps.items()]
    return pd.DataFrame(rows, columns=["language", "held-out seed", "λ", "gap", "AdamW gap", "difference",
                                       "equal loss", "chosen"])


def _weight_text(params: dict[str, Any], name: str, choices: dict[str, WeightChoice]) -> str:
    if name in choices:
        return choices[name].describe()
    return f"λ = {params['algorithms']['weights'][name]} given as a parameter (not chosen on a held-out seed)"


def claims(params: dict[str, Any], table: pd.DataFrame, verdict: pd.DataFrame,
                     choices: dict[str, WeightChoice]) -> list[Claim]:
    """The three claims per language that notebook 04 records, with the paper's numbers beside
    ours, decided by ``verdict`` (``verdict_table``; tasks combined by rule "parts"): the adversary
    transfers worse than AdamW at the same loss; it is sharper (the invariant trace decides, the raw
    trace's verdict is in the detail); a trained model transfers better than the lookup table.
    ``choices`` (``choose_adversary_weights``) say how each λ was chosen (empty: given)."""
    t, a = params["pretraining"], params["algorithms"]
    seed_list, epsilon, last = training_seeds(params), t["epsilon"], t["continue_steps"]
    out = []
    for name in a["languages"]:
        adam, adv = _paired(table, name, seed_list)
        adam_converged = bool((adam["gap"] <= epsilon).all())
        v = verdict[verdict.language == name].set_index(["comparison", "quantity"])
        task_names = [q[len("acc "):] for c, q in v.index
                      if c == "adversarial - adamw" and q.startswith("acc ")]
        quantities = [f"acc {x}" for x in task_names] + ["invariant_trace", "trace"]
        vs_adam = {q: v.loc[("adversarial - adamw", q)] for q in quantities}
        vs_lookup = {x: v.loc[("adamw - lookup table", f"acc {x}")] for x in task_names}
        loss_text = f"gaps AdamW {adam['gap'].mean():.4f}, adversarial {adv['gap'].mean():.4f} nats"
        out.append(Claim(
            claim=f"{name}: the adversarial algorithm reaches the same loss but transfers worse than AdamW",
            paper="A 89.9 -> 83.1, B 49.2 -> 42.3, C 55.7 -> 50.2 (PCFG, loss 3.204 vs 3.206)",
            ours="; ".join(f"{x} {_interval(vs_adam[f'acc {x}'])}" for x in task_names)
                 + f" (95% CI over {len(seed_list)} seeds; {loss_text})",
            held=rules.combine([vs_adam[f"acc {x}"]["verdict"] for x in task_names]), notebook=NOTEBOOK,
            figure="04_algorithms.png", rule="adversary weight, equal loss, paired effect, parts, probe",
            detail=f"{_weight_text(params, name, choices)}, on task {a['tasks'][name]}; {last} AdamW steps "
                   "from the phase-1 checkpoint"))
        out.append(Claim(
            claim=f"{name}: the adversarial model is sharper (larger invariant Hessian trace) than AdamW's",
            paper="trace 8.0 -> 19.3 (PCFG)", held=vs_adam["invariant_trace"]["verdict"], notebook=NOTEBOOK,
            figure="04_algorithms.png", rule="adversary weight, equal loss, paired effect, trace",
            ours=f"invariant {adam['invariant_trace'].mean():.2f} -> {adv['invariant_trace'].mean():.2f} "
                 f"({_interval(vs_adam['invariant_trace'])}); raw {adam['trace'].mean():.1f} -> "
                 f"{adv['trace'].mean():.1f} ({_interval(vs_adam['trace'])}), paired over seeds",
            detail=f"the raw trace's own verdict: {vs_adam['trace']['verdict']}"))
        out.append(Claim(
            claim=f"{name}: a trained transformer transfers better than the lookup table "
                  "(the optimal model's conditionals)",
            paper="A 89.9 vs 71.2, B 49.2 vs 39.7 (PCFG)",
            ours="; ".join(f"{x} {_interval(vs_lookup[x])}" for x in task_names)
                 + " (AdamW - lookup, Welch 95% CI)",
            held=rules.combine([vs_lookup[x]["verdict"] for x in task_names]), notebook=NOTEBOOK,
            figure="04_algorithms.png", rule="unpaired effect, parts, probe",
            detail=f"AdamW's gap {adam['gap'].mean():.4f} nats"
                   + ("" if adam_converged else f", not within ε = {epsilon}")))
    return out


# ---------------------------------------------------------------------------- the checked summary
def check_summary(runs: dict[Key, Run], table: pd.DataFrame,
                  lookup: dict[str, dict[str, dict[str, Any]]]) -> None:
    """What must hold whatever the outcome; raises ``AssertionError`` otherwise: every
    continuation's logged gap is finite; every measured gap, trace and invariant trace (``table``,
    ``measurement_table``) is finite, every gap and trace SE positive; each language's adversary
    logged a finite downstream loss; every probe accuracy is in (0, 1] and, where ``lookup`` knows
    the Bayes accuracy, at most Bayes + 3 SE + 3 CI + 0.03."""
    for run in runs.values():
        assert np.isfinite(run.metrics()["gap"]).all(), f"{run}: the gap became non-finite"
    assert (np.isfinite(table[["gap", "trace", "invariant_trace"]].to_numpy()).all()
            and (table["gap"] > 0).all())
    assert (table["trace_se"] > 0).all() and (table["invariant_trace_se"] > 0).all()
    for name in lookup:
        adversaries = [run for (language, _, a), run in runs.items()
                       if language == name and a == "adversarial"]
        adv_loss = (pd.concat([run.metrics()["adv_loss"].dropna() for run in adversaries])
                    if adversaries else [])
        assert len(adv_loss) and np.isfinite(adv_loss).all(), name
        for t, ref in lookup[name].items():
            accs = table.loc[table.language == name, f"acc {t}"]
            assert ((accs > 0) & (accs <= 1)).all(), (name, t)
            if "bayes" in ref:
                assert (accs <= ref["bayes"] + 3 * ref["bayes_se"] + 3 * ref["ci95"] + 0.03).all(), (name, t)


def summary(params: dict[str, Any], verdict: pd.DataFrame, claims: list[Claim]) -> str:
    """The checked summary the notebook prints (rounded, so that nbval compares it): the setting,
    one line per verdict row, one per claim, and the checks that passed."""
    t = params["pretraining"]
    lines = [f"{NOTEBOOK} · profile={params['profile']} · seeds={training_seeds(params)} · "
             f"{t['continue_steps']} continuation steps · ε={t['epsilon']}"]
    for _, v in verdict.iterrows():
        lines.append(f"{v['language']:>4} {v['comparison']:>20} {v['quantity']:>15}: {v['effect']:+.3f} "
                     f"[{v['low']:+.3f}, {v['high']:+.3f}] · gaps "
                     f"{v['gap adamw']:.3f}/{v['gap adversarial']:.3f} · {v['verdict']}")
    for c in claims:
        lines.append(f"claim: {c.claim.split(':')[0]}: {c.claim.split(': ')[1][:45]} -> {c.held}")
    if params["profile"] == "smoke":
        lines.append("profile smoke: tiny models, a few dozen steps: these numbers mean nothing")
    lines.append("checks passed: no divergence · gaps, traces, accuracies finite · probes <= Bayes + "
                 "tolerance")
    return "\n".join(lines)
