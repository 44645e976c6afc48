"""The power calculation of docs/power.md, from the committed results (``figures/*.csv``) and before
any new run: where the variance of each paired effect is, how large an effect today's design and a
design of 8 lineages can detect, and how many lineages each claim needs::

    python -m flatlib.tools.power                      # figures/ and bench/results/costs_cpu.json
    python -m flatlib.tools.power --figures figures --costs bench/results/costs_cpu.json

Variance components of a paired effect (notebook 02's clock). Lineage ``l`` (a phase-1 checkpoint)
has a control ``c_l`` (the anneal alone, one run) and ``K`` noise seeds of the dose, ``y_lk``; its
effect is ``e_l = mean_k y_lk - c_l``. With ``y_lk = mu_l + w_lk``, ``Var w = sigma_W^2`` (the noise
seeds: SGD noise, anneal batches, the estimator),

    Var e_l = sigma_B^2 + sigma_W^2 / K,

where ``sigma_B^2`` is what more noise seeds cannot remove: lineages differ in how much the dose
moves them, and the one control run's own noise. Estimated by ``sigma_W^2`` = the pooled variance of
the doses within lineages (``n (K - 1)`` df) and ``sigma_B^2 = max(0, s_e^2 - sigma_W^2 / K)`` with
``s_e^2`` the sample variance of the ``n`` lineage effects (``n - 1`` df: with 3 lineages a 95%
interval for an SD is 0.52x to 6.3x the estimate, so every number below is a planning figure). The
SD of a lineage's effect with ``k`` noise seeds is ``sqrt(sigma_B^2 + sigma_W^2 / k)``.

For a pair measured once a side (notebook 04's adversary and AdamW, 02's AdamW and the phase-1 end)
nothing can be split off: there is one run a side, and the measurement noise is not independent
between the sides (the probe's splits and the trace estimator's random vectors are seeded by the
protocol, the same for both models). The committed numbers show it: 02's AdamW invariant-trace
effects have an SD of 0.045, far below the 0.24 that two independent estimator errors of SE 0.17
would give alone, so subtracting the SEs would be wrong.

Powers and lineages needed are ``flatlib.stats``' (noncentral t, exact for normal lineage effects);
the equivalence bounds are ``flatlib.claims.SMALLEST_EFFECT``'s; the costs of a design are
``flatlib.runner.census.predict``'s from measured unit costs.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from flatlib.claims import SMALLEST_EFFECT, equivalence_bound
from flatlib.stats import paired_mde, paired_n, unpaired_mde, unpaired_n

ROOT = Path(__file__).resolve().parents[2]
PLANNED_LINEAGES = 8  # the design docs/power.md recommends for every paired claim of 02 and 04
PLANNED_NOISE_SEEDS = 2  # noise seeds a lineage in 02's clock, cut from 6 by the variance components
PLANNED_WIDTH_SEEDS = 6  # notebook 03's runs a width, at least


@dataclass(frozen=True)
class Components:
    """The variance components of a paired effect over ``lineages``: its mean ``effect``, the SD of a
    lineage's effect as measured (``effect_sd``, with ``noise_seeds`` runs averaged on the dosed side),
    the variance of one run around its lineage (``within``; NaN where it cannot be split off) and what
    more runs a lineage cannot remove (``between``); ``reference`` is the quantity's mean level before."""

    effect: float
    effect_sd: float
    lineages: int
    noise_seeds: int
    within: float
    between: float
    reference: float

    def lineage_sd(self, noise_seeds: float) -> float:
        """The SD of a lineage's effect with ``noise_seeds`` runs averaged a lineage (inf: the limit);
        the measured SD where the components are not known."""
        if math.isnan(self.within):
            return self.effect_sd
        return math.sqrt(self.between + self.within / noise_seeds)

    @property
    def between_share(self) -> float:
        """The share of the measured design's lineage-effect variance that more noise seeds cannot remove."""
        total = self.between + self.within / self.noise_seeds
        return self.between / total if total > 0 else math.nan


