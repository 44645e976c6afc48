"""Notebook 03 (model size): the analysis behind "the same loss, different transfer" across widths.

Models of several widths are trained with one recipe towards the exact optimum (``configs``); this
module turns their runs and measurements into the notebook's tables and decides the claims with the
rules of ``flatlib.claims`` (which it only applies, never changes):

- ``size_table``: one row per run (gap, parameters, "within ε") from the runs' summaries;
- ``measure`` and ``measurement_table``: probes, fine-tuning and the four traces (raw and invariant,
  own and widened parameterization) of every final checkpoint, one row per model;
- ``verdict_table``: per language and quantity, the equal-loss pair of widths, the Welch effect of
  size with its verdict, and the Spearman correlation with size;
- ``claims``: the claims for the report, with the paper's numbers (``PAPER``);
- ``check_measurements`` and ``summary``: the notebook's checked summary.

The figures are drawn by ``flatlib.plots.size``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from flatlib import claims as rules
from flatlib.claims import Claim
from flatlib.languages import build_language
from flatlib.measurement.measure import Protocol, lookup_table_probe, measure_checkpoints, measure_many
from flatlib.profiles import language_spec, resolve
from flatlib.runner.experiments import phase1_config, training_seeds
from flatlib.runner.sweep import BACKENDS
from flatlib.stats import mean_ci, rank_correlation
from flatlib.training.train import PretrainConfig

NOTEBOOK = "03_model_size"
Key = tuple[str, int, int]  # (language, width, seed): one training run

# per language: the paper's numbers for (larger models transfer better, larger models are flatter)
PAPER = {"hmm": ("+4.5 points (linear probe, HMM)", "falls (Fig. 5)"),
         "pcfg": ("+6.9 points (linear probe, PCFG)", "19.8 -> 12.6 (PCFG)"),
         "teacher": ("+2.0 points (OPT-generated text)", "falls")}
TRACES = ["raw trace", "invariant trace", "widened trace", "widened invariant trace"]
# the quantities of the verdict table after the per-task probes and fine-tunings, the deciding one first
TRACE_QUANTITIES = ["widened invariant trace", "widened trace", "invariant trace", "raw trace"]


# ---------------------------------------------------------------------------- parameters
def parameters(profile: str, seed: int, n_seeds: int | None = None, languages: Sequence[str] | None = None,
               widths: Sequence[int] | None = None, backend: str = "local") -> dict[str, Any]:
    """The notebook's parameters applied to the profile (``flatlib.profiles.resolve``: ``n_seeds``
    overrides ``pretraining.seeds``, ``languages`` and ``widths`` the ``model_size`` section; None
    keeps the profile's value) and validated; a bad one is a ValueError naming it (``backend`` must
    be one of ``flatlib.runner.sweep.BACKENDS``)."""
    size_overrides = {"languages": languages, "widths": widths}
    params = resolve(profile, seed=seed, pretraining={"seeds": n_seeds} if n_seeds is not None else None,
                     model_size={k: v for k, v in size_overrides.items() if v is not None})
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    return params


def describe(params: dict[str, Any]) -> str:
    """The resolved ``model_size`` section and the ``pretraining`` values that train the widths, one
    ``section.key: value`` line each."""
    lines = [f"{'model_size.' + key:>26}: {value}" for key, value in params["model_size"].items()]
    for key in ("batch_size", "lr", "warmup_steps", "steps", "seeds", "epsilon", "eval_pairs", "protocol"):
        lines.append(f"{'pretraining.' + key:>26}: {params['pretraining'][key]}")
    return "\n".join(lines)


@dataclass(frozen=True)
class Design:
    """What notebook 03 compares: training ``seeds``, ``languages`` (with their downstream ``tasks``
    and language ``specs``), ``widths`` (increasing; the last is the widest, into which every model
    is widened), the profile's ``epsilon`` (nats) and the measurement ``protocol``."""

    seeds: list[int]
    languages: list[str]
    widths: list[int]
    epsilon: float
    protocol: Protocol
    tasks: dict[str, tuple[str, ...]]
    specs: dict[str, dict[str, Any]]

    @property
    def widest(self) -> int:
        return self.widths[-1]


