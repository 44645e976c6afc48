"""What a profile's story costs before it runs: ``python -m flatlib.census --profile gpu``.

Counts every distinct training run notebooks 02-05 ask for (``flatlib.experiments``: phase 1, the
constant-rate continuations, the clock's SGD trajectories and anneals, the held-out runs that choose
the adversary's weight, the adversary, every width of notebook 03), with its optimizer steps, the
sentences those steps see and the training FLOPs (about 6 x parameters x tokens), and every cached
measurement (``flatlib.measure``) by kind. Nothing is trained or built beyond one model per
architecture, to count its parameters.

A profile is sized with it (docs/lessons.md, "Sizing a profile"): the cpu profile's measured wall time
per step and per measurement, times these counts, predicts where the time goes, and the same counts
for another profile, with that machine's per-step cost, say whether it fits a budget.
"""

from __future__ import annotations

import argparse
import sys
from functools import lru_cache
from typing import Any

import pandas as pd

from flatlib.experiments import experiment_models, held_out_configs
from flatlib.languages import build_language
from flatlib.profiles import PROFILES, resolve
from flatlib.runs import canonical_json
from flatlib.train import PretrainConfig, new_model


@lru_cache(maxsize=None)
def _parameters(spec: str, model: str) -> int:
    import json  # noqa: PLC0415 - only here: the cache keys are JSON texts

    config = PretrainConfig(language=json.loads(spec), model=json.loads(model), steps=1)
    return new_model(config, build_language(config.language)).n_params()


def _with_parents(configs: dict[str, tuple[str, PretrainConfig]]) -> dict[str, tuple[str, PretrainConfig]]:
    """``configs`` plus every run they continue from (``init_from``), recursively; a parent that is
    not a notebook model itself (the clock's SGD trajectories) is labelled by its child's origin."""
    out = dict(configs)
    todo = list(configs.values())
    while todo:
        origin, config = todo.pop()
        parent = config.parent()
        if parent is None:
            continue
        if parent.key not in out:
            label = "02 sgd clock trajectory" if origin == "02 sgd clock" else origin
            out[parent.key] = (label, parent)
            todo.append(out[parent.key])
    return out


def census(params: dict[str, Any]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Two tables for the resolved profile ``params``: the training runs per origin (runs, steps,
    sentences seen, training FLOPs) and the measurements per kind (checkpoint, widened trace,
    fine-tuning). The adversary's weight is not known before its held-out runs: the census counts
    the evaluated adversary once at the grid's first weight (the cost does not depend on it)."""
    a = params["algorithms"]
    if "weights" not in a:
        params = {**params, "algorithms": {**a, "weights": {n: g[0] for n, g in a["weight_grid"].items()}}}
    models = experiment_models(params)
    runs = {m.config.key: (m.origin, m.config) for m in models}
    for name in a["languages"]:
        runs.update({c.key: ("04 adversary weight (held-out seed)", c) for c in held_out_configs(params, name).values()})
    runs = _with_parents(runs)
    rows = []
    for origin, config in runs.values():
        spec = canonical_json(config.language)
        n = _parameters(spec, canonical_json(config.model))
        tokens = config.steps * config.batch_size * build_language(config.language).max_len
        rows.append({"origin": origin, "runs": 1, "steps": config.steps,
                     "sentences": config.steps * config.batch_size, "TFLOP": 6 * n * tokens / 1e12})
    training = pd.DataFrame(rows).groupby("origin", sort=False).sum().reset_index()
    checkpoints = {(m.config.key, m.step) for m in models}
    widened = {(m.config.key, m.step) for m in models if m.widen_to is not None}
    finetuned = {(m.config.key, m.step) for m in models if m.origin == "03 sizes"}
    measurements = pd.DataFrame([{"kind": "checkpoint (gap, probes, both traces)", "measurements": len(checkpoints)},
                                 {"kind": "widened trace (03, 05)", "measurements": len(widened)},
                                 {"kind": "fine-tuning (03)", "measurements": len(finetuned)}])
    return training, measurements


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="cpu", choices=sorted(PROFILES))
    args = parser.parse_args(argv)
    training, measurements = census(resolve(args.profile))
    total = training.drop(columns="origin").sum()
    print(f"profile {args.profile}: {int(total['runs'])} training runs, {int(total['steps']):,} steps, "
          f"{total['TFLOP']:.1f} TFLOP; {int(measurements['measurements'].sum())} measurements\n")
    print(training.to_string(index=False, float_format=lambda v: f"{v:.2f}"))
    print()
    print(measurements.to_string(index=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
