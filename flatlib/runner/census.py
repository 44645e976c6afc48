"""What a profile's story costs before it runs: ``python -m flatlib.runner.census --profile gpu``.

Counts every distinct training run notebooks 02-05 ask for (``flatlib.runner.experiments``: phase 1, the
constant-rate continuations, the clock's SGD trajectories and anneals, the held-out runs that choose
the adversary's weight, the adversary, every width of notebook 03), with its optimizer steps, the
sentences those steps see and the training FLOPs (about 6 x parameters x tokens), and every cached
measurement (``flatlib.measurement.measure``) by kind. Nothing is trained or built beyond one model per
architecture, to count its parameters.

A profile is sized with it (docs/lessons.md, "Sizing a profile"). With ``--costs FILE`` (unit costs
measured on a machine by ``python -m bench.costs --profile P``: seconds per optimizer step of each
kind of step, per evaluation, per measurement) it also predicts the compute time of every origin and
of the whole story, and a lower bound on the wall time, compute / the profile's workers (the
notebooks' serial work and idle tails come on top: about 20% at cpu, docs/lessons.md):

    python -m flatlib.runner.census --profile cpu --costs bench/results/costs_cpu.json

With ``--peak FILE`` (``bench.train``'s JSON, whose ``matmul_peak_flops`` is the machine's float32
matmul rate on 1, 2, ... threads) it prints the training's floor on that machine: the weight matmuls
of every optimizer step as the model computes it (``step_flops``, counted, not estimated), divided by
the best measured matmul rate. Whatever else a step does (attention's own products, element-wise work,
the optimizer, data) only adds to it. Only a different computation of the same function does less
work: ``bench.train``'s live last block, which skips the last block's positions that no loss reads.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from functools import lru_cache
from pathlib import Path
from typing import Any, NamedTuple

import pandas as pd
import torch
from torch.utils.flop_counter import FlopCounterMode

from flatlib.analysis.algorithms import protocol as protocol_of
from flatlib.languages import build_language
from flatlib.measurement.measure import Protocol, is_cached
from flatlib.profiles import PROFILES, resolve
from flatlib.runner.experiments import experiment_models, held_out_configs
from flatlib.runner.runs import RunStore, canonical_json
from flatlib.training.objective import mask_generator, mlm_loss, training_corpus
from flatlib.training.train import PretrainConfig, new_model


@lru_cache(maxsize=None)
def _parameters(spec: str, model: str) -> int:
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


def step_class(config: PretrainConfig) -> str:
    """What one optimizer step of ``config`` costs depends on: language kind, model shape, batch size,
    optimizer, the adversary (e.g. ``"hmm 2x64/256 B16 sgd"``)."""
    m = config.model
    adversary = " adversarial" if config.adversarial is not None else ""
    return (f"{config.language['kind']} {m['n_layer']}x{m['d_model']}/{m['d_ff']} B{config.batch_size} "
            f"{config.optimizer}{adversary}")


def eval_class(config: PretrainConfig) -> str:
    """What one evaluation of the gap costs depends on: language kind, model shape, evaluation pairs."""
    m = config.model
    return f"{config.language['kind']} {m['n_layer']}x{m['d_model']}/{m['d_ff']} pairs{config.eval_pairs}"


def measure_class(kind: str, config: PretrainConfig, width: int | None = None) -> str:
    """What one cached measurement costs depends on: its kind, the language kind, the model shape (and
    for a widened trace, the width it is widened to)."""
    m = config.model
    wide = f" to {width}" if width is not None else ""
    return f"{kind} {config.language['kind']} {m['n_layer']}x{m['d_model']}/{m['d_ff']}{wide}"


def evaluations(config: PretrainConfig) -> int:
    """How many times ``pretrain`` evaluates the gap in a run: at step 0, at every multiple of
    ``eval_every`` and at the end (once, if the end is such a multiple)."""
    return config.steps // config.eval_every + 1 + (config.steps % config.eval_every != 0)


def step_flops(config: PretrainConfig) -> int:
    """The matmul FLOPs of one optimizer step of ``config``, counted by ``torch.utils.flop_counter``
    on the forward and backward pass of its MLM loss at step 0.

    For the weight matrices W (in x out) of every ``nn.Linear`` applied to ``rows`` vectors this is
    ``sum 6 rows in out``: 2 for the forward product, 2 each for the gradients of the input and of W.
    The blocks' linears see every position (``rows = batch x max_len``: batches are padded to the
    language's longest sentence, so the count is the same at every step); the head only the masked
    ones. Not counted: attention's ``q k^T`` and ``softmax v`` (CPU attention kernels are not in the
    counter's table), element-wise work, the optimizer's update and an adversary's extra term, so it is
    a lower bound on what the step computes."""
    language = build_language(config.language)
    with torch.random.fork_rng(devices=[]):  # the model's initialisation must not move anyone's stream
        model = new_model(config, language).train()
    corpus = training_corpus(config, language, 0, None)
    with FlopCounterMode(display=False) as counter:
        mlm_loss(config, model, model.config, corpus, mask_generator(config, 0),
                 torch.device("cpu")).backward()
    return int(counter.get_total_flops())


def training_floor(params: dict[str, Any], peak_flops: float) -> pd.DataFrame:
    """Per origin: the training's counted matmul FLOPs (``step_flops`` x steps, as ``matmul TFLOP``) and
    ``floor s``, the seconds they take at ``peak_flops`` (FLOP/s; the machine's best matmul rate on all
    its cores): no implementation of these steps, as the model computes them, finishes the training
    faster on that machine."""
    if not peak_flops > 0:
        raise ValueError(f"peak_flops must be > 0 FLOP/s, got {peak_flops!r}")
    runs, _ = plan(params)
    per_class: dict[str, int] = {}
    rows = []
    for origin, config in runs.values():
        kind = step_class(config)
        if kind not in per_class:
            per_class[kind] = step_flops(config)
        rows.append({"origin": origin, "matmul TFLOP": config.steps * per_class[kind] / 1e12})
    out = pd.DataFrame(rows).groupby("origin", sort=False).sum()
    out["floor s"] = out["matmul TFLOP"] * 1e12 / peak_flops
    return out.reset_index()


class Measurement(NamedTuple):
    """One distinct cached measurement of the story: ``kind`` ("checkpoint", "widened_trace",
    "finetune") of the run ``config`` at ``step``; ``width``: a widened trace's width."""

    origin: str
    kind: str
    config: PretrainConfig
    width: int | None
    step: int