def design(params: dict[str, Any]) -> Design:
    """The ``Design`` of resolved ``params``: seeds ``seed, seed + 1, ...`` (``pretraining.seeds`` of
    them), ``model_size.languages`` and ``.widths``, ``pretraining.epsilon`` and ``.protocol`` (with
    the notebook's seed)."""
    t, s = params["pretraining"], params["model_size"]
    specs = {name: language_spec(params, name) for name in s["languages"]}
    return Design(seeds=training_seeds(params), languages=list(s["languages"]),
                  widths=list(s["widths"]), epsilon=t["epsilon"],
                  protocol=Protocol(**t["protocol"], seed=params["seed"]),
                  tasks={name: tuple(build_language(spec).tasks) for name, spec in specs.items()},
                  specs=specs)


def configs(params: dict[str, Any], d: Design) -> dict[Key, PretrainConfig]:
    """One config per (language, width, seed): notebook 02's phase-1 recipe at this width
    (``flatlib.runner.experiments.phase1_config``: heads of ``model_size.head_dim``, one learning rate for
    every width, the one the widest can take). The widest widths come first, so that worker
    processes finish together."""
    return {(name, w, s): phase1_config(params, name, s, width=w)
            for name in d.languages for w in reversed(d.widths) for s in d.seeds}


# ---------------------------------------------------------------------------- training
def size_table(runs: Mapping[Key, Any], epsilon: float) -> pd.DataFrame:
    """One row per finished run (anything with ``summary()``, keyed by (language, width, seed)):
    parameters, steps, whether it diverged, its final gap (NaN for a diverged run) and SE, and
    whether the gap is within ``epsilon``; sorted by language, width, seed."""
    rows = []
    for (name, w, s), run in runs.items():
        summary = run.summary()
        diverged = summary.get("diverged", False)
        gap = summary["final_gap"] if not diverged else float("nan")  # a diverged run has no gap
        rows.append({"language": name, "width": w, "seed": s, "parameters": summary["n_params"],
                     "steps": summary["steps"], "diverged": diverged, "gap": gap,
                     "gap_se": summary["final_gap_se"], "within ε": bool(gap <= epsilon)})
    return pd.DataFrame(rows).sort_values(["language", "width", "seed"]).reset_index(drop=True)


def width_summary(sizes: pd.DataFrame) -> pd.DataFrame:
    """Per (language, width): parameters, mean and max gap over seeds, seeds within ε (rounded)."""
    per = sizes.groupby(["language", "width"])
    return per.agg(parameters=("parameters", "first"), gap_mean=("gap", "mean"), gap_max=("gap", "max"),
                   within_eps=("within ε", "sum")).round(4)


def gap_curves(runs: Mapping[Key, Any]) -> pd.DataFrame:
    """The gap during training of every run (``metrics()``): columns language, width, seed, step, gap."""
    frames = [run.metrics()[["step", "gap"]].assign(language=name, width=w, seed=s)
              for (name, w, s), run in runs.items()]
    return pd.concat(frames, ignore_index=True)[["language", "width", "seed", "step", "gap"]]


def converged(sizes: pd.DataFrame) -> dict[tuple[str, int], bool]:
    """Per (language, width): "at the optimal loss", i.e. every seed's run (diverged ones included)
    within ε."""
    return {(name, w): bool(g["within ε"].all()) for (name, w), g in sizes.groupby(["language", "width"])}


def mean_gaps(sizes: pd.DataFrame) -> dict[tuple[str, int], float]:
    """Per (language, width): the mean final gap over the seeds that did not diverge."""
    return {(name, w): g["gap"].mean() for (name, w), g in sizes.groupby(["language", "width"])}


def parameter_counts(sizes: pd.DataFrame) -> pd.Series:
    """Parameters of each (language, width) model."""
    return sizes.groupby(["language", "width"])["parameters"].first()


def per_width(frame: pd.DataFrame, column: str) -> pd.DataFrame:
    """Mean of ``column`` per width with the half-width of its 95% t-interval over the rows (seeds):
    columns "mean" and "ci", index the widths."""
    out = frame.groupby("width")[column].apply(lambda v: mean_ci(v.to_numpy()))
    return pd.DataFrame(out.tolist(), index=out.index, columns=["mean", "ci"])