def clock_components(frame: pd.DataFrame, language: str, column: str, tau: float) -> Components:
    """``Components`` of notebook 02's clock effect of ``column`` at dose ``tau`` for ``language``
    (``frame``: language, lineage, noise, tau and the column; ``tau = 0`` rows are the controls)."""
    rows = frame[frame.language == language]
    if rows.empty:
        raise ValueError(f"language: no rows for {language!r} (have {sorted(frame.language.unique())})")
    doses, controls = rows[rows.tau == tau], rows[rows.tau == 0].groupby("lineage")[column].mean()
    if doses.empty:
        raise ValueError(f"tau: no dose {tau} for {language!r} (have {sorted(rows.tau.unique())})")
    by_lineage = doses.groupby("lineage")[column]
    seeds = by_lineage.size()
    if seeds.nunique() != 1 or seeds.iloc[0] < 2:
        raise ValueError(f"frame: expected the same number (>= 2) of noise seeds in every lineage of "
                         f"{language!r}, "
                         f"got {seeds.to_dict()}")
    effects = by_lineage.mean() - controls.reindex(seeds.index)
    k, variance = int(seeds.iloc[0]), float(effects.var(ddof=1))
    within = float(by_lineage.var(ddof=1).mean())  # equal sizes: the pooled variance is the mean
    return Components(float(effects.mean()), math.sqrt(variance), len(effects), k, within,
                      max(0.0, variance - within / k), float(controls.mean()))


def pair_components(before: pd.Series, after: pd.Series) -> Components:
    """``Components`` of a pair measured once a side per lineage (``before[i]``, ``after[i]`` of
    lineage i): the lineage effects' mean and SD; ``within`` and ``between`` NaN (one run a side, and
    the two sides' measurement noise is shared: see the module docstring)."""
    if len(before) != len(after) or len(before) < 2:
        raise ValueError(f"after: expected as many lineages (>= 2) as before, got {len(after)} and "
                         f"{len(before)}")
    effects = np.asarray(after, dtype=float) - np.asarray(before, dtype=float)
    return Components(float(effects.mean()), float(effects.std(ddof=1)), len(effects), 1, math.nan, math.nan,
                      float(np.mean(before)))


# ---------------------------------------------------------------------------- the claims' data
# (notebook and comparison, language, the column in the CSV, the quantity's name for the bound)
CLOCK_QUANTITIES = {"hmm": ["acc state@3", "acc state@6", "invariant_trace"],
                    "pcfg": ["acc A", "acc B", "acc C", "invariant_trace"]}


def _models_column(quantity: str) -> str:
    return "invariant trace" if quantity == "invariant_trace" else quantity


def paired_components(figures: Path) -> list[tuple[str, str, str, int, Components]]:
    """Every paired claim's quantities with their ``Components``: (comparison, language, quantity,
    lineages of today's claim, components). 02's clock from ``02_measurements.csv`` at its largest
    dose; 02's AdamW and 04's adversary from ``05_models.csv`` (their 3 lineages and notebook 05's 2
    more: the same runs, more lineages for the SD)."""
    clock = pd.read_csv(figures / "02_measurements.csv")
    clock = clock[clock.continuation == "sgd clock"]
    models = pd.read_csv(figures / "05_models.csv")
    out = []
    for language, quantities in CLOCK_QUANTITIES.items():
        tau = float(clock.loc[clock.language == language, "tau"].max())
        for q in quantities:
            c = clock_components(clock, language, q, tau)
            out.append((f"02 clock τ = {tau:g} - control", language, q, c.lineages, c))
    for comparison, before, after, today in (("02 AdamW - phase 1", "02 phase 1", "02 adamw", 3),
                                             ("04 adversary - AdamW", "02 adamw", "04 adversarial", 3)):
        for language, quantities in CLOCK_QUANTITIES.items():
            frame = models[models.language == language]
            a = frame[frame.origin == before].set_index("lineage")
            b = frame[frame.origin == after].set_index("lineage").loc[a.index]
            for q in quantities:
                column = _models_column(q)
                out.append((comparison, language, q, today, pair_components(a[column], b[column])))
    return out


def _n_text(n: int | None, n_max: int) -> str:
    return f"> {n_max}" if n is None else str(n)


