"""Probe protocol 1 (capped L-BFGS, L2 chosen per split) against protocol 2 (exact Newton, one L2 chosen on
the pooled validation splits): time per fit, how far the capped solver stops from the optimum, and the
accuracies they report.

Features: the ``cpu`` profile's HMM (6 states, length 10) and its 2x64 model (4 heads, d_ff 256), trained
for ``--steps`` AdamW steps (lr 3e-3, batch 256) in a temporary run store, on the profile's downstream
corpus (4000 sentences) with the protocol's sizes (1000 train, 500 validation, 1000 test, 3 splits):

* ``state@3`` / ``state@6`` at the task's position: 64-d features, 6 classes, 390 parameters (the
  standard probe of notebook 02; Newton with the dense Hessian);
* ``state@3 [all positions]``: the 10 positions concatenated, 640-d, 3846 parameters (beyond
  ``flatlib.measurement.downstream.DENSE_LIMIT``: Newton with block-preconditioned conjugate gradients).

Per (features, L2), on split 0: seconds per fit of each solver (each fit cold-started, best of
``--repeats``), Newton steps, the capped L-BFGS's excess objective over the exact optimum, and both test
accuracies. Per features: each protocol whole (protocol 1 on its grid 1e-4 .. 1e-1, protocol 2 on
``PROBE_V2_L2_GRID`` 1e-7 .. 10 with warm starts down the grid, to 3 strengths past the best), its accuracy,
chosen L2(s) and total seconds. One thread.

    python -m bench.probes                 # ~3 minutes (writes bench/results/probes.json)
    python -m bench.probes --quick         # a smoke test (writes probes_quick.json)
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from bench.common import cpu_model, print_table
from flatlib.languages import build_language
from flatlib.measurement.downstream import (
    DEFAULT_L2_GRID,
    PROBE_V2_L2_GRID,
    _accuracy,
    exact_probe,
    fit_logistic,
    fit_logistic_exact,
    linear_probe,
    model_features,
    pool,
    probe_inputs,
)
from flatlib.measurement.measure import downstream_corpus
from flatlib.profiles import language_spec, resolve
from flatlib.runner.runs import RunStore
from flatlib.training.train import PretrainConfig, load_model, pretrain

RESULTS_DIR = Path(__file__).resolve().parent / "results"
FIT_L2 = (1e-6, 1e-5, 1e-4, 1e-3, 1e-1)


def trained_features(steps: int, n_sentences: int) -> dict[str, tuple[torch.Tensor, torch.Tensor, int]]:
    """``{name: (features [n, D], labels [n], classes)}`` from the cpu profile's 2x64 HMM model."""
    spec = language_spec(resolve("cpu"), "hmm")
    config = PretrainConfig(language=spec, model={"n_layer": 2, "n_head": 4, "d_model": 64, "d_ff": 256},
                            lr=3e-3, batch_size=256, steps=steps, warmup_steps=min(200, steps // 4),
                            eval_every=steps, checkpoint_every=steps, eval_pairs=1024)
    with tempfile.TemporaryDirectory() as root:
        run = pretrain(config, RunStore(Path(root)), progress=False)
        model = load_model(run, steps)
    language = build_language(spec)
    corpus = downstream_corpus(spec, n_sentences)
    features = model_features(model, corpus)
    out = {}
    for task in language.tasks:
        out[task] = (probe_inputs(language, corpus, features, task), language.task_labels(corpus, task),
                     language.n_classes(task))
    out["state@3 [all positions]"] = (pool(features, corpus), language.task_labels(corpus, "state@3"),
                                      language.n_classes("state@3"))
    return out


def objective(weight: torch.Tensor, x: torch.Tensor, y: torch.Tensor, l2: float) -> float:
    xs = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
    return float(F.cross_entropy(xs @ weight, y) + l2 * (weight[:-1] ** 2).sum())


def best_time(fn, repeats: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return min(times), result


def per_fit(name: str, x: torch.Tensor, y: torch.Tensor, classes: int, n_train: int, n_val: int, n_test: int,
            repeats: int) -> list[dict]:
    """Split 0 of the probe (protocol 1's permutation and standardisation), each solver at each L2."""
    keep = y >= 0
    x, y = x[keep].double(), y[keep]
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    train, test = order[:n_train], order[n_train + n_val : n_train + n_val + n_test]
    x = (x - x[train].mean(0)) / x[train].std(0).clamp(min=1e-8)
    rows = []
    for l2 in FIT_L2:
        t1, w1 = best_time(lambda: fit_logistic(x[train], y[train], classes, l2), repeats)
        t2, fit = best_time(lambda: fit_logistic_exact(x[train], y[train], classes, l2), repeats)
        rows.append({"features": name, "dim": x.shape[1], "l2": l2, "v1_s": t1, "v2_s": t2,
                     "newton_steps": fit.newton_steps, "max_gradient": fit.max_gradient,
                     "v1_excess_objective": objective(w1, x[train], y[train], l2) - fit.objective,
                     "v1_test": _accuracy(w1, x[test], y[test]),
                     "v2_test": _accuracy(fit.weight, x[test], y[test])})
    return rows


def protocols(name: str, x: torch.Tensor, y: torch.Tensor, classes: int, n_train: int, n_test: int) -> dict:
    start = time.perf_counter()
    v1 = linear_probe(x, y, classes, n_train=n_train, n_test=n_test, l2_grid=DEFAULT_L2_GRID)
    t1 = time.perf_counter() - start
    start = time.perf_counter()
    v2 = exact_probe(x, y, classes, n_train=n_train, n_test=n_test, l2_grid=PROBE_V2_L2_GRID)
    t2 = time.perf_counter() - start
    return {"features": name, "v1_accuracy": v1.accuracy, "v1_ci95": v1.ci95, "v1_chosen_l2": v1.chosen_l2,
            "v1_s": t1, "v2_accuracy": v2.accuracy, "v2_ci95": v2.ci95, "v2_chosen_l2": v2.chosen_l2[0],
            "v2_l2_edge": v2.l2_edge, "v2_max_gradient": v2.max_gradient, "v2_s": t2,
            "v2_curve": {str(k): v for k, v in v2.sweep["test_accuracy"].items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=1500, help="pre-training steps of the 2x64 model")
    parser.add_argument("--repeats", type=int, default=3, help="timed fits per (solver, L2): the best counts")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke test: 100 steps, 1 repeat, 1 feature set")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON path (default bench/results/probes.json)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    steps, repeats = (100, 1) if args.quick else (args.steps, args.repeats)
    out = args.out or RESULTS_DIR / ("probes_quick.json" if args.quick else "probes.json")
    n_train, n_test = 1000, 1000
    start = time.perf_counter()
    data = trained_features(steps, 4000)
    print(f"features from the 2x64 HMM model after {steps} steps: {time.perf_counter() - start:.0f} s")
    if args.quick:
        data = {"state@3": data["state@3"]}
    fits, whole = [], []
    for name, (x, y, classes) in data.items():
        fits += per_fit(name, x, y, classes, n_train, n_test // 2, n_test, repeats)
        whole.append(protocols(name, x, y, classes, n_train, n_test))
    print("\nPer fit (split 0, 1000 training examples, cold start, best of", repeats, "):")
    print_table(["features", "L2", "v1 s/fit", "v2 s/fit", "Newton", "v1 excess obj", "v1 test", "v2 test"],
                [[r["features"], f"{r['l2']:g}", f"{r['v1_s']:.3f}", f"{r['v2_s']:.3f}",
                  str(r["newton_steps"]), f"{r['v1_excess_objective']:.1e}", f"{r['v1_test']:.3f}",
                  f"{r['v2_test']:.3f}"] for r in fits])
    print("\nWhole protocols (3 splits; v1: 4 L2 per split, chosen per split; v2: 13 L2, one pooled choice):")
    print_table(["features", "v1 acc", "v1 chosen L2", "v1 s", "v2 acc", "v2 L2", "edge", "v2 s"],
                [[r["features"], f"{r['v1_accuracy']:.4f}", ",".join(f"{v:g}" for v in r["v1_chosen_l2"]),
                  f"{r['v1_s']:.2f}", f"{r['v2_accuracy']:.4f}", f"{r['v2_chosen_l2']:g}",
                  str(r["v2_l2_edge"]), f"{r['v2_s']:.2f}"] for r in whole])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"cpu": cpu_model(), "threads": 1, "steps": steps, "repeats": repeats,
                               "n_train": n_train, "n_test": n_test, "per_fit": fits, "protocols": whole},
                              indent=1))
    print(f"\nwritten: {out}")


if __name__ == "__main__":
    main()