def plan(params: dict[str, Any]) -> tuple[dict[str, tuple[str, PretrainConfig]], list[Measurement]]:
    """Everything the story computes from an empty run store: ``{run key: (origin, config)}`` for
    every training run (parents included) and every distinct cached measurement."""
    a = params["algorithms"]
    if "weights" not in a:
        params = {**params, "algorithms": {**a, "weights": {n: g[0] for n, g in a["weight_grid"].items()}}}
    models = experiment_models(params)
    runs = {m.config.key: (m.origin, m.config) for m in models}
    for name in a["languages"]:
        runs.update({c.key: ("04 adversary weight (held-out seed)", c)
                     for c in held_out_configs(params, name).values()})
    measured: dict[tuple, Measurement] = {}
    for m in models:
        measured.setdefault(("checkpoint", m.config.key, m.step),
                            Measurement(m.origin, "checkpoint", m.config, None, m.step))
        if m.widen_to is not None:
            measured.setdefault(("widened_trace", m.config.key, m.step),
                                Measurement(m.origin, "widened_trace", m.config, m.widen_to, m.step))
        if m.origin == "03 sizes":
            measured.setdefault(("finetune", m.config.key, m.step),
                                Measurement(m.origin, "finetune", m.config, None, m.step))
    return _with_parents(runs), list(measured.values())


def _alternatives(params: dict[str, Any], origin: str, config: PretrainConfig) -> list[PretrainConfig]:
    """The configs any of which stands for the planned ``config``: itself, or for the evaluated
    adversary (planned at its grid's first weight, the weight being chosen later) the same run at
    every weight of the grid."""
    if origin != "04 adversarial" or config.adversarial is None:
        return [config]
    grid = params["algorithms"]["weight_grid"][config.language["kind"]]
    return [replace(config, adversarial={**config.adversarial, "weight": w}) for w in grid]


def _measured(store: RunStore, m: Measurement, configs: list[PretrainConfig], protocol: Protocol,
              params: dict[str, Any]) -> bool:
    kwargs = ({"width": m.width} if m.kind == "widened_trace" else
              {"epochs": params["model_size"]["finetune_epochs"]} if m.kind == "finetune" else {})
    return any((run := store.find(c.to_dict())) is not None
               and is_cached(m.kind, run, m.step, protocol, **kwargs) for c in configs)