# ---------------------------------------------------------------------------- measurements
@dataclass(frozen=True)
class RunMeasurements:
    """The raw measurements of every final checkpoint, one dict per protocol and run (tabulated by
    ``measurement_table``; notebook 04's ``algorithms.MeasuredTable`` holds a finished table):
    ``checkpoint`` (gap, probes, raw and invariant trace: ``measure_checkpoint``), ``widened`` (the traces
    after widening into the widest architecture; the widest models have none), ``finetune``; ``lookup`` the
    lookup-table probe per language; ``left_out`` the diverged runs (no final checkpoint)."""

    checkpoint: dict[Key, dict[str, Any]]
    widened: dict[Key, dict[str, Any]]
    finetune: dict[Key, dict[str, Any]]
    lookup: dict[str, dict[str, Any]]
    left_out: list[Key]

    @property
    def trace_description(self) -> str:
        return next(iter(self.checkpoint.values()))["trace_description"]


def measure(runs: Mapping[Key, Any], configs: Mapping[Key, PretrainConfig], d: Design, finetune_epochs: int,
            workers: int = 1) -> RunMeasurements:
    """Notebook 02's protocol on the final checkpoint of every run that did not diverge (cached in the
    run directories): ``measure_checkpoints``, the ``widened_trace`` into ``d.widest`` of every
    narrower model, and ``finetune`` for ``finetune_epochs`` epochs; and the lookup-table probe of
    every language."""
    kept = [key for key in runs if not runs[key].summary().get("diverged", False)]
    finals = [(runs[key], configs[key].steps) for key in kept]
    measured = measure_checkpoints(finals, d.protocol, workers=workers)
    wide_keys = [key for key in kept if key[1] != d.widest]
    wide_items = [(runs[key], configs[key].steps, {"width": d.widest}) for key in wide_keys]
    widened = measure_many("widened_trace", wide_items, d.protocol, workers=workers)
    tune_items = [(run, step, {"epochs": finetune_epochs}) for run, step in finals]
    tuned = measure_many("finetune", tune_items, d.protocol, workers=workers)
    lookup = {name: lookup_table_probe(d.specs[name], d.protocol) for name in d.languages}
    return RunMeasurements(checkpoint=dict(zip(kept, measured)), widened=dict(zip(wide_keys, widened)),
                        finetune=dict(zip(kept, tuned)), lookup=lookup,
                        left_out=[key for key in runs if key not in kept])


def measurement_table(sizes: pd.DataFrame, m: RunMeasurements, widest: int) -> tuple[pd.DataFrame, float]:
    """One row per measured model: its row of ``sizes`` (the gap is the run's own final one), the four
    traces with their SEs (a model of the ``widest`` width is its own widening) and per task the probe
    and fine-tuning accuracy (with probe protocol 2 also ``l2 <task>``, the probe's chosen L2). Returns the
    table and the largest logit change any widening caused."""
    rows, max_change = [], 0.0
    for (name, w, s), cp in m.checkpoint.items():
        wide = {**cp, "max_logit_change": 0.0} if w == widest else m.widened[name, w, s]
        max_change = max(max_change, wide["max_logit_change"])
        row = {"language": name, "width": w, "seed": s, "raw trace": cp["trace"],
               "raw trace se": cp["trace_se"],
               "invariant trace": cp["invariant_trace"], "invariant trace se": cp["invariant_trace_se"],
               "widened trace": wide["trace"], "widened trace se": wide["trace_se"],
               "widened invariant trace": wide["invariant_trace"],
               "widened invariant trace se": wide["invariant_trace_se"]}
        for task, probe in cp["probes"].items():
            row[f"probe {task}"] = probe["accuracy"]
            row[f"finetune {task}"] = m.finetune[name, w, s]["accuracy"][task]
        row.update({f"l2 {task}": probe["l2"] for task, probe in cp["probes"].items() if "l2" in probe})
        rows.append(row)
    table = sizes.merge(pd.DataFrame(rows), on=["language", "width", "seed"])
    assert len(table) == len(m.checkpoint), "a measured model is missing from the table"
    return table, max_change