def paired_table(figures: Path, lineages: int = PLANNED_LINEAGES, noise_seeds: int = PLANNED_NOISE_SEEDS,
                 n_max: int = 1000) -> pd.DataFrame:
    """One row per paired claim's quantity: the variance components, the SD of a lineage's effect
    today and in the planned design (``noise_seeds`` a lineage in 02's clock), the MDE at today's n
    and at ``lineages``, and the lineages needed for 80% power at the declared bound and at today's
    point estimate (planned design's SD)."""
    rows = []
    for comparison, language, q, today, c in paired_components(figures):
        bound = equivalence_bound(q, c.reference)
        planned_sd = c.lineage_sd(noise_seeds) if c.noise_seeds > 1 else c.effect_sd
        rows.append({
            "comparison": comparison, "language": language, "quantity": q, "lineages (SD from)": c.lineages,
            "effect": c.effect, "bound": bound, "SD a lineage": c.effect_sd,
            "between share": c.between_share, "SD, planned": planned_sd,
            "MDE today": paired_mde(c.effect_sd, today),
            f"MDE n={lineages}": paired_mde(planned_sd, lineages),
            "n at bound": _n_text(paired_n(bound, planned_sd, n_max=n_max), n_max),
            "n at estimate": _n_text(paired_n(c.effect, planned_sd, n_max=n_max) if c.effect else None,
                                     n_max),
            "today n": today})
    return pd.DataFrame(rows)


def width_table(figures: Path, seeds: int = PLANNED_WIDTH_SEEDS, n_max: int = 1000) -> pd.DataFrame:
    """Notebook 03's unpaired effects (the equal-loss pair of widths of ``03_verdict.csv``, Welch): per
    deciding quantity, each width's SD over seeds, the MDE today and at ``seeds`` a width, and the
    seeds a width needed for 80% power at the bound and at today's estimate."""
    verdict = pd.read_csv(figures / "03_verdict.csv")
    runs = pd.read_csv(figures / "03_model_size.csv")
    rows = []
    for _, v in verdict[verdict.decides & verdict.tested].iterrows():
        frame = runs[runs.language == v["language"]]
        a = frame.loc[frame.width == v["from width"], v["quantity"]]
        b = frame.loc[frame.width == v["to width"], v["quantity"]]
        sd_a, sd_b = float(a.std(ddof=1)), float(b.std(ddof=1))
        bound = equivalence_bound(v["quantity"], float(a.mean()))
        effect = float(b.mean() - a.mean())
        rows.append({"language": v["language"], "quantity": v["quantity"],
                     "widths": f"{int(v['from width'])} -> {int(v['to width'])}",
                     "seeds": f"{len(a)} + {len(b)}",
                     "effect": effect, "bound": bound, "SD narrow": sd_a, "SD wide": sd_b,
                     "MDE today": unpaired_mde(sd_a, sd_b, len(a), len(b)),
                     f"MDE {seeds} a width": unpaired_mde(sd_a, sd_b, seeds, seeds),
                     "n at bound": _n_text(unpaired_n(bound, sd_a, sd_b, n_max=n_max), n_max),
                     "n at estimate": _n_text(unpaired_n(effect, sd_a, sd_b, n_max=n_max), n_max)})
    return pd.DataFrame(rows)


def correlation_table(figures: Path, lineages: int = PLANNED_LINEAGES) -> pd.DataFrame:
    """Notebook 05's deciding intervals (partial ρ of accuracy with the invariant trace given the gap,
    and ρ with the gap) with their width today and the width projected to ``lineages`` by the usual
    1/sqrt(lineages) scaling of a bootstrap interval over lineages (an approximation: with 5 lineages
    the bootstrap interval itself is rough)."""
    c = pd.read_csv(figures / "05_correlations.csv")
    rows = []
    for _, r in c.iterrows():
        for label, key in (("partial ρ(trace | gap)", "spearman acc~invariant trace|gap"),
                           ("ρ(gap)", "spearman acc~gap")):
            width = r[f"{key} high"] - r[f"{key} low"]
            rows.append({"language": r["language"], "family": r["family"], "task": r["task"],
                         "interval": label,
                         "lineages": int(r["lineages"]), "value": r[key], "low": r[f"{key} low"],
                         "high": r[f"{key} high"], "width": width,
                         f"width at {lineages}": width * math.sqrt(r["lineages"] / lineages)
                         if r["lineages"] < lineages else width})
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------- what a design costs
DESIGNS = {  # name: (lineages of 02-04, lineages of 05, noise seeds a lineage, control runs a lineage)
    "today": (3, 5, 6, 1),
    "8 lineages, 6 noise seeds, 1 control": (8, 8, 6, 1),
    "8 lineages, 2 noise seeds, 1 control": (8, 8, 2, 1),
    "8 lineages, 2 noise seeds, 2 controls (planned)": (8, 8, 2, 2),
}