def predict(params: dict[str, Any], costs: dict[str, Any], store: RunStore | None = None) -> pd.DataFrame:
    """Runs, measurements and compute seconds per origin from measured unit ``costs`` (``bench.costs``' JSON:
    ``step_s``, ``eval_s``, ``measure_s`` keyed by ``step_class`` / ``eval_class`` / ``measure_class``): a run
    costs ``steps x step_s + evaluations x eval_s``, a measurement its ``measure_s``. ValueError
    naming the classes the file does not cover (measure them with ``bench.costs`` on the profile).

    With ``store``: only what is left to compute there, leaving out finished runs and cached
    measurements (a run started but not finished counts whole: an upper bound for it)."""
    runs, measured = plan(params)
    if store is not None:
        protocol = protocol_of(params)
        runs = {k: (o, c) for k, (o, c) in runs.items()
                if not any(store.is_finished(a.to_dict()) for a in _alternatives(params, o, c))}
        measured = [m for m in measured
                    if not _measured(store, m, _alternatives(params, m.origin, m.config), protocol, params)]
    rows, missing = [], set()
    for origin, config in runs.values():
        step, evaluation = step_class(config), eval_class(config)
        evals = evaluations(config)
        missing |= {c for c, table in ((step, "step_s"), (evaluation, "eval_s")) if c not in costs[table]}
        if step in costs["step_s"] and evaluation in costs["eval_s"]:
            rows.append({"origin": origin, "runs": 1, "measurements": 0,
                         "training s": config.steps * costs["step_s"][step]
                         + evals * costs["eval_s"][evaluation], "measuring s": 0.0})
    for m in measured:
        c = measure_class(m.kind, m.config, m.width)
        if c not in costs["measure_s"]:
            missing.add(c)
            continue
        rows.append({"origin": m.origin, "runs": 0, "measurements": 1, "training s": 0.0,
                     "measuring s": costs["measure_s"][c]})
    if missing:
        raise ValueError(f"costs: no measured cost for {sorted(missing)} (run python -m bench.costs on this "
                         "profile)")
    if not rows:
        return pd.DataFrame(columns=["origin", "runs", "measurements", "training s", "measuring s",
                                     "total s"])
    out = pd.DataFrame(rows).groupby("origin", sort=False).sum()
    out["total s"] = out["training s"] + out["measuring s"]
    return out.reset_index()


COSTS_DIR = Path(__file__).resolve().parents[2] / "bench" / "results"
# of make figures' wall time at cpu, beyond the cost model: docs/lessons.md, "Sizing a profile"
SERIAL_SHARE = 0.2


def forecast(profile: str, store: RunStore | None = None, costs_path: Path | None = None) -> str | None:
    """One line saying what is left to compute of ``profile``'s whole story in ``store`` (default:
    the default run store) and how long it should take, from the unit costs in ``costs_path``
    (default ``bench/results/costs_<profile>.json``); None if no costs were measured for the profile.
    Printed by ``flatlib.tools.reproduce`` before the notebooks start."""
    path = costs_path or COSTS_DIR / f"costs_{profile}.json"
    if not path.exists():
        return None
    store = RunStore() if store is None else store
    costs = json.loads(path.read_text())
    params = resolve(profile)
    try:
        left = predict(params, costs, store)
    except ValueError as error:
        return f"[{profile}] no time estimate: {error}"
    runs, measurements = int(left["runs"].sum()), int(left["measurements"].sum())
    if runs + measurements == 0:
        return (f"[{profile}] the run store ({store.root}) holds every run and measurement of the story: the "
                "notebooks only read them and draw (a few minutes)")
    workers = params["pretraining"]["workers"]
    minutes = left["total s"].sum() / 60
    wall = minutes / workers / (1 - SERIAL_SHARE)
    return (f"[{profile}] left to compute in the run store ({store.root}): {runs} training runs and "
            f"{measurements} measurements, {minutes:.0f} compute minutes by the unit costs of {path.name} "
            f"(measured on {costs.get('machine', '?')}): about {wall:.0f} min on {workers} workers with the "
            f"notebooks' own work (at least {minutes / workers:.0f}; another machine: python -m bench.costs "
            f"--profile {profile})")