# ---------------------------------------------------------------------------- verdicts and claims
def verdict_table(measured: pd.DataFrame, sizes: pd.DataFrame, tasks: Mapping[str, Sequence[str]],
                  seed: int) -> pd.DataFrame:
    """Per language (in the order of ``tasks``) and quantity (probe and fine-tuning per task, then
    the four traces): the rule "equal-loss pair" of widths (from ``sizes``: converged widths and mean
    gaps); for a tested pair, the rule "unpaired effect" (Welch 95% interval of the wider width's mean
    minus the narrower's, predicted to rise for accuracies and fall for traces) and the Spearman
    correlation with the parameter count over every converged model (bootstrap CI, ``seed``).
    ``decides``: the probes and the widened invariant trace."""
    gaps, ok = mean_gaps(sizes), converged(sizes)
    rows = []
    for name, language_tasks in tasks.items():
        frame = measured[measured.language == name]
        widths = [int(w) for w in sorted(sizes.loc[sizes.language == name, "width"].unique())]
        pair = rules.equal_loss_pair({w: gaps[name, w] for w in widths}, {w: ok[name, w] for w in widths})
        quantities = ([f"probe {t}" for t in language_tasks] + [f"finetune {t}" for t in language_tasks]
                      + TRACE_QUANTITIES)
        for column in quantities:
            row = {"language": name, "quantity": column, "tested": pair is not None,
                   "decides": column == "widened invariant trace" or column.startswith("probe ")}
            if pair is not None:
                small, large = frame[frame.width == pair[0]], frame[frame.width == pair[1]]
                conv = frame[frame.width.isin([w for w in widths if ok[name, w]])]
                effect = rules.welch_interval(small[column], large[column])
                predicted = -1 if "trace" in column else +1
                rho = rank_correlation(conv["parameters"], conv[column], "spearman", seed=seed)
                row.update({"from width": pair[0], "to width": pair[1], "before": small[column].mean(),
                            "after": large[column].mean(), "delta": effect.estimate, "low": effect.low,
                            "high": effect.high, "mde": rules.minimum_detectable(effect),
                            "verdict": rules.interval_verdict(
                                effect, predicted, rules.equivalence_bound(column, small[column].mean())),
                            "spearman": rho.value, "spearman low": rho.low, "spearman high": rho.high,
                            "gap before": gaps[name, pair[0]], "gap after": gaps[name, pair[1]]})
            rows.append(row)
    return pd.DataFrame(rows)


def claims(verdict: pd.DataFrame, sizes: pd.DataFrame, tasks: Mapping[str, Sequence[str]],
                n_seeds: int) -> list[Claim]:
    """Two claims per language (in the order of ``tasks``) from ``verdict_table``: "larger models
    transfer better" (the probes' verdicts combined by the rule "parts") and "larger models are
    flatter" (the widened invariant trace's verdict, the raw traces' numbers beside it); both "not
    tested", with every width's mean gap, when the language has no equal-loss pair."""
    gaps, ok = mean_gaps(sizes), converged(sizes)
    out = []
    for name, language_tasks in tasks.items():
        v = verdict[verdict.language == name].set_index("quantity")
        probes = [f"probe {t}" for t in language_tasks]
        if not v["tested"].all():
            widths = [int(w) for w in sorted(sizes.loc[sizes.language == name, "width"].unique())]
            text = ", ".join(f"w{w} {gaps[name, w]:.4f}{'' if ok[name, w] else ' (>ε)'}" for w in widths)
            for claim, paper in [("larger models transfer better at the same loss", PAPER[name][0]),
                                 ("larger models are flatter (invariant trace after widening)",
                                  PAPER[name][1])]:
                out.append(Claim(claim=f"{name}: {claim}", paper=paper, held="not tested", notebook=NOTEBOOK,
                                 ours=f"no two converged widths at equal loss (mean gaps: {text})",
                                 figure="03_size_gap.png", rule="equal-loss pair"))
            continue
        first = v.iloc[0]
        widths_text = f"width {int(first['from width'])} -> {int(first['to width'])}"
        gap_text = f"gap {first['gap before']:.4f} -> {first['gap after']:.4f} nats; one lr for every width"
        effects = "; ".join(f"{q.split(' ', 1)[1]} {v.loc[q, 'delta']:+.3f} [{v.loc[q, 'low']:+.3f}, "
                            f"{v.loc[q, 'high']:+.3f}]{rules.mde_text(v.loc[q].get('mde', math.nan), 3)}"
                            for q in probes)
        out.append(Claim(
            claim=f"{name}: larger models transfer better at the same loss (linear probe)",
            paper=PAPER[name][0], ours=f"{widths_text}: {effects} (Welch 95% CI over {n_seeds} seeds)",
            held=rules.combine(v.loc[probes, "verdict"].tolist()), notebook=NOTEBOOK,
            figure="03_size_accuracy.png", detail=gap_text,
            rule="equal-loss pair, unpaired effect, parts, probe"))
        t, raw = v.loc["widened invariant trace"], v.loc["widened trace"]
        out.append(Claim(
            claim=(f"{name}: larger models are flatter (invariant trace after widening into the largest "
                   "architecture)"),
            paper=PAPER[name][1], held=t["verdict"], notebook=NOTEBOOK, figure="03_size_trace.png",
            ours=(f"{widths_text}: invariant {t['before']:.2f} -> {t['after']:.2f} ({t['delta']:+.2f} "
                  f"[{t['low']:+.2f}, {t['high']:+.2f}]{rules.mde_text(t.get('mde', math.nan), 2)}); raw "
                  f"{raw['before']:.1f} -> {raw['after']:.1f} ({raw['delta']:+.1f} [{raw['low']:+.1f}, "
                  f"{raw['high']:+.1f}]); Spearman with size {t['spearman']:+.2f} [{t['spearman low']:+.2f}, "
                  f"{t['spearman high']:+.2f}]"),
            detail=f"{gap_text}; the raw widened trace's own verdict: {raw['verdict']}",
            rule="equal-loss pair, unpaired effect, trace"))
    return out