def design_costs(costs_path: Path, profile: str = "cpu") -> pd.DataFrame:
    """Training runs, measurements and compute minutes of each of ``DESIGNS`` at ``profile``, from the
    unit costs in ``costs_path`` (``flatlib.runner.census.predict``; notebook 03's seeds are
    ``pretraining.seeds`` like 02's and 04's). The census has no replicated control: each extra
    control is one more anneal (and its measurement) a lineage and language, costed as the mean
    anneal of 02's clock (every language has the same number of anneals, so the mean is exact)."""
    from flatlib.profiles import resolve  # noqa: PLC0415
    from flatlib.runner.census import predict  # noqa: PLC0415 - builds models to count parameters: only here

    costs = json.loads(costs_path.read_text())
    rows = []
    for name, (lineages, correlation, noise, controls) in DESIGNS.items():
        params = resolve(profile, pretraining={"seeds": lineages, "correlation_seeds": correlation},
                         clock={"noise_seeds": noise})
        table = predict(params, costs).set_index("origin")
        runs, measurements, seconds = (float(table[c].sum()) for c in ("runs", "measurements", "total s"))
        anneals = table.loc["02 sgd clock"]
        extra = (controls - 1) * lineages * len(params["pretraining"]["languages"])
        runs, measurements = runs + extra, measurements + extra
        seconds += extra * anneals["total s"] / anneals["runs"]
        workers = params["pretraining"]["workers"]
        rows.append({"design": name, "lineages (05)": f"{lineages} ({correlation})", "noise seeds": noise,
                     "controls": controls, "training runs": int(runs), "measurements": int(measurements),
                     "compute min": seconds / 60, "clock share": (anneals["total s"] + table.loc[
                         "02 sgd clock trajectory", "total s"]) / seconds if controls == 1 else math.nan,
                     "wall min (2 workers, +20%)": seconds / 60 / workers / 0.8})
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------- the report
def _markdown(frame: pd.DataFrame, digits: int = 4) -> str:
    def cell(value: Any) -> str:
        if isinstance(value, float):
            return "" if math.isnan(value) else f"{value:.{digits}g}"
        return str(value)

    lines = ["| " + " | ".join(frame.columns) + " |", "|" + "---|" * len(frame.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines)


def report(figures: Path, costs_path: Path | None) -> str:
    """The generated part of docs/power.md, as markdown."""
    parts = [f"Bounds (flatlib.claims.SMALLEST_EFFECT): {SMALLEST_EFFECT}.",
             "\n### Paired claims (02, 04)\n", _markdown(paired_table(figures)),
             "\n### Unpaired claims (03: widths)\n", _markdown(width_table(figures)),
             "\n### Correlations (05)\n", _markdown(correlation_table(figures), digits=3)]
    if costs_path is not None:
        parts += [f"\n### What each design costs (cpu profile, unit costs of {costs_path.name})\n",
                  _markdown(design_costs(costs_path))]
    return "\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--figures", type=Path, default=ROOT / "figures",
                        help="the committed results (CSV files)")
    parser.add_argument("--costs", type=Path, default=ROOT / "bench" / "results" / "costs_cpu.json",
                        help="unit costs of bench.costs (a missing file: no cost table)")
    args = parser.parse_args(argv)
    for name in ("02_measurements.csv", "05_models.csv", "03_verdict.csv", "03_model_size.csv",
                 "05_correlations.csv"):
        if not (args.figures / name).exists():
            parser.error(f"--figures: {args.figures / name} is missing (run make figures, or point at a "
                         "folder of them)")
    print(report(args.figures, args.costs if args.costs.exists() else None), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