def census(params: dict[str, Any]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Two tables for the resolved profile ``params``: the training runs per origin (runs, steps,
    sentences seen, training FLOPs) and the measurements per kind (checkpoint, widened trace,
    fine-tuning). The adversary's weight is not known before its held-out runs: the census counts
    the evaluated adversary once at the grid's first weight (the cost does not depend on it)."""
    runs, measured = plan(params)
    rows = []
    for origin, config in runs.values():
        spec = canonical_json(config.language)
        n = _parameters(spec, canonical_json(config.model))
        tokens = config.steps * config.batch_size * build_language(config.language).max_len
        rows.append({"origin": origin, "runs": 1, "steps": config.steps,
                     "sentences": config.steps * config.batch_size, "TFLOP": 6 * n * tokens / 1e12})
    training = pd.DataFrame(rows).groupby("origin", sort=False).sum().reset_index()
    count = {kind: sum(m.kind == kind for m in measured)
             for kind in ("checkpoint", "widened_trace", "finetune")}
    measurements = pd.DataFrame([{"kind": "checkpoint (gap, probes, both traces)",
                                  "measurements": count["checkpoint"]},
                                 {"kind": "widened trace (03, 05)", "measurements": count["widened_trace"]},
                                 {"kind": "fine-tuning (03)", "measurements": count["finetune"]}])
    return training, measurements


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="cpu", choices=sorted(PROFILES))
    parser.add_argument("--costs", type=Path, default=None,
                        help="unit costs measured by python -m bench.costs: also predict the time per origin")
    parser.add_argument("--peak", type=Path, default=None,
                        help="python -m bench.train's JSON (matmul_peak_flops): also print the training's "
                             "floor on that machine")
    args = parser.parse_args(argv)
    params = resolve(args.profile)
    training, measurements = census(params)
    total = training.drop(columns="origin").sum()
    print(f"profile {args.profile}: {int(total['runs'])} training runs, {int(total['steps']):,} steps, "
          f"{total['TFLOP']:.1f} TFLOP; {int(measurements['measurements'].sum())} measurements\n")
    print(training.to_string(index=False, float_format=lambda v: f"{v:.2f}"))
    print()
    print(measurements.to_string(index=False))
    if args.costs is not None:
        costs = json.loads(args.costs.read_text())
        times = predict(params, costs)
        workers = params["pretraining"]["workers"]
        total = times[["training s", "measuring s", "total s"]].sum()
        print(f"\npredicted from {args.costs} (measured {costs.get('date', '?')} on "
              f"{costs.get('machine', '?')}), compute minutes:")
        shown = times.assign(**{c.replace(" s", " min"): times[c] / 60
                                for c in ("training s", "measuring s", "total s")})
        print(shown.drop(columns=["training s", "measuring s", "total s"])
              .to_string(index=False, float_format=lambda v: f"{v:.1f}"))
        print(f"total: {total['total s'] / 60:.1f} compute minutes (training {total['training s'] / 60:.1f}, "
              f"measuring {total['measuring s'] / 60:.1f}); on {workers} workers about "
              f"{total['total s'] / 60 / workers:.0f} minutes of wall time, plus the notebooks' own serial "
              "work")
    if args.peak is not None:
        bench = json.loads(args.peak.read_text())
        threads, peak = max(((int(t), float(p)) for t, p in bench["matmul_peak_flops"].items()),
                            key=lambda tp: tp[1])
        floor = training_floor(params, peak)
        cpu = bench.get("machine", {}).get("cpu", "?") if isinstance(bench.get("machine"), dict) else "?"
        print("\nthe floor: the training's weight matmuls at the best float32 matmul rate measured by "
              f"{args.peak} ({peak / 1e9:.1f} GFLOP/s on {threads} thread{'s' * (threads > 1)}, {cpu}, "
              f"{bench.get('date', '?')}):")
        print(floor.assign(**{"floor min": floor["floor s"] / 60}).drop(columns="floor s")
              .to_string(index=False, float_format=lambda v: f"{v:.2f}"))
        print(f"total: {floor['matmul TFLOP'].sum():.1f} TFLOP of weight matmuls, "
              f"{floor['floor s'].sum() / 60:.1f} minutes of wall time at the peak on every core: these "
              "steps, as the model computes them, cannot train faster on this machine")
    return 0


if __name__ == "__main__":
    sys.exit(main())