# ---------------------------------------------------------------------------- the checked summary
def check_measurements(measured: pd.DataFrame, max_change: float,
                       lookup: Mapping[str, Mapping[str, Any]]) -> None:
    """What must hold whatever the outcome (AssertionError otherwise): widening preserved every
    model's function (logits within 1e-3), every gap, trace (and its SE) and accuracy is finite and
    positive, accuracies are at most 1, and each probe stays below the task's Bayes accuracy (where
    ``lookup`` has one) plus 3 SE of it, 3 times the probe's CI and 0.03."""
    assert max_change < 1e-3, f"widening changed a logit by {max_change}"
    assert np.isfinite(measured[["gap"] + TRACES].to_numpy()).all() and (measured["gap"] > 0).all()
    assert (measured[[f"{c} se" for c in TRACES]] > 0).all().all()
    accuracy_columns = [c for c in measured.columns if c.startswith(("probe ", "finetune "))]
    assert ((measured[accuracy_columns] > 0) & (measured[accuracy_columns] <= 1)).all().all()
    for name, references in lookup.items():
        for task, ref in references.items():
            if "bayes" in ref:
                tolerance = 3 * ref["bayes_se"] + 3 * ref["ci95"] + 0.03
                probes = measured.loc[measured.language == name, f"probe {task}"]
                assert (probes <= ref["bayes"] + tolerance).all(), (name, task)


def summary(params: dict[str, Any], d: Design, measured: pd.DataFrame, claims: Sequence[Claim]) -> str:
    """The notebook's checked summary: the setting, per (language, width) the rounded means over
    seeds of the gap, probes and traces, and every claim's verdict."""
    s = params["model_size"]
    lines = [f"{NOTEBOOK} · profile={params['profile']} · seeds={d.seeds} · widths={d.widths} "
             f"({s['n_layer']} layers) · {s['steps']} steps · ε={d.epsilon}"]
    for (name, w), g in measured.groupby(["language", "width"]):
        lines.append(f"{name:>4} w{w:<4}: gap {g['gap'].mean():.3f} "
                     f"({int(g['within ε'].sum())}/{len(g)} within ε) · "
                     + " · ".join(f"{task} {g[f'probe {task}'].mean():.2f}" for task in d.tasks[name])
                     + f" · trace raw {g['raw trace'].mean():.0f} widened {g['widened trace'].mean():.0f}"
                     + f" · invariant widened {g['widened invariant trace'].mean():.1f}")
    for c in claims:
        lines.append(f"claim: {c.claim} -> {c.held}")
    if params["profile"] == "smoke":
        lines.append("profile smoke: tiny models, a few dozen steps: these numbers mean nothing")
    lines.append("checks passed: widening exact · gaps, traces and accuracies finite · "
                 "probes <= Bayes + tolerance")
    return "\n".join(lines)
