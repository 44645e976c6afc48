"""What fixing the whole exact gauge costs, and how noisy it is, against the LayerNorm-only invariant trace
and the raw trace.

The model and the evaluation set are ``bench.flatness``'s: a 2x64 Transformer trained on a small HMM to
~0.02 nats above the optimum (cached in ``build/bench_runs``; the first run trains it, about 2 minutes),
and its first 4096 validation pairs (1024 with ``--quick``) in batches of 512, with the exact conditionals
as targets (the expected loss, as the notebooks measure). Three estimators on the same pairs and the same
probes (seed 0):

* ``flatness.hessian_trace``: the raw trace.
* ``flatness.invariant_trace``: the LayerNorm/reader gauge fixed.
* ``symmetry.full_gauge_trace``: LayerNorm/reader, Q/K and V/O fixed jointly (``transformer_groups``).

each for the model as trained and after a function-preserving rescaling along every group at once (per
coordinate ``c = exp(z)``, ``z`` standard normal, seed 1). Per row: estimate ± SE, the setup (the exact
diagonals; for the full gauge also the check of the groups and Newton), seconds per probe, the per-probe
coefficient of variation ``cv`` and the time to a 2% relative standard error, ``setup + (cv / 0.02)^2 x
per probe``. Timings are wall times on a possibly shared machine (the load average is recorded).

    python -m bench.gauge             # ~4 minutes (plus ~2 the first time, to train)
    python -m bench.gauge --quick     # 1024 pairs, 4 probes: a smoke test (writes gauge_quick.json)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from datetime import datetime
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from bench.common import cpu_model, print_table
from bench.flatness import BATCH, MAIN, REL_SE, RESULTS_DIR, Batch, probes_for, split, timed, trained
from flatlib.languages import build_language
from flatlib.measurement.flatness import (
    TraceEstimate,
    fisher_diagonal,
    hessian_trace,
    invariant_trace,
    mlm_logits_fn,
    mlm_loss_fn,
)
from flatlib.measurement.symmetry import (
    full_gauge_trace,
    gauge_minimum,
    rescale,
    transformer_groups,
    verify_groups,
)
from flatlib.training.model import gauge_pairs
from flatlib.training.objective import evaluate, validation_set

PROBES = {"full": 12, "quick": 4}  # 12: the notebooks' protocol (bench.flatness.INVARIANT_PROBES)
PAIRS = {"full": 4096, "quick": 1024}


def row(estimate: TraceEstimate, seconds: float, setup_s: float, n_probes: int) -> dict[str, Any]:
    """One estimator's numbers; ``cv`` from its probe samples (the exact part adds no variance)."""
    per_probe = (seconds - setup_s) / n_probes
    cv = float(estimate.samples.std()) / abs(estimate.mean)
    n = probes_for(cv)
    return {"estimate": estimate.mean, "stderr": estimate.stderr, "seconds": seconds, "setup_s": setup_s,
            "per_probe_s": per_probe, "cv": cv, "probes_to_target": n,
            "seconds_to_target": setup_s + n * per_probe}


def rows_for(model: nn.Module, batches: Sequence[Batch], n_probes: int) -> dict[str, Any]:
    """The three estimators on ``model`` (see the module doc), with the setups timed on their own."""
    groups = transformer_groups(model)
    gauged = [m.parameter for g in groups for m in g.members]
    norm_gauged = [n for norm, reader in gauge_pairs(model)
                   for n in (f"{norm}.weight", f"{norm}.bias", f"{reader}.weight")]
    raw_s, raw = timed(lambda: hessian_trace(model, mlm_loss_fn, batches, n_probes, seed=0))
    norm_setup_s, _ = timed(lambda: fisher_diagonal(model, mlm_logits_fn, batches, parameters=norm_gauged))
    norm_s, norm = timed(lambda: invariant_trace(model, mlm_loss_fn, mlm_logits_fn, batches, n_probes,
                                                 seed=0))

    def full_setup() -> None:
        verify_groups(model, groups, mlm_logits_fn, batches[0], seed=0)
        gauge_minimum(groups, fisher_diagonal(model, mlm_logits_fn, batches, parameters=sorted(set(gauged))))

    full_setup_s, _ = timed(full_setup)
    full_s, full = timed(lambda: full_gauge_trace(model, mlm_loss_fn, mlm_logits_fn, batches, n_probes,
                                                  seed=0))
    return {"raw hessian_trace": row(raw, raw_s, 0.0, n_probes),
            "invariant_trace (LayerNorm only)": row(norm, norm_s, norm_setup_s, n_probes),
            "full_gauge_trace": {**row(full, full_s, full_setup_s, n_probes),
                                 "newton_steps": full.minimum.iterations, "raw_mean": full.raw_mean,
                                 "norm_only": full.norm_mean}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke test, not numbers")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    size = "quick" if args.quick else "full"
    load_start = os.getloadavg()
    model, train_s, cached = trained(MAIN)
    val = validation_set(MAIN, build_language(MAIN.language))
    gap = evaluate(model, val)
    # the expected loss: (inputs, positions, exact conditionals)
    batches = [(b[0], b[1], b[3]) for b in split((val.inputs, val.positions, val.targets, val.true_probs),
                                                   PAIRS[size], BATCH)]
    groups = transformer_groups(model)
    g = torch.Generator().manual_seed(1)
    moved = rescale(model, groups, {grp.name: torch.randn(grp.size, generator=g, dtype=torch.float64)
                                    for grp in groups})
    n_probes = PROBES[size]
    print(f"model: gap {gap['gap']:.4f} nats ({'cached' if cached else f'trained in {train_s:.0f}s'}); "
          f"{PAIRS[size]} pairs, {n_probes} probes", flush=True)
    results = {label: rows_for(m, batches, n_probes)
               for label, m in (("as trained", model), ("every group rescaled", moved))}
    load_end = os.getloadavg()
    print(f"\nRaw, LayerNorm-only and full-gauge traces of the expected loss (time to {REL_SE:.0%} SE = "
          "setup + probes x s/probe):")
    target = f"{REL_SE:.0%}"
    print_table(("model", "estimator", "estimate ± SE", "cv", "setup s", "s/probe", f"probes to {target}",
                 f"s to {target}"),
                [(label, name, f"{r['estimate']:.3f} ± {r['stderr']:.3f}", f"{r['cv']:.3f}",
                  f"{r['setup_s']:.2f}", f"{r['per_probe_s']:.3f}", str(r["probes_to_target"]),
                  f"{r['seconds_to_target']:.1f}")
                 for label, rows in results.items() for name, r in rows.items()], text_columns=2)
    print(f"load average: {load_start[0]:.2f} at start, {load_end[0]:.2f} at end")
    out = RESULTS_DIR / f"gauge{'_quick' if args.quick else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {"date": datetime.now().astimezone().isoformat(timespec="seconds"), "torch": torch.__version__,
              "python": platform.python_version(), "threads": args.threads, "quick": args.quick,
              "machine": {"cpu": cpu_model(), "cpu_count": os.cpu_count(), "load_average_start": load_start,
                          "load_average_end": load_end},
              "model": {"config": MAIN.to_dict(), **gap}, "pairs": PAIRS[size], "probes": n_probes,
              "results": results}
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
